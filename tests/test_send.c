/*
 * Sending, end to end (real fork(), sockets, io_uring): bulk traffic of
 * every size each way, fds passed with messages, a batch in one submit,
 * the bounded send queue against a stalled receiver, order through a full
 * socket, and what may be sent before the handshake.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "linuxshm.h"
#include "port_util.h"

/* ======================================================================
 * 100,000 messages each way, log-uniform sizes 0 .. 4 MiB, every byte
 * and the order checked
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
        p->tx_size = pattern_rand_logsize(&p->tx_rng, BULK_MAX);
        p->tx_drawn = true;
    }
    out.stream = p->tx_seq;
    out.last = p->tx_seq + 1 == p->n;
    if (p->tx_size <= LSHM_INLINE_MAX) {
        pattern_write(inl, 0, p->tx_size, p->tx_seq);
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
                    pattern_write((uint8_t *)lshm_buf_data(b) + cur, p->have, len, p->tx_seq);
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
            pattern_write(lshm_buf_data(b), p->have, len, p->tx_seq);
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
    size = pattern_rand_logsize(&p->rx_rng, BULK_MAX);
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

LTEST(send, bulk_100000_each_way_random_sizes_to_4MiB_verified)
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
    pattern_write(probe, 16384, sizeof(probe), 5);
    cr_assert_eq(pattern_mismatch(probe, 16384, sizeof(probe), 5), -1);
    cr_assert_eq(pattern_mismatch(probe, 16384, sizeof(probe), 6), 0);
    probe[777] ^= 1;
    cr_assert_eq(pattern_mismatch(probe, 16384, sizeof(probe), 5), 777);

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
 * File descriptors passed with messages are usable, in message order
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
            pattern_write(buf, 0, i, i);
            CK(send_inline(port, T_DATA, i, buf, i, p[0]) == 0);
        }
    }
    return wait_bye(port);
}

LTEST(send, fds_passed_with_messages_are_usable_and_in_order)
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
            pattern_write(buf, 0, i, i);
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
 * One io_uring_enter for a batch of 1,000 messages
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

/* The socket carrier's batch (message rings carry it with no SQE at all). */
LTEST(send, batch_of_1000_with_LSHM_MORE_is_one_submit)
{
    struct lshm_ctx_params prm = { .ring_entries = 1024, .flags = LSHM_CTX_NO_RING };
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
 * A receiver that stops reading: the bounded queue pushes back, then
 * everything arrives once, in order
 * ====================================================================== */

/*
 * Sleep without running the ring, then read to the LAST message, every
 * byte checked; report the count.  sizes: each message seq is 8 + seq %
 * 1000 bytes (slow_msg); pause: now and then a short sleep, so that the
 * sender meets its limits again and again.
 */
struct reader_opts {
    unsigned sleep_ms;
    bool     sizes;
    bool     pause;
};

static int read_to_last(struct lshm_port *port, const struct reader_opts *o)
{
    struct lshm_msg m;
    uint32_t i = 0;
    bool last = false;

    CK(lshm_port_wait(port, LSHM_WAIT_READY, 10000) > 0);
    usleep(o->sleep_ms * 1000);
    while (!last) {
        CK(lshm_recv(port, &m, 10000) == 0);
        if (m.stream != i)
            fprintf(stderr, "reader: got %u, expected %u\n", m.stream, i);
        CK(m.stream == i);
        CK(msg_check(&m, i, m.size));
        CK(!o->sizes || m.size == 8 + i % 1000);
        last = (m.flags & LSHM_MSG_LAST) != 0;
        lshm_msg_done(&m);
        i++;
        if (o->pause && i % 8 == 0)
            usleep(1000);
    }
    return report_then_bye(port, i);
}

static int slow_reader(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct reader_opts o = { .sleep_ms = *(unsigned *)arg, .sizes = true };

    return read_to_last(port, &o);
}

static int ordered_reader(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct reader_opts o = { .sleep_ms = *(unsigned *)arg, .pause = true };

    return read_to_last(port, &o);
}

/* Message seq of the stream slow_reader checks (pattern seq, 8 + seq % 1000
 * bytes) into out and buf; LAST when it is the total-th (total 0: not yet
 * known, never LAST). */
static void slow_msg(struct lshm_out *out, uint8_t *buf, uint32_t seq, uint32_t total)
{
    out->stream = seq;
    out->size = 8 + seq % 1000;
    out->last = seq + 1 == total;
    pattern_write(buf, 0, out->size, seq);
}

LTEST(send, stalled_receiver_send_queue_bound_then_all_in_order)
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
    /* Let the reader's last run end: from its sleep on, nothing is read. */
    usleep(50000);
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
 * FIFO through a full socket: batches of varying length, linked
 * ====================================================================== */

LTEST(send, fifo_kept_when_socket_is_full)
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
        unsigned batch = 1 + (unsigned)pattern_rand_below(&rng, 100), k;

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
        if (pattern_rand_below(&rng, 4) == 0)
            lshm_ctx_run(ctx, 0);
    }
    cr_assert_gt(eagain, 0, "the send queue never filled while the receiver slept");
    got = recv_ctrl(port, 20000);
    cr_assert_eq(got, total, "receiver counted %u of %u in order", got, total);
    spawn_end(ctx, port, pid);
}

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

LTEST(send, before_handshake_inline_queues_shm_is_ENOTCONN)
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

/* ======================================================================
 * Callback style: writable events instead of retries on a timer
 * ====================================================================== */

/* A shared-memory message of size bytes, or -EAGAIN at once (nothing kept). */
static int send_shm_once(struct lshm_port *port, uint32_t seq, size_t size)
{
    struct lshm_buf *bufs[LSHM_MAX_DESCS];
    unsigned n = 0, i;
    size_t have = 0;
    int ret = 0;

    while (have < size && n < LSHM_MAX_DESCS) {
        size_t len;

        ret = lshm_buf_alloc(port, size - have, &bufs[n]);
        if (ret < 0)
            break;
        len = lshm_buf_capacity(bufs[n]) < size - have ? lshm_buf_capacity(bufs[n])
                                                         : size - have;
        pattern_write(lshm_buf_data(bufs[n]), have, len, seq);
        lshm_buf_set_size(bufs[n++], len);
        have += len;
    }
    if (ret == 0 && have == size)
        ret = lshm_send(port, &(struct lshm_out){ .type = T_DATA, .stream = seq, .bufs = bufs,
                                                  .nbufs = n, .fd = -1 }, 0);
    else if (ret == 0)
        ret = -ENOSPC;
    if (ret < 0)
        for (i = 0; i < n; i++)
            lshm_buf_free(bufs[i]);
    return ret;
}

struct writer {
    struct lshm_port *port;
    unsigned          n, sent, events, eagain;
    unsigned          want;     /* LSHM_WAIT_SEND or LSHM_WAIT_SHM */
    size_t            size;
    int               error;
};

/* Send until done or refused; a refusal waits for on_event. */
static void writer_push(struct writer *w)
{
    while (w->sent < w->n) {
        uint8_t buf[LSHM_INLINE_MAX];
        int ret;

        if (w->want == LSHM_WAIT_SHM) {
            ret = send_shm_once(w->port, w->sent, w->size);
        } else {
            pattern_write(buf, 0, w->size, w->sent);
            ret = lshm_send(w->port, &(struct lshm_out){ .type = T_DATA, .stream = w->sent,
                                                         .data = buf, .size = w->size,
                                                         .fd = -1 }, 0);
        }

        if (ret == -EAGAIN) {
            w->eagain++;
            return;
        }
        if (ret < 0) {
            w->error = ret;
            return;
        }
        w->sent++;
    }
}

static void writer_on_event(struct lshm_port *port, unsigned events, void *arg)
{
    struct writer *w = arg;

    w->events++;
    if (!(events & w->want))
        w->error = -EINVAL;
    writer_push(w);
}

static void writable_events(unsigned want)
{
    struct lshm_ctx_params p = { .flags = LSHM_CTX_NO_RING, .send_queue = 8, .max_segments = 1 };
    struct lshm_ctx *ctx = ctx_make(&p);
    unsigned n = want == LSHM_WAIT_SHM ? 60 : 2000, sleep_ms = 300;
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, ordered_reader, &sleep_ms);
    struct writer w = { .port = port, .n = n, .want = want,
                        .size = want == LSHM_WAIT_SHM ? 1 * MiB : LSHM_INLINE_MAX };
    long long end;
    int ret;

    wait_ready(port);
    cr_assert_eq(lshm_port_set_event_handler(port, writer_on_event, &w), 0);
    writer_push(&w);
    cr_assert_gt(w.eagain, 0, "never refused: the test proves nothing");
    end = now_ms() + 20000;
    while (w.sent < w.n && w.error == 0 && now_ms() < end)
        cr_assert_geq(lshm_ctx_run(ctx, 1000), 0, "%s", lshm_last_error());
    cr_assert_eq(w.error, 0, "%d", w.error);
    cr_assert_eq(w.sent, w.n, "sent %u of %u (%u events)", w.sent, w.n, w.events);
    /* Every refusal was answered by an event, and only refusals were. */
    cr_assert_eq(w.events, w.eagain, "%u events for %u refusals", w.events, w.eagain);
    cr_log_info("writable events (%s): %u refusals, %u events",
                want == LSHM_WAIT_SHM ? "shm" : "send", w.eagain, w.events);
    /* The queue may still be full with the last of them: wait for room. */
    end = now_ms() + 20000;
    while ((ret = lshm_send(port, &(struct lshm_out){ .type = T_DATA, .stream = w.n,
                                                      .last = 1, .fd = -1 }, 0)) == -EAGAIN &&
           now_ms() < end)
        cr_assert_geq(lshm_ctx_run(ctx, 100), 0, "%s", lshm_last_error());
    cr_assert_eq(ret, 0, "%s", lshm_last_error());
    cr_assert_eq(recv_ctrl(port, 20000), w.n + 1);
    spawn_end(ctx, port, pid);
}

LTEST(send, event_handler_says_when_the_send_queue_has_room)
{
    writable_events(LSHM_WAIT_SEND);
}

LTEST(send, event_handler_says_when_shared_memory_is_back)
{
    writable_events(LSHM_WAIT_SHM);
}
