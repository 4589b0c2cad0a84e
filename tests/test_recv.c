/*
 * Receiving, end to end: the ping-pong in the pull and the handler style,
 * lshm_recv polling with a zero timeout, the bounded receive queue, and
 * waiting messages handed to a handler set late.
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
#include <dirent.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "linuxshm.h"
#include "port.h"
#include "port_util.h"

/* ======================================================================
 * Ping-pong, pull style and handler style
 * ====================================================================== */


LTEST(recv, pingpong_64B_pull_style_10000)
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

LTEST(recv, pingpong_64B_handler_style_10000)
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
 * lshm_recv(..., 0) polls: a message that has arrived is returned
 * without a wait, and never needs some other call to run the ring
 * ====================================================================== */

static int send_one_then_wait_bye(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    CK(send_pat(port, 7, 100, 0) == 0);
    return wait_bye(port);
}

LTEST(recv, recv_with_zero_timeout_returns_an_arrived_message)
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

        pattern_write(buf, 0, out.size, i);
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

LTEST(recv, recv_queue_bound_stops_reading_then_resumes)
{
    recv_queue_bound(0);
}

LTEST(recv, recv_queue_bound_single_shot_receives)
{
    recv_queue_bound(LSHM_CTX_NO_MULTISHOT);
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
LTEST(recv, handler_set_late_gets_waiting_messages_first_in_order)
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

/* ======================================================================
 * A receiver at its fd limit learns that, and the peer is not blamed
 * ====================================================================== */

static int at_fd_limit(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct rlimit rl;
    struct lshm_msg m;
    int top = 0, ret;
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;

    CK(lshm_port_wait(port, LSHM_WAIT_READY, 10000) > 0);
    /* Both rings exist before the limit (a ring's memfd is an fd too). */
    CK(send_inline(port, T_CTRL, 7, NULL, 0, -1) == 0);
    CK(lshm_recv(port, &m, 10000) == 0);
    CK(m.stream == 0);
    lshm_msg_done(&m);
    /* Every fd this child will ever have is open now: no room above them. */
    CK(d != NULL);
    while ((e = readdir(d)) != NULL)
        if (atoi(e->d_name) > top)
            top = atoi(e->d_name);
    closedir(d);
    CK(getrlimit(RLIMIT_NOFILE, &rl) == 0);
    rl.rlim_cur = (rlim_t)top + 1;
    CK(setrlimit(RLIMIT_NOFILE, &rl) == 0);
    /* Fill every free number below the limit (they close at exit). */
    while (dup(2) >= 0)
        ;
    CK(errno == EMFILE);
    CK(send_inline(port, T_CTRL, 0, NULL, 0, -1) == 0);
    /* What came before the message with an fd is delivered. */
    CK(lshm_recv(port, &m, 10000) == 0);
    CK(m.stream == 1 && m.fd < 0);
    lshm_msg_done(&m);
    ret = lshm_recv(port, &m, 10000);
    CK(ret == -EMFILE);
    CK(strstr(lshm_port_error(port), "out of file descriptors") != NULL);
    CK(strstr(lshm_port_error(port), "protocol violation") == NULL);
    return 0;
}

LTEST(recv, receiver_out_of_fds_says_so_instead_of_blaming_the_peer)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, at_fd_limit, NULL);
    int fds[2];

    wait_ready(port);
    cr_assert_eq(send_pat(port, 0, 10, 0), 0);
    cr_assert_eq(recv_ctrl(port, 10000), 7);
    cr_assert_eq(recv_ctrl(port, 10000), 0);
    cr_assert_eq(send_pat(port, 1, 10, 0), 0);
    cr_assert_eq(pipe(fds), 0);
    close(fds[1]);
    cr_assert_eq(send_inline(port, T_DATA, 2, "x", 1, fds[0]), 0);
    child_ok(pid, 10000);
    lshm_port_close(port);
    lshm_ctx_free(ctx);
}
