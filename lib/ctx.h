/*
 * The context, below the ports: its parameters, its ring, the lists of
 * ports its next run must visit, the deadline lists, and the run loop.
 * The context calls the layers above it only through struct lshm_ctx_ops.
 */
#ifndef LSHM_CTX_H
#define LSHM_CTX_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "ring.h"

struct lshm_port;
struct lshm_listener;

/*
 * The ports a context must visit in its next run, so that a run costs
 * what happened, not how many ports there are.  A port is on a list at
 * most once (its link says so) and leaves it when freed.  The deadline
 * lists stay in order by appending: every deadline of a list is the same
 * delay after its start.
 */
enum port_list_id {
    PL_READY,   /* a handler to call: messages (with on_msg) or a close */
    PL_KICK,    /* queued messages and nothing in flight */
    PL_ZOMBIE,  /* freed while the context walked: free after it */
    PL_HELLO,   /* deadline: accepted, its HELLO due by link.due */
    PL_DRAIN,   /* deadline: BYE sent, the peer's end of file due by link.due */
    PL_FENCE,   /* deadline: at a FENCE, its datagram due by link.due */
    PL_ROOM,    /* deadline: our ring full, look again at link.due */
    PL_RING,    /* reading the peer's message ring: polled by every run */
    PL_WANT,    /* an event handler waits for room or memory: checked by every run */
    PL_COUNT
};

struct lshm_link {
    struct lshm_port *port;     /* whose link this is */
    struct lshm_link *prev, *next;
    long long         due;      /* CLOCK_MONOTONIC ms, on a deadline list */
    bool              on;
};

struct lshm_list {
    struct lshm_link *head, *tail;
    unsigned          len;
};

/* A wake-up of the context for a deadline list: the one armed is never
 * later than a new deadline of the same list. */
struct lshm_timer {
    struct lshm_op op;
    bool           armed;
};

/* How often a wait for shared memory looks at the free maps again. */
#define LSHM_RECHECK_MS 10

/* What the run loop calls in the layers above it, phase by phase. */
struct lshm_ctx_ops {
    void (*kick)(struct lshm_port *port);       /* PL_KICK: submit its queue */
    void (*dispatch)(struct lshm_port *port);   /* PL_READY: call its handlers */
    void (*sweep)(struct lshm_port *port);      /* PL_ZOMBIE: free it if unreachable */
    void (*expire)(struct lshm_port *port, enum port_list_id which); /* deadline passed */
    void (*accept)(struct lshm_ctx *ctx);       /* call the listeners' handlers */
    bool (*poll)(struct lshm_port *port);       /* PL_RING: read its ring; true if any */
    bool (*sleep)(struct lshm_port *port);      /* PL_RING: may the context sleep? */
    void (*events)(struct lshm_port *port);     /* PL_WANT: call its event handler */
};

struct lshm_ctx {
    struct lshm_ring          *ring;
    const struct lshm_ctx_ops *ops;
    pid_t                      pid;         /* creator: another pid is a forked child */
    pid_t                      tid;         /* the thread that may use it (lshm__ctx_check) */
    struct lshm_ctx_params     p;           /* with defaults filled in */
    struct lshm_port          *ports;       /* every port not yet freed (port.c's) */
    struct lshm_listener      *listeners;   /* (listen.c's) */
    uint64_t                   msgs_sent;
    uint64_t                   msgs_received;
    unsigned                   walking;     /* completions or handlers running */
    bool                       fd_asked;    /* lshm_ctx_fd: the caller may sleep in poll */
    struct lshm_list           lists[PL_COUNT];
    struct lshm_timer          timers[PL_COUNT];  /* of the deadline lists */
    void                      *rm_cache;    /* small received messages to reuse (port.c's);
                                             * each one's first word links the next */
    unsigned                   rm_cached;
    void                      *sm_cache;    /* small messages to send, likewise */
    unsigned                   sm_cached;
};

int  lshm__ctx_new(struct lshm_ctx **ctx, const struct lshm_ctx_params *params,
                   const struct lshm_ctx_ops *ops);
/* 0 if the calling thread owns ctx; else -EPERM, saying whose it is
 * (another thread's, or the parent's in a forked child). */
int  lshm__ctx_check(const struct lshm_ctx *ctx);
/* Is this a forked child's copy of the context? */
bool lshm__ctx_is_copy(const struct lshm_ctx *ctx);
/* A forked child's copy: let go of our copies of the ring and the peers. */
void lshm__ctx_forget(struct lshm_ctx *ctx);
/* Run while busy(ctx) says so, up to ms, expiring deadlines, calling no handler. */
void lshm__ctx_linger(struct lshm_ctx *ctx, bool (*busy)(const struct lshm_ctx *), int ms);
/* Free the ring: nothing is in flight after this. */
void lshm__ctx_stop(struct lshm_ctx *ctx);
void lshm__ctx_free(struct lshm_ctx *ctx);

int      lshm__ctx_fd(const struct lshm_ctx *ctx);
unsigned lshm__ctx_features(const struct lshm_ctx *ctx);
/* "io_uring", or "epoll: " and why io_uring is not used. */
const char *lshm__ctx_carrier(const struct lshm_ctx *ctx);
void     lshm__ctx_stats(const struct lshm_ctx *ctx, struct lshm_ctx_stats *st);

/* The run loop, phase by phase (see ctx.c). */
int  lshm__ctx_run(struct lshm_ctx *ctx, int timeout_ms);
/* Run the ring without calling any handler: for waits inside the library. */
int  lshm__ctx_step(struct lshm_ctx *ctx, int timeout_ms);
/* Submit and reap what is ready, without waiting; no handler runs. */
int  lshm__ctx_pump(struct lshm_ctx *ctx);
/* Submit what was queued on ports with nothing in flight (LSHM_MORE). */
int  lshm__ctx_flush(struct lshm_ctx *ctx);
/* Submit port's queue now (a message queued outside the send path). */
void lshm__ctx_kick(struct lshm_ctx *ctx, struct lshm_port *port);

void lshm__ctx_list_add(struct lshm_ctx *ctx, enum port_list_id which, struct lshm_link *k);
void lshm__ctx_list_del(struct lshm_ctx *ctx, enum port_list_id which, struct lshm_link *k);
/* k's port is due by due: its deadline list's turn in the run calls ops->expire. */
void lshm__ctx_deadline(struct lshm_ctx *ctx, enum port_list_id which, struct lshm_link *k,
                        long long due);

#endif
