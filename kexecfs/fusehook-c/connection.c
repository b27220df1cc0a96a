/*
 * The FUSE connection across daemon restarts.
 *
 * The /dev/fuse descriptor outlives the daemon (a keeper process or
 * systemd's fd store holds a copy), so a restarted daemon can serve the very
 * connection the kernel still has: every mount and bind mount of it keeps
 * working.  Two things stand in the way, and this file removes both:
 *
 *  1. The kernel sends FUSE_INIT once per connection, and libfuse answers
 *     every request before INIT with EIO (fuse_session_process_buf_int() in
 *     libfuse 3.14 checks se->got_init).  So the first daemon records the
 *     INIT exchange (the request as read, the reply as sent) in a memfd that
 *     is kept with the connection (record_init_exchange()), and a restarted
 *     one replays it: libfuse is handed the recorded request
 *     (fuse_session_process_buf() with a memory buffer), sets up its
 *     session from it exactly as the first time, and its reply is dropped
 *     (connection_send_init_reply()): the kernel reads no second one and
 *     keeps what the first reply negotiated.  A reply that differs from the
 *     recorded one (a new libfuse, other options) is logged.
 *
 *  2. Requests the dead daemon had read but not answered sit in the kernel's
 *     processing queue, and their callers wait.  Linux >= 6.9 (FUSE_HAS_RESEND
 *     in INIT) moves them back to the pending queue on FUSE_NOTIFY_RESEND,
 *     with FUSE_UNIQUE_RESEND (1 << 63) set in their unique: the restarted
 *     daemon sends it right after the replay, and answers them like any
 *     request.  last_request() gives the daemon each request's unique, so it
 *     can recognise one whose effect was already made durable.
 *
 *  3. poll(): the kernel wakes a process sleeping in poll() on a kexecfs file
 *     when the daemon sends FUSE_NOTIFY_POLL with the file's kernel handle
 *     (kh); a restarted daemon does not know them.  The khs of the last polls
 *     that asked to be notified are kept in the memfd too (POLLERS_AT), and a
 *     restarted daemon wakes them all once: they poll again, now on it.
 *  4. FUSE passthrough: a backing registration lives in the connection, and the
 *     kernel fails (EIO) an open of an inode whose other open uses another
 *     registration.  The table of registrations (file identity, backing id)
 *     is kept in the same memfd, from BACKINGS_AT on, and a restarted daemon
 *     reuses them (passthrough_inherit_backing()).
 *
 * The adoption itself is libfuse's: fuse_session_mount() on "/dev/fd/N"
 * takes descriptor N as the session's connection without mounting anything
 * (and fuse_session_unmount() then leaves the mount alone).
 */

#include "fusehook.h"
#include "fuseproto.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define RECORD_MAGIC "KXINIT1"
/* The record memfd: the INIT record at 0, kexecfs.fs.restart's handle numbers at
 * 2048, the backing table from here (one slot per registration, 0-terminated). */
#define BACKINGS_AT 4096
#define BACKINGS_MAX 65536
#define POLLERS_AT 2560
#define POLLERS_MAX 64
#define RECORD_IN_MAX 512
#define RECORD_OUT_MAX 256

/* What record_init_exchange() keeps at offset 0 of its memfd, and
 * adopt_connection() takes back.  Written with one pwrite() once the reply
 * has reached the kernel: a daemon killed at any point leaves either no
 * record or a complete one. */
struct init_record {
    char magic[8];
    uint32_t in_len, out_len;
    unsigned char in[RECORD_IN_MAX];
    unsigned char out[RECORD_OUT_MAX];
};

enum resend_result { RESEND_NONE, RESEND_SENT, RESEND_UNSUPPORTED, RESEND_FAILED };

struct backing_slot {
    uint64_t dev, ino;
    int32_t id;
    uint32_t live;
};

/* All touched with the GIL held, like all the extension's state. */
static struct connection_state {
    int record_fd;                  /* record_init_exchange()'s memfd, or -1 */
    struct init_record init;        /* the exchange being recorded or replayed */
    int adopting;                   /* the next mount is an adopted connection */
    int adopted;
    int replaying;                  /* libfuse is answering the replayed INIT */
    int reply_matches;              /* the replayed INIT got the recorded reply */
    int kernel_passthrough;         /* the kernel's INIT reply enabled it */
    enum resend_result resend;
    int resend_errno;
    struct {
        uint64_t unique, nodeid;
        uint32_t opcode;
        int valid;
    } last;
    struct backing_slot *slots;     /* the backing table, as written */
    size_t n_slots, cap_slots;
    uint64_t pollers[POLLERS_MAX];  /* the khs kept at POLLERS_AT */
    unsigned next_poller;
} conn = {.record_fd = -1, .kernel_passthrough = 1};

/* ------------------------------------------------------------------------ */
/* The first daemon: recording the INIT exchange                            */
/* ------------------------------------------------------------------------ */

/* A poll that asked to be woken: its kh goes into the ring a restarted daemon wakes. */
static void note_poller(const struct kx_poll_in *arg)
{
    unsigned i = conn.next_poller % POLLERS_MAX;

    if (!(arg->flags & KX_FUSE_POLL_SCHEDULE_NOTIFY) || conn.record_fd < 0)
        return;
    for (unsigned j = 0; j < POLLERS_MAX; j++)
        if (conn.pollers[j] == arg->kh)
            return;
    conn.pollers[i] = arg->kh;
    conn.next_poller++;
    if (pwrite(conn.record_fd, &arg->kh, sizeof(arg->kh), POLLERS_AT + (off_t)(i * sizeof(arg->kh))) < 0)
        log_error(0, "keeping a poller with the connection failed: %s", strerror(errno));
}

void connection_note_request(const void *buf, ssize_t res)
{
    const struct kx_in_header *in = buf;

    if (res < (ssize_t)sizeof(*in))
        return;
    conn.last.unique = in->unique;
    conn.last.nodeid = in->nodeid;
    conn.last.opcode = in->opcode;
    conn.last.valid = 1;
    if (in->opcode == KX_FUSE_POLL && res >= (ssize_t)(sizeof(*in) + sizeof(struct kx_poll_in)))
        note_poller((const struct kx_poll_in *)(in + 1));
    if (in->opcode == KX_FUSE_INIT && !conn.replaying) {
        size_t n = (size_t)res < RECORD_IN_MAX ? (size_t)res : RECORD_IN_MAX;

        memcpy(conn.init.in, buf, n);
        conn.init.in_len = (uint32_t)n;
    }
}

static size_t gather(unsigned char *dst, size_t max, const struct iovec *iov,
                     int count)
{
    size_t n = 0;

    for (int i = 0; i < count; i++) {
        size_t take = iov[i].iov_len < max - n ? iov[i].iov_len : max - n;

        memcpy(dst + n, iov[i].iov_base, take);
        n += take;
    }
    return n;
}

static void save_record(const struct iovec *iov, int count)
{
    if (conn.record_fd < 0 || conn.init.in_len == 0)
        return;
    memcpy(conn.init.magic, RECORD_MAGIC, sizeof(conn.init.magic));
    conn.init.out_len = (uint32_t)gather(conn.init.out, RECORD_OUT_MAX, iov, count);
    if (pwrite(conn.record_fd, &conn.init, sizeof(conn.init), 0) !=
        (ssize_t)sizeof(conn.init))
        log_error(0, "recording the FUSE_INIT exchange failed (%s): a restarted "
                  "daemon will not be able to adopt this connection",
                  strerror(errno));
}

/* ------------------------------------------------------------------------ */
/* A restarted daemon: replaying it                                         */
/* ------------------------------------------------------------------------ */

static ssize_t drop_replayed_reply(const struct iovec *iov, int count)
{
    unsigned char now[RECORD_OUT_MAX];
    size_t n = gather(now, sizeof(now), iov, count), total = 0;
    const struct kx_out_header *oh = iov[0].iov_base;

    for (int i = 0; i < count; i++)
        total += iov[i].iov_len;
    if (oh->error != 0)
        log_error(0, "libfuse refused the replayed FUSE_INIT (%s): this daemon "
                  "cannot serve the adopted connection", strerror(-oh->error));
    /* The header's len and unique are the same by construction; the rest
     * is what libfuse and the kernel agreed on. */
    conn.reply_matches = n == conn.init.out_len &&
                         memcmp(now, conn.init.out, n) == 0;
    if (!conn.reply_matches && oh->error == 0)
        log_warning("this daemon's libfuse answers FUSE_INIT differently from "
                    "the daemon that mounted the connection (another libfuse "
                    "version or other options?); the kernel keeps what it "
                    "agreed on first");
    return (ssize_t)total;
}

ssize_t connection_send_init_reply(int fd, const struct iovec *iov, int count)
{
    ssize_t res;

    if (conn.replaying)
        return drop_replayed_reply(iov, count);
    res = writev(fd, iov, count);
    if (res >= 0)
        save_record(iov, count);
    return res;
}

int connection_kernel_passthrough(void)
{
    return conn.kernel_passthrough;
}

static const struct kx_init_in *recorded_init_in(void)
{
    if (conn.init.in_len < sizeof(struct kx_in_header) + sizeof(struct kx_init_in))
        return NULL;
    return (const struct kx_init_in *)(conn.init.in + sizeof(struct kx_in_header));
}

static int recorded_reply_has_passthrough(void)
{
    const struct kx_init_out *out =
        (const struct kx_init_out *)(conn.init.out + sizeof(struct kx_out_header));

    if (conn.init.out_len < sizeof(struct kx_out_header) +
                            offsetof(struct kx_init_out, max_stack_depth))
        return 0;
    return (out->flags & KX_FUSE_INIT_EXT) && (out->flags2 & KX_FUSE_PASSTHROUGH_HI);
}

static void replay_init(struct fuse_session *se)
{
    const struct kx_in_header *in = (const struct kx_in_header *)conn.init.in;
    const struct kx_init_in *arg = recorded_init_in();
    struct fuse_buf buf = {.size = conn.init.in_len};

    buf.mem = malloc(conn.init.in_len);
    if (buf.mem == NULL) {
        log_error(0, "out of memory replaying FUSE_INIT");
        return;
    }
    memcpy(buf.mem, conn.init.in, conn.init.in_len);
    conn.kernel_passthrough = recorded_reply_has_passthrough();
    passthrough_expect_init(in->unique, arg != NULL && (arg->flags & KX_FUSE_INIT_EXT) &&
                                        (arg->flags2 & KX_FUSE_PASSTHROUGH_HI));
    conn.replaying = 1;
    fuse_session_process_buf(se, &buf);
    conn.replaying = 0;
    free(buf.mem);
}

/* Asks the kernel to send again the requests the dead daemon had read and
 * not answered.  Without a recorded INIT (the daemon died before answering
 * it) the INIT itself may be one of them: try anyway. */
static void resend_pending(int fd)
{
    const struct kx_init_in *arg = recorded_init_in();
    struct kx_out_header notify = {.len = sizeof(notify),
                                   .error = KX_FUSE_NOTIFY_RESEND};

    if (arg != NULL && !((arg->flags & KX_FUSE_INIT_EXT) &&
                         (arg->flags2 & KX_FUSE_HAS_RESEND_HI))) {
        conn.resend = RESEND_UNSUPPORTED;
        log_warning("this kernel cannot resend the requests the previous "
                    "daemon had read (FUSE_NOTIFY_RESEND needs Linux >= 6.9): "
                    "their callers wait until they are killed");
        return;
    }
    if (write(fd, &notify, sizeof(notify)) == (ssize_t)sizeof(notify)) {
        conn.resend = RESEND_SENT;
        return;
    }
    conn.resend = RESEND_FAILED;
    conn.resend_errno = errno;
    log_error(0, "FUSE_NOTIFY_RESEND failed (%s): requests the previous daemon "
              "had read stay unanswered", strerror(errno));
}

/* ------------------------------------------------------------------------ */
/* Backing registrations, kept with the connection                          */
/* ------------------------------------------------------------------------ */

static void write_slot(size_t i)
{
    if (conn.record_fd >= 0 &&
        pwrite(conn.record_fd, &conn.slots[i], sizeof(conn.slots[i]),
               BACKINGS_AT + (off_t)(i * sizeof(conn.slots[i]))) != (ssize_t)sizeof(conn.slots[i]))
        log_error(0, "keeping backing id %d with the connection failed (%s): after a "
                  "restart, opens of its file may fail with EIO", (int)conn.slots[i].id, strerror(errno));
}

/* A new slot at the end of the table; BACKINGS_MAX if there is no room. */
static size_t append_slot(void)
{
    if (conn.n_slots == BACKINGS_MAX)
        return BACKINGS_MAX;
    if (conn.n_slots == conn.cap_slots) {
        size_t cap = conn.cap_slots ? 2 * conn.cap_slots : 64;
        struct backing_slot *more = realloc(conn.slots, cap * sizeof(*more));

        if (more == NULL)
            return BACKINGS_MAX;
        conn.slots = more;
        conn.cap_slots = cap;
    }
    return conn.n_slots++;
}

void connection_backing_kept(uint64_t dev, uint64_t ino, int32_t id)
{
    size_t i;

    for (i = 0; i < conn.n_slots && conn.slots[i].live; i++)
        ;
    if (i == conn.n_slots && (i = append_slot()) == BACKINGS_MAX) {
        log_error(0, "the table of backing ids is full: after a restart, opens of the file of "
                  "backing id %d may fail with EIO", (int)id);
        return;
    }
    conn.slots[i] = (struct backing_slot){.dev = dev, .ino = ino, .id = id, .live = 1};
    write_slot(i);
}

void connection_backing_closed(int32_t id)
{
    for (size_t i = 0; i < conn.n_slots; i++)
        if (conn.slots[i].live && conn.slots[i].id == id) {
            conn.slots[i].live = 0;
            write_slot(i);
            return;
        }
}

/* The previous daemons' registrations, reused by this one. */
static void inherit_backings(void)
{
    struct backing_slot slot;
    size_t i;

    if (conn.record_fd < 0)
        return;
    for (i = 0; i < BACKINGS_MAX; i++) {
        if (pread(conn.record_fd, &slot, sizeof(slot), BACKINGS_AT + (off_t)(i * sizeof(slot))) !=
                (ssize_t)sizeof(slot) || (slot.dev == 0 && slot.ino == 0 && slot.id == 0))
            break;
        /* The table stays as it is (the next daemon needs it too); free slots are reused. */
        if (append_slot() == BACKINGS_MAX)
            break;
        conn.slots[i] = slot;
        if (slot.live)
            passthrough_inherit_backing(slot.dev, slot.ino, slot.id);
    }
}

/* Wakes every process that was sleeping in poll() on the previous daemon's files. */
static void wake_pollers(int fd)
{
    struct {
        struct kx_out_header h;
        uint64_t kh;
    } notify = {.h = {.len = sizeof(notify), .error = KX_FUSE_NOTIFY_POLL}};

    memset(conn.pollers, 0, sizeof(conn.pollers));
    /* Short where the last pollers' slots were never written: those stay 0. */
    if (conn.record_fd < 0 || pread(conn.record_fd, conn.pollers, sizeof(conn.pollers), POLLERS_AT) < 0)
        return;
    for (unsigned i = 0; i < POLLERS_MAX; i++) {
        if (conn.pollers[i] == 0)
            continue;
        conn.next_poller = i + 1;
        notify.kh = conn.pollers[i];
        /* A kh whose file is closed is not found by the kernel, and nothing happens. */
        if (write(fd, &notify, sizeof(notify)) < 0 && errno != ENOENT)
            log_error(0, "waking a poller of the previous daemon failed: %s", strerror(errno));
    }
}

void connection_mounted(struct fuse_session *se)
{
    if (!conn.adopting)
        return;
    conn.adopting = 0;
    conn.adopted = 1;
    if (conn.init.in_len > 0)
        replay_init(se);
    inherit_backings();
    resend_pending(passthrough_dev_fd());
    wake_pollers(passthrough_dev_fd());
}

/* ------------------------------------------------------------------------ */
/* Python API                                                               */
/* ------------------------------------------------------------------------ */

PyObject *fh_record_init_exchange(PyObject *self, PyObject *arg)
{
    int fd = PyLong_AsLong(arg);

    (void)self;
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    conn.record_fd = fd;
    Py_RETURN_NONE;
}

PyObject *fh_adopt_connection(PyObject *self, PyObject *arg)
{
    Py_buffer record;
    const struct init_record *r;

    (void)self;
    if (PyObject_GetBuffer(arg, &record, PyBUF_SIMPLE) < 0)
        return NULL;
    memset(&conn.init, 0, sizeof(conn.init));
    r = record.buf;
    if (record.len == 0 || (record.len >= (Py_ssize_t)sizeof(*r) &&
                            memcmp(r->magic, "\0\0\0\0\0\0\0", 8) == 0)) {
        /* No INIT was answered on this connection yet. */
    } else if (record.len < (Py_ssize_t)sizeof(*r) ||
               memcmp(r->magic, RECORD_MAGIC, sizeof(r->magic)) != 0 ||
               r->in_len < sizeof(struct kx_in_header) ||
               r->in_len > RECORD_IN_MAX || r->out_len < sizeof(struct kx_out_header) ||
               r->out_len > RECORD_OUT_MAX) {
        PyBuffer_Release(&record);
        PyErr_SetString(PyExc_ValueError, "not a FUSE_INIT record of this kexecfs");
        return NULL;
    } else {
        conn.init = *r;
    }
    PyBuffer_Release(&record);
    conn.adopting = 1;
    Py_RETURN_NONE;
}

PyObject *fh_session_fd(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromLong(passthrough_dev_fd());
}

PyObject *fh_last_request(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    if (!conn.last.valid) {
        PyErr_SetString(PyExc_RuntimeError, "no FUSE request has been read yet");
        return NULL;
    }
    return Py_BuildValue("(KIK)", (unsigned long long)conn.last.unique,
                         (unsigned int)conn.last.opcode,
                         (unsigned long long)conn.last.nodeid);
}

PyObject *fh_connection_status(PyObject *self, PyObject *unused)
{
    static const char *resend[] = {"none", "sent", "unsupported", "failed"};

    (void)self;
    (void)unused;
    return Py_BuildValue("{s:O,s:O,s:s,s:i}", "adopted", conn.adopted ? Py_True : Py_False,
                         "init_reply_matches", conn.reply_matches ? Py_True : Py_False,
                         "resend", resend[conn.resend], "resend_errno", conn.resend_errno);
}
