/*
 * The pieces of the FUSE kernel protocol the extension speaks itself
 * (passthrough.c, connection.c).  Private to this folder.
 */

#ifndef KEXECFS_FUSEPROTO_H
#define KEXECFS_FUSEPROTO_H

#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>

/* The FUSE protocol 7.40 pieces needed.  libfuse does not install its
 * fuse_kernel.h, and <linux/fuse.h> here (Linux 6.1) is protocol 7.38. */
#define KX_FUSE_INIT             26          /* opcode */
#define KX_FUSE_WRITEBACK_CACHE  (1u << 16)  /* init flags */
#define KX_FUSE_INIT_EXT         (1u << 30)  /* init flags: flags2 is valid */
#define KX_FUSE_PASSTHROUGH_HI   (1u << 5)   /* flags2: FUSE_PASSTHROUGH, 1 << 37 */
#define KX_FOPEN_PASSTHROUGH     (1u << 7)
/* flags2 of FUSE_INIT: the kernel resends requests on FUSE_NOTIFY_RESEND
 * (FUSE_HAS_RESEND, 1 << 39; Linux >= 6.9). */
#define KX_FUSE_HAS_RESEND_HI    (1u << 7)
#define KX_FUSE_NOTIFY_RESEND    7           /* notify code */
#define KX_FUSE_NOTIFY_POLL      1           /* notify code */
#define KX_FUSE_POLL             40          /* opcode */
#define KX_FUSE_POLL_SCHEDULE_NOTIFY (1u << 0)

/* The start of struct fuse_poll_in. */
struct kx_poll_in {
    uint64_t fh, kh;
    uint32_t flags, events;
};
/* The kernel reads an INIT reply's flags only from protocol 7.6 on, and then
 * flags2 whenever FUSE_INIT_EXT is set, and max_stack_depth whenever
 * FUSE_PASSTHROUGH is: it does not ask for 7.40.  That matters, because
 * Debian's libfuse 3.14.0 claims 7.31 (while sending the 64-byte 7.36+ struct
 * and FUSE_INIT_EXT). */
#define KX_FLAGS_MINOR           6

struct kx_in_header {
    uint32_t len;
    uint32_t opcode;
    uint64_t unique;
    uint64_t nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen;
    uint16_t padding;
};

/* The start of struct fuse_init_in: all we read. */
struct kx_init_in {
    uint32_t major, minor, max_readahead, flags, flags2;
};

struct kx_out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};

struct kx_init_out {
    uint32_t major, minor, max_readahead, flags;
    uint16_t max_background, congestion_threshold;
    uint32_t max_write, time_gran;
    uint16_t max_pages, map_alignment;
    uint32_t flags2;
    uint32_t max_stack_depth;   /* 7.40; unused (zero) before */
    uint32_t unused[6];
};

struct kx_open_out {
    uint64_t fh;
    uint32_t open_flags;
    int32_t backing_id;         /* 7.40; padding before */
};

struct kx_backing_map {
    int32_t fd;
    uint32_t flags;
    uint64_t padding;
};

_Static_assert(sizeof(struct kx_in_header) == 40, "fuse_in_header");
_Static_assert(sizeof(struct kx_out_header) == 16, "fuse_out_header");
_Static_assert(sizeof(struct kx_init_out) == 64, "fuse_init_out");
_Static_assert(offsetof(struct kx_init_out, max_stack_depth) == 36,
               "fuse_init_out.max_stack_depth");
_Static_assert(sizeof(struct kx_open_out) == 16, "fuse_open_out");
_Static_assert(sizeof(struct kx_backing_map) == 16, "fuse_backing_map");

#endif /* KEXECFS_FUSEPROTO_H */
