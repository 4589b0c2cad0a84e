/*
 * The receive path: every receiver's duty of the protocol.  A datagram's
 * fds and credentials are taken out first; then lshm__recv_message checks
 * the message before anything is used (the handshake, the sender's
 * identity, segments in order, descriptors into mapped segments, tracking
 * slots) and delivers it, or, while draining, gives its chunks back.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "port.h"

static void recv_checked(struct lshm_port *port, const struct lshm_wire_view *v, int *fds,
                         unsigned nfds, const struct ucred *cred, bool from_ring);

static void deliver(struct lshm_port *port, struct rmsg *rm)
{
    if (port->user_closed) {
        /* Nobody is left to read it. */
        lshm__rmsg_release(rm);
        lshm__rmsg_free(port, rm);
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
    if (port->on_msg != NULL && port->ctx != NULL)
        lshm__ctx_list_add(port->ctx, PL_READY, &port->links[PL_READY]);
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
    /* Rings both ways only when both HELLOs offer them. */
    port->ring_ok = (v->hello.features & LSHM_WIRE_FEAT_RING) &&
                    !(port->ctx->p.flags & LSHM_CTX_NO_RING);
    port->peer_futex = port->ring_ok && (v->hello.features & LSHM_WIRE_FEAT_FUTEX);
    port->peer_ring_size = v->hello.ring_size;
    lshm__port_open(port);
    /* What the caller sent during the handshake now knows its way. */
    lshm__port_flush_backlog(port);
    if (port->sq_head != NULL)
        lshm__ctx_kick(port->ctx, port);
    return 0;
}

/* Does our HELLO say that we sleep on the futex word? */
static bool we_wait_on_futex(const struct lshm_port *port)
{
    return !(port->ctx->p.flags & LSHM_CTX_NO_RING) &&
           (lshm__ring_features(port->ctx->ring) & LSHM_FEAT_FUTEX);
}

/* The peer's ring: every check of a segment's, and the RING rules. */
static int on_ring(struct lshm_port *port, const struct lshm_wire_view *v, int fd)
{
    const char *why = "";
    int ret;

    if (!port->ring_ok) {
        lshm__port_fail(port, -EPROTO, "protocol violation: RING, but a HELLO lacked RING");
        return -EPROTO;
    }
    if (port->rx.hdr != NULL) {
        lshm__port_fail(port, -EPROTO, "protocol violation: a second RING");
        return -EPROTO;
    }
    if (v->ring_size > port->ctx->p.ring_size) {
        lshm__port_fail(port, -EPROTO, "protocol violation: RING of %u bytes, above the %u "
                        "of our HELLO", v->ring_size, port->ctx->p.ring_size);
        return -EPROTO;
    }
    ret = lshm__msgring_import(&port->rx, fd, v->ring_size, port->peer_port_id,
                               port->peer_pid, port->ctx->pid, &why);
    if (ret == -ENOMEM) {       /* this process's limit: the peer did nothing wrong */
        lshm__port_fail(port, ret, "the peer's ring cannot be mapped: %s", lshm__limit_text(ret));
        return ret;
    }
    if (ret < 0) {
        lshm__port_fail(port, -EPROTO, "protocol violation: ring refused: %s", why);
        return -EPROTO;
    }
    lshm__ctx_list_add(port->ctx, PL_RING, &port->links[PL_RING]);
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
    if (ret == -ENOMEM) {       /* this process's limit: the peer did nothing wrong */
        lshm__port_fail(port, ret, "segment %u cannot be mapped: %s", v->mmap_id,
                        lshm__limit_text(ret));
        return ret;
    }
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

    /* The fd is ours from here: handed on with the message, or closed. */
    if (v->has_tracking && read_tracking(port, v, &cancelled) < 0) {
        if (fd >= 0)
            close(fd);
        return -EPROTO;
    }
    extra = v->ndesc ? v->ndesc * (sizeof(struct rdesc) + sizeof(struct lshm_iov))
                     : v->hdr.size;
    rm = lshm__rmsg_new(port, extra);
    if (rm == NULL) {
        if (fd >= 0)
            close(fd);
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
                lshm__rmsg_release(rm);
                lshm__rmsg_free(port, rm);
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
        lshm__rmsg_release(rm);
        lshm__rmsg_free(port, rm);
        return 0;
    }
    deliver(port, rm);
    return 0;
}

/*
 * One message in v1 datagram format, with the fds and credentials that came
 * with it (cred NULL: none): check everything before anything is used,
 * then act on it.  Takes the fds: each is handed on or closed.  The bytes
 * need not come from a datagram.
 */
void lshm__recv_message(struct lshm_port *port, const void *data, size_t len,
                        int *fds, unsigned nfds, const struct ucred *cred)
{
    struct lshm_wire_view v;
    const char *why = "";
    int ret;

    ret = lshm__wire_decode(data, len, nfds, &v, &why);
    if (ret == -EPROTONOSUPPORT) {
        lshm__sock_close_fds(fds, nfds);
        lshm__port_fail(port, ret, "handshake refused: %s", why);
        return;
    }
    if (ret < 0) {
        lshm__sock_close_fds(fds, nfds);
        lshm__port_fail(port, -EPROTO, "protocol violation: %s", why);
        return;
    }
    if (port->state == PORT_HANDSHAKE) {
        lshm__sock_close_fds(fds, nfds);
        if (v.hdr.type != LSHM_WIRE_HELLO)
            lshm__port_fail(port, -EPROTO, "protocol violation: first message is type %u, "
                           "not HELLO", v.hdr.type);
        else
            on_hello(port, &v, cred);
        return;
    }
    recv_checked(port, &v, fds, nfds, cred, false);
}

/*
 * A decoded message from the peer, from a datagram or a ring record (the
 * same checks either way): the sender's identity, then what its type asks.
 */
static void recv_checked(struct lshm_port *port, const struct lshm_wire_view *v, int *fds,
                         unsigned nfds, const struct ucred *cred, bool from_ring)
{
    if (v->hdr.pid != port->peer_pid || (cred != NULL && cred->pid != port->peer_pid) ||
        v->hdr.port_id != port->peer_port_id) {
        lshm__sock_close_fds(fds, nfds);
        lshm__port_fail(port, -EPROTO, "protocol violation: header pid %d / port %u, "
                       "handshake said pid %d / port %u", (int)v->hdr.pid, v->hdr.port_id,
                       (int)port->peer_pid, port->peer_port_id);
        return;
    }
    switch (v->hdr.type) {
    case LSHM_WIRE_HELLO:
        lshm__port_fail(port, -EPROTO, "protocol violation: second HELLO");
        break;
    case LSHM_WIRE_MMAP_MSG:
        /* Draining, a new segment is not mapped: the peer takes back what
         * it announced on a port that closed before mapping it. */
        if (port->state != PORT_DRAINING)
            on_mmap(port, v, fds[0]);
        close(fds[0]);
        break;
    case LSHM_WIRE_SHM_ACK:
        /* Chunks, or room in our ring, came back. */
        port->shm_acked = true;
        if (port->bl_head != NULL && port->state == PORT_OPEN) {
            lshm__port_flush_backlog(port);
            lshm__ctx_kick(port->ctx, port);
        }
        break;
    case LSHM_WIRE_BYE:
        lshm__port_fail(port, -EPIPE, "peer closed the port (BYE)");
        break;
    case LSHM_WIRE_RING:
        on_ring(port, v, fds[0]);
        close(fds[0]);
        break;
    case LSHM_WIRE_WAKE:
        if (port->rx.hdr == NULL)
            lshm__port_fail(port, -EPROTO, "protocol violation: WAKE before the peer's RING");
        else
            port->stats.wakes_received++;
        break;
    default:
        if (!from_ring && nfds == 0 && port->ring_ok) {
            /* Its place was the ring (strict reading). */
            lshm__port_fail(port, -EPROTO, "protocol violation: a user message without an "
                            "fd on the socket, where both HELLOs said RING");
            break;
        }
        if (from_ring) {
            port->stats.ring_msgs_in++;
            port->stats.ring_bytes_in += v->hdr.size;
        } else {
            port->stats.sock_msgs_in++;
            port->stats.sock_bytes_in += v->hdr.size;
        }
        if (port->state == PORT_DRAINING) {
            /* Checked like any other; read and discarded.  Descriptors
             * into a segment not mapped (see MMAP) are the peer's. */
            lshm__sock_close_fds(fds, nfds);
            lshm__port_discard(port, v, true);
        } else {
            on_user(port, v, nfds ? fds[0] : -1);
        }
        break;
    }
}

/* ---- the peer's ring ---- */

/* Does the datagram order nothing (WAKE, SHM_ACK), so that it takes no FENCE? */
static bool orders_nothing(const uint8_t *data, size_t len)
{
    uint8_t type;

    if (len < sizeof(struct lshm_wire_msg))
        return false;
    type = data[offsetof(struct lshm_wire_msg, type)];
    return type == LSHM_WIRE_WAKE || type == LSHM_WIRE_SHM_ACK;
}

/* A datagram whose place in the order is a FENCE of the peer's ring. */
static void park(struct lshm_port *port, const void *data, size_t len,
                 const struct lshm_sock_cmsg *cm)
{
    struct parked *pk;

    if (port->fence_wait) {
        /* The ring stopped at its FENCE: this is the message there. */
        port->fence_wait = false;
        lshm__ctx_list_del(port->ctx, PL_FENCE, &port->links[PL_FENCE]);
        lshm__recv_message(port, data, len, (int *)cm->fds, cm->nfds,
                           cm->has_cred ? &cm->cred : NULL);
        lshm__recv_poll(port);
        return;
    }
    pk = malloc(sizeof(*pk) + len);
    if (pk == NULL) {
        lshm__sock_close_fds(cm->fds, cm->nfds);
        lshm__port_fail(port, -ENOMEM, "out of memory holding a datagram for its FENCE");
        return;
    }
    pk->next = NULL;
    pk->cm = *cm;
    pk->len = len;
    memcpy(pk->data, data, len);
    if (port->pk_tail != NULL)
        port->pk_tail->next = pk;
    else
        port->pk_head = pk;
    port->pk_tail = pk;
    port->pk_len++;
    /* Its FENCE was published before it was sent: read up to it now. */
    lshm__recv_poll(port);
}

static struct parked *unpark(struct lshm_port *port)
{
    struct parked *pk = port->pk_head;

    if (pk != NULL) {
        port->pk_head = pk->next;
        if (port->pk_head == NULL)
            port->pk_tail = NULL;
        port->pk_len--;
    }
    return pk;
}

static void recv_record(struct lshm_port *port, const void *buf, uint32_t len)
{
    struct lshm_wire_view v;
    const char *why = "";

    if (lshm__wire_decode_record(buf, len, &v, &why) < 0) {
        lshm__port_fail(port, -EPROTO, "protocol violation: %s", why);
        return;
    }
    recv_checked(port, &v, NULL, 0, NULL, true);
}

/*
 * Is the port reading the peer's ring now: open or draining, below the
 * bound (to_end: at the peer's end of file, what it published before it
 * is read whatever the bound; the ring's size bounds it).
 */
static bool ring_readable(const struct lshm_port *port, bool to_end)
{
    return port->rx.hdr != NULL && lshm__port_is_reading(port) && !port->fence_wait &&
           (to_end || port->held < port->ctx->p.recv_queue || port->state == PORT_DRAINING);
}

static bool ring_read(struct lshm_port *port, bool to_end)
{
    uint8_t buf[LSHM_WIRE_MAX];
    bool any = false;

    if (!ring_readable(port, to_end))
        return false;
    lshm__msgring_awake(&port->rx);
    port->refs++;
    while (ring_readable(port, to_end)) {
        struct lshm_wire_record rec;
        struct parked *pk;
        const char *why = "";
        int ret = lshm__msgring_next(&port->rx, buf, &rec, &why);

        if (ret < 0) {
            lshm__port_fail(port, -EPROTO, "protocol violation: %s", why);
            break;
        }
        if (ret == 0) {
            /* Read to a tail read after the datagram came: its FENCE
             * should have been there. */
            if (port->pk_head != NULL)
                lshm__port_fail(port, -EPROTO, "protocol violation: a datagram with no "
                                "FENCE for it in the ring");
            break;
        }
        any = true;
        if (rec.kind == LSHM_REC_MSG) {
            recv_record(port, buf, rec.len);
            continue;
        }
        /* A FENCE: the next message is the next datagram. */
        pk = unpark(port);
        if (pk == NULL && to_end)
            break;
        if (pk == NULL) {
            port->fence_wait = true;
            lshm__ctx_deadline(port->ctx, PL_FENCE, &port->links[PL_FENCE],
                               lshm__now_ms() + LSHM_FENCE_MS);
            /* Its datagram must be read, even if the socket had stopped at
             * the bound: one message past it, not a wait for nothing. */
            if (port->recv_stopped) {
                port->recv_stopped = false;
                lshm__recv_arm(port);
            }
            break;
        }
        lshm__recv_message(port, pk->data, pk->len, pk->cm.fds, pk->cm.nfds,
                           pk->cm.has_cred ? &pk->cm.cred : NULL);
        free(pk);
    }
    /* The producer waits for room: say it came. */
    if (lshm__msgring_publish_head(&port->rx) && port->state == PORT_OPEN &&
        lshm__port_queue_ctrl(port, LSHM_WIRE_SHM_ACK) == 0)
        lshm__ctx_kick(port->ctx, port);
    port->refs--;
    lshm__port_settle(port);
    return any;
}

bool lshm__recv_poll(struct lshm_port *port)
{
    return ring_read(port, false);
}

/*
 * The peer's end of file: deliver what it published before, then close.
 * An orderly close says BYE first (-EPIPE); end of file without one is a
 * peer that crashed, was killed, or closed its socket without a word.
 */
static void recv_eof(struct lshm_port *port)
{
    ring_read(port, true);
    lshm__port_fail(port, -ECONNRESET, "peer closed the connection without BYE "
                    "(it exited, crashed or was killed)");
}

static void futex_done(struct lshm_op *op, int res, bool more, void *buf, unsigned len)
{
    struct lshm_port *port = (struct lshm_port *)((char *)op -
                                                  offsetof(struct lshm_port, futex_op));

    port->futex_armed = false;
    if (res == 0)
        port->stats.wakes_received++;
    lshm__port_settle(port);
}

bool lshm__recv_sleep(struct lshm_port *port)
{
    if (!ring_readable(port, false))
        return true;
    if (!lshm__msgring_may_sleep(&port->rx))
        return false;
    if (port->futex_armed || !we_wait_on_futex(port))
        return true;
    port->futex_op.complete = futex_done;
    if (lshm__ring_futex_wait(port->ctx->ring, lshm__msgring_wake_word(&port->rx), 1,
                              &port->futex_op) < 0) {
        /* No wait could be armed: a wake would find nobody.  Don't sleep. */
        lshm__msgring_awake(&port->rx);
        return false;
    }
    port->futex_armed = true;
    return true;
}

/* One datagram: what only a datagram can get wrong, then its message. */
static void recv_datagram(struct lshm_port *port, const void *data, size_t len,
                          const struct msghdr *mh)
{
    struct lshm_sock_cmsg cm;

    lshm__sock_take_cmsg(mh, &cm);
    if (!lshm__port_is_reading(port)) {
        lshm__sock_close_fds(cm.fds, cm.nfds);
        return;
    }
    if (mh->msg_flags & MSG_CTRUNC) {
        /* The kernel truncates the fds it cannot install here too: out of
         * fds is this process's limit, not the peer's violation. */
        bool ours = lshm__sock_out_of_fds(port->fd);

        lshm__sock_close_fds(cm.fds, cm.nfds);
        /* Lose nothing but that message: what came before it is delivered. */
        if (ours) {
            ring_read(port, true);
            lshm__port_fail(port, -EMFILE, "this process is out of file descriptors "
                            "(RLIMIT_NOFILE): a message that carried one from the peer "
                            "could not be received whole");
        } else {
            lshm__port_fail(port, -EPROTO, "protocol violation: control data truncated "
                            "(too many fds)");
        }
        return;
    }
    if (mh->msg_flags & MSG_TRUNC) {
        lshm__sock_close_fds(cm.fds, cm.nfds);
        lshm__port_fail(port, -EPROTO, "protocol violation: datagram longer than %u bytes",
                       LSHM_WIRE_MAX);
        return;
    }
    /* Once the peer's ring is out, a datagram waits for its FENCE. */
    if (port->rx.hdr != NULL && !orders_nothing(data, len)) {
        park(port, data, len, &cm);
        return;
    }
    lshm__recv_message(port, data, len, cm.fds, cm.nfds, cm.has_cred ? &cm.cred : NULL);
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
            recv_eof(port);
        else
            recv_datagram(port, payload, plen, &mh);
    } else if (res > 0) {
        recv_datagram(port, port->recv_buf, (size_t)res, &port->recv_mh);
    } else if (res == 0 && !port->recv_multishot && port->recv_mh.msg_controllen > 0) {
        /* An empty datagram (it came with credentials), not EOF. */
        recv_datagram(port, port->recv_buf, 0, &port->recv_mh);
    } else if (res == 0) {
        recv_eof(port);
    } else if (res == -ECONNRESET && port->recv_multishot && lshm__port_is_reading(port)) {
        /* Multishot can end with ECONNRESET while datagrams are still
         * queued: drain them with single-shot receives. */
        port->recv_multishot = false;
    } else if (res == -ECONNRESET) {
        /* The peer closed with our datagrams unread: after all it sent, as
         * an end of file without BYE. */
        recv_eof(port);
    } else if (res != -ENOBUFS && res != -ECANCELED) {
        lshm__port_fail(port, res, "receive failed: %s", strerror(-res));
    }
    if (buf != NULL && ring != NULL)
        lshm__ring_buf_put(ring, buf);
    if (!lshm__port_is_reading(port)) {
        /* Nothing more will be read: stop a multishot still armed (a
         * port without a context has no ring to ask). */
        if (port->recv_armed && ring != NULL && port->fd < 0)
            lshm__ring_cancel(ring, &port->recv_op);
    } else if (port->ctx != NULL && port->held >= port->ctx->p.recv_queue &&
               port->state != PORT_DRAINING && !port->fence_wait) {
        /* (A drain holds nothing new: what it reads is released.) */
        if (port->recv_armed && !port->recv_stopped)
            lshm__ring_cancel(ring, &port->recv_op);
        port->recv_stopped = true;
    } else if (!port->recv_armed) {
        lshm__recv_arm(port);
    }
    port->refs--;
    lshm__port_settle(port);
}

void lshm__recv_arm(struct lshm_port *port)
{
    struct lshm_ring *r = port->ctx->ring;
    int ret;

    if (port->recv_armed || !lshm__port_is_reading(port))
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

int lshm__recv(struct lshm_port *port, struct lshm_msg *msg, int timeout_ms)
{
    struct lshm_msg *m;
    int ret;

    m = lshm__port_pop(port);
    /* A record in the ring costs no system call. */
    if (m == NULL && lshm__recv_poll(port))
        m = lshm__port_pop(port);
    if (m == NULL) {
        ret = lshm__port_wait(port, LSHM_WAIT_RECV, timeout_ms);
        if (ret < 0)
            return ret;
        m = lshm__port_pop(port);
        if (m == NULL)
            return lshm__fail(-EAGAIN, "no message");
    }
    *msg = *m;
    return 0;
}

void lshm__recv_done(struct lshm_msg *msg)
{
    struct rmsg *rm = msg->priv;
    struct lshm_port *port = rm->port;

    /* The caller got the fd with the message: it is theirs to close
     * (lshm_recv(3)); only undelivered messages close theirs. */
    rm->pub.fd = -1;
    lshm__rmsg_release(rm);
    lshm__rmsg_free(port, rm);
    port->held--;
    /* Reading stopped at the bound: resume once half the room is back. */
    if (port->recv_stopped && port->ctx != NULL && port->held <= port->ctx->p.recv_queue / 2) {
        port->recv_stopped = false;
        lshm__recv_arm(port);
    }
    lshm__port_settle(port);
}
