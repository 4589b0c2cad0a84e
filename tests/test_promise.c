/*
 * What the pages promise where they used to be silent: when a tracked
 * message counts as read, that a cancelled message still carries its fd and
 * payload, that a handler's message outlives the handler, and that a
 * handler may wait.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>

#include "port_util.h"

/* The child: let the context take the message in, say so, then read it. */
static int take_in_then_read(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct lshm_msg m;

    CK(lshm_port_wait(port, LSHM_WAIT_RECV, 10000) > 0);
    CK(send_inline(port, T_CTRL, 1, NULL, 0, -1) == 0);
    CK(lshm_recv(port, &m, 10000) == 0);
    CK(m.stream == 7);
    CK(!(m.flags & LSHM_MSG_CANCELLED));
    lshm_msg_done(&m);
    return wait_bye(port);
}

LTEST(promise, tracked_message_counts_as_read_once_the_receivers_context_took_it)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    struct lshm_tracking *t;
    pid_t pid;

    pid = spawn(ctx, NULL, &port, take_in_then_read, NULL);
    wait_ready(port);
    cr_assert_eq(lshm_tracking_new(port, 7, &t), 0, "%s", lshm_last_error());
    cr_assert_eq(lshm_send(port, &(struct lshm_out){ .type = T_DATA, .stream = 7,
                                                     .data = "x", .size = 1, .fd = -1,
                                                     .tracking = t }, 0), 0);
    /* Taken in by the receiver's context, not yet returned by lshm_recv. */
    cr_assert_eq(recv_ctrl(port, 10000), 1);
    cr_assert_not(lshm_tracking_cancel(t), "a message the receiver's context took in was "
                  "still cancelled");
    spawn_end(ctx, port, pid);
}

/* The child: asleep while the parent sends and cancels, then reads. */
static int sleep_then_read_cancelled(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct lshm_msg m;
    struct stat st;

    usleep(1000 * 1000);
    CK(lshm_recv(port, &m, 10000) == 0);
    CK(m.stream == 9);
    CK(m.flags & LSHM_MSG_CANCELLED);
    CK(m.flags & LSHM_MSG_SHM);
    CK(msg_check(&m, 9, 50000));
    CK(m.fd >= 0 && fstat(m.fd, &st) == 0);
    close(m.fd);
    lshm_msg_done(&m);
    return report_then_bye(port, 2);
}

LTEST(promise, cancelled_message_still_carries_its_fd_and_payload)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    struct lshm_tracking *t;
    struct lshm_buf *bufs[LSHM_MAX_DESCS];
    struct iovec iov[LSHM_MAX_DESCS];
    unsigned n;
    size_t off = 0;
    int pfd[2];
    pid_t pid;

    pid = spawn(ctx, NULL, &port, sleep_then_read_cancelled, NULL);
    wait_ready(port);
    cr_assert_eq(pipe(pfd), 0);
    cr_assert_eq(lshm_tracking_new(port, 9, &t), 0, "%s", lshm_last_error());
    cr_assert_eq(lshm_bufs_alloc(port, 50000, 1000, bufs, &n), 0, "%s", lshm_last_error());
    lshm_bufs_iov(bufs, n, iov);
    for (unsigned i = 0; i < n; i++) {
        pattern_write(iov[i].iov_base, off, iov[i].iov_len, 9);
        off += iov[i].iov_len;
    }
    cr_assert_eq(lshm_send(port, &(struct lshm_out){ .type = T_DATA, .stream = 9, .bufs = bufs,
                                                     .nbufs = n, .fd = pfd[0],
                                                     .tracking = t }, 0), 0);
    cr_assert(lshm_tracking_cancel(t), "the cancel did not come first");
    cr_assert_eq(recv_ctrl(port, 10000), 2);
    close(pfd[1]);
    spawn_end(ctx, port, pid);
}

struct kept {
    struct lshm_port *port;
    struct lshm_msg  *msg[2];
    unsigned          n;
    int               waited;
};

static void keep_and_wait(struct lshm_port *port, struct lshm_msg *m, void *arg)
{
    struct kept *k = arg;

    if (k->n < 2)
        k->msg[k->n++] = m;
    if (k->n == 1) {
        /* Inside the handler: send, then wait until it went out. */
        send_pat(port, 2, 300, 0);
        k->waited = lshm_port_wait(port, LSHM_WAIT_IDLE, 5000);
    }
}

LTEST(promise, handler_may_wait_and_its_message_outlives_it)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    struct kept k = { 0 };
    long long end;
    pid_t pid;

    pid = spawn(ctx, NULL, &port, echo_pull, NULL);
    wait_ready(port);
    cr_assert_eq(lshm_port_set_handler(port, keep_and_wait, NULL, &k), 0);
    cr_assert_eq(send_pat(port, 1, 200, 0), 0);
    end = now_ms() + 10000;
    while (k.n < 2 && now_ms() < end)
        cr_assert_geq(lshm_ctx_run(ctx, 100), 0, "%s", lshm_last_error());
    cr_assert_eq(k.n, 2);
    cr_assert_gt(k.waited, 0, "a wait inside the handler: %d %s", k.waited, lshm_last_error());
    /* Both messages are still whole after their handlers returned. */
    cr_assert(msg_check(k.msg[0], 1, 200));
    cr_assert(msg_check(k.msg[1], 2, 300));
    lshm_msg_done(k.msg[0]);
    lshm_msg_done(k.msg[1]);
    spawn_end(ctx, port, pid);
}
