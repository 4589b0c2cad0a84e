/*
 * The wire decoder on one datagram or ring record.  Input: one byte, the
 * fd count the datagram came with (low 2 bits) and the mode (bits 2-3),
 * then the bytes.  Mode 0: a datagram through lshm__wire_decode; mode 1:
 * the body of a MSG record through lshm__wire_decode_record; mode 2: a
 * record header (8 bytes), then avail and room (8 bytes each) through
 * lshm__wire_record_check.  What passes must keep every pointer of the view
 * inside the bytes and encode back to them; what fails must say why.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "wire.h"

#define CHECK(c)                                                                  \
    do {                                                                          \
        if (!(c)) {                                                               \
            fprintf(stderr, "fuzz_wire: %s:%d: %s\n", __FILE__, __LINE__, #c);    \
            abort();                                                              \
        }                                                                         \
    } while (0)

static bool inside(const uint8_t *buf, size_t len, const uint8_t *p, size_t n)
{
    return p >= buf && n <= len && (size_t)(p - buf) <= len - n;
}

static void check_user(const uint8_t *buf, size_t len, const struct lshm_wire_view *v)
{
    struct lshm_wire_desc descs[LSHM_MAX_DESCS];
    static uint8_t out[LSHM_WIRE_MAX];
    uint64_t sum = 0;
    size_t n;
    unsigned i;

    CHECK(v->hdr.type >= LSHM_TYPE_USER_MIN);
    if (v->ndesc > 0) {
        CHECK(v->ndesc <= LSHM_MAX_DESCS);
        CHECK(v->payload == NULL);
        CHECK(inside(buf, len, v->desc, (size_t)v->ndesc * sizeof(struct lshm_wire_desc)));
        for (i = 0; i < v->ndesc; i++) {
            descs[i] = lshm__wire_desc_at(v, i);
            CHECK(descs[i].size >= 1);
            CHECK(descs[i].chunk_id < LSHM_CHUNK_COUNT);
            CHECK((uint64_t)descs[i].chunk_id * LSHM_CHUNK_SIZE + descs[i].size <=
                  LSHM_DATA_SIZE);
            sum += descs[i].size;
        }
        CHECK(sum == v->hdr.size);
    } else {
        CHECK(v->hdr.size <= LSHM_INLINE_MAX);
        CHECK(v->hdr.size == 0 || inside(buf, len, v->payload, v->hdr.size));
    }
    if (v->has_tracking)
        CHECK(v->tracking.tracking_id < LSHM_CHUNK_COUNT);
    n = lshm__wire_encode_user(out, &v->hdr, v->has_tracking ? &v->tracking : NULL,
                               v->ndesc ? descs : NULL, v->ndesc, v->payload);
    CHECK(n == len);
    CHECK(memcmp(out, buf, len) == 0);
}

static void check_ctrl(const uint8_t *buf, size_t len, const struct lshm_wire_view *v)
{
    static uint8_t out[LSHM_WIRE_MAX];
    const char *why = NULL;
    size_t n;

    CHECK(v->hdr.stream == 0 && v->hdr.flags == 0);
    CHECK(v->ndesc == 0 && v->desc == NULL && !v->has_tracking);
    if (v->hdr.type == LSHM_WIRE_HELLO) {
        if (lshm__wire_check_hello(&v->hello, &why) < 0) {
            CHECK(why != NULL && why[0] != '\0');
            return;
        }
        CHECK((v->hello.features & ~LSHM_WIRE_FEATS) == 0);
        n = lshm__wire_encode_hello(out, v->hdr.pid, v->hdr.port_id, v->hello.max_segments,
                                    v->hello.features, v->hello.ring_size);
        CHECK(n == sizeof(struct lshm_wire_msg) + sizeof(struct lshm_wire_hello));
        /* The encoder writes its own port id into the payload; the decoder
         * drops unknown feature bits. */
        if (v->hdr.port_id == v->hello.port_id &&
            memcmp(buf + 40, &v->hello.features, 4) == 0) {
            CHECK(n == len);
            CHECK(memcmp(out, buf, len) == 0);
        }
        return;
    }
    CHECK(v->hdr.type < LSHM_TYPE_USER_MIN);
    /* A RING's ring_size is the port's to check (lshm__msgring_import). */
    n = lshm__wire_encode_ctrl(out, v->hdr.type, v->hdr.pid, v->hdr.port_id,
                               v->hdr.type == LSHM_WIRE_RING ? v->ring_size : v->mmap_id);
    CHECK(n == len);
    CHECK(memcmp(out, buf, len) == 0);
}

/* A record header against avail and room: a span that fits both, or why not. */
static void record_check(const uint8_t *data, size_t size)
{
    struct lshm_wire_record rec;
    uint64_t avail = 0, room = 0;
    const char *why = NULL;
    int64_t span;

    if (size < 8)
        return;
    memcpy(&rec, data, 8);
    memcpy(&avail, data + 8, size >= 16 ? 8 : 0);
    memcpy(&room, data + 16, size >= 24 ? 8 : 0);
    /* What the consumer passes: multiples of 8, room at least a header
     * (a record starts at a multiple of 8 inside the ring). */
    avail = avail % (LSHM_RING_SIZE_MAX / 8 + 1) * 8;
    room = (1 + room % (LSHM_RING_SIZE_MAX / 8)) * 8;
    span = lshm__wire_record_check(rec, avail, room, &why);
    if (span < 0) {
        CHECK(span == -EPROTO);
        CHECK(why != NULL && why[0] != '\0');
        return;
    }
    CHECK(span >= LSHM_REC_HDR && span % 8 == 0);
    CHECK((uint64_t)span <= avail && (uint64_t)span <= room);
    switch (rec.kind) {
    case LSHM_REC_MSG:
        CHECK(rec.len >= sizeof(struct lshm_wire_msg) && rec.len <= LSHM_WIRE_MAX);
        CHECK((uint64_t)span == LSHM_REC_SPAN(rec.len));
        break;
    case LSHM_REC_FENCE:
        CHECK(rec.len == 0 && span == LSHM_REC_HDR);
        break;
    case LSHM_REC_SKIP:
        CHECK(rec.len == 0 && (uint64_t)span == room);
        break;
    default:
        CHECK(!"an unknown kind passed");
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct lshm_wire_view v;
    const char *why = NULL;
    unsigned nfds;
    uint8_t *buf;
    size_t len;
    int ret;

    if (size < 1)
        return 0;
    if (((data[0] >> 2) & 3) >= 2) {
        record_check(data + 1, size - 1);
        return 0;
    }
    nfds = data[0] & 3;
    len = size - 1;
    /* An exact copy: a read past the datagram is a finding. */
    buf = malloc(len ? len : 1);
    CHECK(buf != NULL);
    memcpy(buf, data + 1, len);
    if (data[0] & 4) {
        nfds = 0;
        ret = lshm__wire_decode_record(buf, len, &v, &why);
        if (ret == 0)
            CHECK(v.hdr.type >= LSHM_TYPE_USER_MIN);
    } else {
        ret = lshm__wire_decode(buf, len, nfds, &v, &why);
    }
    if (ret < 0) {
        /* A version 1 HELLO has its own error. */
        CHECK(ret == -EPROTO || ret == -EPROTONOSUPPORT);
        CHECK(why != NULL && why[0] != '\0');
    } else {
        CHECK(ret == 0);
        CHECK(len >= sizeof(struct lshm_wire_msg) && len <= LSHM_WIRE_MAX);
        if (v.hdr.type >= LSHM_TYPE_USER_MIN) {
            CHECK(nfds <= 1);
            check_user(buf, len, &v);
        } else {
            CHECK(nfds == (v.hdr.type == LSHM_WIRE_MMAP_MSG || v.hdr.type == LSHM_WIRE_RING ? 1u : 0u));
            check_ctrl(buf, len, &v);
        }
    }
    free(buf);
    return 0;
}
