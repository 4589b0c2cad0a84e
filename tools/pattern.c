/* Test payloads and random numbers (see pattern.h). */
#include <math.h>
#include <string.h>

#include "pattern.h"

static inline uint64_t word(uint32_t seq, uint64_t k)
{
    uint64_t v = (k ^ ((uint64_t)seq << 40)) * 0x9e3779b97f4a7c15ull + seq;

    return v ^ (v >> 29);
}

uint8_t pattern_byte(uint32_t seq, uint64_t pos)
{
    uint64_t w = word(seq, pos / 8);
    uint8_t b[8];

    memcpy(b, &w, 8);
    return b[pos % 8];
}

void pattern_write(void *dst, size_t off, size_t len, uint32_t seq)
{
    uint8_t *d = dst;
    size_t i = 0;

    for (; i < len && (off + i) % 8 != 0; i++)
        d[i] = pattern_byte(seq, off + i);
    for (; len - i >= 8; i += 8) {
        uint64_t w = word(seq, (off + i) / 8);

        memcpy(d + i, &w, 8);
    }
    for (; i < len; i++)
        d[i] = pattern_byte(seq, off + i);
}

long pattern_mismatch(const void *src, size_t off, size_t len, uint32_t seq)
{
    const uint8_t *s = src;
    size_t i = 0;

    for (; i < len && (off + i) % 8 != 0; i++)
        if (s[i] != pattern_byte(seq, off + i))
            return (long)i;
    /* Whole words while they match; the word that differs byte by byte. */
    for (; len - i >= 8; i += 8) {
        uint64_t w = word(seq, (off + i) / 8);

        if (memcmp(s + i, &w, 8) != 0)
            break;
    }
    for (; i < len; i++)
        if (s[i] != pattern_byte(seq, off + i))
            return (long)i;
    return -1;
}

uint64_t pattern_seed(uint64_t n)
{
    /* splitmix64's finaliser: nearby seeds give unrelated streams. */
    uint64_t z = n + 0x9e3779b97f4a7c15ull;

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return z != 0 ? z : 0x9e3779b97f4a7c15ull;
}

uint64_t pattern_rand(uint64_t *state)
{
    uint64_t x = *state;

    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545f4914f6cdd1dull;
}

uint64_t pattern_rand_below(uint64_t *state, uint64_t n)
{
    return n != 0 ? pattern_rand(state) % n : 0;
}

size_t pattern_rand_logsize(uint64_t *state, size_t max)
{
    double u = (double)(pattern_rand(state) >> 11) / (double)(1ull << 53);
    size_t v = (size_t)exp(u * log((double)max + 1.0)) - 1;

    return v > max ? max : v;
}
