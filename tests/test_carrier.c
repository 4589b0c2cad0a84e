/*
 * The two carriers speak one protocol: a process on io_uring and one on
 * the epoll carrier (LSHM_CTX_NO_IO_URING) exchange inline, shared-memory
 * and fd messages both ways, over a socketpair and over lshm_listen /
 * lshm_connect.  Each side checks what it runs on.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/perf_event.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "port_util.h"
#include "ring.h"
#include "wire.h"

#define ROUNDS 300

enum { KIND_INLINE, KIND_SHM, KIND_FD, NKINDS };

static size_t round_size(unsigned seq)
{
    switch (seq % NKINDS) {
    case KIND_INLINE:
        return seq % 5000;
    case KIND_SHM:
        return 1000 + (size_t)seq * 331 % 100000;
    default:
        return 8;
    }
}

static uint8_t pat(unsigned seq, size_t i)
{
    return (uint8_t)(seq * 31u + i * 7u + 1u);
}

/* A memfd holding "fd <seq>", for an fd message. */
static int fd_for(unsigned seq)
{
    char text[32];
    int fd = memfd_create("carrier", MFD_CLOEXEC);
    int n = snprintf(text, sizeof(text), "fd %u", seq);

    if (fd < 0)
        return -1;
    if (write(fd, text, (size_t)n) != n) {
        close(fd);
        return -1;
    }
    return fd;
}

static bool fd_holds(int fd, unsigned seq)
{
    char want[32], got[32] = "";
    int n = snprintf(want, sizeof(want), "fd %u", seq);

    return fd >= 0 && pread(fd, got, sizeof(got) - 1, 0) == n && memcmp(got, want, n) == 0;
}

/* Send round seq: inline bytes, shared-memory buffers, or an fd. */
static int send_round(struct lshm_port *port, unsigned seq)
{
    struct lshm_buf *bufs[LSHM_MAX_DESCS];
    size_t size = round_size(seq), have = 0;
    uint8_t data[LSHM_INLINE_MAX];
    struct lshm_out out = { .type = T_DATA, .stream = seq, .last = 1, .fd = -1 };
    unsigned n = 0, i;
    int ret;

    if (seq % NKINDS != KIND_SHM) {
        for (i = 0; i < size; i++)
            data[i] = pat(seq, i);
        out.data = size ? data : NULL;
        out.size = size;
        if (seq % NKINDS == KIND_FD && (out.fd = fd_for(seq)) < 0)
            return -errno;
        ret = send_out(port, &out, 0);
        if (ret < 0 && out.fd >= 0)
            close(out.fd);
        return ret;
    }
    while (have < size && n < LSHM_MAX_DESCS) {
        uint8_t *p;
        size_t len;

        ret = lshm_buf_alloc(port, size - have, &bufs[n]);
        if (ret == -EAGAIN) {
            ret = lshm_port_wait(port, LSHM_WAIT_SHM, 10000);
            if (ret < 0)
                goto fail;
            continue;
        }
        if (ret < 0)
            goto fail;
        len = lshm_buf_capacity(bufs[n]) < size - have ? lshm_buf_capacity(bufs[n]) : size - have;
        p = lshm_buf_data(bufs[n]);
        for (i = 0; i < len; i++)
            p[i] = pat(seq, have + i);
        lshm_buf_set_size(bufs[n], len);
        have += len;
        n++;
    }
    out.bufs = bufs;
    out.nbufs = n;
    ret = send_out(port, &out, 0);
    if (ret == 0)
        return 0;
fail:
    while (n > 0)
        lshm_buf_free(bufs[--n]);
    return ret;
}

/* Is m round seq, as send_round made it?  Takes and closes its fd. */
static bool round_ok(struct lshm_msg *m, unsigned seq)
{
    bool ok = m->stream == seq && m->type == T_DATA && m->size == round_size(seq) &&
              ((m->flags & LSHM_MSG_SHM) != 0) == (seq % NKINDS == KIND_SHM) &&
              (m->fd >= 0) == (seq % NKINDS == KIND_FD);
    size_t off = 0;
    unsigned i;

    for (i = 0; ok && i < m->niov; i++) {
        const uint8_t *p = m->iov[i].base;
        size_t j;

        for (j = 0; ok && j < m->iov[i].len; j++)
            ok = p[j] == pat(seq, off + j);
        off += m->iov[i].len;
    }
    if (m->fd >= 0) {
        ok = ok && fd_holds(m->fd, seq);
        close(m->fd);
        m->fd = -1;
    }
    return ok && off == m->size;
}

/* Says on which carrier it runs, then answers every round in kind. */
static int mirror(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    bool want_epoll = *(const bool *)arg;
    struct lshm_msg m;
    unsigned seq;
    int ret;

    CK(((lshm_ctx_features(ctx) & LSHM_FEAT_EPOLL) != 0) == want_epoll);
    for (seq = 0; seq < ROUNDS; seq++) {
        CK(lshm_recv(port, &m, 10000) == 0);
        CK(round_ok(&m, seq));
        lshm_msg_done(&m);
        CK(send_round(port, seq) == 0);
    }
    /* The parent says BYE as soon as it has the last answer, and one run
     * may bring that BYE with the completion of our last send: the port
     * then ends without having been seen idle. */
    ret = lshm_port_wait(port, LSHM_WAIT_IDLE, 10000);
    CK(ret > 0 || ret == -EPIPE);
    /* Until the parent's BYE: nothing it sent may be lost. */
    CK(lshm_recv(port, &m, 10000) == -EPIPE);
    return 0;
}

static void exchange(struct lshm_port *port)
{
    struct lshm_msg m;
    unsigned seq;
    int ret;

    for (seq = 0; seq < ROUNDS; seq++) {
        ret = send_round(port, seq);
        cr_assert_eq(ret, 0, "round %u: send: %d %s", seq, ret, lshm_last_error());
        ret = lshm_recv(port, &m, 10000);
        cr_assert_eq(ret, 0, "round %u: recv: %d %s", seq, ret, lshm_last_error());
        cr_assert(round_ok(&m, seq), "round %u: the answer differs", seq);
        lshm_msg_done(&m);
    }
}

static void across(bool parent_epoll)
{
    struct lshm_ctx_params mine = { .flags = parent_epoll ? LSHM_CTX_NO_IO_URING : 0 };
    struct lshm_ctx_params theirs = { .flags = parent_epoll ? 0 : LSHM_CTX_NO_IO_URING };
    bool child_epoll = !parent_epoll;
    struct lshm_port_stats st;
    struct lshm_ctx *ctx;
    struct lshm_port *port;
    pid_t pid;

    require_io_uring(0);
    ctx = ctx_make(&mine);
    cr_assert_eq((lshm_ctx_features(ctx) & LSHM_FEAT_EPOLL) != 0, parent_epoll,
                 "this side runs on %s", lshm_ctx_carrier(ctx));
    pid = spawn(ctx, &theirs, &port, mirror, &child_epoll);
    wait_ready(port);
    exchange(port);
    /* Message rings run across carriers: the epoll side waits on no futex
     * (its peer wakes it with WAKE datagrams), the io_uring side may. */
    cr_assert_eq(lshm_port_stats(port, &st), 0);
    cr_log_info("%s side: %llu ring messages out, %llu in, %llu wakes sent, %llu received",
                parent_epoll ? "epoll" : "io_uring", (unsigned long long)st.ring_msgs,
                (unsigned long long)st.ring_msgs_in, (unsigned long long)st.wakes_sent,
                (unsigned long long)st.wakes_received);
    cr_assert_gt(st.ring_msgs, 0, "nothing went out through our ring");
    cr_assert_gt(st.ring_msgs_in, 0, "nothing came in through the peer's ring");
    if (parent_epoll)
        cr_assert_eq(lshm_ctx_features(ctx) & LSHM_FEAT_FUTEX, 0);
    spawn_end(ctx, port, pid);
}

LTEST(carrier, io_uring_to_epoll_inline_shm_and_fds_both_ways)
{
    across(false);
}

LTEST(carrier, epoll_to_io_uring_inline_shm_and_fds_both_ways)
{
    across(true);
}

/* The server on one carrier, the client on the other, through a path. */
static void listen_across(bool server_epoll)
{
    struct lshm_ctx_params sp = { .flags = server_epoll ? LSHM_CTX_NO_IO_URING : 0 };
    struct lshm_ctx_params cp = { .flags = server_epoll ? 0 : LSHM_CTX_NO_IO_URING };
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    bool child_epoll = !server_epoll;
    struct lshm_listener *l;
    struct lshm_port *port;
    struct lshm_ctx *ctx;
    pid_t pid;
    int ret;

    require_io_uring(0);
    snprintf(path, sizeof(path), "/tmp/lshm-carrier-%d.sock", (int)getpid());
    ctx = ctx_make(&sp);
    ret = lshm_listen(ctx, path, 0600, &l);
    cr_assert_eq(ret, 0, "lshm_listen: %d %s", ret, lshm_last_error());
    fflush(NULL);
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        struct lshm_ctx *cctx;
        struct lshm_port *cport;
        int rc = 1;

        lshm_ctx_free(ctx);
        if (lshm_ctx_new(&cctx, &cp) == 0) {
            if (lshm_connect(cctx, path, 10000, &cport) == 0) {
                rc = mirror(cctx, cport, &child_epoll);
                lshm_port_close(cport);
            } else {
                fprintf(stderr, "child: lshm_connect: %s\n", lshm_last_error());
            }
            lshm_ctx_free(cctx);
        }
        _exit(rc);
    }
    ret = lshm_accept(l, &port, 10000);
    cr_assert_eq(ret, 0, "lshm_accept: %d %s", ret, lshm_last_error());
    exchange(port);
    lshm_listener_close(l);
    spawn_end(ctx, port, pid);
}

LTEST(carrier, epoll_client_connects_to_io_uring_server)
{
    listen_across(false);
}

LTEST(carrier, io_uring_client_connects_to_epoll_server)
{
    listen_across(true);
}

/*
 * A forked child that keeps copies of the parent's sockets (a pre-forking
 * server) must not leave a closed port's socket in the parent's epoll set:
 * there it would report, under a number given to the next socket, events
 * nobody consumes, and every wait would return at once.
 */
LTEST(carrier, closed_port_leaves_the_epoll_set_while_a_child_holds_its_socket)
{
    struct lshm_ctx_params prm = { .flags = LSHM_CTX_NO_IO_URING };
    struct lshm_ctx *ctx = ctx_make(&prm);
    struct lshm_ctx_stats s0, s1;
    struct lshm_port *a, *b;
    uint8_t junk[64];
    int raw, peer_b, hold[2], ret;
    long long t0;
    char c;
    pid_t pid;

    raw = raw_peer(ctx, &a);
    cr_assert_eq(lshm_ctx_run(ctx, 0) >= 0, true);
    cr_assert_eq(pipe2(hold, O_CLOEXEC), 0);
    fflush(NULL);
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        /* Holds every fd of the parent until the pipe closes. */
        close(hold[1]);
        while (read(hold[0], &c, 1) < 0 && errno == EINTR)
            ;
        _exit(0);
    }
    close(hold[0]);
    /* Not a protocol message: A closes, and with it its socket. */
    memset(junk, 0xee, sizeof(junk));
    raw_sendv(raw, junk, sizeof(junk), NULL, 0);
    for (t0 = now_ms(); lshm_port_error(a) == NULL && now_ms() < t0 + 5000;)
        lshm_ctx_run(ctx, 50);
    cr_assert_not_null(lshm_port_error(a), "A did not close on junk");
    lshm_port_close(a);
    lshm_ctx_run(ctx, 0);
    /* B likely gets A's number. */
    ret = lshm_socketpair(ctx, &b, &peer_b);
    cr_assert_eq(ret, 0, "%s", lshm_last_error());
    cr_assert_eq(lshm_ctx_stats(ctx, &s0), 0);
    for (t0 = now_ms(); now_ms() < t0 + 300;)
        lshm_ctx_run(ctx, 50);
    cr_assert_eq(lshm_ctx_stats(ctx, &s1), 0);
    cr_assert_leq(s1.enters - s0.enters, 30, "%llu waits in 300 ms: one returns at once",
                  (unsigned long long)(s1.enters - s0.enters));
    close(hold[1]);
    child_ok(pid, 10000);
    close(peer_b);
    close(raw);
    lshm_port_close(b);
    lshm_ctx_free(ctx);
}

/*
 * On the epoll carrier, sends to a socket with no room wait for EPOLLOUT
 * instead of blocking the caller, and go out in order as the peer reads;
 * when the peer goes away, what still waits ends with the port (a failed
 * send cancels the rest of its chain), leaving nothing behind.
 */
LTEST(carrier, epoll_sends_wait_for_room_in_order_and_end_when_the_peer_leaves)
{
    struct lshm_ctx_params prm = { .flags = LSHM_CTX_NO_IO_URING, .send_queue = 4096 };
    struct lshm_ctx *ctx = ctx_make(&prm);
    uint8_t hello[64], payload[1000];
    struct lshm_out out = { .type = T_DATA, .data = payload, .size = sizeof(payload), .fd = -1 };
    struct lshm_port *port;
    struct lshm_msg m;
    long long t0;
    unsigned i, queued = 0;
    int raw, ret;

    raw = raw_peer(ctx, &port);
    /* A HELLO that offers no message ring: every message is a datagram. */
    raw_sendv(raw, hello, raw_hello_build(hello, getpid(), LSHM_PROTOCOL_VERSION), NULL, 0);
    wait_ready(port);
    memset(payload, 0x42, sizeof(payload));
    /* Far more than the socket holds: every call returns at once. */
    t0 = now_ms();
    for (i = 0; i < 2000; i++) {
        out.stream = i;
        ret = lshm_send(port, &out, 0);
        if (ret == -EAGAIN)
            break;
        cr_assert_eq(ret, 0, "send %u: %d %s", i, ret, lshm_last_error());
        queued++;
    }
    lshm_ctx_run(ctx, 0);
    cr_assert_lt(now_ms() - t0, 2000, "sending blocked for %lld ms", now_ms() - t0);
    ret = lshm_port_wait(port, LSHM_WAIT_IDLE, 0);
    cr_assert_eq(ret, -ETIMEDOUT, "%u messages fit in the socket: nothing waits (%d)",
                 queued, ret);
    cr_assert_eq(queued, 2000);
    /* Read half: the rest goes out as room comes (EPOLLOUT), in order. */
    {
        uint8_t buf[LSHM_WIRE_MAX];
        struct lshm_wire_msg h;
        unsigned want = 0;
        ssize_t n;

        t0 = now_ms();
        while (want < queued / 2 && now_ms() < t0 + 10000) {
            n = recv(raw, buf, sizeof(buf), MSG_DONTWAIT);
            if (n < 0) {
                cr_assert_eq(errno, EAGAIN, "recv: %s", strerror(errno));
                lshm_ctx_run(ctx, 10);
                continue;
            }
            memcpy(&h, buf, sizeof(h));
            if (h.type != T_DATA)
                continue;
            cr_assert_eq(h.stream, want, "datagram %u has stream %u", want, h.stream);
            want++;
        }
        cr_assert_eq(want, queued / 2, "%u of %u arrived", want, queued / 2);
    }
    ret = lshm_port_wait(port, LSHM_WAIT_IDLE, 0);
    cr_assert_eq(ret, -ETIMEDOUT, "the other half fit in the socket (%d)", ret);
    close(raw);
    ret = lshm_recv(port, &m, 10000);
    cr_assert(ret == -EPIPE || ret == -ECONNRESET, "after the peer left: %d", ret);
    cr_assert_not_null(lshm_port_error(port));
    cr_log_info("epoll carrier: %u queued, port ended: %s", queued, lshm_port_error(port));
    lshm_port_close(port);
    lshm_ctx_free(ctx);
}

/*
 * The system calls this thread makes, counted by the kernel (perf's
 * raw_syscalls:sys_enter tracepoint), disabled until enabled; -1 and the
 * reason in why when the kernel does not offer it here.
 */
static int syscall_counter(char *why, size_t len)
{
    struct perf_event_attr a = { .size = sizeof(a), .type = PERF_TYPE_TRACEPOINT,
                                 .disabled = 1 };
    unsigned long long id;
    FILE *f = fopen("/sys/kernel/tracing/events/raw_syscalls/sys_enter/id", "r");
    int fd;

    if (f == NULL) {
        snprintf(why, len, "tracefs: %s", strerror(errno));
        return -1;
    }
    if (fscanf(f, "%llu", &id) != 1)
        id = 0;
    fclose(f);
    a.config = id;
    fd = (int)syscall(SYS_perf_event_open, &a, 0, -1, -1, PERF_FLAG_FD_CLOEXEC);
    if (fd < 0)
        snprintf(why, len, "perf_event_open(raw_syscalls:sys_enter): %s", strerror(errno));
    return fd;
}

#define TRIPS 2000

/* A child_fn: echo each 64 B message after 50 us, so that the other side
 * is asleep when the answer comes (and this one when the next comes). */
static int echo_late(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct lshm_msg m;
    uint8_t buf[64];
    int ret;

    for (;;) {
        ret = lshm_recv(port, &m, 20000);
        if (ret == -EPIPE)
            return 0;
        CK(ret == 0);
        CK(m.size == sizeof(buf) && m.niov == 1);
        memcpy(buf, m.iov[0].base, sizeof(buf));
        usleep(50);
        CK(send_inline(port, m.type, m.stream, buf, sizeof(buf), -1) == 0);
        lshm_msg_done(&m);
    }
}

/* System calls a round trip of 64 B costs this side once rings run. */
static double calls_per_round_trip(struct lshm_port *port, int counter)
{
    unsigned long long n = 0;
    struct lshm_msg m;
    unsigned seq;
    int ret;

    for (seq = 0; seq < 100 + TRIPS; seq++) {
        if (seq == 100)
            cr_assert_eq(ioctl(counter, PERF_EVENT_IOC_ENABLE, 0), 0);
        ret = send_pat(port, seq, 64, 0);
        cr_assert_eq(ret, 0, "round trip %u: send: %d %s", seq, ret, lshm_last_error());
        ret = lshm_recv(port, &m, 10000);
        cr_assert_eq(ret, 0, "round trip %u: recv: %d %s", seq, ret, lshm_last_error());
        cr_assert(msg_check(&m, seq, 64), "round trip %u: the echo differs", seq);
        lshm_msg_done(&m);
    }
    cr_assert_eq(ioctl(counter, PERF_EVENT_IOC_DISABLE, 0), 0);
    cr_assert_eq(read(counter, &n, sizeof(n)), (ssize_t)sizeof(n));
    return (double)n / TRIPS;
}

/*
 * On the epoll carrier a sleeping round trip costs each side what a plain
 * socket's does: the send of a WAKE and one receive that is the wait (not
 * an epoll_wait, a receive and a receive that finds nothing, and a look
 * with no wait after the send completed: five).  For a socketpair and for
 * a client whose socket was non-blocking while it connected.
 */
static void round_trip_calls(bool connected)
{
    struct lshm_ctx_params prm = { .flags = LSHM_CTX_NO_IO_URING };
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)], why[160];
    struct lshm_ctx *ctx;
    struct lshm_port *port;
    int counter = syscall_counter(why, sizeof(why)), ready[2], ret;
    double calls;
    pid_t pid;
    char c;

    if (counter < 0)
        cr_skip_test("cannot count system calls: %s", why);
    ctx = ctx_make(&prm);
    if (!connected) {
        pid = spawn(ctx, NULL, &port, echo_late, NULL);
        wait_ready(port);
    } else {
        snprintf(path, sizeof(path), "/tmp/lshm-calls-%d.sock", (int)getpid());
        cr_assert_eq(pipe2(ready, O_CLOEXEC), 0);
        fflush(NULL);
        pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
            struct lshm_ctx *sctx;
            struct lshm_listener *l;
            struct lshm_port *sport;
            int rc = 1;

            close(counter);
            lshm_ctx_free(ctx);
            close(ready[0]);
            if (lshm_ctx_new(&sctx, NULL) == 0 && lshm_listen(sctx, path, 0600, &l) == 0) {
                if (write(ready[1], "r", 1) == 1 && lshm_accept(l, &sport, 10000) == 0) {
                    rc = echo_late(sctx, sport, NULL);
                    lshm_port_close(sport);
                }
                lshm_listener_close(l);
                lshm_ctx_free(sctx);
            }
            _exit(rc);
        }
        close(ready[1]);
        cr_assert_eq(read(ready[0], &c, 1), 1, "the server did not start");
        close(ready[0]);
        ret = lshm_connect(ctx, path, 10000, &port);
        cr_assert_eq(ret, 0, "lshm_connect: %d %s", ret, lshm_last_error());
    }
    calls = calls_per_round_trip(port, counter);
    cr_log_info("epoll carrier, %s: %.2f system calls a round trip on this side",
                connected ? "connected client" : "socketpair", calls);
    cr_assert_leq(calls, 3.0, "%.2f system calls a round trip", calls);
    close(counter);
    spawn_end(ctx, port, pid);
}

LTEST(carrier, epoll_round_trip_costs_a_send_and_a_receive)
{
    round_trip_calls(false);
}

LTEST(carrier, epoll_round_trip_of_a_connected_client_costs_a_send_and_a_receive)
{
    round_trip_calls(true);
}

/* A receive that starts its next one from its completion, as a port's does. */
struct rearm {
    struct lshm_op    op;
    struct lshm_ring  *ring;
    int               fd;
    struct msghdr     msg;
    struct iovec      iov;
    char              buf[64];
    unsigned          got;
    int               res;
};

static void rearm_done(struct lshm_op *op, int res, bool more, void *buf, unsigned len)
{
    struct rearm *r = (struct rearm *)op;

    (void)more, (void)buf, (void)len;
    r->res = res;
    if (res < 0)
        return;
    r->got++;
    r->res = lshm__ring_recvmsg(r->ring, r->fd, &r->msg, &r->op);
}

/*
 * A run without a wait (timeout 0) on a carrier that waits on one socket's
 * receive looks with that receive: one recvmsg(2) whether a datagram is
 * there or not, not epoll_wait(2) then recvmsg(2), nor a receive tried
 * again at once after one that took a datagram (it mostly finds none).
 * Each round: a datagram, a run that takes it, a run that finds nothing.
 */
LTEST(carrier, epoll_look_without_a_wait_is_one_receive)
{
    struct rearm r = { .fd = -1 };
    unsigned long long n = 0;
    char why[160];
    int counter = syscall_counter(why, sizeof(why)), sv[2];
    unsigned i, rounds = 500;
    double calls;

    if (counter < 0)
        cr_skip_test("cannot count system calls: %s", why);
    r.op.complete = rearm_done;
    r.iov = (struct iovec){ r.buf, sizeof(r.buf) };
    r.msg = (struct msghdr){ .msg_iov = &r.iov, .msg_iovlen = 1 };
    cr_assert_eq(lshm__ring_new(&r.ring, 8, LSHM_CTX_NO_IO_URING), 0, "%s", lshm_last_error());
    cr_assert_eq(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
    r.fd = sv[0];
    cr_assert_eq(lshm__ring_recvmsg(r.ring, r.fd, &r.msg, &r.op), 0);
    cr_assert_eq(lshm__ring_run(r.ring, 0), 0);
    cr_assert_eq(ioctl(counter, PERF_EVENT_IOC_ENABLE, 0), 0);
    for (i = 0; i < rounds; i++) {
        cr_assert_eq(send(sv[1], "wake", 4, 0), 4);
        cr_assert_eq(lshm__ring_run(r.ring, 0), 1, "round %u: the datagram was not taken", i);
        cr_assert_eq(r.got, i + 1);
        cr_assert_eq(r.res, 0, "round %u: receive: %d", i, r.res);
        cr_assert_eq(lshm__ring_run(r.ring, 0), 0, "round %u: a second datagram?", i);
    }
    cr_assert_eq(ioctl(counter, PERF_EVENT_IOC_DISABLE, 0), 0);
    cr_assert_eq(read(counter, &n, sizeof(n)), (ssize_t)sizeof(n));
    /* The send, the receive that takes the datagram, the one that finds none. */
    calls = (double)n / rounds;
    cr_log_info("epoll carrier: %.2f system calls a round of send, look, look", calls);
    cr_assert_leq(calls, 3.2, "%.2f system calls a round (send, look, look)", calls);
    lshm__ring_cancel(r.ring, &r.op);
    lshm__ring_run(r.ring, 0);
    lshm__ring_close(r.ring, sv[0]);
    close(sv[1]);
    lshm__ring_free(r.ring);
    close(counter);
}

/* ---- the ring layer's timeouts, on each carrier ---- */

/* An operation of the ring layer, and when and how it completed. */
struct tmo {
    struct lshm_op op;
    long long      at;     /* now_ms() at completion, 0: not yet */
    int            res;
};

static void tmo_done(struct lshm_op *op, int res, bool more, void *buf, unsigned len)
{
    struct tmo *t = (struct tmo *)op;

    (void)more, (void)buf, (void)len;
    t->at = now_ms();
    t->res = res;
}

/* Two timeouts queued before one submit each keep their own delay. */
static void two_timeouts(unsigned ctx_flags)
{
    struct tmo a = { .op.complete = tmo_done }, b = { .op.complete = tmo_done };
    struct lshm_ring *r;
    long long start;

    cr_assert_eq(lshm__ring_new(&r, 8, ctx_flags), 0, "%s", lshm_last_error());
    cr_assert_eq(lshm__ring_timeout(r, 50, &a.op), 0);
    cr_assert_eq(lshm__ring_timeout(r, 400, &b.op), 0);
    start = now_ms();
    while ((a.at == 0 || b.at == 0) && now_ms() - start < 3000)
        cr_assert_geq(lshm__ring_run(r, 100), 0);
    cr_assert(a.at != 0 && b.at != 0, "a timeout never completed");
    cr_assert_eq(a.res, -ETIME);
    cr_assert_eq(b.res, -ETIME);
    cr_assert_geq(a.at - start, 40, "50 ms took %lld ms", a.at - start);
    cr_assert_lt(a.at - start, 300, "50 ms took %lld ms: the other's delay?", a.at - start);
    cr_assert_geq(b.at - start, 390, "400 ms took %lld ms", b.at - start);
    lshm__ring_free(r);
}

LTEST(carrier, io_uring_timeouts_submitted_together_keep_their_own_delays)
{
    require_io_uring(0);
    two_timeouts(0);
}

LTEST(carrier, epoll_timeouts_submitted_together_keep_their_own_delays)
{
    two_timeouts(LSHM_CTX_NO_IO_URING);
}

/* ---- a signal ends a wait without a limit ---- */

static volatile sig_atomic_t alarms;

static void on_alarm(int sig)
{
    (void)sig;
    alarms++;
}

/* A child_fn: a message after 3 s (the parent's wait ends then at the
 * latest), then wait for the end. */
static int send_late(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct lshm_msg m;
    int ret;

    (void)ctx, (void)arg;
    usleep(3000000);
    CK(send_pat(port, 1, 64, 0) == 0);
    ret = lshm_recv(port, &m, 20000);
    CK(ret == -EPIPE || ret == -ECONNRESET);
    return 0;
}

/*
 * lshm_ctx_run(ctx, -1) returns when a signal interrupts its wait, even
 * one whose handler asks for restarts (SA_RESTART, as signal(3) installs
 * them): the program's loop gets to look at what the handler did.  On the
 * epoll carrier the wait of a one-socket context is a receive, which the
 * kernel restarts unless it has a timeout.
 */
static void signal_ends_the_wait(unsigned ctx_flags)
{
    struct lshm_ctx_params prm = { .flags = ctx_flags };
    struct sigaction sa = { .sa_handler = on_alarm, .sa_flags = SA_RESTART }, old;
    struct itimerval it = { .it_value = { 0, 200000 } };
    struct lshm_ctx *ctx;
    struct lshm_port *port;
    long long t0, took;
    pid_t pid;
    int ret;

    ctx = ctx_make(&prm);
    pid = spawn(ctx, NULL, &port, send_late, NULL);
    wait_ready(port);
    sigemptyset(&sa.sa_mask);
    cr_assert_eq(sigaction(SIGALRM, &sa, &old), 0);
    alarms = 0;
    t0 = now_ms();
    cr_assert_eq(setitimer(ITIMER_REAL, &it, NULL), 0);
    do
        ret = lshm_ctx_run(ctx, -1);
    while (ret == 0 && alarms == 0);
    took = now_ms() - t0;
    sigaction(SIGALRM, &old, NULL);
    cr_assert_geq(ret, 0, "%d %s", ret, lshm_last_error());
    cr_assert_eq(alarms, 1);
    cr_assert_lt(took, 2000, "the wait went on %lld ms after the signal at 200 ms", took);
    cr_log_info("%s: lshm_ctx_run(-1) returned %lld ms in, the signal came at 200 ms",
                lshm_ctx_carrier(ctx), took);
    spawn_end(ctx, port, pid);
}

LTEST(carrier, io_uring_wait_without_a_limit_returns_on_a_restarting_signal)
{
    require_io_uring(0);
    signal_ends_the_wait(0);
}

LTEST(carrier, epoll_wait_without_a_limit_returns_on_a_restarting_signal)
{
    signal_ends_the_wait(LSHM_CTX_NO_IO_URING);
}

/* ---- a socket another process holds too ---- */

/* A child holding a copy of sock: on each byte from cmd it changes the
 * socket as told ('n': O_NONBLOCK on, 't': SO_RCVTIMEO of 1 ms), answers
 * on done, and leaves at cmd's end of file. */
static pid_t holder(int sock, const int cmd[2], const int done[2])
{
    pid_t pid;

    fflush(NULL);
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        struct timeval tv = { 0, 1000 };
        char c;

        close(cmd[1]);
        close(done[0]);
        while (read(cmd[0], &c, 1) == 1) {
            if (c == 'n')
                fcntl(sock, F_SETFL, fcntl(sock, F_GETFL) | O_NONBLOCK);
            else if (c == 't')
                setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
            if (write(done[1], &c, 1) != 1)
                _exit(1);
        }
        _exit(0);
    }
    return pid;
}

/*
 * Runs of 100 ms on an idle port for 600 ms: how many waits they took and
 * the CPU time they used (ms).
 */
static void idle_runs(struct lshm_ctx *ctx, uint64_t *enters, long long *cpu_ms)
{
    struct lshm_ctx_stats a, b;
    struct timespec c0, c1;
    long long t0 = now_ms();

    cr_assert_eq(lshm_ctx_stats(ctx, &a), 0);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
    while (now_ms() - t0 < 600)
        cr_assert_geq(lshm_ctx_run(ctx, 100), 0, "%s", lshm_last_error());
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
    cr_assert_eq(lshm_ctx_stats(ctx, &b), 0);
    *enters = b.enters - a.enters;
    *cpu_ms = (c1.tv_sec - c0.tv_sec) * 1000LL + (c1.tv_nsec - c0.tv_nsec) / 1000000;
}

/*
 * An adopted socket is not the port's alone when the process that passed
 * it keeps a copy: that one may make it non-blocking or give it another
 * receive timeout.  The epoll carrier's wait, a blocking receive while it
 * knows the socket blocking, must not turn into a loop of receives that
 * return at once (in lshm_ctx_run(ctx, -1), one that never returns).
 */
static void other_holder_changes_the_socket(char what)
{
    struct lshm_ctx_params prm = { .flags = LSHM_CTX_NO_IO_URING };
    struct lshm_ctx *ctx;
    struct lshm_port *port;
    int sv[2], cmd[2], done[2];
    uint64_t enters;
    long long cpu;
    pid_t pid;
    char c;

    ctx = ctx_make(&prm);
    cr_assert_eq(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
    cr_assert_eq(pipe2(cmd, O_CLOEXEC), 0);
    cr_assert_eq(pipe2(done, O_CLOEXEC), 0);
    pid = holder(sv[0], cmd, done);
    close(cmd[0]);
    close(done[1]);
    cr_assert_eq(lshm_port_adopt(ctx, sv[0], &port), 0, "%s", lshm_last_error());
    /* No HELLO comes: the handshake's deadline, 10 s away, is the only timer. */
    idle_runs(ctx, &enters, &cpu);
    cr_log_info("before: %llu waits, %lld ms of CPU", (unsigned long long)enters, cpu);
    cr_assert_leq(enters, 12, "%llu waits in 600 ms of idle runs of 100 ms",
                  (unsigned long long)enters);
    cr_assert_eq(write(cmd[1], &what, 1), 1);
    cr_assert_eq(read(done[0], &c, 1), 1);
    idle_runs(ctx, &enters, &cpu);
    cr_log_info("after '%c': %llu waits, %lld ms of CPU", what, (unsigned long long)enters,
                cpu);
    cr_assert_leq(enters, 14, "%llu waits in 600 ms of idle runs of 100 ms, after the "
                  "other holder's %s", (unsigned long long)enters,
                  what == 'n' ? "O_NONBLOCK" : "SO_RCVTIMEO");
    cr_assert_lt(cpu, 200, "%lld ms of CPU in 600 ms of idle runs", cpu);
    close(cmd[1]);
    close(done[0]);
    child_ok(pid, 5000);
    lshm_port_close(port);
    lshm_ctx_free(ctx);
    close(sv[1]);
}

LTEST(carrier, epoll_wait_does_not_spin_when_another_holder_makes_the_socket_non_blocking)
{
    other_holder_changes_the_socket('n');
}

LTEST(carrier, epoll_wait_does_not_spin_when_another_holder_shortens_its_receive_timeout)
{
    other_holder_changes_the_socket('t');
}

/* ---- a receive started outside a run is seen by a poll on the fd ---- */

/*
 * A socket whose receive completed and was not started again leaves the
 * epoll set.  A receive started on it by a submit outside a run (as the
 * end of lshm_ctx_run or lshm_flush does) must bring it back before the
 * caller sleeps on the fd: a datagram then makes the fd readable.
 */
LTEST(carrier, epoll_receive_submitted_outside_a_run_wakes_a_poll_on_the_fd)
{
    struct tmo r1 = { .op.complete = tmo_done }, r2 = { .op.complete = tmo_done };
    char buf1[64], buf2[64];
    struct iovec v1 = { buf1, sizeof(buf1) }, v2 = { buf2, sizeof(buf2) };
    struct msghdr m1 = { .msg_iov = &v1, .msg_iovlen = 1 };
    struct msghdr m2 = { .msg_iov = &v2, .msg_iovlen = 1 };
    struct lshm_ring *ring;
    struct pollfd pfd;
    long long t0;
    int sv[2];

    cr_assert_eq(lshm__ring_new(&ring, 8, LSHM_CTX_NO_IO_URING), 0, "%s", lshm_last_error());
    pfd = (struct pollfd){ .fd = lshm__ring_fd(ring), .events = POLLIN };
    cr_assert_eq(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
    /* One receive, completed and not started again: the socket leaves. */
    cr_assert_eq(lshm__ring_recvmsg(ring, sv[0], &m1, &r1.op), 0);
    cr_assert_eq(lshm__ring_run(ring, 0), 0);
    cr_assert_eq(send(sv[1], "one", 3, 0), 3);
    for (t0 = now_ms(); r1.at == 0 && now_ms() - t0 < 5000;)
        cr_assert_geq(lshm__ring_run(ring, 100), 0);
    cr_assert(r1.at != 0 && r1.res == 3, "first receive: %d", r1.res);
    /* The next one, submitted outside a run: nothing there yet. */
    cr_assert_eq(lshm__ring_recvmsg(ring, sv[0], &m2, &r2.op), 0);
    cr_assert_geq(lshm__ring_submit(ring), 0);
    cr_assert_eq(r2.at, 0);
    /* Only poll(2) from here: the datagram must make the fd readable. */
    cr_assert_eq(send(sv[1], "two", 3, 0), 3);
    cr_assert_eq(poll(&pfd, 1, 2000), 1, "the fd did not wake for the datagram");
    for (t0 = now_ms(); r2.at == 0 && now_ms() - t0 < 5000;)
        cr_assert_geq(lshm__ring_run(ring, 100), 0);
    cr_assert(r2.at != 0 && r2.res == 3, "second receive: %d", r2.res);
    lshm__ring_close(ring, sv[0]);
    close(sv[1]);
    lshm__ring_free(ring);
}

/* ---- a look without a wait keeps the fd's readiness true ---- */

/*
 * A caller that sleeps on the context's fd and runs without a wait when it
 * is readable must find it not readable once that run did all there was:
 * otherwise its poll loop spins.  A cancelled timeout leaves the timerfd
 * armed; when that time comes the timerfd is readable (nothing is due) and
 * only a run that reads it settles it, also on a carrier whose only
 * socket wait is one receive (where a run without a wait looks with that
 * receive).
 */
LTEST(carrier, epoll_fd_is_not_left_readable_by_a_cancelled_timeout)
{
    struct tmo r = { .op.complete = tmo_done }, t = { .op.complete = tmo_done };
    char buf[64];
    struct iovec v = { buf, sizeof(buf) };
    struct msghdr m = { .msg_iov = &v, .msg_iovlen = 1 };
    struct lshm_ring *ring;
    struct pollfd pfd;
    long long t0;
    int sv[2], i;

    cr_assert_eq(lshm__ring_new(&ring, 8, LSHM_CTX_NO_IO_URING), 0, "%s", lshm_last_error());
    pfd = (struct pollfd){ .fd = lshm__ring_fd(ring), .events = POLLIN };
    cr_assert_eq(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
    cr_assert_eq(lshm__ring_recvmsg(ring, sv[0], &m, &r.op), 0);
    cr_assert_eq(lshm__ring_timeout(ring, 20, &t.op), 0);
    cr_assert_eq(lshm__ring_run(ring, 0), 0);
    cr_assert_eq(lshm__ring_cancel(ring, &t.op), 0);
    for (t0 = now_ms(); t.at == 0 && now_ms() - t0 < 2000;)
        cr_assert_geq(lshm__ring_run(ring, 0), 0);
    cr_assert_eq(t.res, -ECANCELED, "timeout: %d", t.res);
    /* The cancelled timeout's time passes: the caller's poll wakes. */
    usleep(60000);
    cr_assert_eq(poll(&pfd, 1, 2000), 1, "the fd did not wake");
    /* As a poll loop does: a run without a wait for each wake-up. */
    for (i = 0; i < 3 && poll(&pfd, 1, 0) == 1; i++)
        cr_assert_geq(lshm__ring_run(ring, 0), 0);
    cr_assert_eq(poll(&pfd, 1, 0), 0, "the fd is still readable after %d runs that found "
                 "nothing: a poll loop on it spins", i);
    cr_assert_eq(r.at, 0);
    /* The receive still waits and still completes. */
    cr_assert_eq(send(sv[1], "one", 3, 0), 3);
    cr_assert_eq(poll(&pfd, 1, 2000), 1, "the fd did not wake for the datagram");
    for (t0 = now_ms(); r.at == 0 && now_ms() - t0 < 2000;)
        cr_assert_geq(lshm__ring_run(ring, 0), 0);
    cr_assert_eq(r.res, 3, "receive: %d", r.res);
    lshm__ring_close(ring, sv[0]);
    close(sv[1]);
    lshm__ring_free(ring);
}
