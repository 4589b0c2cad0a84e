/*
 * Contexts, ports and listeners: the state behind the public handles.
 */
#ifndef LSHM_PORT_H
#define LSHM_PORT_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "ring.h"
#include "shm.h"
#include "wire.h"

/* A wake-up of the context: every deadline of its kind is the same delay
 * after its start, so the one armed is never later than a new one. */
struct lshm_timer {
    struct lshm_op op;
    bool           armed;
};

struct lshm_ctx {
    struct lshm_ring       *ring;
    pid_t                   pid;        /* creator: another pid is a forked child */
    struct lshm_ctx_params  p;          /* with defaults filled in */
    struct lshm_port       *ports;      /* every port not yet freed */
    struct lshm_listener   *listeners;
    uint64_t                msgs_sent;
    uint64_t                msgs_received;
    unsigned                walking;    /* completions or handlers running */
    struct lshm_timer       hs_timer;   /* wakes the context for handshake deadlines */
    struct lshm_timer       drain_timer;    /* and for the ends of drains */
    unsigned                zombies;    /* ports whose free waits for that */
};

enum port_state {
    PORT_HANDSHAKE,     /* our HELLO queued, theirs not seen */
    PORT_OPEN,
    PORT_CLOSED,        /* no more messages either way; error says why */
};

struct smsg;
struct rmsg;

struct lshm_port {
    struct lshm_ctx     *ctx;           /* NULL once the context is gone */
    struct lshm_port    *next, *prev;   /* in ctx->ports */
    int                  fd;            /* -1 once closed */
    uint16_t             id;
    enum port_state      state;
    bool                 user_closed;   /* the handle was given back */
    bool                 shutdown;      /* shutdown(2) done, socket closing */
    int                  error;         /* why it closed, -errno */
    char                 reason[192];

    /* The peer, from its HELLO and the kernel's credentials. */
    pid_t                peer_pid;
    uid_t                peer_uid;
    gid_t                peer_gid;
    uint16_t             peer_port_id;
    uint32_t             peer_max_segments;
    struct lshm_peer    *peer;          /* referenced once OPEN */
    bool                 shm_acked;     /* SHM_ACK since the last wait */

    /* Sending: FIFO queue; one linked chain in flight at a time. */
    struct smsg         *sq_head, *sq_tail;
    unsigned             sq_len;        /* queued, not in flight */
    unsigned             inflight;      /* sends submitted, not completed */
    struct smsg         *if_head, *if_tail;  /* those sends, oldest first */

    /* Receiving. */
    struct lshm_op       recv_op;
    struct msghdr        recv_mh;
    struct iovec         recv_iov;
    uint8_t             *recv_buf;      /* single-shot mode */
    union {
        uint64_t         align;   /* cmsghdr alignment */
        char             buf[LSHM_RING_CMSG_SPACE];
    }                    recv_cmsg;
    bool                 recv_armed;
    bool                 recv_multishot;
    bool                 recv_stopped;  /* held messages reached the bound */
    struct rmsg         *rq_head, *rq_tail;
    unsigned             held;          /* queued + delivered, not done */

    lshm_msg_fn          on_msg;
    lshm_close_fn        on_close;
    void                *arg;
    bool                 close_pending; /* on_close still to be called */
    bool                 in_handler;    /* a handler of this port runs */
    bool                 zombie;        /* to free when the walk ends */
    struct lshm_listener *listener;     /* accepted, handshake not done */
    bool                 draining;      /* closed by us: BYE sent, reading to EOF */
    long long            due;           /* CLOCK_MONOTONIC ms: the HELLO (listener) or
                                         * the drain's end (draining) is due by then */
    unsigned             refs;          /* handle + ops in flight + messages */
};

struct lshm_listener {
    struct lshm_ctx      *ctx;
    struct lshm_listener *next, *prev;
    int                   fd;
    char                 *path;
    struct lshm_op        op;
    bool                  armed;
    bool                  closing;
    struct lshm_port    **ready;        /* accepted, waiting for lshm_accept */
    unsigned              nready, capready;
    lshm_accept_fn        on_accept;
    void                 *arg;
};

struct lshm_tracking {
    struct lshm_port *port;
    struct lshm_seg  *seg;              /* referenced */
    uint32_t          slot;
    uint32_t          stream;
    bool              sent;
};

/* port.c */
int  lshm_port_new(struct lshm_ctx *ctx, int fd, struct lshm_port **out);
void lshm_port_fail(struct lshm_port *port, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void lshm_port_release(struct lshm_port *port);
int  lshm_port_send(struct lshm_port *port, const struct lshm_out *out, unsigned flags);
struct lshm_msg *lshm_port_pop(struct lshm_port *port);
void lshm_port_msg_done(struct lshm_msg *msg);
int  lshm_port_queue_mmap(struct lshm_port *port, struct lshm_seg *seg);
void lshm_port_kick(struct lshm_port *port);
void lshm_port_reap(struct lshm_port *port);   /* context going away */
bool lshm_port_shm_ready(struct lshm_port *port);

void lshm_port_forget(struct lshm_port *port); /* forked child's copy */
void lshm_port_dispatch(struct lshm_port *port);
void lshm_port_sweep(struct lshm_port *port);

/* api.c: submit and dispatch completions, freeing closed ports after. */
int  lshm_ctx_pump(struct lshm_ctx *ctx);
int  lshm_ctx_step(struct lshm_ctx *ctx, int timeout_ms);
/* Make the context's wait end within ms (if t is not armed already). */
void lshm_ctx_wake_in(struct lshm_ctx *ctx, struct lshm_timer *t, unsigned ms);

/* How long a port closed by this process reads after its BYE. */
#define LSHM_DRAIN_MS 500

/* listen.c */
void lshm_listener_reap(struct lshm_listener *l);
void lshm_listener_forget(struct lshm_listener *l);
void lshm_listener_dispatch(struct lshm_listener *l);
void lshm_listener_ready(struct lshm_listener *l, struct lshm_port *port);


#endif
