/*
 * Interoperability with an independent implementation of the wire protocol.
 *
 * The peer in tests/interop/ was written from linuxshm-protocol(7) alone:
 * its own structures and constants, raw SOCK_SEQPACKET sendmsg/recvmsg with
 * SCM_RIGHTS and SCM_CREDENTIALS, its own sealed memfd segments.  It is built
 * without the library's include path and calls no lshm_* function; it runs
 * in a forked child, and the library port lives in the test process (made
 * with lshm_socketpair before the fork).  The child reports a failed check
 * on stderr and in its exit status; results that the parent must compare
 * travel back as inline user messages of type T_REPORT.
 *
 *   handshake            HELLOs both ways, credentials, port ids
 *   lib_to_peer          inline and shared-memory messages to the peer, which
 *                        frees the chunks; they all come back; oosm, SHM_ACK
 *   peer_to_lib          the peer's own segment; the library frees exactly
 *                        the chunks each descriptor covers; SHM_ACK from it
 *   tracking_from_peer   cancelled and not cancelled tracked messages
 *   bye_from_peer        BYE after queued messages: drained, then -EPIPE
 *   tracking_from_lib    the library's tracking slots, seen by the peer
 *   peer_max_segments    the peer's HELLO bounds the library's segments
 *   segment_ids_per_pair two ports share the pair's ids; a later connection
 *                        starts again from 0
 *   pair_restarts_after_peer_closed_unread_port
 *                        the peer closed every port, one still unread here
 *                        (recv_queue 1): its new port starts again from 0
 *   second_port_mmap_id_0_while_first_open_is_violation
 *                        with a port still open at the peer, id 0 on another
 *                        is refused; only that port closes
 *
 * Message rings (protocol version 2).  The tests above run with a peer
 * whose HELLO lacks RING; these with one whose HELLO sets it:
 *   ring_hello_*         the library's HELLO sets RING (and FUTEX) unless
 *                        LSHM_CTX_NO_RING, with ring_size; with either HELLO
 *                        lacking RING, everything goes over the socket
 *   ring_inline_and_shm_both_ways_wrap_many_times
 *                        600 messages each way through 64 KiB rings
 *   ring_order_of_ring_fd_and_mmap_messages_both_ways
 *                        ring, ring, fd, ring, a segment's first message ...
 *   ring_full_*          a slow consumer: the producer waits, space = 1 and
 *                        SHM_ACK, nothing overwritten or lost
 *   ring_sleeping_consumers_woken_*, ring_futex_library_is_woken_by_wake_datagrams_too
 *                        ping-pong with naps: futex wake-ups, WAKE datagrams
 *   ring_busy_polling_consumer_needs_no_wake_ups
 *                        spin_us longer than the peer's nap: no wake-up owed
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"
#include "linuxshm.h"
#include "pattern.h"
#include "peer.h"

/* The page and <linuxshm.h> must agree. */
_Static_assert(P_MAGIC == LSHM_MAGIC, "magic");
_Static_assert(P_VERSION == LSHM_PROTOCOL_VERSION, "version");
_Static_assert(P_HEADER_SIZE == LSHM_HEADER_SIZE, "header size");
_Static_assert(P_CHUNK_SIZE == LSHM_CHUNK_SIZE, "chunk size");
_Static_assert(P_CHUNK_COUNT == LSHM_CHUNK_COUNT, "chunk count");
_Static_assert(P_DATA_SIZE == LSHM_DATA_SIZE, "data size");
_Static_assert(P_SEGMENT_SIZE == LSHM_SEGMENT_SIZE, "segment size");
_Static_assert(P_DATA_SIZE == P_CHUNK_SIZE * P_CHUNK_COUNT, "data area");
_Static_assert(P_SEGMENT_SIZE == P_HEADER_SIZE + P_DATA_SIZE, "segment");
_Static_assert(P_INLINE_MAX == LSHM_INLINE_MAX, "inline max");
_Static_assert(P_WIRE_MAX == LSHM_WIRE_MAX, "wire max");
_Static_assert(P_MAX_DESCS == LSHM_MAX_DESCS, "max descs");
_Static_assert(P_USER_MIN == LSHM_TYPE_USER_MIN, "user types");

/* ---- The library side (the test process) ---- */

struct ipair {
    struct lshm_ctx  *ctx;
    struct lshm_port *port;
    pid_t             pid;
};

static void ip_start(struct ipair *ip, unsigned max_segments, peer_fn fn)
{
    struct lshm_ctx_params prm;
    int sock, ret;

    memset(&prm, 0, sizeof(prm));
    prm.max_segments = max_segments;
    ret = lshm_ctx_new(&ip->ctx, &prm);
    cr_assert_eq(ret, 0, "lshm_ctx_new: %d %s", ret, lshm_last_error());
    ret = lshm_socketpair(ip->ctx, &ip->port, &sock);
    cr_assert_eq(ret, 0, "lshm_socketpair: %d %s", ret, lshm_last_error());
    fflush(NULL);
    ip->pid = fork();
    cr_assert_geq(ip->pid, 0);
    if (ip->pid == 0)
        peer_run(&sock, 1, fn);
    close(sock);
}

static void ip_ready(struct ipair *ip)
{
    int ret = lshm_port_wait(ip->port, LSHM_WAIT_READY, TIMEOUT_MS);

    cr_assert(ret > 0 && (ret & LSHM_WAIT_READY), "handshake: %d %s", ret,
              lshm_port_error(ip->port) ? lshm_port_error(ip->port) : lshm_last_error());
}

static void ip_finish(struct ipair *ip)
{
    int st;

    lshm_port_close(ip->port);
    lshm_ctx_free(ip->ctx);
    st = wait_child(ip->pid, TIMEOUT_MS);
    cr_assert_neq(st, -1, "the independent peer did not finish");
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0,
              "the independent peer failed (%s %d), see its line on stderr",
              WIFEXITED(st) ? "exit" : "signal", WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
}

static void ip_recv(struct ipair *ip, struct lshm_msg *msg)
{
    int ret = lshm_recv(ip->port, msg, TIMEOUT_MS);

    cr_assert_eq(ret, 0, "lshm_recv: %d (%s); the peer's stderr may say why", ret,
                 lshm_port_error(ip->port) ? lshm_port_error(ip->port) : lshm_last_error());
}

static void ip_recv_report(struct ipair *ip, uint32_t tag, struct report *r)
{
    struct lshm_msg msg;

    ip_recv(ip, &msg);
    cr_assert_eq(msg.type, T_REPORT);
    cr_assert_eq(msg.flags, 0);
    cr_assert_eq(msg.size, sizeof(*r));
    cr_assert_eq(msg.niov, 1);
    memcpy(r, msg.iov[0].base, sizeof(*r));
    cr_assert_eq(msg.fd, -1);
    lshm_msg_done(&msg);
    cr_assert_eq(r->tag, tag);
}

static void ip_expect_closed(struct ipair *ip)
{
    struct lshm_msg msg;
    int ret = lshm_recv(ip->port, &msg, TIMEOUT_MS);

    cr_assert_eq(ret, -EPIPE, "lshm_recv after the peer's BYE: %d", ret);
    cr_assert_not_null(lshm_port_error(ip->port));
    cr_log_info("interop: port closed: %s", lshm_port_error(ip->port));
}

static void ip_signal(struct ipair *ip, const char *word)
{
    struct lshm_out out = { .type = T_SIGNAL, .data = word, .size = strlen(word), .fd = -1 };
    int ret = lshm_send(ip->port, &out, 0);

    cr_assert_eq(ret, 0, "lshm_send: %d %s", ret, lshm_last_error());
}

/* Check a received payload against pattern_byte(stream, offset). */
static void check_bytes(const struct lshm_msg *msg, uint32_t stream)
{
    uint64_t off = 0;
    unsigned i;
    size_t k;

    for (i = 0; i < msg->niov; i++) {
        const uint8_t *b = msg->iov[i].base;

        for (k = 0; k < msg->iov[i].len; k++, off++)
            if (b[k] != pattern_byte(stream, off))
                cr_assert_fail("stream %u: byte %llu is %#x, want %#x", stream,
                               (unsigned long long)off, b[k], pattern_byte(stream, off));
    }
    cr_assert_eq(off, msg->size);
}

static uint64_t fnv_pat(uint64_t h, uint32_t stream, uint64_t size)
{
    uint64_t off;

    for (off = 0; off < size; off++)
        h = fnv_byte(h, pattern_byte(stream, off));
    return h;
}

/* ================= 1. handshake both ways ================= */

LTEST(interop, handshake)
{
    struct lshm_out ping = { .type = T_SIGNAL, .last = 1, .stream = 5, .data = "ping",
                             .size = 4, .fd = -1 };
    struct ipair ip;
    struct report r;
    pid_t pid = 0;
    uid_t uid = 0;
    gid_t gid = 0;
    int ret;

    ip_start(&ip, 7, peer_handshake_main);
    ret = lshm_send(ip.port, &ping, 0);
    cr_assert_eq(ret, 0, "inline send before the handshake: %d", ret);
    ip_ready(&ip);
    ret = lshm_port_peer(ip.port, &pid, &uid, &gid);
    cr_assert_eq(ret, 0);
    cr_assert_eq(pid, ip.pid, "peer pid %d, child %d", (int)pid, (int)ip.pid);
    cr_assert_eq(uid, getuid());
    cr_assert_eq(gid, getgid());

    ip_recv_report(&ip, 1, &r);
    cr_assert_eq(r.a, (uint32_t)lshm_port_id(ip.port), "HELLO port_id %u, lshm_port_id %d",
                 r.a, lshm_port_id(ip.port));
    cr_assert_eq(r.b, 7, "HELLO max_segments %u", r.b);
    cr_assert_eq(r.c, (uint32_t)getpid());
    ip_signal(&ip, "bye");
    ip_expect_closed(&ip);
    ip_finish(&ip);
}

/* ================= 2. library -> peer ================= */

static void fill_buf(struct lshm_buf *b, uint32_t stream, uint64_t off, size_t len)
{
    uint8_t *d = lshm_buf_data(b);
    size_t i;

    for (i = 0; i < len; i++)
        d[i] = pattern_byte(stream, off + i);
}

static void lib_send(struct ipair *ip, const struct lib_msg *l, int fd)
{
    static uint8_t inl[P_INLINE_MAX];
    struct lshm_out out = { .type = l->type, .last = !!(l->flags & P_F_LAST),
                            .stream = l->stream, .fd = fd };
    struct lshm_buf *bufs[3];
    uint64_t off = 0;
    unsigned i;
    int ret;

    if (l->nbufs == 0) {
        for (i = 0; i < l->sizes[0]; i++)
            inl[i] = pattern_byte(l->stream, i);
        out.data = l->sizes[0] > 0 ? inl : NULL;
        out.size = l->sizes[0];
    } else {
        for (i = 0; i < l->nbufs; i++) {
            ret = lshm_buf_alloc(ip->port, l->sizes[i], &bufs[i]);
            cr_assert_eq(ret, 0, "lshm_buf_alloc(%u): %d %s", l->sizes[i], ret,
                         lshm_last_error());
            cr_assert_geq(lshm_buf_capacity(bufs[i]), l->sizes[i],
                          "a fresh segment gave %zu bytes for %u",
                          lshm_buf_capacity(bufs[i]), l->sizes[i]);
            fill_buf(bufs[i], l->stream, off, l->sizes[i]);
            cr_assert_eq(lshm_buf_set_size(bufs[i], l->sizes[i]), 0);
            off += l->sizes[i];
        }
        out.bufs = bufs;
        out.nbufs = l->nbufs;
    }
    ret = lshm_send(ip->port, &out, 0);
    cr_assert_eq(ret, 0, "lshm_send stream %u: %d %s", l->stream, ret, lshm_last_error());
}

static bool wait_readable(int fd, int timeout_ms)
{
    struct pollfd pfd = { .fd = fd, .events = POLLIN };

    return poll(&pfd, 1, timeout_ms) == 1;
}

LTEST(interop, lib_to_peer)
{
    static struct lshm_buf *all[LSHM_CHUNK_COUNT + 1];
    struct lshm_buf *big;
    struct ipair ip;
    struct report r;
    uint64_t fnv = FNV_INIT, bytes = 0;
    long long end;
    char got[8];
    int maps0, maps1, pfd[2], ret;
    unsigned i, n;

    /* One segment at most: its chunks must come back, or allocation fails. */
    ip_start(&ip, 1, peer_lib_to_peer);
    ip_ready(&ip);
    maps0 = count_maps("memfd:");
    cr_assert_eq(pipe2(pfd, O_CLOEXEC), 0);
    for (i = 0; i < N_LIB_MSGS; i++) {
        lib_send(&ip, &lib_msgs[i], lib_msgs[i].stream == 8 ? pfd[1] : -1);
        fnv = fnv_pat(fnv, lib_msgs[i].stream, lib_msg_size(&lib_msgs[i]));
        bytes += lib_msg_size(&lib_msgs[i]);
    }
    maps1 = count_maps("memfd:");
    cr_expect_eq(maps1, maps0 + 1, "one segment: memfd mappings %d -> %d", maps0, maps1);

    ip_recv_report(&ip, 1, &r);
    cr_assert_eq(r.a, N_LIB_MSGS);
    cr_assert_eq(r.b, 5, "shared-memory messages seen: %u", r.b);
    cr_assert_eq(r.bytes, bytes);
    cr_assert_eq(r.fnv, fnv, "payload checksum differs");
    cr_expect_eq(r.c, 0, "oosm was set although chunks never ran out");

    /* The user fd arrived: the peer wrote into it; every copy is closed. */
    cr_assert(wait_readable(pfd[0], TIMEOUT_MS));
    cr_assert_eq(read(pfd[0], got, sizeof(got)), 5);
    cr_assert_arr_eq(got, "fd-ok", 5);
    /* The library closes its copy once the send completed, which it learns
     * only while its context runs. */
    end = now_ms() + TIMEOUT_MS;
    while (!wait_readable(pfd[0], 0) && now_ms() < end)
        lshm_ctx_run(ip.ctx, 10);
    cr_expect(wait_readable(pfd[0], 0) && read(pfd[0], got, sizeof(got)) == 0,
              "the write end of the pipe is still open somewhere");
    close(pfd[0]);

    /* Every chunk came back: 640 single chunks, not one more, no new segment. */
    for (n = 0; n <= LSHM_CHUNK_COUNT; n++) {
        ret = lshm_buf_alloc(ip.port, 1, &all[n]);
        if (ret < 0)
            break;
        cr_assert_eq(lshm_buf_capacity(all[n]), LSHM_CHUNK_SIZE);
    }
    cr_assert_eq(n, LSHM_CHUNK_COUNT, "allocated %u chunks, then %d", n, ret);
    cr_assert_eq(ret, -EAGAIN);
    cr_assert_eq(count_maps("memfd:"), maps1);
    for (i = 0; i < n; i++)
        lshm_buf_free(all[i]);

    /* ... and as one run: the whole data area of segment 0. */
    ret = lshm_buf_alloc(ip.port, LSHM_DATA_SIZE, &big);
    cr_assert_eq(ret, 0, "whole segment: %d %s", ret, lshm_last_error());
    cr_assert_eq(lshm_buf_capacity(big), LSHM_DATA_SIZE);
    fill_buf(big, 9, 0, LSHM_DATA_SIZE);
    {
        struct lshm_out out = { .type = 19, .stream = 9, .bufs = &big, .nbufs = 1, .fd = -1 };

        ret = lshm_send(ip.port, &out, 0);
        cr_assert_eq(ret, 0, "lshm_send: %d %s", ret, lshm_last_error());
    }
    /* Out of chunks at the segment limit: the library sets oosm, and the
     * peer's SHM_ACK (or the timer) wakes LSHM_WAIT_SHM once it frees. */
    ret = lshm_buf_alloc(ip.port, 1, &all[0]);
    cr_assert_eq(ret, -EAGAIN, "segment full, limit 1: %d", ret);
    ip_signal(&ip, "release");
    end = now_ms() + TIMEOUT_MS;
    while ((ret = lshm_buf_alloc(ip.port, LSHM_DATA_SIZE, &big)) == -EAGAIN) {
        cr_assert(now_ms() < end, "the chunks of the whole-segment message never came back");
        ret = lshm_port_wait(ip.port, LSHM_WAIT_SHM, 1000);
        cr_assert(ret > 0 || ret == -ETIMEDOUT, "lshm_port_wait(SHM): %d", ret);
    }
    cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    cr_assert_eq(lshm_buf_capacity(big), LSHM_DATA_SIZE);
    lshm_buf_free(big);
    cr_assert_eq(count_maps("memfd:"), maps1);

    ip_recv_report(&ip, 2, &r);
    cr_assert_eq(r.fnv, fnv_pat(FNV_INIT, 9, LSHM_DATA_SIZE), "10 MiB checksum differs");
    cr_expect_eq(r.a, 1, "oosm after an allocation failed at the segment limit: %u", r.a);
    cr_expect_eq(r.b, 1, "the peer's CAS of oosm 1 -> 0 (and SHM_ACK): %u", r.b);
    ip_finish(&ip);
}

/* ================= 3. peer -> library ================= */

LTEST(interop, peer_to_lib)
{
    static const struct {
        uint32_t stream;
        uint8_t  type, flags;
        size_t   size;
        unsigned niov;
    } want[4] = {
        { 11, 16, LSHM_MSG_SHM, 1, 1 },
        { 12, 17, LSHM_MSG_SHM, 16384, 1 },
        { 13, 18, LSHM_MSG_SHM, 102400, 1 },
        { 14, 19, LSHM_MSG_SHM | LSHM_MSG_LAST, 16389, 2 },
    };
    struct lshm_msg msg[4];
    struct ipair ip;
    int maps0, i;

    maps0 = count_maps("memfd:");
    ip_start(&ip, 0, peer_to_lib_main);
    ip_ready(&ip);
    for (i = 0; i < 4; i++) {
        ip_recv(&ip, &msg[i]);
        cr_assert_eq(msg[i].stream, want[i].stream, "message %d: stream %u", i, msg[i].stream);
        cr_assert_eq(msg[i].type, want[i].type);
        cr_assert_eq(msg[i].flags, want[i].flags, "stream %u: flags %#x", msg[i].stream,
                     msg[i].flags);
        cr_assert_eq(msg[i].size, want[i].size);
        cr_assert_eq(msg[i].niov, want[i].niov);
        check_bytes(&msg[i], want[i].stream);
        if (i == 2) {
            cr_assert_geq(msg[i].fd, 0);
            cr_assert(fcntl(msg[i].fd, F_GETFD) & FD_CLOEXEC);
        } else {
            cr_assert_eq(msg[i].fd, -1);
        }
    }
    cr_assert_eq(msg[3].iov[0].len, 16384);
    cr_assert_eq(msg[3].iov[1].len, 5);
    cr_expect_eq(count_maps("memfd:"), maps0 + 1, "the peer's segment is mapped once");
    cr_assert_eq(write(msg[2].fd, "x", 1), 1);
    close(msg[2].fd);
    for (i = 0; i < 4; i++)
        lshm_msg_done(&msg[i]);
    ip_signal(&ip, "done");
    ip_expect_closed(&ip);
    ip_finish(&ip);
}

/* ================= 4. tracking from the independent peer ================= */

LTEST(interop, tracking_from_peer)
{
    struct lshm_msg a, b, c;
    struct ipair ip;

    ip_start(&ip, 0, peer_tracking_main);
    ip_ready(&ip);
    ip_recv(&ip, &a);
    cr_assert_eq(a.stream, 100);
    cr_assert_eq(a.type, 16);
    cr_assert_eq(a.flags, LSHM_MSG_SHM | LSHM_MSG_CANCELLED, "cancelled: flags %#x", a.flags);
    cr_assert_eq(a.size, 500);
    check_bytes(&a, 100);
    ip_recv(&ip, &b);
    cr_assert_eq(b.stream, 200);
    cr_assert_eq(b.type, 17);
    cr_assert_eq(b.flags, 0, "not cancelled, inline: flags %#x", b.flags);
    cr_assert_eq(b.size, 3);
    cr_assert_arr_eq(b.iov[0].base, "bbb", 3);
    ip_recv(&ip, &c);
    cr_assert_eq(c.stream, 300);
    cr_assert_eq(c.flags, LSHM_MSG_SHM | LSHM_MSG_LAST, "not cancelled: flags %#x", c.flags);
    check_bytes(&c, 300);
    lshm_msg_done(&a);
    lshm_msg_done(&b);
    lshm_msg_done(&c);
    ip_signal(&ip, "got");
    ip_expect_closed(&ip);
    ip_finish(&ip);
}

/* ================= 5. BYE from the independent peer ================= */

LTEST(interop, bye_from_peer)
{
    struct lshm_out out = { .type = 16, .data = "x", .size = 1, .fd = -1 };
    struct lshm_msg m1, m2, m3, m4;
    struct ipair ip;
    long long end;
    int ret;

    ip_start(&ip, 0, peer_bye_main);
    /* No waiting for READY: once BYE is in, every wait on the port returns
     * -EPIPE (lshm_port_wait(3)).  Let the library read everything, BYE
     * included, before we pull. */
    end = now_ms() + TIMEOUT_MS;
    while (lshm_port_error(ip.port) == NULL && now_ms() < end)
        lshm_ctx_run(ip.ctx, 10);
    cr_assert_not_null(lshm_port_error(ip.port), "BYE did not close the port");
    cr_log_info("interop: closed by BYE: %s", lshm_port_error(ip.port));

    ip_recv(&ip, &m1);
    cr_assert_eq(m1.stream, 1);
    cr_assert_eq(m1.flags, 0);
    check_bytes(&m1, 1);
    ip_recv(&ip, &m2);
    cr_assert_eq(m2.stream, 2);
    cr_assert_eq(m2.flags, LSHM_MSG_SHM);
    cr_assert_eq(m2.size, 1000);
    check_bytes(&m2, 2);
    ip_recv(&ip, &m3);
    cr_assert_eq(m3.stream, 3);
    cr_assert_eq(m3.flags, LSHM_MSG_LAST);
    check_bytes(&m3, 3);
    lshm_msg_done(&m1);
    lshm_msg_done(&m3);

    ret = lshm_recv(ip.port, &m4, TIMEOUT_MS);
    cr_assert_eq(ret, -EPIPE, "after the queue drained: %d", ret);
    ret = lshm_recv(ip.port, &m4, 0);
    cr_assert_eq(ret, -EPIPE, "again: %d", ret);
    ret = lshm_send(ip.port, &out, 0);
    cr_assert_eq(ret, -EPIPE, "send on a port closed by BYE: %d", ret);
    cr_assert_not_null(lshm_port_error(ip.port));
    {
        pid_t pid = 0;

        ret = lshm_port_peer(ip.port, &pid, NULL, NULL);
        cr_expect(ret == 0 && pid == ip.pid, "lshm_port_peer after BYE: %d, pid %d", ret,
                  (int)pid);
    }
    /* The peer's segment still holds m2, which stays valid. */
    check_bytes(&m2, 2);
    lshm_msg_done(&m2);
    ip_finish(&ip);
}

/* ================= 6. tracking from the library ================= */

LTEST(interop, tracking_from_lib)
{
    struct lshm_out o1 = { .type = 16, .stream = 77, .data = NULL, .size = 0, .fd = -1 };
    struct lshm_out o2 = { .type = 16, .stream = 78, .last = 1, .fd = -1 };
    struct lshm_tracking *t1, *t2;
    struct lshm_buf *buf;
    struct ipair ip;
    struct report r;
    bool lib_won;
    int ret;

    ip_start(&ip, 0, peer_lib_tracking_main);
    ip_ready(&ip);
    ret = lshm_tracking_new(ip.port, 77, &t1);
    cr_assert_eq(ret, 0, "lshm_tracking_new: %d %s", ret, lshm_last_error());
    o1.tracking = t1;
    cr_assert_eq(lshm_send(ip.port, &o1, 0), 0);
    /* A race with the peer's swap: exactly one side must win. */
    lib_won = lshm_tracking_cancel(t1);
    ip_recv_report(&ip, 10, &r);
    cr_assert_neq(lib_won, (bool)r.a, "library cancel %d, peer swap %u: not exactly one won",
                  lib_won, r.a);
    cr_log_info("interop: tracking race won by the %s", lib_won ? "library" : "peer");

    ret = lshm_tracking_new(ip.port, 78, &t2);
    cr_assert_eq(ret, 0);
    cr_assert_eq(lshm_buf_alloc(ip.port, 5000, &buf), 0);
    fill_buf(buf, 78, 0, 5000);
    cr_assert_eq(lshm_buf_set_size(buf, 5000), 0);
    o2.bufs = &buf;
    o2.nbufs = 1;
    o2.tracking = t2;
    cr_assert_eq(lshm_send(ip.port, &o2, 0), 0);
    ip_recv_report(&ip, 11, &r);
    cr_assert_eq(r.a, 1, "the peer read it first, so its swap must win");
    cr_assert_not(lshm_tracking_cancel(t2), "cancel after the peer read it must lose");
    ip_finish(&ip);
}

/* ================= 7. the peer's max_segments binds the library ================= */

LTEST(interop, peer_max_segments)
{
    struct lshm_out out = { .type = 16, .stream = 31, .fd = -1 };
    struct lshm_buf *big, *more;
    struct ipair ip;
    struct report r;
    long long end;
    int ret, maps;

    /* The library may make several segments, but the peer accepts one. */
    ip_start(&ip, 0, peer_one_segment_main);
    ip_ready(&ip);
    ret = lshm_buf_alloc(ip.port, LSHM_DATA_SIZE, &big);
    cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    cr_assert_eq(lshm_buf_capacity(big), LSHM_DATA_SIZE);
    maps = count_maps("memfd:");
    ret = lshm_buf_alloc(ip.port, 1, &more);
    if (ret == 0)
        lshm_buf_free(more);
    cr_assert_eq(ret, -EAGAIN, "a second segment for a peer whose HELLO said max_segments 1: %d",
                 ret);
    cr_assert_eq(count_maps("memfd:"), maps);

    /* Send 100 bytes of it: the other 639 chunks come back at the send. */
    fill_buf(big, 31, 0, 100);
    cr_assert_eq(lshm_buf_set_size(big, 100), 0);
    out.bufs = &big;
    out.nbufs = 1;
    ret = lshm_send(ip.port, &out, 0);
    cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    ip_recv_report(&ip, 20, &r);
    cr_assert_eq(r.bytes, 100);
    cr_assert_eq(r.fnv, fnv_pat(FNV_INIT, 31, 100));
    end = now_ms() + TIMEOUT_MS;
    while ((ret = lshm_buf_alloc(ip.port, LSHM_DATA_SIZE, &big)) == -EAGAIN) {
        cr_assert(now_ms() < end, "the segment never became whole again");
        lshm_port_wait(ip.port, LSHM_WAIT_SHM, 100);
    }
    cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    cr_assert_eq(lshm_buf_capacity(big), LSHM_DATA_SIZE);
    lshm_buf_free(big);
    ip_finish(&ip);
}

/* ================= 8. segment ids belong to the pair ================= */

LTEST(interop, segment_ids_per_pair)
{
    struct lshm_port *pa, *pb, *pc;
    struct lshm_msg m1, m2, m3;
    struct lshm_ctx *ctx;
    int socks[3], ret, st;
    pid_t pid;

    ret = lshm_ctx_new(&ctx, NULL);
    cr_assert_eq(ret, 0, "lshm_ctx_new: %d %s", ret, lshm_last_error());
    cr_assert_eq(lshm_socketpair(ctx, &pa, &socks[0]), 0);
    cr_assert_eq(lshm_socketpair(ctx, &pb, &socks[1]), 0);
    cr_assert_eq(lshm_socketpair(ctx, &pc, &socks[2]), 0);
    fflush(NULL);
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0)
        peer_run(socks, 3, peer_pair_main);
    close(socks[0]);
    close(socks[1]);
    close(socks[2]);

    ret = lshm_recv(pa, &m1, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "A: %d %s", ret, lshm_port_error(pa));
    cr_assert_eq(m1.stream, 1);
    cr_assert_eq(m1.size, 100);
    check_bytes(&m1, 1);
    ret = lshm_recv(pb, &m2, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "B: %d %s", ret, lshm_port_error(pb));
    cr_assert_eq(m2.stream, 2);
    cr_assert_eq(m2.flags, LSHM_MSG_SHM | LSHM_MSG_LAST);
    cr_assert_eq(m2.niov, 2);
    cr_assert_eq(m2.size, 500);
    check_bytes(&m2, 2);
    lshm_msg_done(&m1);
    lshm_msg_done(&m2);
    {
        struct lshm_out out = { .type = T_SIGNAL, .data = "got", .size = 3, .fd = -1 };

        cr_assert_eq(lshm_send(pa, &out, 0), 0);
    }
    ret = lshm_recv(pa, &m1, TIMEOUT_MS);
    cr_assert_eq(ret, -EPIPE, "A after BYE: %d", ret);
    ret = lshm_recv(pb, &m1, TIMEOUT_MS);
    cr_assert_eq(ret, -EPIPE, "B after BYE: %d", ret);
    lshm_port_close(pa);
    lshm_port_close(pb);

    /* A new connection of the same two processes: ids from 0 again. */
    ret = lshm_recv(pc, &m3, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "C: %d %s", ret, lshm_port_error(pc) ? lshm_port_error(pc) : "");
    cr_assert_eq(m3.stream, 3);
    cr_assert_eq(m3.size, 50);
    check_bytes(&m3, 3);
    lshm_msg_done(&m3);
    {
        struct lshm_out out = { .type = T_SIGNAL, .data = "got", .size = 3, .fd = -1 };

        cr_assert_eq(lshm_send(pc, &out, 0), 0);
    }
    ret = lshm_recv(pc, &m3, TIMEOUT_MS);
    cr_assert_eq(ret, -EPIPE, "C after BYE: %d", ret);
    lshm_port_close(pc);
    lshm_ctx_free(ctx);
    st = wait_child(pid, TIMEOUT_MS);
    cr_assert(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0,
              "the independent peer failed (status %#x), see its line on stderr", st);
}

/* ========= 9. a new pair while the library still holds an unread port ========= */

/*
 * Two ports of the library, A and C, in a context that holds one message
 * per port: once A's first message is queued and unread, the library reads
 * no more of A.  The peer then ends A (more messages, BYE, close) and,
 * having no port left, starts a new pair on C from id 0, as the page says:
 * the library has not seen A end yet, but A is hung up at the other end.
 */
/* Two ports in a context holding one message per port; fork the peer. */
static pid_t restart_start(struct lshm_ctx **ctx, struct lshm_port **pa,
                           struct lshm_port **pc, peer_fn fn)
{
    struct lshm_ctx_params prm;
    int socks[2], ret;
    pid_t pid;

    memset(&prm, 0, sizeof(prm));
    prm.recv_queue = 1;
    ret = lshm_ctx_new(ctx, &prm);
    cr_assert_eq(ret, 0, "lshm_ctx_new: %d %s", ret, lshm_last_error());
    cr_assert_eq(lshm_socketpair(*ctx, pa, &socks[0]), 0);
    cr_assert_eq(lshm_socketpair(*ctx, pc, &socks[1]), 0);
    fflush(NULL);
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0)
        peer_run(socks, 2, fn);
    close(socks[0]);
    close(socks[1]);
    return pid;
}

/* A's first message is queued, unread: reading A stops; say so to the peer. */
static void restart_hold_first(struct lshm_ctx *ctx, struct lshm_port *pa)
{
    struct lshm_out held = { .type = T_SIGNAL, .data = "held", .size = 4, .fd = -1 };
    int ret = lshm_port_wait(pa, LSHM_WAIT_RECV, TIMEOUT_MS);

    cr_assert(ret > 0 && (ret & LSHM_WAIT_RECV), "A's first message: %d %s", ret,
              lshm_port_error(pa) ? lshm_port_error(pa) : lshm_last_error());
    /* Let the stop reach the kernel before the peer writes more to A. */
    lshm_ctx_run(ctx, 0);
    ret = lshm_send(pa, &held, 0);
    cr_assert_eq(ret, 0, "lshm_send: %d %s", ret, lshm_last_error());
}

static void restart_finish(struct lshm_ctx *ctx, pid_t pid)
{
    int st;

    lshm_ctx_free(ctx);
    st = wait_child(pid, TIMEOUT_MS);
    cr_assert(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0,
              "the independent peer failed (status %#x), see its line on stderr", st);
}

LTEST(interop, pair_restarts_after_peer_closed_unread_port)
{
    struct lshm_out done = { .type = T_SIGNAL, .data = "done", .size = 4, .fd = -1 };
    struct lshm_port *pa, *pc;
    struct lshm_msg m1, m2, m3, m4, x;
    struct lshm_ctx *ctx;
    int maps0, ret;
    pid_t pid;

    maps0 = count_maps("memfd:");
    pid = restart_start(&ctx, &pa, &pc, peer_restart_main);
    restart_hold_first(ctx, pa);

    /* C: HELLO and MMAP id 0 of a new segment, while A's end of file and
     * BYE wait unread in A's socket. */
    ret = lshm_recv(pc, &m4, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "C: %d (%s)", ret,
                 lshm_port_error(pc) ? lshm_port_error(pc) : lshm_last_error());
    cr_assert_null(lshm_port_error(pc));
    /* The race of the review: A has not been read past its first message. */
    cr_assert_null(lshm_port_error(pa), "A was read to its end before C's HELLO (%s): "
                   "the race was not reproduced", lshm_port_error(pa));
    cr_assert_eq(m4.stream, 4);
    cr_assert_eq(m4.type, 17);
    cr_assert_eq(m4.flags, LSHM_MSG_SHM | LSHM_MSG_LAST, "flags %#x", m4.flags);
    cr_assert_eq(m4.size, 5000);
    cr_assert_eq(m4.niov, 1);
    check_bytes(&m4, 4);
    cr_expect_eq(count_maps("memfd:"), maps0 + 2, "both segments 0 mapped: %d -> %d", maps0,
                 count_maps("memfd:"));

    /* A still delivers what it holds, from the old segment 0 ... */
    ret = lshm_recv(pa, &m1, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "A: %d (%s)", ret,
                 lshm_port_error(pa) ? lshm_port_error(pa) : lshm_last_error());
    cr_assert_eq(m1.stream, 1);
    cr_assert_eq(m1.flags, LSHM_MSG_SHM);
    cr_assert_eq(m1.size, 3000);
    cr_assert_eq(m1.niov, 1);
    check_bytes(&m1, 1);
    check_bytes(&m4, 4);
    cr_assert_neq(m1.iov[0].base, m4.iov[0].base);
    lshm_msg_done(&m1);
    /* ... then, reading again, the rest, and the BYE (each message done
     * before the next: A holds one, and a receive that is not multishot
     * reads no further). */
    ret = lshm_recv(pa, &m2, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "A: %d (%s)", ret,
                 lshm_port_error(pa) ? lshm_port_error(pa) : lshm_last_error());
    cr_assert_eq(m2.stream, 2);
    cr_assert_eq(m2.flags, 0);
    cr_assert_eq(m2.size, 7);
    check_bytes(&m2, 2);
    lshm_msg_done(&m2);
    ret = lshm_recv(pa, &m3, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "A: %d (%s)", ret,
                 lshm_port_error(pa) ? lshm_port_error(pa) : lshm_last_error());
    cr_assert_eq(m3.stream, 3);
    cr_assert_eq(m3.flags, LSHM_MSG_SHM | LSHM_MSG_LAST);
    cr_assert_eq(m3.size, 20000);
    check_bytes(&m3, 3);
    check_bytes(&m4, 4);
    cr_assert_neq(m3.iov[0].base, m4.iov[0].base);
    lshm_msg_done(&m3);
    ret = lshm_recv(pa, &x, TIMEOUT_MS);
    cr_assert_eq(ret, -EPIPE, "A after its queue: %d", ret);
    cr_assert_not_null(lshm_port_error(pa));
    cr_log_info("interop: A closed: %s", lshm_port_error(pa));
    cr_assert_null(lshm_port_error(pc), "C closed: %s", lshm_port_error(pc));
    check_bytes(&m4, 4);
    lshm_port_close(pa);
    lshm_msg_done(&m4);

    ret = lshm_send(pc, &done, 0);
    cr_assert_eq(ret, 0, "lshm_send on C: %d %s", ret, lshm_last_error());
    ret = lshm_recv(pc, &x, TIMEOUT_MS);
    cr_assert_eq(ret, -EPIPE, "C after BYE: %d (%s)", ret,
                 lshm_port_error(pc) ? lshm_port_error(pc) : "");
    lshm_port_close(pc);
    restart_finish(ctx, pid);
}

/*
 * The same, but A stays open at the peer's side: the pair goes on, and an
 * MMAP id 0 on a second port is a violation that closes that port only.
 */
LTEST(interop, second_port_mmap_id_0_while_first_open_is_violation)
{
    struct lshm_out out = { .type = 18, .stream = 5, .fd = -1 };
    struct lshm_port *pa, *pc;
    struct lshm_msg m1, m2, rep, x;
    struct lshm_ctx *ctx;
    struct lshm_buf *buf;
    struct report r;
    const char *why;
    int ret;
    pid_t pid;

    pid = restart_start(&ctx, &pa, &pc, peer_second_port_main);
    restart_hold_first(ctx, pa);

    ret = lshm_recv(pc, &x, TIMEOUT_MS);
    cr_assert_eq(ret, -EPROTO, "C's MMAP id 0 while A is open: %d", ret);
    why = lshm_port_error(pc);
    cr_assert_not_null(why);
    cr_log_info("interop: C closed: %s", why);
    cr_assert(strstr(why, "protocol violation") && strstr(why, "MMAP id 0, expected 1"),
              "C closed for another reason: %s", why);
    cr_assert_null(lshm_port_error(pa), "A closed too: %s", lshm_port_error(pa));
    lshm_port_close(pc);

    ret = lshm_recv(pa, &m1, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "A: %d (%s)", ret,
                 lshm_port_error(pa) ? lshm_port_error(pa) : lshm_last_error());
    cr_assert_eq(m1.stream, 1);
    cr_assert_eq(m1.size, 3000);
    check_bytes(&m1, 1);
    lshm_msg_done(&m1);
    ret = lshm_recv(pa, &m2, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "A: %d (%s)", ret,
                 lshm_port_error(pa) ? lshm_port_error(pa) : lshm_last_error());
    cr_assert_eq(m2.stream, 2);
    cr_assert_eq(m2.flags, LSHM_MSG_SHM);
    cr_assert_eq(m2.size, 100);
    check_bytes(&m2, 2);
    lshm_msg_done(&m2);

    ret = lshm_buf_alloc(pa, 1000, &buf);
    cr_assert_eq(ret, 0, "lshm_buf_alloc on A: %d %s", ret, lshm_last_error());
    fill_buf(buf, 5, 0, 1000);
    cr_assert_eq(lshm_buf_set_size(buf, 1000), 0);
    out.bufs = &buf;
    out.nbufs = 1;
    ret = lshm_send(pa, &out, 0);
    cr_assert_eq(ret, 0, "lshm_send on A: %d %s", ret, lshm_last_error());
    ret = lshm_recv(pa, &rep, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "A: %d (%s)", ret,
                 lshm_port_error(pa) ? lshm_port_error(pa) : lshm_last_error());
    cr_assert_eq(rep.type, T_REPORT);
    cr_assert_eq(rep.size, sizeof(r));
    memcpy(&r, rep.iov[0].base, sizeof(r));
    lshm_msg_done(&rep);
    cr_assert_eq(r.tag, 30);
    cr_assert_eq(r.bytes, 1000);
    cr_assert_eq(r.fnv, fnv_pat(FNV_INIT, 5, 1000));
    ret = lshm_recv(pa, &x, TIMEOUT_MS);
    cr_assert_eq(ret, -EPIPE, "A after BYE: %d", ret);
    lshm_port_close(pa);
    restart_finish(ctx, pid);
}

/* ================= 10. message rings (protocol version 2) ================= */

_Static_assert(P_RING_MAGIC == LSHM_RING_MAGIC, "ring magic");
_Static_assert(P_RING_VERSION == LSHM_RING_VERSION, "ring version");
_Static_assert(P_RING_HDR == LSHM_RING_HEADER_SIZE, "ring header size");
_Static_assert(P_RING_MIN == LSHM_RING_SIZE_MIN, "ring size min");
_Static_assert(P_RING_MAX == LSHM_RING_SIZE_MAX, "ring size max");

/* A context with prm (NULL: defaults), a port, and the peer forked on it. */
static void ip_start_prm(struct ipair *ip, const struct lshm_ctx_params *prm, peer_fn fn)
{
    int sock, ret;

    ret = lshm_ctx_new(&ip->ctx, prm);
    cr_assert_eq(ret, 0, "lshm_ctx_new: %d %s", ret, lshm_last_error());
    ret = lshm_socketpair(ip->ctx, &ip->port, &sock);
    cr_assert_eq(ret, 0, "lshm_socketpair: %d %s", ret, lshm_last_error());
    fflush(NULL);
    ip->pid = fork();
    cr_assert_geq(ip->pid, 0);
    if (ip->pid == 0)
        peer_run(&sock, 1, fn);
    close(sock);
}

/* The library's features with prm (NULL: defaults). */
static unsigned lib_features(const struct lshm_ctx_params *prm)
{
    struct lshm_ctx *ctx;
    unsigned f;
    int ret = lshm_ctx_new(&ctx, prm);

    cr_assert_eq(ret, 0, "lshm_ctx_new: %d %s", ret, lshm_last_error());
    f = lshm_ctx_features(ctx);
    lshm_ctx_free(ctx);
    return f;
}

/* Rings need nothing of the kernel but memfds: a context has them unless
 * LSHM_CTX_NO_RING. */
static void need_rings(void)
{
    cr_assert(lib_features(NULL) & LSHM_FEAT_RING, "lshm_ctx_features() lacks LSHM_FEAT_RING");
}

/* lshm_send, waiting for room in the send queue (bounded). */
static void ip_send(struct ipair *ip, const struct lshm_out *out)
{
    long long end = now_ms() + TIMEOUT_MS;
    int ret;

    while ((ret = lshm_send(ip->port, out, 0)) == -EAGAIN) {
        cr_assert(now_ms() < end, "the send queue stayed full for %d ms", TIMEOUT_MS);
        lshm_port_wait(ip->port, LSHM_WAIT_SEND, 100);
    }
    cr_assert_eq(ret, 0, "lshm_send stream %u: %d %s", out->stream, ret, lshm_last_error());
}

/* A buffer of size bytes in shared memory, waiting for chunks (bounded). */
static struct lshm_buf *ip_alloc(struct ipair *ip, size_t size)
{
    long long end = now_ms() + TIMEOUT_MS;
    struct lshm_buf *b;
    int ret;

    while ((ret = lshm_buf_alloc(ip->port, size, &b)) == -EAGAIN) {
        cr_assert(now_ms() < end, "no chunks for %zu bytes within %d ms", size, TIMEOUT_MS);
        lshm_port_wait(ip->port, LSHM_WAIT_SHM, 100);
    }
    cr_assert_eq(ret, 0, "lshm_buf_alloc(%zu): %d %s", size, ret, lshm_last_error());
    return b;
}

/* Buffers for size bytes (a buffer may come short: as many as it takes). */
static unsigned ip_bufs(struct ipair *ip, size_t size, struct lshm_buf **bufs)
{
    size_t have = 0;
    unsigned n = 0;

    while (have < size) {
        cr_assert_lt(n, LSHM_MAX_DESCS);
        bufs[n] = ip_alloc(ip, size - have);
        have += lshm_buf_capacity(bufs[n]);
        n++;
    }
    return n;
}

/* Message stream of size bytes of its pattern, inline (nbufs 0) or in the
 * buffers (filled here), with fd (-1: none). */
static void ip_send_in(struct ipair *ip, uint8_t type, uint32_t stream, size_t size,
                       struct lshm_buf **bufs, unsigned nbufs, int fd)
{
    static uint8_t inl[LSHM_INLINE_MAX];
    struct lshm_out out = { .type = type, .stream = stream, .fd = fd };
    size_t off = 0;
    unsigned i;

    for (i = 0; i < nbufs; i++) {
        size_t len = lshm_buf_capacity(bufs[i]);
        int ret;

        if (len > size - off)
            len = size - off;
        fill_buf(bufs[i], stream, off, len);
        ret = lshm_buf_set_size(bufs[i], len);
        cr_assert_eq(ret, 0, "lshm_buf_set_size(%zu): %d %s", len, ret, lshm_last_error());
        off += len;
    }
    if (nbufs > 0) {
        cr_assert_eq(off, size);
        out.bufs = bufs;
        out.nbufs = nbufs;
    } else {
        pattern_write(inl, 0, size, stream);
        out.data = size > 0 ? inl : NULL;
        out.size = size;
    }
    ip_send(ip, &out);
}

/* Message stream of size bytes of its pattern, inline or in shared memory. */
static void ip_send_pat(struct ipair *ip, uint8_t type, uint32_t stream, size_t size, bool shm,
                        int fd)
{
    struct lshm_buf *bufs[LSHM_MAX_DESCS];

    ip_send_in(ip, type, stream, size, bufs, shm ? ip_bufs(ip, size, bufs) : 0, fd);
}

/* The next message must be stream, size bytes, in shared memory or not,
 * with an fd or not; every byte checked.  Returns its fd (or -1). */
static int ip_take(struct ipair *ip, uint32_t stream, size_t size, bool shm, bool fd)
{
    struct lshm_msg m;
    int mfd;

    ip_recv(ip, &m);
    cr_assert_eq(m.stream, stream, "expected stream %u, got %u", stream, m.stream);
    cr_assert_eq(m.size, size, "stream %u: %zu bytes, want %zu", stream, m.size, size);
    cr_assert_eq(!!(m.flags & LSHM_MSG_SHM), shm, "stream %u: flags %#x", stream, m.flags);
    cr_assert_eq(m.fd >= 0, fd, "stream %u: fd %d", stream, m.fd);
    check_bytes(&m, stream);
    mfd = m.fd;
    lshm_msg_done(&m);
    return mfd;
}

static struct lshm_port_stats ip_stats(struct ipair *ip)
{
    struct lshm_port_stats st;
    int ret = lshm_port_stats(ip->port, &st);

    cr_assert_eq(ret, 0, "lshm_port_stats: %d %s", ret, lshm_last_error());
    cr_log_info("interop: port stats: out ring %llu msgs %llu B, socket %llu msgs %llu B; in "
                "ring %llu, socket %llu; wakes sent %llu, received %llu; ring full %llu",
                (unsigned long long)st.ring_msgs, (unsigned long long)st.ring_bytes,
                (unsigned long long)st.sock_msgs, (unsigned long long)st.sock_bytes,
                (unsigned long long)st.ring_msgs_in, (unsigned long long)st.sock_msgs_in,
                (unsigned long long)st.wakes_sent, (unsigned long long)st.wakes_received,
                (unsigned long long)st.ring_full);
    return st;
}

/* The HELLO exchange and 5 + 4 messages; r41 is the peer's count of them,
 * st the library's. */
static void ring_hello_run(const struct lshm_ctx_params *prm, struct report *r40,
                           struct report *r41, struct lshm_port_stats *st)
{
    struct ipair ip;
    int pfd[2], fd;
    uint64_t fnv = FNV_INIT;
    uint32_t i;
    char c;

    ip_start_prm(&ip, prm, peer_ring_hello_main);
    ip_ready(&ip);
    ip_recv_report(&ip, 40, r40);
    ip_send_pat(&ip, 16, 1, 10, false, -1);
    ip_send_pat(&ip, 16, 2, 1000, false, -1);
    ip_send_pat(&ip, 16, 3, 16384, false, -1);
    ip_send_pat(&ip, 17, 4, 5000, true, -1);
    cr_assert_eq(pipe2(pfd, O_CLOEXEC), 0);
    ip_send_pat(&ip, 18, 5, 0, false, pfd[1]);
    for (i = 1; i <= 4; i++)
        fnv = fnv_pat(fnv, i, i == 1 ? 10 : i == 2 ? 1000 : i == 3 ? 16384 : 5000);
    for (i = 11; i <= 13; i++)
        ip_take(&ip, i, 100 * i, false, false);
    fd = ip_take(&ip, 14, 0, false, true);
    cr_assert_eq(write(fd, "z", 1), 1);
    close(fd);
    ip_recv_report(&ip, 41, r41);
    cr_assert_eq(r41->fnv, fnv, "payload checksum differs");
    cr_assert(wait_readable(pfd[0], TIMEOUT_MS));
    cr_assert_eq(read(pfd[0], &c, 1), 1);
    cr_assert_eq(c, 'y');
    close(pfd[0]);
    *st = ip_stats(&ip);
    ip_finish(&ip);
}

/* Sent and received by the library in ring_hello_run: 4 + 1 out, 5 + 1 in
 * (the peer's two reports included), in rings or all over the socket. */
static void ring_hello_stats(const struct lshm_port_stats *st, bool rings)
{
    if (rings) {
        cr_expect_eq(st->ring_msgs, 4);
        cr_expect_eq(st->ring_bytes, 10 + 1000 + 16384 + 5000);
        cr_expect_eq(st->sock_msgs, 1);
        cr_expect_eq(st->sock_bytes, 0);
        cr_expect_eq(st->ring_msgs_in, 5);
        cr_expect_eq(st->sock_msgs_in, 1);
    } else {
        cr_expect_eq(st->ring_msgs, 0);
        cr_expect_eq(st->sock_msgs, 5);
        cr_expect_eq(st->sock_bytes, 10 + 1000 + 16384 + 5000);
        cr_expect_eq(st->ring_msgs_in, 0);
        cr_expect_eq(st->sock_msgs_in, 6);
        cr_expect_eq(st->wakes_sent, 0);
        cr_expect_eq(st->wakes_received, 0);
    }
}

LTEST(interop, ring_hello_sets_ring_by_default)
{
    unsigned feats = lib_features(NULL);
    struct lshm_port_stats st;
    struct report r40, r41;

    peer_cfg = (struct peer_cfg){ .features = P_FEAT_RING | P_FEAT_FUTEX,
                                  .ring_size = LSHM_RING_SIZE_DEFAULT };
    ring_hello_run(NULL, &r40, &r41, &st);
    cr_log_info("interop: library HELLO features %#x ring_size %u; peer got %u ring and %u "
                "socket messages, %u FENCEs", r40.a, r40.b, r41.a, r41.b, r41.d);
    /* The HELLO says what lshm_ctx_features says. */
    cr_assert_eq(!!(r40.a & P_FEAT_RING), !!(feats & LSHM_FEAT_RING), "HELLO features %#x",
                 r40.a);
    cr_assert_eq(!!(r40.a & P_FEAT_FUTEX),
                 (feats & (LSHM_FEAT_RING | LSHM_FEAT_FUTEX)) == (LSHM_FEAT_RING | LSHM_FEAT_FUTEX),
                 "HELLO features %#x, lshm_ctx_features %#x", r40.a, feats);
    cr_assert(feats & LSHM_FEAT_RING, "lshm_ctx_features %#x lacks LSHM_FEAT_RING", feats);
    cr_assert_eq(r40.b, LSHM_RING_SIZE_DEFAULT, "HELLO ring_size %u", r40.b);
    /* 1..4 in the library's ring, 5 (an fd) over the socket after a FENCE;
     * both rings were made. */
    cr_assert_eq(r41.a, 4, "messages read from the library's ring: %u", r41.a);
    cr_assert_eq(r41.b, 1, "user messages over the socket: %u", r41.b);
    cr_assert_eq(r41.c, 1, "the library sent no RING");
    cr_assert_geq(r41.d, 1, "no FENCE before the fd message");
    cr_assert_eq(r41.pad, 1, "the peer made no ring");
    cr_assert_eq(r41.bytes, LSHM_RING_SIZE_DEFAULT, "the library's ring has %llu bytes",
                 (unsigned long long)r41.bytes);
    ring_hello_stats(&st, true);
}

/* lshm_ctx_params.ring_size: the HELLO's, and the ring the library makes. */
LTEST(interop, ring_hello_ring_size_parameter)
{
    struct lshm_ctx_params prm = { .ring_size = 131072 };
    struct lshm_port_stats st;
    struct report r40, r41;
    struct lshm_ctx *ctx;
    int ret;

    need_rings();
    prm.ring_size = 100000;
    ret = lshm_ctx_new(&ctx, &prm);
    cr_assert_eq(ret, -EINVAL, "ring_size 100000 (not a power of two): %d", ret);
    prm.ring_size = 131072;
    peer_cfg = (struct peer_cfg){ .features = P_FEAT_RING, .ring_size = LSHM_RING_SIZE_MAX };
    ring_hello_run(&prm, &r40, &r41, &st);
    cr_assert_eq(r40.b, 131072, "HELLO ring_size %u with ring_size 131072", r40.b);
    cr_assert_eq(r41.bytes, 131072, "the library's ring has %llu bytes",
                 (unsigned long long)r41.bytes);
    ring_hello_stats(&st, true);
}

LTEST(interop, ring_hello_no_ring_ctx_keeps_everything_on_the_socket)
{
    struct lshm_ctx_params prm = { .flags = LSHM_CTX_NO_RING };
    struct lshm_port_stats st;
    struct report r40, r41;

    cr_assert_not(lib_features(&prm) & LSHM_FEAT_RING, "LSHM_FEAT_RING with LSHM_CTX_NO_RING");
    peer_cfg = (struct peer_cfg){ .features = P_FEAT_RING | P_FEAT_FUTEX,
                                  .ring_size = LSHM_RING_SIZE_DEFAULT };
    ring_hello_run(&prm, &r40, &r41, &st);
    cr_assert_eq(r40.a, 0, "HELLO features %#x with LSHM_CTX_NO_RING", r40.a);
    cr_assert_eq(r40.b, 0, "HELLO ring_size %u without RING", r40.b);
    cr_assert_eq(r41.a, 0, "%u messages in a ring", r41.a);
    cr_assert_eq(r41.b, 5, "%u user messages over the socket", r41.b);
    cr_assert_eq(r41.c, 0, "a RING although the library's HELLO lacked RING");
    cr_assert_eq(r41.d, 0, "a FENCE without rings");
    cr_assert_eq(r41.pad, 0, "the peer made a ring although the library's HELLO lacked RING");
    ring_hello_stats(&st, false);
}

LTEST(interop, ring_hello_peer_without_ring_gets_everything_on_the_socket)
{
    struct lshm_port_stats st;
    struct report r40, r41;

    peer_cfg = (struct peer_cfg){ 0 };
    ring_hello_run(NULL, &r40, &r41, &st);
    cr_assert_eq(r41.a, 0, "%u messages in a ring", r41.a);
    cr_assert_eq(r41.b, 5, "%u user messages over the socket", r41.b);
    cr_assert_eq(r41.c, 0, "a RING to a peer whose HELLO lacked RING");
    ring_hello_stats(&st, false);
}

LTEST(interop, ring_inline_and_shm_both_ways_wrap_many_times)
{
    struct ipair ip;
    struct report r;
    uint64_t fnv = FNV_INIT, bytes = 0;
    uint32_t i;

    need_rings();
    /* 64 KiB rings both ways: about 3 MB each way wraps them many times. */
    peer_cfg = (struct peer_cfg){ .features = P_FEAT_RING, .ring_size = 65536,
                                  .out_ring_size = 65536 };
    ip_start_prm(&ip, NULL, peer_ring_wrap_main);
    ip_ready(&ip);
    for (i = 0; i < N_WRAP_MSGS; i++) {
        size_t size = wrap_size(i);

        ip_send_pat(&ip, wrap_is_shm(i) ? 17 : 16, i, size, wrap_is_shm(i), -1);
        fnv = fnv_pat(fnv, i, size);
        bytes += size;
    }
    ip_recv_report(&ip, 50, &r);
    cr_log_info("interop: %u messages through the library's ring of %u bytes, %u wraps",
                r.a, r.c, r.b);
    cr_assert_eq(r.c, 65536, "the library's ring is %u bytes, the peer accepts 65536", r.c);
    cr_assert_eq(r.a, N_WRAP_MSGS, "messages in the ring: %u", r.a);
    cr_assert_eq(r.fnv, fnv, "payload checksum differs");
    cr_assert_geq(r.b, 20, "the library's ring wrapped only %u times", r.b);

    for (i = 0; i < N_WRAP_MSGS; i++)
        ip_take(&ip, i, wrap_size(i), wrap_is_shm(i), false);
    ip_recv_report(&ip, 51, &r);
    cr_assert_eq(r.a, N_WRAP_MSGS + 1, "the peer's ring carried %u messages", r.a);
    cr_assert_eq(r.d, 0, "the peer sent %u user messages over the socket", r.d);
    cr_assert_geq(r.b, 20, "the peer's ring wrapped only %u times", r.b);
    {
        struct lshm_port_stats st = ip_stats(&ip);

        cr_expect_eq(st.ring_msgs, N_WRAP_MSGS);
        cr_expect_eq(st.ring_bytes, bytes);
        cr_expect_eq(st.sock_msgs, 0);
        cr_expect_eq(st.ring_msgs_in, N_WRAP_MSGS + 2);
        cr_expect_eq(st.sock_msgs_in, 0);
    }
    ip_finish(&ip);
}

LTEST(interop, ring_order_of_ring_fd_and_mmap_messages_both_ways)
{
    static struct lshm_buf *hold[LSHM_CHUNK_COUNT];
    struct ipair ip;
    struct report r;
    uint64_t fnv = FNV_INIT, bytes = 0;
    unsigned i, nhold = 0, k;

    need_rings();
    peer_cfg = (struct peer_cfg){ .features = P_FEAT_RING, .ring_size = 65536 };
    ip_start_prm(&ip, NULL, peer_ring_order_main);
    ip_ready(&ip);
    for (i = 0; i < N_ORDER_MSGS; i++) {
        const struct order_msg *o = &order_msgs[i];
        struct lshm_buf *b[LSHM_MAX_DESCS];
        unsigned nb = 0;
        int pfd[2] = { -1, -1 };

        if (o->kind == O_FD || o->kind == O_SHM_FD)
            cr_assert_eq(pipe2(pfd, O_CLOEXEC), 0);
        if (o->kind == O_SHM_NEWSEG) {
            /* Fill segment 0 until an allocation maps a new one: that
             * buffer is the new segment's first message. */
            int maps = count_maps("memfd:");

            for (;;) {
                b[0] = ip_alloc(&ip, o->size);
                if (count_maps("memfd:") > maps)
                    break;
                cr_assert_lt(nhold, LSHM_CHUNK_COUNT);
                hold[nhold++] = b[0];
            }
            cr_assert_geq(lshm_buf_capacity(b[0]), o->size);
            nb = 1;
        } else if (o->kind >= O_SHM) {
            nb = ip_bufs(&ip, o->size, b);
        }
        ip_send_in(&ip, 18, o->stream, o->size, b, nb, pfd[1]);
        if (pfd[0] >= 0)
            close(pfd[0]);
        fnv = fnv_pat(fnv, o->stream, o->size);
        bytes += o->size;
    }
    ip_recv_report(&ip, 60, &r);
    for (k = 0; k < nhold; k++)
        lshm_buf_free(hold[k]);
    cr_assert_eq(r.a, 9, "messages read from the library's ring: %u", r.a);
    cr_assert_eq(r.b, 4, "fd messages over the socket: %u", r.b);
    cr_assert_geq(r.c, 5, "FENCEs: %u (4 fd messages and at least segment 1's MMAP)", r.c);
    cr_assert_eq(r.d, 2, "segments mapped by the peer: %u", r.d);
    cr_assert_eq(r.bytes, bytes);
    cr_assert_eq(r.fnv, fnv, "payload checksum differs");

    for (i = 0; i < N_ORDER_MSGS; i++) {
        const struct order_msg *o = &order_msgs[i];
        int fd = ip_take(&ip, o->stream, o->size, o->kind >= O_SHM,
                         o->kind == O_FD || o->kind == O_SHM_FD);

        if (fd >= 0) {
            cr_assert(fcntl(fd, F_GETFD) & FD_CLOEXEC);
            close(fd);
        }
    }
    ip_recv_report(&ip, 61, &r);
    cr_assert_eq(r.a, 9 + 1, "the peer's ring carried %u messages", r.a);
    cr_assert_eq(r.b, 4, "the peer's fd messages: %u", r.b);
    {
        struct lshm_port_stats st = ip_stats(&ip);

        cr_expect_eq(st.ring_msgs, 9);
        cr_expect_eq(st.sock_msgs, 4);
        cr_expect_eq(st.ring_msgs_in, 9 + 2);
        cr_expect_eq(st.sock_msgs_in, 4);
    }
    ip_finish(&ip);
}

LTEST(interop, ring_full_library_producer_waits_nothing_lost)
{
    struct ipair ip;
    struct report r;
    uint64_t fnv = FNV_INIT;
    uint32_t i;

    need_rings();
    peer_cfg = (struct peer_cfg){ .features = P_FEAT_RING, .ring_size = 65536 };
    ip_start_prm(&ip, NULL, peer_ring_full_slow_consumer_main);
    ip_ready(&ip);
    ip_recv_report(&ip, 70, &r);
    /* 800 KB into a 64 KiB ring that the peer does not read for 300 ms. */
    for (i = 0; i < N_FULL_MSGS; i++) {
        ip_send_pat(&ip, 16, 1000 + i, FULL_MSG_SIZE, false, -1);
        fnv = fnv_pat(fnv, 1000 + i, FULL_MSG_SIZE);
    }
    ip_recv_report(&ip, 71, &r);
    cr_assert_eq(r.a, N_FULL_MSGS, "messages in the ring: %u", r.a);
    cr_assert_eq(r.c, 65536);
    cr_assert_eq(r.fnv, fnv, "payload checksum differs: a record overwritten or lost");
    cr_assert_geq(r.b, 1, "the library never set space = 1 while its ring was full");
    cr_log_info("interop: the peer acknowledged room %u times", r.b);
    cr_assert_geq(ip_stats(&ip).ring_full, 1, "the library never counted its ring full");
    ip_finish(&ip);
}

LTEST(interop, ring_full_peer_producer_waits_nothing_lost)
{
    struct lshm_ctx_params prm = { .recv_queue = 2 };
    struct ipair ip;
    struct report r;
    uint32_t i;

    need_rings();
    peer_cfg = (struct peer_cfg){ .features = P_FEAT_RING, .ring_size = 65536,
                                  .out_ring_size = 65536 };
    ip_start_prm(&ip, &prm, peer_ring_full_producer_main);
    ip_ready(&ip);
    /* A slow consumer: nothing read for 300 ms, then one message at a time. */
    usleep(300000);
    for (i = 0; i < N_FULL_MSGS; i++) {
        ip_take(&ip, 1000 + i, FULL_MSG_SIZE, false, false);
        if (i % 4 == 0)
            usleep(1000);
    }
    ip_recv_report(&ip, 72, &r);
    cr_log_info("interop: the peer's ring was full %u times, %u SHM_ACKs", r.a, r.b);
    cr_assert_eq(r.c, N_FULL_MSGS);
    cr_assert_geq(r.a, 1, "the peer's ring never filled: the test proves nothing");
    cr_assert_geq(r.b, 1, "the library never sent SHM_ACK for room (space was 1)");
    ip_finish(&ip);
}

/* Ping-pong with naps on both sides: each consumer is asleep when its
 * message comes.  Returns the peer's count of wake-ups. */
static void ring_wake_run(const struct lshm_ctx_params *prm, struct report *r,
                          struct lshm_port_stats *st)
{
    struct ipair ip;
    uint64_t fnv = FNV_INIT;
    uint32_t i;

    ip_start_prm(&ip, prm, peer_ring_wake_main);
    ip_ready(&ip);
    for (i = 0; i < N_WAKE_ROUNDS; i++) {
        usleep(WAKE_NAP_US);
        ip_send_pat(&ip, 16, 100 + i, 64, false, -1);
        fnv = fnv_pat(fnv, 100 + i, 64);
        /* Sleeps while the peer naps: only the peer's wake-up ends it. */
        ip_take(&ip, 200 + i, 64, false, false);
    }
    ip_recv_report(&ip, 80, r);
    cr_assert_eq(r->fnv, fnv);
    cr_log_info("interop: peer woken by futex %u, by WAKE %u; it woke the library by futex "
                "%u, by WAKE %u; it slept %u times", r->a, r->b, r->c, r->d, r->pad);
    cr_assert_geq(r->pad, 1, "the peer never slept on the library's ring");
    *st = ip_stats(&ip);
    /* WAKE datagrams are counted exactly on both sides. */
    cr_expect_geq(st->wakes_sent, r->b, "the peer got %u WAKEs, the library sent %llu", r->b,
                  (unsigned long long)st->wakes_sent);
    cr_expect_geq(st->wakes_sent, 1, "the library woke the sleeping peer never");
    ip_finish(&ip);
}

LTEST(interop, ring_sleeping_consumers_woken_by_futex)
{
    struct lshm_port_stats st;
    struct report r;

    need_rings();
    if (!(lib_features(NULL) & LSHM_FEAT_FUTEX))
        cr_skip_test("no futex wake-ups here: the kernel lacks io_uring FUTEX_WAIT (6.7+)");
    peer_cfg = (struct peer_cfg){ .features = P_FEAT_RING | P_FEAT_FUTEX, .ring_size = 65536 };
    ring_wake_run(NULL, &r, &st);
    cr_expect_geq(st.wakes_received, 1, "the library was never woken");
    cr_assert_geq(r.a, 1, "the library never woke the sleeping peer with FUTEX_WAKE");
    cr_assert_geq(r.c, 1, "the library never slept on the peer's ring with wake = 1");
    cr_assert_eq(r.d, 0);
}

LTEST(interop, ring_sleeping_consumers_woken_by_wake_datagrams)
{
    struct lshm_ctx_params prm = { .flags = LSHM_CTX_NO_FUTEX };
    struct lshm_port_stats st;
    struct report r;

    need_rings();
    cr_assert_not(lib_features(&prm) & LSHM_FEAT_FUTEX, "FUTEX with LSHM_CTX_NO_FUTEX");
    peer_cfg = (struct peer_cfg){ .features = P_FEAT_RING, .ring_size = 65536 };
    ring_wake_run(&prm, &r, &st);
    cr_expect_geq(st.wakes_received, 1, "the library was never woken");
    cr_assert_geq(r.b, 1, "the library never sent WAKE to the sleeping peer");
    cr_assert_geq(r.d, 1, "the library never slept on the peer's ring with wake = 1");
    cr_assert_eq(r.a, 0);
    cr_assert_eq(r.c, 0, "FUTEX_WAKE to a library whose HELLO lacked FUTEX");
}

LTEST(interop, ring_futex_library_is_woken_by_wake_datagrams_too)
{
    struct lshm_port_stats st;
    struct report r;

    need_rings();
    if (!(lib_features(NULL) & LSHM_FEAT_FUTEX))
        cr_skip_test("no futex wake-ups here: the kernel lacks io_uring FUTEX_WAIT (6.7+)");
    peer_cfg = (struct peer_cfg){ .features = P_FEAT_RING | P_FEAT_FUTEX, .ring_size = 65536,
                                  .wake_by_datagram = true };
    ring_wake_run(NULL, &r, &st);
    cr_expect_geq(st.wakes_received, 1, "the library was never woken");
    cr_assert_geq(r.d, 1, "the library never slept on the peer's ring with wake = 1");
    cr_assert_eq(r.c, 0);
}

/* spin_us: a consumer that polls the ring longer than the producer naps
 * never sleeps on it, so it never needs a wake-up. */
LTEST(interop, ring_busy_polling_consumer_needs_no_wake_ups)
{
    struct lshm_ctx_params prm = { .spin_us = 500000 };
    struct lshm_port_stats st;
    struct report r;

    need_rings();
    peer_cfg = (struct peer_cfg){ .features = P_FEAT_RING, .ring_size = 65536 };
    ring_wake_run(&prm, &r, &st);
    cr_expect_eq(st.wakes_received, 0, "the library counted %llu wake-ups",
                 (unsigned long long)st.wakes_received);
    cr_assert_eq(r.c + r.d, 0, "the library slept on the peer's ring %u times within its "
                 "spin budget of 500 ms (the peer naps %u ms)", r.c + r.d, WAKE_NAP_US / 1000);
    cr_assert_geq(r.b, 1, "the peer slept, and the library never sent WAKE");
}
