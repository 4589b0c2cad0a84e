/*
 * An independent implementation of the wire protocol, written from
 * linuxshm-protocol(7) alone: its own structures and constants, raw
 * SOCK_SEQPACKET sendmsg/recvmsg with SCM_RIGHTS and SCM_CREDENTIALS, its own
 * sealed memfd segments.  It is built without the library's include path, so
 * nothing of the library can leak into it.  tests/test_interop.c forks it
 * against a library port: peer_run gives the child its sockets and runs one
 * of the peer's sides below.  The peer reports a failed check on stderr and
 * in its exit status; results that the test compares travel back as inline
 * user messages of type T_REPORT.
 */
#ifndef INTEROP_PEER_H
#define INTEROP_PEER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* ---- The protocol, as the page states it (own names, own values) ---- */

#define P_MAGIC         0x4d48534cu
#define P_VERSION       2u
#define P_SEG_VERSION   1u
#define P_HEADER_SIZE   4096u
#define P_CHUNK_SIZE    16384u
#define P_CHUNK_COUNT   640u
#define P_DATA_SIZE     10485760u
#define P_SEGMENT_SIZE  10489856u
#define P_INLINE_MAX    16384u
#define P_WIRE_MAX      16448u
#define P_MAX_DESCS     64u
#define P_USER_MIN      16u
#define P_MAP_WORDS     10u
#define P_SENT_OVER_ANY 0xffffu

#define P_HELLO   0
#define P_MMAP    1
#define P_SHM_ACK 2
#define P_BYE     3

#define P_F_LAST     0x01
#define P_F_MMAP     0x02
#define P_F_TRACKING 0x04

struct w_hdr {
    uint32_t stream;
    int32_t  pid;
    uint16_t port_id;
    uint8_t  type;
    uint8_t  flags;
    uint32_t size;
};
_Static_assert(sizeof(struct w_hdr) == 16, "header");
_Static_assert(offsetof(struct w_hdr, pid) == 4 && offsetof(struct w_hdr, port_id) == 8 &&
               offsetof(struct w_hdr, type) == 10 && offsetof(struct w_hdr, flags) == 11 &&
               offsetof(struct w_hdr, size) == 12, "header offsets");

struct w_tracking {
    uint32_t mmap_id;
    uint32_t tracking_id;
};
_Static_assert(sizeof(struct w_tracking) == 8, "tracking");

struct w_desc {
    uint32_t mmap_id;
    uint32_t chunk_id;
    uint32_t size;
};
_Static_assert(sizeof(struct w_desc) == 12, "desc");

struct w_hello {
    uint32_t magic;
    uint16_t version;
    uint16_t port_id;
    uint32_t header_size;
    uint32_t chunk_size;
    uint32_t chunk_count;
    uint32_t max_segments;
    uint32_t features;
    uint32_t ring_size;
};
_Static_assert(sizeof(struct w_hello) == 32, "hello");
_Static_assert(16 + offsetof(struct w_hello, version) == 20 &&
               16 + offsetof(struct w_hello, port_id) == 22 &&
               16 + offsetof(struct w_hello, header_size) == 24 &&
               16 + offsetof(struct w_hello, max_segments) == 36 &&
               16 + offsetof(struct w_hello, features) == 40 &&
               16 + offsetof(struct w_hello, ring_size) == 44, "hello offsets");

struct seg_hdr {
    uint32_t magic;
    uint16_t version;
    uint16_t sent_over;
    uint32_t id;
    int32_t  src_pid;
    int32_t  dst_pid;
    uint32_t oosm;
    uint64_t free_map[P_MAP_WORDS];
    uint64_t free_map_padding;
    uint64_t free_tracking_map[P_MAP_WORDS];
    uint64_t free_tracking_map_padding;
    uint32_t tracking[P_CHUNK_COUNT];
};
_Static_assert(offsetof(struct seg_hdr, version) == 4, "seg version");
_Static_assert(offsetof(struct seg_hdr, sent_over) == 6, "seg sent_over");
_Static_assert(offsetof(struct seg_hdr, id) == 8, "seg id");
_Static_assert(offsetof(struct seg_hdr, src_pid) == 12, "seg src_pid");
_Static_assert(offsetof(struct seg_hdr, dst_pid) == 16, "seg dst_pid");
_Static_assert(offsetof(struct seg_hdr, oosm) == 20, "seg oosm");
_Static_assert(offsetof(struct seg_hdr, free_map) == 24, "seg free_map");
_Static_assert(offsetof(struct seg_hdr, free_map_padding) == 104, "seg padding");
_Static_assert(offsetof(struct seg_hdr, free_tracking_map) == 112, "seg tracking map");
_Static_assert(offsetof(struct seg_hdr, free_tracking_map_padding) == 192, "seg padding 2");
_Static_assert(offsetof(struct seg_hdr, tracking) == 200, "seg tracking");
_Static_assert(sizeof(struct seg_hdr) == 2760, "seg header used bytes");

/* ---- Shared by both sides of the test (not protocol) ---- */

#define PEER_PORT_ID   4242
#define PEER_MAX_SEGS  4
#define T_REPORT       20
#define T_SIGNAL       21
#define TIMEOUT_MS     5000

/* What the peer reports back, inline, in a message of type T_REPORT. */
struct report {
    uint32_t tag;
    uint32_t a, b, c, d;
    uint32_t pad;
    uint64_t bytes;
    uint64_t fnv;
};

/* The payload of message stream is pattern_byte(stream, offset) (pattern.h);
 * both sides also fold it into an FNV-1a hash. */
#define FNV_INIT 0xcbf29ce484222325ull

static inline uint64_t fnv_byte(uint64_t h, uint8_t b)
{
    return (h ^ b) * 0x100000001b3ull;
}

/* ---- What the library sends in interop/lib_to_peer ---- */

struct lib_msg {
    uint32_t stream;
    uint8_t  type;
    uint8_t  flags;      /* wire flags */
    uint32_t nbufs;      /* 0: inline */
    uint32_t sizes[3];
};

#define SZ_3M (3u << 20)
#define N_LIB_MSGS 8u

extern const struct lib_msg lib_msgs[N_LIB_MSGS];
/* The payload bytes of l. */
uint64_t lib_msg_size(const struct lib_msg *l);

/* ---- The peer ---- */

/* One port of the peer (peer.c). */
struct peer;
/* p is an array of as many ports as the test made (mostly one). */
typedef void (*peer_fn)(struct peer *p);

/* In a forked child: keep only stdio and the n sockets, make a peer port
 * on each, run fn on them and exit (0, or 1 on a failed check). */
__attribute__((noreturn))
void peer_run(const int *socks, unsigned n, peer_fn fn);

/* The peer's side of each test of tests/test_interop.c (named after the test). */
/* interop/handshake */
void peer_handshake_main(struct peer *p);
/* interop/lib_to_peer */
void peer_lib_to_peer(struct peer *p);
/* interop/peer_to_lib */
void peer_to_lib_main(struct peer *p);
/* interop/tracking_from_peer */
void peer_tracking_main(struct peer *p);
/* interop/bye_from_peer */
void peer_bye_main(struct peer *p);
/* interop/tracking_from_lib */
void peer_lib_tracking_main(struct peer *p);
/* interop/peer_max_segments */
void peer_one_segment_main(struct peer *p);
/* interop/segment_ids_per_pair */
void peer_pair_main(struct peer *p);
/* interop/pair_restarts_after_peer_closed_unread_port */
void peer_restart_main(struct peer *p);
/* interop/second_port_mmap_id_0_while_first_open_is_violation */
void peer_second_port_main(struct peer *p);

#endif
