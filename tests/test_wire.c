/*
 * The wire layer: every encoder round-trips through the decoder, every rule
 * of linuxshm-protocol(7) that the decoder enforces has a test of its own
 * that breaks only that rule (and checks the reason given, so that the test
 * proves the rule it names rather than some other one), the edges of each
 * limit are accepted, and random and mutated datagrams never crash it nor
 * get through with a broken invariant.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "pattern.h"
#include "wire.h"

/* Offsets of the header fields in a datagram. */
#define OFF_STREAM  0
#define OFF_PID     4
#define OFF_PORT    8
#define OFF_TYPE    10
#define OFF_FLAGS   11
#define OFF_SIZE    12
#define HDR         16u
#define TRK         8u
#define DESC        12u

#define BUFSZ       (LSHM_WIRE_MAX + 64)

static void put32(uint8_t *b, size_t off, uint32_t v)
{
    memcpy(b + off, &v, sizeof(v));
}

static uint32_t get32(const uint8_t *b, size_t off)
{
    uint32_t v;

    memcpy(&v, b + off, sizeof(v));
    return v;
}

static void put_desc(uint8_t *b, size_t off, uint32_t mmap_id, uint32_t chunk_id,
                     uint32_t size)
{
    put32(b, off, mmap_id);
    put32(b, off + 4, chunk_id);
    put32(b, off + 8, size);
}

static struct lshm_wire_msg user_hdr(uint8_t type, uint32_t stream, uint32_t size)
{
    return (struct lshm_wire_msg){
        .stream = stream, .pid = 4242, .port_id = 7, .type = type, .size = size,
    };
}

/* An inline user message of size bytes (pattern 99, as its stream), optional
 * tracking. */
static size_t mk_inline(uint8_t *b, uint32_t size, const struct lshm_wire_tracking *t)
{
    static uint8_t data[LSHM_INLINE_MAX];
    struct lshm_wire_msg h = user_hdr(16, 99, size);

    pattern_write(data, 0, size, 99);
    return lshm__wire_encode_user(b, &h, t, NULL, 0, data);
}

/* A user MMAP message with n valid descriptors, optional tracking. */
static size_t mk_descs(uint8_t *b, unsigned n, const struct lshm_wire_tracking *t)
{
    struct lshm_wire_desc d[LSHM_MAX_DESCS + 1];
    struct lshm_wire_msg h = user_hdr(17, 5, 0);

    for (unsigned i = 0; i < n; i++)
        d[i] = (struct lshm_wire_desc){ .mmap_id = i % 3, .chunk_id = i * 2, .size = 100 + i };
    return lshm__wire_encode_user(b, &h, t, d, n, NULL);
}

static void decode_ok(const uint8_t *b, size_t len, unsigned nfds, struct lshm_wire_view *v)
{
    const char *why = NULL;
    int ret = lshm__wire_decode(b, len, nfds, v, &why);

    cr_assert_eq(ret, 0, "rejected (%d): %s", ret, why ? why : "(no reason)");
}

static void expect_reject(const uint8_t *b, size_t len, unsigned nfds, const char *reason)
{
    struct lshm_wire_view v;
    const char *why = NULL;
    int ret = lshm__wire_decode(b, len, nfds, &v, &why);

    cr_assert_eq(ret, -EPROTO, "expected -EPROTO (%s), got %d", reason, ret);
    cr_assert_not_null(why);
    cr_assert_str_eq(why, reason);
    /* A NULL why must be accepted on the same failure. */
    cr_assert_eq(lshm__wire_decode(b, len, nfds, &v, NULL), -EPROTO);
}

/* ---------------------------------------------------------------- round trips */

LTEST(wire, hello_roundtrip)
{
    uint8_t b[BUFSZ];
    struct lshm_wire_view v;
    const char *why = NULL;
    size_t len = lshm__wire_encode_hello(b, 1234, 9, 32, LSHM_WIRE_FEATS, 1u << 18);

    cr_assert_eq(len, HDR + 32);
    decode_ok(b, len, 0, &v);
    cr_assert_eq(v.hdr.type, LSHM_WIRE_HELLO);
    cr_assert_eq(v.hdr.pid, 1234);
    cr_assert_eq(v.hdr.port_id, 9);
    cr_assert_eq(v.hdr.stream, 0);
    cr_assert_eq(v.hdr.flags, 0);
    cr_assert_eq(v.hdr.size, 32);
    cr_assert_eq(v.hello.magic, LSHM_MAGIC);
    cr_assert_eq(v.hello.version, 2);
    cr_assert_eq(v.hello.features, LSHM_WIRE_FEAT_RING | LSHM_WIRE_FEAT_FUTEX);
    cr_assert_eq(v.hello.ring_size, 262144);
    cr_assert_eq(v.hello.port_id, 9);
    cr_assert_eq(v.hello.header_size, 4096);
    cr_assert_eq(v.hello.chunk_size, 16384);
    cr_assert_eq(v.hello.chunk_count, 640);
    cr_assert_eq(v.hello.max_segments, 32);
    cr_assert_eq(lshm__wire_check_hello(&v.hello, &why), 0, "%s", why);
    /* The spec's byte layout, not just our struct's. */
    cr_assert_eq(get32(b, 16), 0x4d48534c);
    cr_assert_eq(b[20] | b[21] << 8, 2);
    cr_assert_eq(get32(b, 36), 32);
    cr_assert_eq(get32(b, 40), 3);
    cr_assert_eq(get32(b, 44), 262144);
}

LTEST(wire, hello_unknown_feature_bits_are_ignored)
{
    uint8_t b[BUFSZ];
    struct lshm_wire_view v;
    const char *why = NULL;
    size_t len = lshm__wire_encode_hello(b, 1, 2, 3, 0xfffffff0u | LSHM_WIRE_FEAT_RING, 65536);

    decode_ok(b, len, 0, &v);
    cr_assert_eq(v.hello.features, LSHM_WIRE_FEAT_RING);
    cr_assert_eq(lshm__wire_check_hello(&v.hello, &why), 0, "%s", why);
}

LTEST(wire, version_1_hello_names_both_versions)
{
    uint8_t b[BUFSZ];
    struct lshm_wire_view v;
    const char *why = NULL;
    size_t len = lshm__wire_encode_hello(b, 1, 2, 3, 0, 0);

    /* What a 1.0 library sends: 24 bytes of payload, version 1. */
    put32(b, OFF_SIZE, 24);
    b[HDR + 4] = 1;
    b[HDR + 5] = 0;
    len = HDR + 24;
    cr_assert_eq(lshm__wire_decode(b, len, 0, &v, &why), -EPROTONOSUPPORT);
    cr_assert_str_eq(why, "peer speaks protocol version 1, this side version 2");
    cr_assert_eq(lshm__wire_decode(b, len, 0, &v, NULL), -EPROTONOSUPPORT);
    /* With the wrong length for it, a plain violation. */
    cr_assert_eq(lshm__wire_decode(b, len + 1, 0, &v, &why), -EPROTO);
}

LTEST(wire, ring_and_wake_roundtrip)
{
    uint8_t b[BUFSZ];
    struct lshm_wire_view v;
    size_t len = lshm__wire_encode_ctrl(b, LSHM_WIRE_RING, 77, 3, 1u << 20);

    cr_assert_eq(len, HDR + 4);
    decode_ok(b, len, 1, &v);
    cr_assert_eq(v.hdr.type, LSHM_WIRE_RING);
    cr_assert_eq(v.ring_size, 1u << 20);
    cr_assert_eq(get32(b, 16), 1u << 20);
    expect_reject(b, len, 0, "RING control message without exactly one fd");
    expect_reject(b, len, 2, "RING control message without exactly one fd");
    expect_reject(b, len - 1, 1, "RING datagram is not 20 bytes");
    put32(b, OFF_SIZE, 8);
    expect_reject(b, len, 1, "RING size field is not 4");

    len = lshm__wire_encode_ctrl(b, LSHM_WIRE_WAKE, 77, 3, 0);
    cr_assert_eq(len, HDR);
    decode_ok(b, len, 0, &v);
    cr_assert_eq(v.hdr.type, LSHM_WIRE_WAKE);
    expect_reject(b, len, 1, "fd on a message type that carries none");
    expect_reject(b, len + 4, 0, "WAKE datagram is not 16 bytes");
    b[OFF_FLAGS] = LSHM_WIRE_LAST;
    expect_reject(b, len, 0, "flags on a control message");
}

static int64_t rec_check(uint32_t len, uint32_t kind, uint64_t avail, uint64_t room,
                         const char **why)
{
    struct lshm_wire_record r = { .len = len, .kind = kind };

    *why = NULL;
    return lshm__wire_record_check(r, avail, room, why);
}

LTEST(wire, ring_records_are_checked)
{
    const char *why;

    cr_assert_eq(rec_check(16, LSHM_REC_MSG, 24, 65536, &why), 24);
    cr_assert_eq(rec_check(17, LSHM_REC_MSG, 4096, 65536, &why), 32);
    cr_assert_eq(rec_check(LSHM_WIRE_MAX, LSHM_REC_MSG, 65536, 65536, &why),
                 8 + LSHM_WIRE_MAX);
    cr_assert_eq(rec_check(0, LSHM_REC_FENCE, 8, 8, &why), 8);
    cr_assert_eq(rec_check(0, LSHM_REC_SKIP, 4096, 48, &why), 48);

    cr_assert_eq(rec_check(15, LSHM_REC_MSG, 4096, 65536, &why), -EPROTO);
    cr_assert_str_eq(why, "MSG record length out of range");
    cr_assert_eq(rec_check(LSHM_WIRE_MAX + 1, LSHM_REC_MSG, 1u << 20, 1u << 20, &why), -EPROTO);
    cr_assert_str_eq(why, "MSG record length out of range");
    cr_assert_eq(rec_check(100, LSHM_REC_MSG, 4096, 104, &why), -EPROTO);
    cr_assert_str_eq(why, "record crosses the end of the ring");
    cr_assert_eq(rec_check(100, LSHM_REC_MSG, 104, 4096, &why), -EPROTO);
    cr_assert_str_eq(why, "record ends beyond tail");
    cr_assert_eq(rec_check(1, LSHM_REC_FENCE, 4096, 4096, &why), -EPROTO);
    cr_assert_str_eq(why, "FENCE record with a length");
    cr_assert_eq(rec_check(8, LSHM_REC_SKIP, 4096, 4096, &why), -EPROTO);
    cr_assert_str_eq(why, "SKIP record with a length");
    cr_assert_eq(rec_check(0, LSHM_REC_SKIP, 40, 48, &why), -EPROTO);
    cr_assert_str_eq(why, "SKIP record past tail");
    for (uint32_t kind = 3; kind < 40; kind += 7) {
        cr_assert_eq(rec_check(16, kind, 4096, 4096, &why), -EPROTO);
        cr_assert_str_eq(why, "unknown record kind");
    }
    cr_assert_eq(rec_check(16, 0xffffffffu, 4096, 4096, &why), -EPROTO);
}

LTEST(wire, ring_record_body_must_be_a_user_message)
{
    uint8_t b[BUFSZ];
    struct lshm_wire_view v;
    const char *why = NULL;
    size_t len = lshm__wire_encode_ctrl(b, LSHM_WIRE_SHM_ACK, 1, 1, 0);

    cr_assert_eq(lshm__wire_decode_record(b, len, &v, &why), -EPROTO);
    cr_assert_str_eq(why, "control message in a ring record");
    len = lshm__wire_encode_ctrl(b, LSHM_WIRE_BYE, 1, 1, 0);
    cr_assert_eq(lshm__wire_decode_record(b, len, &v, &why), -EPROTO);
    len = mk_inline(b, 3, NULL);
    cr_assert_eq(lshm__wire_decode_record(b, len, &v, &why), 0, "%s", why);
    cr_assert_geq(v.hdr.type, LSHM_TYPE_USER_MIN);
    /* Every datagram rule holds in a record too. */
    b[OFF_FLAGS] = 0x80;
    cr_assert_eq(lshm__wire_decode_record(b, len, &v, &why), -EPROTO);
    cr_assert_str_eq(why, "unknown flag bit");
}

LTEST(wire, mmap_ctrl_roundtrip)
{
    uint8_t b[BUFSZ];
    struct lshm_wire_view v;
    size_t len = lshm__wire_encode_ctrl(b, LSHM_WIRE_MMAP_MSG, 77, 3, 5);

    cr_assert_eq(len, HDR + 4);
    decode_ok(b, len, 1, &v);
    cr_assert_eq(v.hdr.type, LSHM_WIRE_MMAP_MSG);
    cr_assert_eq(v.hdr.pid, 77);
    cr_assert_eq(v.hdr.port_id, 3);
    cr_assert_eq(v.hdr.size, 4);
    cr_assert_eq(v.mmap_id, 5);
}

LTEST(wire, shm_ack_and_bye_roundtrip)
{
    uint8_t b[BUFSZ];
    struct lshm_wire_view v;
    const uint8_t types[] = { LSHM_WIRE_SHM_ACK, LSHM_WIRE_BYE };

    for (size_t i = 0; i < sizeof(types); i++) {
        size_t len = lshm__wire_encode_ctrl(b, types[i], 88, 4, 123);

        cr_assert_eq(len, HDR);
        decode_ok(b, len, 0, &v);
        cr_assert_eq(v.hdr.type, types[i]);
        cr_assert_eq(v.hdr.pid, 88);
        cr_assert_eq(v.hdr.size, 0);
    }
}

LTEST(wire, encode_ctrl_refuses_non_control_types)
{
    uint8_t b[BUFSZ];

    cr_assert_eq(lshm__wire_encode_ctrl(b, LSHM_WIRE_HELLO, 1, 1, 0), 0);
    cr_assert_eq(lshm__wire_encode_ctrl(b, 6, 1, 1, 0), 0);
    cr_assert_eq(lshm__wire_encode_ctrl(b, 16, 1, 1, 0), 0);
}

LTEST(wire, user_inline_roundtrip)
{
    uint8_t b[BUFSZ];
    struct lshm_wire_view v;
    const char text[] = "hello, peer";
    struct lshm_wire_msg h = user_hdr(200, 31337, sizeof(text));
    size_t len;

    h.flags = LSHM_WIRE_LAST;
    len = lshm__wire_encode_user(b, &h, NULL, NULL, 0, text);
    cr_assert_eq(len, HDR + sizeof(text));
    decode_ok(b, len, 0, &v);
    cr_assert_eq(v.hdr.type, 200);
    cr_assert_eq(v.hdr.stream, 31337);
    cr_assert_eq(v.hdr.pid, 4242);
    cr_assert_eq(v.hdr.port_id, 7);
    cr_assert_eq(v.hdr.flags, LSHM_WIRE_LAST);
    cr_assert_eq(v.hdr.size, sizeof(text));
    cr_assert_not(v.has_tracking);
    cr_assert_eq(v.ndesc, 0);
    cr_assert_null(v.desc);
    cr_assert_eq(v.payload, b + HDR);
    cr_assert_eq(memcmp(v.payload, text, sizeof(text)), 0);
}

LTEST(wire, user_inline_empty)
{
    uint8_t b[BUFSZ];
    struct lshm_wire_view v;
    size_t len = mk_inline(b, 0, NULL);

    cr_assert_eq(len, HDR);
    decode_ok(b, len, 0, &v);
    cr_assert_eq(v.hdr.size, 0);
    cr_assert_not_null(v.payload);
}

LTEST(wire, user_inline_with_tracking)
{
    uint8_t b[BUFSZ];
    struct lshm_wire_view v;
    struct lshm_wire_tracking t = { .mmap_id = 3, .tracking_id = 17 };
    size_t len = mk_inline(b, 100, &t);

    cr_assert_eq(len, HDR + TRK + 100);
    decode_ok(b, len, 0, &v);
    cr_assert_eq(v.hdr.flags, LSHM_WIRE_TRACKING);
    cr_assert(v.has_tracking);
    cr_assert_eq(v.tracking.mmap_id, 3);
    cr_assert_eq(v.tracking.tracking_id, 17);
    cr_assert_eq(v.payload, b + HDR + TRK);
    cr_assert_eq(v.payload[99], pattern_byte(99, 99));
}

LTEST(wire, user_mmap_roundtrip)
{
    uint8_t b[BUFSZ];
    struct lshm_wire_view v;
    struct lshm_wire_tracking t = { .mmap_id = 1, .tracking_id = 639 };
    struct lshm_wire_desc d[3] = {
        { 0, 0, 16384 * 3 }, { 1, 5, 1 }, { 2, 600, 16384 * 40 },
    };
    struct lshm_wire_msg h = user_hdr(16, 8, 0);
    size_t len;

    h.flags = LSHM_WIRE_LAST;
    len = lshm__wire_encode_user(b, &h, &t, d, 3, NULL);
    cr_assert_eq(len, HDR + TRK + 3 * DESC);
    decode_ok(b, len, 1, &v);
    cr_assert_eq(v.hdr.flags, LSHM_WIRE_LAST | LSHM_WIRE_MMAP | LSHM_WIRE_TRACKING);
    cr_assert_eq(v.hdr.size, 16384 * 43 + 1, "encoder writes the sum");
    cr_assert(v.has_tracking);
    cr_assert_eq(v.tracking.tracking_id, 639);
    cr_assert_eq(v.ndesc, 3);
    cr_assert_eq(v.desc, b + HDR + TRK);
    cr_assert_null(v.payload);
    for (unsigned i = 0; i < 3; i++) {
        struct lshm_wire_desc got = lshm__wire_desc_at(&v, i);

        cr_assert_eq(got.mmap_id, d[i].mmap_id);
        cr_assert_eq(got.chunk_id, d[i].chunk_id);
        cr_assert_eq(got.size, d[i].size);
    }
}

/* The receive buffer promises no alignment; neither does the send buffer. */
LTEST(wire, unaligned_buffers)
{
    uint8_t raw[BUFSZ + 8];
    struct lshm_wire_view v;

    for (size_t shift = 1; shift < 8; shift++) {
        uint8_t *b = raw + shift;
        size_t len = mk_descs(b, 7, &(struct lshm_wire_tracking){ 1, 2 });

        decode_ok(b, len, 0, &v);
        cr_assert_eq(v.ndesc, 7);
        cr_assert_eq(lshm__wire_desc_at(&v, 6).chunk_id, 12);
        cr_assert_eq(lshm__wire_desc_at(&v, 6).size, 106);
        len = lshm__wire_encode_hello(b, 1, 2, 3, 0, 0);
        decode_ok(b, len, 0, &v);
        cr_assert_eq(v.hello.max_segments, 3);
    }
}

LTEST(wire, encode_user_derives_flags_from_body)
{
    uint8_t b[BUFSZ];
    struct lshm_wire_view v;
    struct lshm_wire_msg h = user_hdr(16, 1, 2);
    size_t len;

    /* MMAP, TRACKING and unknown bits in hdr->flags must not reach the wire. */
    h.flags = 0xff;
    len = lshm__wire_encode_user(b, &h, NULL, NULL, 0, "ab");
    decode_ok(b, len, 0, &v);
    cr_assert_eq(v.hdr.flags, LSHM_WIRE_LAST);
    cr_assert_eq(v.payload[1], 'b');
}

LTEST(wire, encode_user_refuses_invalid)
{
    uint8_t b[BUFSZ];
    static uint8_t big[LSHM_INLINE_MAX + 1];
    struct lshm_wire_desc d[LSHM_MAX_DESCS + 1] = { { 0, 0, 1 } };
    struct lshm_wire_msg h = user_hdr(15, 1, 0);

    cr_assert_eq(lshm__wire_encode_user(b, &h, NULL, NULL, 0, NULL), 0, "control type");
    h = user_hdr(16, 1, LSHM_INLINE_MAX + 1);
    cr_assert_eq(lshm__wire_encode_user(b, &h, NULL, NULL, 0, big), 0, "inline too big");
    h = user_hdr(16, 1, 1);
    cr_assert_eq(lshm__wire_encode_user(b, &h, NULL, NULL, 0, NULL), 0, "no inline data");
    for (unsigned i = 0; i < LSHM_MAX_DESCS + 1; i++)
        d[i] = (struct lshm_wire_desc){ 0, i, 1 };
    cr_assert_eq(lshm__wire_encode_user(b, &h, NULL, d, LSHM_MAX_DESCS + 1, NULL), 0,
                 "65 descriptors");
}

/* ------------------------------------------------------------- rejections */

LTEST(wire, reject_short_header)
{
    uint8_t b[BUFSZ];
    size_t len = mk_inline(b, 0, NULL);

    cr_assert_eq(len, HDR);
    for (size_t l = 0; l < HDR; l++)
        expect_reject(b, l, 0, "datagram shorter than header");
    expect_reject(NULL, 0, 0, "datagram shorter than header");
}

LTEST(wire, reject_too_long)
{
    uint8_t b[BUFSZ] = { 0 };

    mk_inline(b, LSHM_WIRE_MAX + 1 - HDR - 64, NULL);
    put32(b, OFF_SIZE, LSHM_WIRE_MAX + 1 - HDR);
    expect_reject(b, LSHM_WIRE_MAX + 1, 0, "datagram longer than LSHM_WIRE_MAX");
    expect_reject(b, BUFSZ, 0, "datagram longer than LSHM_WIRE_MAX");
}

/* LSHM_WIRE_MAX itself passes the length check (and fails on what it holds). */
LTEST(wire, wire_max_is_inclusive)
{
    uint8_t b[BUFSZ] = { 0 };

    mk_inline(b, 0, NULL);
    expect_reject(b, LSHM_WIRE_MAX, 0, "inline length differs from the size field");
}

LTEST(wire, reject_unknown_flag_bits)
{
    uint8_t b[BUFSZ];

    for (unsigned bit = 3; bit < 8; bit++) {
        size_t len = mk_inline(b, 4, NULL);

        b[OFF_FLAGS] |= 1u << bit;
        expect_reject(b, len, 0, "unknown flag bit");
        /* On a control message too: the flag check comes first. */
        len = lshm__wire_encode_ctrl(b, LSHM_WIRE_BYE, 1, 1, 0);
        b[OFF_FLAGS] = 1u << bit;
        expect_reject(b, len, 0, "unknown flag bit");
    }
}

LTEST(wire, reject_reserved_control_types)
{
    uint8_t b[BUFSZ];

    for (unsigned type = 6; type < 16; type++) {
        size_t len = lshm__wire_encode_ctrl(b, LSHM_WIRE_BYE, 1, 1, 0);

        b[OFF_TYPE] = type;
        expect_reject(b, len, 0, "reserved control type");
        /* Shaped like a user message, still reserved. */
        len = mk_inline(b, 3, NULL);
        b[OFF_TYPE] = type;
        expect_reject(b, len, 0, "reserved control type");
    }
}

LTEST(wire, reject_control_with_stream)
{
    uint8_t b[BUFSZ];
    size_t len;

    len = lshm__wire_encode_hello(b, 1, 1, 1, 0, 0);
    put32(b, OFF_STREAM, 1);
    expect_reject(b, len, 0, "control message with a nonzero stream");
    len = lshm__wire_encode_ctrl(b, LSHM_WIRE_MMAP_MSG, 1, 1, 0);
    put32(b, OFF_STREAM, 0x80000000u);
    expect_reject(b, len, 1, "control message with a nonzero stream");
    len = lshm__wire_encode_ctrl(b, LSHM_WIRE_SHM_ACK, 1, 1, 0);
    put32(b, OFF_STREAM, 5);
    expect_reject(b, len, 0, "control message with a nonzero stream");
}

LTEST(wire, reject_control_with_last_flag)
{
    uint8_t b[BUFSZ];
    size_t len = lshm__wire_encode_ctrl(b, LSHM_WIRE_BYE, 1, 1, 0);

    b[OFF_FLAGS] = LSHM_WIRE_LAST;
    expect_reject(b, len, 0, "flags on a control message");
    len = lshm__wire_encode_hello(b, 1, 1, 1, 0, 0);
    b[OFF_FLAGS] = LSHM_WIRE_LAST;
    expect_reject(b, len, 0, "flags on a control message");
}

LTEST(wire, reject_control_with_mmap_flag)
{
    uint8_t b[BUFSZ];
    size_t len = lshm__wire_encode_ctrl(b, LSHM_WIRE_MMAP_MSG, 1, 1, 0);

    b[OFF_FLAGS] = LSHM_WIRE_MMAP;
    expect_reject(b, len, 1, "MMAP or TRACKING flag on a control message");
    len = lshm__wire_encode_ctrl(b, LSHM_WIRE_SHM_ACK, 1, 1, 0);
    b[OFF_FLAGS] = LSHM_WIRE_MMAP | LSHM_WIRE_LAST;
    expect_reject(b, len, 0, "MMAP or TRACKING flag on a control message");
}

LTEST(wire, reject_control_with_tracking_flag)
{
    uint8_t b[BUFSZ];
    size_t len = lshm__wire_encode_hello(b, 1, 1, 1, 0, 0);

    b[OFF_FLAGS] = LSHM_WIRE_TRACKING;
    expect_reject(b, len, 0, "MMAP or TRACKING flag on a control message");
}

LTEST(wire, reject_hello_size_field)
{
    uint8_t b[BUFSZ];
    size_t len = lshm__wire_encode_hello(b, 1, 1, 1, 0, 0);

    put32(b, OFF_SIZE, 31);
    expect_reject(b, len, 0, "HELLO size field is not 32");
    put32(b, OFF_SIZE, 33);
    expect_reject(b, len, 0, "HELLO size field is not 32");
    /* 24, the size of version 1's, with this version in it. */
    put32(b, OFF_SIZE, 24);
    expect_reject(b, HDR + 24, 0, "HELLO size field is not 32");
}

LTEST(wire, reject_hello_length)
{
    uint8_t b[BUFSZ];
    size_t len = lshm__wire_encode_hello(b, 1, 1, 1, 0, 0);

    expect_reject(b, len - 1, 0, "HELLO datagram is not 48 bytes");
    expect_reject(b, len + 1, 0, "HELLO datagram is not 48 bytes");
    expect_reject(b, HDR, 0, "HELLO datagram is not 48 bytes");
}

LTEST(wire, reject_hello_with_fd)
{
    uint8_t b[BUFSZ];
    size_t len = lshm__wire_encode_hello(b, 1, 1, 1, 0, 0);

    expect_reject(b, len, 1, "fd on a message type that carries none");
}

LTEST(wire, reject_mmap_ctrl_without_fd)
{
    uint8_t b[BUFSZ];
    size_t len = lshm__wire_encode_ctrl(b, LSHM_WIRE_MMAP_MSG, 1, 1, 0);

    expect_reject(b, len, 0, "MMAP control message without exactly one fd");
}

LTEST(wire, reject_mmap_ctrl_with_two_fds)
{
    uint8_t b[BUFSZ];
    size_t len = lshm__wire_encode_ctrl(b, LSHM_WIRE_MMAP_MSG, 1, 1, 0);

    expect_reject(b, len, 2, "MMAP control message without exactly one fd");
    expect_reject(b, len, 253, "MMAP control message without exactly one fd");
}

LTEST(wire, reject_mmap_ctrl_size_field)
{
    uint8_t b[BUFSZ];
    size_t len = lshm__wire_encode_ctrl(b, LSHM_WIRE_MMAP_MSG, 1, 1, 0);

    put32(b, OFF_SIZE, 0);
    expect_reject(b, len, 1, "MMAP size field is not 4");
    put32(b, OFF_SIZE, 8);
    expect_reject(b, len, 1, "MMAP size field is not 4");
}

LTEST(wire, reject_mmap_ctrl_length)
{
    uint8_t b[BUFSZ];
    size_t len = lshm__wire_encode_ctrl(b, LSHM_WIRE_MMAP_MSG, 1, 1, 0);

    expect_reject(b, len - 1, 1, "MMAP datagram is not 20 bytes");
    expect_reject(b, len + 4, 1, "MMAP datagram is not 20 bytes");
}

LTEST(wire, reject_shm_ack_and_bye_with_payload)
{
    uint8_t b[BUFSZ];
    size_t len;

    len = lshm__wire_encode_ctrl(b, LSHM_WIRE_SHM_ACK, 1, 1, 0);
    expect_reject(b, len + 1, 0, "SHM_ACK datagram is not 16 bytes");
    put32(b, OFF_SIZE, 4);
    expect_reject(b, len + 4, 0, "SHM_ACK size field is not 0");
    len = lshm__wire_encode_ctrl(b, LSHM_WIRE_BYE, 1, 1, 0);
    expect_reject(b, len + 4, 0, "BYE datagram is not 16 bytes");
    put32(b, OFF_SIZE, 1);
    expect_reject(b, len, 0, "BYE size field is not 0");
}

LTEST(wire, reject_shm_ack_and_bye_with_fd)
{
    uint8_t b[BUFSZ];
    size_t len;

    len = lshm__wire_encode_ctrl(b, LSHM_WIRE_SHM_ACK, 1, 1, 0);
    expect_reject(b, len, 1, "fd on a message type that carries none");
    len = lshm__wire_encode_ctrl(b, LSHM_WIRE_BYE, 1, 1, 0);
    expect_reject(b, len, 1, "fd on a message type that carries none");
}

LTEST(wire, reject_user_with_two_fds)
{
    uint8_t b[BUFSZ];
    size_t len = mk_inline(b, 10, NULL);

    expect_reject(b, len, 2, "more than one fd on a user message");
    len = mk_descs(b, 2, NULL);
    expect_reject(b, len, 2, "more than one fd on a user message");
}

LTEST(wire, reject_descriptor_bytes_not_dividing)
{
    uint8_t b[BUFSZ];

    for (size_t extra = 1; extra < DESC; extra++) {
        size_t len = mk_descs(b, 2, NULL);

        memset(b + len, 0, extra);
        expect_reject(b, len + extra, 0, "descriptor bytes are not a multiple of 12");
        expect_reject(b, len - extra, 0, "descriptor bytes are not a multiple of 12");
    }
    /* With tracking the 8 tracking bytes are not counted as descriptor bytes. */
    {
        size_t len = mk_descs(b, 2, &(struct lshm_wire_tracking){ 0, 0 });

        b[OFF_FLAGS] &= ~LSHM_WIRE_TRACKING;
        expect_reject(b, len, 0, "descriptor bytes are not a multiple of 12");
    }
}

LTEST(wire, reject_zero_descriptors)
{
    uint8_t b[BUFSZ];

    mk_descs(b, 1, NULL);
    expect_reject(b, HDR, 0, "MMAP message without descriptors");
    mk_descs(b, 1, &(struct lshm_wire_tracking){ 0, 0 });
    expect_reject(b, HDR + TRK, 0, "MMAP message without descriptors");
}

LTEST(wire, reject_65_descriptors)
{
    uint8_t b[BUFSZ];
    size_t len = mk_descs(b, 64, NULL);

    put_desc(b, len, 0, 200, 1);
    put32(b, OFF_SIZE, get32(b, OFF_SIZE) + 1);
    expect_reject(b, len + DESC, 0, "more than 64 descriptors");
}

LTEST(wire, reject_descriptor_size_zero)
{
    uint8_t b[BUFSZ];
    size_t len = mk_descs(b, 5, NULL);

    /* The middle one: the others still sum to the header's size. */
    put32(b, OFF_SIZE, get32(b, OFF_SIZE) - get32(b, HDR + 2 * DESC + 8));
    put32(b, HDR + 2 * DESC + 8, 0);
    expect_reject(b, len, 0, "descriptor size 0");
}

LTEST(wire, reject_descriptor_sum_mismatch)
{
    uint8_t b[BUFSZ];
    size_t len = mk_descs(b, 3, NULL);
    uint32_t size = get32(b, OFF_SIZE);

    put32(b, OFF_SIZE, size + 1);
    expect_reject(b, len, 0, "descriptor sizes do not sum to the message size");
    put32(b, OFF_SIZE, size - 1);
    expect_reject(b, len, 0, "descriptor sizes do not sum to the message size");
    put32(b, OFF_SIZE, 0);
    expect_reject(b, len, 0, "descriptor sizes do not sum to the message size");
}

/* Sizes whose 32-bit sum wraps around to exactly hdr.size. */
LTEST(wire, reject_descriptor_sum_wrapping_32_bits)
{
    uint8_t b[BUFSZ];
    size_t len = mk_descs(b, 3, NULL);

    put_desc(b, HDR + 0 * DESC, 0, 0, 0x80000000u);
    put_desc(b, HDR + 1 * DESC, 0, 0, 0x80000000u);
    put_desc(b, HDR + 2 * DESC, 0, 0, 5);
    put32(b, OFF_SIZE, 5);
    cr_assert_eq((uint32_t)(0x80000000u + 0x80000000u + 5u), 5u);
    expect_reject(b, len, 0, "descriptor sizes do not sum to the message size");

    /* 64 of 0x04000001 wrap to 64 in 32 bits. */
    len = mk_descs(b, 64, NULL);
    for (unsigned i = 0; i < 64; i++)
        put_desc(b, HDR + i * DESC, 0, 0, 0x04000001u);
    put32(b, OFF_SIZE, 64);
    expect_reject(b, len, 0, "descriptor sizes do not sum to the message size");
}

LTEST(wire, reject_chunk_id_640)
{
    uint8_t b[BUFSZ];
    size_t len = mk_descs(b, 2, NULL);

    put_desc(b, HDR + DESC, 0, 640, get32(b, HDR + DESC + 8));
    expect_reject(b, len, 0, "descriptor chunk_id out of range");
    put_desc(b, HDR + DESC, 0, 0xffffffffu, get32(b, HDR + DESC + 8));
    expect_reject(b, len, 0, "descriptor chunk_id out of range");
}

LTEST(wire, reject_descriptor_past_data_area)
{
    uint8_t b[BUFSZ];
    size_t len = mk_descs(b, 1, NULL);

    put_desc(b, HDR, 0, 639, 16385);
    put32(b, OFF_SIZE, 16385);
    expect_reject(b, len, 0, "descriptor runs past the data area");
    put_desc(b, HDR, 0, 1, LSHM_DATA_SIZE - 16384 + 1);
    put32(b, OFF_SIZE, LSHM_DATA_SIZE - 16384 + 1);
    expect_reject(b, len, 0, "descriptor runs past the data area");
    put_desc(b, HDR, 0, 0, LSHM_DATA_SIZE + 1);
    put32(b, OFF_SIZE, LSHM_DATA_SIZE + 1);
    expect_reject(b, len, 0, "descriptor runs past the data area");
}

/* chunk_id * 16384 + size computed in 32 bits would wrap and pass. */
LTEST(wire, reject_descriptor_end_wrapping_32_bits)
{
    uint8_t b[BUFSZ];
    size_t len = mk_descs(b, 1, NULL);

    cr_assert_lt((uint32_t)(639u * 16384u + 0xffffffffu), LSHM_DATA_SIZE);
    put_desc(b, HDR, 0, 639, 0xffffffffu);
    put32(b, OFF_SIZE, 0xffffffffu);
    expect_reject(b, len, 0, "descriptor runs past the data area");
}

LTEST(wire, reject_inline_length_differs)
{
    uint8_t b[BUFSZ];
    size_t len = mk_inline(b, 10, NULL);

    expect_reject(b, len + 1, 0, "inline length differs from the size field");
    expect_reject(b, len - 1, 0, "inline length differs from the size field");
    expect_reject(b, HDR, 0, "inline length differs from the size field");
    len = mk_inline(b, 10, &(struct lshm_wire_tracking){ 0, 0 });
    expect_reject(b, len - 1, 0, "inline length differs from the size field");
    /* Without TRACKING the tracking bytes count as inline bytes. */
    b[OFF_FLAGS] &= ~LSHM_WIRE_TRACKING;
    expect_reject(b, len, 0, "inline length differs from the size field");
}

LTEST(wire, reject_inline_over_16384)
{
    uint8_t b[BUFSZ];

    mk_inline(b, LSHM_INLINE_MAX, NULL);
    put32(b, OFF_SIZE, LSHM_INLINE_MAX + 1);
    expect_reject(b, HDR + LSHM_INLINE_MAX + 1, 0, "inline size over 16384");
    put32(b, OFF_SIZE, 0xffffffffu);
    expect_reject(b, HDR + 10, 0, "inline size over 16384");
}

LTEST(wire, reject_tracking_truncated)
{
    uint8_t b[BUFSZ];

    for (size_t l = HDR; l < HDR + TRK; l++) {
        mk_inline(b, 0, &(struct lshm_wire_tracking){ 0, 1 });
        expect_reject(b, l, 0, "tracking truncated");
        mk_descs(b, 1, &(struct lshm_wire_tracking){ 0, 1 });
        expect_reject(b, l, 0, "tracking truncated");
    }
}

LTEST(wire, reject_tracking_id_640)
{
    uint8_t b[BUFSZ];
    size_t len = mk_inline(b, 1, &(struct lshm_wire_tracking){ 0, 640 });

    expect_reject(b, len, 0, "tracking_id out of range");
    len = mk_descs(b, 1, &(struct lshm_wire_tracking){ 0, 0xffffffffu });
    expect_reject(b, len, 0, "tracking_id out of range");
}

/* ------------------------------------------------------- accepted edges */

LTEST(wire, accept_64_descriptors)
{
    uint8_t b[BUFSZ];
    struct lshm_wire_view v;
    size_t len = mk_descs(b, 64, &(struct lshm_wire_tracking){ 2, 3 });

    cr_assert_eq(len, HDR + TRK + 64 * DESC);
    decode_ok(b, len, 1, &v);
    cr_assert_eq(v.ndesc, 64);
    cr_assert_eq(lshm__wire_desc_at(&v, 63).chunk_id, 126);
}

LTEST(wire, accept_inline_16384)
{
    uint8_t b[BUFSZ];
    struct lshm_wire_view v;
    size_t len = mk_inline(b, LSHM_INLINE_MAX, NULL);

    cr_assert_eq(len, HDR + LSHM_INLINE_MAX);
    decode_ok(b, len, 0, &v);
    cr_assert_eq(v.hdr.size, LSHM_INLINE_MAX);
    cr_assert_eq(v.payload[LSHM_INLINE_MAX - 1], pattern_byte(99, LSHM_INLINE_MAX - 1),
                 "last byte");
    /* The largest valid datagram: tracking plus a full inline payload. */
    len = mk_inline(b, LSHM_INLINE_MAX, &(struct lshm_wire_tracking){ 0, 0 });
    cr_assert_leq(len, LSHM_WIRE_MAX);
    decode_ok(b, len, 1, &v);
}

LTEST(wire, accept_last_chunk_full)
{
    uint8_t b[BUFSZ];
    struct lshm_wire_view v;
    size_t len = mk_descs(b, 1, NULL);

    put_desc(b, HDR, 0, 639, 16384);
    put32(b, OFF_SIZE, 16384);
    decode_ok(b, len, 0, &v);
    cr_assert_eq(lshm__wire_desc_at(&v, 0).chunk_id, 639);
    /* One byte in the last chunk, and the whole data area from chunk 0. */
    put_desc(b, HDR, 0, 639, 1);
    put32(b, OFF_SIZE, 1);
    decode_ok(b, len, 0, &v);
    put_desc(b, HDR, 0, 0, LSHM_DATA_SIZE);
    put32(b, OFF_SIZE, LSHM_DATA_SIZE);
    decode_ok(b, len, 0, &v);
}

LTEST(wire, accept_user_type_range_and_fd)
{
    uint8_t b[BUFSZ];
    struct lshm_wire_view v;

    for (unsigned type = 16; type < 256; type++) {
        size_t len = mk_inline(b, 3, NULL);

        b[OFF_TYPE] = type;
        decode_ok(b, len, type & 1, &v);
        cr_assert_eq(v.hdr.type, type);
    }
}

LTEST(wire, accept_tracking_id_639)
{
    uint8_t b[BUFSZ];
    struct lshm_wire_view v;
    size_t len = mk_inline(b, 0, &(struct lshm_wire_tracking){ 0xffffffffu, 639 });

    decode_ok(b, len, 0, &v);
    cr_assert_eq(v.tracking.mmap_id, 0xffffffffu);
}

/* ------------------------------------------------------------ check_hello */

static struct lshm_wire_hello good_hello(void)
{
    return (struct lshm_wire_hello){
        .magic = LSHM_MAGIC, .version = 2, .port_id = 1, .header_size = 4096,
        .chunk_size = 16384, .chunk_count = 640, .max_segments = 1,
    };
}

LTEST(wire, check_hello_accepts)
{
    struct lshm_wire_hello h = good_hello();

    cr_assert_eq(lshm__wire_check_hello(&h, NULL), 0);
    h.max_segments = 0xffffffffu;
    cr_assert_eq(lshm__wire_check_hello(&h, NULL), 0);
}

LTEST(wire, check_hello_bad_magic)
{
    struct lshm_wire_hello h = good_hello();
    const char *why = NULL;

    h.magic = 0x4c53484d;  /* byte-swapped */
    cr_assert_eq(lshm__wire_check_hello(&h, &why), -EPROTO);
    cr_assert_str_eq(why, "HELLO magic is not 0x4d48534c");
}

LTEST(wire, check_hello_other_version)
{
    struct lshm_wire_hello h = good_hello();
    const char *why = NULL;

    h.version = 1;
    cr_assert_eq(lshm__wire_check_hello(&h, &why), -EPROTONOSUPPORT);
    cr_assert_str_eq(why, "protocol version 1, expected 2");
    h.version = 0;
    cr_assert_eq(lshm__wire_check_hello(&h, &why), -EPROTONOSUPPORT);
    cr_assert_str_eq(why, "protocol version 0, expected 2");
    h.version = 65535;
    cr_assert_eq(lshm__wire_check_hello(&h, NULL), -EPROTONOSUPPORT);
}

LTEST(wire, check_hello_geometry_mismatch)
{
    const char *why = NULL;

    for (int field = 0; field < 3; field++) {
        struct lshm_wire_hello h = good_hello();

        if (field == 0)
            h.header_size = 8192;
        else if (field == 1)
            h.chunk_size = 8192;
        else
            h.chunk_count = 1280;
        why = NULL;
        cr_assert_eq(lshm__wire_check_hello(&h, &why), -EPROTO);
        cr_assert_not_null(why);
        cr_assert_eq(strncmp(why, "segment geometry mismatch", 25), 0, "%s", why);
        cr_assert_not_null(strstr(why, field == 2 ? "1280" : "8192"), "%s", why);
    }
}

LTEST(wire, check_hello_features_and_ring_size)
{
    struct lshm_wire_hello h = good_hello();
    const char *why = NULL;
    static const uint32_t good[] = { 65536, 131072, 262144, 1u << 23, 1u << 24 };
    static const uint32_t bad[] = { 0, 8, 32768, 65535, 65537, 100000, 3u << 16,
                                    1u << 25, 0x80000000u, 0xffffffffu };

    h.features = LSHM_WIRE_FEAT_FUTEX;
    cr_assert_eq(lshm__wire_check_hello(&h, &why), -EPROTO);
    cr_assert_str_eq(why, "HELLO sets FUTEX without RING");
    h.features = 0;
    h.ring_size = 65536;
    cr_assert_eq(lshm__wire_check_hello(&h, &why), -EPROTO);
    cr_assert_str_eq(why, "HELLO ring_size is not 0 without RING");
    h.features = LSHM_WIRE_FEAT_RING | LSHM_WIRE_FEAT_FUTEX;
    for (unsigned i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        h.ring_size = good[i];
        cr_assert_eq(lshm__wire_check_hello(&h, &why), 0, "%u: %s", good[i], why);
    }
    for (unsigned i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        h.ring_size = bad[i];
        cr_assert_eq(lshm__wire_check_hello(&h, &why), -EPROTO, "%u", bad[i]);
        cr_assert_not_null(strstr(why, "is not a power of two from 65536 to 16777216"),
                           "%s", why);
    }
}

LTEST(wire, check_hello_max_segments_0)
{
    struct lshm_wire_hello h = good_hello();
    const char *why = NULL;

    h.max_segments = 0;
    cr_assert_eq(lshm__wire_check_hello(&h, &why), -EPROTO);
    cr_assert_str_eq(why, "HELLO max_segments is 0");
}

/* ------------------------------------------------------ random robustness */

static uint64_t rng = 0x9e3779b97f4a7c15ull;

/* A fixed seed, so a failure replays. */
static uint64_t rnd(void)
{
    return pattern_rand(&rng);
}

static uint32_t below(uint32_t n)
{
    return (uint32_t)pattern_rand_below(&rng, n);
}

/* Sizes biased to small, with the whole range reachable. */
static uint32_t some_size(uint32_t max)
{
    switch (below(4)) {
    case 0:  return below(max + 1);
    case 1:  return max;
    default: return below(max < 64 ? max + 1 : 64);
    }
}

static size_t random_valid(uint8_t *b, unsigned *nfds)
{
    static uint8_t data[LSHM_INLINE_MAX];
    struct lshm_wire_tracking t = { below(8), below(LSHM_CHUNK_COUNT) };
    struct lshm_wire_tracking *tp = below(3) == 0 ? &t : NULL;
    struct lshm_wire_msg h = user_hdr(16 + below(240), (uint32_t)rnd(), 0);

    *nfds = 0;
    h.flags = below(2) ? LSHM_WIRE_LAST : 0;
    switch (below(6)) {
    case 0:
        return lshm__wire_encode_hello(b, (int32_t)rnd(), (uint16_t)rnd(), (uint32_t)rnd(), 0, 0);
    case 1:
        *nfds = 1;
        return lshm__wire_encode_ctrl(b, LSHM_WIRE_MMAP_MSG, 1, 2, below(64));
    case 2:
        if (below(2)) {
            *nfds = 1;
            return lshm__wire_encode_ctrl(b, LSHM_WIRE_RING, 1, 2, 65536u << below(9));
        }
        return lshm__wire_encode_ctrl(b, below(2) ? LSHM_WIRE_WAKE :
                                      LSHM_WIRE_SHM_ACK + below(2), 1, 2, 0);
    case 3: {
        *nfds = below(2);
        h.size = some_size(LSHM_INLINE_MAX);
        for (uint32_t i = 0; i < h.size && i < 64; i++)
            data[i] = (uint8_t)rnd();
        return lshm__wire_encode_user(b, &h, tp, NULL, 0, data);
    }
    default: {
        struct lshm_wire_desc d[LSHM_MAX_DESCS];
        unsigned n = 1 + some_size(LSHM_MAX_DESCS - 1);

        *nfds = below(2);
        for (unsigned i = 0; i < n; i++) {
            uint32_t c = below(LSHM_CHUNK_COUNT);

            d[i].mmap_id = below(4);
            d[i].chunk_id = c;
            d[i].size = 1 + some_size((LSHM_CHUNK_COUNT - c) * LSHM_CHUNK_SIZE - 1);
        }
        return lshm__wire_encode_user(b, &h, tp, d, n, NULL);
    }
    }
}

static const uint32_t interesting[] = {
    0, 1, 2, 4, 8, 12, 16, 20, 24, 639, 640, 16383, 16384, 16385,
    LSHM_DATA_SIZE - 1, LSHM_DATA_SIZE, LSHM_DATA_SIZE + 1,
    0x7fffffffu, 0x80000000u, 0xfffffffeu, 0xffffffffu,
};

static size_t mutate(uint8_t *b, size_t len, unsigned *nfds)
{
    unsigned rounds = 1 + below(3);

    while (rounds--) {
        /* Most of the rules live in the first bytes: aim there often. */
        size_t span = below(2) && len > 40 ? 40 : len;
        size_t at = span ? below(span) : 0;

        switch (below(7)) {
        case 0:
            if (len)
                b[at] ^= 1u << below(8);
            break;
        case 1:
            if (len)
                b[at] = (uint8_t)rnd();
            break;
        case 2:
            if (len >= 4) {
                at = below(len - 3) & ~(size_t)3;
                put32(b, at, interesting[below(ARRAY_SIZE(interesting))]);
            }
            break;
        case 3:
            if (len >= 12)
                b[OFF_TYPE] = below(3) ? below(20) : (uint8_t)rnd();
            break;
        case 4:
            len = below(len + 1);
            break;
        case 5: {
            size_t add = 1 + below(below(8) ? 16 : 64);

            if (len + add > BUFSZ)
                add = BUFSZ - len;
            for (size_t i = 0; i < add; i++)
                b[len + i] = (uint8_t)rnd();
            len += add;
            break;
        }
        default:
            *nfds = below(4);
            break;
        }
    }
    return len;
}

#define CHECK(cond) \
    do { if (!(cond)) cr_assert_fail("iteration %u: %s", iter, #cond); } while (0)

/* Re-derives every invariant from the bytes, without the decoder's code. */
static void check_accepted(unsigned iter, const uint8_t *p, size_t len, unsigned nfds,
                           const struct lshm_wire_view *v)
{
    struct lshm_wire_msg h;
    size_t off = HDR;

    CHECK(len >= HDR && len <= LSHM_WIRE_MAX);
    memcpy(&h, p, sizeof(h));
    CHECK(memcmp(&h, &v->hdr, sizeof(h)) == 0);
    CHECK((h.flags & ~7u) == 0);
    CHECK(h.type < 6 || h.type >= 16);

    if (h.type < 16) {
        CHECK(h.stream == 0 && h.flags == 0);
        CHECK(!v->has_tracking && v->ndesc == 0 && v->desc == NULL && v->payload == NULL);
        switch (h.type) {
        case 0:
            CHECK(len == 48 && h.size == 32 && nfds == 0);
            CHECK(memcmp(&v->hello, p + 16, 24) == 0);
            CHECK(v->hello.features == (get32(p, 40) & 3u));
            CHECK(v->hello.ring_size == get32(p, 44));
            break;
        case 1:
            CHECK(len == 20 && h.size == 4 && nfds == 1);
            CHECK(v->mmap_id == get32(p, 16));
            break;
        case 4:
            CHECK(len == 20 && h.size == 4 && nfds == 1);
            CHECK(v->ring_size == get32(p, 16));
            break;
        default:
            CHECK(len == 16 && h.size == 0 && nfds == 0);
            break;
        }
        return;
    }

    CHECK(nfds <= 1);
    CHECK(v->has_tracking == !!(h.flags & 4));
    if (h.flags & 4) {
        CHECK(len >= HDR + TRK);
        CHECK(v->tracking.mmap_id == get32(p, 16));
        CHECK(v->tracking.tracking_id == get32(p, 20));
        CHECK(v->tracking.tracking_id < 640);
        off += TRK;
    }
    if (h.flags & 2) {
        uint64_t sum = 0;

        CHECK(v->payload == NULL);
        CHECK(v->desc == p + off);
        CHECK(v->ndesc >= 1 && v->ndesc <= 64);
        CHECK(len - off == (size_t)v->ndesc * 12);
        for (unsigned i = 0; i < v->ndesc; i++) {
            uint32_t mmap_id = get32(p, off + i * 12);
            uint32_t chunk = get32(p, off + i * 12 + 4);
            uint32_t size = get32(p, off + i * 12 + 8);
            struct lshm_wire_desc d = lshm__wire_desc_at(v, i);

            CHECK(d.mmap_id == mmap_id && d.chunk_id == chunk && d.size == size);
            CHECK(size >= 1);
            CHECK(chunk < 640);
            /* Last chunk covered, chunk + ceil(size / 16384) - 1, in range. */
            CHECK((uint64_t)chunk + ((uint64_t)size + 16383) / 16384 - 1 < 640);
            CHECK((uint64_t)chunk * 16384 + size <= 640ull * 16384);
            sum += size;
        }
        CHECK(sum == h.size);
    } else {
        CHECK(v->ndesc == 0 && v->desc == NULL);
        CHECK(v->payload == p + off);
        CHECK(len - off == h.size);
        CHECK(h.size <= 16384);
    }
}

LTEST(wire, random_and_mutated_datagrams)
{
    enum { ITERATIONS = 400000 };
    static uint8_t b[BUFSZ];
    unsigned accepted = 0, rejected = 0, accepted_mutants = 0;
    long long start = now_ms();

    for (unsigned iter = 0; iter < ITERATIONS; iter++) {
        struct lshm_wire_view v;
        const char *why = NULL;
        unsigned nfds;
        size_t len;
        uint8_t *copy;
        bool mutated = true;
        int ret;

        if (below(20) == 0) {
            /* Noise: mostly short, sometimes just past the limit. */
            len = below(8) ? below(64) : below(BUFSZ + 1);
            for (size_t i = 0; i < len; i++)
                b[i] = (uint8_t)rnd();
            nfds = below(3);
        } else {
            len = random_valid(b, &nfds);
            CHECK(len >= HDR);
            if (below(8) == 0)
                mutated = false;
            else
                len = mutate(b, len, &nfds);
        }

        /* An exact-size heap copy: ASan flags any read past the datagram. */
        copy = malloc(len ? len : 1);
        CHECK(copy != NULL);
        memcpy(copy, b, len);
        ret = lshm__wire_decode(copy, len, nfds, &v, below(16) ? &why : NULL);
        if (ret == 0) {
            check_accepted(iter, copy, len, nfds, &v);
            accepted++;
            accepted_mutants += mutated;
        } else {
            /* -EPROTONOSUPPORT: a mutant shaped like a version 1 HELLO. */
            CHECK(ret == -EPROTO || (ret == -EPROTONOSUPPORT && copy[OFF_TYPE] == 0));
            CHECK(why == NULL || why[0] != '\0');
            CHECK(mutated);     /* a valid encoding is never refused */
            rejected++;
        }
        free(copy);
    }
    /* Not vacuous: both outcomes are exercised, mutants included. */
    cr_assert_gt(accepted, ITERATIONS / 10, "accepted %u", accepted);
    cr_assert_gt(rejected, ITERATIONS / 10, "rejected %u", rejected);
    cr_assert_gt(accepted_mutants, ITERATIONS / 50, "accepted mutants %u", accepted_mutants);
    cr_log_info("wire fuzz: %u accepted (%u mutants), %u rejected in %lld ms",
                accepted, accepted_mutants, rejected, now_ms() - start);
}
