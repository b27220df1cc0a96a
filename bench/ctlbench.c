/* ctlbench: latency of one kexecfs control-plane operation, repeated.
 *
 *   ctlbench N -- OP ARGS...
 *
 * The target (kexecfs, the floor filesystem, tmpfs) is the path in ARGS. The bench runs
 * one short burst per target in turn (bench/controlplane.py says why bursts). Operations:
 *
 *   cat PATH             open(O_RDONLY) + read() until EOF + close(), as cat(1) does
 *   stat PATH            stat()
 *   preserve DIR TOKEN   with one memfd: write "FD TOKEN" to DIR/fd_preserve, then "TOKEN"
 *                        to DIR/fd_unpreserve (both files opened once); two columns
 *   ioctl_state PATH     ioctl(LIVEUPDATE_IOCTL_GET_STATE) on a file opened once
 *   ioctl_preserve PATH TOKEN   FD_PRESERVE then FD_UNPRESERVE of one memfd; two columns
 *   fionread PATH        ioctl(FIONREAD) on a file opened once (a cheap ioctl for tmpfs)
 *
 * After WARMUP untimed iterations, prints one line per iteration: the latency in
 * nanoseconds (two numbers for the two-step operations).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kexecfs.h" /* the ioctl numbers and struct liveupdate_fd (built with -I include) */

#define WARMUP 50

struct target {
    const char *op;
    char **arg;
    int nargs;
    int fd, fd2, memfd;
    char text[128], text2[64];
};

static long long now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what, const char *arg)
{
    fprintf(stderr, "ctlbench: %s %s: %s\n", what, arg ? arg : "", strerror(errno));
    exit(1);
}

static int xopen(const char *path, int flags)
{
    int fd = open(path, flags | O_CLOEXEC);
    if (fd < 0)
        die("open", path);
    return fd;
}

static void xwrite(int fd, const char *text, const char *what)
{
    if (pwrite(fd, text, strlen(text), 0) != (ssize_t)strlen(text))
        die("write", what);
}

static int new_memfd(void)
{
    int fd = memfd_create("ctlbench", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, 4096) < 0)
        die("memfd", NULL);
    return fd;
}

/* Opens what the operation keeps open. */
static void setup(struct target *t)
{
    char path[4096];
    t->fd = t->fd2 = t->memfd = -1;
    if (t->nargs < 1)
        goto usage;
    if (!strcmp(t->op, "cat") || !strcmp(t->op, "stat"))
        return;
    if (!strcmp(t->op, "ioctl_state") || !strcmp(t->op, "fionread")) {
        t->fd = xopen(t->arg[0], O_RDONLY);
        return;
    }
    if (t->nargs < 2)
        goto usage;
    if (!strcmp(t->op, "preserve")) {
        snprintf(path, sizeof path, "%s/fd_preserve", t->arg[0]);
        t->fd = xopen(path, O_WRONLY);
        snprintf(path, sizeof path, "%s/fd_unpreserve", t->arg[0]);
        t->fd2 = xopen(path, O_WRONLY);
        t->memfd = new_memfd();
        snprintf(t->text, sizeof t->text, "%d %s\n", t->memfd, t->arg[1]);
        snprintf(t->text2, sizeof t->text2, "%s\n", t->arg[1]);
        return;
    }
    if (!strcmp(t->op, "ioctl_preserve")) {
        t->fd = xopen(t->arg[0], O_RDONLY);
        t->memfd = new_memfd();
        return;
    }
usage:
    fprintf(stderr, "ctlbench: bad operation %s (or missing arguments)\n", t->op);
    exit(2);
}

/* Runs the operation once; returns the first step's latency, *second the second's. */
static long long run(struct target *t, long long *second)
{
    char buf[4096];
    long long t0 = now(), t1;
    *second = -1;
    if (!strcmp(t->op, "cat")) {
        int fd = xopen(t->arg[0], O_RDONLY);
        ssize_t r;
        while ((r = read(fd, buf, sizeof buf)) > 0)
            ;
        if (r < 0)
            die("read", t->arg[0]);
        close(fd);
    } else if (!strcmp(t->op, "stat")) {
        struct stat st;
        if (stat(t->arg[0], &st) < 0)
            die("stat", t->arg[0]);
    } else if (!strcmp(t->op, "preserve")) {
        xwrite(t->fd, t->text, "fd_preserve");
        t1 = now();
        xwrite(t->fd2, t->text2, "fd_unpreserve");
        *second = now() - t1;
        return t1 - t0;
    } else if (!strcmp(t->op, "ioctl_state")) {
        uint32_t state = 0;
        if (ioctl(t->fd, LIVEUPDATE_IOCTL_GET_STATE, &state) < 0)
            die("ioctl GET_STATE", t->arg[0]);
        if (state != LIVEUPDATE_STATE_NORMAL) {
            fprintf(stderr, "ctlbench: GET_STATE answered %u, not 1 (normal)\n", state);
            exit(1);
        }
    } else if (!strcmp(t->op, "ioctl_preserve")) {
        struct liveupdate_fd arg = { t->memfd, 0, strtoull(t->arg[1], NULL, 10) };
        if (ioctl(t->fd, LIVEUPDATE_IOCTL_FD_PRESERVE, &arg) < 0)
            die("ioctl FD_PRESERVE", t->arg[0]);
        t1 = now();
        if (ioctl(t->fd, LIVEUPDATE_IOCTL_FD_UNPRESERVE, &arg.token) < 0)
            die("ioctl FD_UNPRESERVE", t->arg[0]);
        *second = now() - t1;
        return t1 - t0;
    } else if (!strcmp(t->op, "fionread")) {
        int avail;
        if (ioctl(t->fd, FIONREAD, &avail) < 0)
            die("ioctl FIONREAD", t->arg[0]);
    }
    return now() - t0;
}

int main(int argc, char **argv)
{
    static char out[1 << 20];
    if (argc < 4 || strcmp(argv[2], "--")) {
        fprintf(stderr, "usage: ctlbench N -- OP ARGS...\n");
        return 2;
    }
    long n = atol(argv[1]);
    struct target t = { .op = argv[3], .arg = &argv[4], .nargs = argc - 4 };
    setup(&t);
    setvbuf(stdout, out, _IOFBF, sizeof out);
    for (long i = -WARMUP; i < n; i++) {
        long long second, first = run(&t, &second);
        if (i < 0)
            continue;
        if (second >= 0)
            printf("%lld %lld\n", first, second);
        else
            printf("%lld\n", first);
    }
    return 0;
}
