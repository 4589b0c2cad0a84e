/*
 * shmping: what payloads hold and how they are checked: the --verify
 * pattern, payloads in shared-memory buffers, checks of received messages.
 */
#include <errno.h>
#include <string.h>

#include "shmping.h"

/*
 * The payload of message seq is a stream of 64-bit words, word k a mix of seq
 * and k, so that a byte out of place, a stale chunk or another message's
 * payload all show.  Bytes are taken from each word in memory order, so the
 * pattern is the same whichever piece (iov, buffer) a byte lands in.
 */
static inline uint64_t pattern_word(uint32_t seq, uint64_t k)
{
    uint64_t v = (k ^ ((uint64_t)seq << 40)) * 0x9e3779b97f4a7c15ull + seq;

    return v ^ (v >> 29);
}

void pattern_fill(void *dst, size_t off, size_t len, uint32_t seq)
{
    uint8_t *d = dst;
    size_t i = 0;

    while (i < len) {
        size_t pos = off + i;
        uint64_t w = pattern_word(seq, pos / 8);

        if (pos % 8 == 0 && len - i >= 8) {
            memcpy(d + i, &w, 8);
            i += 8;
        } else {
            uint8_t b[8];
            memcpy(b, &w, 8);
            d[i++] = b[pos % 8];
        }
    }
}

long pattern_check(const void *src, size_t off, size_t len, uint32_t seq)
{
    const uint8_t *s = src;
    size_t i = 0;

    while (i < len) {
        size_t pos = off + i;
        uint64_t w = pattern_word(seq, pos / 8);
        uint8_t b[8];

        memcpy(b, &w, 8);
        if (pos % 8 == 0 && len - i >= 8) {
            if (memcmp(s + i, b, 8) == 0) {
                i += 8;
                continue;
            }
            while (s[i] == b[(off + i) % 8])
                i++;
            return (long)i;
        }
        if (s[i] != b[pos % 8])
            return (long)i;
        i++;
    }
    return -1;
}

bool verify_piece(const void *src, size_t off, size_t len, uint32_t seq)
{
    long at = pattern_check(src, off, len, seq);
    uint64_t w;
    uint8_t b[8];
    size_t pos;

    if (at < 0)
        return true;
    pos = off + (size_t)at;
    w = pattern_word(seq, pos / 8);
    memcpy(b, &w, 8);
    err("seq=%u: payload differs at byte %zu: 0x%02x, expected 0x%02x",
        seq, pos, ((const uint8_t *)src)[at], b[pos % 8]);
    return false;
}

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
