/*
 * Whole payloads: the buffers for N bytes, in as many shared-memory pieces
 * as the allocator's runs take (it hands out the run it finds, as Unit's
 * does), waiting for chunks to come back when the segments are full; their
 * iov, and copying bytes in across the pieces.
 */
#include <string.h>

#include "payload.h"

static void bufs_free(struct lshm_buf **bufs, unsigned n)
{
    while (n > 0)
        lshm__buf_free(bufs[--n]);
}

/* Claim pieces for size bytes now: 0, -EAGAIN when the chunks are not
 * there (nothing kept), or another -errno. */
static int bufs_try(struct lshm_port *port, size_t size, struct lshm_buf **bufs, unsigned *n)
{
    size_t left = size;
    int ret;

    *n = 0;
    while (left > 0) {
        struct lshm_buf *b;
        size_t cap;

        if (*n == LSHM_MAX_DESCS) {
            bufs_free(bufs, *n);
            *n = 0;
            return lshm__fail(-EAGAIN, "%zu bytes do not fit in %u pieces of the free chunks "
                              "now", size, LSHM_MAX_DESCS);
        }
        ret = lshm__port_buf_alloc(port, left < LSHM_DATA_SIZE ? left : LSHM_DATA_SIZE, &b);
        if (ret < 0) {
            bufs_free(bufs, *n);
            *n = 0;
            return ret;
        }
        cap = lshm__buf_capacity(b);
        lshm__buf_set_size(b, cap < left ? cap : left);
        left -= cap < left ? cap : left;
        bufs[(*n)++] = b;
    }
    return 0;
}

int lshm__bufs_alloc(struct lshm_port *port, size_t size, int timeout_ms,
                     struct lshm_buf **bufs, unsigned *nbufs)
{
    long long end = timeout_ms > 0 ? lshm__now_ms() + timeout_ms : 0;
    int ret;

    for (;;) {
        long long since;
        int left;

        ret = bufs_try(port, size, bufs, nbufs);
        if (ret != -EAGAIN)
            return ret;
        if (timeout_ms == 0)
            return ret;
        left = timeout_ms < 0 ? -1 : (int)(end - lshm__now_ms());
        if (timeout_ms > 0 && left <= 0)
            return lshm__fail(-EAGAIN, "%zu bytes of shared memory did not come free within "
                              "%d ms", size, timeout_ms);
        /* Chunks come back as the receiver is done with messages.  Free
         * chunks that are too scattered, or a segment still on its way to
         * the peer, let the wait return at once: then run a short while. */
        since = lshm__now_ms();
        ret = lshm__port_wait(port, LSHM_WAIT_SHM, left);
        if (ret > 0 && lshm__now_ms() - since < 1)
            ret = lshm__ctx_run(port->ctx, left >= 0 && left < 10 ? left : 10);
        if (ret == -ETIMEDOUT)
            return lshm__fail(-EAGAIN, "%zu bytes of shared memory did not come free within "
                              "%d ms", size, timeout_ms);
        if (ret < 0)
            return ret;
    }
}

void lshm__bufs_iov(struct lshm_buf *const *bufs, unsigned n, struct iovec *iov)
{
    unsigned i;

    for (i = 0; i < n; i++) {
        iov[i].iov_base = lshm__buf_data(bufs[i]);
        iov[i].iov_len = bufs[i]->size;
    }
}

size_t lshm__bufs_size(struct lshm_buf *const *bufs, unsigned n)
{
    size_t total = 0;
    unsigned i;

    for (i = 0; i < n; i++)
        total += bufs[i]->size;
    return total;
}

void lshm__bufs_copy_in(struct lshm_buf *const *bufs, unsigned n, size_t off,
                        const void *src, size_t len)
{
    const uint8_t *s = src;
    unsigned i;

    for (i = 0; i < n && len > 0; i++) {
        size_t piece = bufs[i]->size, k;

        if (off >= piece) {
            off -= piece;
            continue;
        }
        k = piece - off < len ? piece - off : len;
        memcpy((uint8_t *)lshm__buf_data(bufs[i]) + off, s, k);
        s += k;
        len -= k;
        off = 0;
    }
}

void lshm__bufs_free(struct lshm_buf **bufs, unsigned n)
{
    bufs_free(bufs, n);
}
