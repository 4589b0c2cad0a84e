/*
 * Test payloads and random numbers, one of each for the tool and the tests.
 *
 * The payload of message seq is a stream of 64-bit words, word k a mix of
 * seq and k, so that a byte out of place, a stale chunk or another message's
 * payload all show.  Bytes are taken from each word in memory order: the
 * pattern is the same whichever piece (iov, buffer) a byte lands in, so a
 * message can be written and checked piece by piece at any offset.
 *
 * The random numbers are xorshift64*: a fixed seed gives the same stream on
 * every run and in every process, so a failure replays.
 */
#ifndef PATTERN_H
#define PATTERN_H

#include <stddef.h>
#include <stdint.h>

/* Byte pos of the payload of message seq. */
uint8_t  pattern_byte(uint32_t seq, uint64_t pos);
/* Write bytes off .. off + len of the payload of seq into dst. */
void     pattern_write(void *dst, size_t off, size_t len, uint32_t seq);
/* First offset (relative to src) whose byte differs from bytes off .. off +
 * len of the payload of seq, or -1 when every byte is right. */
long     pattern_mismatch(const void *src, size_t off, size_t len, uint32_t seq);

/* A state for pattern_rand from any number, 0 included (never 0 itself). */
uint64_t pattern_seed(uint64_t n);
/* The next number of the stream in *state (which must not be 0). */
uint64_t pattern_rand(uint64_t *state);
/* Uniform over 0 .. n - 1 (0 when n is 0). */
uint64_t pattern_rand_below(uint64_t *state, uint64_t n);
/* Log-uniform over 0 .. max: every power of two is as likely as another. */
size_t   pattern_rand_logsize(uint64_t *state, size_t max);

#endif
