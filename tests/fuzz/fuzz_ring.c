/*
 * Message rings in-process, both ends of lib/msgring.c.
 *
 * Consumer (input byte 0, bit 0 clear): the input is a hostile producer.
 * It makes a ring memfd (size, header fields, seals), the library imports
 * it; then operations write records (MSG, FENCE, SKIP, any header), publish
 * any tail, rewrite bytes already published, and the library consumes with
 * lshm__msgring_next and lshm__wire_decode_record.  The ring is mapped
 * between two inaccessible pages and records are copied into a buffer of
 * exactly LSHM_WIRE_MAX bytes, so a read outside either is a crash.  What
 * the consumer returns must be what the ring held when it copied it, of a
 * length its kind allows, its span within what was published; what
 * lshm__wire_decode_record accepts must encode back to the same bytes.
 *
 * Producer (bit 0 set): the library writes records with
 * lshm__msgring_reserve and publish; the input is the consumer, which reads
 * them fairly or rewrites head, wake and space.  Every pointer reserve
 * returns must lie inside the ring with room for its length; while the
 * consumer plays fair, every record read is the one written, in order.
 *
 * Both leave no fd or mapping behind.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fuzz.h"
#include "msgring.h"
#include "wire.h"

#define PORT_ID  5
#define MAX_OPS  128
#define PAGE     4096u

#define CHECK(c)                                                                  \
    do {                                                                          \
        if (!(c)) {                                                               \
            fprintf(stderr, "fuzz_ring: %s:%d: %s\n", __FILE__, __LINE__, #c);    \
            abort();                                                              \
        }                                                                         \
    } while (0)

static uint8_t *copy_buf;   /* LSHM_WIRE_MAX bytes, malloc'd: overflows are found */

/* ---- consumer: the library reads a hostile ring ---- */

struct cons {
    struct lshm_msgring r;        /* the library's view */
    uint8_t            *guard;    /* reservation: a page, the ring, a page */
    size_t              glen;
    uint8_t            *p;        /* the producer's (input's) mapping */
    size_t              plen;
    uint32_t            size;
    uint64_t            tail;     /* the producer's */
    bool                dead;     /* the consumer found a violation */
};

static void c_put(struct cons *c, uint64_t pos, const void *src, size_t n)
{
    const uint8_t *b = src;
    size_t i;

    for (i = 0; i < n; i++)
        c->p[LSHM_RING_HEADER_SIZE + ((pos + i) & (c->size - 1))] = b[i];
}

/* Map the imported ring again between two PROT_NONE pages. */
static void guard_ring(struct cons *c, int fd)
{
    size_t len = LSHM_RING_HEADER_SIZE + c->size;
    uint8_t *g = mmap(NULL, len + 2 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    CHECK(g != MAP_FAILED);
    CHECK(mmap(g + PAGE, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) ==
          g + PAGE);
    munmap(c->r.hdr, len);
    c->r.hdr = (struct lshm_msgring_header *)(g + PAGE);
    c->r.data = g + PAGE + LSHM_RING_HEADER_SIZE;
    c->guard = g;
    c->glen = len + 2 * PAGE;
}

static void c_check_msg(const uint8_t *buf, size_t len)
{
    struct lshm_wire_desc descs[LSHM_MAX_DESCS];
    static uint8_t out[LSHM_WIRE_MAX];
    struct lshm_wire_view v;
    const char *why = NULL;
    unsigned i;
    size_t n;
    int ret = lshm__wire_decode_record(buf, len, &v, &why);

    if (ret < 0) {
        CHECK(ret == -EPROTO && why != NULL && why[0] != '\0');
        return;
    }
    CHECK(ret == 0 && v.hdr.type >= LSHM_TYPE_USER_MIN);
    for (i = 0; i < v.ndesc; i++)
        descs[i] = lshm__wire_desc_at(&v, i);
    n = lshm__wire_encode_user(out, &v.hdr, v.has_tracking ? &v.tracking : NULL,
                               v.ndesc ? descs : NULL, v.ndesc, v.payload);
    CHECK(n == len && memcmp(out, buf, len) == 0);
}

/* The library reads up to max records. */
static void c_consume(struct cons *c, unsigned max)
{
    while (max-- > 0 && !c->dead) {
        struct lshm_wire_record rec;
        const char *why = NULL;
        uint64_t before = c->r.pos;
        int ret = lshm__msgring_next(&c->r, copy_buf, &rec, &why);

        if (ret < 0) {
            CHECK(ret == -EPROTO && why != NULL && why[0] != '\0');
            CHECK(c->r.pos == before || c->r.pos % c->size == 0);
            c->dead = true;
            return;
        }
        CHECK(c->r.pos % 8 == 0 && c->r.pos <= c->r.seen && c->r.seen - c->r.pos <= c->size);
        if (ret == 0) {
            CHECK(c->r.pos == c->r.seen);
            return;
        }
        CHECK(ret == 1 && rec.kind != LSHM_REC_SKIP);
        if (rec.kind == LSHM_REC_FENCE) {
            CHECK(rec.len == 0);
            continue;
        }
        CHECK(rec.kind == LSHM_REC_MSG);
        CHECK(rec.len >= sizeof(struct lshm_wire_msg) && rec.len <= LSHM_WIRE_MAX);
        /* Its place: the record ends where the private head is now. */
        {
            uint64_t at = c->r.pos - LSHM_REC_SPAN(rec.len);

            CHECK(at >= before && at % 8 == 0);
            CHECK((at & (c->size - 1)) + LSHM_REC_SPAN(rec.len) <= c->size);
            /* Nothing rewrote it since (one thread): the copy is the ring's. */
            CHECK(memcmp(copy_buf, c->r.data + (at & (c->size - 1)) + LSHM_REC_HDR,
                         rec.len) == 0);
        }
        c_check_msg(copy_buf, rec.len);
    }
}

static void c_record(struct cons *c, struct fin *in, uint8_t op)
{
    static uint8_t body[LSHM_WIRE_MAX + 64];
    struct lshm_wire_record rec = { 0, LSHM_REC_FENCE };
    uint8_t sel = fin_u8(in);
    uint64_t span;

    switch (sel & 3) {
    case 0:
        rec.kind = LSHM_REC_MSG;
        if (sel & 4) {
            rec.len = (uint32_t)fin_bytes(in, body, fin_u16(in) % sizeof(body));
        } else {
            struct lshm_wire_msg h = { .stream = fin_u32(in), .pid = 1234, .port_id = 1,
                                       .type = LSHM_TYPE_USER_MIN + (sel >> 4),
                                       .flags = LSHM_WIRE_LAST };

            h.size = fin_u16(in) % (LSHM_INLINE_MAX + 1);
            memcpy(body, &h, sizeof(h));
            memset(body + sizeof(h), (int)h.stream, h.size);
            rec.len = (uint32_t)sizeof(h) + h.size;
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
    if (!(op & 0x10) && rec.kind != LSHM_REC_SKIP && c->tail % c->size + span > c->size) {
        struct lshm_wire_record skip = { 0, LSHM_REC_SKIP };

        c_put(c, c->tail, &skip, sizeof(skip));
        c->tail += c->size - c->tail % c->size;
    }
    c_put(c, c->tail, &rec, sizeof(rec));
    if ((sel & 3) == 0)
        c_put(c, c->tail + LSHM_REC_HDR, body, rec.len);
    c->tail += rec.kind == LSHM_REC_SKIP ? c->size - c->tail % c->size : span;
    if (op & 0x20)
        __atomic_store_n(&((struct lshm_msgring_header *)c->p)->tail, c->tail,
                         __ATOMIC_RELEASE);
}

static void c_tail(struct cons *c, struct fin *in, uint8_t op)
{
    struct lshm_msgring_header *h = (struct lshm_msgring_header *)c->p;
    uint8_t sel = fin_u8(in);
    uint32_t v;

    switch (sel & 3) {
    case 0:
        __atomic_store_n(&h->tail, c->tail, __ATOMIC_RELEASE);
        break;
    case 1:
        __atomic_store_n(&h->tail, c->tail + (int8_t)fin_u8(in), __ATOMIC_RELEASE);
        break;
    case 2:
        __atomic_store_n(&h->tail, (uint64_t)fin_u32(in) << 32 | fin_u32(in), __ATOMIC_RELEASE);
        break;
    default:
        /* Rewrite published bytes: behind the tail, or the header page. */
        v = fin_u32(in);
        if (sel & 4)
            memcpy(c->p + (fin_u16(in) % LSHM_RING_HEADER_SIZE & ~3u), &v, 4);
        else
            c_put(c, (c->tail - fin_u16(in)) & ~(uint64_t)3, &v, 4);
        break;
    }
}

static void consumer(struct fin *in)
{
    uint8_t sel = fin_u8(in), bad = fin_u8(in);
    unsigned seals = F_SEAL_SHRINK | F_SEAL_GROW, ops = 0;
    uint32_t size = (sel & 2) ? LSHM_RING_SIZE_MIN * 2 : LSHM_RING_SIZE_MIN;
    uint32_t announced = size;
    const char *why = NULL;
    struct cons c;
    int fd, ret;

    memset(&c, 0, sizeof(c));
    c.size = size;
    fd = fuzz_ring_memfd(size, PORT_ID, getpid(), getpid());
    CHECK(fd >= 0);
    if (bad & 1) {
        uint32_t v = fin_u32(in);

        CHECK(pwrite(fd, &v, 4, (fin_u8(in) % 5) * 4) == 4);
    }
    if (bad & 2)
        CHECK(ftruncate(fd, (off_t)(LSHM_RING_HEADER_SIZE + size + (int16_t)fin_u16(in))) == 0);
    if (bad & 4)
        seals = fin_u8(in) & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_FUTURE_WRITE);
    if (bad & 8)
        announced = fin_u32(in);
    /* The producer's own mapping, before a write seal forbids it. */
    c.plen = LSHM_RING_HEADER_SIZE + size;
    c.p = mmap(NULL, c.plen, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(c.p != MAP_FAILED);
    if (seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)) {
        munmap(c.p, c.plen);
        c.p = NULL;
    }
    fcntl(fd, F_ADD_SEALS, seals);
    ret = lshm__msgring_import(&c.r, fd, announced, PORT_ID, getpid(), getpid(), &why);
    if (ret < 0) {
        CHECK(why != NULL && why[0] != '\0');
    } else {
        CHECK(announced == size && c.p != NULL);
        guard_ring(&c, fd);
    }
    close(fd);
    while (ret == 0 && fin_more(in) && ops++ < MAX_OPS) {
        uint8_t op = fin_u8(in);

        switch (op & 7) {
        case 0: case 1: case 2: c_record(&c, in, op); break;
        case 3: c_tail(&c, in, op); break;
        case 4: case 5: c_consume(&c, 1 + (op >> 4)); break;
        case 6:
            lshm__msgring_publish_head(&c.r);
            break;
        default:
            /* It may sleep only with nothing unread up to the tail now. */
            if ((op & 0x10) && lshm__msgring_may_sleep(&c.r))
                CHECK(c.r.pos == c.r.seen &&
                      __atomic_load_n(&c.r.hdr->tail, __ATOMIC_ACQUIRE) == c.r.pos);
            lshm__msgring_awake(&c.r);
            break;
        }
    }
    if (ret == 0) {
        c_consume(&c, 1u << 16);
        munmap(c.guard, c.glen);
        c.r.hdr = NULL;
    }
    if (c.p != NULL)
        munmap(c.p, c.plen);
}

/* ---- producer: the library writes, the input is the consumer ---- */

#define MAX_PENDING 4096

struct prod {
    struct lshm_msgring r;           /* the library's */
    struct lshm_msgring peer;        /* the fair consumer's view of the same ring */
    bool                have_peer;
    bool                fair;        /* head, wake, space never rewritten */
    struct {
        uint32_t kind, len;
        uint8_t  seed;
    } pend[MAX_PENDING];             /* written, not yet read back, in order */
    unsigned            first, n;
};

static void p_reserve(struct prod *p, struct fin *in, uint8_t op)
{
    uint8_t sel = fin_u8(in);
    uint32_t kind = (sel & 3) == 1 ? LSHM_REC_FENCE : LSHM_REC_MSG;
    uint32_t len = kind == LSHM_REC_FENCE ? 0 : 16 + fin_u16(in) % (LSHM_WIRE_MAX - 15);
    uint8_t *data = p->r.data;
    uint8_t *body;
    int err = 0;

    body = lshm__msgring_reserve(&p->r, kind, len, &err);
    if (body == NULL) {
        CHECK(err == -EAGAIN || (err == -EPROTO && !p->fair));
        if (err == -EAGAIN)
            CHECK(lshm__msgring_want_room(&p->r, len) >= 0 || !p->fair);
        return;
    }
    /* Inside the ring, room for its bytes, after its 8-byte header. */
    CHECK(body >= data + LSHM_REC_HDR && body + len <= data + p->r.size);
    CHECK((size_t)(body - data) % 8 == 0);
    memset(body, sel, len);
    if (p->n < MAX_PENDING) {
        unsigned i = (p->first + p->n++) % MAX_PENDING;

        p->pend[i].kind = kind;
        p->pend[i].len = len;
        p->pend[i].seed = sel;
    } else {
        p->fair = false;   /* no longer tracked */
    }
    if (op & 0x10)
        lshm__msgring_publish(&p->r, UINT64_MAX);
}

/* The fair consumer: reads, checks against what was written, publishes head. */
static void p_read(struct prod *p, unsigned max)
{
    static uint8_t buf[LSHM_WIRE_MAX];
    struct lshm_wire_record rec;
    const char *why = NULL;
    int ret;

    while (max-- > 0 && p->have_peer) {
        ret = lshm__msgring_next(&p->peer, buf, &rec, &why);
        if (ret < 0) {
            CHECK(!p->fair);
            p->have_peer = false;
            break;
        }
        if (ret == 0)
            break;
        if (p->fair) {
            unsigned i = p->first;
            uint32_t k;

            CHECK(p->n > 0);
            CHECK(rec.kind == p->pend[i].kind && rec.len == p->pend[i].len);
            for (k = 0; k < rec.len; k++)
                CHECK(buf[k] == p->pend[i].seed);
            p->first = (p->first + 1) % MAX_PENDING;
            p->n--;
        }
    }
    if (p->have_peer)
        lshm__msgring_publish_head(&p->peer);
}

static void p_scribble(struct prod *p, struct fin *in, uint8_t op)
{
    struct lshm_msgring_header *h = p->r.hdr;
    uint8_t sel = fin_u8(in);
    uint64_t tail = __atomic_load_n(&h->tail, __ATOMIC_ACQUIRE);

    p->fair = false;
    switch (sel & 7) {
    case 0: __atomic_store_n(&h->head, tail, __ATOMIC_RELEASE); break;
    case 1: __atomic_store_n(&h->head, tail + 8 * (int8_t)fin_u8(in), __ATOMIC_RELEASE); break;
    case 2:
        __atomic_store_n(&h->head, (uint64_t)fin_u32(in) << 32 | fin_u32(in), __ATOMIC_RELEASE);
        break;
    case 3: __atomic_store_n(&h->head, tail - p->r.size - fin_u8(in), __ATOMIC_RELEASE); break;
    case 4: h->wake = fin_u32(in); break;
    case 5: h->space = fin_u32(in); break;
    default: {
        /* Any 4 bytes of the header page, or of the records. */
        uint32_t v = fin_u32(in);
        uint32_t off = fin_u32(in) % (LSHM_RING_HEADER_SIZE + p->r.size) & ~3u;

        memcpy((uint8_t *)h + off, &v, 4);
        break;
    }
    }
}

static void producer(struct fin *in)
{
    uint8_t sel = fin_u8(in);
    uint32_t size = (sel & 2) ? LSHM_RING_SIZE_MIN * 2 : LSHM_RING_SIZE_MIN;
    const char *why = NULL;
    struct prod *p = calloc(1, sizeof(*p));
    unsigned ops = 0;

    CHECK(p != NULL);
    p->fair = true;
    CHECK(lshm__msgring_create(&p->r, size, PORT_ID, getpid(), getpid()) == 0);
    CHECK(lshm__msgring_import(&p->peer, p->r.fd, size, PORT_ID, getpid(), getpid(), &why) ==
          0);
    p->have_peer = true;
    while (fin_more(in) && ops++ < MAX_OPS) {
        uint8_t op = fin_u8(in);

        switch (op & 7) {
        case 0: case 1: case 2: p_reserve(p, in, op); break;
        case 3: lshm__msgring_publish(&p->r, UINT64_MAX); break;
        case 4: case 5: p_read(p, 1 + (op >> 3)); break;
        case 6: p_scribble(p, in, op); break;
        default: {
            int ret = lshm__msgring_want_room(&p->r, fin_u16(in));

            CHECK(ret >= 0 || !p->fair);
            break;
        }
        }
    }
    lshm__msgring_publish(&p->r, UINT64_MAX);
    p_read(p, 1u << 16);
    if (p->fair)
        CHECK(p->n == 0);
    lshm__msgring_free(&p->peer);
    lshm__msgring_free(&p->r);
    free(p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fin in = { .p = data, .left = size };
    struct fuzz_leaks leaks;
    uint8_t mode;

    if (copy_buf == NULL)
        copy_buf = malloc(LSHM_WIRE_MAX);
    CHECK(copy_buf != NULL);
    fuzz_leaks_begin(&leaks);
    mode = fin_u8(&in);
    if (mode & 1)
        producer(&in);
    else
        consumer(&in);
    fuzz_leaks_end(&leaks, "fuzz_ring");
    return 0;
}
