/*
 * A live port fed by a hostile peer.  The library adopts one end of a
 * socketpair; the input drives what the raw other end sends: a HELLO, then
 * datagrams with fds (segments made from the input: their size, seals and
 * header fields; pipes; plain memfds), scribbles into the segments it
 * announced, and runs of the context that receive and read every message.
 * Whatever arrives, the library must not crash, must only hand out memory
 * inside a segment it mapped, and must leave no fd or mapping behind.
 *
 * With RING in the peer's HELLO (protocol version 2) the peer also sends
 * RING with a ring memfd made from the input (size, seals, header fields),
 * writes records into it (MSG, FENCE, SKIP, any header; tail published as
 * it is or as the input says, records rewritten after publishing), sends
 * WAKE or wakes the futex, and sends datagrams that need a FENCE; and it
 * maps the ring the library sends and rewrites its head, wake and space.
 *
 * Input: a context byte (fuzz_ctx, and bit 7: a message handler instead
 * of lshm_recv), a HELLO byte, then operations, one byte each followed by
 * its arguments (see the op_* functions).
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fuzz.h"
#include "msgring.h"
#include "shm.h"
#include "wire.h"

#define RAW_PORT  77
#define MAX_SEGS  4
#define MAX_HELD  8
#define MAX_OPS   96

/* The pid headers and segments carry: this process, or the one claimed. */
static int32_t header_pid;

struct seg {
    int   fd;
    void *map;      /* the fuzzer's own mapping, or NULL */
    size_t size;
};

/* A ring: the peer's own (it writes records), or the library's (mapped
 * from its RING). */
struct pring {
    uint8_t *map;       /* LSHM_RING_HEADER_SIZE + size bytes, or NULL */
    size_t   size;      /* data bytes */
    size_t   len;       /* the mapping's length */
    uint64_t tail;      /* the peer's: bytes written */
};

struct state {
    struct lshm_ctx  *ctx;
    struct lshm_port *ports[2];    /* NULL once closed, or before the second is made */
    int               raws[2];     /* their raw ends, -1 before */
    unsigned          cur;         /* the port the operations act on */
    pid_t             cred_pid;    /* 0, or the pid the raw end claims (root only) */
    bool              handler;
    struct seg        segs[MAX_SEGS];
    unsigned          nsegs;
    uint32_t          next_id;  /* next MMAP id the library expects */
    struct pring      rings[2];    /* the peer's ring on each port */
    struct pring      lrings[2];   /* the library's ring on each port */
    struct lshm_msg   held[MAX_HELD];
    unsigned          nheld;
    volatile uint8_t  sink;
};

/* Read every byte of a received message: the library must only point
 * into memory it mapped (a bad pointer faults here). */
static void consume(struct state *s, struct lshm_msg *m)
{
    size_t total = 0;
    uint8_t x = 0;
    unsigned i;

    for (i = 0; i < m->niov; i++) {
        const uint8_t *p = m->iov[i].base;
        size_t j;

        for (j = 0; j < m->iov[i].len; j++)
            x ^= p[j];
        total += m->iov[i].len;
    }
    s->sink ^= x;
    if (total != m->size) {
        fprintf(stderr, "fuzz_port: message size %zu, iovs hold %zu\n", m->size, total);
        abort();
    }
    if (m->fd >= 0) {
        close(m->fd);
        m->fd = -1;
    }
}

static void on_msg(struct lshm_port *port, struct lshm_msg *msg, void *arg)
{
    consume(arg, msg);
    lshm_msg_done(msg);
}

static void on_close(struct lshm_port *port, int error, void *arg)
{
}

static void release_held(struct state *s)
{
    while (s->nheld > 0)
        lshm_msg_done(&s->held[--s->nheld]);
}

/* Run the context, then take every message waiting; hold some. */
static void run(struct state *s, unsigned times, bool hold)
{
    struct lshm_msg m;
    unsigned i;

    fuzz_pump(s->ctx, times);
    for (i = 0; i < 2; i++) {
        if (s->ports[i] == NULL || s->handler)
            continue;
        while (lshm_recv(s->ports[i], &m, 0) == 0) {
            consume(s, &m);
            if (hold && s->nheld < MAX_HELD)
                s->held[s->nheld++] = m;
            else
                lshm_msg_done(&m);
        }
    }
}

/* A datagram on the current raw end, with the credentials it claims. */
static void raw_send(struct state *s, const void *buf, size_t len, const int *fds, unsigned n)
{
    struct ucred cred = { .pid = s->cred_pid, .uid = getuid(), .gid = getgid() };

    fuzz_raw_send(s->raws[s->cur], buf, len, fds, n, s->cred_pid ? &cred : NULL);
}

/* Credentials that name another process: the kernel lets a privileged
 * sender claim any live pid (it refuses the datagram otherwise). */
static pid_t claimed_pid(uint8_t sel)
{
    switch (sel % 4) {
    case 1:  return getppid();
    case 2:  return 1;
    case 3:  return getpid();
    default: return 0;
    }
}

/* A second port to the same process (the fuzzer), made on first use:
 * the two share the pair's segments. */
static void switch_port(struct state *s)
{
    uint8_t buf[64];

    s->cur ^= 1;
    if (s->raws[s->cur] >= 0)
        return;
    s->raws[s->cur] = fuzz_raw_port(s->ctx, &s->ports[s->cur]);
    if (s->raws[s->cur] < 0)
        abort();
    if (s->handler)
        lshm_port_set_handler(s->ports[s->cur], on_msg, on_close, s);
    fuzz_raw_send(s->raws[s->cur], buf,
                  fuzz_hello(buf, RAW_PORT, 4, LSHM_WIRE_FEAT_RING, LSHM_RING_SIZE_MIN), NULL,
                  0, NULL);
}

/* An fd to send along, by kind; the fuzzer's copy is closed after the send. */
static int make_fd(struct state *s, unsigned kind)
{
    int p[2], fd;

    switch (kind % 5) {
    case 1:
        if (s->nsegs > 0)
            return dup(s->segs[s->nsegs - 1].fd);
        return -1;
    case 2:
        if (pipe2(p, O_CLOEXEC) < 0)
            abort();
        close(p[0]);
        return p[1];
    case 3:
        fd = memfd_create("fuzz-plain", MFD_CLOEXEC);
        if (fd < 0)
            abort();
        return fd;
    case 4:
        return dup(s->raws[s->cur]);
    default:
        return -1;
    }
}

static void send_with(struct state *s, const void *buf, size_t len, unsigned fdsel)
{
    int fds[24];
    unsigned n = 0, i, want = fdsel & 3;

    /* Low bits: how many fds (0..3, or 24: more than the receiver's control
     * buffer holds); the rest: which kind. */
    if (want == 3 && (fdsel & 0x80))
        want = 24;
    for (i = 0; i < want; i++) {
        int fd = make_fd(s, want > 3 ? 2 + i % 3 : (fdsel >> 2) + i);

        if (fd >= 0)
            fds[n++] = fd;
    }
    raw_send(s, buf, len, fds, n);
    for (i = 0; i < n; i++)
        close(fds[i]);
}

static size_t put_hdr(uint8_t *p, uint32_t stream, uint8_t type, uint8_t flags, uint32_t size)
{
    struct lshm_wire_msg h = { .stream = stream, .pid = header_pid, .port_id = RAW_PORT,
                               .type = type, .flags = flags, .size = size };

    memcpy(p, &h, sizeof(h));
    return sizeof(h);
}

/* Any bytes, the header's pid and port made right unless the op says not. */
static void op_raw(struct state *s, struct fin *in, uint8_t op)
{
    static uint8_t buf[LSHM_WIRE_MAX + 64];
    size_t len = fin_u16(in) % sizeof(buf);
    unsigned fdsel = fin_u8(in);
    int32_t pid = header_pid;
    uint16_t port = RAW_PORT;

    len = fin_bytes(in, buf, len);
    if (!(op & 0x80) && len >= 10) {
        memcpy(buf + 4, &pid, 4);
        memcpy(buf + 8, &port, 2);
    }
    send_with(s, buf, len, fdsel);
}

/* A segment from the input's choices, announced with MMAP. */
static void op_mmap(struct state *s, struct fin *in, uint8_t op)
{
    uint8_t sel = fin_u8(in), bad = fin_u8(in);
    struct lshm_segment_header h;
    unsigned seals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;
    uint32_t id = s->next_id;
    uint8_t buf[32];
    size_t size;
    struct seg *g;
    int fd;

    switch (sel & 3) {
    case 0:  size = LSHM_SEGMENT_SIZE; break;
    case 1:  size = LSHM_SEGMENT_SIZE - LSHM_CHUNK_SIZE; break;
    case 2:  size = LSHM_SEGMENT_SIZE + 4096; break;
    default: size = fin_u16(in); break;
    }
    if (sel & 0x04)
        seals = fin_u8(in) & (F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE |
                              F_SEAL_FUTURE_WRITE);
    fd = memfd_create("fuzz-seg", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0 || ftruncate(fd, (off_t)size) < 0)
        abort();
    memset(&h, 0, sizeof(h));
    h.magic = (bad & 1) ? fin_u32(in) : LSHM_MAGIC;
    h.version = (bad & 2) ? fin_u16(in) : LSHM_PROTOCOL_VERSION;
    h.sent_over = RAW_PORT;
    h.id = (bad & 4) ? fin_u8(in) : id;
    h.src_pid = (bad & 8) ? (int32_t)fin_u32(in) : header_pid;
    h.dst_pid = (bad & 16) ? (int32_t)fin_u32(in) : getpid();
    memset(h.free_map, 0xff, sizeof(h.free_map));
    memset(h.free_tracking_map, 0xff, sizeof(h.free_tracking_map));
    if (size >= sizeof(h) && pwrite(fd, &h, sizeof(h), 0) != (ssize_t)sizeof(h))
        abort();
    if (s->nsegs < MAX_SEGS) {
        g = &s->segs[s->nsegs++];
        g->fd = fd;
        g->size = size;
        g->map = NULL;
        if (size > 0 && !(seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE))) {
            g->map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            if (g->map == MAP_FAILED)
                g->map = NULL;
        }
    } else {
        g = NULL;
    }
    /* F_SEAL_WRITE needs no writable mapping: it fails (EBUSY) otherwise. */
    fcntl(fd, F_ADD_SEALS, seals);
    if (bad & 32)
        id = fin_u8(in);
    else
        s->next_id++;
    size = put_hdr(buf, 0, LSHM_WIRE_MMAP_MSG, 0, 4);
    memcpy(buf + size, &id, 4);
    raw_send(s, buf, size + 4, &fd, 1);
    if (g == NULL)
        close(fd);
}

static uint32_t desc_size(struct fin *in)
{
    uint8_t k = fin_u8(in);

    switch (k & 3) {
    case 0:  return 1 + fin_u16(in);
    case 1:  return LSHM_CHUNK_SIZE * (1 + (k >> 2) % 8);
    case 2:  return fin_u32(in);
    default: return LSHM_DATA_SIZE - LSHM_CHUNK_SIZE * (k >> 2);
    }
}

/* A user message whose payload is in segments: descriptors, tracking. */
static void op_shm(struct state *s, struct fin *in, uint8_t op)
{
    static uint8_t buf[LSHM_WIRE_MAX + 64];
    uint8_t sel = fin_u8(in), flags = LSHM_WIRE_MMAP;
    uint32_t stream = (sel & 1) ? fin_u32(in) : 1u + (sel >> 4);
    uint8_t type = LSHM_TYPE_USER_MIN + (fin_u8(in) % 240);
    unsigned ndesc = 1 + ((sel & 2) ? fin_u8(in) % 70 : fin_u8(in) % 4), i;
    struct lshm_wire_tracking t = { 0 };
    uint64_t sum = 0;
    unsigned fdsel;
    size_t off;

    if (op & 0x10)
        flags |= LSHM_WIRE_LAST;
    if (sel & 4) {
        flags |= LSHM_WIRE_TRACKING;
        t.mmap_id = fin_u8(in) % (MAX_SEGS + 1);
        t.tracking_id = fin_u16(in) % (LSHM_CHUNK_COUNT + 20);
        /* The sender's side of tracking: publish the stream in the slot
         * (or, as a canceller would, leave 0 or anything else there). */
        if (t.mmap_id < s->nsegs && s->segs[t.mmap_id].map != NULL &&
            s->segs[t.mmap_id].size >= LSHM_HEADER_SIZE &&
            t.tracking_id < LSHM_CHUNK_COUNT) {
            struct lshm_segment_header *h = s->segs[t.mmap_id].map;

            h->tracking[t.tracking_id] = (sel & 8) ? fin_u32(in) : stream;
        }
    }
    off = sizeof(struct lshm_wire_msg);
    if (flags & LSHM_WIRE_TRACKING) {
        memcpy(buf + off, &t, sizeof(t));
        off += sizeof(t);
    }
    for (i = 0; i < ndesc && off + 12 <= sizeof(buf); i++) {
        struct lshm_wire_desc d;

        d.mmap_id = fin_u8(in) % (MAX_SEGS + 1);
        d.chunk_id = fin_u16(in) % (LSHM_CHUNK_COUNT + 20);
        d.size = desc_size(in);
        sum += d.size;
        memcpy(buf + off, &d, sizeof(d));
        off += sizeof(d);
    }
    put_hdr(buf, stream, type, flags, (op & 0x20) ? fin_u32(in) : (uint32_t)sum);
    fdsel = (op & 0x40) ? fin_u8(in) : 0;
    send_with(s, buf, off, fdsel);
}

/* An inline user message. */
static void op_inline(struct state *s, struct fin *in, uint8_t op)
{
    static uint8_t buf[LSHM_WIRE_MAX + 64];
    uint32_t stream = fin_u32(in);
    uint8_t type = (op & 0x10) ? fin_u8(in) : LSHM_TYPE_USER_MIN + (op >> 5);
    uint8_t flags = (op & 0x80) ? fin_u8(in) : LSHM_WIRE_LAST;
    size_t len = fin_u16(in) % (LSHM_INLINE_MAX + 32);
    uint32_t size = (fin_u8(in) & 1) ? fin_u32(in) : (uint32_t)len;
    unsigned fdsel = fin_u8(in);

    memset(buf, (int)stream, sizeof(struct lshm_wire_msg) + len);
    put_hdr(buf, stream, type, flags, size);
    send_with(s, buf, sizeof(struct lshm_wire_msg) + len, fdsel);
}

/* A control message, any of the 16 types, with a body of 0..31 bytes. */
static void op_ctrl(struct state *s, struct fin *in, uint8_t op)
{
    uint8_t buf[64];
    uint8_t type = fin_u8(in);
    size_t blen = (op >> 3) & 31;
    unsigned fdsel = fin_u8(in);

    if (type == 0xff)
        blen = fuzz_hello(buf, RAW_PORT, 1 + (op >> 3), 0, 0) - sizeof(struct lshm_wire_msg);
    else
        put_hdr(buf, 0, type & 15, 0, (uint32_t)blen);
    fin_bytes(in, buf + sizeof(struct lshm_wire_msg), type == 0xff ? 0 : blen);
    send_with(s, buf, sizeof(struct lshm_wire_msg) + blen, fdsel);
}

/* The peer writes into the segment header it owns. */
static void op_scribble(struct state *s, struct fin *in, uint8_t op)
{
    uint8_t i = fin_u8(in) % MAX_SEGS;
    uint16_t off = fin_u16(in) % LSHM_HEADER_SIZE;
    uint32_t v = fin_u32(in);

    if (i < s->nsegs && s->segs[i].map != NULL && s->segs[i].size >= LSHM_HEADER_SIZE)
        memcpy((uint8_t *)s->segs[i].map + (off & ~3u), &v, 4);
}

/* The library sends to the peer: inline, or through its own segments. */
static void op_lib_send(struct state *s, struct fin *in, uint8_t op)
{
    static const uint8_t data[256];
    struct lshm_out out = { .type = LSHM_TYPE_USER_MIN, .fd = -1 };
    struct lshm_buf *b = NULL;
    uint32_t size = fin_u16(in) * 4u;

    struct lshm_port *port = s->ports[s->cur];

    if (port == NULL)
        return;
    out.stream = fin_u8(in);
    if (op & 0x10) {
        if (lshm_buf_alloc(port, size, &b) < 0)
            return;
        memset(lshm_buf_data(b), 0x5a, lshm_buf_capacity(b));
        out.bufs = &b;
        out.nbufs = 1;
    } else {
        out.data = data;
        out.size = size % sizeof(data);
    }
    if (lshm_send(port, &out, 0) < 0 && b != NULL)
        lshm_buf_free(b);
}

/* The peer reads what the library sent; fds are closed, nothing mapped. */
static void op_drain_raw(struct state *s)
{
    static uint8_t buf[LSHM_WIRE_MAX];
    int fds[4];
    unsigned n, i, k;

    for (k = 0; k < 64; k++) {
        ssize_t len = fuzz_raw_recv(s->raws[s->cur], buf, sizeof(buf), fds, 4, &n);
        struct pring *r = &s->lrings[s->cur];
        uint32_t size;

        if (len < 0)
            break;
        /* The library's RING: mapped, so that its header can be rewritten. */
        if (len == 20 && buf[10] == LSHM_WIRE_RING && n == 1 && r->map == NULL) {
            memcpy(&size, buf + 16, 4);
            if (lshm__ring_size_is_valid(size)) {
                void *m = mmap(NULL, LSHM_RING_HEADER_SIZE + (size_t)size,
                               PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);

                if (m == MAP_FAILED) {
                    fprintf(stderr, "fuzz_port: the library's ring cannot be mapped\n");
                    abort();
                }
                r->map = m;
                r->size = size;
                r->len = LSHM_RING_HEADER_SIZE + (size_t)size;
            }
        }
        for (i = 0; i < n; i++)
            close(fds[i]);
    }
}

/* ---- rings ---- */

static struct lshm_msgring_header *ring_hdr(struct pring *r)
{
    return (struct lshm_msgring_header *)r->map;
}

/* The peer's RING: a ring memfd from the input's choices, announced. */
static void op_ring(struct state *s, struct fin *in, uint8_t op)
{
    uint8_t sel = fin_u8(in), bad = fin_u8(in);
    unsigned seals = F_SEAL_SHRINK | F_SEAL_GROW;
    struct pring *r = &s->rings[s->cur];
    uint32_t ring_size;
    size_t size, file;
    uint8_t buf[32];
    size_t n;
    int fd;

    switch (sel & 3) {
    case 0:  size = LSHM_RING_SIZE_MIN; break;
    case 1:  size = LSHM_RING_SIZE_MIN * 2; break;
    case 2:  size = LSHM_RING_SIZE_MIN * 8; break;   /* above the library's HELLO */
    default: size = fin_u32(in) % (1u << 20); break;
    }
    file = LSHM_RING_HEADER_SIZE + size;
    if (bad & 1)
        file = (file + (int16_t)fin_u16(in)) & 0x1fffff;
    fd = fuzz_ring_memfd(0, RAW_PORT, header_pid, getpid());
    if (fd < 0 || ftruncate(fd, (off_t)file) < 0)
        abort();
    if (file >= sizeof(struct lshm_msgring_header)) {
        uint32_t v = (uint32_t)size;

        if (pwrite(fd, &v, 4, 8) != 4)
            abort();
        if (bad & 2) {
            v = fin_u32(in);
            if (pwrite(fd, &v, 4, (fin_u8(in) % 5) * 4) != 4)
                abort();
        }
    }
    if (bad & 4)
        seals = fin_u8(in) & (F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE |
                              F_SEAL_FUTURE_WRITE);
    if (r->map == NULL && size >= 8 && file == LSHM_RING_HEADER_SIZE + size &&
        !(seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE))) {
        void *m = mmap(NULL, file, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);

        if (m != MAP_FAILED) {
            r->map = m;
            r->size = size;
            r->len = file;
            r->tail = 0;
        }
    }
    fcntl(fd, F_ADD_SEALS, seals);
    ring_size = (bad & 8) ? fin_u32(in) : (uint32_t)size;
    n = put_hdr(buf, 0, LSHM_WIRE_RING, 0, 4);
    memcpy(buf + n, &ring_size, 4);
    if (bad & 16)
        send_with(s, buf, n + 4, fin_u8(in));   /* no ring fd, or other fds */
    else
        raw_send(s, buf, n + 4, &fd, 1);
    close(fd);
}

/* Write n bytes at stream position pos, wrapping at the end. */
static void ring_put(struct pring *r, uint64_t pos, const void *p, size_t n)
{
    const uint8_t *b = p;
    size_t i;

    for (i = 0; i < n; i++)
        r->map[LSHM_RING_HEADER_SIZE + ((pos + i) % r->size)] = b[i];
}

static void publish(struct pring *r, uint64_t tail)
{
    __atomic_store_n(&ring_hdr(r)->tail, tail, __ATOMIC_RELEASE);
}

/* The producer's wake-up: exchange wake, then the futex or a WAKE. */
static void ring_wake(struct state *s, struct pring *r, uint8_t how)
{
    uint8_t buf[32];

    if (r->map != NULL && !(how & 1) &&
        __atomic_exchange_n(&ring_hdr(r)->wake, 0, __ATOMIC_SEQ_CST) == 0)
        return;
    if ((how & 2) && r->map != NULL)
        lshm__futex_wake(&ring_hdr(r)->wake);
    else
        send_with(s, buf, put_hdr(buf, 0, LSHM_WIRE_WAKE, 0, 0), (how & 4) ? how >> 3 : 0);
}

/* A record at the peer's tail: MSG (an inline user message, or any bytes),
 * FENCE, SKIP, or any header; a SKIP first where it would cross the end
 * unless the op says to cross it; published, and a wake-up, if asked. */
static void op_record(struct state *s, struct fin *in, uint8_t op)
{
    static uint8_t body[LSHM_WIRE_MAX + 64];
    struct pring *r = &s->rings[s->cur];
    uint8_t sel = fin_u8(in);
    struct lshm_wire_record rec = { 0, LSHM_REC_FENCE };
    uint64_t span, head;

    if (r->map == NULL)
        return;
    switch (sel & 3) {
    case 0:
        rec.kind = LSHM_REC_MSG;
        if (sel & 4) {
            rec.len = fin_u16(in) % sizeof(body);
            rec.len = (uint32_t)fin_bytes(in, body, rec.len);
            if (!(sel & 8) && rec.len >= 10) {
                memcpy(body + 4, &header_pid, 4);
                memcpy(body + 8, &(uint16_t){ RAW_PORT }, 2);
            }
        } else {
            uint32_t stream = fin_u32(in);
            size_t len = fin_u16(in) % (LSHM_INLINE_MAX + 1);

            memset(body, (int)stream, sizeof(struct lshm_wire_msg) + len);
            put_hdr(body, stream, LSHM_TYPE_USER_MIN + (sel >> 4), LSHM_WIRE_LAST,
                    (uint32_t)len);
            rec.len = (uint32_t)(sizeof(struct lshm_wire_msg) + len);
        }
        break;
    case 1:
        break;
    case 2:
        rec.kind = LSHM_REC_SKIP;
        break;
    default:
        rec.len = fin_u32(in);
        rec.kind = fin_u32(in);
        break;
    }
    span = rec.kind == LSHM_REC_MSG ? LSHM_REC_SPAN(rec.len) : LSHM_REC_HDR;
    if (!(op & 0x10) && rec.kind != LSHM_REC_SKIP &&
        r->tail % r->size + span > r->size) {
        struct lshm_wire_record skip = { 0, LSHM_REC_SKIP };

        ring_put(r, r->tail, &skip, sizeof(skip));
        r->tail += r->size - r->tail % r->size;
    }
    /* Room, unless the op says to write over what is unread. */
    head = __atomic_load_n(&ring_hdr(r)->head, __ATOMIC_ACQUIRE);
    if (!(op & 0x20) && (head > r->tail || r->tail + span - head > r->size))
        return;
    ring_put(r, r->tail, &rec, sizeof(rec));
    if ((sel & 3) == 0 && span <= r->size)
        ring_put(r, r->tail + LSHM_REC_HDR, body, rec.len);
    if (rec.kind == LSHM_REC_SKIP)
        r->tail += r->size - r->tail % r->size;
    else
        r->tail += span;
    r->tail &= ~(uint64_t)7;
    if (op & 0x40) {
        publish(r, r->tail);
        ring_wake(s, r, sel >> 4);
    }
}

/* Tail published: the peer's, or moved by the input; or a rewrite of
 * bytes already published (the record header the consumer just read, any
 * 4 bytes behind tail, or the header page). */
static void op_tail(struct state *s, struct fin *in, uint8_t op)
{
    struct pring *r = &s->rings[s->cur];
    uint8_t sel = fin_u8(in);

    if (r->map == NULL)
        return;
    switch (sel & 3) {
    case 0:
        publish(r, r->tail);
        break;
    case 1:
        publish(r, r->tail + (int8_t)fin_u8(in));
        break;
    case 2:
        publish(r, (uint64_t)fin_u32(in) << (sel & 0x20 ? 32 : 0) | fin_u32(in));
        break;
    default: {
        uint32_t v = fin_u32(in);
        uint32_t back = fin_u16(in);

        if (sel & 4)
            memcpy(r->map + (back % LSHM_RING_HEADER_SIZE & ~3u), &v, 4);
        else
            ring_put(r, (r->tail - back) & ~(uint64_t)3, &v, 4);
        break;
    }
    }
    if (sel & 8)
        ring_wake(s, r, sel >> 4);
}

/* The peer, as the consumer of the library's ring, rewrites its header:
 * head (everything read, the input's value, back), wake, space. */
static void op_lring(struct state *s, struct fin *in, uint8_t op)
{
    struct pring *r = &s->lrings[s->cur];
    struct lshm_msgring_header *h;
    uint8_t sel = fin_u8(in), buf[32];
    uint64_t tail;

    if (r->map == NULL)
        return;
    h = ring_hdr(r);
    tail = __atomic_load_n(&h->tail, __ATOMIC_ACQUIRE);
    switch (sel & 7) {
    case 0: case 1:
        __atomic_store_n(&h->head, tail, __ATOMIC_RELEASE);
        break;
    case 2:
        __atomic_store_n(&h->head, tail + (int8_t)fin_u8(in), __ATOMIC_RELEASE);
        break;
    case 3:
        __atomic_store_n(&h->head, (uint64_t)fin_u32(in) << 32 | fin_u32(in), __ATOMIC_RELEASE);
        break;
    case 4:
        __atomic_store_n(&h->head, tail - r->size - 8 * (uint64_t)fin_u8(in),
                         __ATOMIC_RELEASE);
        break;
    case 5:
        h->wake = fin_u32(in);
        break;
    case 6:
        h->space = fin_u32(in);
        break;
    default: {
        uint32_t v = fin_u32(in);

        memcpy(r->map + (fin_u16(in) % 256 & ~3u), &v, 4);
        break;
    }
    }
    /* As a consumer does after publishing head: SHM_ACK if space was 1. */
    if ((sel & 8) && __atomic_exchange_n(&h->space, 0, __ATOMIC_SEQ_CST) != 0)
        send_with(s, buf, put_hdr(buf, 0, LSHM_WIRE_SHM_ACK, 0, 0), 0);
}

static void step(struct state *s, struct fin *in)
{
    uint8_t op = fin_u8(in);

    switch (op & 15) {
    case 0: case 1: op_raw(s, in, op); break;
    case 2: op_mmap(s, in, op); break;
    case 3: case 4: op_shm(s, in, op); break;
    case 5: op_inline(s, in, op); break;
    case 6: op_ctrl(s, in, op); break;
    case 7: case 8: run(s, 1 + (op >> 6), op & 0x10); break;
    case 9:
        if (op & 0x80)
            op_record(s, in, op);
        else
            release_held(s);
        break;
    case 10: op_scribble(s, in, op); break;
    case 11: op_lib_send(s, in, op); break;
    case 12: op_drain_raw(s); break;
    case 13:
        switch ((op >> 4) & 7) {
        case 0: break;
        case 1: shutdown(s->raws[s->cur], SHUT_WR); break;
        case 2: op_ring(s, in, op); break;
        case 3: case 4: op_tail(s, in, op); break;
        default: op_lring(s, in, op); break;
        }
        break;
    case 14:
        if (op & 0x10 && s->ports[s->cur] != NULL) {
            release_held(s);
            lshm_port_close(s->ports[s->cur]);
            s->ports[s->cur] = NULL;
        }
        break;
    default:
        if (op & 0x80)
            switch_port(s);
        else if (op & 0x40) {
            s->cred_pid = claimed_pid(fin_u8(in));
            header_pid = s->cred_pid ? s->cred_pid : getpid();
        }
        else if (s->ports[s->cur] != NULL)
            lshm_port_wait(s->ports[s->cur], LSHM_WAIT_READY | LSHM_WAIT_RECV | LSHM_WAIT_SHM,
                           0);
        break;
    }
}

static void hello(struct state *s, struct fin *in)
{
    uint8_t sel = fin_u8(in), buf[64];
    size_t len;

    if ((sel & 15) != 0) {
        /* Bit 6: RING (rings of at most 64 KiB from the library), bit 7: FUTEX. */
        uint32_t feat = ((sel & 0x40) ? LSHM_WIRE_FEAT_RING : 0) |
                        ((sel & 0x80) ? LSHM_WIRE_FEAT_FUTEX : 0);

        len = fuzz_hello(buf, RAW_PORT, 1 + ((sel >> 4) & 3), feat,
                         (feat & LSHM_WIRE_FEAT_RING) ? LSHM_RING_SIZE_MIN : 0);
    } else {
        int32_t pid = getpid();

        len = fin_bytes(in, buf, fin_u8(in) % sizeof(buf));
        if (!(sel & 0x10) && len >= 8)
            memcpy(buf + 4, &pid, 4);
    }
    raw_send(s, buf, len, NULL, 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fin in = { .p = data, .left = size };
    struct fuzz_leaks leaks;
    struct state s;
    unsigned i, ops = 0;
    uint8_t sel;

    header_pid = getpid();
    fuzz_leaks_begin(&leaks);
    memset(&s, 0, sizeof(s));
    sel = fin_u8(&in);
    s.ctx = fuzz_ctx(sel);
    s.raws[1] = -1;
    s.raws[0] = fuzz_raw_port(s.ctx, &s.ports[0]);
    if (s.raws[0] < 0)
        abort();
    s.handler = sel & 0x80;
    if (s.handler)
        lshm_port_set_handler(s.ports[0], on_msg, on_close, &s);
    hello(&s, &in);
    while (fin_more(&in) && ops++ < MAX_OPS)
        step(&s, &in);
    run(&s, 4, false);
    release_held(&s);
    /* The peer goes away first: the ports see EOF, their close does not
     * wait for a drain. */
    for (i = 0; i < 2; i++) {
        if (s.raws[i] >= 0)
            close(s.raws[i]);
        if (s.ports[i] != NULL)
            lshm_port_close(s.ports[i]);
    }
    lshm_ctx_free(s.ctx);
    for (i = 0; i < 2; i++) {
        if (s.rings[i].map != NULL)
            munmap(s.rings[i].map, s.rings[i].len);
        if (s.lrings[i].map != NULL)
            munmap(s.lrings[i].map, s.lrings[i].len);
    }
    for (i = 0; i < s.nsegs; i++) {
        if (s.segs[i].map != NULL)
            munmap(s.segs[i].map, s.segs[i].size);
        close(s.segs[i].fd);
    }
    fuzz_leaks_end(&leaks, "fuzz_port");
    return 0;
}
