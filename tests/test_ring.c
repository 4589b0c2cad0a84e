/*
 * Message rings between two library ports (protocol version 2): user
 * messages without an fd take the sender's ring, the socket keeps fds,
 * MMAPs and BYE in their order through FENCEs; rings are made lazily;
 * they wrap, fill up and wait without losing anything; a sleeping consumer
 * is woken through its futex or with WAKE datagrams; LSHM_MORE batches
 * cost no system call; a spin budget keeps both sides awake.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "port_util.h"

#define RING_MAPS "memfd:lshm-ring"

static struct lshm_port_stats port_stats(struct lshm_port *port)
{
    struct lshm_port_stats st;

    cr_assert_eq(lshm_port_stats(port, &st), 0);
    return st;
}

/* ---- a child that reads n messages in order and reports ---- */

struct reader {
    unsigned n;         /* messages to read */
    unsigned sleep_ms;  /* before the first read, without running the context */
    unsigned fds;       /* out: fds received and checked */
};

/*
 * Message i: stream i and the pattern of its size (inline or shared), or,
 * with an fd, a memfd whose first 4 bytes are i.  Reports how many came
 * in order, then the count of fds and the wake-ups it received.
 */
static int read_in_order(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct reader *r = arg;
    struct lshm_port_stats st;
    struct lshm_msg m;
    unsigned i, fds = 0;

    if (r->sleep_ms)
        usleep(r->sleep_ms * 1000);
    for (i = 0; i < r->n; i++) {
        CK(lshm_recv(port, &m, 20000) == 0);
        CK(m.type == T_DATA);
        CK(m.stream == i);
        if (m.fd >= 0) {
            uint32_t v = ~0u;

            CK(pread(m.fd, &v, sizeof(v), 0) == sizeof(v));
            CK(v == i);
            close(m.fd);
            fds++;
        } else {
            CK(msg_check(&m, i, m.size));
        }
        lshm_msg_done(&m);
    }
    CK(lshm_port_stats(port, &st) == 0);
    CK(send_inline(port, T_CTRL, i, NULL, 0, -1) == 0);
    CK(send_inline(port, T_CTRL, fds, NULL, 0, -1) == 0);
    CK(send_inline(port, T_CTRL, (uint32_t)st.wakes_received, NULL, 0, -1) == 0);
    CK(send_inline(port, T_CTRL, (uint32_t)st.ring_msgs_in, NULL, 0, -1) == 0);
    return wait_bye(port);
}

struct report {
    uint32_t got, fds, wakes_received, ring_msgs_in;
};

static struct report read_report(struct lshm_port *port)
{
    struct report r;

    r.got = recv_ctrl(port, 30000);
    r.fds = recv_ctrl(port, 10000);
    r.wakes_received = recv_ctrl(port, 10000);
    r.ring_msgs_in = recv_ctrl(port, 10000);
    return r;
}

/* An fd to send with message i: a memfd holding i. */
static int fd_for(uint32_t i)
{
    int fd = memfd_create("ring-test", MFD_CLOEXEC);

    cr_assert_geq(fd, 0);
    cr_assert_eq(pwrite(fd, &i, sizeof(i), 0), (ssize_t)sizeof(i));
    return fd;
}

static int send_fd_msg(struct lshm_port *port, uint32_t i)
{
    uint8_t b[8];
    struct lshm_out out = { .type = T_DATA, .stream = i, .data = b, .size = sizeof(b),
                            .fd = fd_for(i) };

    pattern_write(b, 0, sizeof(b), i);
    return send_out(port, &out, 0);
}

/* ====================================================================== */

LTEST(ring, features_offer_rings_unless_turned_off)
{
    struct lshm_ctx_params no = { .flags = LSHM_CTX_NO_RING };
    struct lshm_ctx *ctx = ctx_make(NULL);
    unsigned f = lshm_ctx_features(ctx);

    cr_assert(f & LSHM_FEAT_RING);
    cr_log_info("futex through io_uring: %s", f & LSHM_FEAT_FUTEX ? "yes" : "no");
    lshm_ctx_free(ctx);
    ctx = ctx_make(&no);
    cr_assert_not(lshm_ctx_features(ctx) & LSHM_FEAT_RING);
    lshm_ctx_free(ctx);
}

LTEST(ring, user_messages_take_the_ring_and_fds_the_socket)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct reader r = { .n = 3000 };
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, read_in_order, &r);
    struct lshm_port_stats st;
    struct report rep;
    unsigned i, fds = 0;

    wait_ready(port);
    for (i = 0; i < r.n; i++) {
        if (i % 10 == 3) {
            cr_assert_eq(send_fd_msg(port, i), 0, "%s", lshm_last_error());
            fds++;
        } else {
            cr_assert_eq(send_pat(port, i, i % 300, 0), 0, "%s", lshm_last_error());
        }
    }
    rep = read_report(port);
    cr_assert_eq(rep.got, r.n);
    cr_assert_eq(rep.fds, fds);
    st = port_stats(port);
    cr_assert_eq(st.ring_msgs, r.n - fds, "ring %llu", (unsigned long long)st.ring_msgs);
    cr_assert_eq(st.sock_msgs, fds);
    cr_assert_eq(rep.ring_msgs_in, r.n - fds);
    /* The child's four reports came through its ring too. */
    cr_assert_eq(st.ring_msgs_in, 4);
    /* Both rings are mapped here while the port is open: ours and the peer's. */
    cr_assert_eq(count_maps(RING_MAPS), 2);
    spawn_end(ctx, port, pid);
    cr_assert_eq(count_maps(RING_MAPS), 0);
}

LTEST(ring, no_ring_flag_keeps_every_message_on_the_socket)
{
    struct lshm_ctx_params no = { .flags = LSHM_CTX_NO_RING };
    struct lshm_ctx *ctx = ctx_make(&no);
    struct reader r = { .n = 500 };
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, read_in_order, &r);
    struct lshm_port_stats st;
    struct report rep;
    unsigned i;

    wait_ready(port);
    for (i = 0; i < r.n; i++)
        cr_assert_eq(send_pat(port, i, 64, 0), 0);
    rep = read_report(port);
    cr_assert_eq(rep.got, r.n);
    cr_assert_eq(rep.ring_msgs_in, 0, "the child (rings on) read from a ring");
    st = port_stats(port);
    cr_assert_eq(st.ring_msgs, 0);
    cr_assert_eq(st.sock_msgs, r.n);
    cr_assert_eq(st.sock_msgs_in, 4);
    cr_assert_eq(count_maps(RING_MAPS), 0);
    spawn_end(ctx, port, pid);
}

/* Idle ports cost no ring: they are made with the first user message. */
LTEST(ring, ports_that_send_nothing_have_no_ring)
{
    enum { N = 200 };
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *a[N], *b[N];
    struct lshm_msg m;
    unsigned i;

    for (i = 0; i < N; i++) {
        int s;

        cr_assert_eq(lshm_socketpair(ctx, &a[i], &s), 0);
        cr_assert_eq(lshm_port_adopt(ctx, s, &b[i]), 0);
    }
    for (i = 0; i < N; i++) {
        cr_assert_gt(lshm_port_wait(a[i], LSHM_WAIT_READY, 5000), 0);
        cr_assert_gt(lshm_port_wait(b[i], LSHM_WAIT_READY, 5000), 0);
    }
    cr_assert_eq(count_maps(RING_MAPS), 0, "rings for idle ports");
    cr_assert_eq(send_pat(a[7], 0, 16, 0), 0);
    cr_assert_eq(lshm_recv(b[7], &m, 5000), 0);
    cr_assert(msg_check(&m, 0, 16));
    lshm_msg_done(&m);
    /* One ring: a[7]'s, mapped by both ends in this process. */
    cr_assert_eq(count_maps(RING_MAPS), 2);
    for (i = 0; i < N; i++) {
        lshm_port_close(a[i]);
        lshm_port_close(b[i]);
    }
    lshm_ctx_free(ctx);
    cr_assert_eq(count_maps(RING_MAPS), 0);
}

/*
 * The order of one port, whatever carries each message: ring records,
 * fds over the socket, and shared-memory messages whose segment's MMAP
 * (over the socket) must come before them.
 */
LTEST(ring, order_holds_across_ring_fds_and_new_segments)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct reader r = { .n = scaled(3000, 5) };
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, read_in_order, &r);
    uint64_t rng = pattern_seed(11);
    struct report rep;
    unsigned i, fds = 0, shm = 0;

    wait_ready(port);
    for (i = 0; i < r.n; i++) {
        switch (pattern_rand_below(&rng, 8)) {
        case 0:
            cr_assert_eq(send_fd_msg(port, i), 0, "%s", lshm_last_error());
            fds++;
            break;
        case 1:
        case 2:
            cr_assert_eq(send_shm(port, i, 1 + pattern_rand_below(&rng, 3 * MiB), -1), 0,
                         "%s", lshm_last_error());
            shm++;
            break;
        default:
            cr_assert_eq(send_pat(port, i, pattern_rand_logsize(&rng, LSHM_INLINE_MAX), 0), 0,
                         "%s", lshm_last_error());
            break;
        }
    }
    rep = read_report(port);
    cr_assert_eq(rep.got, r.n);
    cr_assert_eq(rep.fds, fds);
    cr_log_info("order: %u messages, %u with fds, %u in shared memory", r.n, fds, shm);
    spawn_end(ctx, port, pid);
}

/* A small ring wraps hundreds of times, at every record size. */
LTEST(ring, small_ring_wraps_at_every_record_size)
{
    struct lshm_ctx_params p = { .ring_size = LSHM_RING_SIZE_MIN, .send_queue = 4096 };
    struct lshm_ctx *ctx = ctx_make(&p);
    struct reader r = { .n = scaled(40000, 10) };
    struct lshm_port *port;
    pid_t pid = spawn(ctx, &p, &port, read_in_order, &r);
    uint64_t rng = pattern_seed(5);
    struct lshm_port_stats st;
    unsigned i;

    wait_ready(port);
    for (i = 0; i < r.n; i++)
        cr_assert_eq(send_pat(port, i, pattern_rand_below(&rng, 2 * 1024), 0), 0, "%s",
                     lshm_last_error());
    cr_assert_eq(read_report(port).got, r.n);
    st = port_stats(port);
    cr_assert_eq(st.ring_msgs, r.n);
    cr_assert_gt(st.ring_bytes, 20ull * LSHM_RING_SIZE_MIN, "wrapped only %llu times",
                 (unsigned long long)(st.ring_bytes / LSHM_RING_SIZE_MIN));
    spawn_end(ctx, port, pid);
}

/*
 * A consumer that does not read: the ring fills, the producer's messages
 * wait in its queue (-EAGAIN past send_queue), nothing is overwritten or
 * lost, and all of it arrives in order once the consumer reads, at most 16
 * held at a time, datagrams with fds included.
 */
LTEST(ring, full_ring_waits_and_loses_nothing)
{
    struct lshm_ctx_params p = { .ring_size = LSHM_RING_SIZE_MIN, .send_queue = 64 };
    struct lshm_ctx_params cp = { .recv_queue = 16 };
    struct lshm_ctx *ctx = ctx_make(&p);
    struct reader r = { .n = 5000, .sleep_ms = 500 };
    struct lshm_port *port;
    pid_t pid = spawn(ctx, &cp, &port, read_in_order, &r);
    struct lshm_port_stats st;
    unsigned i, eagain = 0;

    wait_ready(port);
    for (i = 0; i < r.n; i++) {
        uint8_t buf[1000];
        struct lshm_out out = { .type = T_DATA, .stream = i, .data = buf, .size = sizeof(buf),
                                .fd = -1 };
        int ret;

        /* Now and then an fd: a FENCE met while the reader is at its bound. */
        if (i % 50 == 49) {
            cr_assert_eq(send_fd_msg(port, i), 0, "%s", lshm_last_error());
            continue;
        }
        pattern_write(buf, 0, sizeof(buf), i);
        while ((ret = lshm_send(port, &out, 0)) == -EAGAIN) {
            eagain++;
            cr_assert_gt(lshm_port_wait(port, LSHM_WAIT_SEND, 10000), 0, "%s",
                         lshm_last_error());
        }
        cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    }
    cr_assert_eq(read_report(port).got, r.n);
    st = port_stats(port);
    cr_assert_gt(st.ring_full, 0, "the ring never filled");
    cr_assert_leq(st.ring_full, r.n, "ring_full counts messages, not attempts");
    cr_assert_gt(eagain, 0, "send_queue never pushed back");
    cr_assert_eq(st.ring_msgs, r.n - r.n / 50);
    cr_log_info("full ring: %llu waits for room, %u -EAGAIN",
                (unsigned long long)st.ring_full, eagain);
    spawn_end(ctx, port, pid);
}

/*
 * A consumer that sleeps between messages is woken every time: through its
 * futex (FUTEX in its HELLO) or with a WAKE datagram (LSHM_CTX_NO_FUTEX).
 */
static void sleeping_consumer(unsigned child_flags)
{
    struct lshm_ctx_params cp = { .flags = child_flags };
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct reader r = { .n = 40 };
    struct lshm_port *port;
    pid_t pid = spawn(ctx, &cp, &port, read_in_order, &r);
    struct lshm_port_stats st;
    struct report rep;
    unsigned i;

    wait_ready(port);
    for (i = 0; i < r.n; i++) {
        /* Long enough for the child to fall asleep on its ring. */
        usleep(10000);
        cr_assert_eq(send_pat(port, i, 32, 0), 0);
    }
    rep = read_report(port);
    cr_assert_eq(rep.got, r.n);
    st = port_stats(port);
    cr_log_info("sleeping consumer (flags 0x%x): %llu wakes sent, %u received", child_flags,
                (unsigned long long)st.wakes_sent, rep.wakes_received);
    cr_assert_geq(st.wakes_sent, r.n / 2, "wakes sent %llu", (unsigned long long)st.wakes_sent);
    cr_assert_geq(rep.wakes_received, r.n / 2, "wakes received %u", rep.wakes_received);
    spawn_end(ctx, port, pid);
}

LTEST(ring, sleeping_consumer_woken_through_its_futex)
{
    struct lshm_ctx *ctx;
    bool futex;

    /* The epoll carrier waits on no futex: its peers send WAKE datagrams. */
    require_io_uring(0);
    ctx = ctx_make(NULL);
    futex = lshm_ctx_features(ctx) & LSHM_FEAT_FUTEX;

    lshm_ctx_free(ctx);
    if (!futex)
        cr_skip_test("the kernel has no IORING_OP_FUTEX_WAIT (6.7+)");
    sleeping_consumer(0);
}

LTEST(ring, sleeping_consumer_woken_by_wake_datagrams)
{
    sleeping_consumer(LSHM_CTX_NO_FUTEX);
}

/* A batch with LSHM_MORE costs no system call until it is flushed. */
LTEST(ring, batch_with_lshm_more_enters_the_kernel_once_at_most)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct reader r = { .n = 1001 };
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, read_in_order, &r);
    struct lshm_ctx_stats s0, s1, s2;
    unsigned i;

    wait_ready(port);
    /* The ring is made by the first message: out of the measured batch. */
    cr_assert_eq(send_pat(port, 0, 8, 0), 0);
    cr_assert_gt(lshm_port_wait(port, LSHM_WAIT_IDLE, 5000), 0);
    cr_assert_eq(lshm_ctx_stats(ctx, &s0), 0);
    for (i = 1; i < r.n; i++)
        cr_assert_eq(send_pat(port, i, i % 200, LSHM_MORE), 0, "%s", lshm_last_error());
    cr_assert_eq(lshm_ctx_stats(ctx, &s1), 0);
    cr_assert_eq(s1.enters, s0.enters);
    cr_assert_geq(lshm_flush(ctx), 0);
    cr_assert_eq(lshm_ctx_stats(ctx, &s2), 0);
    /* At most a futex wake for a sleeping consumer. */
    cr_assert_leq(s2.enters - s0.enters, 1, "%llu enters",
                  (unsigned long long)(s2.enters - s0.enters));
    cr_assert_eq(s2.msgs_sent - s0.msgs_sent, r.n - 1);
    cr_assert_eq(read_report(port).got, r.n);
    spawn_end(ctx, port, pid);
}

/* An echo child with a spin budget: round trips that never sleep. */
static int echo_spinning(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    return echo_pull(ctx, port, NULL);
}

LTEST(ring, spin_budget_keeps_round_trips_awake)
{
    struct lshm_ctx_params p = { .spin_us = 20000 };
    struct lshm_ctx *ctx = ctx_make(&p);
    struct lshm_port *port;
    pid_t pid = spawn(ctx, &p, &port, echo_spinning, NULL);
    struct lshm_port_stats st;
    unsigned n = scaled(2000, 10);

    wait_ready(port);
    pingpong_pull(port, n, 64);
    st = port_stats(port);
    cr_log_info("spinning: %u round trips, %llu wakes sent, %llu received", n,
                (unsigned long long)st.wakes_sent, (unsigned long long)st.wakes_received);
    cr_assert_eq(st.ring_msgs, n);
    /* On 2 shared CPUs a spinner can lose its CPU now and then; sleeping
     * on every message would show as n. */
    cr_assert_lt(st.wakes_sent, n / 4, "%llu wakes for %u messages",
                 (unsigned long long)st.wakes_sent, n);
    spawn_end(ctx, port, pid);
}

/* Messages sent during the handshake wait for it, then take the ring. */
LTEST(ring, messages_sent_before_the_handshake_take_the_ring_in_order)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct reader r = { .n = 100 };
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, read_in_order, &r);
    unsigned i;

    /* No wait_ready: the child may not even have its context yet. */
    for (i = 0; i < r.n; i++)
        cr_assert_eq(send_pat(port, i, 40, 0), 0, "%s", lshm_last_error());
    cr_assert_eq(read_report(port).got, r.n);
    cr_assert_eq(port_stats(port).ring_msgs, r.n);
    spawn_end(ctx, port, pid);
}
