/*
 * Hostile peers of the message rings (protocol version 2).  A raw
 * SOCK_SEQPACKET end (the peer socket of lshm_socketpair) speaks the
 * protocol by hand and owns its ring by hand: a correct HELLO with RING,
 * then one violation, as producer (its ring and records) or as consumer
 * (the library's ring).  Each closes only that port, with a reason that
 * names the violation and -EPROTO from lshm_recv, with no crash and no fd or
 * mapping left behind, while a second, well-behaved port of the same
 * context (a forked child echoing) keeps working.  What the protocol allows
 * (WAKE floods, wake and space forced to 1, records rewritten after they
 * were read) must leave the port working.
 */
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "linuxshm.h"
#include "msgring.h"
#include "port_util.h"
#include "shm.h"
#include "wire.h"

#define RING_64K 65536u
#define FEAT_RING LSHM_WIRE_FEAT_RING
#define FEAT_FUTEX LSHM_WIRE_FEAT_FUTEX

struct rh {
    struct lshm_ctx            *ctx;
    struct lshm_port           *good;
    pid_t                       child;
    uint32_t                    seq;
    int                         fds1, maps1;   /* with the good port up, before the bad one */
    struct lshm_port           *bad;
    int                         raw;
    /* The library's HELLO, as the raw end read it. */
    uint32_t                    lib_features;
    uint32_t                    lib_ring_size;
    /* Our ring: we produce. */
    struct lshm_msgring_header *hdr;
    uint8_t                    *data;
    size_t                      map_len;
    uint32_t                    size;
    uint64_t                    tail;
    /* The library's ring: we consume. */
    struct lshm_msgring_header *in;
    uint8_t                    *in_data;
    uint32_t                    in_size;
    uint64_t                    head;
    unsigned                    wakes_in, acks_in, user_in;
};

/* ---- the well-behaved port: a forked child echoing (echo_pull) ---- */

static void good_pingpong(struct rh *h, unsigned n)
{
    unsigned i;

    for (i = 0; i < n; i++)
        echo_roundtrip(h->good, h->seq++, (i % 3 == 2) ? 10000 + i : 64 + i, i % 3 == 2);
}

/* ---- the raw end ---- */

static void raw_send_hdr(struct rh *h, uint32_t stream, uint8_t type, uint8_t flags,
                         uint32_t size, const void *body, size_t blen, const int *fds,
                         unsigned nfds)
{
    uint8_t buf[LSHM_WIRE_MAX + 64];
    struct lshm_wire_msg m = { .stream = stream, .pid = getpid(), .port_id = RAW_PORT,
                               .type = type, .flags = flags, .size = size };

    cr_assert_leq(sizeof(m) + blen, sizeof(buf));
    memcpy(buf, &m, sizeof(m));
    if (blen > 0)
        memcpy(buf + sizeof(m), body, blen);
    raw_sendv(h->raw, buf, sizeof(m) + blen, fds, nfds);
}

static void raw_ctrl(struct rh *h, uint8_t type)
{
    raw_send_hdr(h, 0, type, 0, 0, NULL, 0, NULL, 0);
}

/* Read what the library sent the raw end, as far as it has: WAKEs,
 * SHM_ACKs and user datagrams counted; the library's RING mapped. */
static void raw_drain(struct rh *h)
{
    for (;;) {
        uint8_t buf[LSHM_WIRE_MAX + 64];
        union {
            struct cmsghdr align;
            char           buf[CMSG_SPACE(sizeof(int)) + CMSG_SPACE(sizeof(struct ucred))];
        } cm;
        struct iovec iov = { .iov_base = buf, .iov_len = sizeof(buf) };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf,
                             .msg_controllen = sizeof(cm.buf) };
        struct lshm_wire_msg m;
        struct cmsghdr *c;
        ssize_t n = recvmsg(h->raw, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        int fd = -1;

        if (n <= 0)
            return;
        for (c = CMSG_FIRSTHDR(&mh); c != NULL; c = CMSG_NXTHDR(&mh, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
                memcpy(&fd, CMSG_DATA(c), sizeof(int));
        cr_assert_geq(n, (ssize_t)sizeof(m));
        memcpy(&m, buf, sizeof(m));
        if (m.type == LSHM_WIRE_RING) {
            uint32_t size;

            cr_assert_null(h->in, "a second RING from the library");
            cr_assert_geq(fd, 0);
            memcpy(&size, buf + sizeof(m), sizeof(size));
            cr_assert_leq(size, RING_64K, "the library's ring is larger than our HELLO said");
            h->in = mmap(NULL, LSHM_RING_HEADER_SIZE + (size_t)size, PROT_READ | PROT_WRITE,
                         MAP_SHARED, fd, 0);
            cr_assert_neq(h->in, MAP_FAILED);
            h->in_data = (uint8_t *)h->in + LSHM_RING_HEADER_SIZE;
            h->in_size = size;
        } else if (m.type == LSHM_WIRE_WAKE) {
            h->wakes_in++;
        } else if (m.type == LSHM_WIRE_SHM_ACK) {
            h->acks_in++;
        } else if (m.type >= LSHM_TYPE_USER_MIN) {
            h->user_in++;
        }
        if (fd >= 0)
            close(fd);
    }
}

/* The library's HELLO, sent at once on the new port. */
static void raw_read_hello(struct rh *h)
{
    uint8_t buf[LSHM_WIRE_MAX];
    struct lshm_wire_hello hello;
    struct lshm_wire_msg m;
    long long end = now_ms() + 5000;
    ssize_t n;

    while (poll(&(struct pollfd){ .fd = h->raw, .events = POLLIN }, 1, 0) != 1) {
        cr_assert_lt(now_ms(), end, "no HELLO from the library");
        lshm_ctx_run(h->ctx, 10);
    }
    n = recv(h->raw, buf, sizeof(buf), 0);
    cr_assert_eq(n, 48);
    memcpy(&m, buf, sizeof(m));
    memcpy(&hello, buf + sizeof(m), sizeof(hello));
    cr_assert_eq(m.type, LSHM_WIRE_HELLO);
    h->lib_features = hello.features;
    h->lib_ring_size = hello.ring_size;
}

static void raw_hello(struct rh *h, uint32_t features, uint32_t ring_size)
{
    struct lshm_wire_hello b = { .magic = LSHM_MAGIC, .version = LSHM_PROTOCOL_VERSION,
                                 .port_id = RAW_PORT, .header_size = LSHM_HEADER_SIZE,
                                 .chunk_size = LSHM_CHUNK_SIZE,
                                 .chunk_count = LSHM_CHUNK_COUNT, .max_segments = 32,
                                 .features = features, .ring_size = ring_size };

    raw_send_hdr(h, 0, LSHM_WIRE_HELLO, 0, sizeof(b), &b, sizeof(b), NULL, 0);
}

/*
 * A context (flags), the good port with its echoing child, then the raw
 * port: the library's HELLO read, ours sent with features and ring_size.
 */
static void rh_setup(struct rh *h, unsigned flags, uint32_t features, uint32_t ring_size)
{
    static int echo_timeout_ms = 30000;
    struct lshm_ctx_params prm = { .flags = flags };
    int ret;

    memset(h, 0, sizeof(*h));
    h->ctx = ctx_make(&prm);
    cr_assert_eq(!!(lshm_ctx_features(h->ctx) & LSHM_FEAT_RING), !(flags & LSHM_CTX_NO_RING),
                 "lshm_ctx_features %#x with flags %#x", lshm_ctx_features(h->ctx), flags);
    h->child = spawn(h->ctx, &prm, &h->good, echo_pull, &echo_timeout_ms);
    wait_ready(h->good);
    good_pingpong(h, 6);
    h->fds1 = count_fds();
    h->maps1 = count_maps("memfd:");

    h->raw = raw_peer(h->ctx, &h->bad);
    raw_read_hello(h);
    raw_hello(h, features, ring_size);
    ret = lshm_port_wait(h->bad, LSHM_WAIT_READY, 5000);
    cr_assert_gt(ret, 0, "raw HELLO refused: %d %s", ret, lshm_last_error());
}

/* ---- our ring, made by hand ---- */

enum { RING_OK, RING_UNSEALED, RING_BAD_MAGIC, RING_BAD_SRC, RING_BAD_DST, RING_BAD_PORT,
       RING_BAD_VERSION };

/*
 * A ring memfd of file_size bytes whose header says hdr_size; sealed
 * SHRINK | GROW unless how says otherwise.  Mapped into h (to be unmapped
 * by rh_unmap); returns the fd.
 */
static int ring_memfd(struct rh *h, size_t file_size, uint32_t hdr_size, int how)
{
    int fd = memfd_create("lshm-hostile-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    struct lshm_msgring_header *r;

    cr_assert_geq(fd, 0);
    cr_assert_eq(ftruncate(fd, (off_t)file_size), 0);
    r = mmap(NULL, file_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    cr_assert_neq(r, MAP_FAILED);
    r->magic = how == RING_BAD_MAGIC ? LSHM_MAGIC : LSHM_RING_MAGIC;
    r->version = how == RING_BAD_VERSION ? 1 : LSHM_RING_VERSION;
    r->port_id = how == RING_BAD_PORT ? RAW_PORT + 1 : RAW_PORT;
    r->size = hdr_size;
    r->src_pid = getpid() + (how == RING_BAD_SRC);
    r->dst_pid = getpid() + (how == RING_BAD_DST);
    if (how != RING_UNSEALED)
        cr_assert_eq(fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW), 0);
    if (h->hdr == NULL) {
        h->hdr = r;
        h->data = (uint8_t *)r + LSHM_RING_HEADER_SIZE;
        h->map_len = file_size;
        h->size = hdr_size;
        h->tail = 0;
    } else {
        munmap(r, file_size);   /* a second ring: only sent */
    }
    return fd;
}

static void send_ring(struct rh *h, uint32_t ring_size, int fd)
{
    raw_send_hdr(h, 0, LSHM_WIRE_RING, 0, sizeof(ring_size), &ring_size, sizeof(ring_size),
                 &fd, 1);
    close(fd);
}

/* A valid ring of size bytes, sent with RING. */
static void rh_ring(struct rh *h, uint32_t size)
{
    send_ring(h, size, ring_memfd(h, LSHM_RING_HEADER_SIZE + (size_t)size, size, RING_OK));
}

/* A record at our tail: header and len bytes of body (no room check, no SKIP). */
static void put_rec(struct rh *h, uint32_t kind, uint32_t len, const void *body, size_t blen)
{
    struct lshm_wire_record rec = { .len = len, .kind = kind };
    uint64_t off = h->tail % h->size;

    memcpy(h->data + off, &rec, sizeof(rec));
    if (blen > 0)
        memcpy(h->data + off + sizeof(rec), body, blen);
    h->tail += LSHM_REC_SPAN(blen);
}

/* An inline user message of size bytes (pattern stream) as a MSG record. */
static void put_msg(struct rh *h, uint32_t stream, uint32_t size)
{
    uint8_t buf[LSHM_WIRE_MAX];
    struct lshm_wire_msg m = { .stream = stream, .pid = getpid(), .port_id = RAW_PORT,
                               .type = T_DATA, .size = size };

    memcpy(buf, &m, sizeof(m));
    pattern_write(buf + sizeof(m), 0, size, stream);
    put_rec(h, LSHM_REC_MSG, (uint32_t)(sizeof(m) + size), buf, sizeof(m) + size);
}

/* Publish tail as it is (or as given) and send WAKE. */
static void publish_tail(struct rh *h, uint64_t tail)
{
    __atomic_store_n(&h->hdr->tail, tail, __ATOMIC_RELEASE);
    raw_ctrl(h, LSHM_WIRE_WAKE);
}

static void publish(struct rh *h)
{
    publish_tail(h, h->tail);
}

/* The next message on the bad port must be stream, inline, size bytes of its pattern. */
static void expect_pat(struct rh *h, uint32_t stream, uint32_t size)
{
    struct lshm_msg m;
    int ret = lshm_recv(h->bad, &m, 5000);

    cr_assert_eq(ret, 0, "stream %u: %d %s", stream, ret,
                 lshm_port_error(h->bad) ? lshm_port_error(h->bad) : lshm_last_error());
    cr_assert_eq(m.stream, stream);
    cr_assert(msg_check(&m, stream, size), "stream %u differs", stream);
    lshm_msg_done(&m);
}

/* ---- the verdict ---- */

/* The bad port closed with -EPROTO and a reason containing one of why[]. */
static void rh_closed(struct rh *h, const char *const *why)
{
    struct lshm_msg m;
    const char *reason;
    unsigned i;
    bool named = false;
    int ret;

    for (;;) {
        ret = lshm_recv(h->bad, &m, 5000);
        if (ret != 0)
            break;
        lshm_msg_done(&m);   /* valid messages before the violation */
    }
    cr_assert_eq(ret, -EPROTO, "lshm_recv on the hostile port: %d (%s)", ret,
                 lshm_port_error(h->bad) ? lshm_port_error(h->bad) : lshm_last_error());
    reason = lshm_port_error(h->bad);
    cr_assert_not_null(reason);
    for (i = 0; why[i] != NULL; i++)
        named |= strcasestr(reason, why[i]) != NULL;
    cr_assert(named, "reason \"%s\" does not say \"%s\"%s", reason, why[0],
              why[1] != NULL ? " or the like" : "");
    cr_log_info("ring hostile: %s", reason);
    cr_assert_eq(lshm_send(h->bad, &(struct lshm_out){ .type = T_DATA, .fd = -1 }, 0), -EPROTO);
}

#define WHY(...) ((const char *const[]){ __VA_ARGS__, NULL })

static void rh_unmap(struct rh *h)
{
    if (h->hdr != NULL)
        munmap(h->hdr, h->map_len);
    if (h->in != NULL)
        munmap(h->in, LSHM_RING_HEADER_SIZE + (size_t)h->in_size);
    h->hdr = NULL;
    h->in = NULL;
}

/* The good port still works; nothing of the bad one is left; then the end. */
static void rh_finish(struct rh *h)
{
    int i;

    good_pingpong(h, 6);
    rh_unmap(h);
    lshm_port_close(h->bad);
    h->bad = NULL;
    for (i = 0; i < 5; i++)
        lshm_ctx_run(h->ctx, 5);
    close(h->raw);
    h->raw = -1;
    cr_assert_eq(count_fds(), h->fds1, "fds: %d, %d before the hostile port", count_fds(),
                 h->fds1);
    cr_assert_eq(count_maps("memfd:"), h->maps1, "memfd mappings: %d, %d before",
                 count_maps("memfd:"), h->maps1);
    good_pingpong(h, 3);
    spawn_end(h->ctx, h->good, h->child);
}

static void rh_check(struct rh *h, const char *const *why)
{
    rh_closed(h, why);
    rh_finish(h);
}

/* Our HELLO with RING (64 KiB) and our valid ring sent: the usual start. */
static void rh_start(struct rh *h)
{
    rh_setup(h, 0, FEAT_RING, RING_64K);
    rh_ring(h, RING_64K);
}

/* ================= hostile producer: tail ================= */

LTEST(ringhostile, tail_beyond_head_plus_size)
{
    struct rh h;

    rh_start(&h);
    put_msg(&h, 1, 100);
    publish_tail(&h, RING_64K + 8);
    rh_check(&h, WHY("tail"));
}

LTEST(ringhostile, tail_moving_backwards)
{
    struct rh h;

    rh_start(&h);
    put_msg(&h, 1, 100);
    put_msg(&h, 2, 100);
    publish(&h);
    expect_pat(&h, 1, 100);
    expect_pat(&h, 2, 100);
    publish_tail(&h, 8);
    rh_check(&h, WHY("tail"));
}

LTEST(ringhostile, tail_not_a_multiple_of_8)
{
    struct rh h;

    rh_start(&h);
    put_msg(&h, 1, 100);
    publish_tail(&h, h.tail + 4);
    rh_check(&h, WHY("multiple of 8"));
}

/* ================= hostile producer: records ================= */

LTEST(ringhostile, msg_record_longer_than_wire_max)
{
    static uint8_t body[LSHM_WIRE_MAX + 8];
    struct lshm_wire_msg m = { .stream = 1, .pid = getpid(), .port_id = RAW_PORT,
                               .type = T_DATA, .size = LSHM_WIRE_MAX + 8 - 16 };
    struct rh h;

    rh_start(&h);
    memcpy(body, &m, sizeof(m));
    put_rec(&h, LSHM_REC_MSG, sizeof(body), body, sizeof(body));
    publish(&h);
    rh_check(&h, WHY("length", "range"));
}

LTEST(ringhostile, msg_record_shorter_than_a_header)
{
    struct rh h;

    rh_start(&h);
    put_rec(&h, LSHM_REC_MSG, 8, "12345678", 8);
    publish(&h);
    rh_check(&h, WHY("length", "range", "shorter"));
}

LTEST(ringhostile, record_crossing_the_end_of_the_ring)
{
    uint8_t body[2000 + 16];
    struct lshm_wire_msg m = { .stream = 9, .pid = getpid(), .port_id = RAW_PORT,
                               .type = T_DATA, .size = 2000 };
    struct rh h;
    unsigned i;

    rh_start(&h);
    /* Four valid records of 16016 bytes: the tail stops 1440 bytes short
     * of the end; the next record needs 2024 and does not SKIP. */
    for (i = 0; i < 4; i++)
        put_msg(&h, 1 + i, 16000);
    publish(&h);
    for (i = 0; i < 4; i++)
        expect_pat(&h, 1 + i, 16000);
    cr_assert_eq(h.tail, 4 * LSHM_REC_SPAN(16016));
    memcpy(body, &m, sizeof(m));
    memset(body + 16, 0x5a, 2000);
    {
        struct lshm_wire_record rec = { .len = sizeof(body), .kind = LSHM_REC_MSG };
        uint64_t off = h.tail % h.size;

        /* Written as far as the ring goes; the rest would wrap. */
        memcpy(h.data + off, &rec, sizeof(rec));
        memcpy(h.data + off + 8, body, h.size - off - 8);
        h.tail += LSHM_REC_SPAN(sizeof(body));
    }
    publish(&h);
    rh_check(&h, WHY("crosses the end", "end of the ring"));
}

LTEST(ringhostile, unknown_record_kind)
{
    struct rh h;

    rh_start(&h);
    put_rec(&h, 3, 0, NULL, 0);
    publish(&h);
    rh_check(&h, WHY("kind"));
}

LTEST(ringhostile, fence_record_with_a_length)
{
    struct rh h;

    rh_start(&h);
    put_rec(&h, LSHM_REC_FENCE, 8, "abcdefgh", 8);
    publish(&h);
    rh_check(&h, WHY("FENCE"));
}

/* A control message of type, well formed as a datagram (MMAP and RING but
 * for their fd), as a MSG record. */
static void put_ctrl(struct rh *h, uint8_t type)
{
    uint8_t buf[64];
    struct lshm_wire_msg m = { .pid = getpid(), .port_id = RAW_PORT, .type = type };
    struct lshm_wire_hello hello = { .magic = LSHM_MAGIC, .version = LSHM_PROTOCOL_VERSION,
                                     .port_id = RAW_PORT, .header_size = LSHM_HEADER_SIZE,
                                     .chunk_size = LSHM_CHUNK_SIZE,
                                     .chunk_count = LSHM_CHUNK_COUNT, .max_segments = 32,
                                     .features = FEAT_RING, .ring_size = RING_64K };
    uint32_t arg = type == LSHM_WIRE_RING ? RING_64K : 0;

    if (type == LSHM_WIRE_HELLO)
        m.size = sizeof(hello);
    else if (type == LSHM_WIRE_MMAP_MSG || type == LSHM_WIRE_RING)
        m.size = sizeof(arg);
    memcpy(buf, &m, sizeof(m));
    if (type == LSHM_WIRE_HELLO)
        memcpy(buf + sizeof(m), &hello, sizeof(hello));
    else
        memcpy(buf + sizeof(m), &arg, sizeof(arg));
    put_rec(h, LSHM_REC_MSG, (uint32_t)(sizeof(m) + m.size), buf, sizeof(m) + m.size);
}

LTEST(ringhostile, control_type_in_a_msg_record)
{
    const struct {
        uint8_t            type;
        const char *const *why;
    } cases[] = {
        { LSHM_WIRE_HELLO, WHY("control") },
        { LSHM_WIRE_SHM_ACK, WHY("control") },
        { LSHM_WIRE_BYE, WHY("control") },
        { LSHM_WIRE_WAKE, WHY("control") },
        /* These need an fd, which a record never has: either defect may be named. */
        { LSHM_WIRE_MMAP_MSG, WHY("control", "fd") },
        { LSHM_WIRE_RING, WHY("control", "fd") },
        { 15, WHY("control") },
    };
    unsigned i;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct rh h;

        rh_start(&h);
        put_msg(&h, 1, 10);
        put_ctrl(&h, cases[i].type);
        publish(&h);
        expect_pat(&h, 1, 10);
        rh_check(&h, cases[i].why);
    }
}

/*
 * The producer rewrites a record after it published it: what was delivered
 * was copied out once, and does not change.
 */
LTEST(ringhostile, record_rewritten_after_it_was_read_does_not_change_the_message)
{
    struct lshm_wire_record junk = { .len = 0xffffffffu, .kind = 77 };
    struct lshm_msg m;
    struct rh h;
    int ret;

    rh_start(&h);
    put_msg(&h, 1, 1000);
    publish(&h);
    ret = lshm_recv(h.bad, &m, 5000);
    cr_assert_eq(ret, 0, "%d %s", ret, lshm_port_error(h.bad));
    cr_assert(msg_check(&m, 1, 1000));
    /* Every byte of the record, its header included, rewritten. */
    memset(h.data, 0xee, LSHM_REC_SPAN(1016));
    memcpy(h.data, &junk, sizeof(junk));
    cr_assert(msg_check(&m, 1, 1000), "the message changed with the ring: not copied out");
    cr_assert_eq(m.size, 1000);
    lshm_msg_done(&m);
    /* The port goes on from the record after it. */
    put_msg(&h, 2, 500);
    publish(&h);
    expect_pat(&h, 2, 500);
    cr_assert_null(lshm_port_error(h.bad));
    rh_unmap(&h);
    shutdown(h.raw, SHUT_RDWR);
    cr_assert_eq(lshm_recv(h.bad, &m, 5000), -ECONNRESET);
    rh_finish(&h);
}

/* A thread that keeps rewriting the ring's bytes while the library reads it. */
struct scribbler {
    uint8_t         *data;
    uint32_t         size;
    volatile bool    stop;
    unsigned long    writes;
};

static void *scribble(void *arg)
{
    struct scribbler *s = arg;
    uint64_t st = pattern_seed(11);

    while (!s->stop) {
        uint64_t off = pattern_rand_below(&st, s->size / 8) * 8;
        uint64_t v = pattern_rand(&st);

        /* Record headers mostly: lengths and kinds, valid or not. */
        if (v & 1)
            v &= 0x00000003ffff3fffull;
        __atomic_store_n((uint64_t *)(s->data + off), v, __ATOMIC_RELAXED);
        s->writes++;
    }
    return NULL;
}

LTEST(ringhostile, records_rewritten_while_read_never_crash)
{
    struct scribbler s;
    struct lshm_msg m;
    pthread_t t;
    struct rh h;
    unsigned i, got = 0;
    int ret = 0;

    if (getenv("LSHM_SANITIZER") != NULL && strcmp(getenv("LSHM_SANITIZER"), "tsan") == 0)
        cr_skip_test("a race with the library's reads by design: not for ThreadSanitizer");
    rh_start(&h);
    s = (struct scribbler){ .data = h.data, .size = h.size };
    for (i = 0; i < 50; i++)
        put_msg(&h, i, 1000);
    cr_assert_eq(pthread_create(&t, NULL, scribble, &s), 0);
    publish(&h);
    while ((ret = lshm_recv(h.bad, &m, 2000)) == 0) {
        const uint8_t *b = m.iov[0].base;
        volatile uint8_t sum = 0;
        size_t k;

        /* Whatever came is a whole message of the library's own memory. */
        cr_assert_leq(m.size, LSHM_INLINE_MAX);
        for (k = 0; k < m.iov[0].len; k++)
            sum ^= b[k];
        (void)sum;
        lshm_msg_done(&m);
        got++;
    }
    s.stop = true;
    pthread_join(t, NULL);
    cr_log_info("ring hostile: %u messages read, %lu rewrites, then %d (%s)", got, s.writes, ret,
                lshm_port_error(h.bad) ? lshm_port_error(h.bad) : "open");
    /* Either every record read before the scribbles made one invalid
     * (-EPROTO), or the ring ran dry and the port is still open. */
    cr_assert(ret == -EPROTO || (ret == -ETIMEDOUT && lshm_port_error(h.bad) == NULL),
              "lshm_recv: %d", ret);
    if (ret == -ETIMEDOUT) {
        rh_unmap(&h);
        shutdown(h.raw, SHUT_RDWR);
        cr_assert_eq(lshm_recv(h.bad, &m, 5000), -ECONNRESET);
    }
    rh_finish(&h);
}

/* ================= hostile producer: FENCE and the socket ================= */

LTEST(ringhostile, fd_datagram_without_a_fence)
{
    uint8_t body[4] = { 1, 2, 3, 4 };
    struct rh h;
    int p[2];
    char c;

    rh_start(&h);
    put_msg(&h, 1, 10);
    publish(&h);
    expect_pat(&h, 1, 10);
    cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
    raw_send_hdr(&h, 2, T_DATA, 0, 4, body, 4, &p[1], 1);
    close(p[1]);
    raw_ctrl(&h, LSHM_WIRE_WAKE);
    rh_closed(&h, WHY("FENCE"));
    cr_assert_eq(read(p[0], &c, 1), 0, "the fd of the refused datagram is still open");
    close(p[0]);
    rh_finish(&h);
}

LTEST(ringhostile, mmap_without_a_fence)
{
    struct rh h;
    uint32_t id = 0;
    int fd;

    rh_start(&h);
    fd = memfd_create("lshm-hostile-seg", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    cr_assert_geq(fd, 0);
    cr_assert_eq(ftruncate(fd, LSHM_SEGMENT_SIZE), 0);
    raw_send_hdr(&h, 0, LSHM_WIRE_MMAP_MSG, 0, 4, &id, 4, &fd, 1);
    close(fd);
    rh_check(&h, WHY("FENCE"));
}

/* After our BYE the port drains; a datagram with an fd and no FENCE ends
 * the drain, and its fd is closed with the port (not kept with it). */
LTEST(ringhostile, fd_datagram_without_a_fence_while_draining_is_closed)
{
    uint8_t body[4] = { 1, 2, 3, 4 };
    struct rh h;
    int p[2], i;
    char c;

    rh_start(&h);
    put_msg(&h, 1, 10);
    publish(&h);
    expect_pat(&h, 1, 10);
    lshm_port_close(h.bad);
    h.bad = NULL;
    for (i = 0; i < 5; i++)
        lshm_ctx_run(h.ctx, 5);
    cr_assert_eq(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    raw_send_hdr(&h, 2, T_DATA, 0, 4, body, 4, &p[1], 1);
    close(p[1]);
    for (i = 0; i < 5; i++)
        lshm_ctx_run(h.ctx, 5);
    cr_assert_eq(read(p[0], &c, 1), 0, "the fd of the datagram is still open");
    close(p[0]);
    rh_unmap(&h);
    close(h.raw);
    h.raw = -1;
    for (i = 0; i < 5; i++)
        lshm_ctx_run(h.ctx, 5);
    cr_assert_eq(count_fds(), h.fds1, "fds: %d, %d before the hostile port", count_fds(),
                 h.fds1);
    cr_assert_eq(count_maps("memfd:"), h.maps1, "memfd mappings: %d, %d before",
                 count_maps("memfd:"), h.maps1);
    good_pingpong(&h, 3);
    spawn_end(h.ctx, h.good, h.child);
}

LTEST(ringhostile, bye_without_a_fence)
{
    struct rh h;

    rh_start(&h);
    raw_ctrl(&h, LSHM_WIRE_BYE);
    rh_check(&h, WHY("FENCE"));
}

LTEST(ringhostile, fence_with_no_datagram_closes_within_a_second)
{
    struct rh h;
    long long t0, dt;

    rh_start(&h);
    put_msg(&h, 1, 10);
    put_rec(&h, LSHM_REC_FENCE, 0, NULL, 0);
    publish(&h);
    t0 = now_ms();
    expect_pat(&h, 1, 10);
    rh_closed(&h, WHY("FENCE"));
    dt = now_ms() - t0;
    cr_log_info("ring hostile: FENCE without datagram closed after %lld ms", dt);
    cr_assert_geq(dt, 900, "closed after %lld ms: the page allows the datagram 1 s", dt);
    cr_assert_leq(dt, 3000, "closed only after %lld ms", dt);
    rh_finish(&h);
}

LTEST(ringhostile, user_message_without_fd_on_the_socket_after_ring)
{
    uint8_t body[4] = { 1, 2, 3, 4 };
    struct rh h;

    rh_start(&h);
    /* Even with a FENCE for it: it belongs in the ring. */
    put_rec(&h, LSHM_REC_FENCE, 0, NULL, 0);
    publish(&h);
    raw_send_hdr(&h, 2, T_DATA, 0, 4, body, 4, NULL, 0);
    rh_check(&h, WHY("ring", "RING"));
}

LTEST(ringhostile, wake_flood_leaves_the_port_working)
{
    struct lshm_wire_msg w = { .pid = getpid(), .port_id = RAW_PORT, .type = LSHM_WIRE_WAKE };
    struct rh h;
    unsigned sent = 0, i;
    long long end;

    rh_start(&h);
    /* The epoll I/O reads a few datagrams of a socket per run where
     * io_uring drains it: rounds until a thousand WAKEs went, 10 s at most. */
    end = now_ms() + 10000;
    for (i = 0; i < 50 || (sent < 1000 && now_ms() < end); i++) {
        /* As many WAKEs as the socket takes, and the context runs. */
        while (send(h.raw, &w, sizeof(w), MSG_DONTWAIT | MSG_NOSIGNAL) == sizeof(w))
            sent++;
        good_pingpong(&h, 1);
        lshm_ctx_run(h.ctx, 0);
    }
    cr_log_info("ring hostile: %u WAKEs in %u rounds", sent, i);
    cr_assert_geq(sent, 1000);
    put_msg(&h, 1, 3000);
    publish(&h);
    expect_pat(&h, 1, 3000);
    cr_assert_null(lshm_port_error(h.bad), "closed by WAKEs: %s", lshm_port_error(h.bad));
    rh_unmap(&h);
    shutdown(h.raw, SHUT_RDWR);
    cr_assert_eq(lshm_recv(h.bad, &(struct lshm_msg){ 0 }, 5000), -ECONNRESET);
    rh_finish(&h);
}

/* ================= hostile producer: RING and WAKE out of place ================= */

LTEST(ringhostile, ring_when_our_hello_lacked_ring)
{
    struct rh h;

    rh_setup(&h, 0, 0, 0);
    rh_ring(&h, RING_64K);
    rh_check(&h, WHY("RING"));
}

LTEST(ringhostile, ring_when_the_library_hello_lacked_ring)
{
    struct rh h;

    rh_setup(&h, LSHM_CTX_NO_RING, FEAT_RING, RING_64K);
    cr_assert_not(h.lib_features & FEAT_RING, "HELLO features %#x with LSHM_CTX_NO_RING",
                  h.lib_features);
    rh_ring(&h, RING_64K);
    rh_check(&h, WHY("RING"));
}

LTEST(ringhostile, second_ring)
{
    struct rh h;

    rh_start(&h);
    put_msg(&h, 1, 10);
    publish(&h);
    expect_pat(&h, 1, 10);
    rh_ring(&h, RING_64K);
    rh_check(&h, WHY("RING"));
}

LTEST(ringhostile, wake_before_ring)
{
    struct rh h;

    rh_setup(&h, 0, FEAT_RING, RING_64K);
    raw_ctrl(&h, LSHM_WIRE_WAKE);
    rh_check(&h, WHY("WAKE"));
}

LTEST(ringhostile, ring_size_above_the_library_hello)
{
    struct rh h;
    uint32_t size;

    rh_setup(&h, 0, FEAT_RING, RING_64K);
    cr_assert(h.lib_features & FEAT_RING);
    size = h.lib_ring_size * 2;
    send_ring(&h, size, ring_memfd(&h, LSHM_RING_HEADER_SIZE + (size_t)size, size, RING_OK));
    rh_check(&h, WHY("ring_size", "ring size", "larger", "above"));
}

LTEST(ringhostile, ring_size_not_a_power_of_two)
{
    uint32_t size = RING_64K + 4096;
    struct rh h;

    rh_setup(&h, 0, FEAT_RING, RING_64K);
    send_ring(&h, size, ring_memfd(&h, LSHM_RING_HEADER_SIZE + (size_t)size, size, RING_OK));
    rh_check(&h, WHY("power of two"));
}

LTEST(ringhostile, ring_size_differs_from_the_ring_header)
{
    struct rh h;

    rh_setup(&h, 0, FEAT_RING, RING_64K);
    send_ring(&h, RING_64K,
              ring_memfd(&h, LSHM_RING_HEADER_SIZE + (size_t)RING_64K, 2 * RING_64K, RING_OK));
    rh_check(&h, WHY("size"));
}

/* A RING whose memfd is wrong as how (or file_size) says: refused for why. */
static void bad_ring(size_t file_size, int how, const char *const *why)
{
    struct rh h;

    rh_setup(&h, 0, FEAT_RING, RING_64K);
    send_ring(&h, RING_64K, ring_memfd(&h, file_size, RING_64K, how));
    rh_check(&h, why);
}

LTEST(ringhostile, ring_memfd_unsealed)
{
    bad_ring(LSHM_RING_HEADER_SIZE + (size_t)RING_64K, RING_UNSEALED, WHY("seal"));
}

LTEST(ringhostile, ring_memfd_of_the_wrong_size)
{
    bad_ring(LSHM_RING_HEADER_SIZE + (size_t)RING_64K + 4096, RING_OK, WHY("size", "bytes"));
}

LTEST(ringhostile, ring_header_with_a_bad_magic)
{
    bad_ring(LSHM_RING_HEADER_SIZE + (size_t)RING_64K, RING_BAD_MAGIC, WHY("magic"));
}

LTEST(ringhostile, ring_header_with_a_bad_version)
{
    bad_ring(LSHM_RING_HEADER_SIZE + (size_t)RING_64K, RING_BAD_VERSION, WHY("version"));
}

LTEST(ringhostile, ring_header_with_a_bad_source_pid)
{
    bad_ring(LSHM_RING_HEADER_SIZE + (size_t)RING_64K, RING_BAD_SRC, WHY("pid"));
}

LTEST(ringhostile, ring_header_with_a_bad_destination_pid)
{
    bad_ring(LSHM_RING_HEADER_SIZE + (size_t)RING_64K, RING_BAD_DST, WHY("pid"));
}

LTEST(ringhostile, ring_header_with_another_port_id)
{
    bad_ring(LSHM_RING_HEADER_SIZE + (size_t)RING_64K, RING_BAD_PORT, WHY("port"));
}

LTEST(ringhostile, ring_fd_a_pipe)
{
    struct rh h;
    int p[2];
    char c;

    rh_setup(&h, 0, FEAT_RING, RING_64K);
    cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
    send_ring(&h, RING_64K, p[1]);
    rh_closed(&h, WHY("regular file", "memfd"));
    cr_assert_eq(read(p[0], &c, 1), 0, "the pipe sent as a ring is still open");
    close(p[0]);
    rh_finish(&h);
}

/* ================= hostile consumer: the library's ring ================= */

/* Messages of 4000 bytes from the library until its ring (64 KiB, as our
 * HELLO allows) is mapped here; returns how many were sent. */
static unsigned lib_sends(struct rh *h, uint32_t first, unsigned n)
{
    unsigned i;

    for (i = 0; i < n; i++) {
        int ret = send_pat(h->bad, first + i, 4000, 0);

        if (ret != 0)
            return i;
        lshm_ctx_run(h->ctx, 0);
    }
    return n;
}

/* Until the library's ring is here and has at least bytes published. */
static void wait_lib_tail(struct rh *h, uint64_t bytes)
{
    long long end = now_ms() + 5000;

    for (;;) {
        raw_drain(h);
        if (h->in != NULL && __atomic_load_n(&h->in->tail, __ATOMIC_ACQUIRE) >= bytes)
            return;
        cr_assert_lt(now_ms(), end, "the library published %s", h->in ? "too little" : "no ring");
        lshm_ctx_run(h->ctx, 5);
    }
}

/* Read every published record of the library's ring, as a consumer does
 * (without checks: the library is trusted here); returns the new head. */
static uint64_t consume_all(struct rh *h)
{
    uint64_t tail = __atomic_load_n(&h->in->tail, __ATOMIC_ACQUIRE);

    h->head = tail;
    __atomic_store_n(&h->in->head, h->head, __ATOMIC_RELEASE);
    return h->head;
}

/* Let the library run (and send) for ms. */
static void run_for(struct rh *h, int ms)
{
    long long end = now_ms() + ms;

    while (now_ms() < end && lshm_port_error(h->bad) == NULL)
        lshm_ctx_run(h->ctx, 5);
}

LTEST(ringhostile, consumer_head_ahead_of_tail)
{
    struct rh h;

    rh_setup(&h, 0, FEAT_RING, RING_64K);
    cr_assert_eq(lib_sends(&h, 1, 1), 1);
    wait_lib_tail(&h, 8);
    /* Far enough ahead that the library's tail never gets there. */
    __atomic_store_n(&h.in->head, __atomic_load_n(&h.in->tail, __ATOMIC_ACQUIRE) + (4u << 20),
                     __ATOMIC_RELEASE);
    /* The library looks at head when it needs room: fill its ring. */
    lib_sends(&h, 2, 40);
    run_for(&h, 300);
    rh_check(&h, WHY("head"));
}

LTEST(ringhostile, consumer_head_far_behind_tail)
{
    struct rh h;
    unsigned sent = 0;
    long long end = now_ms() + 5000;

    rh_setup(&h, 0, FEAT_RING, RING_64K);
    /* A correct consumer first, until the tail is past one ring's length. */
    while (h.in == NULL || __atomic_load_n(&h.in->tail, __ATOMIC_ACQUIRE) <= 2 * RING_64K) {
        cr_assert_lt(now_ms(), end, "the library's tail never passed 128 KiB");
        sent += lib_sends(&h, 1 + sent, 4);
        wait_lib_tail(&h, 8);
        consume_all(&h);
        raw_ctrl(&h, LSHM_WIRE_SHM_ACK);
        lshm_ctx_run(h.ctx, 1);
    }
    consume_all(&h);
    __atomic_store_n(&h.in->head, h.head - RING_64K - 64, __ATOMIC_RELEASE);
    lib_sends(&h, 1 + sent, 40);
    run_for(&h, 300);
    rh_check(&h, WHY("head"));
}

LTEST(ringhostile, consumer_forcing_wake_gets_one_wake_per_head_movement)
{
    struct rh h;
    unsigned i, before;

    /* Without FUTEX: every wake-up is a WAKE datagram, counted here. */
    rh_setup(&h, 0, FEAT_RING, RING_64K);
    cr_assert_eq(lib_sends(&h, 1, 1), 1);
    wait_lib_tail(&h, 8);
    raw_drain(&h);
    before = h.wakes_in;
    /* Asleep, as far as the library can tell, and never reading. */
    for (i = 0; i < 8; i++) {
        __atomic_store_n(&h.in->wake, 1, __ATOMIC_SEQ_CST);
        cr_assert_eq(lib_sends(&h, 2 + i, 1), 1);
        run_for(&h, 10);
        raw_drain(&h);
    }
    cr_log_info("ring hostile: %u WAKEs for 8 messages with head still", h.wakes_in - before);
    cr_assert_leq(h.wakes_in - before, 1, "%u WAKEs while head did not move",
                  h.wakes_in - before);
    /* head moves: one more wake-up is owed, and no more. */
    consume_all(&h);
    before = h.wakes_in;
    for (i = 0; i < 8; i++) {
        __atomic_store_n(&h.in->wake, 1, __ATOMIC_SEQ_CST);
        cr_assert_eq(lib_sends(&h, 10 + i, 1), 1);
        run_for(&h, 10);
        raw_drain(&h);
    }
    cr_assert_geq(h.wakes_in - before, 1, "no WAKE after head moved");
    cr_assert_leq(h.wakes_in - before, 1, "%u WAKEs after one movement of head",
                  h.wakes_in - before);
    cr_assert_null(lshm_port_error(h.bad), "closed: %s", lshm_port_error(h.bad));
    rh_unmap(&h);
    shutdown(h.raw, SHUT_RDWR);
    run_for(&h, 50);
    rh_finish(&h);
}

LTEST(ringhostile, consumer_forcing_space_does_not_stop_the_library)
{
    struct rh h;
    unsigned i;

    rh_setup(&h, 0, FEAT_RING, RING_64K);
    cr_assert_eq(lib_sends(&h, 1, 1), 1);
    wait_lib_tail(&h, 8);
    /* space is the producer's word; the consumer scribbles it. */
    for (i = 0; i < 30; i++) {
        __atomic_store_n(&h.in->space, 1, __ATOMIC_SEQ_CST);
        cr_assert_eq(lib_sends(&h, 2 + i, 1), 1);
        run_for(&h, 2);
        raw_drain(&h);
        consume_all(&h);
        raw_ctrl(&h, LSHM_WIRE_SHM_ACK);
    }
    run_for(&h, 50);
    raw_drain(&h);
    consume_all(&h);
    /* Every message was published, each a record of 4024 bytes. */
    cr_assert_geq(h.head, 31u * LSHM_REC_SPAN(16 + 4000), "head %llu",
                  (unsigned long long)h.head);
    cr_assert_null(lshm_port_error(h.bad), "closed: %s", lshm_port_error(h.bad));
    rh_unmap(&h);
    shutdown(h.raw, SHUT_RDWR);
    run_for(&h, 50);
    rh_finish(&h);
}

LTEST(ringhostile, producer_forcing_space_gets_bounded_shm_acks)
{
    struct rh h;
    unsigned i;

    rh_start(&h);
    /* Our own space word, set before every record: the library answers
     * with at most one SHM_ACK per head it publishes. */
    for (i = 0; i < 20; i++) {
        __atomic_store_n(&h.hdr->space, 1, __ATOMIC_SEQ_CST);
        put_msg(&h, i, 100);
        publish(&h);
        expect_pat(&h, i, 100);
        raw_drain(&h);
    }
    run_for(&h, 20);
    raw_drain(&h);
    cr_log_info("ring hostile: %u SHM_ACKs for 20 records with space forced", h.acks_in);
    cr_assert_geq(h.acks_in, 1, "space = 1 and no SHM_ACK");
    cr_assert_leq(h.acks_in, 20, "%u SHM_ACKs for 20 records", h.acks_in);
    cr_assert_null(lshm_port_error(h.bad), "closed: %s", lshm_port_error(h.bad));
    rh_unmap(&h);
    shutdown(h.raw, SHUT_RDWR);
    cr_assert_eq(lshm_recv(h.bad, &(struct lshm_msg){ 0 }, 5000), -ECONNRESET);
    rh_finish(&h);
}
