/*
 * Shared by the libFuzzer targets (one file per target, fuzz_<name>.c):
 * reading structured values out of the input, the raw protocol end of a
 * port (a socketpair whose other end the library adopts), memfds built
 * from the input, and the per-input leak check (fds and memfd mappings).
 *
 * A target is LLVMFuzzerTestOneInput over one input; a new one needs only
 * its file, its name in FUZZ_TARGETS (Makefile) and a corpus directory.
 * An input that found a bug stays in its corpus as regress-<what>, so that
 * every later run starts by replaying it.
 */
#ifndef LSHM_FUZZ_H
#define LSHM_FUZZ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "linuxshm.h"

/* The input, consumed from the front; past its end every value reads 0. */
struct fin {
    const uint8_t *p;
    size_t         left;
};

uint8_t  fin_u8(struct fin *in);
uint16_t fin_u16(struct fin *in);
uint32_t fin_u32(struct fin *in);
/* Up to n bytes into out (the rest zero); returns how many came from the input. */
size_t   fin_bytes(struct fin *in, void *out, size_t n);
static inline bool fin_more(const struct fin *in) { return in->left > 0; }

/* Open fds, and mappings of memfds, of this process. */
int fuzz_count_fds(void);
int fuzz_count_memfd_maps(void);

/* Snapshot before the input; after it, abort (a finding) if anything is left. */
struct fuzz_leaks {
    int fds, maps;
};
void fuzz_leaks_begin(struct fuzz_leaks *l);
void fuzz_leaks_end(const struct fuzz_leaks *l, const char *target);

/* A context for one input: small ring, flags from the input's first byte. */
struct lshm_ctx *fuzz_ctx(uint8_t sel);

/*
 * A SOCK_SEQPACKET pair: the library adopts one end as *port, the other is
 * returned raw with SO_PASSCRED (the library checks the sender's
 * credentials) and O_NONBLOCK.  -1 on failure (nothing is left open).
 */
int fuzz_raw_port(struct lshm_ctx *ctx, struct lshm_port **port);

/* One datagram with nfds (<= 32) fds and, unless cred is NULL, explicit
 * SCM_CREDENTIALS; the result of sendmsg (-1: errno). */
struct ucred;
ssize_t fuzz_raw_send(int raw, const void *buf, size_t len, const int *fds, unsigned nfds,
                      const struct ucred *cred);
/* One datagram into buf (cap bytes), its fds (closed beyond max) in fds;
 * the length or -1.  *nfds receives how many were stored. */
ssize_t fuzz_raw_recv(int raw, void *buf, size_t cap, int *fds, unsigned max, unsigned *nfds);

/* A HELLO (version 2) from this process, port port_id, into buf; its
 * length (0 when the arguments make no valid HELLO). */
size_t fuzz_hello(uint8_t *buf, uint16_t port_id, uint32_t max_segments, uint32_t features,
                  uint32_t ring_size);

/*
 * A ring memfd of 4096 + size bytes with its header written (magic,
 * version, size, port_id, src_pid, dst_pid), not sealed; -1 on failure.
 */
int fuzz_ring_memfd(size_t size, uint16_t port_id, int32_t src, int32_t dst);

/*
 * True when the environment's LSHM_FUZZ_AVOID (words separated by commas)
 * names what: a target can then steer around a known, still open finding
 * to keep searching past it.  Runs for the record (CI) leave it unset.
 */
bool fuzz_avoid(const char *what);

/* Run the context without blocking a few times. */
void fuzz_pump(struct lshm_ctx *ctx, unsigned times);

#endif
