/*
 * The public functions: check what the caller passed, then hand over to
 * the port, ring and shared-memory layers.
 */
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "port.h"

#define DEFAULT_RING_ENTRIES 1024u
#define DEFAULT_MAX_SEGMENTS 32u
#define DEFAULT_SEND_QUEUE   1024u
#define DEFAULT_RECV_QUEUE   256u
#define SHM_RECHECK_MS       10
#define CLOSE_DRAIN_MS       1000
#define DEFAULT_HANDSHAKE_MS 10000u

static bool is_power_of_two(unsigned v)
{
    return v != 0 && (v & (v - 1)) == 0;
}

static int check_params(const struct lshm_ctx_params *in, struct lshm_ctx_params *p)
{
    const unsigned known = LSHM_CTX_SCRUB | LSHM_CTX_DROP_CANCELLED |
                           LSHM_CTX_NO_MULTISHOT | LSHM_CTX_NO_DEFER_TASKRUN |
                           LSHM_CTX_NO_IO_URING | LSHM_CTX_IO_URING_ONLY;
    unsigned i;

    memset(p, 0, sizeof(*p));
    if (in != NULL) {
        for (i = 0; i < ARRAY_SIZE(in->reserved); i++)
            if (in->reserved[i] != 0)
                return lshm__fail(-EINVAL, "lshm_ctx_params.reserved[%u] is not zero", i);
        if (in->flags & ~known)
            return lshm__fail(-EINVAL, "unknown lshm_ctx_params.flags 0x%x", in->flags & ~known);
        if ((in->flags & LSHM_CTX_NO_IO_URING) && (in->flags & LSHM_CTX_IO_URING_ONLY))
            return lshm__fail(-EINVAL, "LSHM_CTX_NO_IO_URING and LSHM_CTX_IO_URING_ONLY "
                                       "together");
        *p = *in;
    }
    if (p->ring_entries == 0)
        p->ring_entries = DEFAULT_RING_ENTRIES;
    if (p->max_segments == 0)
        p->max_segments = DEFAULT_MAX_SEGMENTS;
    if (p->send_queue == 0)
        p->send_queue = DEFAULT_SEND_QUEUE;
    if (p->recv_queue == 0)
        p->recv_queue = DEFAULT_RECV_QUEUE;
    if (p->handshake_ms == 0)
        p->handshake_ms = DEFAULT_HANDSHAKE_MS;
    if (!is_power_of_two(p->ring_entries) || p->ring_entries < 8 || p->ring_entries > 4096)
        return lshm__fail(-EINVAL, "ring_entries %u: a power of two from 8 to 4096",
                         p->ring_entries);
    if (p->max_segments > 1024)
        return lshm__fail(-EINVAL, "max_segments %u: at most 1024", p->max_segments);
    if (p->send_queue > 65536 || p->recv_queue > 65536)
        return lshm__fail(-EINVAL, "send_queue and recv_queue: at most 65536");
    if (p->handshake_ms > 3600000)
        return lshm__fail(-EINVAL, "handshake_ms %u: at most an hour", p->handshake_ms);
    return 0;
}

LSHM_EXPORT int lshm_ctx_new(struct lshm_ctx **out, const struct lshm_ctx_params *params)
{
    struct lshm_ctx *ctx;
    int ret;

    if (out == NULL)
        return lshm__fail(-EINVAL, "ctx is NULL");
    ctx = calloc(1, sizeof(*ctx));
    if (ctx == NULL)
        return lshm__fail(-ENOMEM, "out of memory");
    ret = check_params(params, &ctx->p);
    if (ret < 0)
        goto fail;
    ret = lshm__ring_new(&ctx->ring, ctx->p.ring_entries, ctx->p.flags);
    if (ret < 0)
        goto fail;
    ctx->pid = getpid();
    *out = ctx;
    return 0;
fail:
    free(ctx);
    return ret;
}

static void check_deadlines(struct lshm_ctx *ctx);

/* Is a port still sending, or reading what its peer sent before our BYE? */
static bool ctx_closing(const struct lshm_ctx *ctx)
{
    const struct lshm_port *port;

    for (port = ctx->ports; port != NULL; port = port->next)
        if (port->draining ||
            (port->state != PORT_CLOSED && (port->sq_head != NULL || port->inflight > 0)))
            return true;
    return false;
}

LSHM_EXPORT void lshm_ctx_free(struct lshm_ctx *ctx)
{
    struct lshm_listener *l, *lnext;
    struct lshm_port *port, *next;
    long long end;

    if (ctx == NULL)
        return;
    if (ctx->pid != getpid()) {
        /* A forked child's copy: the ring, the sockets and the shared
         * state belong to the parent; release only our copies. */
        while (ctx->listeners != NULL)
            lshm__listener_forget(ctx->listeners);
        for (port = ctx->ports; port != NULL; port = next) {
            next = port->next;
            lshm__port_forget(port);
        }
        lshm__peers_forget();
        lshm__ring_forget(ctx->ring);
        free(ctx);
        return;
    }
    for (l = ctx->listeners; l != NULL; l = lnext) {
        lnext = l->next;
        lshm_listener_close(l);
    }
    for (port = ctx->ports; port != NULL; port = next) {
        next = port->next;
        if (!port->user_closed)
            lshm__port_release(port);
    }
    /* Give queued messages and BYEs a bounded time to go out, and the
     * drains after them (LSHM_DRAIN_MS each) a chance to end. */
    end = lshm__now_ms() + CLOSE_DRAIN_MS;
    while (ctx_closing(ctx) && lshm__now_ms() < end) {
        lshm__ctx_step(ctx, 10);
        check_deadlines(ctx);
    }
    for (port = ctx->ports; port != NULL; port = port->next)
        if (port->fd >= 0)
            shutdown(port->fd, SHUT_RDWR);
    lshm__ring_free(ctx->ring);
    while (ctx->listeners != NULL)
        lshm__listener_reap(ctx->listeners);
    for (port = ctx->ports; port != NULL; port = next) {
        next = port->next;
        lshm__port_reap(port);
    }
    free(ctx);
}

LSHM_EXPORT int lshm_ctx_fd(const struct lshm_ctx *ctx)
{
    if (ctx == NULL)
        return lshm__fail(-EINVAL, "ctx is NULL");
    return lshm__ring_fd(ctx->ring);
}

/* Free the ports whose free was put off while completions ran. */
static void ctx_sweep(struct lshm_ctx *ctx)
{
    struct lshm_port *port;

    if (ctx->walking > 0)
        return;
    while ((port = lshm__port_list_pop(ctx, PL_ZOMBIE)) != NULL)
        lshm__port_sweep(port);
}

/* Submit what was queued on ports with nothing in flight (LSHM_MORE). */
static void ctx_kick(struct lshm_ctx *ctx)
{
    unsigned n = ctx->lists[PL_KICK].len;
    struct lshm_port *port;

    /* Only those listed now: a port the ring has no room for comes back. */
    while (n-- > 0 && (port = lshm__port_list_pop(ctx, PL_KICK)) != NULL)
        lshm__port_kick(port);
}

/* Run the ring without calling any handler: for waits inside the library. */
int lshm__ctx_step(struct lshm_ctx *ctx, int timeout_ms)
{
    int ret;

    ctx->walking++;
    ret = lshm__ring_run(ctx->ring, timeout_ms);
    ctx->walking--;
    ctx_sweep(ctx);
    return ret;
}

int lshm__ctx_pump(struct lshm_ctx *ctx)
{
    int ret;

    ctx->walking++;
    ret = lshm__ring_pump(ctx->ring);
    ctx->walking--;
    ctx_sweep(ctx);
    return ret;
}

static void timer_done(struct lshm_op *op, int res, bool more, void *buf, unsigned len)
{
    struct lshm_timer *t = (struct lshm_timer *)((char *)op - offsetof(struct lshm_timer, op));

    t->armed = false;
}

/* Wake the context within ms, unless t is armed already (see port.h). */
static void wake_in(struct lshm_ctx *ctx, struct lshm_timer *t, unsigned ms)
{
    if (t->armed)
        return;
    t->op.complete = timer_done;
    if (lshm__ring_timeout(ctx->ring, ms, &t->op) == 0)
        t->armed = true;
}

void lshm__ctx_due(struct lshm_ctx *ctx, struct lshm_timer *t, long long due)
{
    long long now = lshm__now_ms();

    if (ctx->next_due == 0 || due < ctx->next_due)
        ctx->next_due = due;
    wake_in(ctx, t, due > now ? (unsigned)(due - now) + 1 : 1);
}

/*
 * A client that connects and never says HELLO would hold its socket and
 * port forever: past handshake_ms it is closed, and handed to the caller
 * closed with the reason, like any client that broke the protocol.  A
 * port we closed reads what the peer sent before it saw our BYE, up to
 * LSHM_DRAIN_MS: a peer that never closes its end does not keep it.
 */
static void check_deadlines(struct lshm_ctx *ctx)
{
    long long now = lshm__now_ms(), hs_next = 0, drain_next = 0;
    struct lshm_port *port;

    /* The walk only when a deadline may have passed. */
    if (ctx->next_due == 0 || now < ctx->next_due)
        return;
    for (port = ctx->ports; port != NULL; port = port->next) {
        if (port->listener != NULL) {
            if (now >= port->due)
                lshm__port_fail(port, -ETIMEDOUT, "no HELLO within %u ms of the connection",
                               ctx->p.handshake_ms);
            else if (hs_next == 0 || port->due < hs_next)
                hs_next = port->due;
        } else if (port->draining) {
            if (now >= port->due)
                lshm__port_fail(port, -ETIMEDOUT, "no end of file within %u ms of BYE",
                               LSHM_DRAIN_MS);
            else if (drain_next == 0 || port->due < drain_next)
                drain_next = port->due;
        }
    }
    ctx->next_due = 0;
    if (hs_next != 0)
        lshm__ctx_due(ctx, &ctx->hs_timer, hs_next);
    if (drain_next != 0)
        lshm__ctx_due(ctx, &ctx->drain_timer, drain_next);
}

LSHM_EXPORT int lshm_ctx_run(struct lshm_ctx *ctx, int timeout_ms)
{
    struct lshm_listener *l, *lnext;
    struct lshm_port *port;
    unsigned n;
    int ret;

    if (ctx == NULL)
        return lshm__fail(-EINVAL, "ctx is NULL");
    ctx->walking++;
    /* Messages queued with LSHM_MORE go out with this run. */
    ctx_kick(ctx);
    /* Handlers still to call (a nested run left them): do not sleep. */
    if (ctx->lists[PL_READY].head != NULL)
        timeout_ms = 0;
    ret = lshm__ring_run(ctx->ring, timeout_ms < 0 ? -1 : timeout_ms);
    check_deadlines(ctx);
    /* Handlers run here, outside any completion: they may send, close,
     * or run the context again.  Ports made ready meanwhile wait for the
     * next run, which will not sleep. */
    for (l = ctx->listeners; l != NULL; l = lnext) {
        lnext = l->next;
        lshm__listener_dispatch(l);
    }
    n = ctx->lists[PL_READY].len;
    while (n-- > 0 && (port = lshm__port_list_pop(ctx, PL_READY)) != NULL)
        lshm__port_dispatch(port);
    /* Completions may have queued more (a next chain, an ACK): push it
     * now, or a caller that sleeps in epoll would never see it go.  Nor
     * would it see handlers left to call: wake its poll. */
    lshm__ring_submit(ctx->ring);
    if (ctx->lists[PL_READY].head != NULL)
        lshm__ring_wake(ctx->ring);
    ctx->walking--;
    ctx_sweep(ctx);
    return ret;
}

LSHM_EXPORT int lshm_flush(struct lshm_ctx *ctx)
{
    if (ctx == NULL)
        return lshm__fail(-EINVAL, "ctx is NULL");
    ctx_kick(ctx);
    return lshm__ring_submit(ctx->ring);
}

/* Does the kernel take MFD_NOEXEC_SEAL (6.3+)?  Asked once. */
static bool noexec_seal(void)
{
    static _Atomic int known = -1;
    int fd;

    if (known < 0) {
        fd = memfd_create("lshm-probe", MFD_CLOEXEC | MFD_ALLOW_SEALING | 0x0008U);
        if (fd >= 0)
            close(fd);
        known = fd >= 0;
    }
    return known;
}

LSHM_EXPORT unsigned lshm_ctx_features(const struct lshm_ctx *ctx)
{
    unsigned f;

    if (ctx == NULL)
        return 0;
    f = lshm__ring_features(ctx->ring);
    if (noexec_seal())
        f |= LSHM_FEAT_NOEXEC_SEAL;
    return f;
}

LSHM_EXPORT int lshm_ctx_stats(const struct lshm_ctx *ctx, struct lshm_ctx_stats *st)
{
    if (ctx == NULL || st == NULL)
        return lshm__fail(-EINVAL, "NULL argument");
    lshm__ring_stats(ctx->ring, st);
    st->msgs_sent = ctx->msgs_sent;
    st->msgs_received = ctx->msgs_received;
    return 0;
}

/* ---- ports ---- */

LSHM_EXPORT int lshm_socketpair(struct lshm_ctx *ctx, struct lshm_port **port, int *peer_sock)
{
    int sv[2], ret;

    if (ctx == NULL || port == NULL || peer_sock == NULL)
        return lshm__fail(-EINVAL, "NULL argument");
    if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv) < 0)
        return lshm__fail(-errno, "socketpair: %s", strerror(errno));
    if (fcntl(sv[0], F_SETFD, FD_CLOEXEC) < 0) {
        ret = lshm__fail(-errno, "fcntl: %s", strerror(errno));
        goto fail;
    }
    ret = lshm__port_new(ctx, sv[0], port);
    if (ret < 0)
        goto fail;
    *peer_sock = sv[1];
    return 0;
fail:
    close(sv[0]);
    close(sv[1]);
    return ret;
}

LSHM_EXPORT int lshm_port_adopt(struct lshm_ctx *ctx, int sock, struct lshm_port **port)
{
    if (ctx == NULL || port == NULL || sock < 0)
        return lshm__fail(-EINVAL, "NULL argument or negative fd");
    return lshm__port_new(ctx, sock, port);
}

LSHM_EXPORT void lshm_port_close(struct lshm_port *port)
{
    if (port == NULL || port->user_closed)
        return;
    lshm__port_release(port);
}

static unsigned port_events(struct lshm_port *port, unsigned events)
{
    unsigned now = 0;

    /* The handshake stays done once done, even after the port closed. */
    if ((events & LSHM_WAIT_READY) && port->peer_pid != 0)
        now |= LSHM_WAIT_READY;
    if ((events & LSHM_WAIT_SEND) && port->state != PORT_CLOSED &&
        port->sq_len + port->inflight < port->ctx->p.send_queue)
        now |= LSHM_WAIT_SEND;
    if ((events & LSHM_WAIT_SHM) && port->state == PORT_OPEN &&
        (port->shm_acked || lshm__port_shm_ready(port))) {
        port->shm_acked = false;
        now |= LSHM_WAIT_SHM;
    }
    if ((events & LSHM_WAIT_RECV) && port->rq_head != NULL)
        now |= LSHM_WAIT_RECV;
    if ((events & LSHM_WAIT_IDLE) && port->sq_head == NULL && port->inflight == 0)
        now |= LSHM_WAIT_IDLE;
    return now;
}

LSHM_EXPORT int lshm_port_wait(struct lshm_port *port, unsigned events, int timeout_ms)
{
    const unsigned all = LSHM_WAIT_READY | LSHM_WAIT_SEND | LSHM_WAIT_SHM |
                         LSHM_WAIT_RECV | LSHM_WAIT_IDLE;
    long long end = timeout_ms >= 0 ? lshm__now_ms() + timeout_ms : 0;
    bool polled = false;
    unsigned now;
    int ret;

    if (port == NULL || port->user_closed || events == 0 || (events & ~all))
        return lshm__fail(-EINVAL, "bad port or events");
    if (port->ctx == NULL)
        return lshm__fail(-EPIPE, "the port's context is gone");
    for (;;) {
        int step;

        now = port_events(port, events);
        if (now != 0)
            return (int)now;
        if (port->state == PORT_CLOSED)
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
        if ((events & LSHM_WAIT_SHM) && (step < 0 || step > SHM_RECHECK_MS))
            step = SHM_RECHECK_MS;
        polled = true;
        ret = lshm_ctx_run(port->ctx, step);
        if (ret < 0)
            return ret;
    }
}

LSHM_EXPORT int lshm_port_peer(const struct lshm_port *port, pid_t *pid, uid_t *uid, gid_t *gid)
{
    if (port == NULL)
        return lshm__fail(-EINVAL, "port is NULL");
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

LSHM_EXPORT const char *lshm_port_error(const struct lshm_port *port)
{
    if (port == NULL || port->state != PORT_CLOSED)
        return NULL;
    return port->reason;
}

LSHM_EXPORT int lshm_port_id(const struct lshm_port *port)
{
    if (port == NULL)
        return lshm__fail(-EINVAL, "port is NULL");
    return port->id;
}

LSHM_EXPORT int lshm_port_set_handler(struct lshm_port *port, lshm_msg_fn on_msg,
                                      lshm_close_fn on_close, void *arg)
{
    struct lshm_msg *msg;

    if (port == NULL || port->user_closed)
        return lshm__fail(-EINVAL, "bad port");
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
        lshm__port_list_add(port, PL_READY);
    return 0;
}

/* ---- buffers and tracking ---- */

static int port_ready_for_shm(struct lshm_port *port)
{
    if (port == NULL || port->user_closed)
        return lshm__fail(-EINVAL, "bad port");
    if (port->state == PORT_CLOSED)
        return lshm__fail(port->error ? port->error : -EPIPE, "port is closed: %s", port->reason);
    if (port->state != PORT_OPEN || port->ctx == NULL)
        return lshm__fail(-ENOTCONN, "handshake not complete");
    return 0;
}

static unsigned seg_limit(const struct lshm_port *port)
{
    unsigned limit = port->ctx->p.max_segments;

    return port->peer_max_segments < limit ? port->peer_max_segments : limit;
}

static int port_alloc(struct lshm_port *port, bool tracking, struct lshm_alloc *a)
{
    int ret;

    ret = lshm__peer_out_alloc(port->peer, port->id, seg_limit(port), tracking,
                              (port->ctx->p.flags & LSHM_CTX_SCRUB) != 0, a);
    if (ret == -EAGAIN)
        return ret;     /* the peer layer said why (limit, or a segment not mapped yet) */
    if (ret < 0)
        return lshm__fail(ret, "cannot allocate shared memory: %s", strerror(-ret));
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

LSHM_EXPORT int lshm_buf_alloc(struct lshm_port *port, size_t size, struct lshm_buf **buf)
{
    struct lshm_alloc a;
    int ret;

    if (buf == NULL)
        return lshm__fail(-EINVAL, "buf is NULL");
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

LSHM_EXPORT int lshm_tracking_new(struct lshm_port *port, uint32_t stream,
                                  struct lshm_tracking **out)
{
    struct lshm_tracking *t;
    struct lshm_alloc a;
    int ret;

    if (out == NULL || stream == 0)
        return lshm__fail(-EINVAL, "stream 0 cannot be tracked (0 marks a cancelled stream)");
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

LSHM_EXPORT bool lshm_tracking_cancel(struct lshm_tracking *t)
{
    bool cancelled;

    if (t == NULL)
        return false;
    /* Unit's race: whoever swaps the stream id to 0 wins; the loser gives
     * the slot back.  A tracking never sent has no other party. */
    cancelled = lshm__tracking_resolve(t->seg->hdr, t->slot, t->stream);
    if (cancelled && !t->sent)
        lshm__chunk_set_free(t->seg->hdr->free_tracking_map, t->slot);
    lshm__seg_unref(t->seg);
    free(t);
    return cancelled;
}

/* ---- messages ---- */

LSHM_EXPORT int lshm_send(struct lshm_port *port, const struct lshm_out *msg, unsigned flags)
{
    if (port == NULL || msg == NULL || port->user_closed || (flags & ~LSHM_MORE))
        return lshm__fail(-EINVAL, "bad port, message or flags");
    if (port->ctx == NULL)
        return lshm__fail(-EPIPE, "the port's context is gone");
    return lshm__port_send(port, msg, flags);
}

LSHM_EXPORT int lshm_recv(struct lshm_port *port, struct lshm_msg *msg, int timeout_ms)
{
    struct lshm_msg *m;
    int ret;

    if (port == NULL || msg == NULL || port->user_closed)
        return lshm__fail(-EINVAL, "bad port or message");
    if (port->on_msg != NULL)
        return lshm__fail(-EBUSY, "the port has a message handler");
    m = lshm__port_pop(port);
    if (m == NULL) {
        ret = lshm_port_wait(port, LSHM_WAIT_RECV, timeout_ms);
        if (ret < 0)
            return ret;
        m = lshm__port_pop(port);
        if (m == NULL)
            return lshm__fail(-EAGAIN, "no message");
    }
    *msg = *m;
    return 0;
}

LSHM_EXPORT void lshm_msg_done(struct lshm_msg *msg)
{
    struct lshm_msg copy;

    if (msg == NULL || msg->priv == NULL)
        return;
    /* A handler's msg is the library's own copy, freed by the release:
     * mark it done first, release through a copy. */
    copy = *msg;
    msg->priv = NULL;
    lshm__port_msg_done(&copy);
}
