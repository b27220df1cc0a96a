/* iobench: the plain-program baselines for kexecfs's data path.
 *
 *   iobench pack DST < LIST     LIST holds one source path per line (memfds, via
 *                               /proc/PID/fd/N, or files). Writes their bytes one after
 *                               the other into DST with write(2) in 1 MiB slices from a
 *                               mapping of each source (one copy, like dd), then fsyncs
 *                               DST and its directory (dd conv=fsync).
 *                               Prints "WRITE_S FSYNC_S BYTES".
 *   iobench unpack SRC < LIST   LIST holds one size per line: reads SRC (mapped) back,
 *                               piece by piece, into one new memfd per size with write(2),
 *                               keeping them open until the end (what recovery does, minus
 *                               checksums) as far as RLIMIT_NOFILE allows: past it each new
 *                               one closes the oldest (kexecfs hands its restored files to
 *                               its keepers the same way). Prints "SECONDS BYTES".
 *   iobench read PATH           read(2) PATH to EOF with a 1 MiB buffer. Prints "SECONDS BYTES".
 *   iobench refresh DST < LIST  The floor of a freeze after prepare: LIST holds one line per
 *                               source, "PATH CHUNKS", CHUNKS being the comma-separated
 *                               indexes of its 1 MiB chunks that changed (or "-"). Reads every
 *                               source once with read(2), pwrites the changed chunks into DST
 *                               (an earlier pack of the same sources) where pack put them,
 *                               then fsyncs DST. Prints "SECONDS FSYNC_S READ_BYTES WRITTEN".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define SLICE (1 << 20)

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what, const char *arg)
{
    fprintf(stderr, "iobench: %s %s: %s\n", what, arg ? arg : "", strerror(errno));
    exit(1);
}

static void write_all(int fd, const char *p, long long size)
{
    for (long long off = 0; off < size;) {
        size_t n = size - off < SLICE ? size - off : SLICE;
        ssize_t w = write(fd, p + off, n);
        if (w <= 0)
            die("write", NULL);
        off += w;
    }
}

int main(int argc, char **argv)
{
    static char line[4096];
    if (argc == 3 && !strcmp(argv[1], "pack")) {
        long long bytes = 0;
        double t0 = now();
        int fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0)
            die("open", argv[2]);
        while (scanf("%4095s", line) == 1) {
            int sfd = open(line, O_RDONLY | O_CLOEXEC);
            struct stat st;
            if (sfd < 0 || fstat(sfd, &st) < 0)
                die("open", line);
            if (st.st_size > 0) {
                char *map = mmap(NULL, st.st_size, PROT_READ, MAP_SHARED, sfd, 0);
                if (map == MAP_FAILED)
                    die("mmap", line);
                write_all(fd, map, st.st_size);
                munmap(map, st.st_size);
            }
            close(sfd);
            bytes += st.st_size;
        }
        double t1 = now();
        if (fsync(fd) < 0)
            die("fsync", argv[2]);
        close(fd);
        int dfd = open(dirname(argv[2]), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0 || fsync(dfd) < 0)
            die("fsync directory of", argv[2]);
        close(dfd);
        printf("%.6f %.6f %lld\n", t1 - t0, now() - t1, bytes);
    } else if (argc == 3 && !strcmp(argv[1], "unpack")) {
        double t0 = now();
        int sfd = open(argv[2], O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (sfd < 0 || fstat(sfd, &st) < 0)
            die("open", argv[2]);
        char *map = st.st_size ? mmap(NULL, st.st_size, PROT_READ, MAP_SHARED, sfd, 0) : NULL;
        if (map == MAP_FAILED)
            die("mmap", argv[2]);
        long long off = 0, size;
        struct rlimit rl;
        getrlimit(RLIMIT_NOFILE, &rl);
        long ring_size = rl.rlim_cur > 128 ? (long)rl.rlim_cur - 64 : 64, held = 0;
        int *ring = calloc(ring_size, sizeof *ring);
        if (!ring)
            die("calloc", NULL);
        while (scanf("%lld", &size) == 1) {
            if (off + size > st.st_size) {
                fprintf(stderr, "iobench: %s is shorter than the sizes listed\n", argv[2]);
                return 1;
            }
            int fd = memfd_create("iobench", MFD_CLOEXEC);
            if (fd < 0 || ftruncate(fd, size) < 0)
                die("memfd", NULL);
            write_all(fd, map + off, size);
            off += size; /* the memfd stays open, as recovered ones do */
            if (held >= ring_size)
                close(ring[held % ring_size]);
            ring[held++ % ring_size] = fd;
        }
        printf("%.6f %lld\n", now() - t0, off);
    } else if (argc == 3 && !strcmp(argv[1], "read")) {
        static char buf[SLICE];
        int fd = open(argv[2], O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            die("open", argv[2]);
        long long bytes = 0;
        ssize_t r;
        double t0 = now();
        while ((r = read(fd, buf, sizeof buf)) > 0)
            bytes += r;
        if (r < 0)
            die("read", argv[2]);
        printf("%.6f %lld\n", now() - t0, bytes);
    } else if (argc == 3 && !strcmp(argv[1], "refresh")) {
        static char buf[SLICE], chunks[1 << 20];
        int fd = open(argv[2], O_WRONLY | O_CLOEXEC);
        if (fd < 0)
            die("open", argv[2]);
        long long base = 0, bytes = 0, written = 0;
        double t0 = now();
        while (scanf("%4095s %1048575s", line, chunks) == 2) {
            int sfd = open(line, O_RDONLY | O_CLOEXEC);
            if (sfd < 0)
                die("open", line);
            char *next = chunks; /* the changed chunk indexes, ascending */
            long long want = *next == '-' ? -1 : strtoll(next, &next, 10);
            ssize_t r;
            for (long long k = 0; (r = read(sfd, buf, sizeof buf)) > 0; k++, base += r, bytes += r) {
                if (k != want)
                    continue;
                if (pwrite(fd, buf, r, base) != r)
                    die("pwrite", argv[2]);
                written += r;
                want = *next == ',' ? strtoll(next + 1, &next, 10) : -1;
            }
            if (r < 0)
                die("read", line);
            close(sfd);
        }
        double t1 = now();
        if (fsync(fd) < 0)
            die("fsync", argv[2]);
        close(fd);
        printf("%.6f %.6f %lld %lld\n", now() - t0, now() - t1, bytes, written);
    } else {
        fprintf(stderr, "usage: iobench pack DST | unpack SRC | read PATH | refresh DST\n");
        return 2;
    }
    return 0;
}
