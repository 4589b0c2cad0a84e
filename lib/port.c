/*
 * A port: one SOCK_SEQPACKET socket to a peer process.  The handshake, the
 * ordered send queue, the receive path with every check the protocol asks
 * of a receiver, and the close that gives back what the port held.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "port.h"

#define CHAIN_MAX   1024u   /* sends linked into one submit */

struct smsg {
    struct lshm_op     op;
    struct lshm_port  *port;
    struct smsg       *next;
    struct msghdr      mh;
    struct iovec       iov;
    union {
        uint64_t       align;   /* cmsghdr alignment */
        char           buf[CMSG_SPACE(sizeof(int))];
    }                  cmsg;
    int                fd;      /* passed with the message, closed after */
    struct lshm_seg   *seg;     /* MMAP: its fd goes out, then is closed */
    size_t             len;
    uint8_t            data[];
};

struct rdesc {
    struct lshm_seg *seg;       /* referenced */
    uint32_t         chunk;
    uint32_t         nchunks;
};

struct rmsg {
    struct lshm_msg    pub;
    struct rmsg       *next;
    struct lshm_port  *port;
    unsigned           ndesc;
    struct rdesc      *desc;
    struct lshm_iov   *iov;
    struct lshm_iov    iov1;
    uint8_t            data[];
};

static _Atomic unsigned next_port_id;

static void recv_arm(struct lshm_port *port);
static int queue_ctrl(struct lshm_port *port, uint8_t type, uint32_t mmap_id);
static void port_finish(struct lshm_port *port);

/* ---- lifetime ---- */

static bool port_idle(const struct lshm_port *port)
{
    return port->inflight == 0 && !port->recv_armed;
}

/* Does the port still read: open, or closed by us and draining? */
static bool port_reading(const struct lshm_port *port)
{
    return !port->shutdown && (port->state != PORT_CLOSED || port->draining);
}

/* ---- the context's lists (port.h) ---- */

void lshm__port_list_add(struct lshm_port *port, enum port_list_id which)
{
    struct port_list *l;
    struct port_link *k = &port->links[which];

    if (k->on || port->ctx == NULL)
        return;
    l = &port->ctx->lists[which];
    k->on = true;
    k->next = NULL;
    k->prev = l->tail;
    if (l->tail != NULL)
        l->tail->links[which].next = port;
    else
        l->head = port;
    l->tail = port;
    l->len++;
}

static void list_del(struct lshm_port *port, enum port_list_id which)
{
    struct port_list *l = &port->ctx->lists[which];
    struct port_link *k = &port->links[which];

    if (!k->on)
        return;
    if (k->prev != NULL)
        k->prev->links[which].next = k->next;
    else
        l->head = k->next;
    if (k->next != NULL)
        k->next->links[which].prev = k->prev;
    else
        l->tail = k->prev;
    k->on = false;
    l->len--;
}

struct lshm_port *lshm__port_list_pop(struct lshm_ctx *ctx, enum port_list_id which)
{
    struct lshm_port *port = ctx->lists[which].head;

    if (port != NULL)
        list_del(port, which);
    return port;
}

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
        lshm__port_list_add(port, PL_ZOMBIE);
        return;
    }
    port_free(port);
}

/* Off the zombie list, with nothing walking: free it if still unreachable. */
void lshm__port_sweep(struct lshm_port *port)
{
    port_maybe_free(port);
}

static void smsg_free(struct smsg *m)
{
    if (m->fd >= 0)
        close(m->fd);
    if (m->seg != NULL) {
        lshm__seg_close_fd(m->seg);
        lshm__seg_unref(m->seg);
    }
    free(m);
}

static struct smsg *smsg_new(struct lshm_port *port, size_t len)
{
    struct smsg *m = malloc(sizeof(*m) + len);

    if (m == NULL)
        return NULL;
    m->port = port;
    m->next = NULL;
    m->fd = -1;
    m->seg = NULL;
    m->len = len;
    return m;
}

static void smsg_queue(struct lshm_port *port, struct smsg *m)
{
    if (port->sq_tail != NULL)
        port->sq_tail->next = m;
    else
        port->sq_head = m;
    port->sq_tail = m;
    port->sq_len++;
    /* Whoever queued may not kick (LSHM_MORE): the next run will. */
    if (port->inflight == 0)
        lshm__port_list_add(port, PL_KICK);
}

static void rmsg_release(struct rmsg *rm)
{
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
    if (ack && rm->port->state == PORT_OPEN && rm->port->ctx != NULL) {
        struct smsg *m = smsg_new(rm->port, sizeof(struct lshm_wire_msg));

        if (m != NULL) {
            m->len = lshm__wire_encode_ctrl(m->data, LSHM_WIRE_SHM_ACK, rm->port->ctx->pid,
                                           rm->port->id, 0);
            smsg_queue(rm->port, m);
            lshm__port_kick(rm->port);
            lshm__ring_submit(rm->port->ctx->ring);
        }
    }
}

/* ---- closing ---- */

static void drop_received(struct lshm_port *port)
{
    struct rmsg *rm;

    while ((rm = port->rq_head) != NULL) {
        port->rq_head = rm->next;
        rmsg_release(rm);
        port->held--;
        free(rm);
    }
    port->rq_tail = NULL;
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
static void discard_view(struct lshm_peer *peer, const struct lshm_wire_view *v, bool incoming)
{
    struct lshm_seg *(*get)(struct lshm_peer *, uint32_t) =
        incoming ? lshm__peer_in_get : lshm__peer_out_get;
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
static void free_unsent_chunks(struct lshm_port *port, const struct smsg *m)
{
    struct lshm_wire_view v;

    if (port->peer == NULL || m->seg != NULL ||
        lshm__wire_decode(m->data, m->len, m->fd >= 0, &v, NULL) < 0)
        return;
    discard_view(port->peer, &v, false);
}

static void drop_queues(struct lshm_port *port)
{
    struct smsg *m;

    for (m = port->sq_head; m != NULL; m = m->next)
        free_unsent_chunks(port, m);
    drop_unannounced(port);
    while ((m = port->sq_head) != NULL) {
        port->sq_head = m->next;
        smsg_free(m);
    }
    port->sq_tail = NULL;
    port->sq_len = 0;
    /* Messages the caller will never see: give their chunks back. */
    if (port->user_closed)
        drop_received(port);
}

/* lshm_port_close(): what is queued still goes out, then BYE. */
void lshm__port_release(struct lshm_port *port)
{
    port->user_closed = true;
    port->on_msg = NULL;
    port->on_close = NULL;
    drop_received(port);
    if (port->state != PORT_CLOSED && port->ctx != NULL) {
        if (queue_ctrl(port, LSHM_WIRE_BYE, 0) < 0)
            lshm__port_fail(port, -ENOMEM, "out of memory closing");
        lshm__port_kick(port);
        if (port->ctx != NULL)
            lshm__ring_submit(port->ctx->ring);
    }
    port_finish(port);
}

/* Stop the socket: pending operations complete, then it is closed. */
static void port_shutdown(struct lshm_port *port)
{
    if (port->shutdown || port->fd < 0)
        return;
    port->shutdown = true;
    shutdown(port->fd, SHUT_RDWR);
    if (port->recv_armed && port->ctx != NULL)
        lshm__ring_cancel(port->ctx->ring, &port->recv_op);
}

static void port_finish(struct lshm_port *port)
{
    /* The peer's segments go once its last port is gone and no message
     * or buffer holds them (those keep their own references); sends in
     * flight may still need the table to give their chunks back. */
    if (port->state == PORT_CLOSED && !port->draining && port->inflight == 0 &&
        port->peer != NULL) {
        lshm__peer_put_sock(port->peer, port->fd);
        port->peer = NULL;
    }
    if (port->state == PORT_CLOSED && port->shutdown && port_idle(port) && port->fd >= 0) {
        lshm__ring_close(port->ctx != NULL ? port->ctx->ring : NULL, port->fd);
        port->fd = -1;
    }
    port_maybe_free(port);
}

void lshm__port_fail(struct lshm_port *port, int err, const char *fmt, ...)
{
    bool notify = port->state != PORT_CLOSED && !port->user_closed;
    va_list ap;

    if (port->state == PORT_CLOSED) {
        /* Closed by us already: the drain after our BYE ends here.  The
         * receive's completion (or the caller) finishes the port. */
        if (port->draining) {
            lshm__log("port %u to pid %d: drain after BYE ended", port->id,
                     (int)port->peer_pid);
            port->draining = false;
            port_shutdown(port);
        }
        return;
    }
    if (port->listener != NULL) {
        struct lshm_listener *l = port->listener;

        /* Accepted, never shown to the caller.  A client that leaves
         * without a word (a liveness probe) stays unseen; one that broke
         * the protocol is shown, closed, so the caller learns why. */
        port->listener = NULL;
        if (err == -EPIPE || err == -ECONNRESET) {
            port->user_closed = true;
            notify = false;
        } else {
            lshm__listener_ready(l, port);
        }
    }
    port->state = PORT_CLOSED;
    port->error = err;
    va_start(ap, fmt);
    vsnprintf(port->reason, sizeof(port->reason), fmt, ap);
    va_end(ap);
    lshm__log("port %u to pid %d closed: %s", port->id, (int)port->peer_pid, port->reason);
    drop_queues(port);
    port_shutdown(port);
    if (port->peer != NULL)
        lshm__peer_out_forget_port(port->peer, port->id);
    /* The handler runs from lshm_ctx_run, never inside a completion. */
    port->close_pending = notify;
    if (notify)
        lshm__port_list_add(port, PL_READY);
    port_finish(port);
}

/* ---- sending ---- */

static void send_done(struct lshm_op *op, int res, bool more, void *buf, unsigned len)
{
    struct smsg *m = (struct smsg *)op;
    struct lshm_port *port = m->port;

    port->inflight--;
    if (port->ctx != NULL)
        lshm__ring_sends(port->ctx->ring, -1);
    /* Completions of a linked chain come in order: m is the oldest. */
    port->if_head = m->next;
    if (port->if_head == NULL)
        port->if_tail = NULL;
    if (res < 0)
        free_unsent_chunks(port, m);
    smsg_free(m);
    if (res < 0) {
        lshm__port_fail(port, res == -ECANCELED ? -EPIPE : res,
                       "send failed: %s", strerror(res == -ECANCELED ? EPIPE : -res));
    } else if (port->ctx != NULL) {
        port->ctx->msgs_sent++;
    }
    if (port->inflight == 0)
        lshm__port_kick(port);
    port_finish(port);
}

static void fill_msghdr(struct smsg *m)
{
    memset(&m->mh, 0, sizeof(m->mh));
    m->iov.iov_base = m->data;
    m->iov.iov_len = m->len;
    m->mh.msg_iov = &m->iov;
    m->mh.msg_iovlen = 1;
    m->op.complete = send_done;
    if (m->fd >= 0 || m->seg != NULL) {
        struct cmsghdr *c = (struct cmsghdr *)m->cmsg.buf;
        int fd = m->seg != NULL ? m->seg->fd : m->fd;

        memset(&m->cmsg, 0, sizeof(m->cmsg));
        m->mh.msg_control = m->cmsg.buf;
        m->mh.msg_controllen = CMSG_SPACE(sizeof(int));
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
}

/*
 * Our BYE went out, but the peer may have sent messages before it saw it:
 * dropped unread, their chunks and tracking slots would be lost to the
 * peer for as long as the pair lives.  So we stop writing, keep reading
 * until the peer's end of file (or LSHM_DRAIN_MS), and release what comes
 * without delivering it.  Only an open port has anything to drain.
 */
static bool port_drain(struct lshm_port *port)
{
    if (port->peer == NULL || port->ctx == NULL || port->shutdown || port->fd < 0 ||
        shutdown(port->fd, SHUT_WR) < 0)
        return false;
    lshm__peer_hang_up(port->peer, port->fd);
    port->draining = true;
    port->due = lshm__now_ms() + LSHM_DRAIN_MS;
    port->recv_stopped = false;
    recv_arm(port);
    if (port->draining)     /* else no receive could be armed: shut down already */
        lshm__ctx_due(port->ctx, &port->ctx->drain_timer, port->due);
    return true;
}

/*
 * Submit the queue as one linked chain when nothing is in flight.  A link
 * keeps the sends in order even when the socket is full (unlinked sends
 * can complete out of order then), and a chain must fit in the SQ to stay
 * one chain: it ends at the submit boundary.
 */
void lshm__port_kick(struct lshm_port *port)
{
    struct lshm_ring *r;
    unsigned n, i;

    if (port->ctx == NULL || port->inflight > 0 || port->sq_head == NULL ||
        port->state == PORT_CLOSED)
        goto done;
    r = port->ctx->ring;
    n = lshm__ring_space(r);
    if (n < port->sq_len) {
        lshm__ring_submit(r);
        n = lshm__ring_space(r);
    }
    if (n > port->sq_len)
        n = port->sq_len;
    if (n > CHAIN_MAX)
        n = CHAIN_MAX;
    for (i = 0; i < n; i++) {
        struct smsg *m = port->sq_head;

        fill_msghdr(m);
        if (lshm__ring_sendmsg(r, port->fd, &m->mh, &m->op, i + 1 < n) < 0)
            break;
        port->sq_head = m->next;
        m->next = NULL;
        port->sq_len--;
        port->inflight++;
        lshm__ring_sends(r, 1);
        if (port->if_tail != NULL)
            port->if_tail->next = m;
        else
            port->if_head = m;
        port->if_tail = m;
    }
    if (port->sq_head == NULL)
        port->sq_tail = NULL;
done:
    /* No room in the ring for any of it: the next run tries again. */
    if (port->sq_head != NULL && port->inflight == 0 && port->state != PORT_CLOSED)
        lshm__port_list_add(port, PL_KICK);
    /* A closing port says BYE after the last queued message. */
    if (port->user_closed && port->state != PORT_CLOSED && port->inflight == 0 &&
        port->sq_head == NULL) {
        port->state = PORT_CLOSED;
        port->error = -EPIPE;
        snprintf(port->reason, sizeof(port->reason), "closed by this process");
        if (!port_drain(port))
            port_shutdown(port);
    }
}

static int queue_ctrl(struct lshm_port *port, uint8_t type, uint32_t mmap_id)
{
    struct smsg *m = smsg_new(port, 64);

    if (m == NULL)
        return -ENOMEM;
    if (type == LSHM_WIRE_HELLO)
        m->len = lshm__wire_encode_hello(m->data, port->ctx->pid, port->id,
                                        port->ctx->p.max_segments);
    else
        m->len = lshm__wire_encode_ctrl(m->data, type, port->ctx->pid, port->id, mmap_id);
    smsg_queue(port, m);
    return 0;
}

int lshm__port_queue_mmap(struct lshm_port *port, struct lshm_seg *seg)
{
    struct smsg *m = smsg_new(port, 64);

    if (m == NULL)
        return -ENOMEM;
    m->len = lshm__wire_encode_ctrl(m->data, LSHM_WIRE_MMAP_MSG, port->ctx->pid, port->id, seg->id);
    lshm__seg_ref(seg);
    m->seg = seg;
    smsg_queue(port, m);
    return 0;
}

static unsigned out_queued(const struct lshm_port *port)
{
    return port->sq_len + port->inflight;
}

static int send_check(struct lshm_port *port, const struct lshm_out *out, uint64_t *total)
{
    unsigned i;

    *total = 0;
    if (out->type < LSHM_TYPE_USER_MIN)
        return lshm__fail(-EINVAL, "message type %u is reserved for control (use >= 16)",
                         out->type);
    if (port->state == PORT_CLOSED || port->user_closed)
        return lshm__fail(port->error ? port->error : -EPIPE, "port is closed: %s",
                         port->reason);
    if (out->nbufs > 0 && (out->data != NULL || out->size > 0))
        return lshm__fail(-EINVAL, "a message is either inline or in buffers, not both");
    if (out->nbufs > LSHM_MAX_DESCS)
        return lshm__fail(-EINVAL, "%u buffers, at most %u", out->nbufs, LSHM_MAX_DESCS);
    if (out->nbufs > 0 && out->bufs == NULL)
        return lshm__fail(-EINVAL, "nbufs without bufs");
    if (out->size > LSHM_INLINE_MAX)
        return lshm__fail(-EMSGSIZE, "inline payload of %zu bytes, at most %u",
                         out->size, LSHM_INLINE_MAX);
    if (out->size > 0 && out->data == NULL)
        return lshm__fail(-EINVAL, "size without data");
    if (out->tracking != NULL && (out->tracking->port != port || out->tracking->sent))
        return lshm__fail(-EINVAL, "tracking belongs to another port or was sent");
    *total = out->size;
    for (i = 0; i < out->nbufs; i++) {
        struct lshm_buf *b = out->bufs[i];

        if (b == NULL || b->sent || b->size == 0)
            return lshm__fail(-EINVAL, "buffer %u is NULL, sent, or empty", i);
        if (b->peer != port->peer || b->port_id != port->id)
            return lshm__fail(-EXDEV, "buffer %u was allocated for another port", i);
        *total += b->size;
    }
    if (*total > UINT32_MAX)
        return lshm__fail(-EMSGSIZE, "message of %llu bytes, at most 4 GiB - 1",
                         (unsigned long long)*total);
    if (out_queued(port) >= port->ctx->p.send_queue)
        return lshm__fail(-EAGAIN, "send queue full (%u messages)", port->ctx->p.send_queue);
    return 0;
}

int lshm__port_send(struct lshm_port *port, const struct lshm_out *out, unsigned flags)
{
    struct lshm_wire_desc descs[LSHM_MAX_DESCS];
    struct lshm_wire_tracking tr, *trp = NULL;
    struct lshm_wire_msg hdr;
    struct smsg *m;
    uint64_t total;
    size_t len;
    unsigned i;
    int ret;

    ret = send_check(port, out, &total);
    if (ret < 0)
        return ret;
    memset(&hdr, 0, sizeof(hdr));
    hdr.stream = out->stream;
    hdr.pid = port->ctx->pid;   /* getpid() is a system call */
    hdr.port_id = port->id;
    hdr.type = out->type;
    hdr.flags = out->last ? LSHM_WIRE_LAST : 0;
    hdr.size = (uint32_t)total;
    len = sizeof(hdr);
    if (out->tracking != NULL) {
        hdr.flags |= LSHM_WIRE_TRACKING;
        tr.mmap_id = out->tracking->seg->id;
        tr.tracking_id = out->tracking->slot;
        trp = &tr;
        len += sizeof(tr);
    }
    if (out->nbufs > 0) {
        hdr.flags |= LSHM_WIRE_MMAP;
        for (i = 0; i < out->nbufs; i++) {
            descs[i].mmap_id = out->bufs[i]->seg->id;
            descs[i].chunk_id = out->bufs[i]->chunk;
            descs[i].size = (uint32_t)out->bufs[i]->size;
        }
        len += out->nbufs * sizeof(descs[0]);
    } else {
        len += out->size;
    }
    m = smsg_new(port, len);
    if (m == NULL)
        return lshm__fail(-ENOMEM, "out of memory");
    m->len = lshm__wire_encode_user(m->data, &hdr, trp, out->nbufs ? descs : NULL,
                                   out->nbufs, out->data);
    m->fd = out->fd;
    smsg_queue(port, m);
    /* The receiver frees the chunks it was sent; the rest come back now. */
    for (i = 0; i < out->nbufs; i++)
        lshm__buf_release_sent(out->bufs[i]);
    if (out->tracking != NULL)
        out->tracking->sent = true;
    if (!(flags & LSHM_MORE)) {
        lshm__port_kick(port);
        lshm__ctx_pump(port->ctx);
    }
    return 0;
}

/* ---- receiving ---- */

static void deliver(struct lshm_port *port, struct rmsg *rm)
{
    if (port->user_closed) {
        /* Nobody is left to read it. */
        rmsg_release(rm);
        free(rm);
        return;
    }
    if (port->ctx != NULL)
        port->ctx->msgs_received++;
    port->held++;
    if (port->rq_tail != NULL)
        port->rq_tail->next = rm;
    else
        port->rq_head = rm;
    port->rq_tail = rm;
    if (port->on_msg != NULL)
        lshm__port_list_add(port, PL_READY);
}

/* Called by lshm_ctx_run: messages to the handler, then the close. */
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

void lshm__port_msg_done(struct lshm_msg *msg)
{
    struct rmsg *rm = msg->priv;
    struct lshm_port *port = rm->port;

    /* The caller got the fd with the message: it is theirs to close
     * (lshm_recv(3)); only undelivered messages close theirs. */
    rm->pub.fd = -1;
    rmsg_release(rm);
    free(rm);
    port->held--;
    /* Reading stopped at the bound: resume once half the room is back. */
    if (port->recv_stopped && port->ctx != NULL && port->held <= port->ctx->p.recv_queue / 2) {
        port->recv_stopped = false;
        recv_arm(port);
    }
    port_maybe_free(port);
}

static void close_fds(const int *fds, unsigned n)
{
    unsigned i;

    for (i = 0; i < n; i++)
        close(fds[i]);
}

static int on_hello(struct lshm_port *port, const struct lshm_wire_view *v,
                    const struct ucred *cred)
{
    const char *why = "";
    int ret;

    ret = lshm__wire_check_hello(&v->hello, &why);
    if (ret < 0) {
        lshm__port_fail(port, ret, "handshake refused: %s", why);
        return ret;
    }
    if (cred == NULL) {
        lshm__port_fail(port, -EPROTO, "handshake refused: HELLO came without credentials "
                                      "(the peer must set SO_PASSCRED)");
        return -EPROTO;
    }
    if (v->hdr.port_id != v->hello.port_id) {
        lshm__port_fail(port, -EPROTO, "handshake refused: HELLO header port %u, payload "
                       "port %u", v->hdr.port_id, v->hello.port_id);
        return -EPROTO;
    }
    if (cred->pid != v->hdr.pid) {
        lshm__port_fail(port, -EPROTO, "handshake refused: HELLO says pid %d but the kernel "
                       "says %d; both processes must share a PID namespace",
                       (int)v->hdr.pid, (int)cred->pid);
        return -EPROTO;
    }
    ret = lshm__peer_get_sock(cred->pid, port->fd, &port->peer);
    if (ret < 0) {
        lshm__port_fail(port, ret, "out of memory for peer %d", (int)cred->pid);
        return ret;
    }
    port->peer_pid = cred->pid;
    port->peer_uid = cred->uid;
    port->peer_gid = cred->gid;
    port->peer_port_id = v->hello.port_id;
    port->peer_max_segments = v->hello.max_segments;
    port->state = PORT_OPEN;
    if (port->listener != NULL) {
        lshm__listener_ready(port->listener, port);
        port->listener = NULL;
    }
    return 0;
}

static int on_mmap(struct lshm_port *port, const struct lshm_wire_view *v, int fd)
{
    struct lshm_seg *seg;
    uint32_t next = lshm__peer_in_next(port->peer);
    int ret;

    if (v->mmap_id != next) {
        lshm__port_fail(port, -EPROTO, "protocol violation: MMAP id %u, expected %u",
                       v->mmap_id, next);
        return -EPROTO;
    }
    if (v->mmap_id >= port->ctx->p.max_segments) {
        lshm__port_fail(port, -EPROTO, "protocol violation: MMAP id %u past our limit of %u "
                       "segments", v->mmap_id, port->ctx->p.max_segments);
        return -EPROTO;
    }
    ret = lshm__seg_import(fd, v->mmap_id, port->peer_pid, port->ctx->pid, &seg);
    if (ret < 0) {
        lshm__port_fail(port, -EPROTO, "protocol violation: segment %u refused: %s",
                       v->mmap_id, lshm__seg_strerror(ret));
        return -EPROTO;
    }
    ret = lshm__peer_in_add(port->peer, seg, port->ctx->p.max_segments);
    lshm__seg_unref(seg);
    if (ret < 0) {
        lshm__port_fail(port, -EPROTO, "protocol violation: segment %u out of order", v->mmap_id);
        return -EPROTO;
    }
    return 0;
}

/* Resolve the tracking slot: true if the sender cancelled first. */
static int read_tracking(struct lshm_port *port, const struct lshm_wire_view *v, bool *cancelled)
{
    struct lshm_seg *seg = lshm__peer_in_get(port->peer, v->tracking.mmap_id);
    uint32_t stream = v->hdr.stream;
    uint32_t slot = v->tracking.tracking_id;

    /* 0 is what a cancel leaves in the slot: a stream 0 could never tell
     * a cancelled message from a live one. */
    if (stream == 0) {
        lshm__seg_unref(seg);
        lshm__port_fail(port, -EPROTO, "protocol violation: tracked message with stream 0");
        return -EPROTO;
    }
    if (seg == NULL || slot >= LSHM_CHUNK_COUNT) {
        lshm__seg_unref(seg);
        lshm__port_fail(port, -EPROTO, "protocol violation: tracking %u/%u does not exist",
                       v->tracking.mmap_id, slot);
        return -EPROTO;
    }
    /* The race of Unit's tracking: whoever swaps the stream id out wins,
     * the loser gives the slot back. */
    *cancelled = !lshm__tracking_resolve(seg->hdr, slot, stream);
    lshm__seg_unref(seg);
    return 0;
}

static int on_user(struct lshm_port *port, const struct lshm_wire_view *v, int fd)
{
    bool cancelled = false;
    struct rmsg *rm;
    size_t extra;
    unsigned i;

    if (v->has_tracking && read_tracking(port, v, &cancelled) < 0)
        return -EPROTO;
    extra = v->ndesc ? v->ndesc * (sizeof(struct rdesc) + sizeof(struct lshm_iov))
                     : v->hdr.size;
    rm = malloc(sizeof(*rm) + extra);
    if (rm == NULL) {
        lshm__port_fail(port, -ENOMEM, "out of memory receiving a message");
        return -ENOMEM;
    }
    memset(&rm->pub, 0, sizeof(rm->pub));
    rm->next = NULL;
    rm->port = port;
    rm->ndesc = 0;
    rm->pub.port = port;
    rm->pub.stream = v->hdr.stream;
    rm->pub.type = v->hdr.type;
    rm->pub.size = v->hdr.size;
    rm->pub.fd = fd;
    rm->pub.priv = rm;
    if (v->hdr.flags & LSHM_WIRE_LAST)
        rm->pub.flags |= LSHM_MSG_LAST;
    if (cancelled)
        rm->pub.flags |= LSHM_MSG_CANCELLED;
    if (v->ndesc > 0) {
        rm->desc = (struct rdesc *)rm->data;
        rm->iov = (struct lshm_iov *)(rm->desc + v->ndesc);
        rm->pub.flags |= LSHM_MSG_SHM;
        for (i = 0; i < v->ndesc; i++) {
            struct lshm_wire_desc d = lshm__wire_desc_at(v, i);
            struct lshm_seg *seg = lshm__peer_in_get(port->peer, d.mmap_id);

            if (seg == NULL) {
                rmsg_release(rm);
                free(rm);
                lshm__port_fail(port, -EPROTO, "protocol violation: descriptor names "
                               "segment %u, which was never sent", d.mmap_id);
                return -EPROTO;
            }
            /* The wire layer bounded chunk_id and size to the data area. */
            rm->desc[i].seg = seg;
            rm->desc[i].chunk = d.chunk_id;
            rm->desc[i].nchunks = (d.size + LSHM_CHUNK_SIZE - 1) / LSHM_CHUNK_SIZE;
            rm->ndesc++;
            rm->iov[i].base = seg->data + (size_t)d.chunk_id * LSHM_CHUNK_SIZE;
            rm->iov[i].len = d.size;
        }
        rm->pub.niov = v->ndesc;
        rm->pub.iov = rm->iov;
    } else if (v->hdr.size > 0) {
        memcpy(rm->data, v->payload, v->hdr.size);
        rm->iov1.base = rm->data;
        rm->iov1.len = v->hdr.size;
        rm->pub.niov = 1;
        rm->pub.iov = &rm->iov1;
    }
    if (cancelled && port->ctx != NULL && (port->ctx->p.flags & LSHM_CTX_DROP_CANCELLED)) {
        rmsg_release(rm);
        free(rm);
        return 0;
    }
    deliver(port, rm);
    return 0;
}

/* One datagram: check everything before anything is used. */
static void on_datagram(struct lshm_port *port, const void *data, size_t len,
                        const struct msghdr *mh)
{
    int fds[8];
    unsigned nfds = 0;
    const struct ucred *cred = NULL;
    struct ucred cred_copy;
    struct lshm_wire_view v;
    struct cmsghdr *c;
    const char *why = "";
    int ret;

    for (c = mh->msg_controllen ? CMSG_FIRSTHDR((struct msghdr *)mh) : NULL; c != NULL;
         c = CMSG_NXTHDR((struct msghdr *)mh, c)) {
        if (c->cmsg_level != SOL_SOCKET)
            continue;
        if (c->cmsg_type == SCM_RIGHTS) {
            size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            size_t i;

            for (i = 0; i < n; i++) {
                int fd;

                memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                if (nfds < ARRAY_SIZE(fds))
                    fds[nfds++] = fd;
                else
                    close(fd);
            }
        } else if (c->cmsg_type == SCM_CREDENTIALS &&
                   c->cmsg_len >= CMSG_LEN(sizeof(struct ucred))) {
            memcpy(&cred_copy, CMSG_DATA(c), sizeof(cred_copy));
            cred = &cred_copy;
        }
    }
    if (!port_reading(port)) {
        close_fds(fds, nfds);
        return;
    }
    if (mh->msg_flags & MSG_CTRUNC) {
        close_fds(fds, nfds);
        lshm__port_fail(port, -EPROTO, "protocol violation: control data truncated "
                       "(too many fds)");
        return;
    }
    if (mh->msg_flags & MSG_TRUNC) {
        close_fds(fds, nfds);
        lshm__port_fail(port, -EPROTO, "protocol violation: datagram longer than %u bytes",
                       LSHM_WIRE_MAX);
        return;
    }
    ret = lshm__wire_decode(data, len, nfds, &v, &why);
    if (ret < 0) {
        close_fds(fds, nfds);
        lshm__port_fail(port, -EPROTO, "protocol violation: %s", why);
        return;
    }
    if (port->state == PORT_HANDSHAKE) {
        close_fds(fds, nfds);
        if (v.hdr.type != LSHM_WIRE_HELLO)
            lshm__port_fail(port, -EPROTO, "protocol violation: first message is type %u, "
                           "not HELLO", v.hdr.type);
        else
            on_hello(port, &v, cred);
        return;
    }
    if (v.hdr.pid != port->peer_pid || (cred != NULL && cred->pid != port->peer_pid) ||
        v.hdr.port_id != port->peer_port_id) {
        close_fds(fds, nfds);
        lshm__port_fail(port, -EPROTO, "protocol violation: header pid %d / port %u, "
                       "handshake said pid %d / port %u", (int)v.hdr.pid, v.hdr.port_id,
                       (int)port->peer_pid, port->peer_port_id);
        return;
    }
    switch (v.hdr.type) {
    case LSHM_WIRE_HELLO:
        lshm__port_fail(port, -EPROTO, "protocol violation: second HELLO");
        break;
    case LSHM_WIRE_MMAP_MSG:
        /* Draining, a new segment is not mapped: the peer takes back what
         * it announced on a port that closed before mapping it. */
        if (!port->draining)
            on_mmap(port, &v, fds[0]);
        close(fds[0]);
        break;
    case LSHM_WIRE_SHM_ACK:
        port->shm_acked = true;
        break;
    case LSHM_WIRE_BYE:
        lshm__port_fail(port, -EPIPE, "peer closed the port (BYE)");
        break;
    default:
        if (port->draining) {
            /* Checked like any other; read and discarded.  Descriptors
             * into a segment not mapped (see MMAP) are the peer's. */
            close_fds(fds, nfds);
            discard_view(port->peer, &v, true);
        } else {
            on_user(port, &v, nfds ? fds[0] : -1);
        }
        break;
    }
}

static void recv_done(struct lshm_op *op, int res, bool more, void *buf, unsigned len)
{
    struct lshm_port *port = (struct lshm_port *)((char *)op - offsetof(struct lshm_port, recv_op));
    struct lshm_ring *ring = port->ctx != NULL ? port->ctx->ring : NULL;

    port->refs++;
    if (!more)
        port->recv_armed = false;
    if (res > 0 && port->recv_multishot) {
        struct msghdr mh;
        void *payload;
        unsigned plen;

        if (!lshm__ring_recvmsg_parse(buf, len, &port->recv_mh, &payload, &plen, &mh))
            lshm__port_fail(port, -EPROTO, "malformed receive buffer");
        else if (plen == 0 && mh.msg_controllen == 0 && !(mh.msg_flags & MSG_TRUNC))
            /* EOF: multishot ends with an empty completion (res > 0: the
             * recvmsg_out header).  A real datagram always carries
             * SCM_CREDENTIALS (SO_PASSCRED), so an empty one is not this. */
            lshm__port_fail(port, -EPIPE, "peer closed the connection");
        else
            on_datagram(port, payload, plen, &mh);
    } else if (res > 0) {
        on_datagram(port, port->recv_buf, (size_t)res, &port->recv_mh);
    } else if (res == 0 && !port->recv_multishot && port->recv_mh.msg_controllen > 0) {
        /* An empty datagram (it came with credentials), not EOF. */
        on_datagram(port, port->recv_buf, 0, &port->recv_mh);
    } else if (res == 0) {
        lshm__port_fail(port, -EPIPE, "peer closed the connection");
    } else if (res == -ECONNRESET && port->recv_multishot && port_reading(port)) {
        /* Multishot can end with ECONNRESET while datagrams are still
         * queued: drain them with single-shot receives. */
        port->recv_multishot = false;
    } else if (res != -ENOBUFS && res != -ECANCELED) {
        lshm__port_fail(port, res, "receive failed: %s", strerror(-res));
    }
    if (buf != NULL && ring != NULL)
        lshm__ring_buf_put(ring, buf);
    if (!port_reading(port)) {
        /* Nothing more will be read: stop a multishot still armed. */
        if (port->recv_armed && ring != NULL && !port->shutdown)
            lshm__ring_cancel(ring, &port->recv_op);
    } else if (port->ctx != NULL && port->held >= port->ctx->p.recv_queue &&
               !port->draining) {
        /* (A drain holds nothing new: what it reads is released.) */
        if (port->recv_armed && !port->recv_stopped)
            lshm__ring_cancel(ring, &port->recv_op);
        port->recv_stopped = true;
    } else if (!port->recv_armed) {
        recv_arm(port);
    }
    port->refs--;
    port_finish(port);
}

static void recv_arm(struct lshm_port *port)
{
    struct lshm_ring *r = port->ctx->ring;
    int ret;

    if (port->recv_armed || !port_reading(port))
        return;
    port->recv_op.complete = recv_done;
    memset(&port->recv_mh, 0, sizeof(port->recv_mh));
    port->recv_mh.msg_control = port->recv_cmsg.buf;
    port->recv_mh.msg_controllen = sizeof(port->recv_cmsg.buf);
    if (port->recv_multishot) {
        ret = lshm__ring_recvmsg_multishot(r, port->fd, &port->recv_mh, &port->recv_op);
    } else {
        if (port->recv_buf == NULL) {
            port->recv_buf = malloc(LSHM_WIRE_MAX + 1);
            if (port->recv_buf == NULL) {
                lshm__port_fail(port, -ENOMEM, "out of memory for a receive buffer");
                return;
            }
        }
        /* One byte more than a datagram may hold, so that a longer one
         * shows as MSG_TRUNC. */
        port->recv_iov.iov_base = port->recv_buf;
        port->recv_iov.iov_len = LSHM_WIRE_MAX + 1;
        port->recv_mh.msg_iov = &port->recv_iov;
        port->recv_mh.msg_iovlen = 1;
        ret = lshm__ring_recvmsg(r, port->fd, &port->recv_mh, &port->recv_op);
    }
    if (ret < 0) {
        lshm__port_fail(port, ret, "cannot arm a receive: %s", strerror(-ret));
        return;
    }
    port->recv_armed = true;
}

/* ---- creation ---- */

int lshm__port_new(struct lshm_ctx *ctx, int fd, struct lshm_port **out)
{
    struct lshm_port *port;
    int one = 1, type = 0, domain = 0, ret;
    socklen_t len = sizeof(type);
    unsigned id;

    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0)
        return lshm__fail(errno == ENOTSOCK ? -ENOTSOCK : -errno,
                         "fd %d is not a socket", fd);
    len = sizeof(domain);
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) < 0 || domain != AF_UNIX ||
        type != SOCK_SEQPACKET)
        return lshm__fail(-EPROTOTYPE, "fd %d is not an AF_UNIX SOCK_SEQPACKET socket", fd);
    if (setsockopt(fd, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)) < 0)
        return lshm__fail(-errno, "SO_PASSCRED: %s", strerror(errno));
    port = calloc(1, sizeof(*port));
    if (port == NULL)
        return lshm__fail(-ENOMEM, "out of memory");
    port->ctx = ctx;
    port->fd = fd;
    /* Ids are process-wide: sent_over names a port among all contexts. */
    do {
        id = atomic_fetch_add(&next_port_id, 1) & 0xffff;
    } while (id == LSHM_SENT_OVER_ANY);
    port->id = (uint16_t)id;
    port->state = PORT_HANDSHAKE;
    port->recv_multishot = (lshm__ring_features(ctx->ring) & LSHM_FEAT_MULTISHOT_RECV) != 0;
    ret = queue_ctrl(port, LSHM_WIRE_HELLO, 0);
    if (ret < 0) {
        free(port);
        return lshm__fail(ret, "out of memory");
    }
    port->next = ctx->ports;
    if (ctx->ports != NULL)
        ctx->ports->prev = port;
    ctx->ports = port;
    recv_arm(port);
    lshm__port_kick(port);
    lshm__ring_submit(ctx->ring);
    *out = port;
    return 0;
}

/* The context is going away: forget the ring, keep what messages hold. */
void lshm__port_reap(struct lshm_port *port)
{
    struct smsg *m;

    port->user_closed = true;
    port->ctx = NULL;
    port->recv_armed = false;
    port->draining = false;
    port->inflight = 0;
    /* The ring is gone: sends it held will never complete; whether they
     * went out is unknown, so their chunks stay with the peer. */
    while ((m = port->if_head) != NULL) {
        port->if_head = m->next;
        smsg_free(m);
    }
    port->if_tail = NULL;
    if (port->state != PORT_CLOSED) {
        port->state = PORT_CLOSED;
        port->error = -EPIPE;
        snprintf(port->reason, sizeof(port->reason), "context freed");
    }
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

/* Could an allocation for this port succeed now?  Only a hint: the bits
 * are the peer's to change. */
bool lshm__port_shm_ready(struct lshm_port *port)
{
    struct lshm_seg_table *t = &port->peer->out;
    unsigned limit = port->ctx->p.max_segments;
    bool ready = false;
    uint32_t i, w;

    if (port->peer_max_segments < limit)
        limit = port->peer_max_segments;
    pthread_mutex_lock(&t->mutex);
    if (t->size < limit)
        ready = true;
    /* As lshm__peer_out_alloc: no new segment while one announced on
     * another port is not mapped yet (ids are ordered per process pair). */
    for (i = 0; i < t->size && ready; i++) {
        uint16_t over = __atomic_load_n(&t->elts[i]->hdr->sent_over, __ATOMIC_RELAXED);

        if (over != LSHM_SENT_OVER_ANY && over != port->id)
            ready = false;
    }
    for (i = 0; i < t->size && !ready; i++) {
        struct lshm_segment_header *h = t->elts[i]->hdr;
        uint16_t over = __atomic_load_n(&h->sent_over, __ATOMIC_RELAXED);

        if (over != LSHM_SENT_OVER_ANY && over != port->id)
            continue;
        for (w = 0; w < LSHM_FREE_WORDS && !ready; w++)
            ready = __atomic_load_n(&h->free_map[w], __ATOMIC_RELAXED) != 0;
    }
    pthread_mutex_unlock(&t->mutex);
    return ready;
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
    while ((rm = port->rq_head) != NULL) {
        port->rq_head = rm->next;
        if (rm->pub.fd >= 0)
            close(rm->pub.fd);
        free(rm);
    }
    if (port->fd >= 0)
        close(port->fd);
    free(port->recv_buf);
    free(port);
}
