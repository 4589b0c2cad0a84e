/*
 * The chunk allocator: the bitmap search and its edges, buffers built from
 * runs of chunks, growth and its rollback, release after a send, and two
 * owners (threads, then processes) sharing one segment.
 */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"
#include "pattern.h"
#include "shm.h"

#define CH        ((size_t)LSHM_CHUNK_SIZE)
#define FAKE_PID  424242

static uint64_t map[LSHM_FREE_WORDS + 1];

static void map_fill(bool free)
{
    for (unsigned w = 0; w < LSHM_FREE_WORDS; w++)
        map[w] = free ? ~0ull : 0;
    map[LSHM_FREE_WORDS] = 0;
}

static void map_set(uint32_t c, bool free)
{
    if (free)
        map[c / 64] |= 1ull << (c % 64);
    else
        map[c / 64] &= ~(1ull << (c % 64));
}

static unsigned map_free_count(const uint64_t *m)
{
    unsigned n = 0;

    for (unsigned w = 0; w < LSHM_FREE_WORDS; w++)
        n += (unsigned)__builtin_popcountll(m[w]);
    return n;
}

/* ---- the search ---- */

Test(chunk, search_starts_at_chunk_0)
{
    uint32_t c = 0;

    map_fill(true);
    cr_assert(lshm__chunk_get_free(map, &c));
    cr_assert_eq(c, 0);
    cr_assert_eq(map[0], ~1ull, "only bit 0 claimed");
    c = 0;
    cr_assert(lshm__chunk_get_free(map, &c));
    cr_assert_eq(c, 1);
    cr_assert_eq(map_free_count(map), LSHM_CHUNK_COUNT - 2);
}

Test(chunk, search_crosses_word_boundary)
{
    uint32_t c = 0;

    map_fill(false);
    map_set(63, true);
    map_set(64, true);
    cr_assert(lshm__chunk_get_free(map, &c));
    cr_assert_eq(c, 63);
    c = 0;
    cr_assert(lshm__chunk_get_free(map, &c));
    cr_assert_eq(c, 64);
    c = 0;
    cr_assert_not(lshm__chunk_get_free(map, &c));
    cr_assert_eq(map_free_count(map), 0);
}

Test(chunk, search_finds_last_chunk)
{
    uint32_t c = 0;

    map_fill(false);
    map_set(639, true);
    cr_assert(lshm__chunk_get_free(map, &c));
    cr_assert_eq(c, 639);
    c = 0;
    cr_assert_not(lshm__chunk_get_free(map, &c));
    cr_assert_eq(map[LSHM_FREE_WORDS], 0, "the padding word is not touched");
}

/* A peer can set the padding bits: they must never become chunks 640+. */
Test(chunk, search_ignores_padding_word)
{
    uint32_t hints[] = { 0, 600, 639 };

    map_fill(false);
    map[LSHM_FREE_WORDS] = ~0ull;
    for (unsigned i = 0; i < ARRAY_SIZE(hints); i++) {
        uint32_t c = hints[i];

        cr_assert_not(lshm__chunk_get_free(map, &c), "hint %u", hints[i]);
    }
    cr_assert_eq(map[LSHM_FREE_WORDS], ~0ull, "padding not written");
}

Test(chunk, search_hint_mid_word)
{
    uint32_t c;

    map_fill(false);
    map_set(65, true);
    map_set(71, true);
    map_set(130, true);
    c = 67;
    cr_assert(lshm__chunk_get_free(map, &c));
    cr_assert_eq(c, 71, "bits below the hint are skipped");
    c = 67;
    cr_assert(lshm__chunk_get_free(map, &c));
    cr_assert_eq(c, 130, "then the following words are searched");
    c = 67;
    cr_assert_not(lshm__chunk_get_free(map, &c));
    cr_assert_eq(map_free_count(map), 1);
    cr_assert(map[1] & (1ull << 1), "chunk 65 is still free");
    c = 65;
    cr_assert(lshm__chunk_get_free(map, &c));
    cr_assert_eq(c, 65, "a hint on a free chunk takes it");
}

Test(chunk, search_hint_out_of_range)
{
    uint32_t hints[] = { LSHM_CHUNK_COUNT, LSHM_CHUNK_COUNT + 1, 0xffffffffu };

    map_fill(true);
    map[LSHM_FREE_WORDS] = ~0ull;
    for (unsigned i = 0; i < ARRAY_SIZE(hints); i++) {
        uint32_t c = hints[i];

        cr_assert_not(lshm__chunk_get_free(map, &c));
        cr_assert_eq(c, hints[i]);
    }
    cr_assert_eq(map_free_count(map), LSHM_CHUNK_COUNT);
}

Test(chunk, search_hands_out_every_chunk_once)
{
    uint32_t c;

    map_fill(true);
    for (uint32_t i = 0; i < LSHM_CHUNK_COUNT; i++) {
        c = 0;
        cr_assert(lshm__chunk_get_free(map, &c));
        cr_assert_eq(c, i);
    }
    c = 0;
    cr_assert_not(lshm__chunk_get_free(map, &c));
    cr_assert_eq(map_free_count(map), 0);
    cr_assert_eq(map[LSHM_FREE_WORDS], 0);
}

Test(chunk, primitives_bound_the_index)
{
    map_fill(false);
    map[LSHM_FREE_WORDS] = ~0ull;
    cr_assert_not(lshm__chunk_is_free(map, LSHM_CHUNK_COUNT));
    cr_assert_not(lshm__chunk_try_busy(map, LSHM_CHUNK_COUNT));
    cr_assert_not(lshm__chunk_try_busy(map, 0xffffffffu));
    lshm__chunk_set_busy(map, LSHM_CHUNK_COUNT + 3);
    cr_assert_eq(map[LSHM_FREE_WORDS], ~0ull);
    map[LSHM_FREE_WORDS] = 0;
    lshm__chunk_set_free(map, LSHM_CHUNK_COUNT);
    lshm__chunk_set_free(map, 0xffffffffu);
    cr_assert_eq(map[LSHM_FREE_WORDS], 0);
    cr_assert_eq(map_free_count(map), 0);
    lshm__chunk_set_free(map, 639);
    cr_assert(lshm__chunk_is_free(map, 639));
    cr_assert(lshm__chunk_try_busy(map, 639));
    cr_assert_not(lshm__chunk_try_busy(map, 639), "a busy chunk cannot be claimed twice");
}

/* The word-wise primitives: one atomic operation per word of the map. */
Test(chunk, runs_are_claimed_and_freed_a_word_at_a_time)
{
    map_fill(true);
    map_set(70, false);
    cr_assert_eq(lshm__chunks_try_busy(map, 60, 100), 4, "the run ends with its word");
    cr_assert_eq(map[0], ~0ull >> 4, "chunks 60..63 claimed, no other");
    cr_assert_eq(lshm__chunks_try_busy(map, 64, 100), 6, "and stops at a busy chunk");
    cr_assert_eq(map[1], ~0ull << 7);
    cr_assert_eq(lshm__chunks_try_busy(map, 70, 1), 0, "a busy chunk is no run");
    cr_assert_eq(lshm__chunks_try_busy(map, 128, 3), 3, "want bounds the run");
    cr_assert_eq(map[2], ~7ull);
    cr_assert_eq(lshm__chunks_try_busy(map, 200, 0), 0);
    cr_assert_eq(lshm__chunks_try_busy(map, 0, 64), 60, "up to the chunks claimed before");
    cr_assert_eq(map[0], 0);
    cr_assert_eq(lshm__chunks_try_busy(map, 192, 64), 64, "a whole word in one go");
    cr_assert_eq(map[3], 0);

    lshm__chunks_set_free(map, 62, 9);
    cr_assert_eq(map[0], 3ull << 62, "62 and 63 free again");
    cr_assert_eq(map[1], ~0ull, "64..70 too, 70 with them");
    lshm__chunks_set_free(map, 0, 2 * 64);
    cr_assert_eq(map[0], ~0ull);
    cr_assert_eq(map[2], ~7ull, "nothing past the range");
}

Test(chunk, word_primitives_bound_the_index)
{
    map_fill(false);
    map[LSHM_FREE_WORDS] = ~0ull;
    cr_assert_eq(lshm__chunks_try_busy(map, LSHM_CHUNK_COUNT, 5), 0);
    cr_assert_eq(lshm__chunks_try_busy(map, 0xffffffffu, 5), 0);
    cr_assert_eq(map[LSHM_FREE_WORDS], ~0ull, "the padding is never claimed");
    map[LSHM_FREE_WORDS] = 0;
    lshm__chunks_set_free(map, LSHM_CHUNK_COUNT - 2, 0xffffffffu);
    cr_assert_eq(map[LSHM_FREE_WORDS], 0, "freeing stops at the last chunk");
    cr_assert_eq(map[LSHM_FREE_WORDS - 1], 3ull << 62);
    lshm__chunks_set_free(map, 0xffffffffu, 3);
    cr_assert_eq(map[LSHM_FREE_WORDS], 0);
    cr_assert_eq(lshm__chunks_try_busy(map, LSHM_CHUNK_COUNT - 2, 64), 2,
                 "a run ends at the last chunk");
    cr_assert_eq(map_free_count(map), 0);
}

/* A run across words: the buffer keeps claiming while whole words are free. */
LTEST(chunk, buf_run_crosses_words_and_stops_at_a_busy_chunk)
{
    struct lshm_seg *seg;
    struct lshm_buf *buf;
    struct lshm_alloc a;

    cr_assert_eq(lshm__seg_create(0, getpid(), FAKE_PID, 1, &seg), 0);
    lshm__chunk_set_busy(seg->hdr->free_map, 140);
    cr_assert(lshm__chunk_try_busy(seg->hdr->free_map, 50));
    lshm__seg_ref(seg);
    a = (struct lshm_alloc){ .seg = seg, .chunk = 50, .created = false };
    cr_assert_eq(lshm__buf_from_alloc(&a, NULL, 200 * CH, &buf), 0);
    cr_assert_eq(buf->nchunks, 90, "chunks 50..139: through word 1, stopped in word 2");
    for (uint32_t c = 45; c < 150; c++)
        cr_expect_eq(lshm__chunk_is_free(seg->hdr->free_map, c), c < 50 || c > 140,
                     "chunk %u", c);
    lshm_buf_free(buf);
    for (uint32_t c = 0; c < LSHM_CHUNK_COUNT; c++)
        cr_expect_eq(lshm__chunk_is_free(seg->hdr->free_map, c), c != 140, "chunk %u", c);
    lshm__seg_unref(seg);
}

/* ---- buffers over a real segment ---- */

static struct lshm_seg *new_seg(void)
{
    struct lshm_seg *seg;

    cr_assert_eq(lshm__seg_create(0, getpid(), FAKE_PID, 1, &seg), 0);
    return seg;
}

/* Claim chunk c as an allocation would, with the alloc's own reference. */
static struct lshm_alloc alloc_at(struct lshm_seg *seg, uint32_t c)
{
    struct lshm_alloc a = { .seg = seg, .chunk = c, .created = false };

    cr_assert(lshm__chunk_try_busy(seg->hdr->free_map, c), "chunk %u free", c);
    lshm__seg_ref(seg);
    return a;
}

static struct lshm_buf *buf_at(struct lshm_seg *seg, uint32_t c, size_t size)
{
    struct lshm_alloc a = alloc_at(seg, c);
    struct lshm_buf *buf;

    cr_assert_eq(lshm__buf_from_alloc(&a, NULL, size, &buf), 0);
    return buf;
}

static void snapshot(const struct lshm_seg *seg, uint64_t *out)
{
    memcpy(out, seg->hdr->free_map, (LSHM_FREE_WORDS + 1) * sizeof(uint64_t));
}

static void expect_range(const struct lshm_seg *seg, uint32_t from, uint32_t to, bool free)
{
    for (uint32_t c = from; c < to; c++)
        cr_expect_eq(lshm__chunk_is_free(seg->hdr->free_map, c), free, "chunk %u %s",
                     c, free ? "should be free" : "should be busy");
}

LTEST(chunk, buf_takes_a_run)
{
    struct lshm_seg *seg = new_seg();
    struct lshm_buf *buf = buf_at(seg, 0, 3 * CH + 1);

    cr_assert_eq(buf->chunk, 0);
    cr_assert_eq(buf->nchunks, 4);
    cr_assert_eq(lshm_buf_capacity(buf), 4 * CH);
    cr_assert_eq(buf->size, 3 * CH + 1);
    cr_assert_eq(lshm_buf_data(buf), seg->data);
    expect_range(seg, 0, 4, false);
    expect_range(seg, 4, LSHM_CHUNK_COUNT, true);
    lshm_buf_free(buf);
    expect_range(seg, 0, LSHM_CHUNK_COUNT, true);
    lshm__seg_unref(seg);
}

LTEST(chunk, buf_chunk_counts)
{
    struct lshm_seg *seg = new_seg();
    size_t sizes[] = { 0, 1, CH - 1, CH, CH + 1, 2 * CH };
    uint32_t want[] = { 1, 1, 1, 1, 2, 2 };

    for (unsigned i = 0; i < ARRAY_SIZE(sizes); i++) {
        struct lshm_buf *buf = buf_at(seg, 10, sizes[i]);

        cr_expect_eq(buf->nchunks, want[i], "size %zu: %u chunks", sizes[i], buf->nchunks);
        cr_expect_eq(buf->size, sizes[i]);
        cr_expect(lshm__chunk_is_free(seg->hdr->free_map, 10 + want[i]));
        lshm_buf_free(buf);
    }
    expect_range(seg, 0, LSHM_CHUNK_COUNT, true);
    lshm__seg_unref(seg);
}

/* Longer than the free run: Unit hands out the partial run. */
LTEST(chunk, buf_partial_when_run_is_short)
{
    struct lshm_seg *seg = new_seg();
    struct lshm_buf *buf;

    lshm__chunk_set_busy(seg->hdr->free_map, 5);
    buf = buf_at(seg, 2, 5 * CH);
    cr_assert_eq(buf->nchunks, 3);
    cr_assert_eq(lshm_buf_capacity(buf), 3 * CH);
    cr_assert_eq(buf->size, 3 * CH, "size is clipped to the capacity");
    expect_range(seg, 2, 6, false);
    expect_range(seg, 6, 12, true);
    lshm_buf_free(buf);
    expect_range(seg, 2, 5, true);
    expect_range(seg, 5, 6, false);
    lshm__seg_unref(seg);
}

/* The run stops at chunk 639 whatever a peer wrote into the padding. */
LTEST(chunk, buf_run_stops_at_end)
{
    struct lshm_seg *seg = new_seg();
    uint64_t pads[] = { 0, ~0ull };

    for (unsigned i = 0; i < ARRAY_SIZE(pads); i++) {
        struct lshm_buf *buf;

        seg->hdr->free_map_padding = pads[i];
        buf = buf_at(seg, 638, 5 * CH);
        cr_assert_eq(buf->nchunks, 2);
        cr_assert_eq(seg->hdr->free_map_padding, pads[i]);
        cr_assert_eq(lshm_buf_grow(buf, 4 * CH, 3 * CH), -ENOMEM);
        cr_assert_eq(buf->nchunks, 2);
        cr_assert_eq(seg->hdr->free_map_padding, pads[i]);
        lshm_buf_free(buf);
        cr_assert_eq(seg->hdr->free_map_padding, pads[i], "free does not touch it");
    }
    lshm__seg_unref(seg);
}

LTEST(chunk, grow_claims_following_chunks)
{
    struct lshm_seg *seg = new_seg();
    struct lshm_buf *buf = buf_at(seg, 0, 100);

    cr_assert_eq(lshm_buf_grow(buf, 3 * CH, 3 * CH), 0);
    cr_assert_eq(lshm_buf_capacity(buf), 3 * CH);
    expect_range(seg, 0, 3, false);
    expect_range(seg, 3, 4, true);
    /* Already large enough: nothing changes. */
    cr_assert_eq(lshm_buf_grow(buf, 2 * CH, 2 * CH), 0);
    cr_assert_eq(lshm_buf_grow(buf, 3 * CH, 0), 0);
    cr_assert_eq(lshm_buf_capacity(buf), 3 * CH);
    expect_range(seg, 3, 4, true);
    /* One byte more is one chunk more. */
    cr_assert_eq(lshm_buf_grow(buf, 3 * CH + 1, 3 * CH + 1), 0);
    cr_assert_eq(lshm_buf_capacity(buf), 4 * CH);
    expect_range(seg, 4, 5, true);
    lshm_buf_free(buf);
    expect_range(seg, 0, LSHM_CHUNK_COUNT, true);
    lshm__seg_unref(seg);
}

LTEST(chunk, grow_partial_above_min_size)
{
    struct lshm_seg *seg = new_seg();
    struct lshm_buf *buf = buf_at(seg, 0, CH);

    lshm__chunk_set_busy(seg->hdr->free_map, 3);
    cr_assert_eq(lshm_buf_grow(buf, 5 * CH, 2 * CH), 0);
    cr_assert_eq(lshm_buf_capacity(buf), 3 * CH, "took chunks 1 and 2, stopped at 3");
    expect_range(seg, 1, 3, false);
    expect_range(seg, 4, 8, true);
    lshm_buf_free(buf);
    expect_range(seg, 0, 3, true);
    lshm__seg_unref(seg);
}

LTEST(chunk, grow_rollback_restores_bits)
{
    struct lshm_seg *seg = new_seg();
    uint64_t before[LSHM_FREE_WORDS + 1], after[LSHM_FREE_WORDS + 1];
    struct lshm_buf *buf = buf_at(seg, 60, 2 * CH);

    /* A run 62..65 across the word boundary, then a busy chunk. */
    lshm__chunk_set_busy(seg->hdr->free_map, 66);
    lshm__chunk_set_busy(seg->hdr->free_map, 10);
    snapshot(seg, before);
    cr_assert_eq(lshm_buf_grow(buf, 10 * CH, 7 * CH), -ENOMEM);
    snapshot(seg, after);
    cr_assert_arr_eq(before, after, sizeof(before), "free map exactly restored");
    cr_assert_eq(buf->chunk, 60);
    cr_assert_eq(lshm_buf_capacity(buf), 2 * CH, "buffer unchanged");
    cr_assert_eq(buf->size, 2 * CH);
    /* min_size exactly reachable: 2 + 4 chunks. */
    cr_assert_eq(lshm_buf_grow(buf, 10 * CH, 6 * CH), 0);
    cr_assert_eq(lshm_buf_capacity(buf), 6 * CH);
    lshm_buf_free(buf);
    expect_range(seg, 60, 66, true);
    lshm__seg_unref(seg);
}

LTEST(chunk, grow_huge_size_does_not_overflow)
{
    struct lshm_seg *seg = new_seg();
    uint64_t before[LSHM_FREE_WORDS + 1], after[LSHM_FREE_WORDS + 1];
    struct lshm_buf *buf = buf_at(seg, 600, 1);

    snapshot(seg, before);
    cr_assert_eq(lshm_buf_grow(buf, SIZE_MAX, SIZE_MAX), -ENOMEM);
    snapshot(seg, after);
    cr_assert_arr_eq(before, after, sizeof(before));
    cr_assert_eq(lshm_buf_grow(buf, SIZE_MAX, 0), 0);
    cr_assert_eq(buf->nchunks, 40, "600..639");
    cr_assert_eq(seg->hdr->free_map_padding, 0);
    lshm_buf_free(buf);
    expect_range(seg, 0, LSHM_CHUNK_COUNT, true);
    lshm__seg_unref(seg);
}

/* Sent chunks are the receiver's to free; only the rest come back. */
LTEST(chunk, release_after_partial_send)
{
    struct lshm_seg *seg = new_seg();
    struct { size_t size; uint32_t kept; } cases[] = {
        { 20000, 2 }, { CH, 1 }, { 1, 1 }, { 4 * CH, 4 }, { 0, 0 },
    };

    for (unsigned i = 0; i < ARRAY_SIZE(cases); i++) {
        struct lshm_buf *buf = buf_at(seg, 100, 4 * CH);

        cr_assert_eq(buf->nchunks, 4);
        cr_assert_eq(lshm_buf_set_size(buf, cases[i].size), 0);
        buf->sent = true;
        lshm__buf_release_sent(buf);
        expect_range(seg, 100, 100 + cases[i].kept, false);
        expect_range(seg, 100 + cases[i].kept, 105, true);
        /* What the receiver does with its descriptor. */
        lshm__seg_free_chunks(seg, 100, cases[i].kept);
        expect_range(seg, 0, LSHM_CHUNK_COUNT, true);
    }
    lshm__seg_unref(seg);
}

/* lshm_buf_free on a sent buffer must not free the receiver's chunks. */
LTEST(chunk, free_of_sent_buffer_keeps_sent_chunks)
{
    struct lshm_seg *seg = new_seg();
    struct lshm_buf *buf = buf_at(seg, 7, 3 * CH);

    cr_assert_eq(lshm_buf_set_size(buf, CH + 5), 0);
    buf->sent = true;
    lshm_buf_free(buf);
    expect_range(seg, 7, 9, false);
    expect_range(seg, 9, 10, true);
    lshm__seg_free_chunks(seg, 7, 2);
    lshm__seg_unref(seg);
}

LTEST(chunk, buf_public_edges)
{
    struct lshm_seg *seg = new_seg();
    struct lshm_buf *buf = buf_at(seg, 3, 2 * CH);

    cr_assert_eq(lshm_buf_grow(NULL, 1, 1), -EINVAL);
    cr_assert_null(lshm_buf_data(NULL));
    cr_assert_eq(lshm_buf_capacity(NULL), 0);
    cr_assert_eq(lshm_buf_set_size(NULL, 0), -EINVAL);
    lshm_buf_free(NULL);

    cr_assert_eq(lshm_buf_data(buf), seg->data + 3 * CH);
    cr_assert_eq(lshm_buf_set_size(buf, 2 * CH + 1), -EINVAL);
    cr_assert_eq(buf->size, 2 * CH);
    cr_assert_eq(lshm_buf_set_size(buf, 2 * CH), 0);
    cr_assert_eq(lshm_buf_set_size(buf, 0), 0);
    cr_assert_eq(buf->size, 0);
    lshm_buf_free(buf);
    expect_range(seg, 0, LSHM_CHUNK_COUNT, true);
    lshm__seg_unref(seg);
}

LTEST(chunk, buf_from_alloc_rejects_bad_chunk)
{
    struct lshm_seg *seg = new_seg();
    struct lshm_alloc a = { .seg = seg, .chunk = LSHM_CHUNK_COUNT };
    struct lshm_buf *buf = NULL;

    cr_assert_eq(lshm__buf_from_alloc(&a, NULL, 1, &buf), -EINVAL);
    cr_assert_null(buf);
    lshm__seg_unref(seg);
}

/* ---- two owners on one segment ---- */

#define STRESS_MS    2000
#define MAX_HELD     24
#define MAX_RUN      8

struct held {
    struct lshm_buf *buf;    /* thread owners */
    uint32_t         chunk;  /* process owner (raw bitmap) */
    uint32_t         n;
    uint64_t         stamp;
};

/*
 * Each owner stamps the first and last word of every chunk it holds and
 * zeroes them before it lets go: a chunk handed out twice shows as a
 * nonzero stamp when taken or a foreign stamp when given back.
 */
static unsigned stamp_take(uint8_t *data, uint32_t chunk, uint32_t n, uint64_t stamp)
{
    unsigned bad = 0;

    for (uint32_t k = 0; k < n; k++) {
        uint64_t *w = (uint64_t *)(data + (size_t)(chunk + k) * CH);
        uint64_t *e = w + CH / 8 - 1;

        bad += (*w != 0) + (*e != 0);
        *w = stamp + k;
        *e = stamp + k;
    }
    return bad;
}

static unsigned stamp_give(uint8_t *data, uint32_t chunk, uint32_t n, uint64_t stamp)
{
    unsigned bad = 0;

    for (uint32_t k = 0; k < n; k++) {
        uint64_t *w = (uint64_t *)(data + (size_t)(chunk + k) * CH);
        uint64_t *e = w + CH / 8 - 1;

        bad += (*w != stamp + k) + (*e != stamp + k);
        *w = 0;
        *e = 0;
    }
    return bad;
}

struct owner {
    struct lshm_peer *peer;
    unsigned          id;
    unsigned          bad;
    unsigned long     ops;
    unsigned long     grows;
};

static void *owner_thread(void *arg)
{
    struct owner *o = arg;
    struct held held[MAX_HELD];
    unsigned nheld = 0;
    uint64_t rng = pattern_seed(o->id);
    uint64_t serial = 0;
    long long end = now_ms() + STRESS_MS;

    for (;;) {
        bool running = now_ms() < end;
        bool take = running && nheld < MAX_HELD &&
                    (nheld == 0 || pattern_rand_below(&rng, 2));

        if (!running && nheld == 0)
            break;

        if (take) {
            struct lshm_alloc a;
            struct held *h = &held[nheld];
            size_t size = (pattern_rand_below(&rng, MAX_RUN) + 1) * CH -
                          pattern_rand_below(&rng, 100);
            int ret = lshm__peer_out_alloc(o->peer, 1, 1, false, false, &a);

            if (ret == -EAGAIN && nheld > 0)
                take = false;
            else if (ret != 0 || lshm__buf_from_alloc(&a, o->peer, size, &h->buf) != 0) {
                o->bad++;
                break;
            } else {
                h->stamp = ((uint64_t)o->id << 56) | (++serial << 16);
                o->bad += stamp_take(h->buf->seg->data, h->buf->chunk, h->buf->nchunks,
                                     h->stamp);
                if (pattern_rand_below(&rng, 4) == 0) {
                    uint32_t had = h->buf->nchunks;

                    if (lshm_buf_grow(h->buf, (had + 2) * CH, (had + 1) * CH) == 0) {
                        o->bad += stamp_take(h->buf->seg->data, h->buf->chunk + had,
                                             h->buf->nchunks - had, h->stamp + had);
                        o->grows++;
                    }
                }
                nheld++;
                o->ops++;
            }
        }
        if (!take && nheld > 0) {
            unsigned i = pattern_rand_below(&rng, nheld);
            struct held *h = &held[i];

            o->bad += stamp_give(h->buf->seg->data, h->buf->chunk, h->buf->nchunks,
                                 h->stamp);
            lshm_buf_free(h->buf);
            held[i] = held[--nheld];
        }
    }
    while (nheld > 0) {
        struct held *h = &held[--nheld];

        o->bad += stamp_give(h->buf->seg->data, h->buf->chunk, h->buf->nchunks, h->stamp);
        lshm_buf_free(h->buf);
    }
    return NULL;
}

static void expect_all_free(const struct lshm_segment_header *hdr)
{
    for (unsigned w = 0; w < LSHM_FREE_WORDS; w++)
        cr_expect_eq(hdr->free_map[w], ~0ull, "word %u: %016llx", w,
                     (unsigned long long)hdr->free_map[w]);
    cr_expect_eq(hdr->free_map_padding, 0);
}

LTEST(chunk, two_threads_never_share_a_chunk)
{
    struct owner o[2];
    pthread_t t[2];
    struct lshm_peer *peer;
    struct lshm_alloc a;

    cr_assert_eq(lshm__peer_get(FAKE_PID, &peer), 0);
    for (unsigned i = 0; i < 2; i++) {
        o[i] = (struct owner){ .peer = peer, .id = i + 1 };
        cr_assert_eq(pthread_create(&t[i], NULL, owner_thread, &o[i]), 0);
    }
    for (unsigned i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    for (unsigned i = 0; i < 2; i++) {
        cr_expect_eq(o[i].bad, 0, "owner %u saw %u bad stamps", i + 1, o[i].bad);
        cr_expect_gt(o[i].ops, 1000, "owner %u did only %lu allocations", i + 1, o[i].ops);
        cr_expect_gt(o[i].grows, 0);
    }
    cr_assert_eq(peer->out.size, 1, "one segment shared by both");
    expect_all_free(peer->out.elts[0]->hdr);
    /* Still usable afterwards: the first chunk again. */
    cr_assert_eq(lshm__peer_out_alloc(peer, 1, 1, false, false, &a), 0);
    cr_assert_eq(a.chunk, 0);
    lshm__seg_free_chunks(a.seg, a.chunk, 1);
    lshm__seg_unref(a.seg);
    lshm__peer_put(peer);
}

struct proc_stats {
    _Atomic unsigned      bad;
    _Atomic unsigned long ops;
};

/* The other process: raw bitmap operations on its own mapping of the fd. */
static int raw_owner(int fd, struct proc_stats *st, unsigned id)
{
    struct held held[MAX_HELD];
    unsigned nheld = 0, bad = 0;
    uint64_t rng = pattern_seed(id);
    unsigned long ops = 0;
    uint64_t serial = 0;
    long long end = now_ms() + STRESS_MS;
    struct lshm_segment_header *hdr;
    uint8_t *data;
    void *mem;

    mem = mmap(NULL, LSHM_SEGMENT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (mem == MAP_FAILED)
        return 2;
    hdr = mem;
    data = (uint8_t *)mem + LSHM_HEADER_SIZE;
    while (now_ms() < end) {
        if (nheld < MAX_HELD && (nheld == 0 || pattern_rand_below(&rng, 2))) {
            struct held *h = &held[nheld];
            uint32_t c = (uint32_t)pattern_rand_below(&rng, LSHM_CHUNK_COUNT);
            uint32_t want = (uint32_t)pattern_rand_below(&rng, MAX_RUN) + 1;

            if (!lshm__chunk_get_free(hdr->free_map, &c)) {
                c = 0;
                if (!lshm__chunk_get_free(hdr->free_map, &c))
                    continue;
            }
            h->chunk = c;
            h->n = 1;
            while (h->n < want && lshm__chunk_try_busy(hdr->free_map, c + h->n))
                h->n++;
            h->stamp = ((uint64_t)id << 56) | (++serial << 16);
            bad += stamp_take(data, h->chunk, h->n, h->stamp);
            nheld++;
            ops++;
        } else {
            unsigned i = pattern_rand_below(&rng, nheld);
            struct held *h = &held[i];

            bad += stamp_give(data, h->chunk, h->n, h->stamp);
            for (uint32_t k = 0; k < h->n; k++)
                lshm__chunk_set_free(hdr->free_map, h->chunk + k);
            held[i] = held[--nheld];
        }
    }
    while (nheld > 0) {
        struct held *h = &held[--nheld];

        bad += stamp_give(data, h->chunk, h->n, h->stamp);
        for (uint32_t k = 0; k < h->n; k++)
            lshm__chunk_set_free(hdr->free_map, h->chunk + k);
    }
    atomic_store(&st->bad, bad);
    atomic_store(&st->ops, ops);
    munmap(mem, LSHM_SEGMENT_SIZE);
    return 0;
}

LTEST(chunk, two_processes_never_share_a_chunk)
{
    struct proc_stats *st;
    struct lshm_peer *peer;
    struct lshm_alloc a;
    struct owner o;
    pthread_t t;
    pid_t child;
    int fd, status;

    cr_assert_eq(lshm__peer_get(FAKE_PID, &peer), 0);
    cr_assert_eq(lshm__peer_out_alloc(peer, 1, 1, false, false, &a), 0);
    cr_assert(a.created);
    lshm__seg_free_chunks(a.seg, a.chunk, 1);
    /* The library closes its own fds in a forked child: hand over a copy. */
    fd = dup(a.seg->fd);
    cr_assert_geq(fd, 0);
    st = mmap(NULL, sizeof(*st), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    cr_assert_neq(st, MAP_FAILED);

    child = fork();
    cr_assert_geq(child, 0);
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        _exit(raw_owner(fd, st, 2));
    }
    o = (struct owner){ .peer = peer, .id = 1 };
    cr_assert_eq(pthread_create(&t, NULL, owner_thread, &o), 0);
    pthread_join(t, NULL);
    status = wait_child(child, 10000);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %d", status);
    cr_expect_eq(o.bad, 0, "this process saw %u bad stamps", o.bad);
    cr_expect_eq(atomic_load(&st->bad), 0, "the child saw %u bad stamps",
                 atomic_load(&st->bad));
    cr_expect_gt(o.ops, 1000);
    cr_expect_gt(atomic_load(&st->ops), 1000);
    cr_assert_eq(peer->out.size, 1);
    expect_all_free(a.seg->hdr);
    munmap(st, sizeof(*st));
    close(fd);
    lshm__seg_unref(a.seg);
    lshm__peer_put(peer);
}
