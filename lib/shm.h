/*
 * Shared memory: segments (segment.c), the chunk allocator (inline, below),
 * per-peer segment tables (peer.c) and buffers (buf.c).
 *
 * The layout is the protocol's (linuxshm-protocol(7)); the allocator is
 * NGINX Unit's port memory allocator.  The peer can write the whole segment
 * header at any time, so nothing read back from it is used as an index
 * without a bound check, and private copies are kept of what was validated.
 */
#ifndef LSHM_SHM_H
#define LSHM_SHM_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "internal.h"

#define LSHM_FREE_WORDS    (LSHM_CHUNK_COUNT / 64)
#define LSHM_SENT_OVER_ANY 0xffffu

struct lshm_segment_header {
    uint32_t magic;                                /* LSHM_MAGIC */
    uint16_t version;                              /* LSHM_SEGMENT_VERSION */
    uint16_t sent_over;                            /* port id, 0xffff: any port */
    uint32_t id;                                   /* index in the sender's table */
    int32_t  src_pid;
    int32_t  dst_pid;
    uint32_t oosm;                                 /* sender found no free chunk */
    uint64_t free_map[LSHM_FREE_WORDS];            /* bit set: chunk free */
    uint64_t free_map_padding;                     /* 0: stops runs at the end */
    uint64_t free_tracking_map[LSHM_FREE_WORDS];   /* bit set: slot free */
    uint64_t free_tracking_map_padding;
    uint32_t tracking[LSHM_CHUNK_COUNT];           /* stream ids */
};

_Static_assert(sizeof(struct lshm_segment_header) <= LSHM_HEADER_SIZE,
               "segment header must fit its page");

/* ---- chunk allocator: bitmaps of LSHM_FREE_WORDS words + padding ---- */

static inline bool lshm__chunk_is_free(const uint64_t *map, uint32_t c)
{
    if (c >= LSHM_CHUNK_COUNT)
        return false;
    return (__atomic_load_n(&map[c / 64], __ATOMIC_ACQUIRE) >> (c % 64)) & 1;
}

/* Claim chunk c if it is free; false when busy or out of range. */
static inline bool lshm__chunk_try_busy(uint64_t *map, uint32_t c)
{
    uint64_t bit, old;

    if (c >= LSHM_CHUNK_COUNT)
        return false;
    bit = 1ull << (c % 64);
    old = __atomic_load_n(&map[c / 64], __ATOMIC_RELAXED);
    while (old & bit) {
        if (__atomic_compare_exchange_n(&map[c / 64], &old, old & ~bit, true,
                                        __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            return true;
    }
    return false;
}

static inline void lshm__chunk_set_free(uint64_t *map, uint32_t c)
{
    if (c < LSHM_CHUNK_COUNT)
        __atomic_fetch_or(&map[c / 64], 1ull << (c % 64), __ATOMIC_RELEASE);
}

static inline void lshm__chunk_set_busy(uint64_t *map, uint32_t c)
{
    if (c < LSHM_CHUNK_COUNT)
        __atomic_fetch_and(&map[c / 64], ~(1ull << (c % 64)), __ATOMIC_ACQ_REL);
}

_Static_assert(LSHM_CHUNK_COUNT % 64 == 0, "a map's last word ends with its last chunk");

/* Bits [bit, bit + n) of a word, for 0 < n <= 64 - bit. */
static inline uint64_t lshm__chunk_mask(unsigned bit, unsigned n)
{
    return (n >= 64 ? ~0ull : (1ull << n) - 1) << bit;
}

/*
 * Mark chunks [c, c + n) free, clipped to the map: one atomic OR per word,
 * not per chunk (a 1 MiB payload is 64 chunks, one word).
 */
static inline void lshm__chunks_set_free(uint64_t *map, uint32_t c, uint32_t n)
{
    if (c >= LSHM_CHUNK_COUNT)
        return;
    if (n > LSHM_CHUNK_COUNT - c)
        n = LSHM_CHUNK_COUNT - c;
    while (n > 0) {
        unsigned bit = c % 64, k = 64 - bit < n ? 64 - bit : n;

        __atomic_fetch_or(&map[c / 64], lshm__chunk_mask(bit, k), __ATOMIC_RELEASE);
        c += k;
        n -= k;
    }
}

/*
 * Claim the run of free chunks that starts at c, at most want of them and
 * none past the end of c's word, with one compare-and-swap: the chunks
 * claiming them one by one would take while each is free.  Returns how
 * many (0: c is busy or out of range).  A peer that keeps the word
 * changing makes it give up after a bounded number of tries.
 */
static inline uint32_t lshm__chunks_try_busy(uint64_t *map, uint32_t c, uint32_t want)
{
    unsigned bit = c % 64, tries = 0;
    uint64_t old;

    if (c >= LSHM_CHUNK_COUNT || want == 0)
        return 0;
    if (want > 64 - bit)
        want = 64 - bit;
    old = __atomic_load_n(&map[c / 64], __ATOMIC_RELAXED);
    do {
        uint64_t busy = ~(old >> bit);
        unsigned run = busy == 0 ? 64 - bit : (unsigned)__builtin_ctzll(busy);

        if (run > want)
            run = want;
        if (run == 0)
            return 0;
        if (__atomic_compare_exchange_n(&map[c / 64], &old, old & ~lshm__chunk_mask(bit, run),
                                        false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            return run;
        /* Lost: old holds the word's new value; look at it again. */
    } while (++tries < 4096);
    return 0;
}

/*
 * Unit's search: from the hint *c, find the first free bit, claim it with
 * compare-and-swap, and store its index in *c.  False when none is free at
 * or after the hint (bits below it are not looked at), or when the peer
 * keeps the map changing so that the claim keeps losing.
 */
bool lshm__chunk_get_free(uint64_t *map, uint32_t *c);

/*
 * Tracking (cancellable streams).  The sender takes a slot from
 * free_tracking_map (lshm__peer_out_alloc with tracking) and publishes the
 * stream id with lshm__tracking_set before the message goes out.  Receiver
 * and canceller then both call lshm__tracking_resolve with the same stream:
 * exactly one of them gets true (the receiver delivers, or the canceller
 * cancelled first); the other gets false and has freed the slot.  Stream 0
 * cannot be tracked (0 is the resolved value): it always gets false and
 * frees nothing, so refuse it before taking a slot.
 */
static inline void lshm__tracking_set(struct lshm_segment_header *hdr, uint32_t slot,
                                     uint32_t stream)
{
    if (slot < LSHM_CHUNK_COUNT)
        __atomic_store_n(&hdr->tracking[slot], stream, __ATOMIC_RELEASE);
}

static inline bool lshm__tracking_resolve(struct lshm_segment_header *hdr, uint32_t slot,
                                         uint32_t stream)
{
    uint32_t expected = stream;

    if (slot >= LSHM_CHUNK_COUNT || stream == 0)
        return false;
    if (__atomic_compare_exchange_n(&hdr->tracking[slot], &expected, 0, false,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return true;
    lshm__chunk_set_free(hdr->free_tracking_map, slot);
    return false;
}

/* ---- segments (segment.c) ---- */

struct lshm_seg {
    struct lshm_segment_header *hdr;   /* the mapping, LSHM_SEGMENT_SIZE bytes */
    uint8_t                    *data;  /* hdr + LSHM_HEADER_SIZE */
    uint32_t                    id;    /* private copies of validated fields */
    pid_t                       src_pid;
    pid_t                       dst_pid;
    int                         fd;    /* outgoing: until its MMAP is sent; else -1 */
    bool                        scrub; /* fill freed chunks with 0xA5 */
    atomic_int                  use;
};

/*
 * A memfd of size bytes for what ("segment", "ring"; named "lshm" and
 * "lshm-ring" in /proc/PID/maps), MFD_NOEXEC_SEAL where
 * the kernel has it, sealed SHRINK | GROW | SEAL: the fd, or -errno with a
 * text (-ENOSYS: the kernel has no memfd).
 */
int  lshm__memfd_new(const char *what, size_t size);

/*
 * The checks every memfd from a peer passes before it is mapped: a regular
 * file (-EBADF), a memfd (-EOPNOTSUPP), sealed SHRINK and GROW (-EPERM),
 * not sealed against writing (-EACCES), exactly size bytes (-EMSGSIZE).
 */
int  lshm__memfd_check(int fd, size_t size);

/*
 * Create a sealed memfd segment (MFD_NOEXEC_SEAL where the kernel has it),
 * map it with all its pages in place (huge pages where shmem may have them)
 * and initialise its header: every chunk and slot free but the sentinel
 * bits, sent_over = port_id.  -ENOSYS when memfd_create is missing, -ENOMEM
 * when its pages cannot be had.
 * The new segment holds one reference and its fd (seg->fd).  The mapping is
 * MADV_DONTFORK: a forked child does not inherit it.
 */
int  lshm__seg_create(uint32_t id, pid_t src, pid_t dst, uint16_t port_id,
                     struct lshm_seg **out);

/*
 * Validate and map a segment fd received from process src for process dst,
 * expected to be segment id.  The fd stays the caller's.  Each failure has
 * its own code:
 *   -EBADF       not a regular file (pipe, socket, ...)
 *   -EOPNOTSUPP  not a memfd (no seals to read)
 *   -EPERM       not sealed against SHRINK and GROW
 *   -EMSGSIZE    size is not LSHM_SEGMENT_SIZE
 *   -EPROTO      bad magic
 *   -EPROTONOSUPPORT  bad version
 *   -ERANGE      id is not the expected one
 *   -ESRCH       src_pid is not the sender
 *   -ENXIO       dst_pid is not this process
 *   -EACCES      sealed against writing, or not open for writing
 * (and -ENOMEM etc. from mmap and from populating its pages, which is done
 * only once the header was found good).  On success sets sent_over to
 * LSHM_SENT_OVER_ANY; the segment holds one reference and seg->fd is -1.
 */
int  lshm__seg_import(int fd, uint32_t id, pid_t src, pid_t dst, struct lshm_seg **out);

const char *lshm__seg_strerror(int err);

/*
 * The bracketed word of /sys/kernel/mm/transparent_hugepage/shmem_enabled
 * ("never", "advise", "always", ...), or "" when it cannot be read.
 */
void lshm__seg_shmem_thp(char *word, size_t len);

void lshm__seg_ref(struct lshm_seg *seg);
void lshm__seg_unref(struct lshm_seg *seg);   /* unmaps and frees at zero */
void lshm__seg_close_fd(struct lshm_seg *seg);

/*
 * Mark chunks [chunk, chunk + nchunks) free, clipped to the segment; fill
 * them with 0xA5 first when seg->scrub.
 */
void lshm__seg_free_chunks(struct lshm_seg *seg, uint32_t chunk, uint32_t nchunks);

/* Receiver: after freeing, compare-and-swap oosm 1 -> 0; true: send SHM_ACK. */
bool lshm__seg_take_oosm(struct lshm_seg *seg);

/* ---- peers (peer.c): one remote process, shared by every context ---- */

struct lshm_seg_table {
    pthread_mutex_t   mutex;
    struct lshm_seg **elts;
    uint32_t          size;
    uint32_t          cap;
    long long         full_since; /* outgoing: ms all were found full, 0: not */
    bool              failed;     /* outgoing: the last allocation failed */
    uint32_t          free_then;  /* free chunks then, UINT32_MAX: not counted yet */
};

/*
 * Outgoing segments beyond the first LSHM_SEGMENTS_AT_ONCE are made only
 * for a reader that gives no chunk back for LSHM_GROW_WAIT_MS once they
 * are all full: a reader that keeps up, however slowly, is waited for in
 * the memory that is already there (and in cache), and one that stalls
 * lets a burst grow up to the limit.
 */
#define LSHM_SEGMENTS_AT_ONCE 1u
#define LSHM_GROW_WAIT_MS     10

struct lshm_peer {
    pid_t                 pid;
    int                   refs;       /* ports to this process; registry lock */
    struct lshm_seg_table out;        /* segments we created for it */
    struct lshm_seg_table in;         /* segments it sent us */
    struct lshm_peer     *next;
    bool                  detached;   /* out of the registry, a new pair began */
    int                  *socks;      /* sockets of the ports; registry lock */
    unsigned              nsocks, capsocks;
};

/* Find or create the peer for pid, taking a reference. */
int  lshm__peer_get(pid_t pid, struct lshm_peer **peer);
/* Drop a reference; at zero the tables let go of their segments. */
void lshm__peer_put(struct lshm_peer *peer);

/*
 * The same for a port whose socket is sock.  The pair's segment ids start
 * again from 0 once the last port between the two processes closed, and
 * the peer may see that before this process does (its ports here still
 * unread): when every socket of the known peer is hung up at the other
 * end, that peer is left to its ports and a new one begins.
 */
int  lshm__peer_get_sock(pid_t pid, int sock, struct lshm_peer **peer);
void lshm__peer_put_sock(struct lshm_peer *peer, int sock);
/*
 * sock has said BYE and shut down its writing side: for the peer, whose
 * new-pair test sees that, the port is gone.  Take it off the list, and
 * if it was the last, leave the pair to its remaining references as the
 * peer will: a port made from now on begins a new pair.  The reference
 * stays until lshm__peer_put_sock.
 */
void lshm__peer_hang_up(struct lshm_peer *peer, int sock);

struct lshm_alloc {
    struct lshm_seg *seg;      /* referenced */
    uint32_t         chunk;    /* first chunk (or tracking slot) */
    bool             created;  /* seg is new: its MMAP must go first */
};

/*
 * Claim one free chunk (tracking: one tracking slot) in a segment usable by
 * port_id (sent_over is port_id or any), searching from the start of each,
 * segment 0 first: while the receiver keeps up, the lowest free chunks are
 * the ones it gave back last, still in cache, and the higher segments only
 * take bursts.  With none free, create segment number size if size < limit
 * and the rule of LSHM_SEGMENTS_AT_ONCE allows it.  Otherwise set oosm in
 * every usable segment (the receiver's next free sends SHM_ACK) and return
 * -EAGAIN.
 */
int  lshm__peer_out_alloc(struct lshm_peer *peer, uint16_t port_id, unsigned limit,
                         bool tracking, bool scrub, struct lshm_alloc *out);

/*
 * Make one segment ahead of need, announced on port_id, if the table holds
 * fewer than want and no segment announced on another port is unmapped.
 * Returns 1 with *seg referenced (its MMAP must go out), 0 when there is
 * nothing to make, or -errno.
 */
int  lshm__peer_out_make(struct lshm_peer *peer, uint16_t port_id, unsigned want, bool scrub,
                        struct lshm_seg **seg);

/*
 * Could an allocation for port_id succeed now: may a segment be made, or
 * are chunks free (after a failed allocation: more than at the first look
 * since)?  Only a hint: the free maps are the peer's to change.
 */
bool lshm__peer_out_has_room(struct lshm_peer *peer, uint16_t port_id, unsigned limit);

/*
 * Undo a created segment whose MMAP could not be queued: drops the table's
 * reference (the alloc's stays the caller's).  Only while seg is still the
 * last in the table; otherwise does nothing.
 */
void lshm__peer_out_drop(struct lshm_peer *peer, struct lshm_seg *seg);

/*
 * Port port_id is closed at the peer's end: the segments at the end of the
 * table it announced and the peer never mapped (sent_over still port_id)
 * never will be; drop them so their ids can be announced again elsewhere.
 */
void lshm__peer_out_forget_port(struct lshm_peer *peer, uint16_t port_id);

/*
 * Add a validated incoming segment; its id must be the next one (the table
 * size) and below limit, else -EPROTO / -ENOSPC.  Takes a reference.
 */
int  lshm__peer_in_add(struct lshm_peer *peer, struct lshm_seg *seg, unsigned limit);

/* Next incoming id expected from this peer. */
uint32_t lshm__peer_in_next(struct lshm_peer *peer);

/* The incoming segment id, referenced, or NULL. */
struct lshm_seg *lshm__peer_in_get(struct lshm_peer *peer, uint32_t id);
/* Our outgoing segment id, referenced, or NULL. */
struct lshm_seg *lshm__peer_out_get(struct lshm_peer *peer, uint32_t id);

/*
 * In a child after fork: forget the parent's peers without touching their
 * shared memory (not mapped here anyway: MADV_DONTFORK); closes the fds the
 * segments held.  Does nothing in the process that owns the registry.
 * The library's own pthread_atfork child handler already does this (and
 * lshm__peer_get does when it finds itself in a new process), so this call
 * is only needed for clarity; never make it from an atfork child handler,
 * which may run while the registry is still locked for fork().
 */
void lshm__peers_forget(void);

/* ---- buffers (buf.c) ---- */

struct lshm_buf {
    struct lshm_seg *seg;       /* referenced */
    struct lshm_peer *peer;     /* for growth; not referenced */
    uint32_t         chunk;     /* first chunk */
    uint32_t         nchunks;   /* chunks owned */
    size_t           size;      /* bytes to send */
    bool             sent;      /* the descriptor went out */
    uint16_t         port_id;   /* the port it may be sent on */
    pid_t            tid;       /* the thread that may use it (the port's context's) */
};

/*
 * Build a buffer from an allocation: claim following chunks as a run up to
 * ceil(size / CHUNK) (size 0: one chunk; partial when the next one is busy
 * or past the end, as Unit does).  buf->size starts at min(size, capacity).
 * On success the buffer takes over the alloc's chunk and reference; on
 * failure (-ENOMEM) both stay the caller's.
 */
int  lshm__buf_from_alloc(const struct lshm_alloc *a, struct lshm_peer *peer, size_t size,
                         struct lshm_buf **out);

/* After the descriptor is sent: free the chunks past the sent bytes, drop. */
void lshm__buf_release_sent(struct lshm_buf *buf);

/* The calls of lshm_buf_grow(3) and its neighbours, behind the public edge. */
int    lshm__buf_grow(struct lshm_buf *buf, size_t size, size_t min_size);
void  *lshm__buf_data(struct lshm_buf *buf);
size_t lshm__buf_capacity(const struct lshm_buf *buf);
int    lshm__buf_set_size(struct lshm_buf *buf, size_t size);
void   lshm__buf_free(struct lshm_buf *buf);

#endif
