/*
 * Whole payloads (lshm_bufs_alloc): N bytes in as many pieces as the free
 * runs take, their iov and copy-in, waiting for chunks or -EAGAIN, and
 * nothing kept on failure.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "port_util.h"

/* The child: check every message's pattern, answer each with a T_CTRL of
 * its stream, hold the ones marked LAST until the parent says "release"
 * (an empty T_CTRL), until the peer closes. */
static int check_and_ack(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct lshm_msg held[64], m;
    unsigned nheld = 0;

    while (lshm_recv(port, &m, 20000) == 0) {
        if (m.type == T_CTRL) {
            lshm_msg_done(&m);
            while (nheld > 0)
                lshm_msg_done(&held[--nheld]);
            continue;
        }
        CK(msg_check(&m, m.stream, m.size));
        CK(send_inline(port, T_CTRL, m.stream, NULL, 0, -1) == 0);
        if ((m.flags & LSHM_MSG_LAST) && nheld < 64)
            held[nheld++] = m;
        else
            lshm_msg_done(&m);
    }
    while (nheld > 0)
        lshm_msg_done(&held[--nheld]);
    return 0;
}

static int send_payload(struct lshm_port *port, uint32_t seq, size_t size, bool last,
                        unsigned *pieces)
{
    struct lshm_buf *bufs[LSHM_MAX_DESCS];
    struct iovec iov[LSHM_MAX_DESCS];
    uint8_t *src = malloc(size);
    unsigned n;
    size_t total, sum = 0;
    int ret;

    cr_assert_not_null(src);
    pattern_write(src, 0, size, seq);
    ret = lshm_bufs_alloc(port, size, 10000, bufs, &n);
    if (ret < 0) {
        free(src);
        return ret;
    }
    total = lshm_bufs_iov(bufs, n, iov);
    cr_assert_eq(total, size);
    for (unsigned i = 0; i < n; i++) {
        cr_assert_gt(iov[i].iov_len, 0);
        sum += iov[i].iov_len;
    }
    cr_assert_eq(sum, size);
    /* Copied in two steps across the pieces' edges. */
    cr_assert_eq(lshm_bufs_copy_in(bufs, n, 0, src, size / 3), 0);
    cr_assert_eq(lshm_bufs_copy_in(bufs, n, size / 3, src + size / 3, size - size / 3), 0);
    cr_assert_eq(lshm_bufs_copy_in(bufs, n, size, src, 1), -ERANGE);
    free(src);
    if (pieces != NULL)
        *pieces = n;
    ret = lshm_send(port, &(struct lshm_out){ .type = T_DATA, .stream = seq, .last = last,
                                              .bufs = bufs, .nbufs = n, .fd = -1 }, 0);
    if (ret < 0)
        lshm_bufs_free(bufs, n);
    return ret;
}

LTEST(payload, whole_payload_in_pieces_around_held_chunks)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    struct lshm_buf *one[40];
    unsigned pieces = 0;
    pid_t pid;

    pid = spawn(ctx, NULL, &port, check_and_ack, NULL);
    wait_ready(port);
    /* Scatter the first segment: every other chunk of its start is taken. */
    for (unsigned i = 0; i < 40; i++)
        cr_assert_eq(lshm_buf_alloc(port, LSHM_CHUNK_SIZE, &one[i]), 0, "%s",
                     lshm_last_error());
    for (unsigned i = 1; i < 40; i += 2)
        lshm_buf_free(one[i]);
    /* 3.5 MiB frames come back whole, in as many pieces as it takes. */
    for (uint32_t i = 0; i < 8; i++) {
        cr_assert_eq(send_payload(port, i, 3584 * KiB + i, false, &pieces), 0, "%s",
                     lshm_last_error());
        cr_assert_eq(recv_ctrl(port, 10000), i);
        if (i == 0)
            cr_assert_gt(pieces, 10, "the free runs are short: %u pieces", pieces);
    }
    for (unsigned i = 0; i < 40; i += 2)
        lshm_buf_free(one[i]);
    spawn_end(ctx, port, pid);
}

LTEST(payload, no_memory_now_is_eagain_and_keeps_nothing)
{
    struct lshm_ctx_params cp = { .max_segments = 1 };
    struct lshm_ctx *ctx = ctx_make(&cp);
    struct lshm_port *port;
    struct lshm_buf *bufs[LSHM_MAX_DESCS], *b;
    unsigned n = 99;
    long long t0;
    pid_t pid;
    int ret;

    pid = spawn(ctx, NULL, &port, check_and_ack, NULL);
    wait_ready(port);
    /* The receiver holds 8 MiB of the only segment. */
    cr_assert_eq(send_payload(port, 1, 8 * MiB, true, NULL), 0, "%s", lshm_last_error());
    cr_assert_eq(recv_ctrl(port, 10000), 1);
    ret = lshm_bufs_alloc(port, 3 * MiB, 0, bufs, &n);
    cr_assert_eq(ret, -EAGAIN, "%d %s", ret, lshm_last_error());
    cr_assert_eq(n, 0);
    t0 = now_ms();
    ret = lshm_bufs_alloc(port, 3 * MiB, 200, bufs, &n);
    cr_assert_eq(ret, -EAGAIN, "%d %s", ret, lshm_last_error());
    cr_assert_geq(now_ms() - t0, 190);
    cr_assert_lt(now_ms() - t0, 1500);
    /* Nothing was kept: the 2 MiB left free are still all there. */
    cr_assert_eq(lshm_buf_alloc(port, 2 * MiB, &b), 0, "%s", lshm_last_error());
    cr_assert_eq(lshm_buf_capacity(b), 2 * MiB);
    lshm_buf_free(b);
    /* Once the receiver lets go, a waiting allocation gets its memory. */
    cr_assert_eq(send_inline(port, T_CTRL, 0, NULL, 0, -1), 0);
    ret = lshm_bufs_alloc(port, 9 * MiB, 5000, bufs, &n);
    cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    lshm_bufs_free(bufs, n);
    spawn_end(ctx, port, pid);
}

LTEST(payload, bad_arguments)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    struct lshm_buf *bufs[LSHM_MAX_DESCS];
    unsigned n;
    pid_t pid;

    pid = spawn(ctx, NULL, &port, check_and_ack, NULL);
    wait_ready(port);
    cr_assert_eq(lshm_bufs_alloc(port, 0, 0, bufs, &n), -EMSGSIZE);
    cr_assert_eq(lshm_bufs_alloc(port, (size_t)LSHM_MAX_DESCS * LSHM_DATA_SIZE + 1, 0, bufs, &n),
                 -EMSGSIZE);
    cr_assert_eq(lshm_bufs_alloc(port, 100, 0, NULL, &n), -EINVAL);
    cr_assert_eq(lshm_bufs_alloc(NULL, 100, 0, bufs, &n), -EINVAL);
    cr_assert_eq(lshm_bufs_copy_in(bufs, 0, 0, "x", 1), -EINVAL);
    cr_assert_eq(lshm_bufs_iov(bufs, 0, NULL), 0);
    lshm_bufs_free(NULL, 0);
    spawn_end(ctx, port, pid);
}
