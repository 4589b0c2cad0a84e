/*
 * Shared by the transport tests (test_port.c, test_port_hostile.c): forked
 * peers, the child-side check, inline sends, the echo child, and the raw
 * protocol end (a HELLO written by hand, datagrams with fds).
 */
#ifndef LSHM_TESTS_PORT_UTIL_H
#define LSHM_TESTS_PORT_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>
#include <unistd.h>

#include "common.h"
#include "linuxshm.h"

/* User message types of the tests. */
#define T_DATA 16
#define T_CTRL 17

/* In a child: report the failed check on stderr and return 1 (its exit status). */
#define CK(c)                                                                     \
    do {                                                                          \
        if (!(c)) {                                                               \
            fprintf(stderr, "child %d: %s:%d: check failed: %s (%s)\n", getpid(), \
                    __FILE__, __LINE__, #c, lshm_last_error());                   \
            return 1;                                                             \
        }                                                                         \
    } while (0)

typedef int (*child_fn)(struct lshm_ctx *ctx, struct lshm_port *port, void *arg);

/* lshm_ctx_new, asserted. */
struct lshm_ctx *ctx_make(const struct lshm_ctx_params *p);

/*
 * A socketpair port in ctx, and a child that makes its own context (params
 * cp, NULL for defaults) after fork, adopts the other end and runs fn.
 */
pid_t spawn(struct lshm_ctx *ctx, const struct lshm_ctx_params *cp, struct lshm_port **port,
            child_fn fn, void *arg);
/* Assert that pid exits with status 0 within timeout_ms. */
void child_ok(pid_t pid, int timeout_ms);
/* The end of a spawn: close port, free ctx, the child must exit 0 (10 s). */
void spawn_end(struct lshm_ctx *ctx, struct lshm_port *port, pid_t pid);
/* Assert that the handshake of port completes within 10 s. */
void wait_ready(struct lshm_port *port);

/* lshm_send, waiting for room in the queue (bounded: 10 s a wait). */
int send_out(struct lshm_port *port, const struct lshm_out *out, unsigned flags);
/* Send an inline message, waiting for room in the queue (bounded). */
int send_inline(struct lshm_port *port, uint8_t type, uint32_t stream, const void *data,
                size_t size, int fd);

/* A child_fn: echo every message back (inline copy, same type and stream)
 * until the peer closes.  arg: NULL, or a const int *, the receive timeout
 * in ms (20 s without). */
int echo_pull(struct lshm_ctx *ctx, struct lshm_port *port, void *arg);

/* ---- the raw end: the peer socket of lshm_socketpair, spoken by hand ---- */

#define RAW_PORT 77

/* A port in ctx whose peer end is returned raw, with SO_PASSCRED set (the
 * library checks the sender's credentials). */
int raw_peer(struct lshm_ctx *ctx, struct lshm_port **port);
/* A HELLO of the given version from pid, port RAW_PORT, into buf; its length. */
size_t raw_hello_build(uint8_t *buf, pid_t pid, uint16_t version);
/* One datagram of len bytes, with nfds (<= 32) fds; asserted. */
void raw_sendv(int fd, const void *buf, size_t len, const int *fds, unsigned nfds);

#endif
