/*
 * FUSE passthrough (Linux >= 6.9): the kernel serves read, write, splice and
 * mmap of an open FUSE file straight from a "backing" file the daemon
 * registered on /dev/fuse.  A restored memfd given back through the mount is
 * then as fast as the memfd itself, and mappings share the memfd's pages.
 *
 * Most of this file is needed only while libfuse < 3.17.  libfuse 3.14
 * predates passthrough, and libfuse's API for it (FUSE_CAP_PASSTHROUGH,
 * fuse_passthrough_open()/_close(), fuse_file_info.backing_id and
 * fuse_conn_info.max_backing_stack_depth) first shipped in 3.17.1: it is
 * often credited to 3.16, but neither 3.16.1 nor 3.16.2 has it.  So this
 * file speaks the missing protocol itself:
 *
 *  1. FUSE_INIT: the kernel offers FUSE_PASSTHROUGH; libfuse does not accept
 *     it.  We interpose fuse_session_mount() to give the session a custom io
 *     (the same /dev/fuse fd, read and writev as libfuse's default), note the
 *     INIT request in io_read(), and set FUSE_PASSTHROUGH and max_stack_depth
 *     in libfuse's INIT reply in io_writev().
 *  2. FUSE_OPEN: the daemon's open handler registers the descriptor its file
 *     handle is to be served from (passthrough_open()).  Our fuse_reply_open()
 *     registers that file with the kernel (FUSE_DEV_IOC_BACKING_OPEN) and
 *     sends FOPEN_PASSTHROUGH plus the backing id, which libfuse 3.14's
 *     struct fuse_file_info cannot express.
 *  3. FUSE_RELEASE: a backing id lives while files opened with it are open
 *     (see struct backing), and is closed after the last release.
 *
 * Once libfuse >= 3.17 can be required, this is what replaces each part:
 *
 *  1. The custom io (io_read(), io_writev(), write_init_reply(),
 *     io_splice(), install_io()), the interposed fuse_session_mount(), the
 *     KX_* protocol copies, pt.dev_fd, pt.init_req and the lookups of
 *     fuse_session_mount and fuse_session_custom_io all go.  Instead,
 *     session.c's hooked_ops() also wraps pyfuse3's .init op: after it has
 *     run, if conn->capable_ext has FUSE_CAP_PASSTHROUGH and the writeback
 *     cache is not wanted (libfuse does not check that; the kernel ignores
 *     FUSE_PASSTHROUGH with it), fuse_set_feature_flag(conn,
 *     FUSE_CAP_PASSTHROUGH).  The default max_backing_stack_depth,
 *     FUSE_BACKING_STACKED_UNDER, makes libfuse send the max_stack_depth 1
 *     written here.  probe_backing_open() needs the INIT reply processed,
 *     which .init precedes: it would move to the first registered open.
 *  2. backing_get() and backing_put() call fuse_passthrough_open(req, fd)
 *     (it returns 0 on failure and logs itself) and
 *     fuse_passthrough_close(req, id) instead of the raw ioctls, so
 *     passthrough_release() needs wrap_release()'s req.
 *  3. reply_passthrough() sets backing_id in a copy of the fuse_file_info,
 *     with keep_cache, nonseekable and direct_io cleared (see there), and
 *     calls libfuse's fuse_reply_open(), which adds FOPEN_PASSTHROUGH,
 *     instead of building struct kx_open_out.
 *
 * What stays for as long as pyfuse3's FileInfo cannot carry a backing id:
 * the interposed fuse_reply_open() itself, the registrations from
 * passthrough_open(), telling FUSE_OPEN from FUSE_OPENDIR replies, one
 * struct backing per backing file (a kernel rule, not a libfuse one), the
 * direct_io fallback and the Python calls.
 */

#include "fusehook.h"
#include "fuseproto.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>


#define KX_FUSE_DEV_IOC_BACKING_OPEN  _IOW(229, 1, struct kx_backing_map)
#define KX_FUSE_DEV_IOC_BACKING_CLOSE _IOW(229, 2, uint32_t)

typedef int (*session_mount_fn)(struct fuse_session *, const char *);
typedef int (*custom_io_fn)(struct fuse_session *,
                            const struct fuse_custom_io *, int);
typedef int (*reply_open_fn)(fuse_req_t, const struct fuse_file_info *);

/*
 * A file registered with the kernel: one per backing file, shared by all the
 * opens it serves.  The kernel insists that concurrent passthrough opens of
 * one FUSE inode use the same backing registration (with a second
 * registration, even of the same file, the opener gets EIO), so the id cannot
 * be closed right after each reply: it is kept, keyed by the backing file's
 * identity, until the last file opened with it is released.  (The kernel's
 * open files hold their own reference: closing the id only stops new opens
 * from using it.)
 */
struct backing {
    struct backing *next;
    dev_t dev;
    ino_t ino;
    int32_t id;
    unsigned long users;    /* replied opens not released yet */
    /* Registered by a previous daemon of the connection (connection.c keeps the
     * table with the connection): opens of it may still be live, and the
     * kernel insists that a new open of the same inode uses the same
     * registration, so it is kept, whatever its users here, for as long as the
     * connection (its memory is the restored file's, held anyway). */
    int inherited;
};

/* All touched with the GIL held, like all the extension's state. */
static struct passthrough_state {
    /* libfuse's own functions, resolved at import (passthrough_init()). */
    session_mount_fn real_session_mount;
    custom_io_fn real_custom_io;        /* NULL before libfuse 3.12 */
    reply_open_fn real_reply_open;

    /* The hooked session's /dev/fuse descriptor, target of the BACKING
     * ioctls; -1 without our custom io. */
    int dev_fd;
    /* The FUSE_INIT request seen by io_read(), until io_writev() sends its
     * reply (libfuse answers INIT synchronously, before reading anything
     * else). */
    struct {
        uint64_t unique;
        int pending;
        int offered;        /* the kernel offered FUSE_PASSTHROUGH */
    } init_req;
    int enabled;
    /* Why enabled is 0, for the fallback log line. */
    const char *disabled_reason;
    char probe_reason[200];         /* disabled_reason after a failed probe */

    PyObject *open_reqs;    /* {req as int}: FUSE_OPEN requests not answered yet */
    PyObject *registered;   /* {fh: fd} from passthrough_open(), until the reply */
    PyObject *open_files;   /* {fh: backing id} of passthrough files not released */
    struct backing *backings;

    unsigned long long n_passthrough, n_fallback;
    /* errnos of FUSE_DEV_IOC_BACKING_OPEN already logged, and whether the
     * "not enabled" fallback was: one log line each, not one per open. */
    unsigned char errno_logged[4096 / 8];
    int disabled_logged;
} pt = {.dev_fd = -1};

/* Forgets all passthrough state: a new session has a new connection, where
 * the old backing ids mean nothing (the kernel dropped them with the old
 * connection). */
static void passthrough_reset(const char *reason)
{
    struct backing *b;

    while ((b = pt.backings) != NULL) {
        pt.backings = b->next;
        free(b);
    }
    PySet_Clear(pt.open_reqs);
    PyDict_Clear(pt.registered);
    PyDict_Clear(pt.open_files);
    memset(&pt.init_req, 0, sizeof(pt.init_req));
    pt.enabled = 0;
    pt.disabled_reason = reason;
    pt.dev_fd = -1;
}

/* --- INIT: the custom io ------------------------------------------------- */

static ssize_t io_read(int fd, void *buf, size_t len, void *userdata)
{
    ssize_t res = read(fd, buf, len);
    const struct kx_in_header *in = buf;

    (void)userdata;
    connection_note_request(buf, res);
    if (res >= (ssize_t)sizeof(*in) && in->opcode == KX_FUSE_INIT) {
        const struct kx_init_in *arg = (const struct kx_init_in *)(in + 1);

        pt.init_req.unique = in->unique;
        pt.init_req.pending = 1;
        /* flags2 exists only if the kernel says so with FUSE_INIT_EXT. */
        pt.init_req.offered =
            res >= (ssize_t)(sizeof(*in) + sizeof(*arg)) &&
            (arg->flags & KX_FUSE_INIT_EXT) &&
            (arg->flags2 & KX_FUSE_PASSTHROUGH_HI);
    }
    return res;
}

/* Why libfuse's INIT reply cannot be turned into one enabling passthrough,
 * or NULL if it can. */
static const char *init_reply_unpatchable(const struct iovec *iov, int count)
{
    const struct kx_out_header *oh = iov[0].iov_base;
    const struct kx_init_out *out;

    if (!pt.init_req.offered)
        return "the kernel did not offer FUSE_PASSTHROUGH at FUSE_INIT "
               "(it needs Linux >= 6.9 with CONFIG_FUSE_PASSTHROUGH)";
    if (oh->error != 0 || count != 2)
        return "libfuse refused FUSE_INIT";
    /* The reply must be long enough to hold max_stack_depth (libfuse 3.14
     * sends all 64 bytes of its 7.38 struct) and no longer than we copy. */
    if (iov[1].iov_len < offsetof(struct kx_init_out, max_stack_depth) +
                         sizeof(out->max_stack_depth) ||
        iov[1].iov_len > sizeof(*out))
        return "libfuse's FUSE_INIT reply has an unexpected size";
    out = iov[1].iov_base;
    if (out->major != 7 || out->minor < KX_FLAGS_MINOR)
        return "libfuse's FUSE_INIT reply has a protocol without flags";
    if (out->flags & KX_FUSE_WRITEBACK_CACHE)
        return "the writeback cache is enabled, and the kernel allows "
               "passthrough only without it";
    return NULL;
}

/*
 * Whether the kernel now lets us register backing files: it may have ignored
 * FUSE_PASSTHROUGH in the reply (some vendor kernels insist on protocol 7.40),
 * and registering needs CAP_SYS_ADMIN.  A FUSE_DEV_IOC_BACKING_OPEN of fd -1
 * tells without side effects: EBADF if it would be allowed, else EPERM.  The
 * kernel has processed the INIT reply by the time writev() returns.
 */
static int probe_backing_open(int fd)
{
    struct kx_backing_map map = {.fd = -1};

    if (ioctl(fd, KX_FUSE_DEV_IOC_BACKING_OPEN, &map) < 0 && errno == EBADF)
        return 1;
    snprintf(pt.probe_reason, sizeof(pt.probe_reason), "FUSE_INIT was answered "
             "with FUSE_PASSTHROUGH, but FUSE_DEV_IOC_BACKING_OPEN is refused "
             "(%s; it needs CAP_SYS_ADMIN)", strerror(errno));
    pt.disabled_reason = pt.probe_reason;
    return 0;
}

static ssize_t write_init_reply(int fd, struct iovec *iov, int count)
{
    const char *why = init_reply_unpatchable(iov, count);
    struct kx_init_out out;
    struct iovec patched[2];
    ssize_t res;

    if (why != NULL) {
        pt.disabled_reason = why;
        return connection_send_init_reply(fd, iov, count);
    }
    memset(&out, 0, sizeof(out));
    memcpy(&out, iov[1].iov_base, iov[1].iov_len);
    out.flags |= KX_FUSE_INIT_EXT;
    out.flags2 |= KX_FUSE_PASSTHROUGH_HI;
    /* How deep backing files may be stacked: 1 takes backing files from
     * ordinary file systems (a memfd's shmem is one), not from overlayfs or
     * another passthrough mount, and still lets overlayfs stack on this
     * mount.  The kernel ignores FUSE_PASSTHROUGH with 0. */
    out.max_stack_depth = 1;
    patched[0] = iov[0];
    patched[1].iov_base = &out;
    patched[1].iov_len = iov[1].iov_len;
    res = connection_send_init_reply(fd, patched, 2);
    if (res == (ssize_t)(iov[0].iov_len + iov[1].iov_len)) {
        /* An adopted connection keeps what the first daemon's INIT reply
         * set up: the kernel reads no second one. */
        if (!connection_kernel_passthrough())
            pt.disabled_reason = "this connection was set up without "
                                 "FUSE_PASSTHROUGH by the daemon that mounted it";
        else
            pt.enabled = probe_backing_open(fd);
    } else {
        pt.disabled_reason = "sending the FUSE_INIT reply failed";
    }
    return res;
}

static ssize_t io_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    (void)userdata;
    if (pt.init_req.pending && count > 0 &&
        iov[0].iov_len == sizeof(struct kx_out_header) &&
        ((const struct kx_out_header *)iov[0].iov_base)->unique ==
            pt.init_req.unique) {
        pt.init_req.pending = 0;
        return write_init_reply(fd, iov, count);
    }
    return writev(fd, iov, count);
}

/* libfuse offers splice to the file system only if the custom io can do it
 * (and then uses it for pyfuse3's write_buf).  Only sending is offered: a
 * spliced request never passes through io_read(), and connection.c needs to
 * see every request's header (the unique of a request the kernel resends to
 * a restarted daemon).  Requests are read into memory, as by most file
 * systems; kexecfs's writes are small commands, and restored files that are
 * written much go through passthrough, never through the daemon. */
static ssize_t io_splice(int fdin, off_t *offin, int fdout, off_t *offout,
                         size_t len, unsigned int flags, void *userdata)
{
    (void)userdata;
    return splice(fdin, offin, fdout, offout, len, flags);
}

static void install_io(struct fuse_session *se)
{
    static const struct fuse_custom_io io = {
        .writev = io_writev,
        .read = io_read,
        .splice_send = io_splice,
    };
    int fd = fuse_session_fd(se), res;

    if (pt.real_custom_io == NULL) {
        passthrough_reset("this libfuse has no fuse_session_custom_io "
                          "(libfuse < 3.12), needed to enable it");
        return;
    }
    passthrough_reset("FUSE_INIT has not been answered yet");
    res = pt.real_custom_io(se, &io, fd);
    if (res < 0) {
        pt.disabled_reason = "fuse_session_custom_io() failed";
        log_error(0, "fuse_session_custom_io() failed: %s: FUSE passthrough "
                  "will not be available", strerror(-res));
        return;
    }
    pt.dev_fd = fd;
}

INTERPOSE int fuse_session_mount(struct fuse_session *se,
                                 const char *mountpoint)
{
    int res = pt.real_session_mount(se, mountpoint);

    /* Only the session whose open requests our ops table tracks. */
    if (res == 0 && hook_is_live()) {
        PyGILState_STATE gil = PyGILState_Ensure();

        install_io(se);
        if (pt.dev_fd >= 0)
            connection_mounted(se);
        PyGILState_Release(gil);
    }
    return res;
}

/* --- Open and release ---------------------------------------------------- */

/* Removes the entry for key from dict and returns its value (a new
 * reference); NULL if there was none, or with an exception set on error. */
static PyObject *dict_pop(PyObject *dict, unsigned long long key_value)
{
    PyObject *key = PyLong_FromUnsignedLongLong(key_value), *value;

    if (key == NULL)
        return NULL;
    value = PyDict_GetItemWithError(dict, key);
    if (value != NULL) {
        Py_INCREF(value);
        if (PyDict_DelItem(dict, key) < 0)
            Py_CLEAR(value);
    }
    Py_DECREF(key);
    return value;
}

/* fuse_reply_open() also answers FUSE_OPENDIR, whose fh may equal that of a
 * file being opened (kexecfs returns the inode number as a directory's fh), so
 * the reply to a registered fh is made passthrough only if it answers a
 * FUSE_OPEN: those are noted here. */
void passthrough_note_open(fuse_req_t req)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *key = PyLong_FromVoidPtr(req);

    if (key == NULL || PySet_Add(pt.open_reqs, key) < 0)
        log_error(1, "passthrough bookkeeping failed: this open will not be "
                  "passthrough");
    Py_XDECREF(key);
    PyGILState_Release(gil);
}

/* An open answered with an error leaves its request in open_reqs (only
 * fuse_reply_open() removes it), and libfuse may reuse the request's address:
 * an opendir at that address must not pass for a file open. */
void passthrough_forget_req(fuse_req_t req)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *key = PyLong_FromVoidPtr(req);

    if (key == NULL || PySet_Discard(pt.open_reqs, key) < 0)
        log_error(1, "passthrough bookkeeping failed");
    Py_XDECREF(key);
    PyGILState_Release(gil);
}

/* The descriptor registered for the file req opens, consuming the
 * registration; -1 if req is not a FUSE_OPEN or nothing was registered. */
static int take_registration(fuse_req_t req, uint64_t fh)
{
    PyObject *key = PyLong_FromVoidPtr(req), *value;
    int is_open, fd;

    if (key == NULL)
        goto fail;
    is_open = PySet_Discard(pt.open_reqs, key);
    Py_DECREF(key);
    if (is_open < 0)
        goto fail;
    if (is_open == 0)
        return -1;
    value = dict_pop(pt.registered, fh);
    if (value == NULL) {
        if (PyErr_Occurred())
            goto fail;
        return -1;
    }
    fd = PyLong_AsLong(value);  /* passthrough_open() stored an int >= 0 */
    Py_DECREF(value);
    return fd;
fail:
    log_error(1, "passthrough bookkeeping failed: replying to the open of "
              "fh %llu without passthrough", (unsigned long long)fh);
    return -1;
}

/* The backing registration for the file fd refers to, with one more user;
 * NULL with errno set if the kernel refuses it. */
static struct backing *backing_get(int fd)
{
    struct kx_backing_map map = {.fd = fd};
    struct backing *b;
    struct stat st;
    int id;

    if (fstat(fd, &st) < 0)
        return NULL;
    for (b = pt.backings; b != NULL; b = b->next)
        if (b->dev == st.st_dev && b->ino == st.st_ino) {
            b->users++;
            return b;
        }
    b = malloc(sizeof(*b));
    if (b == NULL)
        return NULL;
    id = ioctl(pt.dev_fd, KX_FUSE_DEV_IOC_BACKING_OPEN, &map);
    if (id < 0) {
        int err = errno;

        free(b);
        errno = err;
        return NULL;
    }
    b->dev = st.st_dev;
    b->ino = st.st_ino;
    b->id = id;
    b->users = 1;
    b->inherited = 0;
    b->next = pt.backings;
    pt.backings = b;
    connection_backing_kept((uint64_t)st.st_dev, (uint64_t)st.st_ino, id);
    return b;
}

void passthrough_inherit_backing(uint64_t dev, uint64_t ino, int32_t id)
{
    struct backing *b = malloc(sizeof(*b));

    if (b == NULL) {
        log_error(0, "out of memory: backing id %d of the previous daemon is "
                  "not reused (opens of its file may fail with EIO)", (int)id);
        return;
    }
    b->dev = (dev_t)dev;
    b->ino = (ino_t)ino;
    b->id = id;
    b->users = 0;
    b->inherited = 1;
    b->next = pt.backings;
    pt.backings = b;
}

/* One user less; after the last, the registration is closed. */
static void backing_put(struct backing *b)
{
    struct backing **p;
    uint32_t id = (uint32_t)b->id;

    if (--b->users > 0 || b->inherited)
        return;
    for (p = &pt.backings; *p != b; p = &(*p)->next)
        ;
    *p = b->next;
    free(b);
    connection_backing_closed(id);
    if (ioctl(pt.dev_fd, KX_FUSE_DEV_IOC_BACKING_CLOSE, &id) < 0)
        log_error(0, "FUSE_DEV_IOC_BACKING_CLOSE of backing id %u failed: %s",
                  (unsigned int)id, strerror(errno));
}

void passthrough_release(uint64_t fh)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *value;
    struct backing *b;
    long id;

    if (PyDict_GET_SIZE(pt.open_files) == 0)
        goto out;
    value = dict_pop(pt.open_files, fh);
    if (value == NULL) {
        if (PyErr_Occurred())
            log_error(1, "passthrough bookkeeping failed at release of fh %llu",
                      (unsigned long long)fh);
        goto out;
    }
    id = PyLong_AsLong(value);
    Py_DECREF(value);
    for (b = pt.backings; b != NULL && b->id != id; b = b->next)
        ;
    if (b != NULL)
        backing_put(b);
out:
    PyGILState_Release(gil);
}

/* Serves the open through the daemon instead.  direct_io because a proxy in
 * the FUSE page cache would be a second copy of the backing file's pages,
 * stale as soon as the backing file changes (and slower still). */
static int reply_direct_io(fuse_req_t req, const struct fuse_file_info *fi)
{
    struct fuse_file_info copy = *fi;
    int res;

    copy.direct_io = 1;
    res = pt.real_reply_open(req, &copy);
    if (res == 0)
        pt.n_fallback++;
    return res;
}

/* reply_direct_io(), saying why once: err is the errno of
 * FUSE_DEV_IOC_BACKING_OPEN, or 0 if passthrough is not enabled. */
static int reply_fallback(fuse_req_t req, const struct fuse_file_info *fi,
                          int err)
{
    if (err == 0 && !pt.disabled_logged) {
        pt.disabled_logged = 1;
        log_warning("FUSE passthrough is not enabled on this connection: %s; "
                    "files registered with passthrough_open() are served by "
                    "the daemon with direct_io instead", pt.disabled_reason);
    } else if (err > 0 && err < (int)(8 * sizeof(pt.errno_logged)) &&
               !(pt.errno_logged[err / 8] & (1u << (err % 8)))) {
        pt.errno_logged[err / 8] |= (unsigned char)(1u << (err % 8));
        log_warning("FUSE passthrough of fh %llu refused: "
                    "FUSE_DEV_IOC_BACKING_OPEN: %s; served by the daemon with "
                    "direct_io instead (logged once per errno)",
                    (unsigned long long)fi->fh, strerror(err));
    }
    return reply_direct_io(req, fi);
}

static int reply_passthrough(fuse_req_t req, const struct fuse_file_info *fi,
                             int fd)
{
    /* FOPEN_PASSTHROUGH alone: the kernel fails a passthrough open with
     * FOPEN_KEEP_CACHE (pyfuse3's default) or FOPEN_NONSEEKABLE (the opener
     * gets EIO), and FOPEN_DIRECT_IO would send reads and writes to the
     * daemon again. */
    struct kx_open_out out = {.fh = fi->fh,
                              .open_flags = KX_FOPEN_PASSTHROUGH};
    PyObject *key = NULL, *id = NULL;
    struct backing *b;
    int res;

    if (!pt.enabled)
        return reply_fallback(req, fi, 0);
    b = backing_get(fd);
    if (b == NULL)
        return reply_fallback(req, fi, errno);
    /* Tracked before the reply: a release cannot come earlier, and a
     * bookkeeping failure can still become a fallback. */
    key = PyLong_FromUnsignedLongLong(fi->fh);
    id = PyLong_FromLong(b->id);
    if (key == NULL || id == NULL ||
        PyDict_SetItem(pt.open_files, key, id) < 0) {
        log_error(1, "passthrough bookkeeping failed for fh %llu",
                  (unsigned long long)fi->fh);
        backing_put(b);
        res = reply_direct_io(req, fi);
        goto out;
    }
    out.backing_id = b->id;
    res = fuse_reply_buf(req, (const char *)&out, sizeof(out));
    if (res == 0) {
        pt.n_passthrough++;
    } else {
        /* Not delivered (the opener was interrupted): no release will come. */
        if (PyDict_DelItem(pt.open_files, key) < 0)
            log_error(1, "passthrough bookkeeping failed");
        backing_put(b);
    }
out:
    Py_XDECREF(key);
    Py_XDECREF(id);
    return res;
}

INTERPOSE int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int fd = take_registration(req, fi->fh);
    int res = fd < 0 ? pt.real_reply_open(req, fi)
                     : reply_passthrough(req, fi, fd);

    PyGILState_Release(gil);
    return res;
}

/* ------------------------------------------------------------------------ */
/* Import and Python API                                                    */
/* ------------------------------------------------------------------------ */

int passthrough_init(void)
{
    /* RTLD_NEXT and the pinned versions: see hook_init(). */
    pt.real_session_mount = (session_mount_fn)dlvsym(
        RTLD_NEXT, "fuse_session_mount", "FUSE_3.0");
    pt.real_reply_open = (reply_open_fn)dlvsym(
        RTLD_NEXT, "fuse_reply_open", "FUSE_3.0");
    if (pt.real_session_mount == NULL || pt.real_reply_open == NULL) {
        PyErr_Format(PyExc_ImportError, "kexecfs._fusehook: libfuse's "
                     "fuse_session_mount or fuse_reply_open@FUSE_3.0 not "
                     "found: %s", dlerror());
        return -1;
    }
    /* libfuse >= 3.12 only (without it, no passthrough).  @FUSE_3.0 is the
     * ABI of the struct fuse_custom_io we pass (3.17 grew it). */
    pt.real_custom_io = (custom_io_fn)dlvsym(
        RTLD_NEXT, "fuse_session_custom_io", "FUSE_3.0");

    pt.open_reqs = PySet_New(NULL);
    pt.registered = PyDict_New();
    pt.open_files = PyDict_New();
    if (pt.open_reqs == NULL || pt.registered == NULL || pt.open_files == NULL)
        return -1;
    pt.disabled_reason = "no FUSE session has been mounted yet";
    return 0;
}

int passthrough_dev_fd(void)
{
    return pt.dev_fd;
}

void passthrough_expect_init(uint64_t unique, int offered)
{
    pt.init_req.unique = unique;
    pt.init_req.pending = 1;
    pt.init_req.offered = offered;
}

PyObject *fh_passthrough_available(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(pt.enabled);
}

PyObject *fh_passthrough_open(PyObject *self, PyObject *args)
{
    PyObject *fh, *value;
    int fd, res;

    (void)self;
    if (!PyArg_ParseTuple(args, "O!i:passthrough_open", &PyLong_Type, &fh, &fd))
        return NULL;
    /* fh is a uint64_t in the reply: refuse what would not compare equal. */
    if (PyLong_AsUnsignedLongLong(fh) == (unsigned long long)-1 &&
        PyErr_Occurred())
        return NULL;
    if (fd < 0) {
        PyErr_Format(PyExc_ValueError, "fd must be >= 0, not %d", fd);
        return NULL;
    }
    value = PyLong_FromLong(fd);
    if (value == NULL)
        return NULL;
    res = PyDict_SetItem(pt.registered, fh, value);
    Py_DECREF(value);
    if (res < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyObject *fh_passthrough_stats(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("(KK)", pt.n_passthrough, pt.n_fallback);
}
