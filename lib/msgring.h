/*
 * Message rings (protocol version 2): a sealed memfd that one side of a
 * port writes records into and the other reads them from, so that a
 * message costs no system call while the reader is awake.  This layer knows
 * the ring's layout and the rules of producer and consumer; it does no I/O
 * (the port sends RING, WAKE and SHM_ACK, and waits on the futex).
 */
#ifndef LSHM_MSGRING_H
#define LSHM_MSGRING_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "wire.h"

/* The shared header, at offset 0 of the ring (linuxshm-protocol(7)). */
struct lshm_msgring_header {
    uint32_t magic;         /* LSHM_RING_MAGIC, "LSHR" in memory */
    uint16_t version;       /* LSHM_RING_VERSION */
    uint16_t port_id;       /* the producer's port id */
    uint32_t size;          /* ring_size: data bytes after the 4096-byte header */
    int32_t  src_pid;       /* producer */
    int32_t  dst_pid;       /* consumer */
    uint8_t  pad0[44];
    uint64_t tail;          /* bytes ever written; the producer's; atomic */
    uint8_t  pad1[56];
    uint64_t head;          /* bytes ever consumed; the consumer's; atomic */
    uint8_t  pad2[56];
    uint32_t wake;          /* 1: the consumer may sleep; futex word */
    uint32_t space;         /* 1: the producer waits for room */
};

_Static_assert(__builtin_offsetof(struct lshm_msgring_header, tail) == 64, "tail at 64");
_Static_assert(__builtin_offsetof(struct lshm_msgring_header, head) == 128, "head at 128");
_Static_assert(__builtin_offsetof(struct lshm_msgring_header, wake) == 192, "wake at 192");
_Static_assert(__builtin_offsetof(struct lshm_msgring_header, space) == 196, "space at 196");

/*
 * One side's view of a ring.  What it validated or owns is kept here, never
 * read back from the shared header: the peer can write all of it.
 */
struct lshm_msgring {
    struct lshm_msgring_header *hdr;   /* mapping of LSHM_RING_HEADER_SIZE + size */
    uint8_t                    *data;
    uint32_t                    size;
    int                         fd;    /* producer: until its RING is sent; else -1 */
    uint64_t                    pos;   /* producer: tail; consumer: head */
    uint64_t                    published; /* pos as last stored in the header */
    uint64_t                    seen;  /* producer: head last read; consumer: tail */
    uint64_t                    woke_at;   /* producer: head at the last wake-up */
};

/* ---- producer ---- */

/*
 * Create a ring of size bytes (lshm__ring_size_is_valid) for the port
 * port_id of process src, read by process dst: sealed, mapped, header
 * written.  r->fd is the fd to send with RING.  -errno with a text.
 */
int  lshm__msgring_create(struct lshm_msgring *r, uint32_t size, uint16_t port_id,
                          pid_t src, pid_t dst);

/*
 * Room for a record of kind and len payload bytes: writes its header (and a
 * SKIP first where it would cross the end), advances the private tail and
 * returns where the len bytes go; they must be written before the next
 * publish.  NULL with *err: -EAGAIN the ring is full (see
 * lshm__msgring_want_room), -EPROTO the consumer's head is out of bounds.
 */
void *lshm__msgring_reserve(struct lshm_msgring *r, uint32_t kind, uint32_t len, int *err);

/*
 * Make what was reserved visible (release store of tail), up to limit at
 * most (a record boundary; UINT64_MAX: all of it).  True when the consumer
 * was asleep and is owed a wake-up (at most one per movement of its head).
 */
bool lshm__msgring_publish(struct lshm_msgring *r, uint64_t limit);

/*
 * The ring is full for a record of len bytes: ask the consumer for an
 * SHM_ACK (space = 1) and look again.  1: room now; 0: wait for the ACK or
 * the recheck timer; -EPROTO: the consumer's head is out of bounds.
 */
int  lshm__msgring_want_room(struct lshm_msgring *r, uint32_t len);

/* ---- consumer ---- */

/*
 * Validate and map a ring fd the peer sent with RING: every check of
 * lshm__memfd_check for LSHM_RING_HEADER_SIZE + size bytes, then magic,
 * version, size, port_id, src_pid and dst_pid of its header.  The fd stays
 * the caller's.  -errno with a reason in *why.
 */
int  lshm__msgring_import(struct lshm_msgring *r, int fd, uint32_t size, uint16_t port_id,
                          pid_t src, pid_t dst, const char **why);

/*
 * The next record: 0 when the ring is empty, 1 with *rec and, for MSG, its
 * rec->len bytes copied into buf (LSHM_WIRE_MAX bytes), -EPROTO with *why
 * for a producer's violation.  SKIPs are passed over.  The private head
 * moves past the record; lshm__msgring_publish_head makes it visible.
 */
int  lshm__msgring_next(struct lshm_msgring *r, void *buf, struct lshm_wire_record *rec,
                        const char **why);

/* Unread bytes published, as far as last seen: true if there may be records. */
bool lshm__msgring_pending(struct lshm_msgring *r);

/*
 * Store head (release).  True when the producer waits for room and is owed
 * an SHM_ACK.
 */
bool lshm__msgring_publish_head(struct lshm_msgring *r);

/*
 * About to sleep: set wake = 1 and look at tail again.  True: the ring is
 * empty, sleep (on the futex, or until a WAKE).  False: records came, wake
 * is 0 again.  lshm__msgring_awake clears wake when the consumer runs.
 */
bool lshm__msgring_may_sleep(struct lshm_msgring *r);
void lshm__msgring_awake(struct lshm_msgring *r);

/* The futex word a sleeping consumer waits on (its value 1 while asleep). */
uint32_t *lshm__msgring_wake_word(struct lshm_msgring *r);

/* FUTEX_WAKE on a shared futex word with the system call (no io_uring). */
int  lshm__futex_wake(uint32_t *word);

/* Unmap, and close the fd if still held (nothing for a ring never made);
 * r can be created again after. */
void lshm__msgring_free(struct lshm_msgring *r);

#endif
