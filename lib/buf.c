/*
 * Buffers: a run of chunks in one outgoing segment, handed to the caller to
 * fill, grown in place, and released once sent (or freed unsent).
 */
#include <stdlib.h>

#include "shm.h"

static uint32_t chunks_for(size_t size)
{
    size_t n = size / LSHM_CHUNK_SIZE + (size % LSHM_CHUNK_SIZE != 0);

    return n > LSHM_CHUNK_COUNT ? LSHM_CHUNK_COUNT : (uint32_t)n;
}

static size_t capacity_of(const struct lshm_buf *buf)
{
    return (size_t)buf->nchunks * LSHM_CHUNK_SIZE;
}

/*
 * Claim chunks from c on while they are free, up to want; returns how many.
 * A word at a time: a run that stops inside a word stops the claim there.
 */
static uint32_t claim_run(struct lshm_seg *seg, uint32_t c, uint32_t want)
{
    uint32_t n = 0, got;

    /* try_busy refuses c >= LSHM_CHUNK_COUNT, whatever the padding says. */
    while (n < want && (got = lshm__chunks_try_busy(seg->hdr->free_map, c + n, want - n)) > 0) {
        n += got;
        if ((c + n) % 64 != 0)
            break;
    }
    return n;
}

int lshm__buf_from_alloc(const struct lshm_alloc *a, struct lshm_peer *peer, size_t size,
                        struct lshm_buf **out)
{
    struct lshm_buf *buf;
    uint32_t want;

    if (a->chunk >= LSHM_CHUNK_COUNT)
        return -EINVAL;
    buf = calloc(1, sizeof(*buf));
    if (buf == NULL)
        return -ENOMEM;
    want = size == 0 ? 1 : chunks_for(size);
    buf->seg = a->seg;
    buf->peer = peer;
    buf->chunk = a->chunk;
    buf->nchunks = 1 + claim_run(a->seg, a->chunk + 1, want - 1);
    buf->size = size < capacity_of(buf) ? size : capacity_of(buf);
    buf->sent = false;
    buf->tid = lshm__thread_id();
    lshm__tsan_acquire(buf->seg);
    *out = buf;
    return 0;
}

void lshm__buf_release_sent(struct lshm_buf *buf)
{
    uint32_t kept = chunks_for(buf->size);

    /* The receiver frees the chunks it was told of; the rest are still ours. */
    if (kept < buf->nchunks)
        lshm__seg_free_chunks(buf->seg, buf->chunk + kept, buf->nchunks - kept);
    lshm__tsan_release(buf->seg);
    lshm__seg_unref(buf->seg);
    free(buf);
}

int lshm__buf_grow(struct lshm_buf *buf, size_t size, size_t min_size)
{
    uint32_t start, want, got;

    if (buf == NULL || buf->sent)
        return -EINVAL;
    if (capacity_of(buf) >= size)
        return 0;
    start = buf->chunk + buf->nchunks;
    want = chunks_for(size - capacity_of(buf));
    got = claim_run(buf->seg, start, want);
    if (capacity_of(buf) + (size_t)got * LSHM_CHUNK_SIZE < min_size) {
        /* Give back exactly what this call took; the buffer stays as it was. */
        lshm__seg_free_chunks(buf->seg, start, got);
        return lshm__fail(-ENOMEM, "buffer growth: only %zu of %zu bytes free after it",
                         capacity_of(buf) + (size_t)got * LSHM_CHUNK_SIZE, min_size);
    }
    buf->nchunks += got;
    lshm__tsan_acquire(buf->seg);
    return 0;
}

void *lshm__buf_data(struct lshm_buf *buf)
{
    if (buf == NULL)
        return NULL;
    return buf->seg->data + (size_t)buf->chunk * LSHM_CHUNK_SIZE;
}

size_t lshm__buf_capacity(const struct lshm_buf *buf)
{
    return buf == NULL ? 0 : capacity_of(buf);
}

int lshm__buf_set_size(struct lshm_buf *buf, size_t size)
{
    if (buf == NULL || buf->sent || size > capacity_of(buf))
        return -EINVAL;
    buf->size = size;
    return 0;
}

void lshm__buf_free(struct lshm_buf *buf)
{
    if (buf == NULL)
        return;
    /* Never free chunks that a sent descriptor handed to the receiver. */
    if (buf->sent) {
        lshm__buf_release_sent(buf);
        return;
    }
    lshm__seg_free_chunks(buf->seg, buf->chunk, buf->nchunks);
    lshm__seg_unref(buf->seg);
    free(buf);
}
