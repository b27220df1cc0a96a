/* SPDX-License-Identifier: GPL-2.0-or-later OR MIT */
/*
 * kexecfs.h — the LUO PATCH v1 (June 2025) ioctl ABI as served by kexecfs "control"
 * files, plus small inline helpers. Header-only; include it and use any C compiler.
 *
 * The numbers and struct are byte for byte those of /dev/liveupdate, so existing
 * live-update code works on a kexecfs control file: open("<mount>/<instance>/control")
 * instead of open("/dev/liveupdate"). The one difference: a FUSE server cannot
 * install a descriptor in its caller, so LIVEUPDATE_IOCTL_FD_RESTORE fails with
 * EOPNOTSUPP; kexecfs_restore() below opens "<instance>/fds/<token>" instead.
 */
#ifndef KEXECFS_H
#define KEXECFS_H

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/types.h>
#include <sys/xattr.h>
#include <unistd.h>

#define LIVEUPDATE_IOCTL_TYPE 0xBA

/* The one argument structure: 16 bytes, no padding. */
struct liveupdate_fd {
	int32_t fd;	/* @0 in: the caller's descriptor (FD_PRESERVE); out: restored fd */
	uint32_t flags; /* @4 reserved, must be 0 */
	uint64_t token; /* @8 the caller's name for the file, unique per instance */
};

/* States reported by LIVEUPDATE_IOCTL_GET_STATE (a u32). */
enum liveupdate_state {
	LIVEUPDATE_STATE_UNDEFINED = 0,
	LIVEUPDATE_STATE_NORMAL = 1,
	LIVEUPDATE_STATE_PREPARED = 2,
	LIVEUPDATE_STATE_FROZEN = 3,
	LIVEUPDATE_STATE_UPDATED = 4,
};

/*                                                            number      errors */
#define LIVEUPDATE_IOCTL_FD_PRESERVE   _IOW(0xBA, 0, struct liveupdate_fd) /* 0x4010ba00 EBADF EBUSY ENOENT EEXIST */
#define LIVEUPDATE_IOCTL_FD_UNPRESERVE _IOW(0xBA, 1, uint64_t)		/* 0x4008ba01 EBUSY ENOENT */
#define LIVEUPDATE_IOCTL_FD_RESTORE    _IOWR(0xBA, 2, struct liveupdate_fd) /* 0xc010ba02 EBUSY ENOENT EOPNOTSUPP */
#define LIVEUPDATE_IOCTL_GET_STATE     _IOR(0xBA, 3, uint32_t)		/* 0x8004ba03 */
#define LIVEUPDATE_IOCTL_PREPARE       _IO(0xBA, 4)			/* 0x0000ba04 EINVAL EPERM */
#define LIVEUPDATE_IOCTL_FREEZE	       _IO(0xBA, 5)			/* 0x0000ba05 EINVAL EPERM */
#define LIVEUPDATE_IOCTL_CANCEL	       _IO(0xBA, 6)			/* 0x0000ba06 ENOENT EPERM */
#define LIVEUPDATE_IOCTL_FINISH	       _IO(0xBA, 7)			/* 0x0000ba07 EINVAL EPERM */

_Static_assert(sizeof(struct liveupdate_fd) == 16, "struct liveupdate_fd is 16 bytes");

/* Each helper returns 0 (or a descriptor/state) on success, -1 with errno on failure. */

static inline int kexecfs_preserve(int control_fd, int fd, uint64_t token)
{
	struct liveupdate_fd arg = { .fd = fd, .flags = 0, .token = token };
	return ioctl(control_fd, LIVEUPDATE_IOCTL_FD_PRESERVE, &arg);
}

static inline int kexecfs_unpreserve(int control_fd, uint64_t token)
{
	return ioctl(control_fd, LIVEUPDATE_IOCTL_FD_UNPRESERVE, &token);
}

static inline int kexecfs_get_state(int control_fd)
{
	uint32_t state = LIVEUPDATE_STATE_UNDEFINED;
	if (ioctl(control_fd, LIVEUPDATE_IOCTL_GET_STATE, &state) < 0)
		return -1;
	return (int)state;
}

/*
 * After a kexec: a descriptor of preserved file `token` of the instance whose
 * directory is open as `instance_dir_fd`, at the file position it was preserved with.
 * (What FD_RESTORE does on /dev/liveupdate.)
 */
static inline int kexecfs_restore(int instance_dir_fd, uint64_t token, int flags)
{
	char name[48], pos[32];
	ssize_t n;
	int fd;

	snprintf(name, sizeof(name), "fds/%llu", (unsigned long long)token);
	fd = openat(instance_dir_fd, name, flags | O_CLOEXEC);
	if (fd < 0)
		return -1;
	n = fgetxattr(fd, "user.kexecfs.pos", pos, sizeof(pos) - 1);
	if (n > 0) {
		pos[n] = '\0';
		if (lseek(fd, (off_t)strtoll(pos, NULL, 10), SEEK_SET) < 0) {
			int saved = errno;
			close(fd);
			errno = saved;
			return -1;
		}
	}
	return fd;
}

#endif /* KEXECFS_H */
