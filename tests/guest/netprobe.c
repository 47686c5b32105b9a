/* Network checks run inside the guest (built static with the host's gcc by the network
 * end-to-end test; the image's busybox has no UDP server and no parallel client).
 *
 *   netprobe udp-echo PORT N       echo N datagrams received on UDP PORT, then exit
 *   netprobe fan IP PORT N PATH    N TCP connections at once to IP:PORT, each sends
 *                                  "GET PATH HTTP/1.0" and reads to end of file; prints
 *                                  "ok K bytes B" where K answered with status 200
 *   netprobe get IP PORT PATH      one such request; prints the body's SHA-256, its length
 *                                  and the milliseconds from connect to end of file (one
 *                                  copy out of the kernel: wget | sha256sum costs three,
 *                                  and guest kernel copies are slow on PVM hosts)
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int udp_echo(int port, int n) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0) {
        perror("udp bind");
        return 1;
    }
    printf("listening\n");
    fflush(stdout);
    char buf[65536];
    for (int i = 0; i < n; i++) {
        struct sockaddr_in from;
        socklen_t len = sizeof from;
        ssize_t got = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&from, &len);
        if (got < 0) {
            perror("recvfrom");
            return 1;
        }
        if (sendto(s, buf, got, 0, (struct sockaddr *)&from, len) < 0) {
            perror("sendto");
            return 1;
        }
    }
    return 0;
}

struct conn {
    int fd;
    int sent;
    int done;
    char head[16];
    size_t head_len;
    long bytes;
};

static int fan(const char *ip, int port, int n, const char *path) {
    struct conn *c = calloc(n, sizeof *c);
    struct pollfd *p = calloc(n, sizeof *p);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    char req[512];
    int req_len = snprintf(req, sizeof req, "GET %s HTTP/1.0\r\nHost: x\r\n\r\n", path);
    if (!c || !p || inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    for (int i = 0; i < n; i++) {
        c[i].fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (c[i].fd < 0 ||
            (connect(c[i].fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS)) {
            perror("connect");
            return 1;
        }
    }
    int open = n;
    while (open > 0) {
        for (int i = 0; i < n; i++) {
            p[i].fd = c[i].done ? -1 : c[i].fd;
            p[i].events = c[i].sent ? POLLIN : POLLOUT;
        }
        if (poll(p, n, 60000) <= 0) {
            fprintf(stderr, "poll timed out with %d open\n", open);
            return 1;
        }
        for (int i = 0; i < n; i++) {
            if (c[i].done || !p[i].revents)
                continue;
            if (!c[i].sent) {
                int err = 0;
                socklen_t l = sizeof err;
                getsockopt(c[i].fd, SOL_SOCKET, SO_ERROR, &err, &l);
                if (err || write(c[i].fd, req, req_len) != req_len) {
                    fprintf(stderr, "connection %d failed: %s\n", i, strerror(err));
                    c[i].done = 1;
                    open--;
                    continue;
                }
                c[i].sent = 1;
                continue;
            }
            char buf[65536];
            ssize_t got = read(c[i].fd, buf, sizeof buf);
            if (got > 0) {
                size_t take = got < (ssize_t)(sizeof c[i].head - c[i].head_len)
                                  ? (size_t)got
                                  : sizeof c[i].head - c[i].head_len;
                memcpy(c[i].head + c[i].head_len, buf, take);
                c[i].head_len += take;
                c[i].bytes += got;
                continue;
            }
            if (got < 0 && errno == EAGAIN)
                continue;
            c[i].done = 1;
            open--;
            close(c[i].fd);
        }
    }
    int ok = 0;
    long bytes = 0;
    for (int i = 0; i < n; i++) {
        if (c[i].head_len >= 12 && memcmp(c[i].head + 9, "200", 3) == 0)
            ok++;
        bytes += c[i].bytes;
    }
    printf("ok %d bytes %ld\n", ok, bytes);
    return ok == n ? 0 : 1;
}

/* SHA-256 (FIPS 180-4). */
static const unsigned int K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

struct sha256 {
    unsigned int h[8];
    unsigned char block[64];
    size_t fill;
    unsigned long long total;
};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha_block(struct sha256 *s, const unsigned char *p) {
    unsigned int w[64], a, b, c, d, e, f, g, h;
    for (int i = 0; i < 16; i++)
        w[i] = (unsigned)p[4 * i] << 24 | (unsigned)p[4 * i + 1] << 16 |
               (unsigned)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        unsigned int s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        unsigned int s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3];
    e = s->h[4], f = s->h[5], g = s->h[6], h = s->h[7];
    for (int i = 0; i < 64; i++) {
        unsigned int t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) +
                          K[i] + w[i];
        unsigned int t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    s->h[0] += a, s->h[1] += b, s->h[2] += c, s->h[3] += d;
    s->h[4] += e, s->h[5] += f, s->h[6] += g, s->h[7] += h;
}

static void sha_init(struct sha256 *s) {
    static const unsigned int iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                       0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->h, iv, sizeof iv);
    s->fill = 0;
    s->total = 0;
}

static void sha_update(struct sha256 *s, const unsigned char *p, size_t n) {
    s->total += n;
    while (n > 0) {
        size_t take = 64 - s->fill < n ? 64 - s->fill : n;
        memcpy(s->block + s->fill, p, take);
        s->fill += take, p += take, n -= take;
        if (s->fill == 64) {
            sha_block(s, s->block);
            s->fill = 0;
        }
    }
}

static void sha_hex(struct sha256 *s, char out[65]) {
    unsigned long long bits = s->total * 8;
    unsigned char pad = 0x80, zero = 0, len[8];
    sha_update(s, &pad, 1);
    while (s->fill != 56)
        sha_update(s, &zero, 1);
    for (int i = 0; i < 8; i++)
        len[i] = (unsigned char)(bits >> (56 - 8 * i));
    sha_update(s, len, 8);
    for (int i = 0; i < 8; i++)
        sprintf(out + 8 * i, "%08x", s->h[i]);
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int get(const char *ip, int port, const char *path) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    double start = now_ms();
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0 || inet_pton(AF_INET, ip, &a.sin_addr) != 1 ||
        connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
        perror("connect");
        return 1;
    }
    char req[512];
    int req_len = snprintf(req, sizeof req, "GET %s HTTP/1.0\r\nHost: x\r\n\r\n", path);
    if (write(s, req, req_len) != req_len) {
        perror("write");
        return 1;
    }
    static unsigned char buf[1 << 20];
    struct sha256 h;
    sha_init(&h);
    char head[4096];
    size_t head_len = 0;
    int in_body = 0;
    ssize_t got;
    while ((got = read(s, buf, sizeof buf)) > 0) {
        unsigned char *p = buf;
        size_t n = (size_t)got;
        while (!in_body && n > 0) {
            if (head_len == sizeof head) {
                fprintf(stderr, "header too long\n");
                return 1;
            }
            head[head_len++] = (char)*p++;
            n--;
            if (head_len >= 4 && memcmp(head + head_len - 4, "\r\n\r\n", 4) == 0)
                in_body = 1;
        }
        sha_update(&h, p, n);
    }
    if (got < 0 || !in_body || head_len < 12 || memcmp(head + 9, "200", 3) != 0) {
        fprintf(stderr, "bad response\n");
        return 1;
    }
    double elapsed = now_ms() - start;
    unsigned long long body = h.total;
    char hex[65];
    sha_hex(&h, hex);
    printf("%s %llu %.1f\n", hex, body, elapsed);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "get") == 0)
        return get(argv[2], atoi(argv[3]), argv[4]);
    if (argc == 4 && strcmp(argv[1], "udp-echo") == 0)
        return udp_echo(atoi(argv[2]), atoi(argv[3]));
    if (argc == 6 && strcmp(argv[1], "fan") == 0)
        return fan(argv[2], atoi(argv[3]), atoi(argv[4]), argv[5]);
    fprintf(stderr, "usage: netprobe udp-echo PORT N | fan IP PORT N PATH | get IP PORT PATH\n");
    return 2;
}
