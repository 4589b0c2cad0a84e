/*
 * The transport end to end: real fork(), real sockets, real io_uring.
 * Bulk traffic of every size each way, fd passing, batching into one
 * submit, back-pressure (send queue and shared memory), tracking, a peer
 * killed mid-stream, listeners, the version handshake, context basics and
 * the ping-pong in both the pull and the handler style.
 */
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
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

#include "linuxshm.h"
#include "port.h"
#include "port_util.h"
#include "wire.h"

#define KiB 1024u
#define MiB (1024u * 1024u)

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

    /* Whole words where the offset allows, bytes for the rest (and to
     * find the first wrong byte of a word that differs). */
    if (((off) & 7) == 0)
        for (; i + 8 <= len; i += 8) {
            uint64_t w = pat_word(seq, (off + i) / 8), got;

            memcpy(&got, p + i, 8);
            if (got != w)
                break;
        }
    for (; i < len; i++) {
        uint64_t w = pat_word(seq, (off + i) / 8);

        if (p[i] != (uint8_t)(w >> (8 * ((off + i) & 7))))
            return off + i;
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

/* ---- sending ---- */

/* Inline message whose payload is pattern (seq, 0 .. size). */
static int send_pat(struct lshm_port *port, uint32_t seq, size_t size, unsigned flags)
{
    uint8_t buf[LSHM_INLINE_MAX];
    struct lshm_out out = { .type = T_DATA, .stream = seq, .fd = -1 };

    pat_fill(seq, 0, buf, size);
    out.data = size ? buf : NULL;
    out.size = size;
    return send_out(port, &out, flags);
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
    ret = send_out(port, &out, 0);
    if (ret == 0)
        return 0;
fail:
    for (i = 0; i < n; i++)
        lshm_buf_free(bufs[i]);
    return ret;
}

/* Inline up to LSHM_INLINE_MAX bytes, in shared memory beyond. */
static int send_any(struct lshm_port *port, uint32_t seq, size_t size)
{
    return size > LSHM_INLINE_MAX ? send_shm(port, seq, size, -1) : send_pat(port, seq, size, 0);
}

/* Fill the buffer b with pattern seq (size bytes) and send it as message seq. */
static int send_buf(struct lshm_port *port, struct lshm_buf *b, uint32_t seq, size_t size)
{
    int ret;

    pat_fill(seq, 0, lshm_buf_data(b), size);
    ret = lshm_buf_set_size(b, size);
    if (ret < 0)
        return ret;
    return lshm_send(port, &(struct lshm_out){ .type = T_DATA, .stream = seq, .bufs = &b,
                                               .nbufs = 1, .fd = -1 }, 0);
}

/* The peer's T_CTRL answer: its stream (what the peer counted). */
static uint32_t recv_ctrl(struct lshm_port *port, int timeout_ms)
{
    struct lshm_msg m;
    uint32_t stream;
    int ret = lshm_recv(port, &m, timeout_ms);

    cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    cr_assert_eq(m.type, T_CTRL);
    stream = m.stream;
    lshm_msg_done(&m);
    return stream;
}

/* In a child: wait for the parent's BYE (the port then closes with -EPIPE). */
static int wait_bye(struct lshm_port *port)
{
    struct lshm_msg m;

    CK(lshm_recv(port, &m, 20000) == -EPIPE);
    return 0;
}

/* In a child: report value in an empty T_CTRL (recv_ctrl), then wait_bye. */
static int report_then_bye(struct lshm_port *port, uint32_t value)
{
    CK(send_inline(port, T_CTRL, value, NULL, 0, -1) == 0);
    return wait_bye(port);
}

/* ======================================================================
 * 13. ping-pong, pull style and handler style
 * ====================================================================== */

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

/* One round trip through an echo child: message seq of size bytes
 * (inline, or in shared memory when shm), and its echo checked. */
static void echo_roundtrip(struct lshm_port *port, uint32_t seq, size_t size, bool shm)
{
    struct lshm_msg m;
    int ret;

    ret = shm ? send_shm(port, seq, size, -1) : send_pat(port, seq, size, 0);
    cr_assert_eq(ret, 0, "send %u: %d %s", seq, ret, lshm_last_error());
    ret = lshm_recv(port, &m, 10000);
    cr_assert_eq(ret, 0, "recv %u: %d %s", seq, ret, lshm_last_error());
    cr_assert_eq(m.stream, seq);
    cr_assert_eq(m.type, T_DATA);
    cr_assert(msg_check(&m, seq, size), "echo %u differs", seq);
    lshm_msg_done(&m);
}

static void pingpong_pull(struct lshm_port *port, unsigned n, size_t size)
{
    unsigned i;

    for (i = 0; i < n; i++)
        echo_roundtrip(port, i, size, false);
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
    spawn_end(ctx, port, pid);
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
    spawn_end(ctx, port, pid);
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
        for (k = 0; k < 256 && p->rx_seq < p->n; k++) {
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
            unsigned ev = (p->rx_seq < p->n ? LSHM_WAIT_RECV : 0) |
                          (p->tx_seq < p->n ? p->want : 0);

            ret = lshm_port_wait(p->port, ev, 1000);
            if (ret < 0 && ret != -ETIMEDOUT)
                return ret;
        }
    }
    /* Everything sent went out before the port may close.  The parent
     * closes only once it has all of ours, so its BYE may come first. */
    ret = lshm_port_wait(p->port, LSHM_WAIT_IDLE, 10000);
    return ret < 0 && ret != -EPIPE ? ret : 0;
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
    CK(wait_bye(port) == 0);
    CK(strstr(lshm_port_error(port), "BYE") != NULL);
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
    uint8_t probe[1000];
    int ret;

    /* The checker itself: a flipped byte is found, another seq differs. */
    pat_fill(5, 16384, probe, sizeof(probe));
    cr_assert_eq(pat_check(5, 16384, probe, sizeof(probe)), (size_t)-1);
    cr_assert_eq(pat_check(6, 16384, probe, sizeof(probe)), 16384);
    probe[777] ^= 1;
    cr_assert_eq(pat_check(5, 16384, probe, sizeof(probe)), 16384 + 777);

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

/* ======================================================================
 * 12. lshm_recv(..., 0) polls: a message that has arrived is returned
 *     without a wait, and never needs some other call to run the ring
 * ====================================================================== */

static int send_one_then_wait_bye(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    CK(send_pat(port, 7, 100, 0) == 0);
    return wait_bye(port);
}

LTEST(port, recv_with_zero_timeout_returns_an_arrived_message)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, send_one_then_wait_bye, NULL);
    struct lshm_msg m;
    int ret = -1, i;

    wait_ready(port);
    usleep(200 * 1000);   /* the message is in our socket by now */
    for (i = 0; i < 10 && (ret = lshm_recv(port, &m, 0)) != 0; i++)
        usleep(10 * 1000);
    cr_expect_eq(ret, 0, "lshm_recv(port, &m, 0) never returned the waiting message: %d", ret);
    if (ret != 0)
        ret = lshm_recv(port, &m, 5000);
    cr_assert_eq(ret, 0);
    cr_assert_eq(m.stream, 7);
    cr_assert(msg_check(&m, 7, 100));
    lshm_msg_done(&m);
    spawn_end(ctx, port, pid);
}

/* ======================================================================
 * 2. fds passed with messages are usable, in message order
 * ====================================================================== */

#define NFDMSG 300

/* Each message carries a pipe's write end: write its stream id through it. */
static int fd_writer(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct lshm_msg m;
    uint32_t i;

    for (i = 0; i < NFDMSG; i++) {
        CK(lshm_recv(port, &m, 10000) == 0);
        CK(m.stream == i);
        CK(m.fd >= 0);
        CK((fcntl(m.fd, F_GETFD) & FD_CLOEXEC) != 0);
        CK(msg_check(&m, i, (i % 3 == 0) ? 40000 + i : i));
        CK(write(m.fd, &i, sizeof(i)) == sizeof(i));
        close(m.fd);
        m.fd = -1;
        lshm_msg_done(&m);
    }
    /* And the other way: pipe write ends for the parent, in order. */
    for (i = 0; i < NFDMSG; i++) {
        int p[2];

        CK(pipe(p) == 0);
        CK(write(p[1], &i, sizeof(i)) == sizeof(i));
        close(p[1]);
        if (i % 3 == 0)
            CK(send_shm(port, i, 40000 + i, p[0]) == 0);
        else {
            uint8_t buf[LSHM_INLINE_MAX];
            pat_fill(i, 0, buf, i);
            CK(send_inline(port, T_DATA, i, buf, i, p[0]) == 0);
        }
    }
    return wait_bye(port);
}

LTEST(port, fds_passed_with_messages_are_usable_and_in_order)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, fd_writer, NULL);
    int rd[NFDMSG];
    struct lshm_msg m;
    uint32_t i, v;
    int ret, fd;

    wait_ready(port);
    /* Inline and shared-memory messages alike carry one fd each. */
    for (i = 0; i < NFDMSG; i++) {
        int p[2];

        cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
        rd[i] = p[0];
        if (i % 3 == 0)
            ret = send_shm(port, i, 40000 + i, p[1]);
        else {
            uint8_t buf[LSHM_INLINE_MAX];
            pat_fill(i, 0, buf, i);
            ret = send_inline(port, T_DATA, i, buf, i, p[1]);
        }
        cr_assert_eq(ret, 0, "send %u: %d %s", i, ret, lshm_last_error());
    }
    for (i = 0; i < NFDMSG; i++) {
        struct pollfd pfd = { .fd = rd[i], .events = POLLIN };

        cr_assert_eq(poll(&pfd, 1, 10000), 1, "pipe %u: nothing written", i);
        cr_assert_eq(read(rd[i], &v, sizeof(v)), (ssize_t)sizeof(v));
        cr_assert_eq(v, i, "message %u's fd was pipe %u's", v, i);
        /* The writer closed its copy, and the library closed ours after sending. */
        cr_assert_eq(read(rd[i], &v, sizeof(v)), 0, "write end %u still open somewhere", i);
        close(rd[i]);
    }
    for (i = 0; i < NFDMSG; i++) {
        ret = lshm_recv(port, &m, 10000);
        cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
        cr_assert_eq(m.stream, i);
        cr_assert_geq(m.fd, 0);
        cr_assert(msg_check(&m, i, (i % 3 == 0) ? 40000 + i : i));
        /* The fd is the caller's: lshm_msg_done does not close it. */
        fd = m.fd;
        lshm_msg_done(&m);
        cr_assert_eq(read(fd, &v, sizeof(v)), (ssize_t)sizeof(v),
                     "the fd of message %u was closed by lshm_msg_done", i);
        cr_assert_eq(v, i, "fd of message %u carries %u", i, v);
        close(fd);
    }
    spawn_end(ctx, port, pid);
}

/* ======================================================================
 * 3. one io_uring_enter for a batch of 1,000 messages
 * ====================================================================== */

static int recv_n_then_report(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    unsigned n = *(unsigned *)arg, i;
    struct lshm_msg m;

    for (i = 0; i < n; i++) {
        CK(lshm_recv(port, &m, 10000) == 0);
        CK(m.stream == i);
        CK(msg_check(&m, i, i % 200));
        lshm_msg_done(&m);
    }
    return report_then_bye(port, n);
}

LTEST(port, batch_of_1000_with_LSHM_MORE_is_one_submit)
{
    struct lshm_ctx_params prm = { .ring_entries = 1024 };
    struct lshm_ctx *ctx = ctx_make(&prm);
    unsigned n = 1000, i;
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, recv_n_then_report, &n);
    struct lshm_ctx_stats s0, s1, s2;
    int ret;

    wait_ready(port);
    cr_assert_gt(lshm_port_wait(port, LSHM_WAIT_IDLE, 5000), 0);
    cr_assert_eq(lshm_ctx_stats(ctx, &s0), 0);
    for (i = 0; i < n; i++) {
        ret = send_pat(port, i, i % 200, LSHM_MORE);
        cr_assert_eq(ret, 0, "send %u: %d %s", i, ret, lshm_last_error());
    }
    cr_assert_eq(lshm_ctx_stats(ctx, &s1), 0);
    cr_assert_eq(s1.enters, s0.enters, "LSHM_MORE entered the kernel %llu times",
                 (unsigned long long)(s1.enters - s0.enters));
    ret = lshm_flush(ctx);
    cr_assert_geq(ret, 1000, "lshm_flush submitted %d", ret);
    cr_assert_eq(lshm_ctx_stats(ctx, &s2), 0);
    cr_log_info("batch: 1000 messages: %llu enters, %llu SQEs",
                (unsigned long long)(s2.enters - s0.enters),
                (unsigned long long)(s2.submitted - s0.submitted));
    cr_assert_leq(s2.enters - s0.enters, 2, "%llu io_uring_enter calls for one batch",
                  (unsigned long long)(s2.enters - s0.enters));
    cr_assert_geq(s2.submitted - s0.submitted, 1000);
    cr_assert_eq(recv_ctrl(port, 10000), n);
    spawn_end(ctx, port, pid);
}

/* ======================================================================
 * 4. a receiver that stops reading: the bounded queue pushes back, then
 *    everything arrives once, in order
 * ====================================================================== */

/* Sleep without running the ring, then read to the LAST message. */
static int slow_reader(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    unsigned sleep_ms = *(unsigned *)arg;
    struct lshm_msg m;
    uint32_t i = 0;
    bool last = false;

    CK(lshm_port_wait(port, LSHM_WAIT_READY, 10000) > 0);
    usleep(sleep_ms * 1000);
    while (!last) {
        CK(lshm_recv(port, &m, 10000) == 0);
        if (m.stream != i)
            fprintf(stderr, "slow reader: got %u, expected %u\n", m.stream, i);
        CK(m.stream == i);
        CK(msg_check(&m, i, m.size));
        CK(m.size == 8 + i % 1000);
        last = (m.flags & LSHM_MSG_LAST) != 0;
        lshm_msg_done(&m);
        i++;
    }
    return report_then_bye(port, i);
}

/* Message seq of the stream slow_reader checks (pattern seq, 8 + seq % 1000
 * bytes) into out and buf; LAST when it is the total-th (total 0: not yet
 * known, never LAST). */
static void slow_msg(struct lshm_out *out, uint8_t *buf, uint32_t seq, uint32_t total)
{
    out->stream = seq;
    out->size = 8 + seq % 1000;
    out->last = seq + 1 == total;
    pat_fill(seq, 0, buf, out->size);
}

LTEST(port, stalled_receiver_send_queue_bound_then_all_in_order)
{
    struct lshm_ctx_params prm = { .send_queue = 64 };
    struct lshm_ctx *ctx = ctx_make(&prm);
    unsigned sleep_ms = 1000;
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, slow_reader, &sleep_ms);
    uint8_t buf[LSHM_INLINE_MAX];
    struct lshm_out out = { .type = T_DATA, .fd = -1, .data = buf };
    uint32_t seq = 0, total, got;
    long long t0;
    int ret;

    wait_ready(port);
    t0 = now_ms();
    for (;;) {
        slow_msg(&out, buf, seq, 0);
        ret = lshm_send(port, &out, 0);
        if (ret == -EAGAIN)
            break;
        cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
        seq++;
        cr_assert_lt(now_ms() - t0, 900, "no -EAGAIN after %u messages", seq);
    }
    cr_assert_str_neq(lshm_last_error(), "");
    cr_log_info("stalled receiver: -EAGAIN after %u messages in %lld ms (%s)", seq,
                now_ms() - t0, lshm_last_error());
    /* Still refused while the receiver sleeps: the bound holds. */
    ret = lshm_port_wait(port, LSHM_WAIT_SEND, 100);
    cr_assert_eq(ret, -ETIMEDOUT, "room appeared while the receiver sleeps: %d", ret);
    cr_assert_eq(lshm_send(port, &out, 0), -EAGAIN);
    total = seq + 5000;
    while (seq < total) {
        slow_msg(&out, buf, seq, total);
        ret = lshm_send(port, &out, 0);
        if (ret == -EAGAIN) {
            ret = lshm_port_wait(port, LSHM_WAIT_SEND, 10000);
            cr_assert_gt(ret, 0, "%d %s", ret, lshm_last_error());
            continue;
        }
        cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
        seq++;
    }
    got = recv_ctrl(port, 20000);
    cr_assert_eq(got, total, "receiver counted %u of %u", got, total);
    spawn_end(ctx, port, pid);
}

/* ======================================================================
 * 5. FIFO through a full socket: batches of varying length, linked
 * ====================================================================== */

LTEST(port, fifo_kept_when_socket_is_full)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    unsigned sleep_ms = 500;
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, slow_reader, &sleep_ms);
    uint8_t buf[LSHM_INLINE_MAX];
    struct lshm_out out = { .type = T_DATA, .fd = -1, .data = buf };
    uint64_t rng = 99, eagain = 0;
    uint32_t seq = 0, total = scaled(40000, 4), got;
    long long t0;
    int ret;

    wait_ready(port);
    t0 = now_ms();
    while (seq < total) {
        unsigned batch = 1 + (unsigned)rng_below(&rng, 100), k;

        for (k = 0; k < batch && seq < total; k++) {
            slow_msg(&out, buf, seq, total);
            ret = lshm_send(port, &out, k + 1 < batch ? LSHM_MORE : 0);
            if (ret == -EAGAIN) {
                if (now_ms() - t0 < sleep_ms)
                    eagain++;
                lshm_flush(ctx);
                ret = lshm_port_wait(port, LSHM_WAIT_SEND, 10000);
                cr_assert_gt(ret, 0, "%d %s", ret, lshm_last_error());
                continue;
            }
            cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
            seq++;
        }
        /* Sometimes let the ring run between batches too. */
        if (rng_below(&rng, 4) == 0)
            lshm_ctx_run(ctx, 0);
    }
    cr_assert_gt(eagain, 0, "the send queue never filled while the receiver slept");
    got = recv_ctrl(port, 20000);
    cr_assert_eq(got, total, "receiver counted %u of %u in order", got, total);
    spawn_end(ctx, port, pid);
}

/* ======================================================================
 * 6. out of chunks: -EAGAIN at the segment limit, then SHM_ACK wakes the
 *    sender; a receiver holding every chunk cannot make it map more
 * ====================================================================== */

#define HOLD_SIZE MiB            /* 64 chunks: ten fill a segment */

/* Receive and hold shared-memory messages until the inline "release". */
static int hold_then_release(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct lshm_msg held[64], m;
    unsigned n = 0, i;

    for (;;) {
        CK(lshm_recv(port, &m, 20000) == 0);
        if (m.type == T_CTRL) {
            lshm_msg_done(&m);
            break;
        }
        CK(n < 64);
        CK(m.stream == n);
        CK(m.flags & LSHM_MSG_SHM);
        CK(msg_check(&m, n, HOLD_SIZE));
        held[n++] = m;
    }
    /* Everything is still held here: the sender must be out of chunks. */
    for (i = 0; i < n; i++)
        lshm_msg_done(&held[i]);
    CK(lshm_port_wait(port, LSHM_WAIT_IDLE, 10000) > 0);   /* the SHM_ACK went out */
    /* The next shared-memory message, in the memory just given back. */
    CK(lshm_recv(port, &m, 20000) == 0);
    CK(m.stream == 1000);
    CK(msg_check(&m, 1000, HOLD_SIZE));
    lshm_msg_done(&m);
    return report_then_bye(port, n);
}

/* Send HOLD_SIZE shared-memory messages (stream and pattern 0, 1, ...)
 * until allocation says -EAGAIN, never more than one segment's worth (10).
 * Returns how many went out; *hdr, when hdr is not NULL, is their segment. */
static unsigned send_held_until_eagain(struct lshm_port *port,
                                       struct lshm_segment_header **hdr)
{
    struct lshm_buf *b;
    unsigned sent = 0;
    int ret;

    for (;;) {
        ret = lshm_buf_alloc(port, HOLD_SIZE, &b);
        if (ret == -EAGAIN)
            return sent;
        cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
        cr_assert_eq(lshm_buf_capacity(b), HOLD_SIZE);
        if (hdr != NULL)
            *hdr = b->seg->hdr;
        cr_assert_eq(send_buf(port, b, sent, HOLD_SIZE), 0, "%s", lshm_last_error());
        sent++;
        cr_assert_leq(sent, 10, "more than one segment's worth of chunks handed out");
    }
}

LTEST(port, out_of_chunks_eagain_then_shm_ack_wakes_sender)
{
    struct lshm_ctx_params prm = { .max_segments = 1 };
    struct lshm_ctx *ctx = ctx_make(&prm);
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, hold_then_release, NULL);
    int maps0 = count_maps("memfd:"), ret, i;
    struct lshm_segment_header *hdr = NULL;
    struct lshm_buf *b;
    unsigned sent;
    long long t0;

    wait_ready(port);
    sent = send_held_until_eagain(port, &hdr);
    cr_assert_eq(sent, 10, "%u MiB before -EAGAIN, expected 10", sent);
    cr_assert_str_neq(lshm_last_error(), "");
    cr_assert_eq(count_maps("memfd:"), maps0 + 1, "one segment mapped for the peer");
    /* Let the receiver take (and hold) all ten. */
    cr_assert_gt(lshm_port_wait(port, LSHM_WAIT_IDLE, 10000), 0);
    usleep(100 * 1000);
    for (i = 0; i < 200; i++) {
        cr_assert_eq(lshm_buf_alloc(port, 1, &b), -EAGAIN);
        if (i % 50 == 0)
            lshm_ctx_run(ctx, 1);
    }
    cr_assert_eq(count_maps("memfd:"), maps0 + 1, "the limit of one segment was exceeded");
    cr_assert_eq(__atomic_load_n(&hdr->oosm, __ATOMIC_ACQUIRE), 1, "oosm not set");
    ret = lshm_port_wait(port, LSHM_WAIT_SHM, 50);
    cr_assert_eq(ret, -ETIMEDOUT, "chunks came back while all are held: %d", ret);

    cr_assert_eq(send_inline(port, T_CTRL, 0, NULL, 0, -1), 0);
    t0 = now_ms();
    ret = lshm_port_wait(port, LSHM_WAIT_SHM, 10000);
    cr_assert_gt(ret, 0, "%d %s", ret, lshm_last_error());
    cr_assert(ret & LSHM_WAIT_SHM);
    cr_log_info("out of chunks: woken %lld ms after the release", now_ms() - t0);
    /* The receiver took oosm (1 -> 0): that is what sends SHM_ACK. */
    cr_assert_eq(__atomic_load_n(&hdr->oosm, __ATOMIC_ACQUIRE), 0, "oosm still set");
    cr_assert_eq(send_shm(port, 1000, HOLD_SIZE, -1), 0, "%s", lshm_last_error());
    cr_assert_eq(count_maps("memfd:"), maps0 + 1);
    cr_assert_eq(recv_ctrl(port, 10000), 10);
    spawn_end(ctx, port, pid);
}

/* ======================================================================
 * 7. tracking: cancelled before receipt (flagged, or dropped), cancelled
 *    after receipt (not cancelled); no slot or chunk leaks
 * ====================================================================== */

#define TRACK_ROUNDS 2000
#define MARK 0x80000000u

/*
 * Round r: we say on the idle pipe that we run no ring until told; the
 * parent sends a tracked message (stream r + 1), then an untracked marker,
 * and says on the go pipe whether it cancelled before we read ('c') or
 * wants us to read first ('r').  Between the two pipes we run no ring, so
 * nothing is received early: the reply of the round before may still be
 * in io_uring_enter when the parent reads it, hence the idle byte.
 */
struct track_arg {
    int  go;        /* read end of the parent's go pipe */
    int  idle;      /* write end of our idle pipe */
    bool dropping;  /* our context has LSHM_CTX_DROP_CANCELLED */
};

static int track_child(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct track_arg *a = arg;
    struct lshm_msg m;
    unsigned r;
    char c;

    for (r = 0; r < TRACK_ROUNDS; r++) {
        uint32_t s = r + 1;
        size_t size = (r % 2 == 0) ? 64 : 3 * LSHM_CHUNK_SIZE + r;

        CK(write(a->idle, "i", 1) == 1);
        CK(read(a->go, &c, 1) == 1);
        CK(lshm_recv(port, &m, 10000) == 0);
        if (c == 'c' && a->dropping) {
            CK(m.stream == (s | MARK));     /* the cancelled message was dropped */
        } else {
            CK(m.stream == s);
            CK(!!(m.flags & LSHM_MSG_CANCELLED) == (c == 'c'));
            CK(msg_check(&m, s, size));
            lshm_msg_done(&m);
            CK(lshm_recv(port, &m, 10000) == 0);
            CK(m.stream == (s | MARK));
        }
        lshm_msg_done(&m);
        CK(send_inline(port, T_CTRL, s, NULL, 0, -1) == 0);
    }
    return wait_bye(port);
}

static void tracking_rounds(bool dropping)
{
    struct lshm_ctx_params prm = { .max_segments = 1 };
    struct lshm_ctx_params cprm = { .flags = dropping ? LSHM_CTX_DROP_CANCELLED : 0 };
    struct lshm_ctx *ctx = ctx_make(&prm);
    struct lshm_port *port;
    struct track_arg a;
    int go[2], idle[2], ret;
    unsigned r, before = 0, after = 0;
    struct lshm_msg m;
    pid_t pid;

    cr_assert_eq(pipe(go), 0);
    cr_assert_eq(pipe(idle), 0);
    a.go = go[0];
    a.idle = idle[1];
    a.dropping = dropping;
    pid = spawn(ctx, &cprm, &port, track_child, &a);
    close(go[0]);
    close(idle[1]);
    wait_ready(port);
    for (r = 0; r < TRACK_ROUNDS; r++) {
        uint32_t s = r + 1;
        bool cancel_first = (r % 4) < 2;   /* both payload kinds in both cases */
        size_t size = (r % 2 == 0) ? 64 : 3 * LSHM_CHUNK_SIZE + r;
        struct lshm_tracking *t;
        struct lshm_out out = { .type = T_DATA, .stream = s, .fd = -1 };
        struct lshm_buf *b = NULL;
        uint8_t buf[64];
        char i;

        cr_assert_eq(read(idle[0], &i, 1), 1, "round %u: the child is gone", r);
        ret = lshm_tracking_new(port, s, &t);
        cr_assert_eq(ret, 0, "round %u: lshm_tracking_new: %d %s (slot leak?)", r, ret,
                     lshm_last_error());
        out.tracking = t;
        if (size <= sizeof(buf)) {
            pat_fill(s, 0, buf, size);
            out.data = buf;
            out.size = size;
        } else {
            ret = lshm_buf_alloc(port, size, &b);
            cr_assert_eq(ret, 0, "round %u: lshm_buf_alloc: %d %s (chunk leak?)", r, ret,
                         lshm_last_error());
            cr_assert_geq(lshm_buf_capacity(b), size);
            pat_fill(s, 0, lshm_buf_data(b), size);
            lshm_buf_set_size(b, size);
            out.bufs = &b;
            out.nbufs = 1;
        }
        cr_assert_eq(lshm_send(port, &out, 0), 0, "%s", lshm_last_error());
        cr_assert_eq(send_inline(port, T_DATA, s | MARK, NULL, 0, -1), 0);
        if (cancel_first) {
            cr_assert(lshm_tracking_cancel(t), "round %u: not cancelled before receipt", r);
            before++;
            cr_assert_eq(write(go[1], "c", 1), 1);
        } else {
            cr_assert_eq(write(go[1], "r", 1), 1);
        }
        ret = lshm_recv(port, &m, 10000);
        cr_assert_eq(ret, 0, "round %u: %d %s", r, ret, lshm_last_error());
        cr_assert_eq(m.type, T_CTRL);
        cr_assert_eq(m.stream, s);
        lshm_msg_done(&m);
        if (!cancel_first) {
            cr_assert_not(lshm_tracking_cancel(t), "round %u: cancelled after receipt", r);
            after++;
        }
    }
    cr_assert_eq(before + after, TRACK_ROUNDS);
    cr_assert_not(lshm_tracking_cancel(NULL));
    close(go[1]);
    close(idle[0]);
    spawn_end(ctx, port, pid);
}

LTEST(port, tracking_cancel_before_and_after_receipt_no_slot_leak)
{
    tracking_rounds(false);
}

LTEST(port, tracking_cancelled_messages_dropped_with_DROP_CANCELLED)
{
    tracking_rounds(true);
}

/* ======================================================================
 * 8. a peer killed with SIGKILL mid-stream, 20 times: the survivor sees
 *    the port close and gets back every fd and mapping
 * ====================================================================== */

/* Stream inline and shared-memory messages until killed. */
static int streamer(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct lshm_msg m;
    uint32_t seq;

    /* One shared-memory message from the parent first: a segment each way. */
    CK(lshm_recv(port, &m, 10000) == 0);
    CK(msg_check(&m, 4242, 100000));
    lshm_msg_done(&m);
    for (seq = 0;; seq++) {
        if (seq % 2)
            CK(send_shm(port, seq, 20000 + seq % 100000, -1) == 0);
        else
            CK(send_pat(port, seq, seq % 2000, 0) == 0);
        /* Keep chunks flowing back (SHM_ACK or the recheck timer). */
        if (lshm_recv(port, &m, 0) == 0)
            lshm_msg_done(&m);
    }
}

static void killed_peers(const struct lshm_ctx_params *prm, unsigned rounds)
{
    struct lshm_ctx *ctx = ctx_make(prm);
    int fds0 = count_fds(), maps0 = count_maps("memfd:");
    unsigned it;

    for (it = 0; it < rounds; it++) {
        struct lshm_port *port;
        pid_t pid = spawn(ctx, NULL, &port, streamer, NULL);
        struct lshm_msg held[2], m;
        unsigned nheld = 0, got = 0, i;
        uint32_t seq = 0;
        int ret, st;

        wait_ready(port);
        cr_assert_eq(send_shm(port, 4242, 100000, -1), 0, "%s", lshm_last_error());
        /* Read a while, keeping the first two shared-memory messages. */
        while (got < 40 + it * 5) {
            ret = lshm_recv(port, &m, 10000);
            cr_assert_eq(ret, 0, "iteration %u: %d %s", it, ret, lshm_last_error());
            cr_assert_eq(m.stream, seq++);
            if ((m.flags & LSHM_MSG_SHM) && nheld < 2)
                held[nheld++] = m;
            else
                lshm_msg_done(&m);
            got++;
        }
        cr_assert_eq(kill(pid, SIGKILL), 0);
        cr_assert_eq(waitpid(pid, &st, 0), pid);
        cr_assert(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL,
                  "iteration %u: the streamer ended before it was killed", it);
        /* What was queued still arrives, in order; then the closure. */
        for (;;) {
            ret = lshm_recv(port, &m, 10000);
            if (ret != 0)
                break;
            cr_assert_eq(m.stream, seq++);
            lshm_msg_done(&m);
        }
        cr_assert(ret == -EPIPE || ret == -ECONNRESET,
                  "iteration %u: after the kill lshm_recv gave %d %s", it, ret,
                  lshm_last_error());
        cr_assert_not_null(lshm_port_error(port));
        cr_assert_lt(lshm_send(port, &(struct lshm_out){ .type = T_DATA, .fd = -1 }, 0), 0);
        /* The dead peer's memory is still readable through what we hold. */
        for (i = 0; i < nheld; i++) {
            cr_assert(msg_check(&held[i], held[i].stream, held[i].size),
                      "held message %u changed after the peer died", held[i].stream);
            lshm_msg_done(&held[i]);
        }
        lshm_port_close(port);
        for (i = 0; i < 5; i++)
            lshm_ctx_run(ctx, 10);
        cr_assert_eq(count_fds(), fds0, "iteration %u: %d fds, %d before", it, count_fds(),
                     fds0);
        cr_assert_eq(count_maps("memfd:"), maps0, "iteration %u: %d memfd mappings, %d before",
                     it, count_maps("memfd:"), maps0);
    }
    lshm_ctx_free(ctx);
}

LTEST(port, peer_sigkilled_midstream_20_times_nothing_leaks)
{
    killed_peers(NULL, 20);
}

/* The same with single-shot receives (EOF comes as a 0 result there). */
LTEST(port, peer_sigkilled_midstream_single_shot_receives_nothing_leaks)
{
    struct lshm_ctx_params prm = { .flags = LSHM_CTX_NO_MULTISHOT };

    killed_peers(&prm, 10);
}

/* ======================================================================
 * 9. listeners: two clients at once, the socket's mode, stale and live
 *    socket files
 * ====================================================================== */

struct client_arg {
    const char *path;
    unsigned    id;
    unsigned    n;
};

/* Connect and stream n messages (inline and shm, pattern keyed by id),
 * a window of 8 unanswered; check each echo (inline, size and seq). */
static int client(struct lshm_ctx *ctx, struct lshm_port *unused, void *arg)
{
    struct client_arg *a = arg;
    struct lshm_port *port;
    struct lshm_msg m;
    uint32_t sent = 0, got = 0;
    uint64_t rng = a->id * 77 + 1;
    int ret;

    ret = lshm_connect(ctx, a->path, 10000, &port);
    CK(ret == 0);
    while (got < a->n) {
        while (sent < a->n && sent - got < 8) {
            uint32_t seq = a->id << 24 | sent;
            size_t size = (sent % 2) ? 16385 + rng_below(&rng, 600000) : rng_below(&rng, 16385);

            CK(send_any(port, seq, size) == 0);
            sent++;
        }
        CK(lshm_recv(port, &m, 10000) == 0);
        CK(m.stream == (a->id << 24 | got));
        CK(m.type == T_CTRL);
        CK(m.size == 0);
        lshm_msg_done(&m);
        got++;
    }
    lshm_port_close(port);
    return 0;
}

static int run_client(struct client_arg *a)
{
    struct lshm_ctx *ctx;
    int rc;

    if (lshm_ctx_new(&ctx, NULL) < 0)
        return 90;
    rc = client(ctx, NULL, a);
    lshm_ctx_free(ctx);
    return rc;
}

/* A server acknowledging every message it checked with an empty T_CTRL of
 * its stream (the listener's ports, and the two ports of the child below). */
struct server {
    unsigned open, closed, msgs;
    int      error;
};

static void srv_on_msg(struct lshm_port *port, struct lshm_msg *m, void *arg)
{
    struct server *s = arg;
    uint32_t seq = m->stream;

    if (!msg_check(m, seq, m->size))
        s->error = 1;
    lshm_msg_done(m);
    if (send_inline(port, T_CTRL, seq, NULL, 0, -1) != 0)
        s->error = 2;
    s->msgs++;
}

static void srv_on_close(struct lshm_port *port, int error, void *arg)
{
    struct server *s = arg;

    if (error != -EPIPE) {
        fprintf(stderr, "pid %d: port closed: %d %s\n", getpid(), error,
                lshm_port_error(port));
        s->error = 3;
    }
    s->closed++;
    lshm_port_close(port);
}

static void srv_on_accept(struct lshm_listener *l, struct lshm_port *port, void *arg)
{
    struct server *s = arg;

    s->open++;
    if (lshm_port_set_handler(port, srv_on_msg, srv_on_close, s) != 0)
        s->error = 4;
}

static char *tmp_dir(void)
{
    char *d = strdup("/tmp/lshm-test-XXXXXX");

    cr_assert_not_null(mkdtemp(d));
    return d;
}

/* A socket of type bound to dir/name (its path into path[128]), listening
 * if asked; its fd.  Closed unlistened, it leaves a stale socket file. */
static int bound_socket(char *path, const char *dir, const char *name, int type, bool listening)
{
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    int fd;

    snprintf(path, 128, "%s/%s", dir, name);
    strcpy(sun.sun_path, path);
    fd = socket(AF_UNIX, type, 0);
    cr_assert_eq(bind(fd, (struct sockaddr *)&sun, sizeof(sun)), 0);
    if (listening)
        cr_assert_eq(listen(fd, 4), 0);
    return fd;
}

LTEST(port, listener_serves_two_clients_at_once)
{
    char *dir = tmp_dir(), path[128];
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_listener *l;
    struct server srv = { 0 };
    struct client_arg a[2];
    pid_t pid[2];
    struct stat st;
    long long end;
    int i, ret;

    snprintf(path, sizeof(path), "%s/sock", dir);
    ret = lshm_listen(ctx, path, 0, &l);
    cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    cr_assert_eq(stat(path, &st), 0);
    cr_assert(S_ISSOCK(st.st_mode));
    cr_assert_eq(st.st_mode & 07777, 0600, "socket mode %o", st.st_mode & 07777);
    cr_assert_eq(lshm_listener_set_handler(l, srv_on_accept, &srv), 0);
    for (i = 0; i < 2; i++) {
        a[i] = (struct client_arg){ .path = path, .id = i + 1, .n = 1000 };
        pid[i] = fork();
        cr_assert_geq(pid[i], 0);
        if (pid[i] == 0) {
            lshm_ctx_free(ctx);
            _exit(run_client(&a[i]));
        }
    }
    end = now_ms() + 30000;
    while (srv.closed < 2 && srv.error == 0 && now_ms() < end)
        cr_assert_geq(lshm_ctx_run(ctx, 100), 0);
    cr_assert_eq(srv.error, 0);
    cr_assert_eq(srv.open, 2);
    cr_assert_eq(srv.closed, 2);
    cr_assert_eq(srv.msgs, 2000);
    child_ok(pid[0], 10000);
    child_ok(pid[1], 10000);
    lshm_listener_close(l);
    cr_assert_neq(access(path, F_OK), 0, "lshm_listener_close left the socket file");
    lshm_ctx_free(ctx);
    rmdir(dir);
    free(dir);
}

LTEST(port, listen_replaces_stale_socket_refuses_live_one)
{
    char *dir = tmp_dir(), path[128], file[128];
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_listener *l, *l2 = NULL;
    struct lshm_port *p;
    struct stat st;
    int fd, ret;

    /* A stale socket file: bound, never listened on, its socket closed. */
    close(bound_socket(path, dir, "sock", SOCK_SEQPACKET, false));
    cr_assert_eq(stat(path, &st), 0);
    ret = lshm_listen(ctx, path, 0640, &l);
    cr_assert_eq(ret, 0, "stale socket not replaced: %d %s", ret, lshm_last_error());
    cr_assert_eq(stat(path, &st), 0);
    cr_assert_eq(st.st_mode & 07777, 0640, "socket mode %o", st.st_mode & 07777);
    /* A live one is refused. */
    ret = lshm_listen(ctx, path, 0, &l2);
    cr_assert_eq(ret, -EADDRINUSE, "%d %s", ret, lshm_last_error());
    cr_assert_null(l2);
    cr_assert_eq(access(path, F_OK), 0, "the live server's socket file was removed");
    /* A live server of another socket type is not "stale" either. */
    {
        char spath[128];
        struct lshm_listener *l3 = NULL;
        int sfd = bound_socket(spath, dir, "stream", SOCK_STREAM, true);

        ret = lshm_listen(ctx, spath, 0, &l3);
        cr_expect_eq(ret, -EADDRINUSE, "a live SOCK_STREAM server's socket was replaced: "
                     "%d %s", ret, lshm_last_error());
        if (ret == 0)
            lshm_listener_close(l3);
        close(sfd);
        unlink(spath);
    }
    /* Something that is not a socket is never replaced. */
    snprintf(file, sizeof(file), "%s/file", dir);
    fd = open(file, O_CREAT | O_WRONLY, 0600);
    close(fd);
    cr_assert_eq(lshm_listen(ctx, file, 0, &l2), -EEXIST);
    unlink(file);
    /* The liveness probe connected to the live listener: that connection
     * ends at once and must not be a usable port (it reports closure). */
    if (lshm_accept(l, &p, 200) == 0) {
        struct lshm_msg m;

        cr_log_info("lshm_listen's liveness probe shows up as an accepted connection");
        ret = lshm_recv(p, &m, 2000);
        cr_assert_lt(ret, 0);
        lshm_port_close(p);
    }
    lshm_listener_close(l);
    lshm_ctx_free(ctx);
    rmdir(dir);
    free(dir);
}

/* ======================================================================
 * 10. a HELLO with another protocol version is refused, saying so
 * ====================================================================== */

LTEST(port, hello_version_2_refused_on_adopted_port)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    uint8_t buf[64];
    int peer = raw_peer(ctx, &port), ret;

    raw_sendv(peer, buf, raw_hello_build(buf, getpid(), 2), NULL, 0);
    ret = lshm_port_wait(port, LSHM_WAIT_READY, 5000);
    cr_assert_eq(ret, -EPROTONOSUPPORT, "%d %s", ret, lshm_last_error());
    cr_assert_not_null(lshm_port_error(port));
    cr_assert(strstr(lshm_port_error(port), "version") != NULL, "reason: %s",
              lshm_port_error(port));
    cr_assert(strstr(lshm_last_error(), "version") != NULL, "%s", lshm_last_error());
    cr_log_info("version 2: %s", lshm_port_error(port));
    lshm_port_close(port);
    close(peer);
    lshm_ctx_free(ctx);
}

LTEST(port, hello_version_2_refused_by_lshm_connect)
{
    char *dir = tmp_dir(), path[128];
    struct lshm_ctx *ctx;
    struct lshm_port *port = NULL;
    int lfd = bound_socket(path, dir, "sock", SOCK_SEQPACKET, true), ret, one = 1;
    pid_t pid;

    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        /* A raw server that speaks version 2. */
        uint8_t buf[LSHM_WIRE_MAX];
        int c = accept(lfd, NULL, NULL);

        if (c < 0 || setsockopt(c, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)) < 0)
            _exit(1);
        if (send(c, buf, raw_hello_build(buf, getpid(), 2), MSG_NOSIGNAL) < 0)
            _exit(2);
        /* Wait for the client to hang up. */
        while (recv(c, buf, sizeof(buf), 0) > 0)
            ;
        _exit(0);
    }
    close(lfd);
    ctx = ctx_make(NULL);
    ret = lshm_connect(ctx, path, 5000, &port);
    cr_assert_eq(ret, -EPROTONOSUPPORT, "%d %s", ret, lshm_last_error());
    cr_assert(strstr(lshm_last_error(), "version") != NULL, "%s", lshm_last_error());
    cr_log_info("lshm_connect to a version 2 server: %s", lshm_last_error());
    lshm_ctx_free(ctx);
    child_ok(pid, 5000);
    unlink(path);
    rmdir(dir);
    free(dir);
}

/* ======================================================================
 * 12. context basics
 * ====================================================================== */

LTEST(port, ctx_new_rejects_bad_params)
{
    static const struct lshm_ctx_params bad[] = {
        { .ring_entries = 3 },
        { .ring_entries = 4 },
        { .ring_entries = 8192 },
        { .ring_entries = 1000 },
        { .max_segments = 1025 },
        { .send_queue = 65537 },
        { .recv_queue = 65537 },
        { .handshake_ms = 3600001 },
        { .flags = 1u << 20 },
        { .reserved = { [0] = 1 } },
        { .reserved = { [9] = 1 } },
    };
    struct lshm_ctx *ctx = NULL;
    unsigned i;

    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int ret = lshm_ctx_new(&ctx, &bad[i]);

        cr_expect_eq(ret, -EINVAL, "params %u accepted: %d", i, ret);
        if (ret == 0)
            lshm_ctx_free(ctx);
        else
            cr_expect_str_neq(lshm_last_error(), "", "params %u: no reason given", i);
    }
    cr_assert_eq(lshm_ctx_new(NULL, NULL), -EINVAL);
    cr_assert_eq(lshm_ctx_stats(NULL, NULL), -EINVAL);
    cr_assert_eq(lshm_ctx_fd(NULL), -EINVAL);
    /* The edges are accepted. */
    {
        struct lshm_ctx_params ok = { .ring_entries = 8, .max_segments = 1024,
                                      .send_queue = 65536, .recv_queue = 65536 };

        cr_assert_eq(lshm_ctx_new(&ctx, &ok), 0, "%s", lshm_last_error());
        lshm_ctx_free(ctx);
    }
}

static int wait_go_send_one(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct lshm_msg m;

    CK(lshm_recv(port, &m, 10000) == 0);
    lshm_msg_done(&m);
    usleep(100 * 1000);
    CK(send_pat(port, 5, 300, 0) == 0);
    return wait_bye(port);
}

static void ctx_fd_polls(const struct lshm_ctx_params *prm)
{
    struct lshm_ctx *ctx = ctx_make(prm);
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, wait_go_send_one, NULL);
    struct pollfd pfd = { .fd = lshm_ctx_fd(ctx), .events = POLLIN };
    struct lshm_msg m;
    int ret, n = 0;
    long long end;

    cr_assert_geq(pfd.fd, 0);
    wait_ready(port);
    cr_assert_eq(send_inline(port, T_CTRL, 0, NULL, 0, -1), 0);
    cr_assert_gt(lshm_port_wait(port, LSHM_WAIT_IDLE, 5000), 0);
    /* Only poll(2) from here on: the fd alone must say a message came. */
    end = now_ms() + 5000;
    for (;;) {
        ret = poll(&pfd, 1, 5000);
        cr_assert_eq(ret, 1, "lshm_ctx_fd never polled readable (%d)", ret);
        cr_assert(pfd.revents & POLLIN);
        n++;
        ret = lshm_recv(port, &m, 0);
        if (ret == 0)
            break;
        cr_assert_eq(ret, -ETIMEDOUT, "%d %s", ret, lshm_last_error());
        cr_assert_lt(now_ms(), end, "readable %d times, no message", n);
    }
    /* The message is sent 100 ms after "go": poll must wake for it then,
     * not at the end of its timeout. */
    cr_assert_lt(now_ms() - (end - 5000), 2000, "poll woke only after %lld ms",
                 now_ms() - (end - 5000));
    cr_assert_eq(m.stream, 5);
    cr_assert(msg_check(&m, 5, 300));
    lshm_msg_done(&m);
    spawn_end(ctx, port, pid);
}

LTEST(port, ctx_fd_polls_readable_when_a_message_arrived)
{
    ctx_fd_polls(NULL);
}

LTEST(port, ctx_fd_polls_readable_without_multishot_or_defer_taskrun)
{
    struct lshm_ctx_params prm = { .flags = LSHM_CTX_NO_MULTISHOT |
                                            LSHM_CTX_NO_DEFER_TASKRUN };

    require_io_uring(prm.flags);
    ctx_fd_polls(&prm);
}

/* Ping-pong of 1,000 (inline and shm) on contexts forced onto fallbacks. */
static void fallback_pingpong(unsigned flags)
{
    struct lshm_ctx_params prm = { .flags = flags };
    struct lshm_ctx *ctx;
    unsigned f, i;
    struct lshm_port *port;
    pid_t pid;

    require_io_uring(flags);
    ctx = ctx_make(&prm);
    f = lshm_ctx_features(ctx);
    pid = spawn(ctx, &prm, &port, echo_pull, NULL);

    if (flags & LSHM_CTX_NO_MULTISHOT)
        cr_assert_eq(f & (LSHM_FEAT_MULTISHOT_RECV | LSHM_FEAT_BUF_RING), 0, "features %#x", f);
    if (flags & LSHM_CTX_NO_DEFER_TASKRUN)
        cr_assert_eq(f & LSHM_FEAT_DEFER_TASKRUN, 0, "features %#x", f);
    wait_ready(port);
    for (i = 0; i < 1000; i++) {
        size_t size = (i % 4 == 3) ? 5000 + i : i % 700;

        /* The echo copies inline: shared-memory payloads stay <= 16 KiB. */
        echo_roundtrip(port, i, size, size > 4096);
    }
    spawn_end(ctx, port, pid);
}

LTEST(port, features_default_context_uses_multishot_and_defer_taskrun)
{
    struct lshm_ctx *ctx;
    unsigned f;

    require_io_uring(0);
    ctx = ctx_make(NULL);
    f = lshm_ctx_features(ctx);

    /* This kernel (6.x) has both; an older one would fall back. */
    cr_log_info("default features %#x", f);
    cr_expect(f & LSHM_FEAT_MULTISHOT_RECV, "features %#x", f);
    cr_expect(f & LSHM_FEAT_DEFER_TASKRUN, "features %#x", f);
    cr_expect(f & LSHM_FEAT_SINGLE_ISSUER, "features %#x", f);
    lshm_ctx_free(ctx);
}

LTEST(port, pingpong_without_multishot_falls_back)
{
    fallback_pingpong(LSHM_CTX_NO_MULTISHOT);
}

LTEST(port, pingpong_without_defer_taskrun_falls_back)
{
    fallback_pingpong(LSHM_CTX_NO_DEFER_TASKRUN);
}

LTEST(port, pingpong_without_either_falls_back)
{
    fallback_pingpong(LSHM_CTX_NO_MULTISHOT | LSHM_CTX_NO_DEFER_TASKRUN);
}

/* ======================================================================
 * Two threads, each with its own context and a port to the same child:
 * the peer tables (segments, sent_over, the bitmaps) are shared by both
 * ====================================================================== */

#define THR_MSGS 1500

struct thr_arg {
    int          sock;
    unsigned     id;
    int          error;
    char         why[160];
    _Atomic int *started;   /* set by thread 1 once segment 0 is mapped */
};

#define TCK(c)                                                                     \
    do {                                                                           \
        if (!(c)) {                                                                \
            snprintf(a->why, sizeof(a->why), "%s:%d: %s (%s)", __FILE__, __LINE__, \
                     #c, lshm_last_error());                                       \
            a->error = __LINE__;                                                   \
            goto out;                                                              \
        }                                                                          \
    } while (0)

/*
 * Stream THR_MSGS (every other one in shared memory), a window of 4, each
 * acknowledged by the child after it checked every byte.  Thread 2 starts
 * once the child mapped segment 0 (made by thread 1's port), and no more
 * than ~2 MiB is ever in flight, so segment 0 is the only one: see
 * two_ports_create_segments_for_one_peer for what happens otherwise.
 */
static void *thr_main(void *arg)
{
    struct thr_arg *a = arg;
    struct lshm_ctx *ctx = NULL;
    struct lshm_port *port = NULL;
    uint64_t rng = 1000 + a->id;
    uint32_t sent = 0, acked = 0;
    struct lshm_msg m;

    TCK(lshm_ctx_new(&ctx, NULL) == 0);
    TCK(lshm_port_adopt(ctx, a->sock, &port) == 0);
    a->sock = -1;
    TCK(lshm_port_wait(port, LSHM_WAIT_READY, 10000) > 0);
    while (a->id != 1 && !atomic_load(a->started))
        usleep(1000);
    while (acked < THR_MSGS) {
        while (sent < THR_MSGS && sent - acked < (acked ? 4u : 1u)) {
            uint32_t seq = a->id << 24 | sent;
            size_t size = (sent % 2 || sent == 0) ? 16385 + rng_below(&rng, 240 * KiB)
                                                 : rng_below(&rng, 3000);

            TCK(send_any(port, seq, size) == 0);
            sent++;
        }
        TCK(lshm_recv(port, &m, 10000) == 0);
        TCK(m.type == T_CTRL);
        TCK(m.stream == (a->id << 24 | acked));
        lshm_msg_done(&m);
        acked++;
        if (a->id == 1)
            atomic_store(a->started, 1);
    }
out:
    if (a->id == 1)
        atomic_store(a->started, 1);
    if (port != NULL)
        lshm_port_close(port);
    lshm_ctx_free(ctx);
    if (a->sock >= 0)
        close(a->sock);
    return NULL;
}

/* A child's work on its ends of two socketpairs. */
typedef int (*two_fn)(int s0, int s1, unsigned arg);

/* Two socketpairs, and a child running fn on one end of each (ctx, when not
 * NULL, freed there first); mine[] are the parent's ends. */
static pid_t fork_two(struct lshm_ctx *ctx, int mine[2], two_fn fn, unsigned arg)
{
    int sv[2][2], i;
    pid_t pid;

    for (i = 0; i < 2; i++)
        cr_assert_eq(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv[i]), 0);
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        if (ctx != NULL)
            lshm_ctx_free(ctx);
        close(sv[0][0]);
        close(sv[1][0]);
        _exit(fn(sv[0][1], sv[1][1], arg));
    }
    close(sv[0][1]);
    close(sv[1][1]);
    mine[0] = sv[0][0];
    mine[1] = sv[1][0];
    return pid;
}

/* fork_two, with ports A and B of ctx on the parent's ends, handshakes done. */
static pid_t spawn_two(struct lshm_ctx *ctx, struct lshm_port **pa, struct lshm_port **pb,
                       two_fn fn, unsigned arg)
{
    int mine[2];
    pid_t pid = fork_two(ctx, mine, fn, arg);

    cr_assert_eq(lshm_port_adopt(ctx, mine[0], pa), 0);
    cr_assert_eq(lshm_port_adopt(ctx, mine[1], pb), 0);
    wait_ready(*pa);
    wait_ready(*pb);
    return pid;
}

/* The end of a spawn_two. */
static void spawn_two_end(struct lshm_ctx *ctx, struct lshm_port *pa, struct lshm_port *pb,
                          pid_t pid)
{
    lshm_port_close(pa);
    lshm_port_close(pb);
    lshm_ctx_free(ctx);
    child_ok(pid, 10000);
}

/* One message (any) on port within 5 s, expected; what names the port. */
static void expect_msg(struct lshm_port *port, const char *what)
{
    struct lshm_msg m;
    int ret = lshm_recv(port, &m, 5000);

    cr_expect_eq(ret, 0, "%s: %d %s", what, ret, lshm_port_error(port));
    if (ret == 0)
        lshm_msg_done(&m);
}

/* The child: one context, both ports, handlers. */
static int two_port_server(int s0, int s1, unsigned per_port)
{
    struct server srv = { 0 };
    struct lshm_ctx *ctx;
    struct lshm_port *p0, *p1;
    long long end = now_ms() + 40000;

    CK(lshm_ctx_new(&ctx, NULL) == 0);
    CK(lshm_port_adopt(ctx, s0, &p0) == 0);
    CK(lshm_port_adopt(ctx, s1, &p1) == 0);
    CK(lshm_port_set_handler(p0, srv_on_msg, srv_on_close, &srv) == 0);
    CK(lshm_port_set_handler(p1, srv_on_msg, srv_on_close, &srv) == 0);
    while (srv.closed < 2 && srv.error == 0 && now_ms() < end)
        CK(lshm_ctx_run(ctx, 100) >= 0);
    CK(srv.error == 0);
    CK(srv.closed == 2);
    CK(srv.msgs == 2 * per_port);
    lshm_ctx_free(ctx);
    return 0;
}

LTEST(port, two_threads_two_contexts_share_one_peer)
{
    int sv[2], i;
    struct thr_arg a[2];
    pthread_t th[2];
    _Atomic int started = 0;
    pid_t pid = fork_two(NULL, sv, two_port_server, THR_MSGS);

    for (i = 0; i < 2; i++) {
        a[i] = (struct thr_arg){ .sock = sv[i], .id = i + 1, .started = &started };
        cr_assert_eq(pthread_create(&th[i], NULL, thr_main, &a[i]), 0);
    }
    for (i = 0; i < 2; i++) {
        pthread_join(th[i], NULL);
        cr_expect_eq(a[i].error, 0, "thread %d: %s", i, a[i].why);
    }
    child_ok(pid, 20000);
}

/*
 * Two ports of one context to the same process, each needing a segment:
 * port A's MMAP(0) is queued behind a buffer not yet sent, then port B
 * wants memory and sends first.  Segment ids belong to the pair of
 * processes and the receiver wants them in order, but two sockets keep no
 * order between them.  Whatever the library does about it (the receiver
 * accepting ids out of order, or port B waiting for segment 0 to be
 * mapped), port B must get its memory within a bounded wait, and both
 * messages must arrive without a protocol violation.
 */
LTEST(port, two_ports_create_segments_for_one_peer)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *pa, *pb;
    pid_t pid = spawn_two(ctx, &pa, &pb, two_port_server, 1);
    struct lshm_buf *ba, *bb;
    unsigned spurious = 0;
    long long end;
    int ret;

    cr_assert_eq(lshm_buf_alloc(pa, 100, &ba), 0);       /* segment 0, for port A */
    end = now_ms() + 3000;
    while ((ret = lshm_buf_alloc(pb, 100, &bb)) == -EAGAIN && now_ms() < end) {
        int w = lshm_port_wait(pb, LSHM_WAIT_SHM, 100);

        spurious += w > 0;
    }
    if (spurious)
        cr_log_info("port B: %u LSHM_WAIT_SHM wake-ups with allocation still failing",
                    spurious);
    cr_assert_eq(ret, 0, "port B gets no shared memory while port A holds an unsent "
                 "buffer: %d %s", ret, lshm_last_error());
    cr_assert_eq(send_buf(pb, bb, 2 << 24, 100), 0);
    cr_assert_gt(lshm_port_wait(pb, LSHM_WAIT_IDLE, 5000), 0);
    usleep(50 * 1000);
    cr_assert_eq(send_buf(pa, ba, 1 << 24, 100), 0);
    expect_msg(pb, "port B");
    expect_msg(pa, "port A");
    spawn_two_end(ctx, pa, pb, pid);
}

/*
 * Port A closed by the child while we stream tracked messages in shared
 * memory on it; port B keeps the pair of processes, and so the segment,
 * alive.  Whatever was in flight when A closed (read by the child, left in
 * its socket, queued or parked on our side) must give back its chunk and
 * its tracking slot: with one segment, a leak would show in its maps.
 */
#define MIDCLOSE_WINDOW 64      /* trackings we keep before cancelling */

static int close_midstream_child(int s0, int s1, unsigned nread)
{
    struct lshm_ctx *ctx;
    struct lshm_port *a, *b;
    struct lshm_msg m;
    unsigned i;

    CK(lshm_ctx_new(&ctx, NULL) == 0);
    CK(lshm_port_adopt(ctx, s0, &a) == 0);
    CK(lshm_port_adopt(ctx, s1, &b) == 0);
    for (i = 0; i < nread; i++) {
        CK(lshm_recv(a, &m, 10000) == 0);
        CK(m.type == T_DATA && m.stream == i + 1);
        lshm_msg_done(&m);
    }
    lshm_port_close(a);
    /* Waiting here runs the context: A's close completes meanwhile. */
    do {
        CK(lshm_recv(b, &m, 20000) == 0);
        i = m.type;
        lshm_msg_done(&m);
    } while (i != T_CTRL);
    lshm_port_close(b);
    lshm_ctx_free(ctx);
    return 0;
}

/* Free chunks and free tracking slots of a segment. */
static void seg_free_counts(const struct lshm_segment_header *hdr, unsigned *chunks,
                            unsigned *slots)
{
    unsigned c;

    *chunks = *slots = 0;
    for (c = 0; c < LSHM_CHUNK_COUNT; c++) {
        *chunks += lshm__chunk_is_free(hdr->free_map, c);
        *slots += lshm__chunk_is_free(hdr->free_tracking_map, c);
    }
}

LTEST(port, peer_closing_midstream_leaks_no_chunk_or_tracking_slot)
{
    struct lshm_ctx_params prm = { .max_segments = 1, .send_queue = 256 };
    struct lshm_ctx *ctx = ctx_make(&prm);
    struct lshm_tracking *win[MIDCLOSE_WINDOW] = { NULL };
    struct lshm_segment_header *hdr = NULL;
    struct lshm_port *pa, *pb;
    unsigned sent = 0, cancelled = 0, chunks = 0, slots = 0, i;
    int ret = 0;
    long long end;
    pid_t pid = spawn_two(ctx, &pa, &pb, close_midstream_child, 50);

    for (;;) {
        uint32_t s = sent + 1;
        struct lshm_tracking **t = &win[sent % MIDCLOSE_WINDOW];
        struct lshm_out out = { .type = T_DATA, .stream = s, .fd = -1 };
        struct lshm_buf *b;

        cr_assert_lt(sent, 1000000, "the child never closed port A");
        if (*t != NULL) {
            cancelled += lshm_tracking_cancel(*t);
            *t = NULL;
        }
        ret = lshm_buf_alloc(pa, 1000 + sent % 15000, &b);
        if (ret == -EAGAIN) {
            ret = lshm_port_wait(pa, LSHM_WAIT_SHM, 100);
            if (ret < 0 && ret != -ETIMEDOUT)
                break;
            continue;
        }
        if (ret < 0)
            break;
        if (hdr == NULL)
            hdr = b->seg->hdr;
        lshm_buf_set_size(b, 1000 + sent % 15000);
        ret = lshm_tracking_new(pa, s, t);
        if (ret < 0) {
            lshm_buf_free(b);
            break;
        }
        out.tracking = *t;
        out.bufs = &b;
        out.nbufs = 1;
        ret = send_out(pa, &out, 0);
        if (ret < 0) {
            lshm_buf_free(b);
            cancelled += lshm_tracking_cancel(*t);
            *t = NULL;
            break;
        }
        sent++;
    }
    cr_assert(ret == -EPIPE, "port A ended with %d (%s), not the child's close", ret,
              lshm_last_error());
    cr_assert_gt(sent, 50, "only %u sent before the close", sent);
    cr_assert_not_null(hdr);
    for (i = 0; i < MIDCLOSE_WINDOW; i++)
        cancelled += lshm_tracking_cancel(win[i]);
    lshm_port_close(pa);
    /* The child gives chunks back as it reads what was left; allow it time. */
    end = now_ms() + 5000;
    do {
        lshm_ctx_run(ctx, 10);
        seg_free_counts(hdr, &chunks, &slots);
    } while ((chunks < LSHM_CHUNK_COUNT || slots < LSHM_CHUNK_COUNT) && now_ms() < end);
    cr_log_info("closed mid-stream: %u sent, %u cancelled before receipt; free %u chunks, "
                "%u slots of %u", sent, cancelled, chunks, slots, LSHM_CHUNK_COUNT);
    cr_assert_eq(chunks, LSHM_CHUNK_COUNT, "%u chunks lost", LSHM_CHUNK_COUNT - chunks);
    cr_assert_eq(slots, LSHM_CHUNK_COUNT, "%u tracking slots lost", LSHM_CHUNK_COUNT - slots);
    /* The pair and its segment are still good for port B. */
    cr_assert_eq(send_shm(pb, 1, 3 * LSHM_CHUNK_SIZE, -1), 0, "%s", lshm_last_error());
    cr_assert_eq(send_inline(pb, T_CTRL, 0, NULL, 0, -1), 0);
    lshm_port_close(pb);
    lshm_ctx_free(ctx);
    child_ok(pid, 10000);
}

/*
 * A client closes its only port and connects again at once, while the
 * server has not read the old port to its end (it holds recv_queue
 * messages).  The client's old port still reads after its BYE, but for the
 * new-pair rule it is gone on both sides: the server sees it hung up, and
 * the client must not keep the old pair for the new port either, or its
 * next segment id would not be the 0 the server expects.
 */
#define RECONNECT_OLD 180     /* more than recv_queue + the ring's 128 buffers */

static int close_then_reconnect(const char *path)
{
    struct lshm_ctx *ctx;
    struct lshm_port *a, *b;
    struct lshm_msg m;
    unsigned i;

    CK(lshm_ctx_new(&ctx, NULL) == 0);
    CK(lshm_connect(ctx, path, 10000, &a) == 0);
    for (i = 0; i < RECONNECT_OLD; i++)
        CK(send_shm(a, i, 20000 + i, -1) == 0);
    CK(lshm_port_wait(a, LSHM_WAIT_IDLE, 10000) > 0);
    lshm_port_close(a);
    CK(lshm_connect(ctx, path, 10000, &b) == 0);
    CK(send_shm(b, 100, 30000, -1) == 0);
    CK(lshm_recv(b, &m, 20000) == 0);       /* the server has checked it all */
    CK(m.type == T_CTRL);
    lshm_msg_done(&m);
    lshm_port_close(b);
    lshm_ctx_free(ctx);
    return 0;
}

LTEST(port, reconnect_while_the_old_port_drains_starts_a_new_pair_on_both_sides)
{
    struct lshm_ctx_params prm = { .recv_queue = 16 };
    struct lshm_ctx *ctx = ctx_make(&prm);
    char *dir = tmp_dir(), path[128];
    struct lshm_listener *l;
    struct lshm_port *pa, *pb;
    struct lshm_msg m;
    unsigned i;
    pid_t pid;
    int ret;

    snprintf(path, sizeof(path), "%s/sock", dir);
    cr_assert_eq(lshm_listen(ctx, path, 0, &l), 0, "%s", lshm_last_error());
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        lshm_ctx_free(ctx);
        _exit(close_then_reconnect(path));
    }
    cr_assert_eq(lshm_accept(l, &pa, 10000), 0, "%s", lshm_last_error());
    /* We do not read port A: it stops at recv_queue, its BYE unread. */
    cr_assert_eq(lshm_accept(l, &pb, 10000), 0, "%s", lshm_last_error());
    ret = lshm_recv(pb, &m, 10000);
    cr_assert_eq(ret, 0, "new port: %d %s", ret, lshm_port_error(pb));
    cr_assert(msg_check(&m, 100, 30000), "new port: payload damaged");
    lshm_msg_done(&m);
    for (i = 0; i < RECONNECT_OLD; i++) {
        ret = lshm_recv(pa, &m, 10000);
        cr_assert_eq(ret, 0, "old port, message %u: %d %s", i, ret, lshm_port_error(pa));
        cr_assert(msg_check(&m, i, 20000 + i), "old port: message %u damaged", i);
        lshm_msg_done(&m);
    }
    cr_assert_eq(lshm_recv(pa, &m, 10000), -EPIPE, "%s", lshm_port_error(pa));
    cr_assert_eq(send_inline(pb, T_CTRL, 1, NULL, 0, -1), 0);
    child_ok(pid, 10000);
    lshm_port_close(pa);
    lshm_port_close(pb);
    lshm_listener_close(l);
    lshm_ctx_free(ctx);
    rmdir(dir);
    free(dir);
}

/* ======================================================================
 * More lifetime and limit behaviour
 * ====================================================================== */

/* Run the ring without taking messages: reading must stop at recv_queue
 * (plus what a multishot receive had already taken), then resume. */
static int lazy_reader(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    unsigned total = *(unsigned *)arg, i, max_held = 0;
    long long end;
    struct lshm_msg m;

    CK(lshm_port_wait(port, LSHM_WAIT_READY, 10000) > 0);
    end = now_ms() + 500;
    while (now_ms() < end) {
        CK(lshm_ctx_run(ctx, 10) >= 0);
        if (port->held > max_held)
            max_held = port->held;
    }
    fprintf(stderr, "lazy reader: %u held at most (recv_queue 16)\n", max_held);
    CK(max_held >= 16);
    CK(max_held <= 16 + 128);   /* at most the context's provided buffers more */
    for (i = 0; i < total; i++) {
        CK(lshm_recv(port, &m, 10000) == 0);
        CK(m.stream == i);
        CK(msg_check(&m, i, 100 + i % 300));
        lshm_msg_done(&m);
    }
    return report_then_bye(port, max_held);
}

static void recv_queue_bound(unsigned flags)
{
    struct lshm_ctx_params sprm = { .send_queue = 64 };
    struct lshm_ctx_params rprm = { .recv_queue = 16, .flags = flags };
    struct lshm_ctx *ctx = ctx_make(&sprm);
    unsigned total = 3000, i, eagain = 0, held;
    struct lshm_port *port;
    pid_t pid = spawn(ctx, &rprm, &port, lazy_reader, &total);
    long long t0;
    int ret;

    wait_ready(port);
    t0 = now_ms();
    for (i = 0; i < total; i++) {
        uint8_t buf[400];
        struct lshm_out out = { .type = T_DATA, .stream = i, .data = buf,
                                .size = 100 + i % 300, .fd = -1 };

        pat_fill(i, 0, buf, out.size);
        while ((ret = lshm_send(port, &out, 0)) == -EAGAIN) {
            if (now_ms() - t0 < 400)
                eagain++;
            cr_assert_gt(lshm_port_wait(port, LSHM_WAIT_SEND, 10000), 0);
        }
        cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    }
    cr_assert_gt(eagain, 0, "the reader's bound never pushed back on the sender");
    held = recv_ctrl(port, 10000);
    cr_log_info("recv_queue 16: reader held at most %u", held);
    spawn_end(ctx, port, pid);
}

LTEST(port, recv_queue_bound_stops_reading_then_resumes)
{
    recv_queue_bound(0);
}

LTEST(port, recv_queue_bound_single_shot_receives)
{
    recv_queue_bound(LSHM_CTX_NO_MULTISHOT);
}

/* Read n messages in order, then the close, which must be an orderly BYE. */
static int read_all_then_bye(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    unsigned n = *(unsigned *)arg, i;
    struct lshm_msg m;

    for (i = 0; i < n; i++) {
        int ret = lshm_recv(port, &m, 10000);

        if (ret != 0)
            fprintf(stderr, "reader: message %u of %u: %d %s\n", i, n, ret,
                    lshm_port_error(port));
        CK(ret == 0);
        CK(m.stream == i);
        CK(msg_check(&m, i, m.size));
        lshm_msg_done(&m);
    }
    CK(lshm_recv(port, &m, 10000) == -EPIPE);
    CK(strstr(lshm_port_error(port), "BYE") != NULL);
    return 0;
}

/* A child that reads 1000 messages then the BYE, and the 1000 queued for
 * it (the inline ones with LSHM_MORE: nothing has waited for them). */
static pid_t spawn_queued(struct lshm_ctx *ctx, struct lshm_port **port)
{
    unsigned n = 1000, i;
    pid_t pid = spawn(ctx, NULL, port, read_all_then_bye, &n);

    wait_ready(*port);
    for (i = 0; i < n; i++)
        cr_assert_eq(i % 7 == 3 ? send_shm(*port, i, 20000 + i, -1)
                                : send_pat(*port, i, i % 500, LSHM_MORE), 0);
    return pid;
}

LTEST(port, ctx_free_sends_what_is_queued_then_bye)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    pid_t pid = spawn_queued(ctx, &port);

    lshm_ctx_free(ctx);     /* nothing waited for: the free must send it all */
    child_ok(pid, 10000);
}

LTEST(port, port_close_sends_what_is_queued_then_bye)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    pid_t pid = spawn_queued(ctx, &port);
    long long end;
    int st = -1;

    lshm_port_close(port);
    end = now_ms() + 10000;
    while (now_ms() < end && waitpid(pid, &st, WNOHANG) == 0)
        lshm_ctx_run(ctx, 10);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "reader: %#x", st);
    lshm_ctx_free(ctx);
}

/* Shared-memory messages held across lshm_port_close and lshm_ctx_free
 * stay readable and are released by lshm_msg_done. */
static int send_some_shm(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct lshm_msg m;
    uint32_t i;

    CK(lshm_port_wait(port, LSHM_WAIT_READY, 10000) > 0);
    for (i = 0; i < 4; i++)
        CK(send_shm(port, i, 50000 + i, -1) == 0);
    /* Wait until the parent is gone. */
    while (lshm_recv(port, &m, 10000) == 0)
        lshm_msg_done(&m);
    return 0;
}

static void held_after_close(bool free_ctx)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, send_some_shm, NULL);
    struct lshm_msg m[4];
    unsigned i;

    wait_ready(port);
    for (i = 0; i < 4; i++) {
        cr_assert_eq(lshm_recv(port, &m[i], 10000), 0);
        cr_assert(m[i].flags & LSHM_MSG_SHM);
    }
    lshm_port_close(port);
    for (i = 0; i < 5; i++)
        lshm_ctx_run(ctx, 5);
    if (free_ctx)
        lshm_ctx_free(ctx);
    for (i = 0; i < 4; i++) {
        cr_assert(msg_check(&m[i], i, 50000 + i), "message %u changed", i);
        lshm_msg_done(&m[i]);
    }
    if (!free_ctx) {
        for (i = 0; i < 5; i++)
            lshm_ctx_run(ctx, 5);
        lshm_ctx_free(ctx);
    }
    child_ok(pid, 10000);
}

LTEST(port, messages_held_across_port_close_stay_valid)
{
    held_after_close(false);
}

LTEST(port, messages_held_across_ctx_free_stay_valid)
{
    held_after_close(true);
}

/* The receiver's max_segments (from its HELLO) limits the sender too. */
LTEST(port, receiver_segment_limit_binds_the_sender)
{
    struct lshm_ctx_params cprm = { .max_segments = 1 };
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    pid_t pid = spawn(ctx, &cprm, &port, hold_then_release, NULL);
    int maps0 = count_maps("memfd:");

    wait_ready(port);
    cr_assert_eq(send_held_until_eagain(port, NULL), 10);
    cr_assert_eq(count_maps("memfd:"), maps0 + 1);
    cr_assert_eq(send_inline(port, T_CTRL, 0, NULL, 0, -1), 0);
    cr_assert_gt(lshm_port_wait(port, LSHM_WAIT_SHM, 10000), 0);
    cr_assert_eq(send_shm(port, 1000, HOLD_SIZE, -1), 0);
    cr_assert_eq(recv_ctrl(port, 10000), 10);
    spawn_end(ctx, port, pid);
}

/* lshm_port_close from inside the port's own message handler. */
struct closer {
    unsigned got;
    bool     closed;
};

static void closer_on_msg(struct lshm_port *port, struct lshm_msg *m, void *arg)
{
    struct closer *c = arg;

    lshm_msg_done(m);
    if (++c->got == 5) {
        lshm_port_close(port);
        c->closed = true;
    }
}

static int flood_until_closed(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    uint32_t i;

    CK(lshm_port_wait(port, LSHM_WAIT_READY, 10000) > 0);
    for (i = 0; i < 100000; i++) {
        int ret = i % 3 ? send_pat(port, i, 200, 0) : send_shm(port, i, 30000, -1);

        if (ret == -EPIPE || ret == -ECONNRESET)
            return 0;
        CK(ret == 0);
    }
    return 2;
}

LTEST(port, port_closed_inside_its_own_handler)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, flood_until_closed, NULL);
    struct closer c = { 0, false };
    long long end = now_ms() + 10000;
    int i;

    cr_assert_eq(lshm_port_set_handler(port, closer_on_msg, NULL, &c), 0);
    while (!c.closed && now_ms() < end)
        cr_assert_geq(lshm_ctx_run(ctx, 100), 0);
    cr_assert(c.closed);
    for (i = 0; i < 20; i++)
        lshm_ctx_run(ctx, 5);
    cr_assert_eq(c.got, 5, "the handler ran after lshm_port_close");
    lshm_ctx_free(ctx);
    child_ok(pid, 10000);
}

LTEST(port, connect_errors_are_clear)
{
    char *dir = tmp_dir(), path[128], longp[200];
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port = NULL;
    int fd, ret;
    long long t0;

    snprintf(path, sizeof(path), "%s/none", dir);
    cr_assert_eq(lshm_connect(ctx, path, 1000, &port), -ENOENT, "%s", lshm_last_error());
    memset(longp, 'x', sizeof(longp) - 1);
    longp[sizeof(longp) - 1] = '\0';
    cr_assert_eq(lshm_connect(ctx, longp, 1000, &port), -ENAMETOOLONG);
    /* A stale socket: nobody listens. */
    close(bound_socket(path, dir, "stale", SOCK_SEQPACKET, false));
    cr_assert_eq(lshm_connect(ctx, path, 1000, &port), -ECONNREFUSED, "%s", lshm_last_error());
    unlink(path);
    /* A server that never says HELLO. */
    fd = bound_socket(path, dir, "mute", SOCK_SEQPACKET, true);
    t0 = now_ms();
    ret = lshm_connect(ctx, path, 300, &port);
    cr_assert_eq(ret, -ETIMEDOUT, "%d %s", ret, lshm_last_error());
    cr_assert_geq(now_ms() - t0, 250);
    cr_assert_lt(now_ms() - t0, 3000);
    cr_assert_null(port);
    close(fd);
    unlink(path);
    lshm_ctx_free(ctx);
    rmdir(dir);
    free(dir);
}

/*
 * Port A announces segment 0 (its MMAP queued) and dies before sending
 * it; port B to the same process must still get shared memory: the pair's
 * segment ids must not stay blocked by an announcement that never left.
 */
static int close_a_serve_b(int sa, int sb, unsigned unused)
{
    struct lshm_ctx *ctx;
    struct lshm_port *pa, *pb;
    struct lshm_msg m;

    CK(lshm_ctx_new(&ctx, NULL) == 0);
    CK(lshm_port_adopt(ctx, sa, &pa) == 0);
    CK(lshm_port_adopt(ctx, sb, &pb) == 0);
    CK(lshm_port_wait(pa, LSHM_WAIT_READY, 10000) > 0);
    CK(lshm_port_wait(pb, LSHM_WAIT_READY, 10000) > 0);
    CK(lshm_recv(pb, &m, 10000) == 0);      /* "close A now" */
    CK(m.type == T_CTRL);
    lshm_msg_done(&m);
    lshm_port_close(pa);
    CK(lshm_port_wait(pb, LSHM_WAIT_IDLE, 10000) > 0);
    CK(lshm_recv(pb, &m, 10000) == 0);
    CK(msg_check(&m, 7, 100));
    lshm_msg_done(&m);
    CK(send_inline(pb, T_CTRL, 7, NULL, 0, -1) == 0);
    CK(lshm_recv(pb, &m, 10000) == -EPIPE);
    lshm_ctx_free(ctx);
    return 0;
}

LTEST(port, segment_announced_on_a_dead_port_does_not_block_the_others)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *pa, *pb;
    pid_t pid = spawn_two(ctx, &pa, &pb, close_a_serve_b, 0);
    struct lshm_buf *ba, *bb;
    struct lshm_msg m;
    long long end;
    int ret;

    cr_assert_eq(lshm_buf_alloc(pa, 100, &ba), 0);   /* segment 0, announced on A */
    /* Sending on B kicks only B: A's MMAP stays queued while A dies. */
    cr_assert_eq(send_inline(pb, T_CTRL, 0, NULL, 0, -1), 0);
    usleep(200 * 1000);                               /* the child closed A by now */
    ret = lshm_recv(pa, &m, 5000);
    cr_assert_lt(ret, 0, "port A should be closed");
    lshm_buf_free(ba);
    lshm_port_close(pa);
    end = now_ms() + 3000;
    while ((ret = lshm_buf_alloc(pb, 100, &bb)) == -EAGAIN && now_ms() < end)
        lshm_port_wait(pb, LSHM_WAIT_SHM, 100);
    cr_expect_eq(ret, 0, "port B gets no shared memory after port A died with segment 0 "
                 "unannounced: %d %s", ret, lshm_last_error());
    if (ret == 0) {
        cr_assert_eq(send_buf(pb, bb, 7, 100), 0);
        expect_msg(pb, "port B");
    } else {
        /* Let the child finish anyway. */
        cr_assert_eq(send_pat(pb, 7, 100, 0), 0);
    }
    lshm_port_close(pb);
    lshm_ctx_free(ctx);
    child_ok(pid, 10000);
}

/* ======================================================================
 * Before the handshake; handler replay; peer death in handler style
 * ====================================================================== */

static int expect_early_then_echo(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct lshm_msg m;
    pid_t pid;
    uid_t uid;

    CK(lshm_recv(port, &m, 10000) == 0);
    CK(m.stream == 1234);
    CK(msg_check(&m, 1234, 500));
    lshm_msg_done(&m);
    CK(lshm_port_peer(port, &pid, &uid, NULL) == 0);
    CK(pid == getppid());
    CK(uid == getuid());
    return echo_pull(ctx, port, arg);
}

LTEST(port, before_handshake_inline_queues_shm_is_ENOTCONN)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port, *p2;
    pid_t pid, ppid;
    uid_t uid;
    gid_t gid;
    struct lshm_buf *b = NULL;
    struct lshm_tracking *t = NULL;
    int peer2;

    pid = spawn(ctx, NULL, &port, expect_early_then_echo, NULL);
    /* Nothing run yet: the peer's HELLO cannot have been seen. */
    cr_assert_eq(lshm_port_peer(port, &ppid, NULL, NULL), -ENOTCONN);
    cr_assert_eq(lshm_buf_alloc(port, 100, &b), -ENOTCONN);
    cr_assert_null(b);
    cr_assert_eq(lshm_tracking_new(port, 5, &t), -ENOTCONN);
    cr_assert_null(t);
    cr_assert_eq(send_pat(port, 1234, 500, 0), 0, "inline before the handshake: %s",
                 lshm_last_error());
    wait_ready(port);
    cr_assert_eq(lshm_port_peer(port, &ppid, &uid, &gid), 0);
    cr_assert_eq(ppid, pid);
    cr_assert_eq(uid, getuid());
    cr_assert_eq(gid, getgid());
    cr_assert_eq(lshm_port_peer(port, NULL, NULL, NULL), 0);
    /* Port ids: in range, distinct. */
    cr_assert_eq(lshm_socketpair(ctx, &p2, &peer2), 0);
    cr_assert(lshm_port_id(port) >= 0 && lshm_port_id(port) <= 65534);
    cr_assert(lshm_port_id(p2) >= 0 && lshm_port_id(p2) <= 65534);
    cr_assert_neq(lshm_port_id(port), lshm_port_id(p2));
    cr_assert_null(lshm_port_error(port));
    lshm_port_close(p2);
    close(peer2);
    pingpong_pull(port, 10, 64);
    spawn_end(ctx, port, pid);
}

static int send_100(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct lshm_msg m;
    uint32_t i;

    for (i = 0; i < 100; i++)
        CK(send_pat(port, i, i, 0) == 0);
    CK(lshm_recv(port, &m, 10000) == -EPIPE);
    return 0;
}

struct order {
    uint32_t next;
    int      error;
};

static void order_on_msg(struct lshm_port *port, struct lshm_msg *m, void *arg)
{
    struct order *o = arg;

    if (m->stream != o->next || !msg_check(m, o->next, o->next))
        o->error = 1;
    o->next++;
    lshm_msg_done(m);
}

/* Messages that were waiting for lshm_recv go to a new handler first, in order. */
LTEST(port, handler_set_late_gets_waiting_messages_first_in_order)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, send_100, NULL);
    struct order o = { 0, 0 };
    long long end;
    struct lshm_msg m;

    /* Take the first one by hand, let some more wait. */
    cr_assert_eq(lshm_recv(port, &m, 10000), 0);
    cr_assert_eq(m.stream, 0);
    lshm_msg_done(&m);
    o.next = 1;
    cr_assert_gt(lshm_port_wait(port, LSHM_WAIT_RECV, 10000), 0);
    usleep(50 * 1000);
    lshm_ctx_run(ctx, 0);
    cr_assert_eq(lshm_port_set_handler(port, order_on_msg, NULL, &o), 0);
    cr_assert_gt(o.next, 1, "waiting messages were not handed to the new handler");
    end = now_ms() + 10000;
    while (o.next < 100 && o.error == 0 && now_ms() < end)
        cr_assert_geq(lshm_ctx_run(ctx, 100), 0);
    cr_assert_eq(o.error, 0, "out of order at %u", o.next);
    cr_assert_eq(o.next, 100);
    spawn_end(ctx, port, pid);
}

struct deathwatch {
    unsigned msgs, closes;
    int      error;
};

static void dw_on_msg(struct lshm_port *port, struct lshm_msg *m, void *arg)
{
    ((struct deathwatch *)arg)->msgs++;
    lshm_msg_done(m);
}

static void dw_on_close(struct lshm_port *port, int error, void *arg)
{
    struct deathwatch *d = arg;

    d->closes++;
    d->error = error;
    lshm_port_close(port);
}

static int stream_forever(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    uint32_t i;

    CK(lshm_port_wait(port, LSHM_WAIT_READY, 10000) > 0);
    for (i = 0;; i++)
        CK((i % 2 ? send_shm(port, i, 30000, -1) : send_pat(port, i, 300, 0)) == 0);
}

LTEST(port, peer_sigkilled_handler_style_on_close_once)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    int fds0 = count_fds(), maps0 = count_maps("memfd:"), it, i;

    for (it = 0; it < 5; it++) {
        struct lshm_port *port;
        pid_t pid = spawn(ctx, NULL, &port, stream_forever, NULL);
        struct deathwatch d = { 0, 0, 0 };
        long long end = now_ms() + 10000;
        int st;

        cr_assert_eq(lshm_port_set_handler(port, dw_on_msg, dw_on_close, &d), 0);
        while (d.msgs < 50 && now_ms() < end)
            lshm_ctx_run(ctx, 10);
        kill(pid, SIGKILL);
        waitpid(pid, &st, 0);
        while (d.closes == 0 && now_ms() < end)
            lshm_ctx_run(ctx, 10);
        for (i = 0; i < 10; i++)
            lshm_ctx_run(ctx, 5);
        cr_assert_eq(d.closes, 1, "on_close ran %u times", d.closes);
        cr_assert(d.error == -EPIPE || d.error == -ECONNRESET, "close error %d", d.error);
        cr_assert_eq(count_fds(), fds0);
        cr_assert_eq(count_maps("memfd:"), maps0);
    }
    lshm_ctx_free(ctx);
}
