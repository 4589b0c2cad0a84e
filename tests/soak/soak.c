/*
 * Soak: a server under many clients that stream inline and shared-memory
 * messages with fds, most of them SIGKILLed at random points, some closing
 * in order, two served from start to end.  Public API only.
 *
 * The server (this process) checks every byte it is delivered and answers
 * each message with its checksum, and a quarter of the shared-memory ones
 * with the whole payload echoed through its own segments, which the client
 * checks in turn.  At the end its fd count, memfd mappings and RSS must be
 * back at their baseline, every port closed, every orderly client and
 * survivor must have exited 0, and no port may have closed with a protocol
 * violation.  Prints one line per figure, then "soak: N passed, M failed";
 * exits 1 when anything failed.
 *
 *   soak [-s SECONDS] [-k KILLS] [-v VICTIMS] [-o ORDERLY] [-r SEED]
 *   soak --client PATH ID KIND SEED SECONDS   (run by the server)
 */
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "linuxshm.h"

#define T_MSG    16
#define T_SUM    17   /* reply: struct sum */
#define T_ECHO   18   /* reply: the payload, through the server's segments */
#define MAGIC    0x4b414f53u
#define WINDOW   8
#define MAX_CONNS 256
#define MAX_KIDS 64

enum kind { VICTIM, ORDERLY, SURVIVOR };

struct head {        /* first bytes of every payload */
    uint32_t magic, client, seq, size;
};

struct sum {         /* the server's answer to one message */
    uint32_t client, seq;
    uint64_t hash;
    uint32_t fd_ok;
    uint32_t size;
};

static long long now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

static uint8_t pat(uint32_t client, uint32_t seq, size_t off)
{
    return (uint8_t)(client * 29 + seq * 131 + off * 7 + (off >> 9));
}

static uint64_t fnv(uint64_t h, const uint8_t *p, size_t n)
{
    while (n-- > 0)
        h = (h ^ *p++) * 0x100000001b3ull;
    return h;
}

static uint32_t rnd(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return (uint32_t)(*s >> 11);
}

/* ---- client ---- */

struct client {
    uint32_t          id;
    struct lshm_port *port;
    struct lshm_ctx  *ctx;
    uint64_t          rng;
    uint32_t          seq, inflight, answered;
    uint64_t          hashes[WINDOW];   /* by seq % WINDOW */
    uint32_t          sizes[WINDOW];
};

#define CFAIL(...)                                                      \
    do {                                                                \
        fprintf(stderr, "soak client %u: ", c->id);                     \
        fprintf(stderr, __VA_ARGS__);                                   \
        fprintf(stderr, " (%s)\n", lshm_last_error());                  \
        return -1;                                                      \
    } while (0)

/* Write payload bytes [from, to) of message seq at p. */
static void fill(uint32_t client, uint32_t seq, size_t size, uint8_t *p, size_t from, size_t to)
{
    size_t i;

    for (i = from; i < to; i++)
        p[i - from] = pat(client, seq, i);
    if (from == 0 && size >= sizeof(struct head)) {
        struct head h = { MAGIC, client, seq, (uint32_t)size };

        memcpy(p, &h, sizeof(h));
    }
}

static int client_send(struct client *c)
{
    static uint8_t data[LSHM_INLINE_MAX];
    struct lshm_out out = { .type = T_MSG, .stream = c->seq + 1, .fd = -1 };
    struct lshm_buf *bufs[3];
    size_t lens[3];
    uint32_t r = rnd(&c->rng);
    size_t size, off = 0;
    uint64_t h = 0xcbf29ce484222325ull;
    unsigned i, n = 0;
    int ret;

    if (r % 5 == 0) {
        /* An fd whose content the server checks: this message's id. */
        uint32_t v[2] = { c->id, c->seq };

        out.fd = memfd_create("soak-fd", MFD_CLOEXEC);
        if (out.fd < 0 || write(out.fd, v, sizeof(v)) != sizeof(v))
            CFAIL("memfd");
    }
    if (r & 0x10) {
        size = sizeof(struct head) + rnd(&c->rng) % (LSHM_INLINE_MAX - sizeof(struct head));
        fill(c->id, c->seq, size, data, 0, size);
        out.data = data;
        out.size = size;
        h = fnv(h, data, size);
    } else {
        size = sizeof(struct head) + rnd(&c->rng) % (600 * 1024);
        while (off < size && n < 3) {
            size_t want = n == 2 ? size - off : (size - off) / (2 - (r >> 8) % 2);
            size_t cap;

            if (want == 0)
                want = size - off;
            /* The head stays whole in the first buffer. */
            if (n == 0 && want < sizeof(struct head))
                want = sizeof(struct head);
            ret = lshm_buf_alloc(c->port, want, &bufs[n]);
            if (ret == -EAGAIN) {
                /* Out of chunks: wait for the server to free some. */
                lshm_port_wait(c->port, LSHM_WAIT_SHM, 100);
                continue;
            }
            if (ret < 0)
                CFAIL("lshm_buf_alloc: %d", ret);
            cap = lshm_buf_capacity(bufs[n]);
            if (cap > want)
                cap = want;
            fill(c->id, c->seq, size, lshm_buf_data(bufs[n]), off, off + cap);
            h = fnv(h, lshm_buf_data(bufs[n]), cap);
            lshm_buf_set_size(bufs[n], cap);
            lens[n] = cap;
            off += cap;
            n++;
        }
        if (off < size) {
            /* Three buffers could not hold it: send what they hold. */
            size = off;
            if (size >= sizeof(struct head)) {
                struct head hd = { MAGIC, c->id, c->seq, (uint32_t)size };

                memcpy(lshm_buf_data(bufs[0]), &hd, sizeof(hd));
            }
            /* The hash again, from the bytes as they will be read. */
            h = 0xcbf29ce484222325ull;
            for (i = 0; i < n; i++)
                h = fnv(h, lshm_buf_data(bufs[i]), lens[i]);
        }
        out.bufs = bufs;
        out.nbufs = n;
    }
    c->hashes[c->seq % WINDOW] = h;
    c->sizes[c->seq % WINDOW] = (uint32_t)size;
    while ((ret = lshm_send(c->port, &out, 0)) == -EAGAIN)
        lshm_port_wait(c->port, LSHM_WAIT_SEND, 100);
    if (ret < 0)
        CFAIL("lshm_send: %d", ret);
    c->seq++;
    c->inflight++;
    return 0;
}

static int client_reply(struct client *c, int timeout_ms)
{
    struct lshm_msg m;
    uint32_t seq;
    int ret = lshm_recv(c->port, &m, timeout_ms);

    if (ret < 0)
        CFAIL("no answer within %d ms: %d", timeout_ms, ret);
    if (m.type == T_SUM) {
        struct sum s;

        if (m.size != sizeof(s) || m.niov != 1)
            CFAIL("answer of %zu bytes", m.size);
        memcpy(&s, m.iov[0].base, sizeof(s));
        seq = c->seq - c->inflight;
        if (s.client != c->id || s.seq != seq || s.hash != c->hashes[seq % WINDOW] || !s.fd_ok)
            CFAIL("answer for %u/%u (%u bytes, hash %s, fd %u), expected %u/%u (%u bytes)",
                  s.client, s.seq, s.size, s.hash == c->hashes[seq % WINDOW] ? "ok" : "wrong",
                  s.fd_ok, c->id, seq, c->sizes[seq % WINDOW]);
    } else if (m.type == T_ECHO) {
        uint64_t h = 0xcbf29ce484222325ull;
        unsigned i;

        seq = c->seq - c->inflight;
        for (i = 0; i < m.niov; i++)
            h = fnv(h, m.iov[i].base, m.iov[i].len);
        if (!(m.flags & LSHM_MSG_SHM) || h != c->hashes[seq % WINDOW])
            CFAIL("echo of %u differs", seq);
    } else {
        CFAIL("answer of type %u", m.type);
    }
    if (m.fd >= 0)
        close(m.fd);
    lshm_msg_done(&m);
    c->inflight--;
    c->answered++;
    return 0;
}

static int client_main(const char *path, uint32_t id, enum kind kind, uint64_t seed, int secs)
{
    struct client cl = { .id = id, .rng = seed | 1 }, *c = &cl;
    long long end = now_ms() + secs * 1000LL;
    unsigned count = kind == ORDERLY ? 20 + seed % 40 : ~0u;
    int ret;

    if (lshm_ctx_new(&c->ctx, NULL) < 0)
        CFAIL("lshm_ctx_new");
    ret = lshm_connect(c->ctx, path, 10000, &c->port);
    if (ret < 0)
        CFAIL("lshm_connect: %d", ret);
    for (;;) {
        bool more = c->seq < count && (kind != SURVIVOR || now_ms() < end);

        if (more && c->inflight < WINDOW) {
            if (client_send(c) < 0)
                return 1;
            continue;
        }
        if (c->inflight == 0)
            break;
        if (client_reply(c, 15000) < 0)
            return 1;
    }
    /* In order: BYE after every answer came. */
    lshm_port_close(c->port);
    lshm_ctx_free(c->ctx);
    if (kind == SURVIVOR)
        printf("%u\n", c->answered);
    return 0;
}

/* ---- server ---- */

struct conn {
    struct lshm_port *port;
    bool              open;
    bool              closing;   /* on_close came: close the handle */
};

struct server {
    struct lshm_ctx  *ctx;
    struct conn       conns[MAX_CONNS];
    unsigned          nconns;
    uint64_t          msgs_inline, msgs_shm, bytes, fds, echoes, sums;
    uint64_t          bad, proto_closes, other_closes, eof_closes, send_fail;
    char              first_bad[256];
};

static struct server srv;

static void bad(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void bad(const char *fmt, ...)
{
    va_list ap;

    if (srv.bad++ == 0) {
        va_start(ap, fmt);
        vsnprintf(srv.first_bad, sizeof(srv.first_bad), fmt, ap);
        va_end(ap);
    }
}

/* Check one message; its hash into *hash.  false: it is corrupt. */
static bool verify(struct lshm_msg *m, uint64_t *hash, struct head *hd)
{
    uint64_t h = 0xcbf29ce484222325ull;
    uint8_t first[sizeof(struct head)];
    size_t off = 0, got = 0;
    unsigned i;

    for (i = 0; i < m->niov && got < sizeof(first); i++) {
        size_t k = m->iov[i].len < sizeof(first) - got ? m->iov[i].len : sizeof(first) - got;

        memcpy(first + got, m->iov[i].base, k);
        got += k;
    }
    if (got < sizeof(first))
        return false;
    memcpy(hd, first, sizeof(*hd));
    if (hd->magic != MAGIC || hd->size != m->size)
        return false;
    for (i = 0; i < m->niov; i++) {
        const uint8_t *p = m->iov[i].base;
        size_t j;

        for (j = 0; j < m->iov[i].len; j++, off++)
            if (off >= sizeof(struct head) && p[j] != pat(hd->client, hd->seq, off))
                return false;
        h = fnv(h, p, m->iov[i].len);
    }
    *hash = h;
    return off == m->size;
}

static bool fd_ok(int fd, const struct head *hd)
{
    uint32_t v[2];

    if (fd < 0)
        return true;
    return pread(fd, v, sizeof(v), 0) == sizeof(v) && v[0] == hd->client && v[1] == hd->seq;
}

static int reply(struct lshm_port *port, struct lshm_msg *m, const struct sum *s)
{
    struct lshm_out out = { .type = T_SUM, .stream = m->stream, .fd = -1, .data = s,
                            .size = sizeof(*s) };
    struct lshm_buf *b = NULL;

    /* A quarter of the shared-memory messages come back whole, through
     * the server's own segments (the fd check rides on the others). */
    if ((m->flags & LSHM_MSG_SHM) && s->seq % 4 == 0 && m->fd < 0 &&
        lshm_buf_alloc(port, m->size, &b) == 0 && lshm_buf_capacity(b) >= m->size) {
        size_t off = 0;
        unsigned i;

        for (i = 0; i < m->niov; i++) {
            memcpy((uint8_t *)lshm_buf_data(b) + off, m->iov[i].base, m->iov[i].len);
            off += m->iov[i].len;
        }
        lshm_buf_set_size(b, m->size);
        out = (struct lshm_out){ .type = T_ECHO, .stream = m->stream, .fd = -1,
                                 .bufs = &b, .nbufs = 1 };
        if (lshm_send(port, &out, 0) == 0) {
            srv.echoes++;
            return 0;
        }
        lshm_buf_free(b);
        out = (struct lshm_out){ .type = T_SUM, .stream = m->stream, .fd = -1, .data = s,
                                 .size = sizeof(*s) };
    } else if (b != NULL) {
        lshm_buf_free(b);
    }
    srv.sums++;
    return lshm_send(port, &out, 0);
}

static void on_msg(struct lshm_port *port, struct lshm_msg *m, void *arg)
{
    struct sum s = { 0 };
    struct head hd;
    int ret;

    if (m->type != T_MSG || !verify(m, &s.hash, &hd)) {
        bad("corrupt message on port %d: type %u, %zu bytes", lshm_port_id(port), m->type,
            m->size);
    } else {
        s.client = hd.client;
        s.seq = hd.seq;
        s.fd_ok = fd_ok(m->fd, &hd);
        s.size = (uint32_t)m->size;
        if (!s.fd_ok)
            bad("fd of %u/%u has the wrong content", hd.client, hd.seq);
        if (m->flags & LSHM_MSG_SHM)
            srv.msgs_shm++;
        else
            srv.msgs_inline++;
        srv.bytes += m->size;
        srv.fds += m->fd >= 0;
        ret = reply(port, m, &s);
        if (ret < 0 && ret != -EPIPE && ret != -ECONNRESET)
            srv.send_fail++;
    }
    if (m->fd >= 0)
        close(m->fd);
    lshm_msg_done(m);
}

static void on_close(struct lshm_port *port, int error, void *arg)
{
    struct conn *c = arg;

    if (error == -EPROTO) {
        srv.proto_closes++;
        bad("port closed with a violation: %s", lshm_port_error(port));
    } else if (error == -EPIPE || error == -ECONNRESET) {
        srv.eof_closes++;
    } else {
        srv.other_closes++;
        bad("port closed with %d: %s", error, lshm_port_error(port));
    }
    c->closing = true;
}

static void on_accept(struct lshm_listener *l, struct lshm_port *port, void *arg)
{
    struct conn *c = NULL;
    unsigned i;

    for (i = 0; i < srv.nconns; i++)
        if (!srv.conns[i].open) {
            c = &srv.conns[i];
            break;
        }
    if (c == NULL && srv.nconns < MAX_CONNS)
        c = &srv.conns[srv.nconns++];
    if (c == NULL) {
        bad("more than %d connections", MAX_CONNS);
        lshm_port_close(port);
        return;
    }
    *c = (struct conn){ .port = port, .open = true };
    if (lshm_port_set_handler(port, on_msg, on_close, c) < 0)
        bad("lshm_port_set_handler: %s", lshm_last_error());
}

/* Close the handles of ports whose on_close came. */
static unsigned reap_conns(void)
{
    unsigned i, open = 0;

    for (i = 0; i < srv.nconns; i++) {
        struct conn *c = &srv.conns[i];

        if (c->open && c->closing) {
            lshm_port_close(c->port);
            c->open = false;
        }
        open += c->open;
    }
    return open;
}

struct kid {
    pid_t     pid;
    enum kind kind;
    int       out;     /* survivors: the pipe of their answer count */
    long long kill_at;
};

static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int n = 0;

    if (d == NULL)
        return -1;
    while ((e = readdir(d)) != NULL)
        n += e->d_name[0] != '.';
    closedir(d);
    return n - 1;
}

static int count_memfd_maps(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    int n = 0;

    if (f == NULL)
        return -1;
    while (fgets(line, sizeof(line), f) != NULL)
        n += strstr(line, "/memfd:") != NULL;
    fclose(f);
    return n;
}

static long rss_kib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;

    if (f == NULL)
        return -1;
    while (fgets(line, sizeof(line), f) != NULL)
        if (sscanf(line, "VmRSS: %ld", &v) == 1)
            break;
    fclose(f);
    return v;
}

static char self_path[4096];

static pid_t spawn(const char *path, uint32_t id, enum kind kind, uint64_t seed, int secs,
                   int *out)
{
    char a_id[16], a_kind[4], a_seed[24], a_secs[16];
    int p[2] = { -1, -1 };
    pid_t pid;

    if (out != NULL && pipe2(p, O_CLOEXEC) < 0)
        return -1;
    snprintf(a_id, sizeof(a_id), "%u", id);
    snprintf(a_kind, sizeof(a_kind), "%d", (int)kind);
    snprintf(a_seed, sizeof(a_seed), "%llu", (unsigned long long)seed);
    snprintf(a_secs, sizeof(a_secs), "%d", secs);
    pid = fork();
    if (pid == 0) {
        if (out != NULL)
            dup2(p[1], 1);
        execl(self_path, "soak", "--client", path, a_id, a_kind, a_seed, a_secs, (char *)NULL);
        _exit(127);
    }
    if (out != NULL) {
        close(p[1]);
        *out = p[0];
    }
    return pid;
}

static int passed, failed;

static void figure(bool ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void figure(bool ok, const char *fmt, ...)
{
    va_list ap;

    printf("soak: ");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("%s\n", ok ? "" : "  FAILED");
    if (ok)
        passed++;
    else
        failed++;
}

static void info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void info(const char *fmt, ...)
{
    va_list ap;

    printf("soak: ");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}

int main(int argc, char **argv)
{
    int secs = 90, want_kills = 120, victims = 6, orderly = 40, opt;
    uint64_t rng = (uint64_t)time(NULL) * 2654435761u;
    struct kid kids[MAX_KIDS];
    unsigned nkids = 0, i, open;
    unsigned kills = 0, orderly_started = 0, orderly_ok = 0, orderly_bad = 0;
    unsigned survivors_ok = 0, survivor_answers[2] = { 0, 0 }, started = 0;
    unsigned victims_early = 0;
    struct lshm_listener *l;
    char path[64];
    int fds0, maps0, fds1, maps1;
    long rss0, rss1, rss_peak = 0;
    long long t0, end, next_kill;
    uint32_t next_id = 1;

    if (argc == 7 && strcmp(argv[1], "--client") == 0)
        return client_main(argv[2], (uint32_t)atoi(argv[3]), (enum kind)atoi(argv[4]),
                           strtoull(argv[5], NULL, 10), atoi(argv[6]));
    while ((opt = getopt(argc, argv, "s:k:v:o:r:")) != -1) {
        switch (opt) {
        case 's': secs = atoi(optarg); break;
        case 'k': want_kills = atoi(optarg); break;
        case 'v': victims = atoi(optarg); break;
        case 'o': orderly = atoi(optarg); break;
        case 'r': rng = strtoull(optarg, NULL, 0); break;
        default:
            fprintf(stderr, "usage: soak [-s SECONDS] [-k KILLS] [-v VICTIMS] [-o ORDERLY] "
                            "[-r SEED]\n");
            return 2;
        }
    }
    if (readlink("/proc/self/exe", self_path, sizeof(self_path) - 1) < 0) {
        perror("soak: /proc/self/exe");
        return 1;
    }
    if (victims < 1 || victims > MAX_KIDS - 8)
        victims = 6;
    rng |= 1;
    signal(SIGPIPE, SIG_IGN);
    info("seed %#llx, %d s, %d kills wanted, %d victims at a time, %d orderly clients, "
         "2 survivors", (unsigned long long)rng, secs, want_kills, victims, orderly);

    if (lshm_ctx_new(&srv.ctx, NULL) < 0) {
        fprintf(stderr, "soak: lshm_ctx_new: %s\n", lshm_last_error());
        return 1;
    }
    snprintf(path, sizeof(path), "/tmp/lshm-soak-%d.sock", (int)getpid());
    if (lshm_listen(srv.ctx, path, 0600, &l) < 0 ||
        lshm_listener_set_handler(l, on_accept, NULL) < 0) {
        fprintf(stderr, "soak: lshm_listen %s: %s\n", path, lshm_last_error());
        return 1;
    }
    lshm_ctx_run(srv.ctx, 0);
    fds0 = count_fds();
    maps0 = count_memfd_maps();
    rss0 = rss_kib();

    t0 = now_ms();
    end = t0 + secs * 1000LL;
    next_kill = t0 + 300;
    for (i = 0; i < 2; i++, started++) {
        kids[nkids] = (struct kid){ .kind = SURVIVOR };
        kids[nkids].pid = spawn(path, next_id++, SURVIVOR, rnd(&rng), secs, &kids[nkids].out);
        nkids++;
    }
    for (;;) {
        long long now = now_ms();
        unsigned nvictims = 0, norderly = 0;
        bool running = now < end || kills < (unsigned)want_kills ||
                       orderly_started < (unsigned)orderly;
        int status;
        pid_t pid;

        lshm_ctx_run(srv.ctx, 5);
        reap_conns();
        if (rss_kib() > rss_peak)
            rss_peak = rss_kib();
        /* Children that ended. */
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
            for (i = 0; i < nkids && kids[i].pid != pid; i++)
                ;
            if (i == nkids)
                continue;
            if (kids[i].kind == SURVIVOR) {
                char buf[32] = "";
                ssize_t n = read(kids[i].out, buf, sizeof(buf) - 1);

                close(kids[i].out);
                if (WIFEXITED(status) && WEXITSTATUS(status) == 0 && n > 0) {
                    survivor_answers[survivors_ok < 2 ? survivors_ok : 1] = (unsigned)atoi(buf);
                    survivors_ok++;
                }
            } else if (kids[i].kind == ORDERLY) {
                if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
                    orderly_ok++;
                else
                    orderly_bad++;
            } else if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) {
                kills++;
            } else {
                victims_early++;   /* a victim that ended on its own failed */
            }
            kids[i] = kids[--nkids];
        }
        for (i = 0; i < nkids; i++) {
            nvictims += kids[i].kind == VICTIM;
            norderly += kids[i].kind == ORDERLY;
        }
        if (!running && nkids == 0)
            break;
        if (now > end + 120000) {
            info("children still running two minutes past the end");
            for (i = 0; i < nkids; i++)
                kill(kids[i].pid, SIGKILL);
            failed++;
            break;
        }
        /* Keep the victims coming, and kill one at a random point. */
        if (running && kills + nvictims < (unsigned)want_kills + 20 &&
            nvictims < (unsigned)victims && nkids < MAX_KIDS) {
            kids[nkids] = (struct kid){ .kind = VICTIM, .out = -1 };
            /* Some die before or during the handshake, most while streaming. */
            kids[nkids].kill_at = now + (rnd(&rng) % 8 == 0 ? rnd(&rng) % 20
                                                            : 20 + rnd(&rng) % 1500);
            kids[nkids].pid = spawn(path, next_id++, VICTIM, rnd(&rng), 0, NULL);
            nkids++;
            started++;
        }
        if (running && orderly_started < (unsigned)orderly && norderly < 2 &&
            nkids < MAX_KIDS && rnd(&rng) % 16 == 0) {
            kids[nkids] = (struct kid){ .kind = ORDERLY, .out = -1 };
            kids[nkids].pid = spawn(path, next_id++, ORDERLY, rnd(&rng), 0, NULL);
            nkids++;
            started++;
            orderly_started++;
        }
        if (now >= next_kill) {
            for (i = 0; i < nkids; i++)
                if (kids[i].kind == VICTIM && kids[i].kill_at <= now && kids[i].kill_at > 0) {
                    kill(kids[i].pid, SIGKILL);
                    kids[i].kill_at = 0;
                    break;
                }
            next_kill = now + (secs * 800LL) / (want_kills > 0 ? want_kills : 1) / 2 +
                        rnd(&rng) % 100;
        }
    }
    /* Every port the clients had must close; then the baseline. */
    for (i = 0; i < 400 && (open = reap_conns()) > 0; i++)
        lshm_ctx_run(srv.ctx, 50);
    open = reap_conns();
    for (i = 0; i < 20; i++)
        lshm_ctx_run(srv.ctx, 10);
    fds1 = count_fds();
    maps1 = count_memfd_maps();
    rss1 = rss_kib();

    info("clients started %u, in %.1f s", started, (now_ms() - t0) / 1000.0);
    figure(kills >= (unsigned)want_kills, "clients SIGKILLed %u (wanted >= %d)", kills,
           want_kills);
    figure(victims_early == 0, "victims that ended before their kill %u", victims_early);
    figure(orderly_bad == 0 && orderly_ok == orderly_started,
           "orderly clients closed and verified %u of %u", orderly_ok, orderly_started);
    figure(survivors_ok == 2, "survivors served to the end and verified %u of 2 "
           "(answers %u, %u)", survivors_ok, survivor_answers[0], survivor_answers[1]);
    figure(srv.bad == 0, "corrupt deliveries or bad closes %llu%s%s",
           (unsigned long long)srv.bad, srv.bad ? ": " : "", srv.first_bad);
    info("messages verified %llu (inline %llu, shared memory %llu), %.1f MiB, fds %llu",
         (unsigned long long)(srv.msgs_inline + srv.msgs_shm),
         (unsigned long long)srv.msgs_inline, (unsigned long long)srv.msgs_shm,
         srv.bytes / 1048576.0, (unsigned long long)srv.fds);
    info("answers: %llu checksums, %llu echoed through shared memory",
         (unsigned long long)srv.sums, (unsigned long long)srv.echoes);
    figure(srv.msgs_shm > 0 && srv.msgs_inline > 0 && srv.fds > 0 && srv.echoes > 0,
           "every kind of message delivered");
    figure(srv.send_fail == 0, "answers that failed to send to a live port %llu",
           (unsigned long long)srv.send_fail);
    figure(srv.proto_closes == 0 && srv.other_closes == 0,
           "ports closed: %llu at EOF or BYE, %llu with a violation, %llu otherwise",
           (unsigned long long)srv.eof_closes, (unsigned long long)srv.proto_closes,
           (unsigned long long)srv.other_closes);
    figure(open == 0, "ports still open at the end %u", open);
    figure(fds1 == fds0, "server fds %d at the start, %d at the end", fds0, fds1);
    figure(maps1 == maps0, "server memfd mappings (segment tables) %d at the start, %d at "
           "the end", maps0, maps1);
    /* The heap keeps some of what it grew to; segments (10 MiB each) must
     * be gone. */
    figure(rss1 <= rss0 + 8192, "server RSS %ld KiB at the start, %ld KiB at the end "
           "(peak %ld KiB, allowed +8192)", rss0, rss1, rss_peak);
    lshm_listener_close(l);
    lshm_ctx_free(srv.ctx);
    printf("soak: %d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
