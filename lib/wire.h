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
};

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
};

_Static_assert(sizeof(struct lshm_wire_msg) == 16, "header is 16 bytes");
_Static_assert(sizeof(struct lshm_wire_desc) == 12, "descriptor is 12 bytes");
_Static_assert(sizeof(struct lshm_wire_tracking) == 8, "tracking is 8 bytes");
_Static_assert(sizeof(struct lshm_wire_hello) == 24, "hello is 24 bytes");

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
};

/*
 * Check one datagram of len bytes that came with nfds file descriptors
 * against the protocol, independent of any state: header length, type,
 * flags, descriptor count and sizes, payload length, fd count for the type,
 * and the stateless bounds (chunk_id < LSHM_CHUNK_COUNT, chunk_id * 16384 +
 * size inside the data area, tracking_id < LSHM_CHUNK_COUNT).  buf needs no
 * alignment.  Returns 0, or -EPROTO with a reason in *why (a static string;
 * why may be NULL).  v is zeroed first, so desc and payload are NULL unless
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
                              uint32_t max_segments);
/* MMAP, SHM_ACK or BYE (HELLO has its own encoder; any other type: 0). */
size_t lshm__wire_encode_ctrl(void *out, uint8_t type, int32_t pid, uint16_t port_id,
                             uint32_t mmap_id /* MMAP only */);
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
 * Check a HELLO's fixed fields (magic, version, geometry, max_segments >= 1):
 * 0, -EPROTONOSUPPORT for another protocol version, -EPROTO otherwise.  *why
 * may point at per-thread text, valid until the thread's next call.  The pid
 * against SCM_CREDENTIALS is the port layer's check.
 */
int lshm__wire_check_hello(const struct lshm_wire_hello *h, const char **why);

#endif
