/*
 * The send path: every message is queued in order, then the queue goes
 * out as one linked chain of sends when nothing is in flight.  A port the
 * caller closes sends what is queued, then its BYE, then drains.
 */
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "port.h"

#define CHAIN_MAX   1024u   /* sends linked into one submit */
#define REAP_EVERY  64u     /* ring messages between two looks at completions */

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
        lshm__port_free_unsent(port, m);
    lshm__smsg_free(m);
    if (res == -EPIPE || res == -ECONNRESET || res == -ECANCELED) {
        /* The peer's end is gone, and no BYE of its closed the port
         * first: a crash, as the end of file without BYE says it. */
        lshm__port_fail(port, -ECONNRESET, "peer closed the connection without BYE "
                        "(a send failed: %s)", strerror(res == -ECANCELED ? EPIPE : -res));
    } else if (res < 0) {
        lshm__port_fail(port, res, "send failed: %s", strerror(-res));
    } else if (port->ctx != NULL) {
        port->ctx->msgs_sent++;
    }
    if (port->inflight == 0)
        lshm__send_kick(port);
    lshm__port_settle(port);
}

static void fill_msghdr(struct smsg *m)
{
    memset(&m->mh, 0, sizeof(m->mh));
    m->iov.iov_base = m->data;
    m->iov.iov_len = m->len;
    m->mh.msg_iov = &m->iov;
    m->mh.msg_iovlen = 1;
    m->op.complete = send_done;
    if (m->fd >= 0 || m->seg != NULL)
        lshm__sock_put_fd(&m->mh, m->cmsg.buf, m->seg != NULL ? m->seg->fd : m->fd);
}

/*
 * Submit the queue as one linked chain when nothing is in flight.  A link
 * keeps the sends in order even when the socket is full (unlinked sends
 * can complete out of order then), and a chain must fit in the SQ to stay
 * one chain: it ends at the submit boundary.
 */
void lshm__send_kick(struct lshm_port *port)
{
    struct lshm_ring *r;
    unsigned n, i;

    if (port->ctx == NULL || port->state >= PORT_DRAINING)
        goto done;
    /* Records written with LSHM_MORE, and what waited for room. */
    if (port->bl_head != NULL)
        lshm__port_flush_backlog(port);
    /* (A publish may queue a WAKE: then there is a chain to send.) */
    if (port->inflight == 0 && port->sq_head == NULL)
        lshm__port_publish(port);
    if (port->inflight > 0 || port->sq_head == NULL) {
        lshm__port_publish(port);
        goto done;
    }
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
    /* The FENCEs of this chain's datagrams are visible before it is. */
    lshm__port_release_fences(port, n);
    lshm__port_publish(port);
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
    if (port->sq_head != NULL && port->inflight == 0 && port->state < PORT_DRAINING &&
        port->ctx != NULL)
        lshm__ctx_list_add(port->ctx, PL_KICK, &port->links[PL_KICK]);
    /* A closing port's BYE was the last message: it went out, now drain. */
    if (port->user_closed && port->state < PORT_DRAINING && port->inflight == 0 &&
        port->sq_head == NULL && port->bl_head == NULL && lshm__port_bye_sent(port))
        lshm__recv_arm(port);
}

void lshm__port_start(struct lshm_port *port)
{
    lshm__recv_arm(port);
    lshm__send_kick(port);
    lshm__ring_submit(port->ctx->ring);
}

void lshm__port_close(struct lshm_port *port)
{
    port->user_closed = true;
    port->on_msg = NULL;
    port->on_close = NULL;
    lshm__port_drop_received(port);
    if (port->state < PORT_DRAINING && port->ctx != NULL) {
        if (lshm__port_queue_ctrl(port, LSHM_WIRE_BYE) < 0)
            lshm__port_fail(port, -ENOMEM, "out of memory closing");
        lshm__send_kick(port);
        if (port->ctx != NULL)
            lshm__ring_submit(port->ctx->ring);
    }
    lshm__port_settle(port);
}

void lshm__ports_close(struct lshm_ctx *ctx)
{
    struct lshm_port *port, *next;

    for (port = ctx->ports; port != NULL; port = next) {
        next = port->next;
        if (!port->user_closed)
            lshm__port_close(port);
    }
}

static int send_check(struct lshm_port *port, const struct lshm_out *out, uint64_t *total)
{
    unsigned i;

    *total = 0;
    if (out->type < LSHM_TYPE_USER_MIN)
        return lshm__fail(-EINVAL, "message type %u is reserved for control (use >= 16)",
                         out->type);
    if (port->state >= PORT_DRAINING || port->user_closed)
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
    if (port->sq_len + port->inflight + port->bl_len >= port->ctx->p.send_queue) {
        lshm__port_want(port, LSHM_WAIT_SEND);
        return lshm__fail(-EAGAIN, "send queue full (%u messages)", port->ctx->p.send_queue);
    }
    return 0;
}

/* The bytes of out as a v1 message: header, tracking, descriptors or inline. */
static size_t wire_len(const struct lshm_out *out)
{
    size_t len = sizeof(struct lshm_wire_msg);

    if (out->tracking != NULL)
        len += sizeof(struct lshm_wire_tracking);
    return len + (out->nbufs > 0 ? out->nbufs * sizeof(struct lshm_wire_desc) : out->size);
}

/* Encode out into dst (wire_len(out) bytes): the datagram, or a ring record's body. */
static size_t encode(struct lshm_port *port, const struct lshm_out *out, uint64_t total,
                     void *dst)
{
    struct lshm_wire_desc descs[LSHM_MAX_DESCS];
    struct lshm_wire_tracking tr, *trp = NULL;
    struct lshm_wire_msg hdr;
    unsigned i;

    memset(&hdr, 0, sizeof(hdr));
    hdr.stream = out->stream;
    hdr.pid = port->ctx->pid;   /* getpid() is a system call */
    hdr.port_id = port->id;
    hdr.type = out->type;
    hdr.flags = out->last ? LSHM_WIRE_LAST : 0;
    hdr.size = (uint32_t)total;
    if (out->tracking != NULL) {
        tr.mmap_id = out->tracking->seg->id;
        tr.tracking_id = out->tracking->slot;
        trp = &tr;
    }
    for (i = 0; i < out->nbufs; i++) {
        descs[i].mmap_id = out->bufs[i]->seg->id;
        descs[i].chunk_id = out->bufs[i]->chunk;
        descs[i].size = (uint32_t)out->bufs[i]->size;
    }
    return lshm__wire_encode_user(dst, &hdr, trp, out->nbufs ? descs : NULL, out->nbufs,
                                  out->data);
}

/*
 * Where a user message goes: the one decision point of the send path.
 * With rings (both HELLOs said RING) a message without an fd is a record
 * of our ring, written in place when nothing waits before it; the rest
 * takes the socket's chain, after a FENCE once our ring is out.  During
 * the handshake every message waits to know its way.
 */
static int route(struct lshm_port *port, const struct lshm_out *out, uint64_t total)
{
    size_t len = wire_len(out);
    struct smsg *m;
    int ret;

    if (lshm__port_uses_ring(port) && out->fd < 0) {
        ret = lshm__port_ring_out(port);
        if (ret < 0)
            return ret;
        if (port->bl_head == NULL) {
            int err = 0;
            void *body = lshm__msgring_reserve(&port->tx, LSHM_REC_MSG, (uint32_t)len, &err);

            if (body != NULL) {
                encode(port, out, total, body);
                port->tx_dirty = true;
                port->stats.ring_msgs++;
                port->stats.ring_bytes += total;
                port->ctx->msgs_sent++;
                return 0;
            }
            if (err == -EPROTO) {
                lshm__port_fail(port, -EPROTO, "protocol violation: the peer moved our "
                                "ring's head out of bounds");
                return lshm__fail(-EPROTO, "%s", port->reason);
            }
            /* Full: the message waits in the backlog (lshm__port_queue). */
        }
    }
    m = lshm__smsg_new(port, len);
    if (m == NULL)
        return lshm__fail(-ENOMEM, "out of memory");
    m->len = encode(port, out, total, m->data);
    m->fd = out->fd;
    lshm__port_queue(port, m);
    return 0;
}

int lshm__send(struct lshm_port *port, const struct lshm_out *out, unsigned flags)
{
    uint64_t total;
    unsigned i;
    int ret;

    ret = send_check(port, out, &total);
    if (ret < 0)
        return ret;
    ret = route(port, out, total);
    if (ret < 0)
        return ret;
    /* The receiver frees the chunks it was sent; the rest come back now. */
    for (i = 0; i < out->nbufs; i++)
        lshm__buf_release_sent(out->bufs[i]);
    if (out->tracking != NULL)
        out->tracking->sent = true;
    if (flags & LSHM_MORE) {
        /* The next run, or lshm_flush, publishes and submits. */
        lshm__ctx_list_add(port->ctx, PL_KICK, &port->links[PL_KICK]);
        return 0;
    }
    lshm__port_publish(port);
    /* Only the socket needs the kernel.  A sender that writes only its
     * ring still reaps completions when the kernel says some wait, or
     * every REAP_EVERY messages where it cannot say: the peer's BYE or end
     * of file stops it then, instead of a stream into a ring nobody reads. */
    if (port->sq_head != NULL || port->inflight > 0) {
        port->unreaped = 0;
        lshm__send_kick(port);
        ret = lshm__ctx_pump(port->ctx);   /* queued, but a refused submit is no success */
        if (ret < 0)
            return ret;
    } else if (lshm__ring_has_completions(port->ctx->ring) || ++port->unreaped >= REAP_EVERY) {
        /* A look at the sockets too (epoll's pump only hands over what
         * completed): no wait, no handler. */
        port->unreaped = 0;
        lshm__ctx_step(port->ctx, 0);
    }
    return 0;
}
