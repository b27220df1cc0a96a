/*
 * FUSE_IOCTL: pyfuse3 hands libfuse an ops table without .ioctl, so every
 * ioctl on the mount would fail with ENOSYS.  session.c installs
 * hooked_ioctl(), which calls the Python handler; the handler answers each
 * request once with reply_ioctl() or reply_err(), right away or later from a
 * trio task.
 */

#include "fusehook.h"

#include <errno.h>
#include <string.h>

/* FUSE_IOCTL requests and the Python handler they go to. */
static struct ioctl_state {
    PyObject *handler;          /* callable or NULL */
    /* Outstanding ioctl requests: {fuse_req_t as int: out_size}.  A
     * fuse_req_t is freed by the reply, so answering twice (or a made-up
     * handle) would be a use-after-free in libfuse; checking this dict
     * turns it into ValueError. */
    PyObject *outstanding;
} ioctls;

/* ------------------------------------------------------------------------ */
/* Dispatch: the ioctl op                                                   */
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
    int found = PyDict_Contains(ioctls.outstanding, key);

    if (found < 0) {
        log_error(1, "ioctl request bookkeeping failed");
        return;
    }
    if (!found)
        return;
    if (PyDict_DelItem(ioctls.outstanding, key) < 0)
        log_error(1, "ioctl request bookkeeping failed");
    check_reply(fuse_reply_err(req, EIO), "fuse_reply_err");
}

void hooked_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd,
                         void *arg, struct fuse_file_info *fi, unsigned flags,
                         const void *in_buf, size_t in_bufsz,
                         size_t out_bufsz)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    const struct fuse_ctx *ctx;
    PyObject *handler, *key, *size, *res;

    if (ioctls.handler == NULL) {
        check_reply(fuse_reply_err(req, ENOTTY), "fuse_reply_err");
        goto out;
    }

    key = PyLong_FromVoidPtr(req);
    size = PyLong_FromSize_t(out_bufsz);
    if (key == NULL || size == NULL ||
        PyDict_SetItem(ioctls.outstanding, key, size) < 0) {
        log_error(1, "cannot track ioctl request: replying EIO");
        check_reply(fuse_reply_err(req, EIO), "fuse_reply_err");
        Py_XDECREF(key);
        Py_XDECREF(size);
        goto out;
    }
    Py_DECREF(size);

    /* Our own reference: the handler may replace itself while running. */
    handler = Py_NewRef(ioctls.handler);
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
/* Python API: the handler and its replies (now or deferred)                */
/* ------------------------------------------------------------------------ */

int ioctl_init(void)
{
    ioctls.outstanding = PyDict_New();
    return ioctls.outstanding == NULL ? -1 : 0;
}

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
    size = PyDict_GetItemWithError(ioctls.outstanding, key);
    if (size == NULL) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "%R is not an outstanding ioctl "
                         "request (already answered?)", key);
        return NULL;
    }
    *out_size = PyLong_AsSize_t(size);
    req = PyLong_AsVoidPtr(key);
    if (PyErr_Occurred() || PyDict_DelItem(ioctls.outstanding, key) < 0)
        return NULL;
    return req;
}

PyObject *fh_set_ioctl_handler(PyObject *self, PyObject *callback)
{
    (void)self;
    if (callback != Py_None && !PyCallable_Check(callback)) {
        PyErr_Format(PyExc_TypeError, "ioctl handler must be callable or None, "
                     "not %.100s", Py_TYPE(callback)->tp_name);
        return NULL;
    }
    Py_XSETREF(ioctls.handler,
               callback == Py_None ? NULL : Py_NewRef(callback));
    Py_RETURN_NONE;
}

PyObject *fh_reply_ioctl(PyObject *self, PyObject *args)
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

PyObject *fh_reply_err(PyObject *self, PyObject *args)
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
