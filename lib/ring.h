/*
 * The ring layer: the only code that knows io_uring.  Everything above it
 * submits operations with a completion callback and runs the ring.  Where
 * io_uring is refused (a container's seccomp profile, the sysctl
 * kernel.io_uring_disabled) or not wanted, the epoll carrier (epoll.c)
 * runs the same operations behind the same functions.
 */
#ifndef LSHM_RING_H
#define LSHM_RING_H

#include <stdbool.h>
#include <stdint.h>
#include <linux/time_types.h>
#include <sys/socket.h>

#include "internal.h"

struct lshm_ring;

/*
 * An operation in flight.  complete() runs from lshm__ring_run() for each
 * completion; more is true while a multishot operation stays armed.
 */
struct lshm_op {
    void (*complete)(struct lshm_op *op, int res, bool more, void *buf, unsigned len);
    /* The epoll carrier's record while the operation is its; io_uring
     * keeps the same in the kernel and never reads these. */
    struct lshm_op *next;
    void           *arg;        /* msghdr, or sockaddr of a connect */
    union {
        long long                due_ns; /* epoll: CLOCK_MONOTONIC, timeout, connect retry */
        struct __kernel_timespec ts;     /* io_uring: a timeout's delay, read at submit */
    };
    int             fd, res;
    unsigned        arglen;
    unsigned char   kind, link, where;
};

/* Room in a provided receive buffer: recvmsg header, control, datagram. */
#define LSHM_RING_CMSG_SPACE  128u
#define LSHM_RING_BUF_SIZE    (LSHM_WIRE_MAX + LSHM_RING_CMSG_SPACE + 64u)

int      lshm__ring_new(struct lshm_ring **r, unsigned entries, unsigned ctx_flags);
void     lshm__ring_free(struct lshm_ring *r);
/* In a forked child: release this process's copies without a syscall that
 * could reach the parent's ring. */
void     lshm__ring_forget(struct lshm_ring *r);
int      lshm__ring_fd(const struct lshm_ring *r);
/* Close a socket whose operations have all completed.  The epoll carrier
 * takes it out of its set first: a copy in a forked child would keep it
 * there, reporting under a number that may be given to another socket. */
void     lshm__ring_close(struct lshm_ring *r, int fd);
/* Make a poll on lshm__ring_fd wake: work is waiting without a completion. */
void     lshm__ring_wake(struct lshm_ring *r);
unsigned lshm__ring_features(const struct lshm_ring *r);
void     lshm__ring_stats(const struct lshm_ring *r, struct lshm_ctx_stats *st);

/* Free SQ slots; a linked chain must fit in them to stay one chain. */
unsigned lshm__ring_space(struct lshm_ring *r);

/* Queue operations (submitted by lshm__ring_submit / lshm__ring_run). */
int lshm__ring_sendmsg(struct lshm_ring *r, int fd, const struct msghdr *m,
                      struct lshm_op *op, bool link);
int lshm__ring_recvmsg(struct lshm_ring *r, int fd, struct msghdr *m, struct lshm_op *op);
/* Multishot recvmsg from the ring's provided buffers; m gives controllen.
 * Each completion passes the whole buffer (io_uring_recvmsg_out first);
 * hand it back with lshm__ring_buf_put() once read. */
int lshm__ring_recvmsg_multishot(struct lshm_ring *r, int fd, struct msghdr *m,
                                struct lshm_op *op);
void lshm__ring_buf_put(struct lshm_ring *r, void *buf);
/* Parse a multishot buffer: payload and control, false if malformed. */
bool lshm__ring_recvmsg_parse(void *buf, unsigned len, const struct msghdr *m,
                             void **payload, unsigned *payload_len,
                             struct msghdr *out);
int lshm__ring_accept(struct lshm_ring *r, int fd, struct lshm_op *op, bool multishot);
int lshm__ring_connect(struct lshm_ring *r, int fd, const struct sockaddr *addr,
                      socklen_t len, struct lshm_op *op);
int lshm__ring_cancel(struct lshm_ring *r, struct lshm_op *op);
/* Wait until a FUTEX_WAKE on the shared futex word (while it holds val),
 * and wake one waiter on it: -EOPNOTSUPP without LSHM_FEAT_FUTEX.  A wake
 * has no completion unless it fails. */
int lshm__ring_futex_wait(struct lshm_ring *r, uint32_t *word, uint32_t val,
                          struct lshm_op *op);
int lshm__ring_futex_wake(struct lshm_ring *r, uint32_t *word);
/* One completion after ms milliseconds (-ETIME), unless cancelled. */
int lshm__ring_timeout(struct lshm_ring *r, unsigned ms, struct lshm_op *op);

int lshm__ring_submit(struct lshm_ring *r);
/* Nothing to submit, nothing in flight that needs an enter, no completion
 * waiting (as a CQE or as task work): a run with no wait can skip the
 * kernel.  False where the kernel cannot tell us. */
bool lshm__ring_is_idle(struct lshm_ring *r);
/* Does the kernel say completions wait (as CQEs or task work)?  False where
 * it cannot tell (epoll, kernels without the flag): poll now and then. */
bool lshm__ring_has_completions(struct lshm_ring *r);
/* Sends in flight, counted by the caller: a chain needs them asked for. */
void lshm__ring_sends(struct lshm_ring *r, int delta);
/* Submit and collect completions without waiting, then dispatch them:
 * under DEFER_TASKRUN a linked chain only moves on inside such a call. */
int lshm__ring_pump(struct lshm_ring *r);
/* Submit, wait up to timeout_ms (0: no wait, -1: forever) for a completion,
 * dispatch every completion; returns how many. */
int lshm__ring_run(struct lshm_ring *r, int timeout_ms);

int lshm__ring_probe(struct lshm_probe *p);
/* "io_uring", or "epoll: " and why io_uring is not used. */
const char *lshm__ring_carrier(const struct lshm_ring *r);

/* The epoll carrier (epoll.c): the functions above, for a ring whose ep
 * is set.  Same arguments, same results. */
struct lshm_epoll;
int      lshm__ep_new(struct lshm_epoll **ep, unsigned entries);
void     lshm__ep_free(struct lshm_epoll *ep);
void     lshm__ep_forget(struct lshm_epoll *ep);
int      lshm__ep_fd(struct lshm_epoll *ep);
void     lshm__ep_unwatch(struct lshm_epoll *ep, int fd);
void     lshm__ep_wake(struct lshm_epoll *ep);
void     lshm__ep_stats(const struct lshm_epoll *ep, struct lshm_ctx_stats *st);
unsigned lshm__ep_space(const struct lshm_epoll *ep);
int      lshm__ep_queue(struct lshm_epoll *ep, struct lshm_op *op, unsigned kind, int fd,
                        void *arg, unsigned arglen, bool link);
int      lshm__ep_cancel(struct lshm_epoll *ep, struct lshm_op *op);
int      lshm__ep_submit(struct lshm_epoll *ep);
int      lshm__ep_pump(struct lshm_epoll *ep);
int      lshm__ep_run(struct lshm_epoll *ep, int timeout_ms);

/* lshm__ep_queue kinds; a timeout passes its milliseconds as arglen. */
enum { LSHM_OP_SEND = 1, LSHM_OP_RECV, LSHM_OP_ACCEPT, LSHM_OP_CONNECT, LSHM_OP_TIMEOUT };

#endif
