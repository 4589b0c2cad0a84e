/*
 * The wire layer (linuxshm-protocol(7)).  Every datagram a peer sends is
 * checked here, once, before the port layer looks at any of it.  Pure
 * functions over bytes: no I/O, no shared memory, no state, so that all of
 * it can be driven by random input.
 *
 * Bytes come from a receive buffer with no alignment promise, so every field
 * is read and written with memcpy, never through a cast pointer.
 */
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "wire.h"

#define HDR_LEN       sizeof(struct lshm_wire_msg)
#define TRACKING_LEN  sizeof(struct lshm_wire_tracking)
#define DESC_LEN      sizeof(struct lshm_wire_desc)

_Static_assert(LSHM_DATA_SIZE == (uint64_t)LSHM_CHUNK_SIZE * LSHM_CHUNK_COUNT,
               "the data area must not overflow 32 bits");
/* The largest valid datagram must fit the receive buffer. */
_Static_assert(HDR_LEN + TRACKING_LEN + LSHM_INLINE_MAX <= LSHM_WIRE_MAX,
               "inline message with tracking exceeds LSHM_WIRE_MAX");
_Static_assert(HDR_LEN + TRACKING_LEN + LSHM_MAX_DESCS * DESC_LEN <= LSHM_WIRE_MAX,
               "64 descriptors exceed LSHM_WIRE_MAX");

static int violation(const char **why, const char *reason)
{
    if (why != NULL)
        *why = reason;
    return -EPROTO;
}

/* What each control type carries; the spec allows no variation in any of it. */
static const struct ctrl_rule {
    uint32_t    payload;    /* exact bytes after the header, = hdr.size */
    unsigned    nfds;       /* exact fd count */
    const char *bad_size;
    const char *bad_len;
    const char *bad_fds;
} ctrl_rules[] = {
    [LSHM_WIRE_HELLO] = {
        sizeof(struct lshm_wire_hello), 0,
        "HELLO size field is not 32", "HELLO datagram is not 48 bytes",
        "fd on a message type that carries none",
    },
    [LSHM_WIRE_MMAP_MSG] = {
        sizeof(uint32_t), 1,
        "MMAP size field is not 4", "MMAP datagram is not 20 bytes",
        "MMAP control message without exactly one fd",
    },
    [LSHM_WIRE_SHM_ACK] = {
        0, 0,
        "SHM_ACK size field is not 0", "SHM_ACK datagram is not 16 bytes",
        "fd on a message type that carries none",
    },
    [LSHM_WIRE_BYE] = {
        0, 0,
        "BYE size field is not 0", "BYE datagram is not 16 bytes",
        "fd on a message type that carries none",
    },
    [LSHM_WIRE_RING] = {
        sizeof(uint32_t), 1,
        "RING size field is not 4", "RING datagram is not 20 bytes",
        "RING control message without exactly one fd",
    },
    [LSHM_WIRE_WAKE] = {
        0, 0,
        "WAKE size field is not 0", "WAKE datagram is not 16 bytes",
        "fd on a message type that carries none",
    },
};

/* The version 1 HELLO: its 24 bytes are this version's first 24. */
#define HELLO_V1_LEN  24u

/*
 * A version 1 peer gets an answer that says so, not a length violation: the
 * strict reading of "a HELLO of version 1 ... ends the port with an error
 * that names both versions".  Any other 24-byte HELLO is a violation.
 */
static int decode_hello_v1(const uint8_t *p, size_t len, struct lshm_wire_view *v,
                           const char **why)
{
    static __thread char text[128];
    uint16_t version;

    if (v->hdr.size != HELLO_V1_LEN || len != HDR_LEN + HELLO_V1_LEN)
        return 1;
    memcpy(&version, p + HDR_LEN + offsetof(struct lshm_wire_hello, version),
           sizeof(version));
    if (version == LSHM_PROTOCOL_VERSION)
        return 1;
    memcpy(&v->hello, p + HDR_LEN, HELLO_V1_LEN);
    snprintf(text, sizeof(text), "peer speaks protocol version %u, this side version %u",
             (unsigned)version, (unsigned)LSHM_PROTOCOL_VERSION);
    if (why != NULL)
        *why = text;
    return -EPROTONOSUPPORT;
}

static int decode_ctrl(const uint8_t *p, size_t len, unsigned nfds,
                       struct lshm_wire_view *v, const char **why)
{
    const struct lshm_wire_msg *h = &v->hdr;
    const struct ctrl_rule *r = &ctrl_rules[h->type];

    if (h->stream != 0)
        return violation(why, "control message with a nonzero stream");
    if (h->flags & (LSHM_WIRE_MMAP | LSHM_WIRE_TRACKING))
        return violation(why, "MMAP or TRACKING flag on a control message");
    if (h->flags != 0)
        return violation(why, "flags on a control message");
    if (h->type == LSHM_WIRE_HELLO) {
        int ret = decode_hello_v1(p, len, v, why);

        if (ret <= 0)
            return ret;
    }
    if (h->size != r->payload)
        return violation(why, r->bad_size);
    if (len != HDR_LEN + r->payload)
        return violation(why, r->bad_len);
    if (nfds != r->nfds)
        return violation(why, r->bad_fds);

    if (h->type == LSHM_WIRE_HELLO) {
        memcpy(&v->hello, p + HDR_LEN, sizeof(v->hello));
        /* A receiver ignores the bits it does not know. */
        v->hello.features &= LSHM_WIRE_FEATS;
    } else if (h->type == LSHM_WIRE_MMAP_MSG) {
        memcpy(&v->mmap_id, p + HDR_LEN, sizeof(v->mmap_id));
    } else if (h->type == LSHM_WIRE_RING) {
        memcpy(&v->ring_size, p + HDR_LEN, sizeof(v->ring_size));
    }
    return 0;
}

static int decode_descs(const uint8_t *p, size_t rest, struct lshm_wire_view *v,
                        const char **why)
{
    uint64_t sum = 0;
    size_t n;
    unsigned i;

    if (rest % DESC_LEN != 0)
        return violation(why, "descriptor bytes are not a multiple of 12");
    n = rest / DESC_LEN;
    if (n == 0)
        return violation(why, "MMAP message without descriptors");
    if (n > LSHM_MAX_DESCS)
        return violation(why, "more than 64 descriptors");
    v->ndesc = n;
    v->desc = p;

    /*
     * The sum goes first and in 64 bits, so that sizes which wrap a 32-bit
     * sum around to hdr.size are caught as what they are.
     */
    for (i = 0; i < n; i++) {
        struct lshm_wire_desc d = lshm__wire_desc_at(v, i);

        if (d.size == 0)
            return violation(why, "descriptor size 0");
        sum += d.size;
    }
    if (sum != v->hdr.size)
        return violation(why, "descriptor sizes do not sum to the message size");

    /*
     * Stateless half of the bounds check: a descriptor's chunks must lie in
     * one segment's data area whatever segment mmap_id turns out to name.
     * 64-bit arithmetic: chunk_id * 16384 + size can wrap 32 bits.
     */
    for (i = 0; i < n; i++) {
        struct lshm_wire_desc d = lshm__wire_desc_at(v, i);

        if (d.chunk_id >= LSHM_CHUNK_COUNT)
            return violation(why, "descriptor chunk_id out of range");
        if ((uint64_t)d.chunk_id * LSHM_CHUNK_SIZE + d.size > LSHM_DATA_SIZE)
            return violation(why, "descriptor runs past the data area");
    }
    return 0;
}

static int decode_user(const uint8_t *p, size_t len, unsigned nfds,
                       struct lshm_wire_view *v, const char **why)
{
    const struct lshm_wire_msg *h = &v->hdr;
    size_t off = HDR_LEN;

    if (nfds > 1)
        return violation(why, "more than one fd on a user message");

    if (h->flags & LSHM_WIRE_TRACKING) {
        if (len - off < TRACKING_LEN)
            return violation(why, "tracking truncated");
        memcpy(&v->tracking, p + off, TRACKING_LEN);
        /* It indexes tracking[LSHM_CHUNK_COUNT] in the sender's segment. */
        if (v->tracking.tracking_id >= LSHM_CHUNK_COUNT)
            return violation(why, "tracking_id out of range");
        v->has_tracking = true;
        off += TRACKING_LEN;
    }

    if (h->flags & LSHM_WIRE_MMAP)
        return decode_descs(p + off, len - off, v, why);

    if (h->size > LSHM_INLINE_MAX)
        return violation(why, "inline size over 16384");
    if (len - off != h->size)
        return violation(why, "inline length differs from the size field");
    v->payload = p + off;
    return 0;
}

int lshm__wire_decode(const void *buf, size_t len, unsigned nfds,
                     struct lshm_wire_view *v, const char **why)
{
    const uint8_t *p = buf;

    memset(v, 0, sizeof(*v));
    if (len < HDR_LEN)
        return violation(why, "datagram shorter than header");
    if (len > LSHM_WIRE_MAX)
        return violation(why, "datagram longer than LSHM_WIRE_MAX");
    memcpy(&v->hdr, p, HDR_LEN);

    if (v->hdr.flags & ~LSHM_WIRE_FLAGS)
        return violation(why, "unknown flag bit");
    if (v->hdr.type < ARRAY_SIZE(ctrl_rules))
        return decode_ctrl(p, len, nfds, v, why);
    if (v->hdr.type < LSHM_TYPE_USER_MIN)
        return violation(why, "reserved control type");
    return decode_user(p, len, nfds, v, why);
}

struct lshm_wire_desc lshm__wire_desc_at(const struct lshm_wire_view *v, unsigned i)
{
    struct lshm_wire_desc d;

    memcpy(&d, v->desc + (size_t)i * DESC_LEN, sizeof(d));
    return d;
}

static size_t put_hdr(uint8_t *p, uint32_t stream, int32_t pid, uint16_t port_id,
                      uint8_t type, uint8_t flags, uint32_t size)
{
    struct lshm_wire_msg h = {
        .stream = stream, .pid = pid, .port_id = port_id,
        .type = type, .flags = flags, .size = size,
    };

    memcpy(p, &h, sizeof(h));
    return sizeof(h);
}

size_t lshm__wire_encode_hello(void *out, int32_t pid, uint16_t port_id,
                              uint32_t max_segments, uint32_t features, uint32_t ring_size)
{
    struct lshm_wire_hello hello = {
        .magic = LSHM_MAGIC,
        .version = LSHM_PROTOCOL_VERSION,
        .port_id = port_id,
        .header_size = LSHM_HEADER_SIZE,
        .chunk_size = LSHM_CHUNK_SIZE,
        .chunk_count = LSHM_CHUNK_COUNT,
        .max_segments = max_segments,
        .features = features,
        .ring_size = ring_size,
    };
    uint8_t *p = out;
    size_t off = put_hdr(p, 0, pid, port_id, LSHM_WIRE_HELLO, 0, sizeof(hello));

    memcpy(p + off, &hello, sizeof(hello));
    return off + sizeof(hello);
}

size_t lshm__wire_encode_ctrl(void *out, uint8_t type, int32_t pid, uint16_t port_id,
                             uint32_t arg)
{
    uint8_t *p = out;
    size_t off;

    switch (type) {
    case LSHM_WIRE_MMAP_MSG:
    case LSHM_WIRE_RING:
        off = put_hdr(p, 0, pid, port_id, type, 0, sizeof(arg));
        memcpy(p + off, &arg, sizeof(arg));
        return off + sizeof(arg);
    case LSHM_WIRE_SHM_ACK:
    case LSHM_WIRE_BYE:
    case LSHM_WIRE_WAKE:
        return put_hdr(p, 0, pid, port_id, type, 0, 0);
    default:
        /* HELLO has its own encoder; anything else is not a control type. */
        return 0;
    }
}

size_t lshm__wire_encode_user(void *out, const struct lshm_wire_msg *hdr,
                             const struct lshm_wire_tracking *tracking,
                             const struct lshm_wire_desc *descs, unsigned ndesc,
                             const void *inline_data)
{
    uint8_t *p = out;
    uint8_t flags = hdr->flags & LSHM_WIRE_LAST;
    uint32_t size = hdr->size;
    size_t off;

    /* out holds LSHM_WIRE_MAX bytes: refuse what would not fit or not decode. */
    if (hdr->type < LSHM_TYPE_USER_MIN || ndesc > LSHM_MAX_DESCS)
        return 0;
    if (ndesc == 0 && (size > LSHM_INLINE_MAX || (size > 0 && inline_data == NULL)))
        return 0;
    if (ndesc > 0) {
        uint64_t sum = 0;

        for (unsigned i = 0; i < ndesc; i++)
            sum += descs[i].size;
        if (sum > UINT32_MAX)
            return 0;
        size = sum;
        flags |= LSHM_WIRE_MMAP;
    }
    if (tracking != NULL)
        flags |= LSHM_WIRE_TRACKING;

    off = put_hdr(p, hdr->stream, hdr->pid, hdr->port_id, hdr->type, flags, size);
    if (tracking != NULL) {
        memcpy(p + off, tracking, TRACKING_LEN);
        off += TRACKING_LEN;
    }
    if (ndesc > 0) {
        memcpy(p + off, descs, (size_t)ndesc * DESC_LEN);
        off += (size_t)ndesc * DESC_LEN;
    } else if (size > 0) {
        memcpy(p + off, inline_data, size);
        off += size;
    }
    return off;
}

int lshm__wire_check_hello(const struct lshm_wire_hello *h, const char **why)
{
    /* The numbers make the error actionable; one buffer per thread keeps it pure. */
    static __thread char text[160];

    if (h->magic != LSHM_MAGIC)
        return violation(why, "HELLO magic is not 0x4d48534c");
    if (h->version != LSHM_PROTOCOL_VERSION) {
        snprintf(text, sizeof(text), "protocol version %u, expected %u",
                 (unsigned)h->version, (unsigned)LSHM_PROTOCOL_VERSION);
        if (why != NULL)
            *why = text;
        return -EPROTONOSUPPORT;
    }
    if (h->header_size != LSHM_HEADER_SIZE || h->chunk_size != LSHM_CHUNK_SIZE ||
        h->chunk_count != LSHM_CHUNK_COUNT) {
        snprintf(text, sizeof(text),
                 "segment geometry mismatch: peer has header %u, %u chunks of %u; "
                 "expected header %u, %u chunks of %u",
                 h->header_size, h->chunk_count, h->chunk_size,
                 LSHM_HEADER_SIZE, LSHM_CHUNK_COUNT, LSHM_CHUNK_SIZE);
        return violation(why, text);
    }
    if (h->max_segments < 1)
        return violation(why, "HELLO max_segments is 0");
    if ((h->features & LSHM_WIRE_FEAT_FUTEX) && !(h->features & LSHM_WIRE_FEAT_RING))
        return violation(why, "HELLO sets FUTEX without RING");
    if (h->features & LSHM_WIRE_FEAT_RING) {
        if (!lshm__ring_size_is_valid(h->ring_size)) {
            snprintf(text, sizeof(text), "HELLO ring_size %u is not a power of two from "
                     "%u to %u", h->ring_size, LSHM_RING_SIZE_MIN, LSHM_RING_SIZE_MAX);
            return violation(why, text);
        }
    } else if (h->ring_size != 0) {
        return violation(why, "HELLO ring_size is not 0 without RING");
    }
    return 0;
}

int64_t lshm__wire_record_check(struct lshm_wire_record rec, uint64_t avail, uint64_t room,
                                const char **why)
{
    uint64_t span;

    switch (rec.kind) {
    case LSHM_REC_MSG:
        if (rec.len < HDR_LEN || rec.len > LSHM_WIRE_MAX)
            return violation(why, "MSG record length out of range");
        span = LSHM_REC_SPAN(rec.len);
        if (span > room)
            return violation(why, "record crosses the end of the ring");
        break;
    case LSHM_REC_FENCE:
        if (rec.len != 0)
            return violation(why, "FENCE record with a length");
        span = LSHM_REC_HDR;
        break;
    case LSHM_REC_SKIP:
        if (rec.len != 0)
            return violation(why, "SKIP record with a length");
        span = room;
        break;
    default:
        return violation(why, "unknown record kind");
    }
    if (span > avail)
        return violation(why, rec.kind == LSHM_REC_SKIP ? "SKIP record past tail"
                                                        : "record ends beyond tail");
    return (int64_t)span;
}

int lshm__wire_decode_record(const void *buf, size_t len, struct lshm_wire_view *v,
                             const char **why)
{
    int ret = lshm__wire_decode(buf, len, 0, v, why);

    if (ret == 0 && v->hdr.type < LSHM_TYPE_USER_MIN)
        return violation(why, "control message in a ring record");
    return ret;
}
