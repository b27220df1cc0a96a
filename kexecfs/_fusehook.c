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
 *
 * How: this module defines fuse_session_new() (and, for libfuse >= 3.17,
 * fuse_session_new_versioned()).  kexecfs/fusehook.py loads it with
 * RTLD_GLOBAL before pyfuse3 is imported, which puts these definitions in the
 * process's global symbol scope; the dynamic linker searches that scope before
 * pyfuse3's own dependencies, so when pyfuse3's extension is loaded (RTLD_NOW:
 * every symbol bound at load time) its fuse_session_new reference binds here
 * instead of in libfuse.  Our version copies pyfuse3's ops table, patches the
 * copy, and passes it to libfuse's real function, which copies it again
 * (fuse_session_new keeps no pointer to the table it is given).
 *
 * Threading: pyfuse3 calls fuse_session_process_buf() from its trio thread
 * with the GIL held, so all ops run there, one request at a time; the shared
 * state below is only touched with the GIL held.  The hook is a property of
 * the process (symbol interposition), so this module keeps its state in
 * globals and uses single-phase initialisation.
 */

/* Python.h comes first (as the C API requires) and defines _GNU_SOURCE, which
 * dlvsym() and RTLD_NEXT need. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* 3.5 is the first API level where the ioctl op takes `unsigned int cmd`
 * (ioctl numbers with the read bit set are >= 2^31).  pyfuse3 builds with
 * FUSE_USE_VERSION 32, where cmd is `int`: the ops table has the same layout. */
#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>

#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* From libfuse 3.17 on, fuse_lowlevel.h turns fuse_session_new() into an
 * inline function calling fuse_session_new_versioned(); we define the real
 * symbol, so the macro must not rewrite our definition. */
#ifdef fuse_session_new
#undef fuse_session_new
#endif

/* Only passed through; the definition exists in libfuse >= 3.17 headers. */
struct libfuse_version;

/* The interposing definitions must stay exported whatever -fvisibility the
 * build uses: being found by the dynamic linker is their whole purpose. */
#define INTERPOSE __attribute__((visibility("default")))

/* ------------------------------------------------------------------------ */
/* Shared state                                                             */
/* ------------------------------------------------------------------------ */

/* The ops table the hooked session was created with, as pyfuse3 filled it:
 * the wrappers below dispatch to these original function pointers. */
static struct fuse_lowlevel_ops orig_ops;
static int hook_live;

static struct {
    pid_t pid;
    uid_t uid;
    gid_t gid;
    int valid;
} last_ctx;

static PyObject *ioctl_handler;     /* callable or NULL */
/* Outstanding ioctl requests: {fuse_req_t as int: out_size}.  A fuse_req_t is
 * freed by the reply, so answering twice (or a made-up handle) would be a
 * use-after-free in libfuse; checking this dict turns it into ValueError. */
static PyObject *outstanding;
static PyObject *logger;            /* logging.getLogger("kexecfs.fusehook") */

typedef struct fuse_session *(*session_new_fn)(
    struct fuse_args *, const struct fuse_lowlevel_ops *, size_t, void *);
typedef struct fuse_session *(*session_new_versioned_fn)(
    struct fuse_args *, const struct fuse_lowlevel_ops *, size_t,
    const struct libfuse_version *, void *);

/* libfuse's own functions, resolved at import (see PyInit__fusehook). */
static session_new_fn real_session_new;
static session_new_versioned_fn real_session_new_versioned;

/* ------------------------------------------------------------------------ */
/* Logging                                                                  */
/* ------------------------------------------------------------------------ */

/* Takes the current exception (traceback attached) out of the error state. */
static PyObject *take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;

    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

static void restore_exception(PyObject *exc)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc,
                  PyException_GetTraceback(exc));
#endif
}

/*
 * Logs an error through the "kexecfs.fusehook" logger, so the daemon's logging
 * configuration applies (without one, Python's last-resort handler still
 * prints errors to stderr).  With with_exception, the current exception is
 * consumed and logged with its traceback.  Never leaves an exception set:
 * pyfuse3 checks PyErr_Occurred() after fuse_session_process_buf() and would
 * stop its main loop.  If logging itself fails, the exception goes to
 * sys.unraisablehook (stderr) instead of being lost.
 */
static void log_error(int with_exception, const char *format, ...)
{
    PyObject *exc = NULL, *msg, *res = NULL;
    va_list va;

    if (with_exception)
        exc = take_exception();
    va_start(va, format);
    msg = PyUnicode_FromFormatV(format, va);
    va_end(va);
    if (msg != NULL) {
        PyObject *method = PyObject_GetAttrString(logger, "error");
        PyObject *args = Py_BuildValue("(sO)", "%s", msg);
        PyObject *kwargs = Py_BuildValue("{s:O}", "exc_info",
                                         exc != NULL ? exc : Py_False);

        if (method != NULL && args != NULL && kwargs != NULL)
            res = PyObject_Call(method, args, kwargs);
        Py_XDECREF(method);
        Py_XDECREF(args);
        Py_XDECREF(kwargs);
    }
    if (res == NULL) {
        PyErr_WriteUnraisable(msg);
        if (exc != NULL) {
            restore_exception(exc);
            exc = NULL;
            PyErr_WriteUnraisable(msg);
        }
    }
    Py_XDECREF(res);
    Py_XDECREF(msg);
    Py_XDECREF(exc);
}

/* ------------------------------------------------------------------------ */
/* Request context: wrappers around pyfuse3's ops                           */
/* ------------------------------------------------------------------------ */

/* Valid for the Python handler until its first await: pyfuse3's C callback
 * only creates the handler's coroutine, and the worker task awaits it right
 * after fuse_session_process_buf() returns, with no checkpoint in between. */
static void record_ctx(fuse_req_t req)
{
    const struct fuse_ctx *ctx = fuse_req_ctx(req);

    last_ctx.pid = ctx->pid;
    last_ctx.uid = ctx->uid;
    last_ctx.gid = ctx->gid;
    last_ctx.valid = 1;
}

static void wrap_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr,
                         int to_set, struct fuse_file_info *fi)
{
    record_ctx(req);
    orig_ops.setattr(req, ino, attr, to_set, fi);
}

static void wrap_open(fuse_req_t req, fuse_ino_t ino,
                      struct fuse_file_info *fi)
{
    record_ctx(req);
    orig_ops.open(req, ino, fi);
}

static void wrap_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                      struct fuse_file_info *fi)
{
    record_ctx(req);
    orig_ops.read(req, ino, size, off, fi);
}

static void wrap_write(fuse_req_t req, fuse_ino_t ino, const char *buf,
                       size_t size, off_t off, struct fuse_file_info *fi)
{
    record_ctx(req);
    orig_ops.write(req, ino, buf, size, off, fi);
}

static void wrap_flush(fuse_req_t req, fuse_ino_t ino,
                       struct fuse_file_info *fi)
{
    record_ctx(req);
    orig_ops.flush(req, ino, fi);
}

static void wrap_release(fuse_req_t req, fuse_ino_t ino,
                         struct fuse_file_info *fi)
{
    record_ctx(req);
    orig_ops.release(req, ino, fi);
}

static void wrap_write_buf(fuse_req_t req, fuse_ino_t ino,
                           struct fuse_bufvec *bufv, off_t off,
                           struct fuse_file_info *fi)
{
    record_ctx(req);
    orig_ops.write_buf(req, ino, bufv, off, fi);
}

static void wrap_poll(fuse_req_t req, fuse_ino_t ino,
                      struct fuse_file_info *fi, struct fuse_pollhandle *ph)
{
    record_ctx(req);
    orig_ops.poll(req, ino, fi, ph);
}

/* ------------------------------------------------------------------------ */
/* Ioctl                                                                    */
/* ------------------------------------------------------------------------ */

/* Logs a failed fuse_reply_*().  -ENOENT means the caller was interrupted
 * and the kernel dropped the request: normal, and libfuse is silent too. */
static void check_reply(int ret, const char *what)
{
    if (ret < 0 && ret != -ENOENT)
        log_error(0, "%s() failed: %s", what, strerror(-ret));
}

/* Answers EIO if the request is still outstanding: a handler that failed may
 * have replied before it failed, and a second reply must not happen. */
static void fail_request(PyObject *key, fuse_req_t req)
{
    int found = PyDict_Contains(outstanding, key);

    if (found < 0) {
        log_error(1, "ioctl request bookkeeping failed");
        return;
    }
    if (!found)
        return;
    if (PyDict_DelItem(outstanding, key) < 0)
        log_error(1, "ioctl request bookkeeping failed");
    check_reply(fuse_reply_err(req, EIO), "fuse_reply_err");
}

static void hooked_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd,
                         void *arg, struct fuse_file_info *fi, unsigned flags,
                         const void *in_buf, size_t in_bufsz,
                         size_t out_bufsz)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    const struct fuse_ctx *ctx;
    PyObject *handler, *key, *size, *res;

    if (ioctl_handler == NULL) {
        check_reply(fuse_reply_err(req, ENOTTY), "fuse_reply_err");
        goto out;
    }

    key = PyLong_FromVoidPtr(req);
    size = PyLong_FromSize_t(out_bufsz);
    if (key == NULL || size == NULL || PyDict_SetItem(outstanding, key, size) < 0) {
        log_error(1, "cannot track ioctl request: replying EIO");
        check_reply(fuse_reply_err(req, EIO), "fuse_reply_err");
        Py_XDECREF(key);
        Py_XDECREF(size);
        goto out;
    }
    Py_DECREF(size);

    /* Our own reference: the handler may replace itself while running. */
    handler = Py_NewRef(ioctl_handler);
    ctx = fuse_req_ctx(req);
    res = PyObject_CallFunction(
        handler, "OKIKIy#nKiII", key, (unsigned long long)ino, cmd,
        (unsigned long long)fi->fh, flags,
        /* y# turns a NULL pointer into None; no input is b"". */
        in_buf != NULL ? (const char *)in_buf : "", (Py_ssize_t)in_bufsz,
        (Py_ssize_t)out_bufsz, (unsigned long long)(uintptr_t)arg,
        (int)ctx->pid, (unsigned int)ctx->uid, (unsigned int)ctx->gid);
    if (res == NULL) {
        log_error(1, "ioctl handler %R raised (cmd 0x%x): replying EIO",
                  handler, cmd);
        fail_request(key, req);
    } else if (res != Py_None) {
        /* Most likely an async def handler: its coroutine will never run,
         * and the caller would hang forever. */
        log_error(0, "ioctl handler %R returned %R instead of None "
                  "(cmd 0x%x): replying EIO", handler, res, cmd);
        fail_request(key, req);
    }
    Py_XDECREF(res);
    Py_DECREF(handler);
    Py_DECREF(key);
out:
    PyGILState_Release(gil);
}

/* ------------------------------------------------------------------------ */
/* Interposed libfuse entry points                                          */
/* ------------------------------------------------------------------------ */

/*
 * Returns a malloc'd copy of op (at least as large as our struct, so every
 * field we patch exists) with our ioctl op and the context wrappers, and
 * remembers the original functions; *op_size is updated to the copy's size.
 * Returns NULL if op must be passed through unchanged: nothing to hook, or
 * (logged) it cannot be hooked.
 */
static struct fuse_lowlevel_ops *hooked_ops(const struct fuse_lowlevel_ops *op,
                                            size_t *op_size)
{
    size_t known = *op_size < sizeof(orig_ops) ? *op_size : sizeof(orig_ops);
    size_t size = *op_size > sizeof(orig_ops) ? *op_size : sizeof(orig_ops);
    struct fuse_lowlevel_ops *ops;

    /* A mount-only session (libfuse >= 3.17 allows op == NULL), or a table we
     * built ourselves: from libfuse 3.17 on, fuse_session_new@FUSE_3.0 is
     * implemented by calling fuse_session_new_versioned, through the PLT, so
     * that call lands in our wrapper again. */
    if (op == NULL ||
        (*op_size >= offsetof(struct fuse_lowlevel_ops, ioctl) +
                     sizeof(op->ioctl) &&
         op->ioctl == hooked_ioctl))
        return NULL;
    /* The wrappers dispatch through one global copy of the original ops, so
     * only one ops table can be hooked per process.  pyfuse3 supports one
     * session at a time and passes the same table every time. */
    if (hook_live && memcmp(op, &orig_ops, known) != 0) {
        fuse_log(FUSE_LOG_ERR, "kexecfs._fusehook: a second, different FUSE "
                 "ops table was passed to fuse_session_new(): not hooking it\n");
        return NULL;
    }
    ops = calloc(1, size);
    if (ops == NULL) {
        fuse_log(FUSE_LOG_ERR, "kexecfs._fusehook: out of memory: "
                 "FUSE session created without the hook\n");
        return NULL;
    }
    memcpy(ops, op, *op_size);
    memset(&orig_ops, 0, sizeof(orig_ops));
    memcpy(&orig_ops, op, known);

#define WRAP(name) do { if (orig_ops.name) ops->name = wrap_##name; } while (0)
    WRAP(setattr);
    WRAP(open);
    WRAP(read);
    WRAP(write);
    WRAP(flush);
    WRAP(release);
    WRAP(write_buf);
    WRAP(poll);
#undef WRAP
    ops->ioctl = hooked_ioctl;
    *op_size = size;
    return ops;
}

INTERPOSE struct fuse_session *
fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                 size_t op_size, void *userdata)
{
    struct fuse_lowlevel_ops *ops = hooked_ops(op, &op_size);
    struct fuse_session *se;

    if (ops == NULL)
        return real_session_new(args, op, op_size, userdata);
    se = real_session_new(args, ops, op_size, userdata);
    free(ops);
    if (se != NULL)
        hook_live = 1;
    return se;
}

INTERPOSE struct fuse_session *
fuse_session_new_versioned(struct fuse_args *args,
                           const struct fuse_lowlevel_ops *op, size_t op_size,
                           const struct libfuse_version *version,
                           void *userdata)
{
    struct fuse_lowlevel_ops *ops;
    struct fuse_session *se;

    /* Only a program linked against libfuse >= 3.17 calls this, and then
     * PyInit__fusehook found the real one. */
    if (real_session_new_versioned == NULL) {
        fuse_log(FUSE_LOG_ERR, "kexecfs._fusehook: this libfuse has no "
                 "fuse_session_new_versioned@FUSE_3.17\n");
        return NULL;
    }
    ops = hooked_ops(op, &op_size);
    if (ops == NULL)
        return real_session_new_versioned(args, op, op_size, version, userdata);
    se = real_session_new_versioned(args, ops, op_size, version, userdata);
    free(ops);
    if (se != NULL)
        hook_live = 1;
    return se;
}

/*
 * Passthrough (FUSE_PASSTHROUGH on libfuse 3.14, see FUSE-NOTES.md) belongs
 * in this section: it interposes fuse_session_mount (to install
 * fuse_session_custom_io and patch the INIT reply) and fuse_reply_open (to
 * add FOPEN_PASSTHROUGH and the backing id), resolving libfuse's functions in
 * PyInit__fusehook like the two above.
 */

/* ------------------------------------------------------------------------ */
/* Python API                                                               */
/* ------------------------------------------------------------------------ */

/* Removes an outstanding ioctl request from the table and returns it (and its
 * out_size); raises ValueError and returns NULL if req is not outstanding. */
static fuse_req_t take_request(PyObject *key, size_t *out_size)
{
    PyObject *size;
    fuse_req_t req;

    if (!PyLong_Check(key)) {
        PyErr_Format(PyExc_TypeError, "req must be an int, not %.100s",
                     Py_TYPE(key)->tp_name);
        return NULL;
    }
    size = PyDict_GetItemWithError(outstanding, key);
    if (size == NULL) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "%R is not an outstanding ioctl "
                         "request (already answered?)", key);
        return NULL;
    }
    *out_size = PyLong_AsSize_t(size);
    req = PyLong_AsVoidPtr(key);
    if (PyErr_Occurred() || PyDict_DelItem(outstanding, key) < 0)
        return NULL;
    return req;
}

static PyObject *fh_hook_active(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(hook_live);
}

static PyObject *fh_set_ioctl_handler(PyObject *self, PyObject *callback)
{
    (void)self;
    if (callback != Py_None && !PyCallable_Check(callback)) {
        PyErr_Format(PyExc_TypeError, "ioctl handler must be callable or None, "
                     "not %.100s", Py_TYPE(callback)->tp_name);
        return NULL;
    }
    Py_XSETREF(ioctl_handler, callback == Py_None ? NULL : Py_NewRef(callback));
    Py_RETURN_NONE;
}

static PyObject *fh_reply_ioctl(PyObject *self, PyObject *args)
{
    PyObject *key;
    Py_buffer data;
    fuse_req_t req;
    size_t out_size;

    (void)self;
    if (!PyArg_ParseTuple(args, "Oy*:reply_ioctl", &key, &data))
        return NULL;
    req = take_request(key, &out_size);
    if (req == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if ((size_t)data.len > out_size) {
        /* The kernel would answer the caller EIO anyway; say why here. */
        log_error(0, "ioctl reply of %zd bytes does not fit the caller's "
                  "%zu-byte buffer: replying EIO", data.len, out_size);
        check_reply(fuse_reply_err(req, EIO), "fuse_reply_err");
    } else {
        check_reply(fuse_reply_ioctl(req, 0, data.buf, (size_t)data.len),
                    "fuse_reply_ioctl");
    }
    PyBuffer_Release(&data);
    Py_RETURN_NONE;
}

static PyObject *fh_reply_err(PyObject *self, PyObject *args)
{
    PyObject *key;
    fuse_req_t req;
    size_t out_size;
    int err;

    (void)self;
    if (!PyArg_ParseTuple(args, "Oi:reply_err", &key, &err))
        return NULL;
    /* libfuse turns anything else into ERANGE, and 0 would be a success
     * reply without the ioctl result the kernel expects. */
    if (err <= 0 || err >= 1000) {
        PyErr_Format(PyExc_ValueError, "errno must be in 1..999, not %d", err);
        return NULL;
    }
    req = take_request(key, &out_size);
    if (req == NULL)
        return NULL;
    check_reply(fuse_reply_err(req, err), "fuse_reply_err");
    Py_RETURN_NONE;
}

static PyObject *fh_last_request_ctx(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    if (!last_ctx.valid) {
        PyErr_SetString(PyExc_RuntimeError,
                        "no FUSE request has been dispatched yet");
        return NULL;
    }
    return Py_BuildValue("(iII)", (int)last_ctx.pid,
                         (unsigned int)last_ctx.uid, (unsigned int)last_ctx.gid);
}

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
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fusehook_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kexecfs._fusehook",
    .m_doc = "Adds FUSE ioctl and per-request caller context to pyfuse3.",
    .m_size = -1,
    .m_methods = fusehook_methods,
};

PyMODINIT_FUNC PyInit__fusehook(void)
{
    PyObject *mod, *logging;

    /* RTLD_NEXT searches the objects loaded after us in our lookup scope:
     * libfuse, which we link against, and not this module's own definitions.
     * The version is pinned to FUSE_3.0, the one pyfuse3's reference names:
     * libfuse keeps several ABIs of some functions under one name
     * (fuse_session_custom_io@FUSE_3.0 and @@FUSE_3.17, for example), and plain
     * dlsym would return whichever is the current default. */
    real_session_new = (session_new_fn)dlvsym(RTLD_NEXT, "fuse_session_new",
                                              "FUSE_3.0");
    if (real_session_new == NULL) {
        PyErr_Format(PyExc_ImportError, "kexecfs._fusehook: libfuse's "
                     "fuse_session_new@FUSE_3.0 not found: %s", dlerror());
        return NULL;
    }
    /* libfuse >= 3.17 only; pyfuse3 built against it calls this instead. */
    real_session_new_versioned = (session_new_versioned_fn)dlvsym(
        RTLD_NEXT, "fuse_session_new_versioned", "FUSE_3.17");

    outstanding = PyDict_New();
    if (outstanding == NULL)
        return NULL;
    logging = PyImport_ImportModule("logging");
    if (logging == NULL)
        return NULL;
    logger = PyObject_CallMethod(logging, "getLogger", "s", "kexecfs.fusehook");
    Py_DECREF(logging);
    if (logger == NULL)
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
