/*
 * Writes the seed corpora of the fuzz targets (make fuzz-seeds):
 * tests/fuzz/corpus/<target>/.  The wire, port and ring seeds start from
 * the datagrams and ring records of linuxshm-protocol(7)'s EXAMPLES (read
 * from the page) and from the attacks of tests/test_port_hostile.c and
 * tests/test_ring_hostile.c; the segment seeds from the ways a receiver
 * frees, acks and rewrites a sender's segment.  Each seed is in its
 * target's input format (see the target's file).
 */
#include <ctype.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "linuxshm.h"
#include "wire.h"

struct out {
    uint8_t b[65536];
    size_t  n;
};

static const char *dir;

static void u8(struct out *o, unsigned v) { o->b[o->n++] = (uint8_t)v; }
static void u16(struct out *o, unsigned v) { memcpy(o->b + o->n, &(uint16_t){ v }, 2); o->n += 2; }
static void u32(struct out *o, uint32_t v) { memcpy(o->b + o->n, &v, 4); o->n += 4; }
static void bytes(struct out *o, const void *p, size_t n) { memcpy(o->b + o->n, p, n); o->n += n; }

static void save(const char *target, const char *name, const struct out *o)
{
    char path[512];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s/%s", dir, target, name);
    f = fopen(path, "w");
    if (f == NULL || fwrite(o->b, 1, o->n, f) != o->n || fclose(f) != 0) {
        perror(path);
        exit(1);
    }
}

/* The hex dumps of the page's EXAMPLES, in order: HELLO, MMAP, a user
 * message, RING, a ring record, the FENCE sequence (its "ring @N:" lines;
 * its "tail:" and "socket:" lines go to fence_tail and fence_socket). */
#define NMAN 6
static struct out man[8];
static unsigned nman;
static struct out fence_tail, fence_socket;

static void read_man(const char *page)
{
    FILE *f = fopen(page, "r");
    char line[256];
    bool examples = false, ex = false;

    if (f == NULL) {
        perror(page);
        exit(1);
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, ".SH", 3) == 0)
            examples = strstr(line, "EXAMPLES") != NULL;
        else if (examples && strncmp(line, ".EX", 3) == 0)
            ex = true;
        else if (examples && strncmp(line, ".EE", 3) == 0 && ex) {
            ex = false;
            nman++;
        } else if (ex && nman < 8) {
            char *p = line, *end, *colon = strchr(line, ':');
            struct out *o = &man[nman];

            if (colon != NULL) {
                if (strncmp(line, "tail", 4) == 0)
                    o = &fence_tail;
                else if (strncmp(line, "socket", 6) == 0)
                    o = &fence_socket;
                p = colon + 1;
            } else if (strspn(line, " \t") < strlen(line) && !isxdigit((unsigned char)line[strspn(line, " \t")])) {
                continue;
            }
            for (;;) {
                unsigned long v = strtoul(p, &end, 16);

                if (end == p || v > 0xff)
                    break;
                u8(o, (unsigned)v);
                p = end;
            }
        }
    }
    fclose(f);
    if (nman != NMAN || man[4].n != 32 || man[5].n != 72 || fence_tail.n != 8 ||
        fence_socket.n != 16) {
        fprintf(stderr, "%s: %u hex dumps in EXAMPLES, expected %u as documented\n", page,
                nman, NMAN);
        exit(1);
    }
}

/* ---- port target: fuzz_port.c's operations ---- */

enum { P_RAW = 0, P_MMAP = 2, P_SHM = 3, P_INLINE = 5, P_CTRL = 6, P_RUN = 7, P_RELEASE = 9,
       P_SCRIBBLE = 10, P_LIBSEND = 11, P_DRAIN = 12, P_SHUT = 13 };
#define FD_PIPE(n)  ((n) | 2 << 2)

static void port_start(struct out *o, unsigned ctx)
{
    o->n = 0;
    u8(o, ctx);
    u8(o, 0x31);   /* a valid HELLO, max_segments 4 */
}

/* Any datagram; op bit 7: its pid and port are left as they are. */
static void p_raw(struct out *o, unsigned op, const void *d, size_t len, unsigned fdsel)
{
    u8(o, P_RAW | op);
    u16(o, (unsigned)len);
    u8(o, fdsel);
    bytes(o, d, len);
}

static void p_mmap(struct out *o)
{
    u8(o, P_MMAP);
    u8(o, 0);      /* the right size and seals */
    u8(o, 0);      /* every header field right */
}

static size_t hdr(uint8_t *p, uint32_t stream, int32_t pid, uint8_t type, uint8_t flags,
                  uint32_t size)
{
    struct lshm_wire_msg h = { .stream = stream, .pid = pid, .port_id = 77, .type = type,
                               .flags = flags, .size = size };

    memcpy(p, &h, sizeof(h));
    return sizeof(h);
}

/* A user message from chunk, size bytes, of segment 0 (desc_size kind 0 or 1). */
static void p_shm(struct out *o, unsigned op, unsigned mmap_id, unsigned chunk, unsigned nchunks)
{
    u8(o, P_SHM | op);
    u8(o, 0);               /* stream 1, one to four descriptors */
    u8(o, 0);               /* type 16 */
    u8(o, 0);               /* one descriptor */
    u8(o, mmap_id);
    u16(o, chunk);
    u8(o, 1 | (nchunks - 1) << 2);
}

static void p_inline(struct out *o, unsigned size, unsigned fdsel)
{
    u8(o, P_INLINE);
    u32(o, 9);
    u16(o, size);
    u8(o, 0);
    u8(o, fdsel);
}

static void p_ctrl(struct out *o, unsigned type, unsigned fdsel)
{
    u8(o, P_CTRL);
    u8(o, type);
    u8(o, fdsel);
}

static void port_seeds(void)
{
    struct out o;
    uint8_t d[LSHM_WIRE_MAX + 8];
    size_t n;

    /* The page's three datagrams, the MMAP with a segment made right. */
    port_start(&o, 0);
    p_mmap(&o);
    p_raw(&o, 0, man[2].b, man[2].n, 0);
    u8(&o, P_RUN | 0x10);
    u8(&o, P_RELEASE);
    u8(&o, P_RUN);
    save("port", "man-examples", &o);

    o.n = 0;
    u8(&o, 1);
    u8(&o, 0);                        /* the HELLO as bytes: the page's */
    u8(&o, (unsigned)man[0].n);
    bytes(&o, man[0].b, man[0].n);
    p_mmap(&o);
    p_raw(&o, 0, man[2].b, man[2].n, 0);
    u8(&o, P_RUN);
    save("port", "man-examples-hello-bytes", &o);

    /* A working exchange: segments, messages in them, the sender's
     * rewrites, inline messages with fds, the library answering. */
    port_start(&o, 0x20);
    p_mmap(&o);
    p_shm(&o, 0, 0, 0, 1);
    p_shm(&o, 0x10, 0, 1, 3);
    u8(&o, P_RUN | 0x10);
    u8(&o, P_SCRIBBLE); u8(&o, 0); u16(&o, 24); u32(&o, 0);
    p_inline(&o, 100, FD_PIPE(1));
    u8(&o, P_RUN);
    u8(&o, P_LIBSEND | 0x10); u16(&o, 5000); u8(&o, 3);
    u8(&o, P_LIBSEND); u16(&o, 20); u8(&o, 4);
    u8(&o, P_RUN);
    u8(&o, P_DRAIN);
    u8(&o, P_RELEASE);
    p_ctrl(&o, LSHM_WIRE_SHM_ACK, 0);
    p_ctrl(&o, LSHM_WIRE_BYE, 0);
    u8(&o, P_RUN);
    save("port", "exchange", &o);

    /* tests/test_port_hostile.c, one attack each. */
    o.n = 0;
    u8(&o, 0);
    u8(&o, 0);
    n = hdr(d, 1, 0, 16, 0, 4);   /* the pid is made right */
    u8(&o, (unsigned)n + 4);
    bytes(&o, d, n + 4);
    save("port", "hostile-first-not-hello", &o);

    o.n = 0;
    u8(&o, 1);
    u8(&o, 0x10);
    u8(&o, (unsigned)man[0].n);
    bytes(&o, man[0].b, man[0].n);   /* pid 1234: not the credentials' */
    save("port", "hostile-hello-pid-not-credentials", &o);

    port_start(&o, 0);
    n = hdr(d, 1, 1234, 16, 0, 4);
    p_raw(&o, 0x80, d, n + 4, 0);
    u8(&o, P_RUN);
    save("port", "hostile-header-pid", &o);

    port_start(&o, 1);
    n = hdr(d, 1, 0, 16, 0x08, 4);
    p_raw(&o, 0, d, n + 4, 0);
    u8(&o, P_RUN);
    save("port", "hostile-unknown-flag", &o);

    port_start(&o, 0);
    p_mmap(&o);
    p_shm(&o, 0, 3, 0, 1);
    u8(&o, P_RUN);
    save("port", "hostile-desc-unknown-segment", &o);

    port_start(&o, 0);
    p_mmap(&o);
    p_shm(&o, 0, 0, 639, 2);
    u8(&o, P_RUN);
    save("port", "hostile-desc-out-of-data-area", &o);

    port_start(&o, 0);
    n = hdr(d, 0, 0, LSHM_WIRE_MMAP_MSG, 0, 4);
    memset(d + n, 0, 4);
    p_raw(&o, 0, d, n + 4, FD_PIPE(1));
    u8(&o, P_RUN);
    save("port", "hostile-mmap-pipe", &o);

    port_start(&o, 0);
    u8(&o, P_MMAP); u8(&o, 0x04); u8(&o, 0); u8(&o, 0);   /* no seals */
    u8(&o, P_RUN);
    save("port", "hostile-mmap-unsealed", &o);

    port_start(&o, 0);
    u8(&o, P_MMAP); u8(&o, 0); u8(&o, 0x20); u8(&o, 1);   /* id 1 first */
    u8(&o, P_RUN);
    save("port", "hostile-mmap-skips-id", &o);

    port_start(&o, 0);
    u8(&o, P_MMAP); u8(&o, 0); u8(&o, 0x01); u32(&o, 0xdeadbeef);   /* bad magic */
    u8(&o, P_RUN);
    save("port", "hostile-corrupt-header", &o);

    port_start(&o, 0);
    p_inline(&o, 8, 3 | 2 << 2);      /* three fds */
    u8(&o, P_RUN);
    save("port", "hostile-three-fds", &o);

    port_start(&o, 1);
    p_inline(&o, 2048, 0xa3);         /* 24 fds: more than the control buffer holds */
    u8(&o, P_RUN);
    save("port", "hostile-too-many-fds", &o);

    port_start(&o, 0);
    p_ctrl(&o, LSHM_WIRE_SHM_ACK, FD_PIPE(1));
    u8(&o, P_RUN);
    save("port", "hostile-ctrl-with-fd", &o);

    port_start(&o, 0);
    n = hdr(d, 1, 0, 16, 0, LSHM_INLINE_MAX + 1);
    memset(d + n, 7, LSHM_INLINE_MAX + 1);
    p_raw(&o, 0, d, n + LSHM_INLINE_MAX + 1, 0);
    u8(&o, P_RUN);
    save("port", "hostile-one-byte-over", &o);

    port_start(&o, 0);
    p_mmap(&o);
    u8(&o, P_SHM | 0x20); u8(&o, 0); u8(&o, 0); u8(&o, 0); u8(&o, 0); u16(&o, 0);
    u8(&o, 0); u16(&o, 99); u32(&o, 1000);   /* size says 1000, the descriptor 100 */
    u8(&o, P_RUN);
    save("port", "hostile-sum-mismatch", &o);

    port_start(&o, 0);
    p_raw(&o, 0, d, 0, 0);
    u8(&o, P_RUN);
    save("port", "hostile-empty-datagram", &o);

    port_start(&o, 0);
    p_ctrl(&o, 0xff, 0);
    u8(&o, P_RUN);
    save("port", "hostile-second-hello", &o);

    port_start(&o, 0);
    p_ctrl(&o, LSHM_WIRE_BYE, 0);
    p_inline(&o, 30, 0);
    u8(&o, P_SHUT | 0x10);
    u8(&o, P_RUN);
    save("port", "hostile-after-bye", &o);

    /* Found by fuzz_port: a tracked message refused for its tracking
     * (no such segment) came with a pipe, whose fd the port kept. */
    port_start(&o, 0);
    u8(&o, P_SHM | 0x40);
    u8(&o, 0x04); u8(&o, 0); u8(&o, 0);
    u8(&o, 0); u16(&o, 0);             /* tracking: segment 0 (never sent), slot 0 */
    u8(&o, 0); u16(&o, 0); u8(&o, 0); u16(&o, 0);
    u8(&o, FD_PIPE(1));
    u8(&o, P_RUN);
    save("port", "regress-tracked-refused-keeps-fd", &o);
}

/* ---- port target with rings ---- */

enum { P_RING = 13 | 2 << 4, P_TAIL = 13 | 3 << 4, P_LRING = 13 | 5 << 4,
       P_RECORD = 9 | 0x80 };
#define REC_PUBLISH  0x40
#define REC_CROSS    0x10
#define REC_OVER     0x20

static void ring_start(struct out *o, unsigned ctx)
{
    o->n = 0;
    u8(o, ctx);
    u8(o, 0x71);   /* a valid HELLO with RING, max_segments 4 */
    u8(o, P_RING);
    u8(o, 0);      /* 65536 bytes */
    u8(o, 0);      /* every field right */
}

/* A MSG record of the given bytes (a user message as on the wire). */
static void p_rec_bytes(struct out *o, unsigned op, const void *d, size_t len)
{
    u8(o, P_RECORD | op);
    u8(o, 4);
    u16(o, (unsigned)len);
    bytes(o, d, len);
}

static void p_rec_inline(struct out *o, unsigned op, uint32_t stream, unsigned len)
{
    u8(o, P_RECORD | op);
    u8(o, 0);
    u32(o, stream);
    u16(o, len);
}

static void p_rec_kind(struct out *o, unsigned op, unsigned sel)
{
    u8(o, P_RECORD | op);
    u8(o, sel);
}

static void p_rec_raw(struct out *o, unsigned op, uint32_t len, uint32_t kind)
{
    u8(o, P_RECORD | op);
    u8(o, 3);
    u32(o, len);
    u32(o, kind);
}

static void p_tail(struct out *o, unsigned sel)
{
    u8(o, P_TAIL);
    u8(o, sel);
}

static void port_ring_seeds(void)
{
    struct out o;
    uint8_t d[LSHM_WIRE_MAX + 8];
    size_t n;
    unsigned i;

    /* The page's FENCE sequence: two records, a FENCE, tail 72, then the
     * datagram with its fd. */
    ring_start(&o, 0);
    p_rec_bytes(&o, 0, man[5].b + 8, 21);
    p_rec_bytes(&o, 0, man[5].b + 40, 21);
    p_rec_kind(&o, 0, 1);
    p_tail(&o, 0);
    p_raw(&o, 0, fence_socket.b, fence_socket.n, FD_PIPE(1));
    u8(&o, P_RUN | 0x10);
    u8(&o, P_RELEASE);
    p_rec_bytes(&o, REC_PUBLISH, man[4].b + 8, 21);
    u8(&o, P_RUN);
    save("port", "ring-man-fence-sequence", &o);

    /* A working exchange both ways: records, a wrap with SKIP, wake-ups
     * (datagram and futex), the library's own ring read and acked. */
    ring_start(&o, 0x20);
    for (i = 0; i < 12; i++)
        p_rec_inline(&o, i % 4 == 3 ? REC_PUBLISH : 0, i + 1, 1000 + 500 * i);
    p_tail(&o, 0x18);                   /* publish, a WAKE datagram */
    u8(&o, P_RUN | 0x10);
    u8(&o, P_RELEASE);
    p_mmap(&o);
    p_rec_kind(&o, REC_PUBLISH, 1);     /* FENCE before the MMAP's message */
    p_shm(&o, 0x10, 0, 0, 1);
    p_rec_kind(&o, REC_PUBLISH | 0x00, 1 | 0x20);   /* FENCE, futex wake-up */
    p_inline(&o, 100, FD_PIPE(1));
    u8(&o, P_RUN);
    for (i = 0; i < 4; i++) {
        u8(&o, P_LIBSEND); u16(&o, 40); u8(&o, i);
    }
    u8(&o, P_LIBSEND | 0x10); u16(&o, 5000); u8(&o, 9);
    u8(&o, P_RUN);
    u8(&o, P_DRAIN);
    u8(&o, P_LRING); u8(&o, 0x08);      /* head = tail, SHM_ACK if asked */
    u8(&o, P_RUN);
    for (i = 0; i < 40; i++)
        p_rec_inline(&o, REC_PUBLISH, 100 + i, 1500);
    u8(&o, P_RUN | 0x10);
    u8(&o, P_RELEASE);
    p_ctrl(&o, LSHM_WIRE_BYE, 0);
    u8(&o, P_RUN);
    save("port", "ring-exchange", &o);

    /* tests/test_ring_hostile.c, one attack each. */
    ring_start(&o, 0);
    p_rec_inline(&o, 0, 1, 10);
    u8(&o, P_TAIL); u8(&o, 2); u32(&o, 0); u32(&o, 65536 + 8);
    u8(&o, P_RUN);
    save("port", "ring-hostile-tail-beyond-head-plus-size", &o);

    ring_start(&o, 0);
    p_rec_inline(&o, REC_PUBLISH, 1, 10);
    u8(&o, P_RUN);
    u8(&o, P_TAIL); u8(&o, 1); u8(&o, 0xf8);   /* back by 8 */
    u8(&o, P_RUN);
    save("port", "ring-hostile-tail-moving-backwards", &o);

    ring_start(&o, 0);
    p_rec_inline(&o, 0, 1, 10);
    u8(&o, P_TAIL); u8(&o, 1); u8(&o, 3);
    u8(&o, P_RUN);
    save("port", "ring-hostile-tail-not-a-multiple-of-8", &o);

    ring_start(&o, 0);
    p_rec_raw(&o, REC_PUBLISH, LSHM_WIRE_MAX + 1, LSHM_REC_MSG);
    u8(&o, P_RUN);
    save("port", "ring-hostile-msg-longer-than-wire-max", &o);

    ring_start(&o, 0);
    p_rec_raw(&o, REC_PUBLISH, 8, LSHM_REC_MSG);
    u8(&o, P_RUN);
    save("port", "ring-hostile-msg-shorter-than-a-header", &o);

    ring_start(&o, 0);
    for (i = 0; i < 7; i++)
        p_rec_inline(&o, REC_PUBLISH, i + 1, LSHM_INLINE_MAX);
    u8(&o, P_RUN | 0x10);
    u8(&o, P_RELEASE);
    p_rec_inline(&o, REC_PUBLISH | REC_CROSS, 9, LSHM_INLINE_MAX);
    u8(&o, P_RUN);
    save("port", "ring-hostile-record-crossing-the-end", &o);

    ring_start(&o, 0);
    p_rec_raw(&o, REC_PUBLISH, 0, 9);
    u8(&o, P_RUN);
    save("port", "ring-hostile-unknown-kind", &o);

    ring_start(&o, 0);
    p_rec_raw(&o, REC_PUBLISH, 8, LSHM_REC_FENCE);
    u8(&o, P_RUN);
    save("port", "ring-hostile-fence-with-a-length", &o);

    ring_start(&o, 0);
    n = lshm__wire_encode_ctrl(d, LSHM_WIRE_BYE, 0, 77, 0);
    p_rec_bytes(&o, REC_PUBLISH, d, n);
    u8(&o, P_RUN);
    save("port", "ring-hostile-control-type-in-a-msg", &o);

    ring_start(&o, 0);
    p_rec_inline(&o, REC_PUBLISH, 1, 64);
    u8(&o, P_RUN);
    u8(&o, P_TAIL); u8(&o, 3); u32(&o, 0xffff); u16(&o, 32);   /* rewrite after reading */
    p_rec_inline(&o, REC_PUBLISH, 2, 64);
    u8(&o, P_TAIL); u8(&o, 3); u32(&o, 0x7fffffff); u16(&o, 88);
    u8(&o, P_RUN);
    save("port", "ring-hostile-records-rewritten", &o);

    ring_start(&o, 0);
    p_inline(&o, 10, FD_PIPE(1));       /* an fd datagram with no FENCE */
    u8(&o, P_RUN);
    save("port", "ring-hostile-fd-datagram-without-a-fence", &o);

    ring_start(&o, 0);
    p_mmap(&o);
    u8(&o, P_RUN);
    save("port", "ring-hostile-mmap-without-a-fence", &o);

    ring_start(&o, 0);
    p_rec_kind(&o, REC_PUBLISH, 1);     /* a FENCE whose datagram never comes */
    u8(&o, P_RUN | 0x40);
    save("port", "ring-hostile-fence-with-no-datagram", &o);

    ring_start(&o, 0);
    p_inline(&o, 10, 0);                /* a user message on the socket after RING */
    u8(&o, P_RUN);
    save("port", "ring-hostile-user-message-on-the-socket", &o);

    ring_start(&o, 0);
    for (i = 0; i < 30; i++)
        p_tail(&o, 0x18);
    p_rec_inline(&o, REC_PUBLISH, 1, 10);
    u8(&o, P_RUN);
    save("port", "ring-hostile-wake-flood", &o);

    o.n = 0;
    u8(&o, 0);
    u8(&o, 0x31);                       /* our HELLO without RING */
    u8(&o, P_RING); u8(&o, 0); u8(&o, 0);
    u8(&o, P_RUN);
    save("port", "ring-hostile-ring-when-our-hello-lacked-it", &o);

    ring_start(&o, 0);
    u8(&o, P_RING); u8(&o, 1); u8(&o, 0);
    u8(&o, P_RUN);
    save("port", "ring-hostile-second-ring", &o);

    o.n = 0;
    u8(&o, 0);
    u8(&o, 0x71);
    p_ctrl(&o, LSHM_WIRE_WAKE, 0);
    u8(&o, P_RUN);
    save("port", "ring-hostile-wake-before-ring", &o);

    static const struct { unsigned sel, bad; uint32_t a; unsigned b; const char *name; } rings[] = {
        { 2, 0, 0, 0, "ring-hostile-size-above-the-library-hello" },
        { 0, 8, 65536 + 4096, 0, "ring-hostile-size-not-a-power-of-two" },
        { 0, 8, 131072, 0, "ring-hostile-size-differs-from-the-header" },
        { 0, 4, 0, 0, "ring-hostile-memfd-unsealed" },
        { 0, 1, 4096, 0, "ring-hostile-memfd-of-the-wrong-size" },
        { 0, 2, 0xdeadbeef, 0, "ring-hostile-bad-magic" },
        { 0, 2, 3 | 77u << 16, 1, "ring-hostile-bad-version" },
        { 0, 2, 1, 3, "ring-hostile-bad-source-pid" },
        { 0, 2, 1, 4, "ring-hostile-bad-destination-pid" },
        { 0, 2, 2 | 78u << 16, 1, "ring-hostile-another-port-id" },
        { 0, 16, FD_PIPE(1), 0, "ring-hostile-fd-a-pipe" },
        { 0, 4, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE, 0, "ring-hostile-write-sealed" },
    };

    for (i = 0; i < sizeof(rings) / sizeof(rings[0]); i++) {
        o.n = 0;
        u8(&o, 0);
        u8(&o, 0x71);
        u8(&o, P_RING);
        u8(&o, rings[i].sel);
        u8(&o, rings[i].bad);
        if (rings[i].bad & 1)
            u16(&o, rings[i].a);
        if (rings[i].bad & 2) {
            u32(&o, rings[i].a);
            u8(&o, rings[i].b);
        }
        if (rings[i].bad & 4)
            u8(&o, rings[i].a);
        if (rings[i].bad & 8)
            u32(&o, rings[i].a);
        if (rings[i].bad & 16)
            u8(&o, rings[i].a);
        p_rec_inline(&o, REC_PUBLISH, 1, 10);
        u8(&o, P_RUN);
        save("port", rings[i].name, &o);
    }

    /* Found by fuzz_port: after the library's BYE its port drains; a
     * datagram with an fd and no FENCE ends the drain, and was kept
     * (memory and fd) past the port's end. */
    ring_start(&o, 0);
    p_rec_inline(&o, REC_PUBLISH, 1, 10);
    u8(&o, P_RUN);
    u8(&o, 14 | 0x10);                  /* lshm_port_close */
    u8(&o, P_RUN);
    p_inline(&o, 10, FD_PIPE(1));
    u8(&o, P_RUN);
    save("port", "regress-drain-keeps-parked-datagram", &o);

    /* The peer as consumer of the library's ring: head ahead of tail, far
     * behind, wake and space forced. */
    static const struct { unsigned sel; const char *name; } lr[] = {
        { 0x02, "ring-hostile-consumer-head-ahead-of-tail" },
        { 0x04, "ring-hostile-consumer-head-far-behind-tail" },
        { 0x05, "ring-hostile-consumer-forcing-wake" },
        { 0x06, "ring-hostile-consumer-forcing-space" },
    };

    for (i = 0; i < sizeof(lr) / sizeof(lr[0]); i++) {
        unsigned k;

        o.n = 0;
        u8(&o, 0);
        u8(&o, 0x71);
        for (k = 0; k < 3; k++) {
            u8(&o, P_LIBSEND); u16(&o, 30); u8(&o, k);
        }
        u8(&o, P_RUN);
        u8(&o, P_DRAIN);
        u8(&o, P_LRING); u8(&o, lr[i].sel);
        u8(&o, lr[i].sel == 0x02 ? 64 : 1); u32(&o, 1); u32(&o, 0);
        for (k = 0; k < 3; k++) {
            u8(&o, P_LIBSEND); u16(&o, 30); u8(&o, k);
        }
        u8(&o, P_RUN | 0x40);
        save("port", lr[i].name, &o);
    }
}

/* ---- ring target: fuzz_ring.c's operations ---- */

enum { R_REC = 0, R_TAIL = 3, R_READ = 4, R_HEAD = 6, R_SLEEP = 7 };
#define R_PUBLISH 0x20

static void ring_seeds(void)
{
    struct out o;
    unsigned i;

    /* The page's ring record, then its FENCE sequence, read by the library. */
    o.n = 0;
    u8(&o, 0); u8(&o, 0); u8(&o, 0);
    u8(&o, R_REC | R_PUBLISH); u8(&o, 4); u16(&o, 21); bytes(&o, man[4].b + 8, 21);
    u8(&o, R_READ | 0x30);
    u8(&o, R_REC); u8(&o, 4); u16(&o, 21); bytes(&o, man[5].b + 8, 21);
    u8(&o, R_REC); u8(&o, 4); u16(&o, 21); bytes(&o, man[5].b + 40, 21);
    u8(&o, R_REC | R_PUBLISH); u8(&o, 1);
    u8(&o, R_READ | 0x30);
    u8(&o, R_HEAD);
    u8(&o, R_SLEEP | 0x10);
    save("ring", "man-record-and-fence-sequence", &o);

    /* Round after round across the end (SKIPs), head published. */
    o.n = 0;
    u8(&o, 0); u8(&o, 0); u8(&o, 0);
    for (i = 0; i < 24; i++) {
        u8(&o, R_REC | R_PUBLISH); u8(&o, 0); u32(&o, i); u16(&o, 4000 + 97 * i);
        u8(&o, R_READ | 0x10);
        u8(&o, R_HEAD);
    }
    save("ring", "rounds-wrapping", &o);

    /* tests/test_ring_hostile.c's ring attacks. */
    static const struct { unsigned kind; uint32_t a, b; const char *name; } h[] = {
        { 3, 0, 0, "hostile-tail-beyond-head-plus-size" },
        { 3, 1, 0, "hostile-tail-not-a-multiple-of-8" },
        { 0, LSHM_WIRE_MAX + 1, LSHM_REC_MSG, "hostile-msg-longer-than-wire-max" },
        { 0, 8, LSHM_REC_MSG, "hostile-msg-shorter-than-a-header" },
        { 0, 0, 9, "hostile-unknown-kind" },
        { 0, 8, LSHM_REC_FENCE, "hostile-fence-with-a-length" },
        { 0, 4, LSHM_REC_SKIP, "hostile-skip-with-a-length" },
    };

    for (i = 0; i < sizeof(h) / sizeof(h[0]); i++) {
        o.n = 0;
        u8(&o, 0); u8(&o, 0); u8(&o, 0);
        u8(&o, R_REC | R_PUBLISH); u8(&o, 0); u32(&o, 1); u16(&o, 10);
        if (h[i].kind == 3) {
            u8(&o, R_TAIL); u8(&o, h[i].a ? 1 : 2);
            if (h[i].a)
                u8(&o, 3);
            else {
                u32(&o, 0); u32(&o, 65536 + 8);
            }
        } else {
            u8(&o, R_REC | R_PUBLISH); u8(&o, 3); u32(&o, h[i].a); u32(&o, h[i].b);
        }
        u8(&o, R_READ | 0x30);
        save("ring", h[i].name, &o);
    }

    o.n = 0;
    u8(&o, 0); u8(&o, 0); u8(&o, 0);
    for (i = 0; i < 7; i++) {
        u8(&o, R_REC | R_PUBLISH); u8(&o, 0); u32(&o, i); u16(&o, LSHM_INLINE_MAX);
    }
    u8(&o, R_READ | 0x70);
    u8(&o, R_REC | R_PUBLISH | 0x10); u8(&o, 0); u32(&o, 9); u16(&o, LSHM_INLINE_MAX);
    u8(&o, R_READ | 0x30);
    save("ring", "hostile-record-crossing-the-end", &o);

    o.n = 0;
    u8(&o, 0); u8(&o, 0); u8(&o, 0);
    u8(&o, R_REC | R_PUBLISH); u8(&o, 4); u16(&o, 16);
    u32(&o, 0); u32(&o, 1234); u16(&o, 1); u8(&o, LSHM_WIRE_BYE); u8(&o, 0); u32(&o, 0);
    u8(&o, R_READ);
    save("ring", "hostile-control-type-in-a-msg", &o);

    o.n = 0;
    u8(&o, 0); u8(&o, 0); u8(&o, 0);
    u8(&o, R_REC | R_PUBLISH); u8(&o, 0); u32(&o, 1); u16(&o, 64);
    u8(&o, R_TAIL); u8(&o, 3); u32(&o, 0xffff); u16(&o, 88);
    u8(&o, R_READ);
    u8(&o, R_REC | R_PUBLISH); u8(&o, 0); u32(&o, 2); u16(&o, 64);
    u8(&o, R_TAIL); u8(&o, 3); u32(&o, 0x3fff0000); u16(&o, 84);
    u8(&o, R_READ | 0x10);
    save("ring", "hostile-records-rewritten", &o);

    /* The ring memfd: header fields, size, seals. */
    static const struct { unsigned bad; uint32_t a; unsigned b; const char *name; } m[] = {
        { 1, 0xdeadbeef, 0, "hostile-bad-magic" },
        { 1, 3 | 5u << 16, 1, "hostile-bad-version" },
        { 1, 1, 3, "hostile-bad-source-pid" },
        { 2, 4096, 0, "hostile-memfd-of-the-wrong-size" },
        { 4, 0, 0, "hostile-memfd-unsealed" },
        { 4, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE, 0, "hostile-future-write-sealed" },
        { 8, 131072, 0, "hostile-size-differs-from-the-header" },
    };

    for (i = 0; i < sizeof(m) / sizeof(m[0]); i++) {
        o.n = 0;
        u8(&o, 0); u8(&o, 0); u8(&o, m[i].bad);
        if (m[i].bad & 1) {
            u32(&o, m[i].a); u8(&o, m[i].b);
        }
        if (m[i].bad & 2)
            u16(&o, m[i].a);
        if (m[i].bad & 4)
            u8(&o, m[i].a);
        if (m[i].bad & 8)
            u32(&o, m[i].a);
        save("ring", m[i].name, &o);
    }

    /* The library as producer: a fair consumer, then one that rewrites
     * head, wake and space. */
    o.n = 0;
    u8(&o, 1); u8(&o, 0);
    for (i = 0; i < 40; i++) {
        u8(&o, 0 | (i % 3 == 0 ? 0x10 : 0)); u8(&o, i % 5 == 4 ? 1 : 0x40 + i);
        if (i % 5 != 4)
            u16(&o, 2000 + 300 * i);
        if (i % 4 == 3)
            u8(&o, 4 | 0x18);
    }
    u8(&o, 7); u16(&o, 16000);
    save("ring", "producer-fair", &o);
    for (i = 0; i < 7; i++) {
        char name[64];

        o.n = 0;
        u8(&o, 1); u8(&o, 0);
        u8(&o, 0x10); u8(&o, 0); u16(&o, 5000);
        u8(&o, 6); u8(&o, i); u32(&o, 0x100); u32(&o, 0x10000); u32(&o, 0);
        u8(&o, 0x10); u8(&o, 0); u16(&o, 16000);
        u8(&o, 7); u16(&o, 16000);
        u8(&o, 4 | 0x18);
        u8(&o, 0x10); u8(&o, 0); u16(&o, 100);
        snprintf(name, sizeof(name), "producer-consumer-rewrites-%u", i);
        save("ring", name, &o);
    }
}

/* ---- wire target: an fd-count byte, then the datagram ---- */

static void wire_seeds(void)
{
    static const char *names[] = { "man-hello", "man-mmap", "man-user-tracked" };
    struct out o;
    uint8_t d[LSHM_WIRE_MAX + 8];
    struct lshm_wire_desc desc = { 0, 3, 40000 };
    struct lshm_wire_msg h = { .stream = 5, .pid = 1234, .port_id = 1, .type = 16,
                               .flags = LSHM_WIRE_LAST, .size = 5 };
    unsigned i;

    for (i = 0; i < 3; i++) {
        o.n = 0;
        u8(&o, i == 1);
        bytes(&o, man[i].b, man[i].n);
        save("wire", names[i], &o);
    }
    o.n = 0;
    u8(&o, 1);
    bytes(&o, man[3].b, man[3].n);
    save("wire", "man-ring", &o);
    o.n = 0;
    u8(&o, 0);
    bytes(&o, d, lshm__wire_encode_ctrl(d, LSHM_WIRE_WAKE, 1234, 1, 0));
    save("wire", "wake", &o);
    /* Mode 1: the body of the page's ring record. */
    o.n = 0;
    u8(&o, 4);
    bytes(&o, man[4].b + 8, 21);
    save("wire", "man-record-body", &o);
    o.n = 0;
    u8(&o, 4);
    bytes(&o, man[1].b, man[1].n);      /* a control type in a record */
    save("wire", "record-control-type", &o);
    /* Mode 2: record headers against avail and room. */
    {
        static const struct { uint32_t len, kind; uint64_t avail, room; const char *name; } rc[] = {
            { 21, LSHM_REC_MSG, 72, 65536, "record-check-man" },
            { 0, LSHM_REC_FENCE, 8, 65536, "record-check-fence" },
            { 0, LSHM_REC_SKIP, 64, 64, "record-check-skip" },
            { 21, LSHM_REC_MSG, 72, 16, "record-check-crossing" },
            { 4, LSHM_REC_FENCE, 64, 64, "record-check-fence-len" },
            { 16456, LSHM_REC_MSG, 1 << 20, 1 << 20, "record-check-over-max" },
            { 16, 7, 64, 64, "record-check-unknown-kind" },
        };

        for (i = 0; i < sizeof(rc) / sizeof(rc[0]); i++) {
            o.n = 0;
            u8(&o, 8);
            u32(&o, rc[i].len);
            u32(&o, rc[i].kind);
            /* As fuzz_wire maps them: avail / 8, room / 8 - 1. */
            u32(&o, (uint32_t)(rc[i].avail / 8));
            u32(&o, 0);
            u32(&o, (uint32_t)(rc[i].room / 8 - 1));
            u32(&o, 0);
            save("wire", rc[i].name, &o);
        }
    }
    o.n = 0;
    u8(&o, 0);
    bytes(&o, d, lshm__wire_encode_ctrl(d, LSHM_WIRE_SHM_ACK, 1234, 1, 0));
    save("wire", "shm-ack", &o);
    o.n = 0;
    u8(&o, 0);
    bytes(&o, d, lshm__wire_encode_ctrl(d, LSHM_WIRE_BYE, 1234, 1, 0));
    save("wire", "bye", &o);
    o.n = 0;
    u8(&o, 1);
    bytes(&o, d, lshm__wire_encode_user(d, &h, NULL, NULL, 0, "hello"));
    save("wire", "user-inline-fd", &o);
    o.n = 0;
    u8(&o, 0);
    bytes(&o, d, lshm__wire_encode_user(d, &h, NULL, &desc, 1, NULL));
    save("wire", "user-shm", &o);
    o.n = 0;
    u8(&o, 0);
    h.size = LSHM_INLINE_MAX;
    memset(d, 0, sizeof(d));
    bytes(&o, d, lshm__wire_encode_user(d, &h, NULL, NULL, 0, d + 64));
    save("wire", "user-inline-max", &o);
}

/* ---- segment target: fuzz_segment.c's operations ---- */

enum { S_SEND = 0, S_RECV = 3, S_FREE = 5, S_SCRIBBLE = 7, S_RUN = 8, S_WAIT = 10,
       S_BUF_FREE = 11, S_CANCEL = 12, S_GROW = 13, S_CTRL = 14 };

static void s_send(struct out *o, unsigned nb, unsigned sel, unsigned size)
{
    unsigned i;

    u8(o, S_SEND | (nb - 1) << 4);
    u8(o, sel);
    for (i = 0; i < nb; i++) {
        u16(o, size);
        if (sel & 2)
            u16(o, size);
    }
}

static void segment_seeds(void)
{
    struct out o;
    unsigned i;

    /* Send, read, free and ack, round after round. */
    o.n = 0;
    u8(&o, 0);
    u8(&o, 1);
    for (i = 0; i < 12; i++) {
        s_send(&o, 1 + i % 3, (i & 1) | (i % 4 == 2 ? 16 : 0), 100 + i * 700);
        u8(&o, S_RUN);
        u8(&o, S_RECV | 0x30);
        u8(&o, S_FREE); u8(&o, 7);
        u8(&o, S_WAIT);
    }
    u8(&o, S_CANCEL); u8(&o, 0);
    save("segment", "rounds", &o);

    /* Out of chunks: the sender sets oosm, the receiver frees and acks. */
    o.n = 0;
    u8(&o, 0x18);
    u8(&o, 0);
    for (i = 0; i < 10; i++) {
        s_send(&o, 3, 1, 0xffff);
        u8(&o, S_RUN | 0x40);
        u8(&o, S_RECV | 0xf0);
    }
    u8(&o, S_FREE); u8(&o, 7);
    u8(&o, S_FREE); u8(&o, 7);
    u8(&o, S_WAIT);
    s_send(&o, 1, 0, 1000);
    u8(&o, S_RUN);
    save("segment", "out-of-chunks", &o);

    /* With rings: messages as records, MMAPs behind FENCEs, head published;
     * then the peer rewrites head, wake and space. */
    o.n = 0;
    u8(&o, 0x80);
    u8(&o, 1);
    for (i = 0; i < 10; i++) {
        s_send(&o, 1 + i % 3, (i & 1) | (i % 4 == 2 ? 16 : 0), 100 + i * 900);
        u8(&o, S_RUN);
        u8(&o, S_RECV | 0x30);
        u8(&o, S_FREE); u8(&o, 7);
    }
    save("segment", "ring-rounds", &o);
    for (i = 0; i < 7; i++) {
        char name[64];
        unsigned k;

        o.n = 0;
        u8(&o, 0x80);
        u8(&o, 1);
        s_send(&o, 1, 0, 300);
        u8(&o, S_RUN);
        u8(&o, S_RECV | 0x30);
        u8(&o, S_SCRIBBLE | 0x80 | i << 4);
        u32(&o, 0x100); u32(&o, 0x10000); u32(&o, 0);
        for (k = 0; k < 4; k++) {
            s_send(&o, 1, 0, 300);
            u8(&o, S_RUN);
            u8(&o, S_RECV | 0x30);
        }
        snprintf(name, sizeof(name), "ring-scribble-%u", i);
        save("segment", name, &o);
    }

    /* The receiver rewrites the header between sends. */
    for (i = 0; i < 7; i++) {
        char name[64];

        o.n = 0;
        u8(&o, 2);
        u8(&o, 2);
        s_send(&o, 1, 0, 3000);
        u8(&o, S_RUN);
        u8(&o, S_RECV | 0x10);
        u8(&o, S_SCRIBBLE | i << 4);
        u8(&o, 0);
        u8(&o, i == 0 ? 0x80 : 3);
        u32(&o, 0xffffffff);
        u32(&o, 0x5);
        u16(&o, 7);
        s_send(&o, 2, 2 | 16, 30000);
        s_send(&o, 1, 8, 500);
        u8(&o, S_GROW); u8(&o, 0); u16(&o, 400);
        u8(&o, S_BUF_FREE);
        u8(&o, S_RUN);
        u8(&o, S_RECV | 0x10);
        u8(&o, S_FREE); u8(&o, 3);
        u8(&o, S_CTRL);
        u8(&o, S_CANCEL); u8(&o, 0);
        u8(&o, S_RUN);
        snprintf(name, sizeof(name), "scribble-%u", i);
        save("segment", name, &o);
    }
}

/* Two ports to one process: the peer says BYE on the first, or closes it,
 * and a new pair begins (ids from 0) once none of its ports is left. */
static void two_port_seeds(void)
{
    static const uint8_t bye_then_second[] = { 0x01, 0x00, 0x00, 0x00, 0x00, 0x10, 0x7e, 0xff, 0x10, 0x10 };
    static const uint8_t close_then_second[] = { 0x02, 0x04, 0x00, 0x00, 0x00, 0x08, 0x13, 0x5f, 0xff, 0x02, 0x02 };
    static const uint8_t late_free[] = {
        0x3b, 0xff, 0xff, 0x60, 0x30, 0x30, 0x30, 0x30, 0x2f, 0xde, 0x00,
        0x00, 0x00, 0xff, 0x08, 0xff, 0x00, 0x00, 0x01, 0x30, 0x30,
    };
    static const uint8_t mapped_bye_then_second[] = { 0x00, 0x08, 0x00, 0x90, 0x01, 0x08, 0x13, 0x3e, 0xef, 0x22, 0x00 };
    struct out o;

    o.n = 0;
    bytes(&o, bye_then_second, sizeof(bye_then_second));
    save("segment", "two-ports-bye-unmapped", &o);
    o.n = 0;
    bytes(&o, close_then_second, sizeof(close_then_second));
    save("segment", "two-ports-close-new-pair", &o);
    o.n = 0;
    bytes(&o, mapped_bye_then_second, sizeof(mapped_bye_then_second));
    save("segment", "two-ports-bye-new-pair", &o);

    /* Found by fuzz_segment: the peer says BYE on port B while a message
     * into segment 0 (announced on B, never mapped) is in flight there; the
     * library forgets segment 0, makes a new segment 0 for port A, and the
     * late failure of B's send frees its chunks by id, in the new segment,
     * under a message of A (scrubbed with LSHM_CTX_SCRUB). */
    o.n = 0;
    bytes(&o, late_free, sizeof(late_free));
    save("segment", "regress-late-send-failure-frees-reused-id", &o);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s PROTOCOL_PAGE CORPUS_DIR\n", argv[0]);
        return 2;
    }
    dir = argv[2];
    read_man(argv[1]);
    wire_seeds();
    port_seeds();
    port_ring_seeds();
    ring_seeds();
    segment_seeds();
    two_port_seeds();
    return 0;
}
