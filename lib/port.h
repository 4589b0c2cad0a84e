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

/*
 * The ports a context must visit in its next run, so that a run costs
 * what happened, not how many ports there are.  A port is on a list at
 * most once (its link says so) and leaves it when freed.
 */
enum port_list_id {
    PL_READY,   /* a handler to call: messages (with on_msg) or a close */
    PL_KICK,    /* queued messages and nothing in flight */
    PL_ZOMBIE,  /* freed while the context walked: free after it */
    PL_COUNT
};

struct port_list {
    struct lshm_port *head, *tail;
    unsigned          len;
};

struct port_link {
    struct lshm_port *prev, *next;
    bool              on;
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
    long long               next_due;   /* earliest port deadline, 0: none */
    struct port_list        lists[PL_COUNT];
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
    struct port_link     links[PL_COUNT];   /* on the context's lists */
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
int  lshm__port_new(struct lshm_ctx *ctx, int fd, struct lshm_port **out);
void lshm__port_fail(struct lshm_port *port, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void lshm__port_release(struct lshm_port *port);
int  lshm__port_send(struct lshm_port *port, const struct lshm_out *out, unsigned flags);
struct lshm_msg *lshm__port_pop(struct lshm_port *port);
void lshm__port_msg_done(struct lshm_msg *msg);
int  lshm__port_queue_mmap(struct lshm_port *port, struct lshm_seg *seg);
void lshm__port_kick(struct lshm_port *port);
void lshm__port_reap(struct lshm_port *port);   /* context going away */
bool lshm__port_shm_ready(struct lshm_port *port);

void lshm__port_forget(struct lshm_port *port); /* forked child's copy */
void lshm__port_dispatch(struct lshm_port *port);
void lshm__port_sweep(struct lshm_port *port);

void lshm__port_list_add(struct lshm_port *port, enum port_list_id which);
struct lshm_port *lshm__port_list_pop(struct lshm_ctx *ctx, enum port_list_id which);

/* api.c: submit and dispatch completions, freeing closed ports after. */
int  lshm__ctx_pump(struct lshm_ctx *ctx);
int  lshm__ctx_step(struct lshm_ctx *ctx, int timeout_ms);
/* A port deadline at due (CLOCK_MONOTONIC ms); t wakes the context for it. */
void lshm__ctx_due(struct lshm_ctx *ctx, struct lshm_timer *t, long long due);

/* How long a port closed by this process reads after its BYE. */
#define LSHM_DRAIN_MS 500

/* listen.c */
void lshm__listener_reap(struct lshm_listener *l);
void lshm__listener_forget(struct lshm_listener *l);
void lshm__listener_dispatch(struct lshm_listener *l);
void lshm__listener_ready(struct lshm_listener *l, struct lshm_port *port);


#endif
