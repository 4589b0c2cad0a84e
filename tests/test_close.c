/*
 * The end of a port, end to end: a peer killed mid-stream, a peer closing a
 * port mid-stream, what was queued sent before the BYE, messages held across
 * lshm_port_close and lshm_ctx_free, a port closed in its own handler, and a
 * reconnect while the old port drains.
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
#include <sys/mman.h>
#include <unistd.h>

#include "linuxshm.h"
#include "port.h"
#include "port_util.h"

/* ======================================================================
 * A peer killed with SIGKILL mid-stream, 20 times: the survivor sees
 * the port close and gets back every fd and mapping
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
    int fds0 = count_fds(), maps0 = count_maps(SEG_MAPS);
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
        /* A crash is not a goodbye: -ECONNRESET, never BYE's -EPIPE. */
        cr_assert(ret == -ECONNRESET,
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
        cr_assert_eq(count_maps(SEG_MAPS), maps0, "iteration %u: %d memfd mappings, %d before",
                     it, count_maps(SEG_MAPS), maps0);
    }
    lshm_ctx_free(ctx);
}

LTEST(close, peer_sigkilled_midstream_20_times_nothing_leaks)
{
    killed_peers(NULL, 20);
}

/* The same with single-shot receives (EOF comes as a 0 result there). */
LTEST(close, peer_sigkilled_midstream_single_shot_receives_nothing_leaks)
{
    struct lshm_ctx_params prm = { .flags = LSHM_CTX_NO_MULTISHOT };

    killed_peers(&prm, 10);
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
    /* Let the sender fill what it may (every chunk) before the first read:
     * the close below then comes with messages in flight, whatever the
     * machine's speed. */
    usleep(300 * 1000);
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

LTEST(close, peer_closing_midstream_leaks_no_chunk_or_tracking_slot)
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
    /* A sender that writes only its ring still notices the close soon
     * (it took 171,138 messages on the epoll carrier before it looked). */
    cr_assert_lt(sent, 20000, "%u sent before the peer's BYE was seen", sent);
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

LTEST(close, reconnect_while_the_old_port_drains_starts_a_new_pair_on_both_sides)
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

LTEST(close, ctx_free_sends_what_is_queued_then_bye)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    pid_t pid = spawn_queued(ctx, &port);

    lshm_ctx_free(ctx);     /* nothing waited for: the free must send it all */
    child_ok(pid, 10000);
}

LTEST(close, port_close_sends_what_is_queued_then_bye)
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

LTEST(close, messages_held_across_port_close_stay_valid)
{
    held_after_close(false);
}

LTEST(close, messages_held_across_ctx_free_stay_valid)
{
    held_after_close(true);
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

LTEST(close, port_closed_inside_its_own_handler)
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

LTEST(close, peer_sigkilled_handler_style_on_close_once)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    int fds0 = count_fds(), maps0 = count_maps(SEG_MAPS), it, i;

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
        cr_assert(d.error == -ECONNRESET, "close error %d, not -ECONNRESET", d.error);
        cr_assert_eq(count_fds(), fds0);
        cr_assert_eq(count_maps(SEG_MAPS), maps0);
    }
    lshm_ctx_free(ctx);
}

/* ======================================================================
 * A peer killed with our datagrams unread: the kernel says ECONNRESET
 * where it would say end of file; the port tells it the same way
 * ====================================================================== */

/* Take one message, then read no more until killed. */
static int stop_reading(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct lshm_msg m;

    (void)ctx, (void)arg;
    CK(lshm_recv(port, &m, 10000) == 0);
    lshm_msg_done(&m);
    for (;;)
        pause();
}

static void killed_with_datagrams_unread(unsigned ctx_flags)
{
    struct lshm_ctx_params prm = { .flags = ctx_flags };
    struct lshm_ctx *ctx = ctx_make(&prm);
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, stop_reading, NULL);
    struct lshm_msg m;
    int i, ret, st, fd;

    wait_ready(port);
    cr_assert_eq(send_pat(port, 0, 64, 0), 0);
    /* Messages with an fd always take the socket: they stay unread there. */
    for (i = 1; i <= 4; i++) {
        fd = memfd_create("unread", MFD_CLOEXEC);
        cr_assert_geq(fd, 0);
        cr_assert_eq(send_inline(port, T_DATA, (uint32_t)i, "x", 1, fd), 0, "%s",
                     lshm_last_error());
    }
    cr_assert_gt(lshm_port_wait(port, LSHM_WAIT_IDLE, 10000), 0, "%s", lshm_last_error());
    cr_assert_eq(kill(pid, SIGKILL), 0);
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    ret = lshm_recv(port, &m, 10000);
    cr_assert_eq(ret, -ECONNRESET, "%d %s", ret, lshm_last_error());
    cr_assert_not_null(lshm_port_error(port));
    cr_assert(strstr(lshm_port_error(port), "without BYE (it exited, crashed or was killed)"),
              "%s: %s", lshm_ctx_carrier(ctx), lshm_port_error(port));
    lshm_port_close(port);
    lshm_ctx_free(ctx);
}

LTEST(close, peer_killed_with_our_datagrams_unread_went_without_bye)
{
    killed_with_datagrams_unread(0);
}

LTEST(close, peer_killed_with_our_datagrams_unread_went_without_bye_on_epoll)
{
    killed_with_datagrams_unread(LSHM_CTX_NO_IO_URING);
}

LTEST(close, peer_killed_with_our_datagrams_unread_went_without_bye_single_shot)
{
    killed_with_datagrams_unread(LSHM_CTX_NO_MULTISHOT);
}
