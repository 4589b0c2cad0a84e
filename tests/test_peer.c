/*
 * Peers: the process-wide registry, outgoing allocation (segment creation,
 * sent_over, the segment limit and oosm, when a segment past the first
 * is made, what wakes a waiting sender), incoming order, table growth,
 * teardown, and what a forked child keeps of it all (nothing).
 */
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"
#include "shm.h"

#define FAKE_PID  424242
#define PEER_PID  515151

#if defined(__SANITIZE_THREAD__)
#define UNDER_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define UNDER_TSAN 1
#endif
#endif

static struct lshm_alloc alloc_ok(struct lshm_peer *peer, uint16_t port, unsigned limit)
{
    struct lshm_alloc a;
    int ret = lshm__peer_out_alloc(peer, port, limit, false, false, &a);

    cr_assert_eq(ret, 0, "out_alloc: %d", ret);
    return a;
}

/*
 * Past LSHM_SEGMENTS_AT_ONCE a segment is made only once the others were
 * full for LSHM_GROW_WAIT_MS with no chunk given back: retry as a waiting
 * sender does.
 */
static struct lshm_alloc alloc_grow(struct lshm_peer *peer, uint16_t port, unsigned limit)
{
    long long end = now_ms() + 5000;
    struct lshm_alloc a;
    int ret;

    while ((ret = lshm__peer_out_alloc(peer, port, limit, false, false, &a)) == -EAGAIN &&
           now_ms() < end)
        usleep(1000);
    cr_assert_eq(ret, 0, "out_alloc: %d", ret);
    return a;
}

/* What lshm__seg_import does when the receiver has mapped the segment. */
static void receiver_maps(struct lshm_seg *seg)
{
    __atomic_store_n(&seg->hdr->sent_over, (uint16_t)LSHM_SENT_OVER_ANY, __ATOMIC_RELEASE);
}

/* Claim every chunk still free in seg, as the sender's buffers would. */
static void fill_chunks(struct lshm_seg *seg)
{
    uint32_t c = 0;

    while (lshm__chunk_get_free(seg->hdr->free_map, &c))
        ;
    for (c = 0; c < LSHM_CHUNK_COUNT; c++)
        cr_assert_not(lshm__chunk_is_free(seg->hdr->free_map, c), "chunk %u", c);
}

LTEST(peer, get_same_pid_same_peer)
{
    struct lshm_peer *p1, *p2, *p3;

    cr_assert_eq(lshm__peer_get(FAKE_PID, &p1), 0);
    cr_assert_eq(lshm__peer_get(FAKE_PID, &p2), 0);
    cr_assert_eq(lshm__peer_get(FAKE_PID + 1, &p3), 0);
    cr_assert_eq(p1, p2);
    cr_assert_neq(p1, p3);
    cr_assert_eq(p1->pid, FAKE_PID);
    cr_assert_eq(p1->refs, 2);
    lshm__peer_put(p2);
    cr_assert_eq(p1->refs, 1);
    lshm__peer_put(p1);
    lshm__peer_put(p3);
    lshm__peer_put(NULL);
}

LTEST(peer, get_rejects_bad_pid)
{
    struct lshm_peer *p = NULL;

    cr_assert_eq(lshm__peer_get(0, &p), -EINVAL);
    cr_assert_eq(lshm__peer_get(-5, &p), -EINVAL);
    cr_assert_null(p);
}

LTEST(peer, out_alloc_creates_then_reuses)
{
    struct lshm_peer *peer;
    struct lshm_alloc a, b, t;

    cr_assert_eq(lshm__peer_get(FAKE_PID, &peer), 0);
    a = alloc_ok(peer, 3, 4);
    cr_assert(a.created);
    cr_assert_eq(a.chunk, 0, "the first chunk is claimed like any other");
    cr_assert_eq(a.seg->id, 0);
    cr_assert_eq(a.seg->hdr->id, 0);
    cr_assert_eq(a.seg->hdr->src_pid, getpid());
    cr_assert_eq(a.seg->hdr->dst_pid, FAKE_PID);
    cr_assert_eq(a.seg->hdr->sent_over, 3);
    cr_assert_geq(a.seg->fd, 0, "the fd waits for its MMAP message");
    cr_assert_eq(atomic_load(&a.seg->use), 2, "table + alloc");
    cr_assert_not(lshm__chunk_is_free(a.seg->hdr->free_map, 0));
    cr_assert(lshm__chunk_is_free(a.seg->hdr->free_map, 1));

    b = alloc_ok(peer, 3, 4);
    cr_assert_not(b.created);
    cr_assert_eq(b.seg, a.seg);
    cr_assert_eq(b.chunk, 1);

    cr_assert_eq(lshm__peer_out_alloc(peer, 3, 4, true, false, &t), 0);
    cr_assert_not(t.created, "tracking slots come from the same segment");
    cr_assert_eq(t.seg, a.seg);
    cr_assert_eq(t.chunk, 0);
    cr_assert_not(lshm__chunk_is_free(a.seg->hdr->free_tracking_map, 0));
    cr_assert(lshm__chunk_is_free(a.seg->hdr->free_map, 2), "not from the chunk map");
    cr_assert_eq(peer->out.size, 1);

    lshm__seg_unref(a.seg);
    lshm__seg_unref(b.seg);
    lshm__seg_unref(t.seg);
    lshm__peer_put(peer);
}

/* Until the receiver has mapped it, a segment is its own port's only. */
LTEST(peer, sent_over_limits_use)
{
    struct lshm_peer *peer;
    struct lshm_alloc a, b, c, d, x;

    cr_assert_eq(lshm__peer_get(FAKE_PID, &peer), 0);
    a = alloc_ok(peer, 1, 4);
    cr_assert_eq(lshm__peer_out_alloc(peer, 2, 4, false, false, &x), -EAGAIN);
    cr_assert(lshm__chunk_is_free(a.seg->hdr->free_map, 1),
              "port 2 may not use port 1's unmapped segment");
    cr_assert_eq(peer->out.size, 1);

    /* Mapped, then filled by port 1: port 2 gets a segment of its own. */
    receiver_maps(a.seg);
    fill_chunks(a.seg);
    b = alloc_grow(peer, 2, 4);
    cr_assert(b.created);
    cr_assert_neq(b.seg, a.seg);
    cr_assert_eq(b.seg->id, 1);
    cr_assert_eq(b.seg->hdr->sent_over, 2);
    cr_assert_eq(lshm__peer_out_alloc(peer, 1, 4, false, false, &x), -EAGAIN);
    cr_assert(lshm__chunk_is_free(b.seg->hdr->free_map, 1),
              "port 1 may not use port 2's unmapped segment");
    cr_assert_eq(peer->out.size, 2);

    /* The receiver frees chunk 1 of segment 0. */
    lshm__seg_free_chunks(a.seg, 1, 1);
    c = alloc_ok(peer, 2, 4);
    cr_assert_not(c.created);
    cr_assert_eq(c.seg, a.seg, "mapped segments serve every port, first one first");
    cr_assert_eq(c.chunk, 1);

    receiver_maps(b.seg);
    d = alloc_ok(peer, 1, 4);
    cr_assert_not(d.created);
    cr_assert_eq(d.seg, b.seg, "once mapped, port 2's segment serves port 1 too");
    cr_assert_eq(d.chunk, 1);
    lshm__seg_unref(a.seg);
    lshm__seg_unref(b.seg);
    lshm__seg_unref(c.seg);
    lshm__seg_unref(d.seg);
    lshm__peer_put(peer);
}

/*
 * Segment ids are ordered per process pair, ports are not: a port may not
 * create (announce) a segment while one announced on another port is not
 * mapped yet.  Its own unmapped segments do not hold it back.
 */
LTEST(peer, other_port_waits_for_mapping)
{
    struct lshm_peer *peer;
    struct lshm_alloc a, b, x;
    int fds = count_fds();

    cr_assert_eq(lshm__peer_get(FAKE_PID, &peer), 0);
    a = alloc_ok(peer, 1, 8);
    cr_assert(a.created);
    cr_assert_eq(a.seg->id, 0);
    cr_assert_eq(count_maps("memfd:lshm"), 1);
    cr_assert_eq(count_fds(), fds + 1);

    cr_assert_eq(lshm__peer_out_alloc(peer, 2, 8, false, false, &x), -EAGAIN);
    cr_assert_eq(lshm__peer_out_alloc(peer, 2, 8, true, false, &x), -EAGAIN,
                 "tracking too");
    cr_assert_eq(peer->out.size, 1, "nothing created");
    cr_assert_eq(count_maps("memfd:lshm"), 1, "no new mapping");
    cr_assert_eq(count_fds(), fds + 1, "no new memfd");
    cr_assert_eq(a.seg->hdr->oosm, 0, "not the limit: no oosm");
    cr_assert(lshm__chunk_is_free(a.seg->hdr->free_map, 1));

    /* The receiver maps segment 0: port 2 uses its free chunks, then creates. */
    receiver_maps(a.seg);
    for (uint32_t i = 1; i < LSHM_CHUNK_COUNT; i++) {
        b = alloc_ok(peer, 2, 8);
        cr_assert_not(b.created, "alloc %u", i);
        cr_assert_eq(b.seg, a.seg);
        cr_assert_eq(b.chunk, i);
        lshm__seg_unref(b.seg);
    }
    b = alloc_grow(peer, 2, 8);
    cr_assert(b.created, "segment 0 is full");
    cr_assert_eq(b.seg->id, 1);
    cr_assert_eq(b.seg->hdr->sent_over, 2);
    cr_assert_eq(b.chunk, 0);
    cr_assert_eq(peer->out.size, 2);
    cr_assert_eq(count_maps("memfd:lshm"), 2);

    /* Now port 1 waits for segment 1. */
    cr_assert_eq(lshm__peer_out_alloc(peer, 1, 8, false, false, &x), -EAGAIN);
    cr_assert_eq(peer->out.size, 2);

    /* A port is never held back by its own unmapped segments. */
    receiver_maps(b.seg);
    fill_chunks(b.seg);
    for (uint32_t id = 2; id < 5; id++) {
        x = alloc_grow(peer, 1, 8);
        cr_assert(x.created, "segment %u", id);
        cr_assert_eq(x.seg->id, id);
        cr_assert_eq(x.seg->hdr->sent_over, 1);
        fill_chunks(x.seg);
        lshm__seg_unref(x.seg);
    }
    for (uint32_t id = 2; id < 5; id++)
        cr_assert_eq(peer->out.elts[id]->hdr->sent_over, 1, "segment %u unmapped", id);
    cr_assert_eq(lshm__peer_out_alloc(peer, 2, 8, false, false, &x), -EAGAIN);
    cr_assert_eq(peer->out.size, 5);
    cr_assert_eq(count_maps("memfd:lshm"), 5);

    lshm__seg_unref(a.seg);
    lshm__seg_unref(b.seg);
    lshm__peer_put(peer);
    cr_assert_eq(count_maps("memfd:lshm"), 0);
    cr_assert_eq(count_fds(), fds);
}

LTEST(peer, limit_returns_eagain_and_sets_oosm)
{
    struct lshm_peer *peer;
    struct lshm_alloc a, other, t;
    struct lshm_seg *s0, *s1;

    cr_assert_eq(lshm__peer_get(FAKE_PID, &peer), 0);
    for (uint32_t i = 0; i < 2 * LSHM_CHUNK_COUNT; i++) {
        a = i == LSHM_CHUNK_COUNT ? alloc_grow(peer, 1, 3) : alloc_ok(peer, 1, 3);
        cr_assert_eq(a.created, i % LSHM_CHUNK_COUNT == 0, "alloc %u", i);
        cr_assert_eq(a.chunk, i % LSHM_CHUNK_COUNT);
        cr_assert_eq(a.seg->id, i / LSHM_CHUNK_COUNT);
        lshm__seg_unref(a.seg);
    }
    s0 = peer->out.elts[0];
    s1 = peer->out.elts[1];
    /* Mapped (and full): another port may create a segment. */
    receiver_maps(s0);
    receiver_maps(s1);
    /* A segment of another port must not be flagged. */
    other = alloc_grow(peer, 9, 3);
    cr_assert(other.created);
    cr_assert_eq(other.seg->id, 2);
    cr_assert_eq(other.seg->hdr->sent_over, 9);
    /* Port 9 waited for the third segment with s0 and s1 flagged: as the
     * receiver would, take the flags, to see the limit's own. */
    lshm__seg_take_oosm(s0);
    lshm__seg_take_oosm(s1);
    cr_assert_eq(s0->hdr->oosm, 0);
    cr_assert_eq(lshm__peer_out_alloc(peer, 1, 3, false, false, &a), -EAGAIN);
    cr_assert_eq(peer->out.size, 3, "no segment past the limit");
    cr_assert_eq(s0->hdr->oosm, 1);
    cr_assert_eq(s1->hdr->oosm, 1);
    cr_assert_eq(other.seg->hdr->oosm, 0, "another port's segment is not flagged");

    /* Tracking slots are counted apart from chunks. */
    cr_assert_eq(lshm__peer_out_alloc(peer, 1, 3, true, false, &t), 0);
    lshm__chunk_set_free(t.seg->hdr->free_tracking_map, t.chunk);
    lshm__seg_unref(t.seg);

    /* The receiver frees a chunk and takes the flag: one ACK. */
    lshm__seg_free_chunks(s1, 100, 1);
    cr_assert(lshm__seg_take_oosm(s1));
    cr_assert_not(lshm__seg_take_oosm(s1));
    a = alloc_ok(peer, 1, 3);
    cr_assert_not(a.created);
    cr_assert_eq(a.seg, s1);
    cr_assert_eq(a.chunk, 100);
    lshm__seg_unref(a.seg);
    lshm__seg_unref(other.seg);
    lshm__peer_put(peer);
}

/* Two full segments, mapped by the receiver, for port 1 (limit 8). */
static void two_full_segments(struct lshm_peer *peer, struct lshm_seg **s0, struct lshm_seg **s1)
{
    struct lshm_alloc a;

    for (uint32_t id = 0; id < 2; id++) {
        a = id < LSHM_SEGMENTS_AT_ONCE ? alloc_ok(peer, 1, 8) : alloc_grow(peer, 1, 8);
        cr_assert(a.created, "segment %u", id);
        receiver_maps(a.seg);
        fill_chunks(a.seg);
        lshm__seg_unref(a.seg);
    }
    *s0 = peer->out.elts[0];
    *s1 = peer->out.elts[1];
}

LTEST(peer, another_segment_only_for_a_reader_that_gives_nothing_back)
{
    struct lshm_peer *peer;
    struct lshm_alloc a;
    struct lshm_seg *s0, *s1;
    long long t0;

    cr_assert_eq(lshm__peer_get(FAKE_PID, &peer), 0);
    two_full_segments(peer, &s0, &s1);
    t0 = now_ms();
    cr_assert_eq(lshm__peer_out_alloc(peer, 1, 8, false, false, &a), -EAGAIN,
                 "another segment at once");
    cr_assert_str_neq(lshm_last_error(), "");
    cr_assert_eq(peer->out.size, 2);
    cr_assert_eq(s0->hdr->oosm, 1, "the reader is asked to say when it frees");
    cr_assert_eq(s1->hdr->oosm, 1);
    cr_assert_not(lshm__peer_out_has_room(peer, 1, 8));
    usleep((LSHM_GROW_WAIT_MS + 5) * 1000);
    /* Nothing came back all that time: the reader is stalled, grow. */
    cr_assert(lshm__peer_out_has_room(peer, 1, 8));
    a = alloc_ok(peer, 1, 8);
    cr_assert(a.created);
    cr_assert_eq(a.seg->id, 2);
    cr_assert_geq(now_ms() - t0, LSHM_GROW_WAIT_MS);
    lshm__seg_unref(a.seg);
    lshm__peer_put(peer);
}

LTEST(peer, reader_giving_chunks_back_keeps_the_segment_count)
{
    struct lshm_peer *peer;
    struct lshm_alloc a;
    struct lshm_seg *s0, *s1;

    cr_assert_eq(lshm__peer_get(FAKE_PID, &peer), 0);
    two_full_segments(peer, &s0, &s1);
    for (uint32_t round = 0; round < 3; round++) {
        cr_assert_eq(lshm__peer_out_alloc(peer, 1, 8, false, false, &a), -EAGAIN,
                     "round %u", round);
        usleep((LSHM_GROW_WAIT_MS + 5) * 1000);
        /* The reader freed a chunk meanwhile, and took the flag (SHM_ACK). */
        lshm__seg_free_chunks(s1, 10 + round, 1);
        cr_assert(lshm__seg_take_oosm(s1));
        a = alloc_ok(peer, 1, 8);
        cr_assert_not(a.created, "round %u: a segment made for a reader that keeps up",
                      round);
        cr_assert_eq(a.seg, s1);
        cr_assert_eq(a.chunk, 10 + round);
        lshm__seg_unref(a.seg);
    }
    cr_assert_eq(peer->out.size, 2);
    cr_assert_eq(count_maps("memfd:lshm"), 2);
    lshm__peer_put(peer);
}

LTEST(peer, has_room_after_a_failure_waits_for_more_than_was_free)
{
    struct lshm_peer *peer;
    struct lshm_alloc a;
    struct lshm_seg *s0, *s1;

    cr_assert_eq(lshm__peer_get(FAKE_PID, &peer), 0);
    two_full_segments(peer, &s0, &s1);
    cr_assert_eq(lshm__peer_out_alloc(peer, 1, 2, false, false, &a), -EAGAIN, "limit 2");
    /* The sender gives back part of a payload it could not complete... */
    lshm__seg_free_chunks(s0, 0, 3);
    /* ...which does not make room for what failed: no wake-up for it. */
    cr_assert_not(lshm__peer_out_has_room(peer, 1, 2));
    cr_assert_not(lshm__peer_out_has_room(peer, 1, 2));
    /* The reader frees a chunk without a word: that is news. */
    lshm__seg_free_chunks(s1, 7, 1);
    cr_assert(lshm__peer_out_has_room(peer, 1, 2));
    /* A success ends the wait: any free chunk is room again. */
    a = alloc_ok(peer, 1, 2);
    lshm__seg_unref(a.seg);
    cr_assert(lshm__peer_out_has_room(peer, 1, 2));
    lshm__peer_put(peer);
}

LTEST(peer, limit_zero_creates_nothing)
{
    struct lshm_peer *peer;
    struct lshm_alloc a;

    cr_assert_eq(lshm__peer_get(FAKE_PID, &peer), 0);
    cr_assert_eq(lshm__peer_out_alloc(peer, 1, 0, false, false, &a), -EAGAIN);
    cr_assert_eq(peer->out.size, 0);
    cr_assert_eq(count_maps("memfd:lshm"), 0);
    lshm__peer_put(peer);
}

LTEST(peer, out_drop_undoes_creation)
{
    struct lshm_peer *peer;
    struct lshm_alloc a, b, c;

    cr_assert_eq(lshm__peer_get(FAKE_PID, &peer), 0);
    a = alloc_ok(peer, 1, 4);
    lshm__peer_out_drop(peer, a.seg);
    cr_assert_eq(peer->out.size, 0);
    cr_assert_eq(atomic_load(&a.seg->use), 1, "the alloc's reference remains");
    lshm__seg_unref(a.seg);
    cr_assert_eq(count_maps("memfd:lshm"), 0);

    b = alloc_ok(peer, 1, 4);
    cr_assert(b.created);
    cr_assert_eq(b.seg->id, 0, "the id is handed out again");
    /* Another thread on the port fills it and creates segment 1. */
    fill_chunks(b.seg);
    c = alloc_grow(peer, 1, 4);
    cr_assert(c.created);
    cr_assert_eq(c.seg->id, 1);
    lshm__peer_out_drop(peer, b.seg);
    cr_assert_eq(peer->out.size, 2, "not the last one: kept");
    lshm__seg_unref(b.seg);
    lshm__seg_unref(c.seg);
    lshm__peer_put(peer);
}

/* A segment made by "the peer" and validated as it would be on receipt. */
static struct lshm_seg *incoming(uint32_t id)
{
    struct lshm_seg *theirs, *seg;

    cr_assert_eq(lshm__seg_create(id, PEER_PID, getpid(), 1, &theirs), 0);
    cr_assert_eq(lshm__seg_import(theirs->fd, id, PEER_PID, getpid(), &seg), 0);
    lshm__seg_unref(theirs);
    return seg;
}

LTEST(peer, incoming_ids_in_order)
{
    struct lshm_peer *peer;
    struct lshm_seg *in0 = incoming(0), *in1 = incoming(1), *in2 = incoming(2), *got;

    cr_assert_eq(lshm__peer_get(PEER_PID, &peer), 0);
    cr_assert_eq(lshm__peer_in_next(peer), 0);
    cr_assert_eq(lshm__peer_in_add(peer, in0, 4), 0);
    cr_assert_eq(lshm__peer_in_next(peer), 1);
    cr_assert_eq(lshm__peer_in_add(peer, in2, 4), -EPROTO, "id 1 skipped");
    cr_assert_eq(lshm__peer_in_add(peer, in0, 4), -EPROTO, "id 0 twice");
    cr_assert_eq(lshm__peer_in_next(peer), 1);
    cr_assert_eq(lshm__peer_in_add(peer, in1, 4), 0);
    cr_assert_eq(lshm__peer_in_add(peer, in2, 2), -ENOSPC, "past the limit");
    cr_assert_eq(lshm__peer_in_next(peer), 2);
    cr_assert_eq(lshm__peer_in_add(peer, in2, 4), 0);
    cr_assert_eq(atomic_load(&in2->use), 2, "the table took a reference");

    got = lshm__peer_in_get(peer, 1);
    cr_assert_eq(got, in1);
    cr_assert_eq(atomic_load(&in1->use), 3);
    lshm__seg_unref(got);
    cr_assert_null(lshm__peer_in_get(peer, 3));
    cr_assert_null(lshm__peer_in_get(peer, 0xffffffffu));

    lshm__seg_unref(in0);
    lshm__seg_unref(in1);
    lshm__seg_unref(in2);
    cr_assert_eq(count_maps("memfd:lshm"), 3);
    lshm__peer_put(peer);
    cr_assert_eq(count_maps("memfd:lshm"), 0);
}

/* Unit's port_mmap_at: doubling below 16, then +50%. */
LTEST(peer, table_grows_like_unit)
{
    static const uint32_t caps[] = {
        1, 2, 4, 4, 8, 8, 8, 8,
        16, 16, 16, 16, 16, 16, 16, 16,
        24, 24, 24, 24, 24, 24, 24, 24,
        36, 36, 36, 36, 36, 36, 36, 36, 36, 36, 36, 36,
        54, 54, 54, 54,
    };
    struct lshm_peer *peer;
    struct lshm_alloc a;

    cr_assert_eq(lshm__peer_get(FAKE_PID, &peer), 0);
    for (uint32_t i = 0; i < ARRAY_SIZE(caps); i++) {
        a = alloc_grow(peer, 100, ARRAY_SIZE(caps));
        cr_assert(a.created);
        cr_assert_eq(a.seg->id, i);
        cr_assert_eq(peer->out.size, i + 1);
        cr_assert_eq(peer->out.cap, caps[i], "size %u: cap %u, want %u", i + 1,
                     peer->out.cap, caps[i]);
        /* Full: no existing segment is usable for the next alloc. */
        fill_chunks(a.seg);
        lshm__seg_unref(a.seg);
    }
    for (uint32_t i = 0; i < ARRAY_SIZE(caps); i++)
        cr_assert_eq(peer->out.elts[i]->hdr->id, i);
    cr_assert_eq(count_maps("memfd:lshm"), (int)ARRAY_SIZE(caps));
    lshm__peer_put(peer);
}

LTEST(peer, put_releases_every_segment)
{
    struct lshm_peer *peer, *again;
    struct lshm_alloc a;
    int fds = count_fds();

    cr_assert_eq(lshm__peer_get(PEER_PID, &peer), 0);
    cr_assert_eq(lshm__peer_get(PEER_PID, &again), 0);
    for (uint32_t id = 0; id < 3; id++) {
        /* One port: segments still waiting for their MMAP hold no other back. */
        a = alloc_grow(peer, 1, 8);
        cr_assert(a.created);
        cr_assert_eq(a.seg->id, id);
        fill_chunks(a.seg);
        lshm__seg_unref(a.seg);
    }
    cr_assert_eq(peer->out.size, 3);
    lshm__seg_close_fd(peer->out.elts[1]);
    for (uint32_t id = 0; id < 2; id++) {
        struct lshm_seg *in = incoming(id);

        cr_assert_eq(lshm__peer_in_add(peer, in, 8), 0);
        lshm__seg_unref(in);
    }
    cr_assert_eq(count_maps("memfd:lshm"), 5);
    cr_assert_eq(count_fds(), fds + 2, "two outgoing fds still unsent");
    lshm__peer_put(again);
    cr_assert_eq(count_maps("memfd:lshm"), 5, "still referenced");
    lshm__peer_put(peer);
    cr_assert_eq(count_maps("memfd:lshm"), 0);
    cr_assert_eq(count_fds(), fds);

    /* Gone from the registry: a new get starts empty. */
    cr_assert_eq(lshm__peer_get(PEER_PID, &peer), 0);
    cr_assert_eq(peer->out.size, 0);
    cr_assert_eq(peer->in.size, 0);
    lshm__peer_put(peer);
}

LTEST(peer, buffer_outlives_peer)
{
    struct lshm_peer *peer;
    struct lshm_alloc a;
    struct lshm_buf *buf;

    cr_assert_eq(lshm__peer_get(FAKE_PID, &peer), 0);
    a = alloc_ok(peer, 1, 2);
    cr_assert_eq(lshm__buf_from_alloc(&a, peer, 40000, &buf), 0);
    lshm__peer_put(peer);
    cr_assert_eq(count_maps("memfd:lshm"), 1, "the buffer keeps its segment");
    ((char *)lshm_buf_data(buf))[lshm_buf_capacity(buf) - 1] = 1;
    lshm_buf_free(buf);
    cr_assert_eq(count_maps("memfd:lshm"), 0);
}

/*
 * Parent's state for the fork tests: two outgoing segments (one sent,
 * mapped by the receiver and full; one with its fd still open) and one
 * incoming.
 */
static struct lshm_peer *fork_setup(int *open_fd)
{
    struct lshm_peer *peer;
    struct lshm_alloc a;
    struct lshm_seg *in = incoming(0);

    cr_assert_eq(lshm__peer_get(PEER_PID, &peer), 0);
    a = alloc_ok(peer, 2, 4);
    lshm__seg_close_fd(a.seg);
    receiver_maps(a.seg);
    fill_chunks(a.seg);
    lshm__seg_unref(a.seg);
    a = alloc_grow(peer, 1, 4);
    cr_assert(a.created);
    cr_assert_eq(a.seg->id, 1);
    *open_fd = a.seg->fd;
    lshm__seg_unref(a.seg);
    cr_assert_eq(lshm__peer_in_add(peer, in, 4), 0);
    lshm__seg_unref(in);
    cr_assert_eq(count_maps("memfd:lshm"), 3);
    return peer;
}

/* In the child: bit n of the exit status is check n failing. */
static int child_checks(int open_fd, bool forgotten_already)
{
    struct lshm_peer *p;
    struct lshm_alloc a;
    int fail = 0;

    if (count_maps("memfd:lshm") != 0)
        fail |= 1;
    if ((fcntl(open_fd, F_GETFD) >= 0) != !forgotten_already)
        fail |= 2;
    if (lshm__peer_get(PEER_PID, &p) != 0)
        return fail | 4;
    if (p->out.size != 0 || p->in.size != 0 || p->refs != 1)
        fail |= 8;
    if (fcntl(open_fd, F_GETFD) >= 0)
        fail |= 16;
    if (lshm__peer_out_alloc(p, 1, 4, false, false, &a) != 0)
        return fail | 32;
    if (!a.created || a.seg->id != 0 || a.chunk != 0 || a.seg->hdr->src_pid != getpid())
        fail |= 64;
    lshm__seg_unref(a.seg);
    lshm__peers_forget();
    lshm__peer_put(p);
    if (count_maps("memfd:lshm") != 0)
        fail |= 128;
    return fail;
}

static void parent_checks(struct lshm_peer *peer, int open_fd, int status)
{
    struct lshm_alloc a;

    cr_expect(WIFEXITED(status), "child status %d", status);
    cr_expect_eq(WEXITSTATUS(status), 0, "child checks failed: %#x", WEXITSTATUS(status));
    cr_assert_geq(fcntl(open_fd, F_GETFD), 0, "the parent's fd is untouched");
    cr_assert_eq(count_maps("memfd:lshm"), 3);
    cr_assert_eq(peer->out.size, 2);
    a = alloc_ok(peer, 1, 4);
    cr_assert_not(a.created);
    cr_assert_eq(a.seg, peer->out.elts[1]);
    cr_assert_eq(a.chunk, 1);
    lshm__peers_forget();
    cr_assert_eq(peer->out.size, 2, "forget does nothing in the owner");
    lshm__seg_unref(a.seg);
    lshm__peer_put(peer);
    cr_assert_eq(count_maps("memfd:lshm"), 0);
}

LTEST(peer, forked_child_forgets)
{
    int open_fd;
    struct lshm_peer *peer = fork_setup(&open_fd);
    pid_t child = fork();

    cr_assert_geq(child, 0);
    if (child == 0) {
        /* The atfork handler ran: the fd is closed before any call. */
        _exit(child_checks(open_fd, true));
    }
    parent_checks(peer, open_fd, wait_child(child, 5000));
}

/* Without atfork handlers (a raw fork), lshm__peer_get notices by itself. */
LTEST(peer, raw_forked_child_forgets_in_get)
{
    int open_fd;
    struct lshm_peer *peer;
    pid_t child;

#ifdef UNDER_TSAN
    cr_skip_test("a raw fork() confuses ThreadSanitizer");
#endif
    peer = fork_setup(&open_fd);
    child = (pid_t)syscall(SYS_fork);
    cr_assert_geq(child, 0);
    if (child == 0)
        _exit(child_checks(open_fd, false));
    parent_checks(peer, open_fd, wait_child(child, 5000));
}
