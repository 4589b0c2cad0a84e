/*
 * Shared memory, end to end: out of chunks and the SHM_ACK that wakes the
 * sender, tracking and cancelling, the receiver's segment limit, segments
 * shared by the ports and the threads of one peer, announcements on a
 * port that died, and segments that come with their pages (made ahead with
 * prealloc_segments; past the first only for a reader that stalls).
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
#include <sys/mman.h>
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
 * Out of chunks: -EAGAIN at the segment limit, then SHM_ACK wakes the
 * sender; a receiver holding every chunk cannot make it map more
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

LTEST(shm, out_of_chunks_eagain_then_shm_ack_wakes_sender)
{
    struct lshm_ctx_params prm = { .max_segments = 1 };
    struct lshm_ctx *ctx = ctx_make(&prm);
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, hold_then_release, NULL);
    int maps0 = count_maps(SEG_MAPS), ret, i;
    struct lshm_segment_header *hdr = NULL;
    struct lshm_buf *b;
    unsigned sent;
    long long t0;

    wait_ready(port);
    sent = send_held_until_eagain(port, &hdr);
    cr_assert_eq(sent, 10, "%u MiB before -EAGAIN, expected 10", sent);
    cr_assert_str_neq(lshm_last_error(), "");
    cr_assert_eq(count_maps(SEG_MAPS), maps0 + 1, "one segment mapped for the peer");
    /* Let the receiver take (and hold) all ten. */
    cr_assert_gt(lshm_port_wait(port, LSHM_WAIT_IDLE, 10000), 0);
    usleep(100 * 1000);
    for (i = 0; i < 200; i++) {
        cr_assert_eq(lshm_buf_alloc(port, 1, &b), -EAGAIN);
        if (i % 50 == 0)
            lshm_ctx_run(ctx, 1);
    }
    cr_assert_eq(count_maps(SEG_MAPS), maps0 + 1, "the limit of one segment was exceeded");
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
    cr_assert_eq(count_maps(SEG_MAPS), maps0 + 1);
    cr_assert_eq(recv_ctrl(port, 10000), 10);
    spawn_end(ctx, port, pid);
}

/* ======================================================================
 * Tracking: cancelled before receipt (flagged, or dropped), cancelled
 * after receipt (not cancelled); no slot or chunk leaks
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
            pattern_write(buf, 0, size, s);
            out.data = buf;
            out.size = size;
        } else {
            ret = lshm_buf_alloc(port, size, &b);
            cr_assert_eq(ret, 0, "round %u: lshm_buf_alloc: %d %s (chunk leak?)", r, ret,
                         lshm_last_error());
            cr_assert_geq(lshm_buf_capacity(b), size);
            pattern_write(lshm_buf_data(b), 0, size, s);
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

LTEST(shm, tracking_cancel_before_and_after_receipt_no_slot_leak)
{
    tracking_rounds(false);
}

LTEST(shm, tracking_cancelled_messages_dropped_with_DROP_CANCELLED)
{
    tracking_rounds(true);
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
            size_t size = (sent % 2 || sent == 0)
                              ? 16385 + pattern_rand_below(&rng, 240 * KiB)
                              : pattern_rand_below(&rng, 3000);

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

LTEST(shm, two_threads_two_contexts_share_one_peer)
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
LTEST(shm, two_ports_create_segments_for_one_peer)
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

/* The receiver's max_segments (from its HELLO) limits the sender too. */
LTEST(shm, receiver_segment_limit_binds_the_sender)
{
    struct lshm_ctx_params cprm = { .max_segments = 1 };
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    pid_t pid = spawn(ctx, &cprm, &port, hold_then_release, NULL);
    int maps0 = count_maps(SEG_MAPS);

    wait_ready(port);
    cr_assert_eq(send_held_until_eagain(port, NULL), 10);
    cr_assert_eq(count_maps(SEG_MAPS), maps0 + 1);
    cr_assert_eq(send_inline(port, T_CTRL, 0, NULL, 0, -1), 0);
    cr_assert_gt(lshm_port_wait(port, LSHM_WAIT_SHM, 10000), 0);
    cr_assert_eq(send_shm(port, 1000, HOLD_SIZE, -1), 0);
    cr_assert_eq(recv_ctrl(port, 10000), 10);
    spawn_end(ctx, port, pid);
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

LTEST(shm, segment_announced_on_a_dead_port_does_not_block_the_others)
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
 * Pages in place: a segment has its pages when it is made and when the
 * peer maps it, so that no message pays a page fault per 4 KiB; segments
 * made ahead of need; the default limit
 * ====================================================================== */

/* Minor faults of the calling thread so far. */
static long thread_minflt(void)
{
    struct rusage ru;

    if (getrusage(RUSAGE_THREAD, &ru) != 0)
        return -1;
    return ru.ru_minflt;
}

/* 10 MiB first-touched lazily fault 2560 times (one per 4 KiB page) to
 * write, 160 to read (fault-around maps 16 pages at a time).  AddressSanitizer
 * first touches the shadow of what is written or read: one byte per eight. */
#if defined(__SANITIZE_ADDRESS__)
#define SHADOW_FAULTS (LSHM_DATA_SIZE / 8 / 4096)
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SHADOW_FAULTS (LSHM_DATA_SIZE / 8 / 4096)
#endif
#endif
#ifndef SHADOW_FAULTS
#define SHADOW_FAULTS 0
#endif
#define FRESH_FAULTS_MAX (32 + SHADOW_FAULTS)

/* Receive one message, read every byte of it, report the faults the
 * reading took (not the mapping, which came with the message). */
static int read_counting_faults(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct lshm_msg m;
    long before, faults;
    bool good;

    CK(lshm_recv(port, &m, 20000) == 0);
    CK(m.flags & LSHM_MSG_SHM);
    before = thread_minflt();
    good = msg_check(&m, 5, LSHM_DATA_SIZE);
    faults = thread_minflt() - before;
    lshm_msg_done(&m);
    CK(good);
    CK(before >= 0);
    return report_then_bye(port, (uint32_t)faults);
}

LTEST(shm, fresh_segment_is_written_and_read_without_page_faults)
{
    const char *san = getenv("LSHM_SANITIZER");
    struct lshm_ctx *ctx;
    struct lshm_port *port;
    struct lshm_buf *b;
    long before, faults;
    uint32_t peer_faults;
    int maps0;
    pid_t pid;

    if (san != NULL && strcmp(san, "tsan") == 0)
        cr_skip_test("ThreadSanitizer's shadow memory takes page faults of its own");
    ctx = ctx_make(NULL);
    maps0 = count_maps(SEG_MAPS);
    pid = spawn(ctx, NULL, &port, read_counting_faults, NULL);
    wait_ready(port);
    /* The first buffer makes the segment: its pages come with it. */
    cr_assert_eq(lshm_buf_alloc(port, LSHM_DATA_SIZE, &b), 0, "%s", lshm_last_error());
    cr_assert_eq(count_maps(SEG_MAPS), maps0 + 1, "a fresh segment");
    cr_assert_eq(lshm_buf_capacity(b), LSHM_DATA_SIZE);
    before = thread_minflt();
    cr_assert_geq(before, 0);
    pattern_write(lshm_buf_data(b), 0, LSHM_DATA_SIZE, 5);
    faults = thread_minflt() - before;
    cr_log_info("writing 10 MiB of a fresh segment: %ld minor faults", faults);
    cr_assert_leq(faults, FRESH_FAULTS_MAX, "writing a fresh segment took %ld page faults: "
                  "its pages were not in place", faults);
    cr_assert_eq(lshm_buf_set_size(b, LSHM_DATA_SIZE), 0);
    cr_assert_eq(lshm_send(port, &(struct lshm_out){ .type = T_DATA, .stream = 5, .bufs = &b,
                                                    .nbufs = 1, .fd = -1 }, 0), 0,
                 "%s", lshm_last_error());
    peer_faults = recv_ctrl(port, 20000);
    cr_log_info("reading 10 MiB of a segment just mapped: %u minor faults", peer_faults);
    cr_assert_leq(peer_faults, FRESH_FAULTS_MAX, "the receiver's first read of a segment "
                  "it just mapped took %u page faults", peer_faults);
    spawn_end(ctx, port, pid);
}

/* The control: the same first touch of a plain memfd faults page by page,
 * so that the test above measures what it claims to. */
LTEST(shm, fault_count_sees_first_touch_of_plain_memfd)
{
    int fd = memfd_create("plain", MFD_CLOEXEC);
    long before, faults;
    uint8_t *p;

    cr_assert_geq(fd, 0);
    cr_assert_eq(ftruncate(fd, LSHM_DATA_SIZE), 0);
    p = mmap(NULL, LSHM_DATA_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    cr_assert_neq(p, MAP_FAILED);
    before = thread_minflt();
    pattern_write(p, 0, LSHM_DATA_SIZE, 5);
    faults = thread_minflt() - before;
    cr_assert_geq(faults, LSHM_DATA_SIZE / 4096 / 2, "only %ld faults writing 10 MiB of a "
                  "fresh memfd: getrusage does not count them here", faults);
    munmap(p, LSHM_DATA_SIZE);
    close(fd);
}

/* Report how many of the peer's segments this process mapped once the
 * first (inline) message came: the MMAPs went ahead of it. */
static int count_segments_mapped(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct lshm_msg m;
    int n;

    CK(lshm_recv(port, &m, 20000) == 0);
    CK(m.type == T_CTRL);
    lshm_msg_done(&m);
    n = count_maps(SEG_MAPS);
    CK(n >= 0);
    return report_then_bye(port, (uint32_t)n);
}

LTEST(shm, prealloc_segments_are_made_at_the_handshake)
{
    struct lshm_ctx_params prm = { .max_segments = 4, .prealloc_segments = 3 };
    struct lshm_ctx_params cprm = { .max_segments = 4 };
    struct lshm_ctx *ctx = ctx_make(&prm);
    struct lshm_port *port;
    int maps0 = count_maps(SEG_MAPS);
    pid_t pid = spawn(ctx, &cprm, &port, count_segments_mapped, NULL);
    struct lshm_buf *b[3];
    unsigned i;

    wait_ready(port);
    cr_assert_eq(count_maps(SEG_MAPS), maps0 + 3,
                 "prealloc_segments 3: %d segments right after the handshake",
                 count_maps(SEG_MAPS) - maps0);
    /* 30 MiB of buffers come from them: nothing more is made. */
    for (i = 0; i < 3; i++) {
        cr_assert_eq(lshm_buf_alloc(port, LSHM_DATA_SIZE, &b[i]), 0, "%s", lshm_last_error());
        cr_assert_eq(lshm_buf_capacity(b[i]), LSHM_DATA_SIZE);
    }
    cr_assert_eq(count_maps(SEG_MAPS), maps0 + 3);
    for (i = 0; i < 3; i++)
        lshm_buf_free(b[i]);
    cr_assert_eq(send_inline(port, T_CTRL, 0, NULL, 0, -1), 0);
    cr_assert_eq(recv_ctrl(port, 20000), 3, "the peer mapped the 3 segments before the "
                 "first message");
    spawn_end(ctx, port, pid);
}

LTEST(shm, prealloc_segments_stop_at_the_peers_limit)
{
    struct lshm_ctx_params prm = { .max_segments = 4, .prealloc_segments = 4 };
    struct lshm_ctx_params cprm = { .max_segments = 1 };
    struct lshm_ctx *ctx = ctx_make(&prm);
    struct lshm_port *port;
    int maps0 = count_maps(SEG_MAPS);
    pid_t pid = spawn(ctx, &cprm, &port, count_segments_mapped, NULL);

    wait_ready(port);
    cr_assert_eq(count_maps(SEG_MAPS), maps0 + 1, "the peer accepts one segment");
    cr_assert_eq(send_inline(port, T_CTRL, 0, NULL, 0, -1), 0);
    cr_assert_eq(recv_ctrl(port, 20000), 1);
    spawn_end(ctx, port, pid);
}

/* Hold every message until the inline "release", then report how many. */
static int hold_until_ctrl(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct lshm_msg held[8], m;
    unsigned n = 0, i;

    for (;;) {
        CK(lshm_recv(port, &m, 20000) == 0);
        if (m.type == T_CTRL) {
            lshm_msg_done(&m);
            break;
        }
        CK(n < 8);
        held[n++] = m;
    }
    for (i = 0; i < n; i++)
        lshm_msg_done(&held[i]);
    return report_then_bye(port, n);
}

LTEST(shm, second_segment_only_once_the_reader_gave_nothing_back)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    int maps0 = count_maps(SEG_MAPS), ret;
    pid_t pid = spawn(ctx, NULL, &port, hold_until_ctrl, NULL);
    struct lshm_buf *b;
    long long t0;

    wait_ready(port);
    cr_assert_eq(count_maps(SEG_MAPS), maps0, "no segment made ahead by default");
    cr_assert_eq(lshm_buf_alloc(port, LSHM_DATA_SIZE, &b), 0, "%s", lshm_last_error());
    cr_assert_eq(send_buf(port, b, 0, LSHM_DATA_SIZE), 0, "%s", lshm_last_error());
    /* The reader holds it: another segment is not made at once... */
    t0 = now_ms();
    cr_assert_eq(lshm_buf_alloc(port, 1, &b), -EAGAIN, "a second segment at once");
    cr_assert_eq(count_maps(SEG_MAPS), maps0 + 1);
    /* ...but once nothing came back for a while: a burst may grow. */
    ret = lshm_port_wait(port, LSHM_WAIT_SHM, 5000);
    cr_assert_gt(ret, 0, "%d %s", ret, lshm_last_error());
    cr_assert_eq(lshm_buf_alloc(port, LSHM_DATA_SIZE, &b), 0, "%s", lshm_last_error());
    cr_assert_geq(now_ms() - t0, 10, "the second segment came after %lld ms", now_ms() - t0);
    cr_assert_eq(count_maps(SEG_MAPS), maps0 + 2);
    cr_assert_eq(send_buf(port, b, 1, LSHM_DATA_SIZE), 0, "%s", lshm_last_error());
    cr_assert_eq(send_inline(port, T_CTRL, 0, NULL, 0, -1), 0);
    cr_assert_eq(recv_ctrl(port, 20000), 2);
    spawn_end(ctx, port, pid);
}
