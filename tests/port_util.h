/*
 * Shared by the transport tests (test_send.c, test_recv.c, test_shm.c,
 * test_close.c, test_listen.c, test_ctx.c, test_port_hostile.c): forked
 * peers, the child-side check, sends of the payload pattern, the echo child
 * and the acknowledging server, and the raw protocol end (a HELLO written by
 * hand, datagrams with fds).
 */
#ifndef LSHM_TESTS_PORT_UTIL_H
#define LSHM_TESTS_PORT_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>
#include <unistd.h>

#include "common.h"
#include "linuxshm.h"
#include "pattern.h"

#define KiB 1024u
#define MiB (1024u * 1024u)

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

/* n, or n / div (at least 1) under a sanitizer (LSHM_SANITIZER is set by
 * make asan/tsan). */
unsigned scaled(unsigned n, unsigned div);

/* ---- the payload pattern (pattern.h), message seq keyed by its stream ---- */

/* Check a whole received message; true when size and every byte match. */
bool msg_check(const struct lshm_msg *m, uint32_t seq, size_t size);
/* Inline message whose payload is pattern (seq, 0 .. size). */
int send_pat(struct lshm_port *port, uint32_t seq, size_t size, unsigned flags);
/* A shared-memory message of size bytes (pattern seq), in as many buffers
 * as it takes; waits for room in the queue or for chunks (bounded). */
int send_shm(struct lshm_port *port, uint32_t seq, size_t size, int fd);
/* Inline up to LSHM_INLINE_MAX bytes, in shared memory beyond. */
int send_any(struct lshm_port *port, uint32_t seq, size_t size);
/* Fill the buffer b with pattern seq (size bytes) and send it as message seq. */
int send_buf(struct lshm_port *port, struct lshm_buf *b, uint32_t seq, size_t size);

/* The peer's T_CTRL answer: its stream (what the peer counted). */
uint32_t recv_ctrl(struct lshm_port *port, int timeout_ms);
/* In a child: wait for the parent's BYE (the port then closes with -EPIPE). */
int wait_bye(struct lshm_port *port);
/* In a child: report value in an empty T_CTRL (recv_ctrl), then wait_bye. */
int report_then_bye(struct lshm_port *port, uint32_t value);

/* ---- echo and acknowledge ---- */

/* A child_fn: the echo of echo_pull with a handler run by lshm_ctx_run. */
int echo_handler(struct lshm_ctx *ctx, struct lshm_port *port, void *arg);
/* One round trip through an echo child: message seq of size bytes
 * (inline, or in shared memory when shm), and its echo checked. */
void echo_roundtrip(struct lshm_port *port, uint32_t seq, size_t size, bool shm);
/* n round trips of size bytes inline. */
void pingpong_pull(struct lshm_port *port, unsigned n, size_t size);

/* A server acknowledging every message it checked with an empty T_CTRL of
 * its stream (a listener's ports, or the two ports of a child). */
struct server {
    unsigned open, closed, msgs;
    int      error;
};
/* Its handlers (arg: the struct server). */
void srv_on_msg(struct lshm_port *port, struct lshm_msg *m, void *arg);
void srv_on_close(struct lshm_port *port, int error, void *arg);

/* ---- sockets and two-port children ---- */

/* A new directory under /tmp (malloc'd path). */
char *tmp_dir(void);
/* A socket of type bound to dir/name (its path into path[128]), listening
 * if asked; its fd.  Closed unlistened, it leaves a stale socket file. */
int bound_socket(char *path, const char *dir, const char *name, int type, bool listening);

/* A child's work on its ends of two socketpairs. */
typedef int (*two_fn)(int s0, int s1, unsigned arg);
/* Two socketpairs, and a child running fn on one end of each (ctx, when not
 * NULL, freed there first); mine[] are the parent's ends. */
pid_t fork_two(struct lshm_ctx *ctx, int mine[2], two_fn fn, unsigned arg);
/* fork_two, with ports A and B of ctx on the parent's ends, handshakes done. */
pid_t spawn_two(struct lshm_ctx *ctx, struct lshm_port **pa, struct lshm_port **pb,
                two_fn fn, unsigned arg);
/* The end of a spawn_two. */
void spawn_two_end(struct lshm_ctx *ctx, struct lshm_port *pa, struct lshm_port *pb, pid_t pid);
/* One message (any) on port within 5 s, expected; what names the port. */
void expect_msg(struct lshm_port *port, const char *what);

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
