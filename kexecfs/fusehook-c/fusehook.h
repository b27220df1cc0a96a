/*
 * Declarations shared by the files of kexecfs._fusehook; the top of module.c
 * says which file holds what.  Private to this folder.  Every file includes
 * it first.
 */

#ifndef KEXECFS_FUSEHOOK_H
#define KEXECFS_FUSEHOOK_H

/* Python.h comes first (as the C API requires) and defines _GNU_SOURCE, which
 * dlvsym() and RTLD_NEXT need. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* 3.5 is the first API level where the ioctl op takes `unsigned int cmd`
 * (ioctl numbers with the read bit set are >= 2^31).  pyfuse3 builds with
 * FUSE_USE_VERSION 32, where cmd is `int`: the ops table has the same layout. */
#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>

#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

/* The interposing definitions must stay exported whatever -fvisibility the
 * build uses: being found by the dynamic linker is their whole purpose. */
#define INTERPOSE __attribute__((visibility("default")))

/*
 * Every other name shared between the files is hidden, whatever -fvisibility
 * the build uses: fusehook.py loads the extension with RTLD_GLOBAL, so an
 * exported log_error() or hooked_ioctl() would join the process's global
 * symbol scope and could capture another library's reference to a function
 * of the same name.  Only PyInit__fusehook and the INTERPOSE definitions are
 * exported.
 */
#pragma GCC visibility push(hidden)

/* log.c: logging through the "kexecfs.fusehook" logger (needs the GIL) */

/* Creates the logger; -1 with an exception set on failure. */
int log_init(void);
/* With with_exception, consumes the current exception and logs it with its
 * traceback.  The format is PyUnicode_FromFormat()'s. */
void log_error(int with_exception, const char *format, ...);
void log_warning(const char *format, ...);
void log_info(const char *format, ...);

/* session.c: the interposed fuse_session_new() and the ops it installs */

/* Finds libfuse's own functions; -1 with ImportError set on failure. */
int hook_init(void);
/* Whether a FUSE session was created with our ops table. */
int hook_is_live(void);
PyObject *fh_hook_active(PyObject *self, PyObject *unused);
PyObject *fh_last_request_ctx(PyObject *self, PyObject *unused);
PyObject *fh_last_request_flags(PyObject *self, PyObject *unused);

/* ioctl.c: FUSE_IOCTL requests, answered by a Python handler */

/* Creates the table of outstanding requests; -1 with an exception set. */
int ioctl_init(void);
/* The ioctl op session.c installs. */
void hooked_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void *arg,
                  struct fuse_file_info *fi, unsigned flags,
                  const void *in_buf, size_t in_bufsz, size_t out_bufsz);
PyObject *fh_set_ioctl_handler(PyObject *self, PyObject *callback);
PyObject *fh_reply_ioctl(PyObject *self, PyObject *args);
PyObject *fh_reply_err(PyObject *self, PyObject *args);

/* passthrough.c: FUSE passthrough, which libfuse < 3.17 has no API for */

/* Finds libfuse's functions and creates the bookkeeping tables; -1 with an
 * exception set on failure. */
int passthrough_init(void);
/* Bookkeeping the ops wrappers feed: a FUSE_OPEN is being dispatched, a
 * FUSE_OPENDIR is (see passthrough_forget_req()), fh is being released. */
void passthrough_note_open(fuse_req_t req);
void passthrough_forget_req(fuse_req_t req);
void passthrough_release(uint64_t fh);
PyObject *fh_passthrough_available(PyObject *self, PyObject *unused);
PyObject *fh_passthrough_open(PyObject *self, PyObject *args);
PyObject *fh_passthrough_stats(PyObject *self, PyObject *unused);
/* For connection.c: the /dev/fuse descriptor of the hooked session (-1
 * without our custom io), and the INIT request the next reply answers (a
 * replayed one, which io_read() never saw). */
int passthrough_dev_fd(void);
void passthrough_expect_init(uint64_t unique, int offered);
/* A backing registration a previous daemon of the connection made. */
void passthrough_inherit_backing(uint64_t dev, uint64_t ino, int32_t id);

/* connection.c: the FUSE connection across daemon restarts */

/* io_read() read a request of res bytes into buf. */
void connection_note_request(const void *buf, ssize_t res);
/* Sends libfuse's INIT reply, or, for a replayed INIT, checks it against the
 * reply the kernel got and drops it; returns what writev() would. */
ssize_t connection_send_init_reply(int fd, const struct iovec *iov, int count);
/* Whether the INIT reply the kernel got enabled FUSE_PASSTHROUGH: for an
 * adopted connection, the original daemon's; otherwise 1. */
int connection_kernel_passthrough(void);
/* Called once our custom io is installed on a newly mounted session: replays
 * the saved INIT if the session is an adopted connection. */
void connection_mounted(struct fuse_session *se);
/* passthrough.c registered backing id for the file (dev, ino), or closed it:
 * kept with the connection for the next daemon. */
void connection_backing_kept(uint64_t dev, uint64_t ino, int32_t id);
void connection_backing_closed(int32_t id);
PyObject *fh_record_init_exchange(PyObject *self, PyObject *arg);
PyObject *fh_adopt_connection(PyObject *self, PyObject *arg);
PyObject *fh_session_fd(PyObject *self, PyObject *unused);
PyObject *fh_last_request(PyObject *self, PyObject *unused);
PyObject *fh_connection_status(PyObject *self, PyObject *unused);

#pragma GCC visibility pop

#endif /* KEXECFS_FUSEHOOK_H */
