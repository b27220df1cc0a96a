/*
 * kexecfs._fusehook: what pyfuse3 (3.5.0) lacks, added underneath it.
 *
 *  - FUSE_IOCTL: pyfuse3 hands libfuse an ops table without .ioctl, so every
 *    ioctl on the mount fails with ENOSYS.  We add an ioctl op that calls a
 *    Python handler, which answers (now or later) with reply_ioctl/reply_err.
 *  - The caller of write(): pyfuse3's write() gets no request context, and the
 *    opener's pid is wrong when a child writes through an inherited fd.  We
 *    wrap some of pyfuse3's ops to record fuse_req_ctx() of the request being
 *    dispatched (last_request_ctx()).
 *  - FUSE passthrough (Linux >= 6.9): libfuse 3.14 cannot enable it or put a
 *    backing file into an open reply.  We patch the INIT reply and build
 *    passthrough open replies ourselves (see passthrough.c), so a file on
 *    the mount can be served by the kernel straight from a descriptor the
 *    daemon holds.
 *
 * The files, one per concern:
 *
 *   session.c      the interposed fuse_session_new() (how the hook works),
 *                  the patched ops table, the request-context wrappers
 *   ioctl.c        FUSE_IOCTL dispatch to the Python handler, its replies
 *   passthrough.c  FUSE passthrough, which libfuse < 3.17 has no API for:
 *                  INIT patching through a custom io, backing registrations,
 *                  the interposed fuse_reply_open()
 *   connection.c   the connection across daemon restarts: the INIT exchange
 *                  recorded and replayed, resending what a dead daemon read
 *   log.c          logging through the "kexecfs.fusehook" Python logger
 *   module.c       this file: the Python module and its initialisation
 *   fusehook.h     the declarations they share
 *   fuseproto.h    the pieces of the FUSE kernel protocol spoken directly
 *
 * Threading: pyfuse3 calls fuse_session_process_buf() from its trio thread
 * with the GIL held, so all ops run there, one request at a time; the state
 * of every file is only touched with the GIL held.  The hook is a property
 * of the process (symbol interposition), so each file keeps its state in a
 * static struct (hook, ioctls, pt) rather than in module state, and the
 * module uses single-phase initialisation.
 */

#include "fusehook.h"

static PyMethodDef fusehook_methods[] = {
    {"hook_active", fh_hook_active, METH_NOARGS,
     "hook_active() -> bool: True once a FUSE session was created with our ops."},
    {"set_ioctl_handler", fh_set_ioctl_handler, METH_O,
     "set_ioctl_handler(callback): handler for FUSE_IOCTL requests "
     "(None: answer ENOTTY)."},
    {"reply_ioctl", fh_reply_ioctl, METH_VARARGS,
     "reply_ioctl(req, data): answer an ioctl request with result 0 and data."},
    {"reply_err", fh_reply_err, METH_VARARGS,
     "reply_err(req, errno): answer an ioctl request with an error."},
    {"last_request_ctx", fh_last_request_ctx, METH_NOARGS,
     "last_request_ctx() -> (pid, uid, gid) of the last request dispatched to "
     "setattr/open/read/write/write_buf/flush/release/poll."},
    {"passthrough_available", fh_passthrough_available, METH_NOARGS,
     "passthrough_available() -> bool: FUSE_INIT was answered with "
     "FUSE_PASSTHROUGH."},
    {"passthrough_open", fh_passthrough_open, METH_VARARGS,
     "passthrough_open(fh, fd): the reply to the open returning fh is to be "
     "passthrough to fd."},
    {"passthrough_stats", fh_passthrough_stats, METH_NOARGS,
     "passthrough_stats() -> (passthrough opens, direct_io fallbacks)."},
    {"last_request_flags", fh_last_request_flags, METH_NOARGS,
     "last_request_flags() -> the open flags of the file of the last read, "
     "write, flush or release dispatched."},
    {"record_init_exchange", fh_record_init_exchange, METH_O,
     "record_init_exchange(fd): write the FUSE_INIT request and reply into fd "
     "once answered."},
    {"adopt_connection", fh_adopt_connection, METH_O,
     "adopt_connection(record): the next mount of /dev/fd/N is a connection "
     "whose INIT was answered already; replay record (b'' if none)."},
    {"session_fd", fh_session_fd, METH_NOARGS,
     "session_fd() -> the /dev/fuse descriptor of the hooked session (-1 if "
     "none)."},
    {"last_request", fh_last_request, METH_NOARGS,
     "last_request() -> (unique, opcode, nodeid) of the request read last."},
    {"connection_status", fh_connection_status, METH_NOARGS,
     "connection_status() -> dict: adopted, init_reply_matches, resend."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fusehook_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kexecfs._fusehook",
    .m_doc = "Adds FUSE ioctl, per-request caller context and FUSE "
             "passthrough to pyfuse3.",
    .m_size = -1,
    .m_methods = fusehook_methods,
};

PyMODINIT_FUNC PyInit__fusehook(void)
{
    PyObject *mod;

    if (hook_init() < 0 || passthrough_init() < 0 || ioctl_init() < 0 ||
        log_init() < 0)
        return NULL;

    mod = PyModule_Create(&fusehook_module);
    if (mod == NULL)
        return NULL;
    if (PyModule_AddIntConstant(mod, "FUSE_IOCTL_DIR", FUSE_IOCTL_DIR) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
