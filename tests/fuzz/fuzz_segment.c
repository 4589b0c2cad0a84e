/*
 * The sender's own trust rules.  The library sends messages through shared
 * memory on a port whose peer is this target; the peer maps the segments
 * it receives, frees chunks (rightly or not), acks, and rewrites their
 * headers (free map, padding sentinel, tracking map and slots, oosm, any
 * field) while the library keeps allocating, growing, sending, cancelling.
 * The peer may open a second port (the two share the pair's segments),
 * say BYE on one or close it.  The library must not crash, write outside
 * its segments, announce again a segment the peer mapped while the pair
 * lives, or point a descriptor anywhere it has not announced, and must
 * leave no fd or mapping behind.  While the peer plays fair (frees only
 * what it received and scribbles nothing), every payload must arrive
 * intact.
 *
 * With RING in the peer's HELLO (context byte bit 7) the library sends
 * its messages without fds as records of its ring: the peer imports the
 * ring, reads records and datagrams in the order FENCEs give, publishes
 * head (SHM_ACK when the library waits for room), or rewrites head, wake
 * and space.
 *
 * Input: a context byte (fuzz_ctx), the max_segments of the peer's HELLO,
 * then operations, one byte each followed by its arguments.
 */
#include <fcntl.h>
#include <stddef.h>
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

#define RAW_PORT   78
#define MAX_SEGS   8
#define MAX_BUFS   8
#define MAX_TRACK  8
#define MAX_DESCS  256
#define MAX_OPS    96

#define CHECK(c)                                                                   \
    do {                                                                           \
        if (!(c)) {                                                                \
            fprintf(stderr, "fuzz_segment: %s:%d: %s\n", __FILE__, __LINE__, #c);  \
            abort();                                                               \
        }                                                                          \
    } while (0)

struct rdesc {
    uint32_t mmap_id, chunk, nchunks;
};

struct state {
    struct lshm_ctx      *ctx;
    struct lshm_port     *ports[2];                /* two ports to one process */
    int                   raws[2];                 /* their raw ends; -1 before or after */
    bool                  made[2];
    bool                  bye[2];                  /* the peer said BYE and shut it down */
    unsigned              cur;                     /* the port operations act on */
    struct lshm_segment_header *segs[MAX_SEGS];   /* the peer's mappings, by id */
    unsigned              nsegs;                   /* highest id mapped + 1 */
    struct lshm_buf      *bufs[MAX_BUFS];          /* allocated, not sent */
    unsigned              nbufs;
    struct lshm_tracking *track[MAX_TRACK];
    unsigned              ntrack;
    struct rdesc          descs[MAX_DESCS];         /* received, not freed */
    unsigned              ndescs;
    uint32_t              stream;
    bool                  fair;                     /* no scribble, no stray free */
    bool                  ring;                     /* the peer's HELLO has RING */
    struct lshm_msgring   rx[2];                    /* the library's rings, imported */
    bool                  fence[2];                 /* at a FENCE: the next datagram */
};

static void ring_drop(struct state *s, unsigned n)
{
    lshm__msgring_free(&s->rx[n]);
    s->fence[n] = false;
}

static void free_bufs(struct state *s)
{
    while (s->nbufs > 0)
        lshm_buf_free(s->bufs[--s->nbufs]);
}

static void cancel_all(struct state *s)
{
    while (s->ntrack > 0)
        lshm_tracking_cancel(s->track[--s->ntrack]);
}

static void end_pair(struct state *s);

/* A port of the peer is open until it closes its socket or says BYE (and
 * shuts it down for writing, as the protocol has it). */
static bool peer_port_open(const struct state *s, unsigned n)
{
    return s->raws[n] >= 0 && !s->bye[n];
}

static void raw_ctrl(struct state *s, uint8_t type)
{
    uint8_t buf[LSHM_WIRE_MAX];
    size_t n = lshm__wire_encode_ctrl(buf, type, getpid(), RAW_PORT + s->cur, 0);

    if (!peer_port_open(s, s->cur))
        return;
    fuzz_raw_send(s->raws[s->cur], buf, n, NULL, 0, NULL);
    if (type == LSHM_WIRE_BYE) {
        shutdown(s->raws[s->cur], SHUT_WR);
        s->bye[s->cur] = true;
        if (!peer_port_open(s, s->cur ^ 1))
            end_pair(s);
    }
}

/* The bytes of a buffer that are written and checked: the first 64, then
 * the first and last of every page, so that a buffer of megabytes costs
 * little and still faults if any page of it is not the library's. */
static size_t next_sample(size_t i)
{
    if (i < 63 || i % 4096 == 4095)
        return i + 1;
    return i | 4095;
}

static void fill(uint8_t *p, size_t size, uint8_t pattern)
{
    size_t i;

    for (i = 0; i < size; i = next_sample(i))
        p[i] = pattern;
}

/* A descriptor as the library sent it: its segment was announced before. */
static void on_desc(struct state *s, const struct lshm_wire_desc *d, uint8_t pattern)
{
    const uint8_t *p;
    uint32_t i;

    /* Announced on this port, or mapped (sent_over any) before. */
    CHECK(d->mmap_id < MAX_SEGS && (s->segs[d->mmap_id] != NULL || !s->fair));
    if (s->ndescs < MAX_DESCS)
        s->descs[s->ndescs++] = (struct rdesc){
            d->mmap_id, d->chunk_id, (d->size + LSHM_CHUNK_SIZE - 1) / LSHM_CHUNK_SIZE };
    if (!s->fair || s->segs[d->mmap_id] == NULL)
        return;
    p = (const uint8_t *)s->segs[d->mmap_id] + LSHM_HEADER_SIZE +
        (size_t)d->chunk_id * LSHM_CHUNK_SIZE;
    for (i = 0; i < d->size; i = next_sample(i))
        if (p[i] != pattern) {
            fprintf(stderr, "fuzz_segment: segment %u chunk %u byte %u is %#x, sent %#x\n",
                    d->mmap_id, d->chunk_id, i, p[i], pattern);
            abort();
        }
}

/* One message of the library's, from a datagram (fds) or a ring record. */
static void on_msg(struct state *s, const struct lshm_wire_view *v, const int *fds,
                   unsigned nfds)
{
    unsigned i;

    if (s->bye[s->cur]) {
        /* After its BYE a receiver maps nothing more: the sender has
         * taken back what it announced there and the peer did not map
         * (its id can come again on the other port). */
    } else if (v->hdr.type == LSHM_WIRE_MMAP_MSG) {
        /* Below the limit, and once mapped (sent_over any) an id is
         * never announced again; the two ports may interleave ids. */
        uint32_t id = v->mmap_id;
        void *m;

        CHECK(id < MAX_SEGS);
        CHECK(s->segs[id] == NULL || !s->fair);
        m = mmap(NULL, LSHM_SEGMENT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
        CHECK(m != MAP_FAILED);
        if (s->segs[id] != NULL)
            munmap(s->segs[id], LSHM_SEGMENT_SIZE);
        s->segs[id] = m;
        CHECK(s->segs[id]->id == id || !s->fair);
        /* As a receiver does once it mapped it. */
        s->segs[id]->sent_over = LSHM_SENT_OVER_ANY;
        if (id >= s->nsegs)
            s->nsegs = id + 1;
    } else if (v->hdr.type == LSHM_WIRE_RING) {
        const char *why = NULL;

        CHECK(s->ring && s->rx[s->cur].hdr == NULL);
        CHECK(lshm__msgring_import(&s->rx[s->cur], fds[0], v->ring_size, v->hdr.port_id,
                                   getpid(), getpid(), &why) == 0);
    } else if (v->hdr.type >= LSHM_TYPE_USER_MIN) {
        if (v->has_tracking)
            CHECK(v->tracking.mmap_id < MAX_SEGS &&
                  (s->segs[v->tracking.mmap_id] != NULL || !s->fair));
        for (i = 0; i < v->ndesc; i++) {
            struct lshm_wire_desc d = lshm__wire_desc_at(v, i);

            on_desc(s, &d, (uint8_t)v->hdr.stream);
        }
    }
}

/* The next record of the library's ring on the current port: 1 a MSG
 * (handled), 2 a FENCE, 0 none, -1 the ring was refused (only after the
 * peer rewrote something). */
static int ring_next(struct state *s)
{
    static uint8_t buf[LSHM_WIRE_MAX];
    struct lshm_msgring *r = &s->rx[s->cur];
    struct lshm_wire_record rec;
    struct lshm_wire_view v;
    const char *why = NULL;
    int ret;

    if (r->hdr == NULL)
        return 0;
    ret = lshm__msgring_next(r, buf, &rec, &why);
    if (ret < 0) {
        CHECK(!s->fair);
        ring_drop(s, s->cur);
        return -1;
    }
    if (ret == 0)
        return 0;
    if (rec.kind == LSHM_REC_FENCE)
        return 2;
    if (lshm__wire_decode_record(buf, rec.len, &v, &why) < 0) {
        /* What the library writes must be valid protocol. */
        CHECK(!s->fair);
        return 1;
    }
    on_msg(s, &v, NULL, 0);
    return 1;
}

/* Read what the library sent, in its order: ring records up to a FENCE,
 * then the datagram there; map its segments, note its descriptors. */
static void op_recv(struct state *s, unsigned max)
{
    static uint8_t buf[LSHM_WIRE_MAX + 64];
    struct lshm_wire_view v;
    const char *why;
    int fds[4];
    unsigned nfds, i, k;
    ssize_t n;

    for (k = 0; k < max; k++) {
        if (s->raws[s->cur] < 0)
            break;
        if (!s->fence[s->cur]) {
            int r = ring_next(s);

            if (r == 1)
                continue;
            if (r == 2) {
                s->fence[s->cur] = true;
                continue;
            }
        }
        n = fuzz_raw_recv(s->raws[s->cur], buf, sizeof(buf), fds, 4, &nfds);
        if (n < 0)
            break;
        if (n == 0 && nfds == 0)
            break;   /* the library shut its end */
        /* What the library sends must be valid protocol. */
        if (lshm__wire_decode(buf, (size_t)n, nfds, &v, &why) < 0) {
            fprintf(stderr, "fuzz_segment: the library sent an invalid datagram: %s\n", why);
            abort();
        }
        if (s->rx[s->cur].hdr != NULL && v.hdr.type != LSHM_WIRE_WAKE &&
            v.hdr.type != LSHM_WIRE_SHM_ACK && !s->fence[s->cur]) {
            /* Its FENCE was published before it was sent: read up to it. */
            int r;

            while ((r = ring_next(s)) == 1)
                ;
            CHECK(r == 2 || !s->fair);
        }
        if (v.hdr.type != LSHM_WIRE_WAKE && v.hdr.type != LSHM_WIRE_SHM_ACK)
            s->fence[s->cur] = false;
        on_msg(s, &v, fds, nfds);
        for (i = 0; i < nfds; i++)
            close(fds[i]);
    }
    if (s->rx[s->cur].hdr != NULL && lshm__msgring_publish_head(&s->rx[s->cur]))
        raw_ctrl(s, LSHM_WIRE_SHM_ACK);
}

/* The peer rewrites the header of the library's ring: head, wake, space. */
static void op_ring_scribble(struct state *s, struct fin *in, uint8_t op)
{
    struct lshm_msgring *r = &s->rx[s->cur];
    uint64_t tail;

    if (r->hdr == NULL)
        return;
    s->fair = false;
    tail = __atomic_load_n(&r->hdr->tail, __ATOMIC_ACQUIRE);
    switch ((op >> 4) & 7) {
    case 0: __atomic_store_n(&r->hdr->head, tail, __ATOMIC_RELEASE); break;
    case 1: __atomic_store_n(&r->hdr->head, tail + 8 * (int8_t)fin_u8(in), __ATOMIC_RELEASE); break;
    case 2:
        __atomic_store_n(&r->hdr->head, (uint64_t)fin_u32(in) << 32 | fin_u32(in),
                         __ATOMIC_RELEASE);
        break;
    case 3: __atomic_store_n(&r->hdr->head, tail - r->size - fin_u8(in), __ATOMIC_RELEASE); break;
    case 4: r->hdr->wake = fin_u32(in); break;
    case 5: r->hdr->space = fin_u32(in); break;
    default: {
        uint32_t v = fin_u32(in);

        memcpy((uint8_t *)r->hdr + (fin_u16(in) % 256 & ~3u), &v, 4);
        break;
    }
    }
}

/* Free received chunks as the receiver does, then ack if the sender waits. */
static void op_free(struct state *s, struct fin *in)
{
    unsigned n = 1 + fin_u8(in) % 8, ack = 0;

    while (n-- > 0 && s->ndescs > 0) {
        struct rdesc d = s->descs[--s->ndescs];
        struct lshm_segment_header *h = d.mmap_id < MAX_SEGS ? s->segs[d.mmap_id] : NULL;
        uint32_t c;
        uint32_t one = 1;

        if (h == NULL)
            continue;
        for (c = d.chunk; c < d.chunk + d.nchunks && c < LSHM_CHUNK_COUNT; c++)
            __atomic_fetch_or(&h->free_map[c / 64], 1ull << (c % 64), __ATOMIC_RELEASE);
        if (__atomic_compare_exchange_n(&h->oosm, &one, 0, false, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            ack = 1;
    }
    if (ack)
        raw_ctrl(s, LSHM_WIRE_SHM_ACK);
}

/* The peer rewrites a header it was sent. */
static void op_scribble(struct state *s, struct fin *in, uint8_t op)
{
    struct lshm_segment_header *h;
    uint8_t i = fin_u8(in), w = fin_u8(in);
    uint64_t v;

    if (s->nsegs == 0 || (h = s->segs[i % s->nsegs]) == NULL)
        return;
    s->fair = false;
    switch ((op >> 4) & 7) {
    case 0:   /* a free map word, the padding sentinel (the word after) included */
        v = (w & 0x80) ? ~0ull : (uint64_t)fin_u32(in) << 32 | fin_u32(in);
        memcpy((uint8_t *)h->free_map + (w & 0x7f) % (LSHM_FREE_WORDS + 1) * 8, &v, 8);
        break;
    case 1:
        v = (w & 0x80) ? ~0ull : (uint64_t)fin_u32(in) << 32 | fin_u32(in);
        memcpy((uint8_t *)h->free_tracking_map + (w & 0x7f) % (LSHM_FREE_WORDS + 1) * 8, &v, 8);
        break;
    case 2:   /* every chunk free, past the end too */
        memset((uint8_t *)h + offsetof(struct lshm_segment_header, free_map), 0xff,
               sizeof(h->free_map) + sizeof(h->free_map_padding));
        break;
    case 3:
        h->oosm = fin_u32(in);
        break;
    case 4:
        h->tracking[fin_u16(in) % LSHM_CHUNK_COUNT] = fin_u32(in);
        break;
    case 5:   /* any field of the fixed part */
        ((uint32_t *)h)[w % 6] = fin_u32(in);
        break;
    default: {  /* any 4 bytes of the header page */
        uint32_t x = fin_u32(in);

        memcpy((uint8_t *)h + (fin_u16(in) % LSHM_HEADER_SIZE & ~3u), &x, 4);
        break;
    }
    }
}

/* The library allocates, grows and sends; some buffers are kept unsent. */
static void op_send(struct state *s, struct fin *in, uint8_t op)
{
    struct lshm_port *port = s->ports[s->cur];
    struct lshm_buf *b[3];
    struct lshm_tracking *t = NULL;
    struct lshm_out out = { .type = LSHM_TYPE_USER_MIN, .fd = -1 };
    unsigned nb = 1 + (op >> 4) % 3, i, got = 0;
    uint8_t sel = fin_u8(in);
    int ret;

    s->stream++;
    if (s->stream == 0)
        s->stream = 1;
    out.stream = s->stream;
    for (i = 0; i < nb; i++) {
        size_t size = (sel & 1) ? 1 + (size_t)fin_u16(in) * 64 : 1u + fin_u16(in) % 20000u;
        size_t cap;

        if (port == NULL || lshm_buf_alloc(port, size, &b[got]) < 0)
            break;
        cap = lshm_buf_capacity(b[got]);
        CHECK(cap >= LSHM_CHUNK_SIZE && cap <= LSHM_DATA_SIZE && cap % LSHM_CHUNK_SIZE == 0);
        if ((sel & 2) && lshm_buf_grow(b[got], size + fin_u16(in) * 16, (sel & 4) ? size : 0) == 0)
            cap = lshm_buf_capacity(b[got]);
        CHECK(cap <= LSHM_DATA_SIZE);
        /* Every byte the library hands out is writable and its own. */
        fill(lshm_buf_data(b[got]), cap, (uint8_t)s->stream);
        lshm_buf_set_size(b[got], cap < size ? cap : size);
        got++;
    }
    if (got == 0)
        return;
    if (sel & 8) {
        /* Kept: freed later, or at the end. */
        for (i = 0; i < got; i++) {
            if (s->nbufs < MAX_BUFS)
                s->bufs[s->nbufs++] = b[i];
            else
                lshm_buf_free(b[i]);
        }
        return;
    }
    if ((sel & 16) && s->ntrack < MAX_TRACK && lshm_tracking_new(port, s->stream, &t) == 0) {
        out.tracking = t;
        s->track[s->ntrack++] = t;
    }
    out.bufs = b;
    out.nbufs = got;
    ret = lshm_send(port, &out, (sel & 32) ? LSHM_MORE : 0);
    if (ret < 0)
        for (i = 0; i < got; i++)
            lshm_buf_free(b[i]);
}

/* The last port between the two processes closed: the pair's segments
 * are gone, and a port made later begins a new pair (ids from 0). */
static void end_pair(struct state *s)
{
    unsigned i;

    for (i = 0; i < MAX_SEGS; i++)
        if (s->segs[i] != NULL) {
            munmap(s->segs[i], LSHM_SEGMENT_SIZE);
            s->segs[i] = NULL;
        }
    s->nsegs = 0;
    s->ndescs = 0;
}

/* Make port n (HELLO from the raw end, the handshake run to its end). */
static void open_port(struct state *s, unsigned n, unsigned max_segments)
{
    uint8_t hello[64];
    unsigned i;

    s->made[n] = true;
    s->raws[n] = fuzz_raw_port(s->ctx, &s->ports[n]);
    CHECK(s->raws[n] >= 0);
    fuzz_raw_send(s->raws[n], hello, fuzz_hello(hello, RAW_PORT + n, max_segments,
                  s->ring ? LSHM_WIRE_FEAT_RING : 0, s->ring ? LSHM_RING_SIZE_MIN : 0),
                  NULL, 0, NULL);
    for (i = 0; i < 20 && lshm_port_wait(s->ports[n], LSHM_WAIT_READY, 0) <= 0; i++)
        fuzz_pump(s->ctx, 1);
    CHECK(lshm_port_wait(s->ports[n], LSHM_WAIT_READY, 0) > 0);
}

/* Act on the other port; the second is made on first use. */
static void switch_port(struct state *s, unsigned max_segments)
{
    s->cur ^= 1;
    if (!s->made[s->cur])
        open_port(s, s->cur, max_segments);
}

static void step(struct state *s, struct fin *in)
{
    uint8_t op = fin_u8(in);

    switch (op & 15) {
    case 0: case 1: case 2: op_send(s, in, op); break;
    case 3: case 4: op_recv(s, 1 + (op >> 4)); break;
    case 5: case 6: op_free(s, in); break;
    case 7:
        if (op & 0x80)
            op_ring_scribble(s, in, op);
        else
            op_scribble(s, in, op);
        break;
    case 8: case 9: fuzz_pump(s->ctx, 1 + (op >> 6)); break;
    case 10:
        if (s->ports[s->cur] != NULL)
            lshm_port_wait(s->ports[s->cur], LSHM_WAIT_SHM | LSHM_WAIT_SEND | LSHM_WAIT_IDLE,
                           0);
        break;
    case 11:
        if (s->nbufs > 0)
            lshm_buf_free(s->bufs[--s->nbufs]);
        break;
    case 12:
        if (s->ntrack > 0) {
            unsigned i = fin_u8(in) % s->ntrack;

            lshm_tracking_cancel(s->track[i]);
            s->track[i] = s->track[--s->ntrack];
        }
        break;
    case 13:
        if (s->nbufs > 0)
            lshm_buf_grow(s->bufs[fin_u8(in) % s->nbufs], (size_t)fin_u16(in) * 256, 0);
        break;
    case 14:
        raw_ctrl(s, (op & 0x10) ? LSHM_WIRE_BYE : LSHM_WIRE_SHM_ACK);
        break;
    default:
        if (op & 0x80) {
            switch_port(s, 1 + fin_u8(in) % 4);
        } else if ((op & 0x40) && s->raws[s->cur] >= 0) {
            /* The peer goes away on this port: what it announced there and
             * never mapped is the library's again. */
            close(s->raws[s->cur]);
            ring_drop(s, s->cur);
            s->raws[s->cur] = -1;
            if (!peer_port_open(s, s->cur ^ 1))
                end_pair(s);
        } else {
            lshm_flush(s->ctx);
        }
        break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fin in = { .p = data, .left = size };
    struct fuzz_leaks leaks;
    struct state s;
    unsigned i, ops = 0;
    uint8_t sel;

    fuzz_leaks_begin(&leaks);
    memset(&s, 0, sizeof(s));
    s.fair = true;
    sel = fin_u8(&in);
    s.ring = sel & 0x80;
    s.ctx = fuzz_ctx(sel & 0x7f);
    s.raws[0] = s.raws[1] = -1;
    open_port(&s, 0, 1 + fin_u8(&in) % 4);
    while (fin_more(&in) && ops++ < MAX_OPS)
        step(&s, &in);
    fuzz_pump(s.ctx, 2);
    for (s.cur = 0; s.cur < 2; s.cur++)
        op_recv(&s, 256);
    free_bufs(&s);
    cancel_all(&s);
    for (i = 0; i < 2; i++) {
        if (s.raws[i] >= 0)
            close(s.raws[i]);
        if (s.ports[i] != NULL)
            lshm_port_close(s.ports[i]);
    }
    lshm_ctx_free(s.ctx);
    ring_drop(&s, 0);
    ring_drop(&s, 1);
    end_pair(&s);
    fuzz_leaks_end(&leaks, "fuzz_segment");
    return 0;
}
