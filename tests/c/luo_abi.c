/*
 * Every row of the LUO ioctl table (SPEC section 6), exercised from C on a real
 * kexecfs mount with include/kexecfs.h. Prints TAP ("ok N - ..." / "not ok N - ...")
 * and exits with the number of failures.
 *
 * usage: luo_abi MOUNT   (as root; MOUNT freshly mounted, in state normal)
 */
#define _GNU_SOURCE
#include "../../include/kexecfs.h"

#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <termios.h>

static int failures, count;
static const char *mnt;

static void expect(const char *what, int ret, int want_errno)
{
	int ok = want_errno ? (ret == -1 && errno == want_errno) : ret >= 0;
	count++;
	printf("%sok %d - %s: %s", ok ? "" : "not ", count, what, ret >= 0 ? "success" : strerror(errno));
	if (!ok)
		printf(" (wanted %s)", want_errno ? strerror(want_errno) : "success");
	printf("\n");
	failures += !ok;
}

static void expect_state(const char *what, int control, int want)
{
	int state = kexecfs_get_state(control);
	count++;
	printf("%sok %d - %s: state %d (wanted %d)\n", state == want ? "" : "not ", count, what, state, want);
	failures += state != want;
}

static int open_at_mount(const char *rel, int flags)
{
	char path[4096];
	snprintf(path, sizeof(path), "%s/%s", mnt, rel);
	return open(path, flags | O_CLOEXEC);
}

static int global_event(const char *word)
{
	int fd = open_at_mount("state", O_WRONLY);
	ssize_t n = fd < 0 ? -1 : write(fd, word, strlen(word));
	int saved = errno;
	if (fd >= 0)
		close(fd);
	errno = saved;
	return n < 0 ? -1 : 0;
}

int main(int argc, char **argv)
{
	static const char data[] = "preserved from C through the LUO ABI";
	struct liveupdate_fd arg;
	char path[4096], buf[64];
	int control, top, dir, memfd, pipefd[2], restored;
	struct termios tio;

	if (argc != 2) {
		fprintf(stderr, "usage: %s MOUNT\n", argv[0]);
		return 127;
	}
	mnt = argv[1];
	snprintf(path, sizeof(path), "%s/c", mnt);
	if (mkdir(path, 0755) < 0) {
		perror("mkdir instance");
		return 127;
	}
	control = open_at_mount("c/control", O_RDONLY);
	top = open_at_mount("control", O_RDONLY);
	memfd = memfd_create("from-c", 0);
	if (control < 0 || top < 0 || memfd < 0 || pipe(pipefd) < 0 ||
	    write(memfd, data, sizeof(data)) != sizeof(data)) {
		perror("setup");
		return 127;
	}
	lseek(memfd, 5, SEEK_SET);

	printf("TAP version 13\n");
	expect_state("GET_STATE in normal", control, LIVEUPDATE_STATE_NORMAL);
	expect("FD_PRESERVE memfd token 1", kexecfs_preserve(control, memfd, 1), 0);
	expect("FD_PRESERVE token 1 again", kexecfs_preserve(control, memfd, 1), EEXIST);
	expect("FD_PRESERVE fd -1", kexecfs_preserve(control, -1, 2), EBADF);
	expect("FD_PRESERVE fd not open", kexecfs_preserve(control, 999, 2), EBADF);
	expect("FD_PRESERVE a pipe", kexecfs_preserve(control, pipefd[0], 2), ENOENT);
	arg = (struct liveupdate_fd){ .fd = memfd, .flags = 1, .token = 3 };
	expect("FD_PRESERVE flags != 0", ioctl(control, LIVEUPDATE_IOCTL_FD_PRESERVE, &arg), EINVAL);
	expect("FD_PRESERVE memfd token 2^64-1", kexecfs_preserve(control, memfd, UINT64_MAX), 0);
	expect("FD_UNPRESERVE token 2^64-1", kexecfs_unpreserve(control, UINT64_MAX), 0);
	expect("FD_UNPRESERVE unknown token", kexecfs_unpreserve(control, 12345), ENOENT);
	arg = (struct liveupdate_fd){ .fd = -1, .token = 1 };
	expect("FD_RESTORE before a kexec", ioctl(control, LIVEUPDATE_IOCTL_FD_RESTORE, &arg), EBUSY);
	expect("CANCEL in normal", ioctl(control, LIVEUPDATE_IOCTL_CANCEL), ENOENT);
	expect("FREEZE in normal", ioctl(control, LIVEUPDATE_IOCTL_FREEZE), EINVAL);
	expect("FINISH in normal", ioctl(control, LIVEUPDATE_IOCTL_FINISH), EINVAL);
	expect("unknown command", ioctl(control, _IOR(0xBA, 42, uint32_t), &arg), ENOTTY);
	expect("TCGETS (isatty)", ioctl(control, TCGETS, &tio), ENOTTY);
	expect("LUO ioctl on a non-control file", ioctl(open_at_mount("c/state", O_RDONLY), LIVEUPDATE_IOCTL_PREPARE),
	       ENOTTY);

	expect("PREPARE", ioctl(control, LIVEUPDATE_IOCTL_PREPARE), 0);
	expect_state("GET_STATE after PREPARE", control, LIVEUPDATE_STATE_PREPARED);
	expect("PREPARE in prepared", ioctl(control, LIVEUPDATE_IOCTL_PREPARE), EINVAL);
	expect("FD_PRESERVE in prepared", kexecfs_preserve(control, memfd, 4), EBUSY);
	expect("FD_UNPRESERVE in prepared", kexecfs_unpreserve(control, 1), EBUSY);
	expect("FREEZE", ioctl(control, LIVEUPDATE_IOCTL_FREEZE), 0);
	expect_state("GET_STATE after FREEZE", control, LIVEUPDATE_STATE_FROZEN);
	expect("FINISH in frozen", ioctl(control, LIVEUPDATE_IOCTL_FINISH), EINVAL);
	expect("CANCEL in frozen", ioctl(control, LIVEUPDATE_IOCTL_CANCEL), 0);
	expect_state("GET_STATE after CANCEL", control, LIVEUPDATE_STATE_NORMAL);

	expect("PREPARE again", ioctl(top, LIVEUPDATE_IOCTL_PREPARE), 0);
	expect("simulated kexec (echo kexec > state)", global_event("kexec"), 0);
	/* The instance survived the kexec, so its open control file still works. */
	expect_state("GET_STATE after kexec", control, LIVEUPDATE_STATE_UPDATED);
	arg = (struct liveupdate_fd){ .fd = -1, .token = 1 };
	expect("FD_RESTORE known token", ioctl(control, LIVEUPDATE_IOCTL_FD_RESTORE, &arg), EOPNOTSUPP);
	arg.token = 99;
	expect("FD_RESTORE unknown token", ioctl(control, LIVEUPDATE_IOCTL_FD_RESTORE, &arg), ENOENT);
	dir = open_at_mount("c", O_RDONLY | O_DIRECTORY);
	restored = kexecfs_restore(dir, 1, O_RDONLY);
	expect("kexecfs_restore token 1", restored, 0);
	memset(buf, 0, sizeof(buf));
	count++;
	if (restored >= 0 && lseek(restored, 0, SEEK_CUR) == 5 && pread(restored, buf, sizeof(data), 0) == sizeof(data) &&
	    memcmp(buf, data, sizeof(data)) == 0) {
		printf("ok %d - restored contents and position are the preserved ones\n", count);
	} else {
		printf("not ok %d - restored contents or position differ\n", count);
		failures++;
	}
	expect("FINISH", ioctl(top, LIVEUPDATE_IOCTL_FINISH), 0);
	expect_state("GET_STATE after FINISH", control, LIVEUPDATE_STATE_NORMAL);
	expect("FINISH in normal", ioctl(top, LIVEUPDATE_IOCTL_FINISH), EINVAL);

	expect("top-level FD_PRESERVE (instance \"default\")", kexecfs_preserve(top, memfd, 77), 0);
	snprintf(path, sizeof(path), "%s/default/fds/77", mnt);
	expect("default/fds/77 exists", access(path, F_OK), 0);
	printf("1..%d\n", count);
	return failures;
}
