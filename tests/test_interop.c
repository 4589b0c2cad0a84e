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

    /* The library may make 32 segments, but the peer accepts one. */
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

    /* Stopped at recv_queue 1 with its first message held, A is read to
     * its end only by a multishot receive, which runs past the bound;
     * single-shot receives (the epoll carrier's) wait for that message. */
    require_io_uring(0);
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
    /* ... then, reading again, the rest, and the BYE. */
    ret = lshm_recv(pa, &m2, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "A: %d (%s)", ret,
                 lshm_port_error(pa) ? lshm_port_error(pa) : lshm_last_error());
    cr_assert_eq(m2.stream, 2);
    cr_assert_eq(m2.flags, 0);
    cr_assert_eq(m2.size, 7);
    check_bytes(&m2, 2);
    ret = lshm_recv(pa, &m3, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "A: %d (%s)", ret,
                 lshm_port_error(pa) ? lshm_port_error(pa) : lshm_last_error());
    cr_assert_eq(m3.stream, 3);
    cr_assert_eq(m3.flags, LSHM_MSG_SHM | LSHM_MSG_LAST);
    cr_assert_eq(m3.size, 20000);
    check_bytes(&m3, 3);
    ret = lshm_recv(pa, &x, TIMEOUT_MS);
    cr_assert_eq(ret, -EPIPE, "A after its queue: %d", ret);
    cr_assert_not_null(lshm_port_error(pa));
    cr_log_info("interop: A closed: %s", lshm_port_error(pa));
    cr_assert_null(lshm_port_error(pc), "C closed: %s", lshm_port_error(pc));
    check_bytes(&m3, 3);
    check_bytes(&m4, 4);
    lshm_msg_done(&m2);
    lshm_msg_done(&m3);
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
