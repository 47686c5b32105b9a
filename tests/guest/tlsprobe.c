/* An HTTPS client run inside the guest by the secrets end-to-end test (built static with
 * the host's gcc and OpenSSL: the image's busybox has no TLS client that verifies).
 *
 *   tlsprobe [-k] [-s] IP PORT NAME PATH [HEADER...]
 *
 * Connects to IP:PORT, speaks TLS with server name NAME, verifying the server against
 * OpenSSL's default trust (SSL_CERT_FILE and the system paths) unless -k, sends
 * "GET PATH HTTP/1.1" with Host: NAME, each HEADER ("Name: value") and Connection: close
 * (-s: the request in two writes 300 ms apart, split in the middle of the first HEADER),
 * then prints
 *   issuer: <the server certificate's issuer CN>
 *   verify: ok | <OpenSSL's reason>
 * and the response as received. Exit status: 0 when a response was read, 2 when the
 * connection or handshake failed, 3 when the connection broke before any response.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int usage(void) {
    fprintf(stderr, "usage: tlsprobe [-k] [-s] IP PORT NAME PATH [HEADER...]\n");
    return 1;
}

static int send_all(SSL *ssl, const char *p, size_t n) {
    while (n > 0) {
        int w = SSL_write(ssl, p, (int)n);
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int main(int argc, char **argv) {
    int insecure = 0, split = 0, i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (strcmp(argv[i], "-k") == 0)
            insecure = 1;
        else if (strcmp(argv[i], "-s") == 0)
            split = 1;
        else
            return usage();
    }
    if (argc - i < 4)
        return usage();
    const char *ip = argv[i], *name = argv[i + 2], *path = argv[i + 3];
    int port = atoi(argv[i + 1]);
    char **headers = argv + i + 4;
    int nheaders = argc - i - 4;

    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx || SSL_CTX_set_default_verify_paths(ctx) != 1) {
        ERR_print_errors_fp(stderr);
        return 2;
    }
    SSL_CTX_set_verify(ctx, insecure ? SSL_VERIFY_NONE : SSL_VERIFY_PEER, NULL);
    static const unsigned char alpn[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
    SSL_CTX_set_alpn_protos(ctx, alpn, sizeof alpn);

    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (s < 0 || inet_pton(AF_INET, ip, &a.sin_addr) != 1 ||
        connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
        perror("connect");
        return 2;
    }
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, s);
    SSL_set_tlsext_host_name(ssl, name);
    if (!insecure)
        SSL_set1_host(ssl, name);
    int handshake = SSL_connect(ssl);
    X509 *cert = SSL_get1_peer_certificate(ssl);
    char issuer[256] = "none";
    if (cert) {
        X509_NAME_get_text_by_NID(X509_get_issuer_name(cert), NID_commonName, issuer,
                                  sizeof issuer);
        X509_free(cert);
    }
    printf("issuer: %s\n", issuer);
    long v = SSL_get_verify_result(ssl);
    printf("verify: %s\n", v == X509_V_OK ? "ok" : X509_verify_cert_error_string(v));
    fflush(stdout);
    if (handshake != 1) {
        fprintf(stderr, "handshake failed\n");
        ERR_print_errors_fp(stderr);
        return 2;
    }

    size_t cap = 4096;
    for (int h = 0; h < nheaders; h++)
        cap += strlen(headers[h]) + 2;
    char *req = malloc(cap);
    if (!req)
        return 2;
    int n = snprintf(req, cap, "GET %s HTTP/1.1\r\nHost: %s\r\n", path, name);
    size_t cut = 0;
    for (int h = 0; h < nheaders; h++) {
        if (h == 0)
            cut = (size_t)n + strlen(headers[h]) / 2 + 4;
        n += snprintf(req + n, cap - (size_t)n, "%s\r\n", headers[h]);
    }
    n += snprintf(req + n, cap - (size_t)n, "Connection: close\r\n\r\n");
    if (!split || cut == 0 || cut >= (size_t)n)
        cut = (size_t)n;
    if (send_all(ssl, req, cut) < 0) {
        fprintf(stderr, "write failed\n");
        return 3;
    }
    if (cut < (size_t)n) {
        struct timespec pause = {0, 300 * 1000 * 1000};
        nanosleep(&pause, NULL);
        if (send_all(ssl, req + cut, (size_t)n - cut) < 0) {
            fprintf(stderr, "write failed\n");
            return 3;
        }
    }
    char buf[16384];
    size_t total = 0;
    for (;;) {
        int r = SSL_read(ssl, buf, sizeof buf);
        if (r <= 0)
            break;
        fwrite(buf, 1, (size_t)r, stdout);
        total += (size_t)r;
    }
    fflush(stdout);
    if (total == 0) {
        fprintf(stderr, "no response\n");
        return 3;
    }
    return 0;
}
