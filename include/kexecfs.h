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
#include <string.h>
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


/*
 * The merged LUO API (Linux 6.19 sessions), beside v1: the same definitions as the
 * kernel's <linux/liveupdate.h> (skipped if it was included first). On kexecfs the
 * top-level control is /dev/liveupdate and an instance's control is a session fd.
 * CREATE_SESSION, RETRIEVE_SESSION and SESSION_RETRIEVE_FD return descriptors: run the
 * program under "kexecfs run", or use kexecfs_create_session() and friends below.
 */
#ifndef _LIVEUPDATE_H
#define LIVEUPDATE_SESSION_NAME_LENGTH 64

struct liveupdate_ioctl_create_session {
	uint32_t size;	/* in: sizeof the struct */
	int32_t fd;	/* out: the session fd */
	uint8_t name[LIVEUPDATE_SESSION_NAME_LENGTH];	/* in: NUL-terminated, 1-63 bytes */
};
#define liveupdate_ioctl_retrieve_session liveupdate_ioctl_create_session

struct liveupdate_session_preserve_fd {
	uint32_t size;
	int32_t fd;	/* in (PRESERVE_FD) or out (RETRIEVE_FD) */
	uint64_t token __attribute__((aligned(8)));
};
#define liveupdate_session_retrieve_fd liveupdate_session_preserve_fd

struct liveupdate_session_finish {
	uint32_t size;
	uint32_t reserved;	/* must be 0 */
};

struct liveupdate_session_get_name {
	uint32_t size;
	uint32_t reserved;	/* must be 0 */
	uint8_t name[LIVEUPDATE_SESSION_NAME_LENGTH];	/* out */
};

#define LIVEUPDATE_IOCTL_CREATE_SESSION   _IO(0xBA, 0x00)	/* EEXIST; EINVAL empty or unterminated name */
#define LIVEUPDATE_IOCTL_RETRIEVE_SESSION _IO(0xBA, 0x01)	/* ENOENT unknown; EINVAL retrieved already */
#define LIVEUPDATE_SESSION_PRESERVE_FD    _IO(0xBA, 0x40)	/* EEXIST EBADF ENOENT EBUSY */
#define LIVEUPDATE_SESSION_RETRIEVE_FD    _IO(0xBA, 0x41)	/* ENOENT; a new O_CLOEXEC fd, offset 0 */
#define LIVEUPDATE_SESSION_FINISH         _IO(0xBA, 0x42)	/* EBUSY EINVAL */
#define LIVEUPDATE_SESSION_GET_NAME       _IO(0xBA, 0x43)
#endif

_Static_assert(sizeof(struct liveupdate_ioctl_create_session) == 72, "create_session is 72 bytes");
_Static_assert(sizeof(struct liveupdate_session_preserve_fd) == 16, "preserve_fd is 16 bytes");

/* kexecfs run's own numbers (see kexecfs/abi.py): the same structs; the daemon does the
 * work and the caller opens the session's control (or fds/<token>) itself. */
#define KEXECFS_RUN_CREATE_SESSION   _IO(0xBA, 0x80)
#define KEXECFS_RUN_RETRIEVE_SESSION _IO(0xBA, 0x81)
#define KEXECFS_RUN_RETRIEVE_FD      _IO(0xBA, 0x82)

/*
 * A session fd without kexecfs run: CREATE_SESSION (retrieve = 0) or RETRIEVE_SESSION
 * (retrieve = 1) of `name` through the top-level control `dev_fd` of the mount at
 * `mount`. Names outside [A-Za-z0-9._-] appear escaped in the tree (%XX); this helper
 * takes those names only (-1, EINVAL otherwise): kexecfs.client takes every name.
 */
static inline int kexecfs_open_session(int dev_fd, const char *mount, const char *name, int retrieve)
{
	struct liveupdate_ioctl_create_session arg = { .size = sizeof(arg) };
	char path[4096];
	size_t i, n = strlen(name);

	if (n == 0 || n >= sizeof(arg.name) || name[0] == '.') {
		errno = EINVAL;
		return -1;
	}
	for (i = 0; i < n; i++)
		if (!((name[i] >= 'a' && name[i] <= 'z') || (name[i] >= 'A' && name[i] <= 'Z') ||
		      (name[i] >= '0' && name[i] <= '9') || strchr("._-", name[i]))) {
			errno = EINVAL;
			return -1;
		}
	memcpy(arg.name, name, n);
	if (ioctl(dev_fd, retrieve ? KEXECFS_RUN_RETRIEVE_SESSION : KEXECFS_RUN_CREATE_SESSION, &arg) < 0)
		return -1;
	snprintf(path, sizeof(path), "%s/%s/control", mount, name);
	return open(path, O_RDWR | O_CLOEXEC);
}

/* SESSION_RETRIEVE_FD without kexecfs run: the restored file `token` of the session whose
 * instance directory is `instance_dir`, opened with `flags` (at most the preserved access). */
static inline int kexecfs_session_retrieve_fd(int session_fd, const char *instance_dir, uint64_t token, int flags)
{
	struct liveupdate_session_preserve_fd arg = { .size = sizeof(arg), .fd = -1, .token = token };
	char path[4096];

	if (ioctl(session_fd, KEXECFS_RUN_RETRIEVE_FD, &arg) < 0)
		return -1;
	snprintf(path, sizeof(path), "%s/fds/%llu", instance_dir, (unsigned long long)token);
	return open(path, flags | O_CLOEXEC);
}

#endif /* KEXECFS_H */
