/*
 * The wire layer: encode, decode and validate protocol messages.  Pure
 * functions over bytes, no I/O, no shared memory: everything a peer sends
 * passes lshm__wire_decode() before anything else looks at it.
 */
#ifndef LSHM_WIRE_H
#define LSHM_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "internal.h"

#define LSHM_WIRE_LAST      0x01
#define LSHM_WIRE_MMAP      0x02
#define LSHM_WIRE_TRACKING  0x04
#define LSHM_WIRE_FLAGS     (LSHM_WIRE_LAST | LSHM_WIRE_MMAP | LSHM_WIRE_TRACKING)

enum {
    LSHM_WIRE_HELLO   = 0,
    LSHM_WIRE_MMAP_MSG = 1,
    LSHM_WIRE_SHM_ACK = 2,
    LSHM_WIRE_BYE     = 3,
    LSHM_WIRE_RING    = 4,      /* version 2 */
    LSHM_WIRE_WAKE    = 5,      /* version 2 */
};

/* HELLO features (version 2). */
#define LSHM_WIRE_FEAT_RING   0x1u
#define LSHM_WIRE_FEAT_FUTEX  0x2u
#define LSHM_WIRE_FEATS       (LSHM_WIRE_FEAT_RING | LSHM_WIRE_FEAT_FUTEX)

/* Ring records (version 2): kinds, and the 8-byte header before each. */
enum {
    LSHM_REC_MSG   = 0,
    LSHM_REC_FENCE = 1,
    LSHM_REC_SKIP  = 2,
};

struct lshm_wire_record {
    uint32_t len;
    uint32_t kind;
};

#define LSHM_REC_HDR   8u

/* A power of two from LSHM_RING_SIZE_MIN to LSHM_RING_SIZE_MAX. */
static inline bool lshm__ring_size_is_valid(uint32_t size)
{
    return size >= LSHM_RING_SIZE_MIN && size <= LSHM_RING_SIZE_MAX &&
           (size & (size - 1)) == 0;
}
/* Bytes a record of len payload bytes covers in the ring. */
#define LSHM_REC_SPAN(len)  (LSHM_REC_HDR + (((uint64_t)(len) + 7u) & ~(uint64_t)7u))

struct lshm_wire_msg {
    uint32_t stream;
    int32_t  pid;
    uint16_t port_id;
    uint8_t  type;
    uint8_t  flags;
    uint32_t size;
};

struct lshm_wire_tracking {
    uint32_t mmap_id;
    uint32_t tracking_id;
};

struct lshm_wire_desc {
    uint32_t mmap_id;
    uint32_t chunk_id;
    uint32_t size;
};

struct lshm_wire_hello {
    uint32_t magic;
    uint16_t version;
    uint16_t port_id;
    uint32_t header_size;
    uint32_t chunk_size;
    uint32_t chunk_count;
    uint32_t max_segments;
    uint32_t features;      /* LSHM_WIRE_FEAT_*; unknown bits cleared by the decoder */
    uint32_t ring_size;     /* with RING: largest ring accepted as consumer */
};

_Static_assert(sizeof(struct lshm_wire_msg) == 16, "header is 16 bytes");
_Static_assert(sizeof(struct lshm_wire_desc) == 12, "descriptor is 12 bytes");
_Static_assert(sizeof(struct lshm_wire_tracking) == 8, "tracking is 8 bytes");
_Static_assert(sizeof(struct lshm_wire_hello) == 32, "hello is 32 bytes");
_Static_assert(sizeof(struct lshm_wire_record) == LSHM_REC_HDR, "record header is 8 bytes");

/* A datagram that passed lshm__wire_decode(); points into the caller's bytes. */
struct lshm_wire_view {
    struct lshm_wire_msg        hdr;       /* copied out */
    bool                        has_tracking;
    struct lshm_wire_tracking   tracking;  /* copied out */
    unsigned int                ndesc;     /* MMAP: 1..64 */
    const uint8_t              *desc;      /* ndesc packed descriptors (unaligned) */
    const uint8_t              *payload;   /* inline bytes, hdr.size of them */
    struct lshm_wire_hello      hello;     /* HELLO only, copied out */
    uint32_t                    mmap_id;   /* MMAP control only */
    uint32_t                    ring_size; /* RING control only */
};

/*
 * Check one datagram of len bytes that came with nfds file descriptors
 * against the protocol, independent of any state: header length, type,
 * flags, descriptor count and sizes, payload length, fd count for the type,
 * and the stateless bounds (chunk_id < LSHM_CHUNK_COUNT, chunk_id * 16384 +
 * size inside the data area, tracking_id < LSHM_CHUNK_COUNT).  buf needs no
 * alignment.  Returns 0, or -EPROTO with a reason in *why (a static string;
 * why may be NULL).  A HELLO of version 1 (24 bytes of payload) gives
 * -EPROTONOSUPPORT with a text that names both versions.  v is zeroed first, so desc and payload are NULL unless
 * the message has them.  Left to the caller: the pid, mmap_ids mapped and in
 * range, the MMAP id sequence, HELLO's fields (lshm__wire_check_hello()).
 */
int lshm__wire_decode(const void *buf, size_t len, unsigned nfds,
                     struct lshm_wire_view *v, const char **why);

/* Read descriptor i (< v->ndesc) of a decoded MMAP message. */
struct lshm_wire_desc lshm__wire_desc_at(const struct lshm_wire_view *v, unsigned i);

/*
 * Encoders write into out (at least LSHM_WIRE_MAX bytes, any alignment) and
 * return the datagram length, or 0 when the arguments cannot form a valid
 * message (a caller's bug: nothing is written then).
 */
size_t lshm__wire_encode_hello(void *out, int32_t pid, uint16_t port_id,
                              uint32_t max_segments, uint32_t features, uint32_t ring_size);
/* MMAP, SHM_ACK, BYE, RING or WAKE (HELLO has its own encoder; any other
 * type: 0).  arg is the mmap_id of an MMAP, the ring_size of a RING. */
size_t lshm__wire_encode_ctrl(void *out, uint8_t type, int32_t pid, uint16_t port_id,
                             uint32_t arg);
/*
 * User message (hdr->type >= LSHM_TYPE_USER_MIN); tracking may be NULL;
 * descs NULL with ndesc 0 for inline.  Of hdr->flags only LAST is taken:
 * MMAP and TRACKING follow from ndesc and tracking, so they cannot disagree
 * with the body.  Inline: hdr->size bytes (<= LSHM_INLINE_MAX) of
 * inline_data.  MMAP: 1..LSHM_MAX_DESCS descriptors, and the size written
 * is their sum (hdr->size is ignored).
 */
size_t lshm__wire_encode_user(void *out, const struct lshm_wire_msg *hdr,
                             const struct lshm_wire_tracking *tracking,
                             const struct lshm_wire_desc *descs, unsigned ndesc,
                             const void *inline_data);

/*
 * Check a HELLO's fixed fields (magic, version, geometry, max_segments >= 1,
 * FUTEX only with RING, ring_size a power of two from LSHM_RING_SIZE_MIN to
 * LSHM_RING_SIZE_MAX with RING and 0 without):
 * 0, -EPROTONOSUPPORT for another protocol version, -EPROTO otherwise.  *why
 * may point at per-thread text, valid until the thread's next call.  The pid
 * against SCM_CREDENTIALS is the port layer's check.
 */
int lshm__wire_check_hello(const struct lshm_wire_hello *h, const char **why);


/*
 * Check a ring record's header, copied out of the ring at a position that
 * is a multiple of 8, against avail (bytes published from there to tail)
 * and room (bytes from there to the end of the ring): the kind is known, len
 * is in range for it, and the record ends at or before both.  Returns the
 * bytes the record covers (a SKIP: room), or -EPROTO with *why.
 */
int64_t lshm__wire_record_check(struct lshm_wire_record rec, uint64_t avail, uint64_t room,
                                const char **why);

/*
 * Decode the body of a MSG record, copied out of the ring: a datagram of
 * len bytes with no fd, which must be a user message.  Same rules and
 * returns as lshm__wire_decode(), plus -EPROTO for a control type.
 */
int lshm__wire_decode_record(const void *buf, size_t len, struct lshm_wire_view *v,
                             const char **why);

#endif
