/*
 * The merged LUO API (Linux 6.19 sessions, SPEC section 6b) exercised from C on a real
 * kexecfs mount, in this project's own words: every errno row, the extensible-struct
 * rules and the session lifetime. Prints TAP and exits with the number of failures.
 *
 *   luo_sessions direct MOUNT    the rows that need no descriptor back, straight on the
 *                                control files (no kexecfs run): struct rules, stray numbers,
 *                                PRESERVE_FD, GET_NAME, FINISH, exclusivity, EOPNOTSUPP
 *   luo_sessions before MOUNT    under kexecfs run: CREATE_SESSION rows, preserve, then a
 *                                child keeps the sessions open (as a service would) and the
 *                                parent exits; the operator then prepares and kexecs
 *   luo_sessions after MOUNT     under kexecfs run, after the kexec: RETRIEVE_SESSION and
 *                                RETRIEVE_FD rows, v1 FD_RESTORE, FINISH, close-finishes
 */
#define _GNU_SOURCE
#include "../../include/kexecfs.h"

#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>

static int failures, count;
static const char *mnt;

static void check(const char *what, int ok, const char *detail)
{
	count++;
	printf("%sok %d - %s%s%s\n", ok ? "" : "not ", count, what, detail ? ": " : "", detail ? detail : "");
	failures += !ok;
}

/* ret is an ioctl's return: -1 with errno, or >= 0 */
static void expect(const char *what, int ret, int want_errno)
{
	char detail[128];
	int ok = want_errno ? (ret == -1 && errno == want_errno) : ret >= 0;

	snprintf(detail, sizeof(detail), "%s%s%s", ret >= 0 ? "success" : strerror(errno),
		 ok ? "" : ", wanted ", ok ? "" : (want_errno ? strerror(want_errno) : "success"));
	check(what, ok, detail);
}

static int at_mount(const char *rel, int flags)
{
	char path[4096];

	snprintf(path, sizeof(path), "%s/%s", mnt, rel);
	return open(path, flags | O_CLOEXEC);
}

static int memfd_with(const char *text)
{
	int fd = memfd_create("luo_sessions", MFD_CLOEXEC);

	if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
		return -1;
	return fd;
}

static int create(int dev, const char *name)
{
	struct liveupdate_ioctl_create_session arg = { .size = sizeof(arg) };

	strncpy((char *)arg.name, name, sizeof(arg.name) - 1);
	return ioctl(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &arg) < 0 ? -1 : arg.fd;
}

static int retrieve(int dev, const char *name)
{
	struct liveupdate_ioctl_retrieve_session arg = { .size = sizeof(arg) };

	strncpy((char *)arg.name, name, sizeof(arg.name) - 1);
	return ioctl(dev, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, &arg) < 0 ? -1 : arg.fd;
}

static int preserve(int session, int fd, uint64_t token)
{
	struct liveupdate_session_preserve_fd arg = { .size = sizeof(arg), .fd = fd, .token = token };

	return ioctl(session, LIVEUPDATE_SESSION_PRESERVE_FD, &arg);
}

static int retrieve_fd(int session, uint64_t token)
{
	struct liveupdate_session_retrieve_fd arg = { .size = sizeof(arg), .fd = -1, .token = token };

	return ioctl(session, LIVEUPDATE_SESSION_RETRIEVE_FD, &arg) < 0 ? -1 : arg.fd;
}

static int finish(int session)
{
	struct liveupdate_session_finish arg = { .size = sizeof(arg) };

	return ioctl(session, LIVEUPDATE_SESSION_FINISH, &arg);
}

static void direct(void)
{
	struct { struct liveupdate_session_get_name arg; uint8_t tail[16]; } big = {
		.arg = { .size = sizeof(big) } };
	struct liveupdate_session_get_name name = { .size = sizeof(name) };
	struct liveupdate_ioctl_create_session cs = { .size = sizeof(cs), .name = "direct" };
	char path[4096];
	int dev, dev2, session, m, pipefd[2], null = open("/dev/null", O_RDWR);

	dev = at_mount("control", O_RDWR);
	expect("open the top-level control (/dev/liveupdate)", dev, 0);
	dev2 = at_mount("control", O_RDWR);
	expect("a second open of it is EBUSY: /dev/liveupdate is exclusive", dev2, EBUSY);
	expect("CREATE_SESSION without kexecfs run: EOPNOTSUPP", ioctl(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &cs),
	       EOPNOTSUPP);
	cs.size = 8;
	expect("a struct smaller than the kernel's: EINVAL", ioctl(dev, KEXECFS_RUN_CREATE_SESSION, &cs), EINVAL);
	expect("a bad pointer: EFAULT", ioctl(dev, KEXECFS_RUN_CREATE_SESSION, (void *)8), EFAULT);
	expect("a session command on /dev/liveupdate: EINVAL", ioctl(dev, LIVEUPDATE_SESSION_FINISH, &cs), EINVAL);
	expect("a 0xBA number outside the table: EINVAL", ioctl(dev, _IO(0xBA, 0x30), &cs), EINVAL);
	expect("CREATE_SESSION's number with size bits: ENOTTY", ioctl(dev, _IOW(0xBA, 0, cs), &cs), ENOTTY);
	close(dev);
	dev = at_mount("control", O_RDWR);
	expect("after close, /dev/liveupdate opens again at once", dev, 0);
	close(dev);

	/* An instance's control is a session fd too (mkdir made the instance). */
	snprintf(path, sizeof(path), "%s/direct", mnt);
	mkdir(path, 0755);
	session = at_mount("direct/control", O_RDWR);
	m = memfd_with("direct");
	expect("SESSION_PRESERVE_FD of a memfd", preserve(session, m, 7), 0);
	expect("the same token again: EEXIST", preserve(session, memfd_with("x"), 7), EEXIST);
	expect("the same open file again: EBUSY", preserve(session, m, 8), EBUSY);
	expect("a descriptor that is not open: EBADF", preserve(session, 999, 9), EBADF);
	expect("/dev/null: ENOENT", preserve(session, null, 10), ENOENT);
	if (pipe(pipefd) == 0)
		expect("a pipe: ENOENT", preserve(session, pipefd[0], 11), ENOENT);
	expect("SESSION_GET_NAME", ioctl(session, LIVEUPDATE_SESSION_GET_NAME, &name), 0);
	check("the name is the instance's", strcmp((char *)name.name, "direct") == 0, (char *)name.name);
	big.tail[3] = 1;
	expect("a larger struct with a non-zero tail: E2BIG", ioctl(session, LIVEUPDATE_SESSION_GET_NAME, &big), E2BIG);
	big.tail[3] = 0;
	expect("a larger struct with a zero tail", ioctl(session, LIVEUPDATE_SESSION_GET_NAME, &big), 0);
	check("and answers the name", strcmp((char *)big.arg.name, "direct") == 0, (char *)big.arg.name);
	expect("SESSION_RETRIEVE_FD before a kexec: EBUSY", retrieve_fd(session, 7), EBUSY);
	expect("SESSION_FINISH before a kexec: EINVAL", finish(session), EINVAL);
	expect("CREATE_SESSION on a session fd: EINVAL", ioctl(session, LIVEUPDATE_IOCTL_CREATE_SESSION, &cs), EINVAL);
	close(session);
}

static void hold_and_exit(int *fds, int n)
{
	pid_t pid = fork();

	if (pid == 0) {  /* the service keeps its sessions open until the kexec kills it */
		for (;;)
			pause();
	}
	printf("# sessions held by pid %d\n", (int)pid);
	for (int i = 0; i < n; i++)
		close(fds[i]);
}

static void before(void)
{
	static const char odd[] = "odd name/with spaces";
	char nonul[LIVEUPDATE_SESSION_NAME_LENGTH];
	struct liveupdate_ioctl_create_session cs = { .size = sizeof(cs) };
	struct liveupdate_session_get_name name = { .size = sizeof(name) };
	int dev = open("/dev/liveupdate", O_RDWR | O_CLOEXEC), a, b, gone, status, keep[2];
	pid_t child;

	expect("open /dev/liveupdate (kexecfs run's bind of the top-level control)", dev, 0);
	a = create(dev, "kx-a");
	expect("CREATE_SESSION kx-a", a, 0);
	check("the session fd is O_CLOEXEC", a >= 0 && (fcntl(a, F_GETFD) & FD_CLOEXEC), NULL);
	expect("CREATE_SESSION kx-a again: EEXIST", create(dev, "kx-a"), EEXIST);
	expect("CREATE_SESSION with an empty name: EINVAL", create(dev, ""), EINVAL);
	memset(nonul, 'n', sizeof(nonul));
	memcpy(cs.name, nonul, sizeof(cs.name));
	expect("CREATE_SESSION with no NUL in 64 bytes: EINVAL", ioctl(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &cs), EINVAL);
	b = create(dev, odd);
	expect("CREATE_SESSION with spaces and '/' in its name", b, 0);
	expect("SESSION_GET_NAME of it", ioctl(b, LIVEUPDATE_SESSION_GET_NAME, &name), 0);
	check("the name comes back whole", strcmp((char *)name.name, odd) == 0, (char *)name.name);
	expect("preserve into kx-a", preserve(a, memfd_with("contents of kx-a token 1"), 1), 0);
	expect("preserve into the odd one", preserve(b, memfd_with("contents of the odd one"), 0x1A), 0);

	gone = create(dev, "kx-gone");
	expect("preserve into kx-gone", preserve(gone, memfd_with("lost"), 1), 0);
	close(gone);  /* closing a created session unpreserves its files and ends it */
	expect("kx-gone can be created again: closing it ended it", gone = create(dev, "kx-gone"), 0);
	close(gone);

	child = fork();
	if (child == 0) {  /* the children of a program under kexecfs run are served too */
		int c = create(dev, "kx-child");

		_exit(c >= 0 && preserve(c, memfd_with("from a child"), 2) == 0 ? (hold_and_exit(&c, 1), 0) : 1);
	}
	waitpid(child, &status, 0);
	check("a forked child creates and preserves its own session", WIFEXITED(status) && !WEXITSTATUS(status), NULL);
	close(dev);
	keep[0] = a;
	keep[1] = b;
	hold_and_exit(keep, 2);
}

static void after(void)
{
	char buf[64] = { 0 };
	struct liveupdate_fd v1 = { .fd = -1, .token = 2 };
	int dev = open("/dev/liveupdate", O_RDWR | O_CLOEXEC), a, b, c, f1, f2;
	void *map;

	expect("RETRIEVE_SESSION of a name never created: ENOENT", retrieve(dev, "kx-none"), ENOENT);
	expect("RETRIEVE_SESSION of a session closed before the kexec: ENOENT", retrieve(dev, "kx-gone"), ENOENT);
	a = retrieve(dev, "kx-a");
	expect("RETRIEVE_SESSION kx-a", a, 0);
	expect("RETRIEVE_SESSION kx-a a second time: EINVAL", retrieve(dev, "kx-a"), EINVAL);
	expect("RETRIEVE_FD of an unknown token: ENOENT", retrieve_fd(a, 99), ENOENT);
	f1 = retrieve_fd(a, 1);
	f2 = retrieve_fd(a, 1);
	expect("RETRIEVE_FD token 1", f1, 0);
	check("each RETRIEVE_FD is a new descriptor, O_CLOEXEC", f1 >= 0 && f2 >= 0 && f1 != f2 &&
	      (fcntl(f2, F_GETFD) & FD_CLOEXEC), NULL);
	check("at offset 0, with the preserved contents", f1 >= 0 && lseek(f1, 0, SEEK_CUR) == 0 &&
	      read(f1, buf, sizeof(buf) - 1) > 0 && strcmp(buf, "contents of kx-a token 1") == 0, buf);
	map = f2 >= 0 ? mmap(NULL, 4096, PROT_READ, MAP_SHARED, f2, 0) : MAP_FAILED;
	check("and a shared mapping of it reads the same", map != MAP_FAILED && !strcmp(map, "contents of kx-a token 1"),
	      NULL);
	expect("SESSION_FINISH of kx-a", finish(a), 0);
	close(a);

	b = retrieve(dev, "odd name/with spaces");
	expect("RETRIEVE_SESSION of the odd name", b, 0);
	close(b);  /* closing a retrieved session finishes it */

	c = retrieve(dev, "kx-child");
	expect("RETRIEVE_SESSION of the child's session", c, 0);
	expect("v1 FD_RESTORE on it, under kexecfs run", ioctl(c, LIVEUPDATE_IOCTL_FD_RESTORE, &v1), 0);
	memset(buf, 0, sizeof(buf));
	check("puts the restored descriptor in the struct", v1.fd >= 0 && pread(v1.fd, buf, sizeof(buf) - 1, 0) > 0 &&
	      strcmp(buf, "from a child") == 0, buf);
	expect("SESSION_FINISH of the child's session", finish(c), 0);
	close(c);
	close(dev);
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: luo_sessions direct|before|after MOUNT\n");
		return 2;
	}
	mnt = argv[2];
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(argv[1], "direct"))
		direct();
	else if (!strcmp(argv[1], "before"))
		before();
	else
		after();
	printf("1..%d\n", count);
	return failures;
}
