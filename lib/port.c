/*
 * The port's core: its state and the one function that changes it, its
 * references and when it is freed, its send and receive queues, handlers,
 * waits, and the shared memory it allocates.  The receive path (recv.c)
 * and the send path (send.c) sit above it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>
#include <sys/socket.h>
#include <unistd.h>

#include "port.h"


static _Atomic unsigned next_port_id;

/* ---- state ---- */

static void list_add(struct lshm_port *port, enum port_list_id which)
{
    if (port->ctx != NULL)
        lshm__ctx_list_add(port->ctx, which, &port->links[which]);
}

static void list_del(struct lshm_port *port, enum port_list_id which)
{
    if (port->ctx != NULL)
        lshm__ctx_list_del(port->ctx, which, &port->links[which]);
}

/*
 * The one place a port's state changes (see port.h), with what entering
 * each state does.
 */
static void port_enter(struct lshm_port *port, enum port_state to)
{
    switch (to) {
    case PORT_HANDSHAKE:
    case PORT_OPEN:
        break;
    case PORT_DRAINING:
        /* A peer that never closes its end does not keep the port. */
        if (port->ctx != NULL)
            lshm__ctx_deadline(port->ctx, PL_DRAIN, &port->links[PL_DRAIN],
                               lshm__now_ms() + LSHM_DRAIN_MS);
        port->recv_stopped = false;
        break;
    case PORT_CLOSED:
        list_del(port, PL_HELLO);
        list_del(port, PL_DRAIN);
        /* Stop the socket: pending operations complete, then it is closed. */
        list_del(port, PL_FENCE);
        list_del(port, PL_ROOM);
        list_del(port, PL_RING);
        if (port->fd >= 0) {
            shutdown(port->fd, SHUT_RDWR);
            if (port->recv_armed && port->ctx != NULL)
                lshm__ring_cancel(port->ctx->ring, &port->recv_op);
        }
        if (port->futex_armed && port->ctx != NULL)
            lshm__ring_cancel(port->ctx->ring, &port->futex_op);
        break;
    }
    port->state = to;
}

bool lshm__port_is_reading(const struct lshm_port *port)
{
    return port->state != PORT_CLOSED;
}

static bool port_is_live(const struct lshm_port *port)
{
    return port->state == PORT_HANDSHAKE || port->state == PORT_OPEN;
}

static bool port_idle(const struct lshm_port *port)
{
    return port->inflight == 0 && !port->recv_armed && !port->futex_armed;
}

/* ---- references and freeing ---- */

static void drop_parked(struct lshm_port *port);

static void port_free(struct lshm_port *port)
{
    unsigned i;

    if (port->ctx != NULL) {
        if (port->prev != NULL)
            port->prev->next = port->next;
        else
            port->ctx->ports = port->next;
        if (port->next != NULL)
            port->next->prev = port->prev;
        for (i = 0; i < PL_COUNT; i++)
            list_del(port, i);
    }
    /* Off the peer's list of sockets before the fd number can be reused. */
    if (port->peer != NULL)
        lshm__peer_put_sock(port->peer, port->fd);
    if (port->fd >= 0)
        lshm__ring_close(port->ctx != NULL ? port->ctx->ring : NULL, port->fd);
    /* Datagrams still held for a FENCE (a drain that ended at a violation). */
    drop_parked(port);
    lshm__msgring_free(&port->tx);
    lshm__msgring_free(&port->rx);
    free(port->recv_buf);
    free(port);
}

/* Free the port once nobody can reach it: the handle was given back, no
 * operation is in flight, no message points at it. */
static void port_maybe_free(struct lshm_port *port)
{
    if (!port->user_closed || port->refs > 0 || port->held > 0 || !port_idle(port))
        return;
    /* Someone may be walking a list of ports or holding this port in a
     * completion: free it when that is over (lshm__port_sweep). */
    if (port->ctx != NULL && port->ctx->walking > 0) {
        list_add(port, PL_ZOMBIE);
        return;
    }
    port_free(port);
}

/* Off the zombie list, with nothing walking: free it if still unreachable. */
void lshm__port_sweep(struct lshm_port *port)
{
    port_maybe_free(port);
}

void lshm__port_settle(struct lshm_port *port)
{
    /* The peer's segments go once its last port is gone and no message
     * or buffer holds them (those keep their own references); sends in
     * flight may still need the table to give their chunks back. */
    if (port->state == PORT_CLOSED && port->inflight == 0 && port->peer != NULL) {
        if (port->forget_segments)
            lshm__peer_out_forget_port(port->peer, port->id);
        lshm__peer_put_sock(port->peer, port->fd);
        port->peer = NULL;
    }
    if (port->state == PORT_CLOSED && port_idle(port) && port->fd >= 0) {
        lshm__ring_close(port->ctx != NULL ? port->ctx->ring : NULL, port->fd);
        port->fd = -1;
    }
    port_maybe_free(port);
}

/* ---- queues ---- */

/* Messages to send this small reuse their memory: control messages, and
 * user messages waiting for room in the ring. */
#define SMSG_SMALL   256u
#define SMSG_CACHED  256u

struct smsg *lshm__smsg_new(struct lshm_port *port, size_t len)
{
    struct lshm_ctx *ctx = port->ctx;
    struct smsg *m;

    if (len <= SMSG_SMALL && ctx != NULL && ctx->sm_cache != NULL) {
        m = ctx->sm_cache;
        ctx->sm_cache = *(void **)m;
        ctx->sm_cached--;
    } else {
        m = malloc(sizeof(*m) + (len <= SMSG_SMALL ? SMSG_SMALL : len));
        if (m == NULL)
            return NULL;
        m->small = len <= SMSG_SMALL;
    }
    m->port = port;
    m->next = NULL;
    m->fd = -1;
    m->seg = NULL;
    m->fence_end = 0;
    m->len = len;
    return m;
}

void lshm__smsg_free(struct smsg *m)
{
    struct lshm_ctx *ctx = m->port->ctx;

    if (m->fd >= 0)
        close(m->fd);
    if (m->seg != NULL) {
        lshm__seg_close_fd(m->seg);
        lshm__seg_unref(m->seg);
    }
    if (m->small && ctx != NULL && ctx->sm_cached < SMSG_CACHED) {
        *(void **)m = ctx->sm_cache;
        ctx->sm_cache = m;
        ctx->sm_cached++;
        return;
    }
    free(m);
}

static uint32_t smsg_size(const struct smsg *m)
{
    uint32_t size;

    memcpy(&size, m->data + offsetof(struct lshm_wire_msg, size), sizeof(size));
    return size;
}

static uint8_t smsg_type(const struct smsg *m);

static void sq_append(struct lshm_port *port, struct smsg *m)
{
    if (smsg_type(m) >= LSHM_TYPE_USER_MIN) {
        port->stats.sock_msgs++;
        port->stats.sock_bytes += smsg_size(m);
    }
    if (port->sq_tail != NULL)
        port->sq_tail->next = m;
    else
        port->sq_head = m;
    port->sq_tail = m;
    port->sq_len++;
    /* Whoever queued may not kick (LSHM_MORE): the next run will. */
    if (port->inflight == 0)
        list_add(port, PL_KICK);
}

static void bl_append(struct lshm_port *port, struct smsg *m)
{
    if (port->bl_tail != NULL)
        port->bl_tail->next = m;
    else
        port->bl_head = m;
    port->bl_tail = m;
    port->bl_len++;
}

static uint8_t smsg_type(const struct smsg *m)
{
    return m->data[offsetof(struct lshm_wire_msg, type)];
}

/* A user message without an fd rides in the ring; the rest needs the socket. */
static bool smsg_fits_ring(const struct smsg *m)
{
    return m->fd < 0 && m->seg == NULL && smsg_type(m) >= LSHM_TYPE_USER_MIN;
}

/* WAKE and SHM_ACK order nothing, HELLO and RING come before any record:
 * none takes a FENCE. */
static bool smsg_takes_fence(const struct smsg *m)
{
    uint8_t type = smsg_type(m);

    return type != LSHM_WIRE_HELLO && type != LSHM_WIRE_RING && type != LSHM_WIRE_WAKE &&
           type != LSHM_WIRE_SHM_ACK;
}

bool lshm__port_uses_ring(const struct lshm_port *port)
{
    return port->ring_ok && port->state == PORT_OPEN;
}

static void ring_violation(struct lshm_port *port)
{
    lshm__port_fail(port, -EPROTO, "protocol violation: the peer moved our ring's head "
                    "out of bounds");
}

/*
 * One message into our ring: a MSG record with its bytes, or a FENCE
 * before a datagram (which then joins the chain).  False when the ring is
 * full: the producer asked for an SHM_ACK and looks again on a timer.
 */
static bool ring_put(struct lshm_port *port, struct smsg *m)
{
    bool msg = smsg_fits_ring(m);
    void *body;
    int err = 0;

    body = lshm__msgring_reserve(&port->tx, msg ? LSHM_REC_MSG : LSHM_REC_FENCE,
                                 msg ? (uint32_t)m->len : 0, &err);
    if (body == NULL) {
        if (err == -EPROTO) {
            ring_violation(port);
            return false;
        }
        if (lshm__msgring_want_room(&port->tx, msg ? (uint32_t)m->len : 0) < 0) {
            ring_violation(port);
            return false;
        }
        /* (Room may have come meanwhile: the next flush finds it.) */
        if (port->ctx != NULL)
            lshm__ctx_deadline(port->ctx, PL_ROOM, &port->links[PL_ROOM],
                               lshm__now_ms() + LSHM_ROOM_MS);
        return false;
    }
    port->tx_dirty = true;
    if (msg) {
        memcpy(body, m->data, m->len);
        port->stats.ring_msgs++;
        port->stats.ring_bytes += smsg_size(m);
        if (port->ctx != NULL)
            port->ctx->msgs_sent++;
        lshm__smsg_free(m);
    } else {
        /* Published with the chain that takes its datagram (send_kick). */
        m->fence_end = port->tx.pos;
        sq_append(port, m);
        if (port->sq_fence == NULL)
            port->sq_fence = m;
    }
    return true;
}

void lshm__port_queue(struct lshm_port *port, struct smsg *m)
{
    m->next = NULL;
    if (port->tx.hdr == NULL || !smsg_takes_fence(m)) {
        /* Not yet in the ring's order (or ordering nothing): the chain.
         * A user message waits for the handshake to know its way. */
        if (port->state == PORT_HANDSHAKE && smsg_type(m) >= LSHM_TYPE_USER_MIN)
            bl_append(port, m);
        else
            sq_append(port, m);
        return;
    }
    if (port->bl_head != NULL || !ring_put(port, m)) {
        /* It waits for room (counted once, however often it is tried). */
        port->stats.ring_full++;
        bl_append(port, m);
    }
}

int lshm__port_ring_out(struct lshm_port *port)
{
    uint32_t size = port->ctx->p.ring_size;
    struct smsg *m;
    int ret;

    if (port->tx.hdr != NULL)
        return 0;
    if (size > port->peer_ring_size)
        size = port->peer_ring_size;
    m = lshm__smsg_new(port, 64);
    if (m == NULL)
        return lshm__fail(-ENOMEM, "out of memory");
    ret = lshm__msgring_create(&port->tx, size, port->id, port->ctx->pid, port->peer_pid);
    if (ret < 0) {
        free(m);
        return ret;
    }
    m->len = lshm__wire_encode_ctrl(m->data, LSHM_WIRE_RING, port->ctx->pid, port->id, size);
    /* The ring's fd goes with the RING datagram and is closed after it. */
    m->fd = port->tx.fd;
    port->tx.fd = -1;
    sq_append(port, m);
    return 0;
}

void lshm__port_flush_backlog(struct lshm_port *port)
{
    struct smsg *m;

    while ((m = port->bl_head) != NULL && port->state == PORT_OPEN) {
        if (port->ring_ok && smsg_fits_ring(m) && port->tx.hdr == NULL &&
            lshm__port_ring_out(port) < 0) {
            lshm__port_fail(port, -ENOMEM, "cannot make the message ring: %s",
                            lshm_last_error());
            return;
        }
        if (port->tx.hdr != NULL && smsg_takes_fence(m)) {
            port->bl_head = m->next;
            m->next = NULL;
            if (!ring_put(port, m)) {
                m->next = port->bl_head;
                port->bl_head = m;
                break;
            }
        } else {
            port->bl_head = m->next;
            m->next = NULL;
            sq_append(port, m);
        }
        port->bl_len--;
    }
    if (port->bl_head == NULL) {
        port->bl_tail = NULL;
        list_del(port, PL_ROOM);
    }
    lshm__port_publish(port);
}

void lshm__port_release_fences(struct lshm_port *port, unsigned n)
{
    struct smsg *m = port->sq_head;
    bool passed = false;

    if (port->sq_fence == NULL)
        return;
    for (; m != NULL && n > 0; m = m->next, n--)
        passed |= m == port->sq_fence;
    if (!passed)
        return;
    /* The next datagram with a FENCE, after those going now. */
    while (m != NULL && m->fence_end == 0)
        m = m->next;
    port->sq_fence = m;
}

void lshm__port_publish(struct lshm_port *port)
{
    uint64_t limit = UINT64_MAX;
    struct lshm_ring *r;

    if (!port->tx_dirty)
        return;
    /* Up to the first FENCE whose datagram has not gone yet, excluded. */
    if (port->sq_fence != NULL)
        limit = port->sq_fence->fence_end - LSHM_REC_HDR;
    port->tx_dirty = port->sq_fence != NULL;
    if (!lshm__msgring_publish(&port->tx, limit) || port->ctx == NULL)
        return;
    port->stats.wakes_sent++;
    r = port->ctx->ring;
    if (port->peer_futex) {
        /* Through io_uring where it can, else the system call: either
         * wakes the peer's wait on the same shared futex word. */
        if (lshm__ring_futex_wake(r, lshm__msgring_wake_word(&port->tx)) == 0) {
            lshm__ring_submit(r);
            return;
        }
        if (lshm__futex_wake(lshm__msgring_wake_word(&port->tx)) == 0)
            return;
    }
    /* Queued only: whoever publishes submits the chain (send_kick). */
    lshm__port_queue_ctrl(port, LSHM_WIRE_WAKE);
}

/* What our HELLO offers: rings unless turned off, the futex where the
 * ring layer can wait on one. */
static uint32_t hello_features(const struct lshm_ctx *ctx)
{
    uint32_t f = 0;

    if (!(ctx->p.flags & LSHM_CTX_NO_RING)) {
        f |= LSHM_WIRE_FEAT_RING;
        if (lshm__ring_features(ctx->ring) & LSHM_FEAT_FUTEX)
            f |= LSHM_WIRE_FEAT_FUTEX;
    }
    return f;
}

int lshm__port_queue_ctrl(struct lshm_port *port, uint8_t type)
{
    struct smsg *m = lshm__smsg_new(port, 64);

    if (m == NULL)
        return -ENOMEM;
    if (type == LSHM_WIRE_HELLO)
        m->len = lshm__wire_encode_hello(m->data, port->ctx->pid, port->id,
                                        port->ctx->p.max_segments, hello_features(port->ctx),
                                        hello_features(port->ctx) ? port->ctx->p.ring_size : 0);
    else
        m->len = lshm__wire_encode_ctrl(m->data, type, port->ctx->pid, port->id, 0);
    lshm__port_queue(port, m);
    return 0;
}

int lshm__port_queue_mmap(struct lshm_port *port, struct lshm_seg *seg)
{
    struct smsg *m = lshm__smsg_new(port, 64);

    if (m == NULL)
        return -ENOMEM;
    m->len = lshm__wire_encode_ctrl(m->data, LSHM_WIRE_MMAP_MSG, port->ctx->pid, port->id,
                                   seg->id);
    lshm__seg_ref(seg);
    m->seg = seg;
    lshm__port_queue(port, m);
    return 0;
}

/* Received messages this small are reused, not freed: most are. */
#define RMSG_SMALL   256u
#define RMSG_CACHED  256u

struct rmsg *lshm__rmsg_new(struct lshm_port *port, size_t extra)
{
    struct lshm_ctx *ctx = port->ctx;
    struct rmsg *rm;

    if (extra <= RMSG_SMALL && ctx != NULL && ctx->rm_cache != NULL) {
        rm = ctx->rm_cache;
        ctx->rm_cache = *(void **)rm;
        ctx->rm_cached--;
        return rm;
    }
    rm = malloc(sizeof(*rm) + (extra <= RMSG_SMALL ? RMSG_SMALL : extra));
    if (rm != NULL)
        rm->small = extra <= RMSG_SMALL;
    return rm;
}

void lshm__rmsg_free(struct lshm_port *port, struct rmsg *rm)
{
    struct lshm_ctx *ctx = port->ctx;

    if (rm->small && ctx != NULL && ctx->rm_cached < RMSG_CACHED) {
        *(void **)rm = ctx->rm_cache;
        ctx->rm_cache = rm;
        ctx->rm_cached++;
        return;
    }
    free(rm);
}

void lshm__rmsg_release(struct rmsg *rm)
{
    struct lshm_port *port = rm->port;
    bool ack = false;
    unsigned i;

    for (i = 0; i < rm->ndesc; i++) {
        lshm__seg_free_chunks(rm->desc[i].seg, rm->desc[i].chunk, rm->desc[i].nchunks);
        if (lshm__seg_take_oosm(rm->desc[i].seg))
            ack = true;
        lshm__seg_unref(rm->desc[i].seg);
    }
    if (rm->pub.fd >= 0)
        close(rm->pub.fd);
    rm->pub.fd = -1;
    /* The sender ran out of chunks: tell it some came back, now. */
    if (ack && port->state == PORT_OPEN && port->ctx != NULL &&
        lshm__port_queue_ctrl(port, LSHM_WIRE_SHM_ACK) == 0)
        lshm__ctx_kick(port->ctx, port);
}

void lshm__port_drop_received(struct lshm_port *port)
{
    struct rmsg *rm;

    while ((rm = port->rq_head) != NULL) {
        port->rq_head = rm->next;
        lshm__rmsg_release(rm);
        port->held--;
        lshm__rmsg_free(port, rm);
    }
    port->rq_tail = NULL;
}

struct lshm_msg *lshm__port_pop(struct lshm_port *port)
{
    struct rmsg *rm = port->rq_head;

    if (rm == NULL)
        return NULL;
    port->rq_head = rm->next;
    if (port->rq_head == NULL)
        port->rq_tail = NULL;
    rm->next = NULL;
    return &rm->pub;
}

/*
 * Segments whose MMAP never left were never seen by the peer: take them
 * out of the pair's table, newest first, so that their ids are given
 * again and another port to that process is not kept waiting for them.
 */
static void drop_unannounced(struct lshm_port *port)
{
    struct lshm_seg **segs;
    struct smsg *m;
    unsigned n = 0;

    if (port->peer == NULL)
        return;
    for (m = port->sq_head; m != NULL; m = m->next)
        n += m->seg != NULL;
    if (n == 0 || (segs = malloc(n * sizeof(*segs))) == NULL)
        return;
    n = 0;
    for (m = port->sq_head; m != NULL; m = m->next)
        if (m->seg != NULL)
            segs[n++] = m->seg;
    while (n > 0)
        lshm__peer_out_drop(port->peer, segs[--n]);
    free(segs);
}

/*
 * Do a receiver's part for a decoded user message that nobody will read:
 * resolve its tracking slot and free the chunks of its descriptors, in
 * the peer's segments (incoming) or ours.  A segment not in the table is
 * skipped.
 */
void lshm__port_discard(struct lshm_port *port, const struct lshm_wire_view *v,
                        bool incoming)
{
    struct lshm_seg *(*get)(struct lshm_peer *, uint32_t) =
        incoming ? lshm__peer_in_get : lshm__peer_out_get;
    struct lshm_peer *peer = port->peer;
    struct lshm_seg *seg;
    unsigned i;

    if (v->has_tracking && (seg = get(peer, v->tracking.mmap_id)) != NULL) {
        lshm__tracking_resolve(seg->hdr, v->tracking.tracking_id, v->hdr.stream);
        lshm__seg_unref(seg);
    }
    for (i = 0; i < v->ndesc; i++) {
        struct lshm_wire_desc d = lshm__wire_desc_at(v, i);

        if ((seg = get(peer, d.mmap_id)) != NULL) {
            lshm__seg_free_chunks(seg, d.chunk_id,
                                 (d.size + LSHM_CHUNK_SIZE - 1) / LSHM_CHUNK_SIZE);
            lshm__seg_unref(seg);
        }
    }
}

/*
 * A message that never reached the peer leaves its chunks and tracking
 * slot to nobody: the receiver would have freed the chunks and raced the
 * canceller for the slot.  We take the receiver's part: the slot goes
 * back with the caller's lshm_tracking_cancel(), which returns false.
 * Our own bytes, so decoding is safe.
 */
void lshm__port_free_unsent(struct lshm_port *port, const struct smsg *m)
{
    struct lshm_wire_view v;

    if (port->peer == NULL || m->seg != NULL ||
        lshm__wire_decode(m->data, m->len, m->fd >= 0, &v, NULL) < 0)
        return;
    lshm__port_discard(port, &v, false);
}

static void drop_parked(struct lshm_port *port)
{
    struct parked *pk;

    while ((pk = port->pk_head) != NULL) {
        port->pk_head = pk->next;
        lshm__sock_close_fds(pk->cm.fds, pk->cm.nfds);
        free(pk);
    }
    port->pk_tail = NULL;
    port->pk_len = 0;
}

static void drop_queues(struct lshm_port *port)
{
    struct smsg *m;

    /* The backlog comes after the chain in the port's order. */
    if (port->bl_head != NULL) {
        if (port->sq_tail != NULL)
            port->sq_tail->next = port->bl_head;
        else
            port->sq_head = port->bl_head;
        port->sq_tail = port->bl_tail;
        port->bl_head = port->bl_tail = NULL;
        port->bl_len = 0;
    }
    drop_parked(port);

    for (m = port->sq_head; m != NULL; m = m->next)
        lshm__port_free_unsent(port, m);
    drop_unannounced(port);
    while ((m = port->sq_head) != NULL) {
        port->sq_head = m->next;
        lshm__smsg_free(m);
    }
    port->sq_tail = NULL;
    port->sq_len = 0;
    port->sq_fence = NULL;
    /* Messages the caller will never see: give their chunks back. */
    if (port->user_closed)
        lshm__port_drop_received(port);
}

/* ---- creation and owners ---- */

int lshm__port_new(struct lshm_ctx *ctx, int fd, struct lshm_port **out)
{
    struct lshm_port *port;
    unsigned id, i;
    int ret;

    ret = lshm__sock_check(fd);
    if (ret < 0)
        return ret;
    port = calloc(1, sizeof(*port));
    if (port == NULL)
        return lshm__fail(-ENOMEM, "out of memory");
    port->ctx = ctx;
    port->fd = fd;
    port->tx.fd = -1;
    port->rx.fd = -1;
    for (i = 0; i < PL_COUNT; i++)
        port->links[i].port = port;
    /* Ids are process-wide: sent_over names a port among all contexts. */
    do {
        id = atomic_fetch_add(&next_port_id, 1) & 0xffff;
    } while (id == LSHM_SENT_OVER_ANY);
    port->id = (uint16_t)id;
    port_enter(port, PORT_HANDSHAKE);
    port->recv_multishot = (lshm__ring_features(ctx->ring) & LSHM_FEAT_MULTISHOT_RECV) != 0;
    ret = lshm__port_queue_ctrl(port, LSHM_WIRE_HELLO);
    if (ret < 0) {
        free(port);
        return lshm__fail(ret, "out of memory");
    }
    port->next = ctx->ports;
    if (ctx->ports != NULL)
        ctx->ports->prev = port;
    ctx->ports = port;
    *out = port;
    return 0;
}

void lshm__port_set_owner(struct lshm_port *port, lshm_port_ready_fn ready, void *owner,
                          long long due)
{
    port->on_ready = ready;
    port->owner = owner;
    lshm__ctx_deadline(port->ctx, PL_HELLO, &port->links[PL_HELLO], due);
}

void lshm__port_disown(struct lshm_port *port)
{
    port->on_ready = NULL;
    port->owner = NULL;
    list_del(port, PL_HELLO);
}

/* Tell the owner, once, that the handshake ended. */
static void tell_owner(struct lshm_port *port)
{
    lshm_port_ready_fn ready = port->on_ready;
    void *owner = port->owner;

    lshm__port_disown(port);
    ready(owner, port);
}

/* ---- the ways a port's life moves on ---- */

/*
 * lshm_ctx_params.prealloc_segments: make the pair's first segments now,
 * their MMAPs queued ahead of any message, so that the message path finds
 * them ready.  Failing that is the port's failure: it was asked for.
 */
static void make_segments_ahead(struct lshm_port *port)
{
    unsigned want = port->ctx->p.prealloc_segments;
    bool scrub = (port->ctx->p.flags & LSHM_CTX_SCRUB) != 0;
    struct lshm_seg *seg;
    int ret;

    if (want > port->peer_max_segments)
        want = port->peer_max_segments;
    while ((ret = lshm__peer_out_make(port->peer, port->id, want, scrub, &seg)) > 0) {
        ret = lshm__port_queue_mmap(port, seg);
        if (ret < 0)
            lshm__peer_out_drop(port->peer, seg);
        lshm__seg_unref(seg);
        if (ret < 0)
            break;
    }
    if (ret < 0)
        lshm__port_fail(port, ret, "cannot make the %u segments asked for ahead: %s", want,
                       strerror(-ret));
}

void lshm__port_open(struct lshm_port *port)
{
    port_enter(port, PORT_OPEN);
    if (port->ctx->p.prealloc_segments > 0)
        make_segments_ahead(port);
    if (port->on_ready != NULL)
        tell_owner(port);
}

/*
 * Our BYE went out, but the peer may have sent messages before it saw it:
 * dropped unread, their chunks and tracking slots would be lost to the
 * peer for as long as the pair lives.  So we stop writing, keep reading
 * until the peer's end of file (or LSHM_DRAIN_MS), and release what comes
 * without delivering it.  Only an open port has anything to drain.
 */
bool lshm__port_bye_sent(struct lshm_port *port)
{
    port->error = -EPIPE;
    snprintf(port->reason, sizeof(port->reason), "closed by this process");
    if (port->peer != NULL && port->ctx != NULL && port->fd >= 0 &&
        shutdown(port->fd, SHUT_WR) == 0) {
        lshm__peer_hang_up(port->peer, port->fd);
        port_enter(port, PORT_DRAINING);
        return true;
    }
    port_enter(port, PORT_CLOSED);
    return false;
}

void lshm__port_fail(struct lshm_port *port, int err, const char *fmt, ...)
{
    bool notify = port_is_live(port) && !port->user_closed;
    va_list ap;

    if (port->state == PORT_DRAINING) {
        /* Closed by us already: the drain after our BYE ends here.  The
         * receive's completion (or the caller) settles the port. */
        lshm__log("port %u to pid %d: drain after BYE ended", port->id,
                 (int)port->peer_pid);
        port_enter(port, PORT_CLOSED);
        /* Nothing more is read: datagrams held for a FENCE go, fds closed. */
        drop_parked(port);
        return;
    }
    if (port->state == PORT_CLOSED)
        return;
    if (port->on_ready != NULL) {
        /* Accepted, never shown to the caller.  A client that leaves
         * without a word (a liveness probe) stays unseen; one that broke
         * the protocol is shown, closed, so the caller learns why. */
        if (err == -EPIPE || err == -ECONNRESET) {
            lshm__port_disown(port);
            port->user_closed = true;
            notify = false;
        } else {
            tell_owner(port);
        }
    }
    port_enter(port, PORT_CLOSED);
    port->error = err;
    va_start(ap, fmt);
    vsnprintf(port->reason, sizeof(port->reason), fmt, ap);
    va_end(ap);
    lshm__log("port %u to pid %d closed: %s", port->id, (int)port->peer_pid, port->reason);
    drop_queues(port);
    /* The segments it announced and the peer never mapped are taken back
     * once no send is in flight (lshm__port_settle): a send that fails
     * late frees its chunks by segment id, and a taken-back id may name a
     * new segment by then. */
    port->forget_segments = port->peer != NULL;
    /* The handler runs from lshm_ctx_run, never inside a completion. */
    port->close_pending = notify;
    if (notify)
        list_add(port, PL_READY);
    lshm__port_settle(port);
}

/* A deadline of the context's lists passed. */
void lshm__port_expire(struct lshm_port *port, enum port_list_id which)
{
    if (which == PL_ROOM) {
        /* A consumer that never acks: look at the ring again. */
        lshm__port_flush_backlog(port);
        lshm__ctx_kick(port->ctx, port);
    } else if (which == PL_FENCE)
        lshm__port_fail(port, -EPROTO, "protocol violation: no datagram for a FENCE within "
                        "%u ms", LSHM_FENCE_MS);
    else if (which == PL_HELLO)
        lshm__port_fail(port, -ETIMEDOUT, "no HELLO within %u ms of the connection",
                        port->ctx->p.handshake_ms);
    else
        lshm__port_fail(port, -ETIMEDOUT, "no end of file within %u ms of BYE",
                        LSHM_DRAIN_MS);
}

/* The context is going away: forget the ring, keep what messages hold. */
void lshm__port_reap(struct lshm_port *port)
{
    struct smsg *m;

    port->user_closed = true;
    port->ctx = NULL;
    port->recv_armed = false;
    port->futex_armed = false;
    port->inflight = 0;
    /* The ring is gone: sends it held will never complete; whether they
     * went out is unknown, so their chunks stay with the peer. */
    while ((m = port->if_head) != NULL) {
        port->if_head = m->next;
        lshm__smsg_free(m);
    }
    port->if_tail = NULL;
    if (port_is_live(port)) {
        port->error = -EPIPE;
        snprintf(port->reason, sizeof(port->reason), "context freed");
    }
    if (port->state != PORT_CLOSED)
        port_enter(port, PORT_CLOSED);
    /* What was never submitted gives back its chunks, slots and ids. */
    drop_queues(port);
    if (port->peer != NULL) {
        lshm__peer_put_sock(port->peer, port->fd);
        port->peer = NULL;
    }
    if (port->fd >= 0) {
        close(port->fd);
        port->fd = -1;
    }
    port->refs = 0;
    port_maybe_free(port);
}

/* In a forked child: these fds and this memory are copies; the ring and
 * the shared segments are the parent's (and not mapped here). */
void lshm__port_forget(struct lshm_port *port)
{
    struct smsg *m;
    struct rmsg *rm;

    while ((m = port->sq_head) != NULL) {
        port->sq_head = m->next;
        if (m->fd >= 0)
            close(m->fd);
        free(m);
    }
    while ((m = port->if_head) != NULL) {
        port->if_head = m->next;
        if (m->fd >= 0)
            close(m->fd);
        free(m);
    }
    while ((m = port->bl_head) != NULL) {
        port->bl_head = m->next;
        if (m->fd >= 0)
            close(m->fd);
        free(m);
    }
    while ((rm = port->rq_head) != NULL) {
        port->rq_head = rm->next;
        if (rm->pub.fd >= 0)
            close(rm->pub.fd);
        free(rm);
    }
    drop_parked(port);
    /* The rings are not mapped here (MADV_DONTFORK): only an fd to close. */
    if (port->tx.hdr != NULL && port->tx.fd >= 0)
        close(port->tx.fd);
    if (port->fd >= 0)
        close(port->fd);
    free(port->recv_buf);
    free(port);
}

/* ---- the context's ports ---- */

/* Is a port still sending, or reading what its peer sent before our BYE? */
bool lshm__ports_closing(const struct lshm_ctx *ctx)
{
    const struct lshm_port *port;

    for (port = ctx->ports; port != NULL; port = port->next)
        if (port->state == PORT_DRAINING ||
            (port_is_live(port) && (port->sq_head != NULL || port->inflight > 0)))
            return true;
    return false;
}

/* Before the ring goes: every peer sees its end of file. */
void lshm__ports_hang_up(struct lshm_ctx *ctx)
{
    struct lshm_port *port;

    for (port = ctx->ports; port != NULL; port = port->next)
        if (port->fd >= 0)
            shutdown(port->fd, SHUT_RDWR);
}

void lshm__ports_reap(struct lshm_ctx *ctx)
{
    struct lshm_port *port, *next;

    for (port = ctx->ports; port != NULL; port = next) {
        next = port->next;
        lshm__port_reap(port);
    }
}

void lshm__ports_forget(struct lshm_ctx *ctx)
{
    struct lshm_port *port, *next;

    for (port = ctx->ports; port != NULL; port = next) {
        next = port->next;
        lshm__port_forget(port);
    }
}

/* ---- handlers ---- */

int lshm__port_set_handler(struct lshm_port *port, lshm_msg_fn on_msg,
                           lshm_close_fn on_close, void *arg)
{
    struct lshm_msg *msg;

    port->on_msg = on_msg;
    port->on_close = on_close;
    port->arg = arg;
    /* Messages that came before the handler go to it first, in order. */
    while (on_msg != NULL && (msg = lshm__port_pop(port)) != NULL) {
        port->refs++;
        on_msg(port, msg, arg);
        port->refs--;
        if (port->user_closed)
            return 0;
    }
    /* A close not yet reported goes to the new handler in the next run. */
    if (port->close_pending)
        list_add(port, PL_READY);
    return 0;
}

/* Called by the context's run: messages to the handler, then the close. */
void lshm__port_dispatch(struct lshm_port *port)
{
    struct lshm_msg *msg;

    if (port->in_handler || port->user_closed)
        return;
    port->in_handler = true;
    port->refs++;
    while (port->on_msg != NULL && !port->user_closed && (msg = lshm__port_pop(port)) != NULL)
        port->on_msg(port, msg, port->arg);
    if (port->close_pending && !port->user_closed &&
        (port->on_msg == NULL || port->rq_head == NULL)) {
        port->close_pending = false;
        if (port->on_close != NULL)
            port->on_close(port, port->error, port->arg);
    }
    port->refs--;
    port->in_handler = false;
    port_maybe_free(port);
}

void lshm__port_set_event_handler(struct lshm_port *port, lshm_event_fn on_event, void *arg)
{
    port->on_event = on_event;
    port->event_arg = arg;
    if (on_event == NULL) {
        port->want = 0;
        list_del(port, PL_WANT);
    }
}

void lshm__port_want(struct lshm_port *port, unsigned events)
{
    if (port->on_event == NULL || port->user_closed)
        return;
    port->want |= events;
    list_add(port, PL_WANT);
}

static unsigned port_events(struct lshm_port *port, unsigned events);

void lshm__port_events(struct lshm_port *port)
{
    unsigned now;

    if (port->in_handler)
        return;
    if (port->user_closed || !port_is_live(port) || port->on_event == NULL) {
        /* Nothing will come back to a closed port: its close handler says so. */
        port->want = 0;
        list_del(port, PL_WANT);
        return;
    }
    now = port_events(port, port->want);
    if (now == 0)
        return;
    port->want &= ~now;
    if (port->want == 0)
        list_del(port, PL_WANT);
    port->in_handler = true;
    port->refs++;
    port->on_event(port, now, port->event_arg);
    port->refs--;
    port->in_handler = false;
    port_maybe_free(port);
}

/* ---- waiting ---- */

static unsigned seg_limit(const struct lshm_port *port)
{
    unsigned limit = port->ctx->p.max_segments;

    return port->peer_max_segments < limit ? port->peer_max_segments : limit;
}

static unsigned port_events(struct lshm_port *port, unsigned events)
{
    unsigned now = 0;

    /* The handshake stays done once done, even after the port closed. */
    if ((events & LSHM_WAIT_READY) && port->peer_pid != 0)
        now |= LSHM_WAIT_READY;
    if ((events & LSHM_WAIT_SEND) && port_is_live(port) &&
        port->sq_len + port->inflight + port->bl_len < port->ctx->p.send_queue)
        now |= LSHM_WAIT_SEND;
    if ((events & LSHM_WAIT_SHM) && port->state == PORT_OPEN &&
        (port->shm_acked || lshm__peer_out_has_room(port->peer, port->id, seg_limit(port)))) {
        port->shm_acked = false;
        now |= LSHM_WAIT_SHM;
    }
    if ((events & LSHM_WAIT_RECV) && port->rq_head != NULL)
        now |= LSHM_WAIT_RECV;
    if ((events & LSHM_WAIT_IDLE) && port->sq_head == NULL && port->inflight == 0 &&
        port->bl_head == NULL && !port->tx_dirty)
        now |= LSHM_WAIT_IDLE;
    return now;
}

int lshm__port_wait(struct lshm_port *port, unsigned events, int timeout_ms)
{
    long long end = timeout_ms >= 0 ? lshm__now_ms() + timeout_ms : 0;
    bool polled = false;
    unsigned now;
    int ret;

    if (port->ctx == NULL)
        return lshm__fail(-EPIPE, "the port's context is gone");
    for (;;) {
        int step;

        now = port_events(port, events);
        if (now != 0)
            return (int)now;
        if (!port_is_live(port))
            return lshm__fail(port->error ? port->error : -EPIPE, "%s", port->reason);
        if (timeout_ms >= 0) {
            long long left = end - lshm__now_ms();

            /* Timeout 0 still polls once: completions waiting in the
             * ring (a message that has arrived) are dispatched. */
            if (left <= 0 && polled)
                return lshm__fail(-ETIMEDOUT, "timed out");
            step = left <= 0 ? 0 : left > INT32_MAX ? INT32_MAX : (int)left;
        } else {
            step = -1;
        }
        /* A sender waiting for chunks rechecks the free maps on a short
         * timer: a peer that stops reading never sends the ACK. */
        if ((events & LSHM_WAIT_SHM) && (step < 0 || step > LSHM_RECHECK_MS))
            step = LSHM_RECHECK_MS;
        polled = true;
        ret = lshm__ctx_run(port->ctx, step);
        if (ret < 0)
            return ret;
    }
}

int lshm__port_peer(const struct lshm_port *port, pid_t *pid, uid_t *uid, gid_t *gid)
{
    if (port->peer_pid == 0)
        return lshm__fail(-ENOTCONN, "handshake not complete");
    if (pid != NULL)
        *pid = port->peer_pid;
    if (uid != NULL)
        *uid = port->peer_uid;
    if (gid != NULL)
        *gid = port->peer_gid;
    return 0;
}

const char *lshm__port_error(const struct lshm_port *port)
{
    return port_is_live(port) ? NULL : port->reason;
}

/* ---- shared memory ---- */

static int port_ready_for_shm(struct lshm_port *port)
{
    if (!port_is_live(port))
        return lshm__fail(port->error ? port->error : -EPIPE, "port is closed: %s", port->reason);
    if (port->state != PORT_OPEN || port->ctx == NULL)
        return lshm__fail(-ENOTCONN, "handshake not complete");
    return 0;
}

static int port_alloc(struct lshm_port *port, bool tracking, struct lshm_alloc *a)
{
    int ret;

    ret = lshm__peer_out_alloc(port->peer, port->id, seg_limit(port), tracking,
                              (port->ctx->p.flags & LSHM_CTX_SCRUB) != 0, a);
    if (ret == -EAGAIN) {
        /* The peer layer said why (limit, or a segment not mapped yet). */
        lshm__port_want(port, LSHM_WAIT_SHM);
        return ret;
    }
    if (ret < 0)
        return ret;     /* the peer layer said why (a limit) */
    if (a->created) {
        /* The segment's MMAP goes ahead of every message that uses it. */
        ret = lshm__port_queue_mmap(port, a->seg);
        if (ret < 0) {
            lshm__peer_out_drop(port->peer, a->seg);
            return lshm__fail(ret, "out of memory");
        }
    }
    return 0;
}

int lshm__port_buf_alloc(struct lshm_port *port, size_t size, struct lshm_buf **buf)
{
    struct lshm_alloc a;
    int ret;

    ret = port_ready_for_shm(port);
    if (ret < 0)
        return ret;
    if (size == 0 || size > LSHM_DATA_SIZE)
        return lshm__fail(-EINVAL, "%zu bytes: a buffer holds 1 to %u", size, LSHM_DATA_SIZE);
    ret = port_alloc(port, false, &a);
    if (ret < 0)
        return ret;
    ret = lshm__buf_from_alloc(&a, port->peer, size, buf);
    if (ret < 0)
        return lshm__fail(ret, "out of memory");
    (*buf)->port_id = port->id;
    return 0;
}

int lshm__port_tracking_new(struct lshm_port *port, uint32_t stream,
                            struct lshm_tracking **out)
{
    struct lshm_tracking *t;
    struct lshm_alloc a;
    int ret;

    ret = port_ready_for_shm(port);
    if (ret < 0)
        return ret;
    t = calloc(1, sizeof(*t));
    if (t == NULL)
        return lshm__fail(-ENOMEM, "out of memory");
    ret = port_alloc(port, true, &a);
    if (ret < 0) {
        free(t);
        return ret;
    }
    t->port = port;
    t->seg = a.seg;
    t->slot = a.chunk;
    t->stream = stream;
    lshm__tracking_set(a.seg->hdr, a.chunk, stream);
    *out = t;
    return 0;
}

bool lshm__tracking_cancel(struct lshm_tracking *t)
{
    bool cancelled;

    /* Unit's race: whoever swaps the stream id to 0 wins; the loser gives
     * the slot back.  A tracking never sent has no other party. */
    cancelled = lshm__tracking_resolve(t->seg->hdr, t->slot, t->stream);
    if (cancelled && !t->sent)
        lshm__chunk_set_free(t->seg->hdr->free_tracking_map, t->slot);
    lshm__seg_unref(t->seg);
    free(t);
    return cancelled;
}
