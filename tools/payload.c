/*
 * shmping: what payloads hold and how they are checked: payloads in
 * shared-memory buffers, checks of received messages (the --verify pattern
 * is pattern.c's, shared with the tests).
 */
#include <errno.h>
#include <string.h>

#include "shmping.h"

bool verify_piece(const void *src, size_t off, size_t len, uint32_t seq)
{
    long at = pattern_mismatch(src, off, len, seq);
    size_t pos;

    if (at < 0)
        return true;
    pos = off + (size_t)at;
    err("seq=%u: payload differs at byte %zu: 0x%02x, expected 0x%02x",
        seq, pos, ((const uint8_t *)src)[at], pattern_byte(seq, pos));
    return false;
}

/*
 * Buffers for size bytes (size >= 1), in as many pieces as the library's
 * free runs take (lshm_bufs_alloc(3)).  -EAGAIN when the chunks are not there
 * now: nothing is kept, try again once replies came back.
 */
int payload_alloc(struct lshm_port *port, size_t size, struct payload *p)
{
    int ret = lshm_bufs_alloc(port, size, 0, p->bufs, &p->n);

    if (ret < 0)
        return ret;
    lshm_bufs_iov(p->bufs, p->n, p->iov);
    return 0;
}

void payload_free(struct payload *p)
{
    lshm_bufs_free(p->bufs, p->n);
    p->n = 0;
}

void payload_copy_in(struct payload *p, const void *src)
{
    size_t size = 0;

    for (unsigned i = 0; i < p->n; i++)
        size += p->iov[i].iov_len;
    lshm_bufs_copy_in(p->bufs, p->n, 0, src, size);
}

void payload_fill(struct payload *p, uint32_t seq)
{
    size_t off = 0;

    for (unsigned i = 0; i < p->n; i++) {
        pattern_write(p->iov[i].iov_base, off, p->iov[i].iov_len, seq);
        off += p->iov[i].iov_len;
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
            size_t k = p->iov[bi].iov_len - boff;
            if (k > len)
                k = len;
            memcpy((uint8_t *)p->iov[bi].iov_base + boff, s, k);
            s += k;
            len -= k;
            boff += k;
            if (boff == p->iov[bi].iov_len) {
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

/*
 * The fast payload, what every run writes and reads unless --verify asks for
 * the pattern: word k (8 bytes, in memory order) of message seq is
 * fast_seed(seq) + k.  It is written at memory speed, and a receiver sums
 * every word it got: the sum of a whole payload is known in closed form, so
 * the reading is checked, not thrown away, and cannot be left out by the
 * compiler.  Bytes of a word cut across pieces add up to the word, so the
 * sum does not depend on how the payload was cut.
 */
typedef uint64_t u64x2 __attribute__((vector_size(16), aligned(1), may_alias));

static inline uint64_t fast_seed(uint32_t seq)
{
    return ((uint64_t)seq + 1) * 0x9e3779b97f4a7c15ull;
}

void fast_fill(void *dst, size_t off, size_t len, uint32_t seq)
{
    uint8_t *d = dst;
    uint64_t seed = fast_seed(seq);
    size_t i = 0;

    for (; i < len && (off + i) % 8 != 0; i++)
        d[i] = (uint8_t)((seed + (off + i) / 8) >> (8 * ((off + i) % 8)));
    if (len - i >= 64) {
        uint64_t k = seed + (off + i) / 8;
        u64x2 v0 = { k, k + 1 }, v1 = { k + 2, k + 3 }, v2 = { k + 4, k + 5 },
              v3 = { k + 6, k + 7 }, step = { 8, 8 };

        for (; len - i >= 64; i += 64) {
            *(u64x2 *)(d + i) = v0;
            *(u64x2 *)(d + i + 16) = v1;
            *(u64x2 *)(d + i + 32) = v2;
            *(u64x2 *)(d + i + 48) = v3;
            v0 += step;
            v1 += step;
            v2 += step;
            v3 += step;
        }
    }
    for (; len - i >= 8; i += 8) {
        uint64_t w = seed + (off + i) / 8;
        memcpy(d + i, &w, 8);
    }
    for (; i < len; i++)
        d[i] = (uint8_t)((seed + (off + i) / 8) >> (8 * ((off + i) % 8)));
}

uint64_t fast_sum(const void *src, size_t off, size_t len)
{
    const uint8_t *s = src;
    uint64_t sum = 0;
    size_t i = 0;

    for (; i < len && (off + i) % 8 != 0; i++)
        sum += (uint64_t)s[i] << (8 * ((off + i) % 8));
    if (len - i >= 64) {
        u64x2 a0 = { 0, 0 }, a1 = { 0, 0 }, a2 = { 0, 0 }, a3 = { 0, 0 };

        for (; len - i >= 64; i += 64) {
            a0 += *(const u64x2 *)(s + i);
            a1 += *(const u64x2 *)(s + i + 16);
            a2 += *(const u64x2 *)(s + i + 32);
            a3 += *(const u64x2 *)(s + i + 48);
        }
        a0 += a1 + a2 + a3;
        sum += a0[0] + a0[1];
    }
    for (; len - i >= 8; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        sum += w;
    }
    for (; i < len; i++)
        sum += (uint64_t)s[i] << (8 * ((off + i) % 8));
    return sum;
}

uint64_t fast_sum_expected(size_t len, uint32_t seq)
{
    uint64_t seed = fast_seed(seq), n = len / 8, r = len % 8;
    /* n (n - 1) / 2 without losing the bit that the division would need */
    uint64_t tri = n % 2 == 0 ? (n / 2) * (n - 1) : n * ((n - 1) / 2);
    uint64_t sum = n * seed + tri;

    if (r > 0)
        sum += (seed + n) & ((1ull << (8 * r)) - 1);
    return sum;
}

bool fast_check(const void *src, size_t len, uint32_t seq)
{
    if (fast_sum(src, 0, len) == fast_sum_expected(len, seq))
        return true;
    err("seq=%u: the sum of the %zu payload bytes is wrong", seq, len);
    return false;
}

void payload_fast_fill(struct payload *p, uint32_t seq)
{
    size_t off = 0;

    for (unsigned i = 0; i < p->n; i++) {
        fast_fill(p->iov[i].iov_base, off, p->iov[i].iov_len, seq);
        off += p->iov[i].iov_len;
    }
}

bool msg_check(const struct lshm_msg *m, uint32_t seq, bool verify)
{
    uint64_t sum = 0;
    size_t off = 0;

    if (verify)
        return msg_verify(m, seq);
    for (unsigned i = 0; m->iov != NULL && i < m->niov; i++) {
        sum += fast_sum(m->iov[i].base, off, m->iov[i].len);
        off += m->iov[i].len;
    }
    if (sum == fast_sum_expected(off, seq))
        return true;
    err("seq=%u: the sum of the %zu payload bytes is wrong", seq, off);
    return false;
}
