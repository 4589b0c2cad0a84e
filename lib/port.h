/*
 * The port: one SOCK_SEQPACKET socket to a peer process.  Its core
 * (port.c: state, references, queues) sits below its receive path (recv.c)
 * and its send path (send.c); this header is theirs and listen.c's.
 */
#ifndef LSHM_PORT_H
#define LSHM_PORT_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "ctx.h"
#include "msgring.h"
#include "ring.h"
#include "shm.h"
#include "sock.h"
#include "wire.h"

/* How long a port closed by this process reads after its BYE. */
#define LSHM_DRAIN_MS 500
/* How long a consumer at a FENCE waits for its datagram (protocol). */
#define LSHM_FENCE_MS 1000
/* How often a producer with a full ring looks at it again. */
#define LSHM_ROOM_MS  10

/*
 * A port's life, one state at a time; port.c changes it, in one function.
 *
 *   HANDSHAKE --HELLO--> OPEN --BYE sent--> DRAINING --EOF, deadline--> CLOSED
 *       |                  |                                              ^
 *       +------------------+---- error, peer's BYE or EOF, deadline ------+
 *
 * Whether the caller still holds the handle (user_closed) is apart: a port
 * the caller closed sends what is queued, then its BYE, before DRAINING.
 */
enum port_state {
    PORT_HANDSHAKE,     /* our HELLO queued, theirs not seen */
    PORT_OPEN,
    PORT_DRAINING,      /* closed by us: BYE sent, writing shut, reading to EOF */
    PORT_CLOSED,        /* no more messages either way; the socket is shut down */
};

/* A datagram to send, and the chain link that orders it. */
struct smsg {
    struct lshm_op     op;      /* first: a cached smsg's link (ctx->sm_cache) */
    bool               small;   /* SMSG_SMALL bytes of data: goes back to the cache */
    struct lshm_port  *port;
    struct smsg       *next;
    struct msghdr      mh;
    struct iovec       iov;
    union {
        uint64_t       align;   /* cmsghdr alignment */
        char           buf[LSHM_SOCK_FD_SPACE];
    }                  cmsg;
    int                fd;      /* passed with the message, closed after */
    struct lshm_seg   *seg;     /* MMAP: its fd goes out, then is closed */
    uint64_t           fence_end;   /* our ring's tail past its FENCE; 0: none */
    size_t             len;
    uint8_t            data[];
};

struct rdesc {
    struct lshm_seg *seg;       /* referenced */
    uint32_t         chunk;
    uint32_t         nchunks;
};

/* A datagram that came while the peer's ring is in use: held for its FENCE. */
struct parked {
    struct parked    *next;
    uint64_t          fence_tail;   /* the ring's tail, read after it came */
    struct lshm_sock_cmsg cm;       /* its fds (ours to close) and credentials */
    size_t            len;
    uint8_t           data[];
};

/* A received message, held until the caller is done with it. */
struct rmsg {
    struct lshm_msg    pub;     /* first: a cached rmsg's link (ctx->rm_cache) */
    bool               small;   /* RMSG_SMALL bytes of data: goes back to the cache */
    struct rmsg       *next;
    struct lshm_port  *port;
    unsigned           ndesc;
    struct rdesc      *desc;
    struct lshm_iov   *iov;
    struct lshm_iov    iov1;
    uint8_t            data[];
};

/* Told when a port's handshake ended, done or failed (see lshm__port_set_owner). */
typedef void (*lshm_port_ready_fn)(void *owner, struct lshm_port *port);

struct lshm_port {
    struct lshm_ctx     *ctx;           /* NULL once the context is gone */
    struct lshm_port    *next, *prev;   /* in ctx->ports */
    int                  fd;            /* -1 once closed */
    uint16_t             id;
    enum port_state      state;         /* changed by port_enter() only */
    bool                 user_closed;   /* the handle was given back */
    int                  error;         /* why it closed, -errno */
    char                 reason[192];

    /* The peer, from its HELLO and the kernel's credentials. */
    pid_t                peer_pid;
    uid_t                peer_uid;
    gid_t                peer_gid;
    uint16_t             peer_port_id;
    uint32_t             peer_max_segments;
    struct lshm_peer    *peer;          /* referenced once OPEN */
    bool                 forget_segments;   /* failed: take back unmapped segments */
    bool                 shm_acked;     /* SHM_ACK since the last wait */

    /* Sending: FIFO queue; one linked chain in flight at a time. */
    struct smsg         *sq_head, *sq_tail;
    unsigned             sq_len;        /* queued, not in flight */
    unsigned             inflight;      /* sends submitted, not completed */
    struct smsg         *if_head, *if_tail;  /* those sends, oldest first */

    /* Message rings (protocol version 2), both ways once both HELLOs said RING. */
    bool                 ring_ok;       /* both HELLOs set RING */
    bool                 peer_futex;    /* the peer sleeps on its futex word */
    uint32_t             peer_ring_size;    /* the peer's HELLO: our ring at most this */
    struct lshm_msgring  tx;            /* ours (hdr NULL: none yet) */
    bool                 tx_dirty;      /* records reserved, tail not published */
    unsigned             unreaped;      /* ring sends since completions were reaped */
    struct smsg         *sq_fence;      /* first queued datagram whose FENCE is held */
    struct smsg         *bl_head, *bl_tail; /* waiting for the handshake or ring room */
    unsigned             bl_len;
    struct lshm_msgring  rx;            /* the peer's (hdr NULL: no RING yet) */
    bool                 fence_wait;    /* at a FENCE, its datagram not here yet */
    struct parked       *pk_head, *pk_tail;  /* datagrams held for their FENCE */
    unsigned             pk_len;
    struct lshm_op       futex_op;      /* waiting on rx's wake word */
    bool                 futex_armed;
    struct lshm_port_stats stats;

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
    lshm_event_fn        on_event;      /* room or memory back after -EAGAIN */
    void                *event_arg;
    unsigned             want;          /* LSHM_WAIT_SEND | _SHM that refused a call */
    bool                 close_pending; /* on_close still to be called */
    bool                 in_handler;    /* a handler of this port runs */
    struct lshm_link     links[PL_COUNT];   /* on the context's lists */
    lshm_port_ready_fn   on_ready;      /* accepted: told when the handshake ends */
    void                *owner;         /* its argument (the listener) */
    unsigned             refs;          /* handle + ops in flight + messages */
};

struct lshm_tracking {
    struct lshm_port *port;
    struct lshm_seg  *seg;              /* referenced */
    uint32_t          slot;
    uint32_t          stream;
    bool              sent;
};

/* ---- port.c: the core ---- */

/* A port on socket fd (checked), its HELLO queued; lshm__port_start() sends it. */
int  lshm__port_new(struct lshm_ctx *ctx, int fd, struct lshm_port **out);
/* Accepted: tell ready(owner, port) when the handshake ends; HELLO due by due. */
void lshm__port_set_owner(struct lshm_port *port, lshm_port_ready_fn ready, void *owner,
                          long long due);
/* The owner goes away: nobody is told any more. */
void lshm__port_disown(struct lshm_port *port);

/* The state changes: each verb is one way a port's life moves on or ends. */
void lshm__port_open(struct lshm_port *port);               /* HELLO accepted */
bool lshm__port_bye_sent(struct lshm_port *port);           /* true: DRAINING */
void lshm__port_fail(struct lshm_port *port, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));                   /* error, EOF, peer's BYE */
void lshm__port_reap(struct lshm_port *port);               /* the context is freed */
void lshm__port_forget(struct lshm_port *port);             /* a forked child's copy */
/* Is it still reading: before CLOSED? */
bool lshm__port_is_reading(const struct lshm_port *port);
/* Give back what the state no longer needs; free the port once unreachable. */
void lshm__port_settle(struct lshm_port *port);

/* Queues. */
struct smsg *lshm__smsg_new(struct lshm_port *port, size_t len);
void lshm__smsg_free(struct smsg *m);
/* Queue a message in order: the socket's chain, after a FENCE once our
 * ring is out, or the backlog while the handshake or ring room is awaited. */
void lshm__port_queue(struct lshm_port *port, struct smsg *m);
/* Does a user message go through our ring (both HELLOs said RING)? */
bool lshm__port_uses_ring(const struct lshm_port *port);
/* Our ring, made and announced (RING queued) on first use: 0 or -errno. */
int  lshm__port_ring_out(struct lshm_port *port);
/* Move what the backlog holds into the ring and the chain while room lasts. */
void lshm__port_flush_backlog(struct lshm_port *port);
/*
 * Publish our ring's tail and wake the peer if it sleeps.  A FENCE stays
 * unpublished until its datagram is about to be submitted, so that the
 * peer never waits at a FENCE for a datagram still in our queue.
 */
void lshm__port_publish(struct lshm_port *port);
/* The first n queued datagrams are about to be submitted: their FENCEs may go. */
void lshm__port_release_fences(struct lshm_port *port, unsigned n);
int  lshm__port_queue_ctrl(struct lshm_port *port, uint8_t type);
int  lshm__port_queue_mmap(struct lshm_port *port, struct lshm_seg *seg);
/* A sent message failed: give back the chunks and slot the peer never saw. */
void lshm__port_free_unsent(struct lshm_port *port, const struct smsg *m);
/* Do a receiver's part for a message nobody reads (incoming: the peer's). */
void lshm__port_discard(struct lshm_port *port, const struct lshm_wire_view *v,
                        bool incoming);
/* A received message with extra bytes of data, from the context's cache
 * when small; given back with lshm__rmsg_free. */
struct rmsg *lshm__rmsg_new(struct lshm_port *port, size_t extra);
void lshm__rmsg_free(struct lshm_port *port, struct rmsg *rm);
void lshm__rmsg_release(struct rmsg *rm);
void lshm__port_drop_received(struct lshm_port *port);
struct lshm_msg *lshm__port_pop(struct lshm_port *port);

/* Handlers, waits and shared memory, for the public functions. */
int  lshm__port_set_handler(struct lshm_port *port, lshm_msg_fn on_msg,
                            lshm_close_fn on_close, void *arg);
void lshm__port_set_event_handler(struct lshm_port *port, lshm_event_fn on_event, void *arg);
/* A call on the port gave -EAGAIN for events: its event handler waits for them. */
void lshm__port_want(struct lshm_port *port, unsigned events);
/* The context's PL_WANT phase: call the event handler for what is back. */
void lshm__port_events(struct lshm_port *port);
int  lshm__port_wait(struct lshm_port *port, unsigned events, int timeout_ms);
int  lshm__port_peer(const struct lshm_port *port, pid_t *pid, uid_t *uid, gid_t *gid);
const char *lshm__port_error(const struct lshm_port *port);
int  lshm__port_buf_alloc(struct lshm_port *port, size_t size, struct lshm_buf **buf);
int  lshm__port_tracking_new(struct lshm_port *port, uint32_t stream,
                             struct lshm_tracking **out);
bool lshm__tracking_cancel(struct lshm_tracking *t);

/* The context's callbacks (struct lshm_ctx_ops) and walks of its ports. */
void lshm__port_dispatch(struct lshm_port *port);
void lshm__port_sweep(struct lshm_port *port);
void lshm__port_expire(struct lshm_port *port, enum port_list_id which);
bool lshm__ports_closing(const struct lshm_ctx *ctx);
void lshm__ports_hang_up(struct lshm_ctx *ctx);
void lshm__ports_reap(struct lshm_ctx *ctx);
void lshm__ports_forget(struct lshm_ctx *ctx);

/* ---- recv.c: the receive path ---- */

void lshm__recv_arm(struct lshm_port *port);
/* Check one message in v1 datagram format, then act on it or deliver it. */
void lshm__recv_message(struct lshm_port *port, const void *data, size_t len,
                        int *fds, unsigned nfds, const struct ucred *cred);
int  lshm__recv(struct lshm_port *port, struct lshm_msg *msg, int timeout_ms);
void lshm__recv_done(struct lshm_msg *msg);
/* Read the peer's ring (ops->poll): true if anything was read. */
bool lshm__recv_poll(struct lshm_port *port);
/* About to sleep (ops->sleep): false if the ring has records after all. */
bool lshm__recv_sleep(struct lshm_port *port);

/* ---- send.c: the send path ---- */

/* Arm the receive, send the HELLO. */
void lshm__port_start(struct lshm_port *port);
/* The handle is given back: what is queued still goes out, then BYE. */
void lshm__port_close(struct lshm_port *port);
void lshm__ports_close(struct lshm_ctx *ctx);
int  lshm__send(struct lshm_port *port, const struct lshm_out *out, unsigned flags);
/* Submit the queue as one chain when nothing is in flight (ops->kick). */
void lshm__send_kick(struct lshm_port *port);

#endif
