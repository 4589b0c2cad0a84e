/*
 * The transport end to end: real fork(), real sockets, real io_uring.
 * Bulk traffic of every size each way, fd passing, batching into one
 * submit, back-pressure (send queue and shared memory), tracking, a peer
 * killed mid-stream, listeners, the version handshake, context basics and
 * the ping-pong in both the pull and the handler style.
 */
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"
#include "linuxshm.h"
#include "port.h"
#include "wire.h"

#define KiB 1024u
#define MiB (1024u * 1024u)
#define T_DATA 16
#define T_CTRL 17

#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define UNDER_SAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
#define UNDER_SAN 1
#endif
#endif
#ifndef UNDER_SAN
#define UNDER_SAN 0
#endif

/* Scale a count down under a sanitizer (LSHM_SANITIZER is set by make asan/tsan). */
static unsigned scaled(unsigned n, unsigned div)
{
    if (UNDER_SAN || getenv("LSHM_SANITIZER") != NULL)
        return n / div ? n / div : 1;
    return n;
}

/* In a child: report the failed check on stderr and exit with its line. */
#define CK(c)                                                                     \
    do {                                                                          \
        if (!(c)) {                                                               \
            fprintf(stderr, "child %d: %s:%d: check failed: %s (%s)\n", getpid(), \
                    __FILE__, __LINE__, #c, lshm_last_error());                   \
            return 1;                                                             \
        }                                                                         \
    } while (0)

/* ---- payload pattern: a function of (sequence number, byte offset) ---- */

static inline uint64_t pat_word(uint32_t seq, uint64_t w)
{
    return ((uint64_t)seq * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) ^
           (w * 0xD6E8FEB86659FD93ull);
}

static void pat_fill(uint32_t seq, size_t off, uint8_t *p, size_t len)
{
    size_t i = 0;

    while (i < len && ((off + i) & 7) != 0) {
        uint64_t w = pat_word(seq, (off + i) / 8);

        p[i] = (uint8_t)(w >> (8 * ((off + i) & 7)));
        i++;
    }
    for (; i + 8 <= len; i += 8) {
        uint64_t w = pat_word(seq, (off + i) / 8);

        memcpy(p + i, &w, 8);
    }
    for (; i < len; i++) {
        uint64_t w = pat_word(seq, (off + i) / 8);

        p[i] = (uint8_t)(w >> (8 * ((off + i) & 7)));
    }
}

/* Offset of the first wrong byte, or (size_t)-1 when all are right. */
static size_t pat_check(uint32_t seq, size_t off, const uint8_t *p, size_t len)
{
    size_t i = 0;

    while (i < len && ((off + i) & 7) != 0) {
        uint64_t w = pat_word(seq, (off + i) / 8);

        if (p[i] != (uint8_t)(w >> (8 * ((off + i) & 7))))
            return off + i;
        i++;
    }
    for (; i + 8 <= len; i += 8) {
        uint64_t w = pat_word(seq, (off + i) / 8), got;

        memcpy(&got, p + i, 8);
        if (got != w)
            goto bytewise;
    }
    for (; i < len; i++) {
bytewise:
        for (; i < len; i++) {
            uint64_t w = pat_word(seq, (off + i) / 8);

            if (p[i] != (uint8_t)(w >> (8 * ((off + i) & 7))))
                return off + i;
        }
    }
    return (size_t)-1;
}

/* Check a whole received message; true when size and every byte match. */
static bool msg_check(const struct lshm_msg *m, uint32_t seq, size_t size)
{
    size_t off = 0;
    unsigned i;

    if (m->size != size)
        return false;
    for (i = 0; i < m->niov; i++) {
        if (pat_check(seq, off, m->iov[i].base, m->iov[i].len) != (size_t)-1)
            return false;
        off += m->iov[i].len;
    }
    return off == size;
}

/* ---- random numbers ---- */

static uint64_t rng_next(uint64_t *s)
{
    uint64_t x = *s;

    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static uint64_t rng_below(uint64_t *s, uint64_t n)
{
    return n ? rng_next(s) % n : 0;
}

/* Log-uniform over 0 .. max: every power of two is as likely as another. */
static size_t rng_logsize(uint64_t *s, size_t max)
{
    double u = (double)(rng_next(s) >> 11) / (double)(1ull << 53);
    size_t v = (size_t)exp(u * log((double)max + 1.0)) - 1;

    return v > max ? max : v;
}

/* ---- processes ---- */

typedef int (*child_fn)(struct lshm_ctx *ctx, struct lshm_port *port, void *arg);

/*
 * A socketpair port in ctx, and a child that makes its own context (params
 * cp, NULL for defaults) after fork, adopts the other end and runs fn.
 */
static pid_t spawn(struct lshm_ctx *ctx, const struct lshm_ctx_params *cp,
                   struct lshm_port **port, child_fn fn, void *arg)
{
    int peer, ret;
    pid_t pid;

    ret = lshm_socketpair(ctx, port, &peer);
    cr_assert_eq(ret, 0, "lshm_socketpair: %d %s", ret, lshm_last_error());
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        struct lshm_ctx *cctx;
        struct lshm_port *cport;
        int rc;

        lshm_ctx_free(ctx);
        if (lshm_ctx_new(&cctx, cp) < 0) {
            fprintf(stderr, "child: lshm_ctx_new: %s\n", lshm_last_error());
            _exit(90);
        }
        if (lshm_port_adopt(cctx, peer, &cport) < 0) {
            fprintf(stderr, "child: lshm_port_adopt: %s\n", lshm_last_error());
            _exit(91);
        }
        rc = fn(cctx, cport, arg);
        lshm_port_close(cport);
        lshm_ctx_free(cctx);
        _exit(rc);
    }
    close(peer);
    return pid;
}

static void child_ok(pid_t pid, int timeout_ms)
{
    int st = wait_child(pid, timeout_ms);

    cr_assert_neq(st, -1, "child %d did not finish within %d ms", (int)pid, timeout_ms);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0,
              "child %d failed: %s %d", (int)pid, WIFEXITED(st) ? "exit" : "signal",
              WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
}

static struct lshm_ctx *ctx_make(const struct lshm_ctx_params *p)
{
    struct lshm_ctx *ctx;
    int ret = lshm_ctx_new(&ctx, p);

    cr_assert_eq(ret, 0, "lshm_ctx_new: %d %s", ret, lshm_last_error());
    return ctx;
}

/* Send an inline message, waiting for room in the queue (bounded). */
static int send_inline(struct lshm_port *port, uint8_t type, uint32_t stream, const void *data,
                       size_t size, int fd)
{
    struct lshm_out out = {
        .type = type, .stream = stream, .data = size ? data : NULL, .size = size, .fd = fd,
    };
    int ret;

    while ((ret = lshm_send(port, &out, 0)) == -EAGAIN) {
        ret = lshm_port_wait(port, LSHM_WAIT_SEND, 10000);
        if (ret < 0)
            return ret;
    }
    return ret;
}

/* Inline message whose payload is pattern (seq, 0 .. size). */
static int send_pat(struct lshm_port *port, uint32_t seq, size_t size, unsigned flags)
{
    uint8_t buf[LSHM_INLINE_MAX];
    struct lshm_out out = { .type = T_DATA, .stream = seq, .fd = -1 };
    int ret;

    pat_fill(seq, 0, buf, size);
    out.data = size ? buf : NULL;
    out.size = size;
    while ((ret = lshm_send(port, &out, flags)) == -EAGAIN) {
        ret = lshm_port_wait(port, LSHM_WAIT_SEND, 10000);
        if (ret < 0)
            return ret;
    }
    return ret;
}

/* A shared-memory message of size bytes (pattern seq), in as many buffers
 * as it takes; waits for room in the queue or for chunks (bounded). */
static int send_shm(struct lshm_port *port, uint32_t seq, size_t size, int fd)
{
    struct lshm_buf *bufs[LSHM_MAX_DESCS];
    struct lshm_out out = { .type = T_DATA, .stream = seq, .fd = fd };
    unsigned n = 0, i;
    size_t have = 0;
    int ret;

    while (have < size) {
        if (n == LSHM_MAX_DESCS) {
            ret = -ENOSPC;
            goto fail;
        }
        ret = lshm_buf_alloc(port, size - have, &bufs[n]);
        if (ret == -EAGAIN) {
            ret = lshm_port_wait(port, LSHM_WAIT_SHM, 10000);
            if (ret < 0)
                goto fail;
            continue;
        }
        if (ret < 0)
            goto fail;
        {
            size_t cap = lshm_buf_capacity(bufs[n]), len = cap < size - have ? cap : size - have;

            pat_fill(seq, have, lshm_buf_data(bufs[n]), len);
            lshm_buf_set_size(bufs[n], len);
            have += len;
            n++;
        }
    }
    out.bufs = bufs;
    out.nbufs = n;
    while ((ret = lshm_send(port, &out, 0)) == -EAGAIN) {
        ret = lshm_port_wait(port, LSHM_WAIT_SEND, 10000);
        if (ret < 0)
            goto fail;
    }
    if (ret == 0)
        return 0;
fail:
    for (i = 0; i < n; i++)
        lshm_buf_free(bufs[i]);
    return ret;
}

static void wait_ready(struct lshm_port *port)
{
    int ret = lshm_port_wait(port, LSHM_WAIT_READY, 10000);

    cr_assert_gt(ret, 0, "handshake: %d %s", ret, lshm_last_error());
}

/* ======================================================================
 * 13. ping-pong, pull style and handler style
 * ====================================================================== */

/* Echo every message back (inline copy) until the peer closes. */
static int echo_pull(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct lshm_msg m;
    int ret;

    for (;;) {
        uint8_t buf[LSHM_INLINE_MAX];
        size_t off = 0;
        unsigned i;

        ret = lshm_recv(port, &m, 20000);
        if (ret == -EPIPE)
            return 0;
        CK(ret == 0);
        CK(m.size <= sizeof(buf));
        for (i = 0; i < m.niov; i++) {
            memcpy(buf + off, m.iov[i].base, m.iov[i].len);
            off += m.iov[i].len;
        }
        if (m.fd >= 0)
            close(m.fd);
        CK(send_inline(port, m.type, m.stream, buf, m.size, -1) == 0);
        lshm_msg_done(&m);
    }
}

struct echo_state {
    int  error;
    bool closed;
};

static void echo_on_msg(struct lshm_port *port, struct lshm_msg *m, void *arg)
{
    struct echo_state *st = arg;
    uint8_t buf[LSHM_INLINE_MAX];
    size_t off = 0;
    unsigned i;

    if (m->size > sizeof(buf)) {
        st->error = 1;
    } else {
        for (i = 0; i < m->niov; i++) {
            memcpy(buf + off, m->iov[i].base, m->iov[i].len);
            off += m->iov[i].len;
        }
        if (send_inline(port, m->type, m->stream, buf, m->size, -1) != 0)
            st->error = 2;
    }
    if (m->fd >= 0)
        close(m->fd);
    lshm_msg_done(m);
}

static void echo_on_close(struct lshm_port *port, int error, void *arg)
{
    struct echo_state *st = arg;

    st->closed = true;
    if (error != -EPIPE)
        st->error = 3;
}

/* The same echo with a handler run by lshm_ctx_run. */
static int echo_handler(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct echo_state st = { 0, false };
    long long end = now_ms() + 30000;

    CK(lshm_port_set_handler(port, echo_on_msg, echo_on_close, &st) == 0);
    while (!st.closed && st.error == 0 && now_ms() < end)
        CK(lshm_ctx_run(ctx, 100) >= 0);
    CK(st.error == 0);
    CK(st.closed);
    return 0;
}

static void pingpong_pull(struct lshm_port *port, unsigned n, size_t size)
{
    struct lshm_msg m;
    unsigned i;
    int ret;

    for (i = 0; i < n; i++) {
        ret = send_pat(port, i, size, 0);
        cr_assert_eq(ret, 0, "send %u: %d %s", i, ret, lshm_last_error());
        ret = lshm_recv(port, &m, 10000);
        cr_assert_eq(ret, 0, "recv %u: %d %s", i, ret, lshm_last_error());
        cr_assert_eq(m.stream, i);
        cr_assert_eq(m.type, T_DATA);
        cr_assert(msg_check(&m, i, size), "echo %u differs", i);
        lshm_msg_done(&m);
    }
}

LTEST(port, pingpong_64B_pull_style_10000)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, echo_pull, NULL);
    long long t0;

    wait_ready(port);
    t0 = now_ms();
    pingpong_pull(port, 10000, 64);
    cr_log_info("pull ping-pong: 10000 round trips of 64 B in %lld ms", now_ms() - t0);
    lshm_port_close(port);
    lshm_ctx_free(ctx);
    child_ok(pid, 10000);
}

struct pp_state {
    unsigned n, next, got;
    int      error;
};

static void pp_on_msg(struct lshm_port *port, struct lshm_msg *m, void *arg)
{
    struct pp_state *st = arg;

    if (m->stream != st->got || !msg_check(m, st->got, 64))
        st->error = 1;
    st->got++;
    lshm_msg_done(m);
    if (st->next < st->n) {
        if (send_pat(port, st->next, 64, 0) != 0)
            st->error = 2;
        st->next++;
    }
}

LTEST(port, pingpong_64B_handler_style_10000)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, echo_handler, NULL);
    struct pp_state st = { .n = 10000 };
    struct lshm_msg m;
    long long t0, end;

    cr_assert_eq(lshm_port_set_handler(port, pp_on_msg, NULL, &st), 0);
    cr_assert_eq(lshm_recv(port, &m, 0), -EBUSY, "lshm_recv with a handler set");
    wait_ready(port);
    t0 = now_ms();
    end = t0 + 30000;
    cr_assert_eq(send_pat(port, st.next++, 64, 0), 0);
    while (st.got < st.n && st.error == 0 && now_ms() < end)
        cr_assert_geq(lshm_ctx_run(ctx, 100), 0, "%s", lshm_last_error());
    cr_assert_eq(st.error, 0);
    cr_assert_eq(st.got, st.n, "%u of %u echoes", st.got, st.n);
    cr_log_info("handler ping-pong: 10000 round trips of 64 B in %lld ms", now_ms() - t0);
    lshm_port_close(port);
    lshm_ctx_free(ctx);
    child_ok(pid, 10000);
}

/* ======================================================================
 * 1. 100,000 messages each way, log-uniform sizes 0 .. 4 MiB, every byte
 *    and the order checked
 * ====================================================================== */

#define BULK_MAX (4u * MiB)

struct pump {
    struct lshm_port *port;
    unsigned          n;
    /* sending */
    uint64_t          tx_rng;
    uint32_t          tx_seq;
    size_t            tx_size;        /* of message tx_seq, once drawn */
    bool              tx_drawn;
    struct lshm_buf  *bufs[LSHM_MAX_DESCS];
    size_t            lens[LSHM_MAX_DESCS];
    unsigned          nbufs;
    uint64_t          grown;          /* buffers grown in place */
    size_t            have;           /* bytes filled in bufs */
    unsigned          want;           /* LSHM_WAIT_SEND / LSHM_WAIT_SHM */
    uint64_t          eagain_send, eagain_shm;
    uint64_t          tx_bytes, tx_shm;
    /* receiving */
    uint64_t          rx_rng;
    uint32_t          rx_seq;
    uint64_t          rx_bytes;
    const char       *fail;
};

/* 1: sent, 0: blocked (p->want says on what), < 0: error. */
static int pump_send_one(struct pump *p)
{
    struct lshm_out out = { .type = T_DATA, .fd = -1 };
    uint8_t inl[LSHM_INLINE_MAX];
    int ret;

    if (!p->tx_drawn) {
        p->tx_size = rng_logsize(&p->tx_rng, BULK_MAX);
        p->tx_drawn = true;
    }
    out.stream = p->tx_seq;
    out.last = p->tx_seq + 1 == p->n;
    if (p->tx_size <= LSHM_INLINE_MAX) {
        pat_fill(p->tx_seq, 0, inl, p->tx_size);
        out.data = p->tx_size ? inl : NULL;
        out.size = p->tx_size;
    } else {
        /* Gather chunks: grow the last buffer first (chunks may have come
         * back after it), then new buffers. */
        while (p->have < p->tx_size) {
            struct lshm_buf *b;
            size_t cap, len;

            if (p->nbufs > 0) {
                /* The last buffer is full: chunks after it may be free now. */
                size_t cur = p->lens[p->nbufs - 1];

                b = p->bufs[p->nbufs - 1];
                if (lshm_buf_grow(b, cur + (p->tx_size - p->have), 0) == 0 &&
                    lshm_buf_capacity(b) > cur) {
                    cap = lshm_buf_capacity(b) - cur;
                    len = cap < p->tx_size - p->have ? cap : p->tx_size - p->have;
                    pat_fill(p->tx_seq, p->have, (uint8_t *)lshm_buf_data(b) + cur, len);
                    lshm_buf_set_size(b, cur + len);
                    p->lens[p->nbufs - 1] = cur + len;
                    p->have += len;
                    p->grown++;
                    continue;
                }
            }
            if (p->nbufs == LSHM_MAX_DESCS)
                return -ENOSPC;
            ret = lshm_buf_alloc(p->port, p->tx_size - p->have, &b);
            if (ret == -EAGAIN) {
                p->eagain_shm++;
                p->want = LSHM_WAIT_SHM;
                return 0;
            }
            if (ret < 0)
                return ret;
            cap = lshm_buf_capacity(b);
            len = cap < p->tx_size - p->have ? cap : p->tx_size - p->have;
            pat_fill(p->tx_seq, p->have, lshm_buf_data(b), len);
            lshm_buf_set_size(b, len);
            p->lens[p->nbufs] = len;
            p->bufs[p->nbufs++] = b;
            p->have += len;
        }
        out.bufs = p->bufs;
        out.nbufs = p->nbufs;
    }
    ret = lshm_send(p->port, &out, 0);
    if (ret == -EAGAIN) {
        p->eagain_send++;
        p->want = LSHM_WAIT_SEND;
        return 0;
    }
    if (ret < 0)
        return ret;
    p->tx_bytes += p->tx_size;
    p->tx_shm += p->nbufs > 0;
    p->nbufs = 0;
    p->have = 0;
    p->tx_drawn = false;
    p->tx_seq++;
    return 1;
}

/* 1: one verified, 0: none waiting, < 0: error. */
static int pump_recv_one(struct pump *p)
{
    struct lshm_msg m;
    size_t size;
    int ret = lshm_recv(p->port, &m, 0);

    if (ret == -ETIMEDOUT || ret == -EAGAIN)
        return 0;
    if (ret < 0)
        return ret;
    size = rng_logsize(&p->rx_rng, BULK_MAX);
    if (m.stream != p->rx_seq) {
        p->fail = "out of order";
        fprintf(stderr, "pid %d: got stream %u, expected %u\n", getpid(), m.stream, p->rx_seq);
    } else if (m.type != T_DATA || m.fd != -1) {
        p->fail = "wrong type or an fd";
    } else if (!!(m.flags & LSHM_MSG_SHM) != (size > LSHM_INLINE_MAX)) {
        p->fail = "inline/shared memory flag wrong";
    } else if (!!(m.flags & LSHM_MSG_LAST) != (p->rx_seq + 1 == p->n)) {
        p->fail = "LAST flag wrong";
    } else if (!msg_check(&m, p->rx_seq, size)) {
        p->fail = "payload differs";
        fprintf(stderr, "pid %d: message %u: size %zu, expected %zu\n", getpid(), m.stream,
                m.size, size);
    }
    lshm_msg_done(&m);
    if (p->fail != NULL)
        return -EBADMSG;
    p->rx_bytes += size;
    p->rx_seq++;
    return 1;
}

/* Send n and receive n at once, never blocking on one while the other waits. */
static int pump_run(struct pump *p, long long deadline)
{
    int ret;

    while (p->tx_seq < p->n || p->rx_seq < p->n) {
        bool progress = false;
        unsigned k;

        p->want = 0;
        for (k = 0; k < 64 && p->tx_seq < p->n; k++) {
            ret = pump_send_one(p);
            if (ret < 0)
                return ret;
            if (ret == 0)
                break;
            progress = true;
        }
        for (k = 0; k < 256; k++) {
            ret = pump_recv_one(p);
            if (ret < 0)
                return ret;
            if (ret == 0)
                break;
            progress = true;
        }
        if (now_ms() > deadline)
            return -ETIMEDOUT;
        if (!progress) {
            unsigned ev = LSHM_WAIT_RECV | (p->tx_seq < p->n ? p->want : 0);

            ret = lshm_port_wait(p->port, ev, 1000);
            if (ret < 0 && ret != -ETIMEDOUT)
                return ret;
        }
    }
    /* Everything sent went out before the port may close. */
    ret = lshm_port_wait(p->port, LSHM_WAIT_IDLE, 10000);
    return ret < 0 ? ret : 0;
}

struct bulk_arg {
    unsigned n;
    uint64_t seed_down, seed_up;   /* parent -> child, child -> parent */
};

static int bulk_child(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct bulk_arg *a = arg;
    struct pump p = { .port = port, .n = a->n, .tx_rng = a->seed_up, .rx_rng = a->seed_down };
    int ret = pump_run(&p, now_ms() + 55000);

    if (ret < 0)
        fprintf(stderr, "child: pump: %d (%s) %s; sent %u received %u\n", ret,
                p.fail ? p.fail : "", lshm_last_error(), p.tx_seq, p.rx_seq);
    CK(ret == 0);
    /* Wait for the parent's BYE so that nothing it still sends is lost. */
    {
        struct lshm_msg m;

        CK(lshm_recv(port, &m, 20000) == -EPIPE);
    }
    return 0;
}

LTEST(port, bulk_100000_each_way_random_sizes_to_4MiB_verified)
{
    struct bulk_arg a = {
        .n = scaled(100000, 10), .seed_down = 0x1234567887654321ull,
        .seed_up = 0x0fedcba987654321ull,
    };
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, bulk_child, &a);
    struct pump p = { .port = port, .n = a.n, .tx_rng = a.seed_down, .rx_rng = a.seed_up };
    long long t0 = now_ms();
    int ret;

    wait_ready(port);
    ret = pump_run(&p, t0 + 55000);
    cr_assert_eq(ret, 0, "pump: %d (%s) %s; sent %u received %u", ret, p.fail ? p.fail : "",
                 lshm_last_error(), p.tx_seq, p.rx_seq);
    cr_log_info("bulk: %u messages each way in %lld ms; parent sent %.2f GB (%llu in shm), "
                "received %.2f GB; EAGAIN: send %llu, shm %llu; grown %llu",
                a.n, now_ms() - t0, p.tx_bytes / 1e9, (unsigned long long)p.tx_shm,
                p.rx_bytes / 1e9, (unsigned long long)p.eagain_send,
                (unsigned long long)p.eagain_shm, (unsigned long long)p.grown);
    lshm_port_close(port);
    lshm_ctx_free(ctx);
    child_ok(pid, 20000);
}
