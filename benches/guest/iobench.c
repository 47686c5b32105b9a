/* Disk I/O figures for benches/src/bin/disk.rs, run the same way in the guest and on the
 * host: `iobench PATH MIB MODE [SECONDS]`.
 *
 *   seqwrite  writes MIB MiB in 1 MiB blocks from offset 0, then fdatasync: MB/s
 *   seqread   reads MIB MiB in 1 MiB blocks: MB/s
 *   randread  4 KiB reads at random aligned offsets in the first MIB MiB for SECONDS: IOPS
 *   randwrite 4 KiB writes likewise, fdatasync at the end: IOPS
 *
 * O_DIRECT when the file allows it (so the page cache is not what is measured), else
 * buffered after posix_fadvise(DONTNEED). Prints one line: "MODE VALUE UNIT direct|cached".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static unsigned long long rng = 88172645463325252ULL;
static unsigned long long next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: iobench PATH MIB seqwrite|seqread|randread|randwrite [SECONDS]\n");
        return 2;
    }
    const char *path = argv[1];
    long long mib = atoll(argv[2]);
    const char *mode = argv[3];
    double secs = argc > 4 ? atof(argv[4]) : 5.0;
    long long base = argc > 5 ? atoll(argv[5]) << 20 : 0;
    int writes = strstr(mode, "write") != NULL;
    int flags = (writes ? O_RDWR | O_CREAT : O_RDONLY);
    int direct = 1;
    int fd = open(path, flags | O_DIRECT, 0644);
    if (fd < 0 && (errno == EINVAL || errno == EOPNOTSUPP)) {
        direct = 0;
        fd = open(path, flags, 0644);
    }
    if (fd < 0) {
        perror("open");
        return 1;
    }
    void *buf;
    if (posix_memalign(&buf, 4096, 1 << 20)) {
        perror("posix_memalign");
        return 1;
    }
    memset(buf, 0x5a, 1 << 20);
    if (!direct)
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    long long total = mib << 20;
    if (!strcmp(mode, "seqwrite") || !strcmp(mode, "seqread")) {
        double t = now();
        for (long long off = 0; off < total; off += 1 << 20) {
            ssize_t n = writes ? pwrite(fd, buf, 1 << 20, base + off)
                               : pread(fd, buf, 1 << 20, base + off);
            if (n != 1 << 20) {
                fprintf(stderr, "%s at %lld: %zd (%s)\n", mode, off, n, strerror(errno));
                return 1;
            }
        }
        if (writes && fdatasync(fd)) {
            perror("fdatasync");
            return 1;
        }
        double dt = now() - t;
        printf("%s %.1f MB/s %s\n", mode, total / 1e6 / dt, direct ? "direct" : "cached");
        return 0;
    }
    if (!strcmp(mode, "randread") || !strcmp(mode, "randwrite")) {
        long long blocks = total / 4096, ops = 0;
        double t = now(), end = t + secs;
        while (now() < end) {
            for (int i = 0; i < 64; i++) {
                long long off = base + (long long)(next() % blocks) * 4096;
                ssize_t n = writes ? pwrite(fd, buf, 4096, off) : pread(fd, buf, 4096, off);
                if (n != 4096) {
                    fprintf(stderr, "%s at %lld: %zd (%s)\n", mode, off, n, strerror(errno));
                    return 1;
                }
                ops++;
            }
        }
        if (writes && fdatasync(fd)) {
            perror("fdatasync");
            return 1;
        }
        double dt = now() - t;
        printf("%s %.0f IOPS %s\n", mode, ops / dt, direct ? "direct" : "cached");
        return 0;
    }
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
}
