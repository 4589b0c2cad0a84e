/*
 * A live port fed by a hostile peer.  The library adopts one end of a
 * socketpair; the input drives what the raw other end sends: a HELLO, then
 * datagrams with fds (segments made from the input: their size, seals and
 * header fields; pipes; plain memfds), scribbles into the segments it
 * announced, and runs of the context that receive and read every message.
 * Whatever arrives, the library must not crash, must only hand out memory
 * inside a segment it mapped, and must leave no fd or mapping behind.
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
#include "shm.h"
#include "wire.h"

#define RAW_PORT  77
#define MAX_SEGS  4
#define MAX_HELD  8
#define MAX_OPS   96

static bool avoid_tracking_fd;
/* The pid headers and segments carry: this process, or the one claimed. */
static int32_t header_pid;

struct seg {
    int   fd;
    void *map;      /* the fuzzer's own mapping, or NULL */
    size_t size;
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
    fuzz_raw_send(s->raws[s->cur], buf, fuzz_hello(buf, RAW_PORT, 4), NULL, 0, NULL);
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
    if (avoid_tracking_fd && len >= 12 && (buf[11] & LSHM_WIRE_TRACKING))
        fdsel = 0;
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
    /* Known: a tracked message refused for its tracking leaks its fd. */
    if ((flags & LSHM_WIRE_TRACKING) && avoid_tracking_fd)
        fdsel = 0;
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

    if (avoid_tracking_fd && (flags & LSHM_WIRE_TRACKING))
        fdsel = 0;
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
        blen = fuzz_hello(buf, RAW_PORT, 1 + (op >> 3)) - sizeof(struct lshm_wire_msg);
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
        if (fuzz_raw_recv(s->raws[s->cur], buf, sizeof(buf), fds, 4, &n) < 0)
            break;
        for (i = 0; i < n; i++)
            close(fds[i]);
    }
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
    case 9: release_held(s); break;
    case 10: op_scribble(s, in, op); break;
    case 11: op_lib_send(s, in, op); break;
    case 12: op_drain_raw(s); break;
    case 13:
        if (op & 0x10)
            shutdown(s->raws[s->cur], SHUT_WR);
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
        len = fuzz_hello(buf, RAW_PORT, 1 + (sel >> 4));
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

    avoid_tracking_fd = fuzz_avoid("tracking-fd");
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
    for (i = 0; i < s.nsegs; i++) {
        if (s.segs[i].map != NULL)
            munmap(s.segs[i].map, s.segs[i].size);
        close(s.segs[i].fd);
    }
    fuzz_leaks_end(&leaks, "fuzz_port");
    return 0;
}
