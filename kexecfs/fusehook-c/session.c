/*
 * The hook itself: pyfuse3's FUSE session gets our ops table.
 *
 * This file defines fuse_session_new() (and, for libfuse >= 3.17,
 * fuse_session_new_versioned()).  kexecfs/fusehook.py loads it with
 * RTLD_GLOBAL before pyfuse3 is imported, which puts these definitions in the
 * process's global symbol scope; the dynamic linker searches that scope before
 * pyfuse3's own dependencies, so when pyfuse3's extension is loaded (RTLD_NOW:
 * every symbol bound at load time) its fuse_session_new reference binds here
 * instead of in libfuse.  Our version copies pyfuse3's ops table, patches the
 * copy, and passes it to libfuse's real function, which copies it again
 * (fuse_session_new keeps no pointer to the table it is given).
 *
 * The wrappers around pyfuse3's ops record the request context (for
 * last_request_ctx()) and feed the passthrough bookkeeping; the ioctl op is
 * ioctl.c's.
 */

#include "fusehook.h"

#include <dlfcn.h>
#include <stddef.h>
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

typedef struct fuse_session *(*session_new_fn)(
    struct fuse_args *, const struct fuse_lowlevel_ops *, size_t, void *);
typedef struct fuse_session *(*session_new_versioned_fn)(
    struct fuse_args *, const struct fuse_lowlevel_ops *, size_t,
    const struct libfuse_version *, void *);

/* The hooked session: one per process (see the top of this file). */
static struct hook_state {
    /* libfuse's own functions, resolved at import (hook_init()). */
    session_new_fn real_session_new;
    session_new_versioned_fn real_session_new_versioned;
    /* The ops table the hooked session was created with, as pyfuse3 filled
     * it: the wrappers below dispatch to these original function pointers. */
    struct fuse_lowlevel_ops orig_ops;
    int live;
    /* fuse_req_ctx() of the last request a context wrapper saw. */
    struct {
        pid_t pid;
        uid_t uid;
        gid_t gid;
        int valid;
        /* fi->flags of the last read, write, flush or release: the open flags of
         * the file, which a restarted daemon needs to take over an open file
         * it did not open (pyfuse3 passes only the fh). */
        int flags;
    } last_ctx;
} hook;

/* ------------------------------------------------------------------------ */
/* Request context: wrappers around pyfuse3's ops                           */
/* ------------------------------------------------------------------------ */

/* Valid for the Python handler until its first await: pyfuse3's C callback
 * only creates the handler's coroutine, and the worker task awaits it right
 * after fuse_session_process_buf() returns, with no checkpoint in between. */
static void record_ctx(fuse_req_t req)
{
    const struct fuse_ctx *ctx = fuse_req_ctx(req);

    hook.last_ctx.pid = ctx->pid;
    hook.last_ctx.uid = ctx->uid;
    hook.last_ctx.gid = ctx->gid;
    hook.last_ctx.valid = 1;
}

static void wrap_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr,
                         int to_set, struct fuse_file_info *fi)
{
    record_ctx(req);
    hook.orig_ops.setattr(req, ino, attr, to_set, fi);
}

static void wrap_open(fuse_req_t req, fuse_ino_t ino,
                      struct fuse_file_info *fi)
{
    record_ctx(req);
    passthrough_note_open(req);
    hook.orig_ops.open(req, ino, fi);
}

/* Only for passthrough: see passthrough_forget_req(). */
static void wrap_opendir(fuse_req_t req, fuse_ino_t ino,
                         struct fuse_file_info *fi)
{
    passthrough_forget_req(req);
    hook.orig_ops.opendir(req, ino, fi);
}

static void wrap_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                      struct fuse_file_info *fi)
{
    record_ctx(req);
    hook.last_ctx.flags = fi->flags;
    hook.orig_ops.read(req, ino, size, off, fi);
}

static void wrap_write(fuse_req_t req, fuse_ino_t ino, const char *buf,
                       size_t size, off_t off, struct fuse_file_info *fi)
{
    record_ctx(req);
    hook.last_ctx.flags = fi->flags;
    hook.orig_ops.write(req, ino, buf, size, off, fi);
}

static void wrap_flush(fuse_req_t req, fuse_ino_t ino,
                       struct fuse_file_info *fi)
{
    record_ctx(req);
    hook.last_ctx.flags = fi->flags;
    hook.orig_ops.flush(req, ino, fi);
}

static void wrap_release(fuse_req_t req, fuse_ino_t ino,
                         struct fuse_file_info *fi)
{
    record_ctx(req);
    hook.last_ctx.flags = fi->flags;
    passthrough_release(fi->fh);
    hook.orig_ops.release(req, ino, fi);
}

static void wrap_write_buf(fuse_req_t req, fuse_ino_t ino,
                           struct fuse_bufvec *bufv, off_t off,
                           struct fuse_file_info *fi)
{
    record_ctx(req);
    hook.last_ctx.flags = fi->flags;
    hook.orig_ops.write_buf(req, ino, bufv, off, fi);
}

static void wrap_poll(fuse_req_t req, fuse_ino_t ino,
                      struct fuse_file_info *fi, struct fuse_pollhandle *ph)
{
    record_ctx(req);
    hook.orig_ops.poll(req, ino, fi, ph);
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
    size_t ours = sizeof(hook.orig_ops);
    size_t known = *op_size < ours ? *op_size : ours;
    size_t size = *op_size > ours ? *op_size : ours;
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
    if (hook.live && memcmp(op, &hook.orig_ops, known) != 0) {
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
    memset(&hook.orig_ops, 0, sizeof(hook.orig_ops));
    memcpy(&hook.orig_ops, op, known);

#define WRAP(name) \
    do { if (hook.orig_ops.name) ops->name = wrap_##name; } while (0)
    WRAP(setattr);
    WRAP(open);
    WRAP(opendir);
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
        return hook.real_session_new(args, op, op_size, userdata);
    se = hook.real_session_new(args, ops, op_size, userdata);
    free(ops);
    if (se != NULL)
        hook.live = 1;
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
     * hook_init() found the real one. */
    if (hook.real_session_new_versioned == NULL) {
        fuse_log(FUSE_LOG_ERR, "kexecfs._fusehook: this libfuse has no "
                 "fuse_session_new_versioned@FUSE_3.17\n");
        return NULL;
    }
    ops = hooked_ops(op, &op_size);
    if (ops == NULL)
        return hook.real_session_new_versioned(args, op, op_size, version,
                                               userdata);
    se = hook.real_session_new_versioned(args, ops, op_size, version, userdata);
    free(ops);
    if (se != NULL)
        hook.live = 1;
    return se;
}

/* ------------------------------------------------------------------------ */
/* Import and Python API                                                    */
/* ------------------------------------------------------------------------ */

int hook_init(void)
{
    /* RTLD_NEXT searches the objects loaded after us in our lookup scope:
     * libfuse, which we link against, and not this module's own definitions.
     * The version is pinned to FUSE_3.0, the one pyfuse3's reference names:
     * libfuse keeps several ABIs of some functions under one name
     * (fuse_session_custom_io@FUSE_3.0 and @@FUSE_3.17, for example), and plain
     * dlsym would return whichever is the current default. */
    hook.real_session_new = (session_new_fn)dlvsym(
        RTLD_NEXT, "fuse_session_new", "FUSE_3.0");
    if (hook.real_session_new == NULL) {
        PyErr_Format(PyExc_ImportError, "kexecfs._fusehook: libfuse's "
                     "fuse_session_new@FUSE_3.0 not found: %s", dlerror());
        return -1;
    }
    /* libfuse >= 3.17 only; pyfuse3 built against it calls this instead. */
    hook.real_session_new_versioned = (session_new_versioned_fn)dlvsym(
        RTLD_NEXT, "fuse_session_new_versioned", "FUSE_3.17");
    return 0;
}

int hook_is_live(void)
{
    return hook.live;
}

PyObject *fh_hook_active(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(hook.live);
}

PyObject *fh_last_request_ctx(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    if (!hook.last_ctx.valid) {
        PyErr_SetString(PyExc_RuntimeError,
                        "no FUSE request has been dispatched yet");
        return NULL;
    }
    return Py_BuildValue("(iII)", (int)hook.last_ctx.pid,
                         (unsigned int)hook.last_ctx.uid,
                         (unsigned int)hook.last_ctx.gid);
}

PyObject *fh_last_request_flags(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromLong(hook.last_ctx.flags);
}
