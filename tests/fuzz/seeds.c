/*
 * Writes the seed corpora of the fuzz targets (make fuzz-seeds):
 * tests/fuzz/corpus/<target>/.  The wire and port seeds start from the
 * datagrams of linuxshm-protocol(7)'s EXAMPLES (read from the page) and
 * from the attacks of tests/test_port_hostile.c; the segment seeds from
 * the ways a receiver frees, acks and rewrites a sender's segment.  Each
 * seed is in its target's input format (see the target's file).
 */
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

/* The hex dumps of the page's EXAMPLES, in order. */
static struct out man[8];
static unsigned nman;

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
            char *p = line, *end;

            for (;;) {
                unsigned long v = strtoul(p, &end, 16);

                if (end == p)
                    break;
                u8(&man[nman], (unsigned)v);
                p = end;
            }
        }
    }
    fclose(f);
    if (nman != 3) {
        fprintf(stderr, "%s: %u hex dumps in EXAMPLES, expected 3\n", page, nman);
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
    segment_seeds();
    two_port_seeds();
    return 0;
}
