/* shmping: payloads in shared-memory buffers, and checks of received ones. */
#include <errno.h>
#include <string.h>

#include "shmping.h"

/*
 * Buffers for size bytes (size >= 1): one per contiguous free run the
 * allocator hands out, each within one segment.  -EAGAIN when the chunks are
 * not there now (segment limit reached, or too fragmented to fit in
 * LSHM_MAX_DESCS pieces): nothing is kept, try again once replies came back.
 */
int payload_alloc(struct lshm_port *port, size_t size, struct payload *p)
{
    size_t left = size;
    int ret;

    p->n = 0;
    while (left > 0) {
        struct lshm_buf *b;
        size_t use;

        if (p->n == LSHM_MAX_DESCS) {
            ret = -EAGAIN;
            goto fail;
        }
        ret = lshm_buf_alloc(port, left < LSHM_DATA_SIZE ? left : LSHM_DATA_SIZE, &b);
        if (ret < 0)
            goto fail;
        use = lshm_buf_capacity(b);
        if (use > left)
            use = left;
        ret = lshm_buf_set_size(b, use);
        if (ret < 0) {
            lshm_buf_free(b);
            goto fail;
        }
        p->bufs[p->n] = b;
        p->sizes[p->n++] = use;
        left -= use;
    }
    return 0;
fail:
    payload_free(p);
    return ret;
}

void payload_free(struct payload *p)
{
    for (unsigned i = 0; i < p->n; i++)
        lshm_buf_free(p->bufs[i]);
    p->n = 0;
}

void payload_copy_in(struct payload *p, const void *src)
{
    const uint8_t *s = src;

    for (unsigned i = 0; i < p->n; i++) {
        memcpy(lshm_buf_data(p->bufs[i]), s, p->sizes[i]);
        s += p->sizes[i];
    }
}

void payload_fill(struct payload *p, uint32_t seq)
{
    size_t off = 0;

    for (unsigned i = 0; i < p->n; i++) {
        pattern_fill(lshm_buf_data(p->bufs[i]), off, p->sizes[i], seq);
        off += p->sizes[i];
    }
}

/* The pieces of a received message, laid end to end into p (same total). */
void payload_copy_msg(struct payload *p, const struct lshm_msg *m)
{
    unsigned bi = 0;
    size_t boff = 0;

    for (unsigned i = 0; i < m->niov; i++) {
        const uint8_t *s = m->iov[i].base;
        size_t len = m->iov[i].len;

        while (len > 0 && bi < p->n) {
            size_t k = p->sizes[bi] - boff;
            if (k > len)
                k = len;
            memcpy((uint8_t *)lshm_buf_data(p->bufs[bi]) + boff, s, k);
            s += k;
            len -= k;
            boff += k;
            if (boff == p->sizes[bi]) {
                bi++;
                boff = 0;
            }
        }
    }
}

size_t msg_iov_bytes(const struct lshm_msg *m)
{
    size_t sum = 0;

    if (m->iov == NULL)
        return 0;
    for (unsigned i = 0; i < m->niov; i++)
        sum += m->iov[i].len;
    return sum;
}

bool msg_verify(const struct lshm_msg *m, uint32_t seq)
{
    size_t off = 0;

    for (unsigned i = 0; m->iov != NULL && i < m->niov; i++) {
        if (!verify_piece(m->iov[i].base, off, m->iov[i].len, seq))
            return false;
        off += m->iov[i].len;
    }
    return true;
}
