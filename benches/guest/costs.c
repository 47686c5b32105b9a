/* What the basic operations of a process cost inside the guest, printed one per line.
 * Built static by the guest_costs benchmark (benches/src/bin/guest_costs.rs) and run in a
 * VM from a volume. The command to spawn is argv[1] (a one-page static binary). */
#define _GNU_SOURCE
#include <pthread.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void *nothing(void *a) { return a; }

int main(int argc, char **argv) {
    const char *tiny = argc > 1 ? argv[1] : "/bin/true";
    double t = now_ms();
    for (int i = 0; i < 20; i++) getppid();
    printf("syscall (getppid): %.3f ms\n", (now_ms() - t) / 20);

    t = now_ms();
    for (int i = 0; i < 10; i++) {
        pthread_t th;
        pthread_create(&th, 0, nothing, 0);
        pthread_join(th, 0);
    }
    printf("thread create+join: %.1f ms\n", (now_ms() - t) / 10);

    t = now_ms();
    for (int i = 0; i < 5; i++) {
        pid_t p;
        char *args[] = {(char *)tiny, 0};
        if (posix_spawn(&p, tiny, 0, 0, args, environ) == 0) waitpid(p, 0, 0);
    }
    printf("posix_spawn+wait of a one-page static binary: %.1f ms\n", (now_ms() - t) / 5);

    t = now_ms();
    for (int i = 0; i < 5; i++) {
        pid_t p = fork();
        if (p == 0) {
            execl(tiny, tiny, (char *)0);
            _exit(1);
        }
        waitpid(p, 0, 0);
    }
    printf("fork+exec+wait of the same: %.1f ms\n", (now_ms() - t) / 5);

    t = now_ms();
    for (int i = 0; i < 5; i++) {
        pid_t p = fork();
        if (p == 0) _exit(0);
        waitpid(p, 0, 0);
    }
    printf("fork+exit+wait: %.1f ms\n", (now_ms() - t) / 5);

    char *buf = malloc(1 << 16);
    memset(buf, 1, 1 << 16);
    int fd[2];
    if (pipe(fd) != 0) return 1;
    t = now_ms();
    for (int i = 0; i < 16; i++) {
        if (write(fd[1], buf, 1 << 16) < 0 || read(fd[0], buf, 1 << 16) < 0) return 1;
    }
    double pipe_ms = now_ms() - t;
    printf("pipe write+read of 1 MiB in 64 KiB: %.1f ms (%.2f MB/s)\n", pipe_ms,
           1.048576 / (pipe_ms / 1e3));

    t = now_ms();
    char *m = mmap(0, 4 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (int i = 0; i < 1024; i++) m[i * 4096] = 1;
    printf("anonymous page fault (zeroed page): %.2f ms\n", (now_ms() - t) / 1024);
    t = now_ms();
    munmap(m, 4 << 20);
    printf("munmap of 1024 touched pages: %.1f ms\n", now_ms() - t);
    return 0;
}
