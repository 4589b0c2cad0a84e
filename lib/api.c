/*
 * The public functions, in the order of linuxshm.h: each checks what the
 * caller passed, then hands over to the layer that does the work.
 */
#include <unistd.h>

#include "listen.h"
#include "payload.h"

#define CLOSE_DRAIN_MS 1000

/* What the context's run calls in the layers above it. */
static const struct lshm_ctx_ops ctx_ops = {
    .kick     = lshm__send_kick,
    .dispatch = lshm__port_dispatch,
    .sweep    = lshm__port_sweep,
    .expire   = lshm__port_expire,
    .accept   = lshm__listeners_dispatch,
    .poll     = lshm__recv_poll,
    .sleep    = lshm__recv_sleep,
    .events   = lshm__port_events,
};

/*
 * A context, and all that hangs on it, belongs to the thread that made it:
 * any other thread, or a forked child, gets -EPERM from every call (and a
 * call without a return value does nothing), before anything is touched.
 */
static int port_check(const struct lshm_port *port)
{
    return port->ctx == NULL ? 0 : lshm__ctx_check(port->ctx);
}

static int buf_check(const struct lshm_buf *buf)
{
    if (likely(buf->tid == lshm__thread_id()))
        return 0;
    return lshm__fail(-EPERM, "the buffer belongs to thread %d, not to this thread %d "
                              "(or to the parent of this forked child)",
                      (int)buf->tid, (int)lshm__thread_id());
}

/* ---- contexts ---- */

LSHM_EXPORT int lshm_ctx_new(struct lshm_ctx **ctx, const struct lshm_ctx_params *params)
{
    if (ctx == NULL)
        return lshm__fail(-EINVAL, "ctx is NULL");
    return lshm__ctx_new(ctx, params, &ctx_ops);
}

LSHM_EXPORT void lshm_ctx_free(struct lshm_ctx *ctx)
{
    if (ctx == NULL)
        return;
    if (lshm__ctx_is_copy(ctx)) {
        /* A forked child's copy: the ring, the sockets and the shared
         * state belong to the parent; release only our copies. */
        lshm__listeners_forget(ctx);
        lshm__ports_forget(ctx);
        lshm__ctx_forget(ctx);
        return;
    }
    if (lshm__ctx_check(ctx) < 0)
        return;     /* another thread's: it frees its own */
    lshm__listeners_close(ctx);
    lshm__ports_close(ctx);
    /* Give queued messages and BYEs a bounded time to go out, and the
     * drains after them (LSHM_DRAIN_MS each) a chance to end. */
    lshm__ctx_linger(ctx, lshm__ports_closing, CLOSE_DRAIN_MS);
    lshm__ports_hang_up(ctx);
    lshm__ctx_stop(ctx);
    lshm__listeners_reap(ctx);
    lshm__ports_reap(ctx);
    lshm__ctx_free(ctx);
}

LSHM_EXPORT int lshm_ctx_fd(const struct lshm_ctx *ctx)
{
    if (ctx == NULL)
        return lshm__fail(-EINVAL, "ctx is NULL");
    return lshm__ctx_fd(ctx);
}

LSHM_EXPORT int lshm_ctx_run(struct lshm_ctx *ctx, int timeout_ms)
{
    int ret;

    if (ctx == NULL)
        return lshm__fail(-EINVAL, "ctx is NULL");
    ret = lshm__ctx_check(ctx);
    if (ret < 0)
        return ret;
    return lshm__ctx_run(ctx, timeout_ms);
}

LSHM_EXPORT unsigned lshm_ctx_features(const struct lshm_ctx *ctx)
{
    return ctx == NULL ? 0 : lshm__ctx_features(ctx);
}

LSHM_EXPORT const char *lshm_ctx_carrier(const struct lshm_ctx *ctx)
{
    return ctx == NULL ? "" : lshm__ctx_carrier(ctx);
}

LSHM_EXPORT int lshm_ctx_stats(const struct lshm_ctx *ctx, struct lshm_ctx_stats *stats)
{
    if (ctx == NULL || stats == NULL)
        return lshm__fail(-EINVAL, "NULL argument");
    if (lshm__ctx_check(ctx) < 0)
        return -EPERM;
    lshm__ctx_stats(ctx, stats);
    return 0;
}

/* lshm_last_error() is error.c's: the layers below read it too. */

#define STR2(x) #x
#define STR(x) STR2(x)

LSHM_EXPORT const char *lshm_version(void)
{
    return STR(LSHM_VERSION_MAJOR) "." STR(LSHM_VERSION_MINOR) "." STR(LSHM_VERSION_PATCH);
}

/* ---- ports ---- */

LSHM_EXPORT int lshm_socketpair(struct lshm_ctx *ctx, struct lshm_port **port, int *peer_sock)
{
    int sv[2], ret;

    if (ctx == NULL || port == NULL || peer_sock == NULL)
        return lshm__fail(-EINVAL, "NULL argument");
    ret = lshm__ctx_check(ctx);
    if (ret < 0)
        return ret;
    ret = lshm__sock_pair(sv);
    if (ret < 0)
        return ret;
    ret = lshm__port_new(ctx, sv[0], port);
    if (ret < 0) {
        close(sv[0]);
        close(sv[1]);
        return ret;
    }
    lshm__port_start(*port);
    *peer_sock = sv[1];
    return 0;
}

LSHM_EXPORT int lshm_port_adopt(struct lshm_ctx *ctx, int sock, struct lshm_port **port)
{
    int ret;

    if (ctx == NULL || port == NULL || sock < 0)
        return lshm__fail(-EINVAL, "NULL argument or negative fd");
    ret = lshm__ctx_check(ctx);
    if (ret < 0)
        return ret;
    ret = lshm__port_new(ctx, sock, port);
    if (ret < 0)
        return ret;
    lshm__port_start(*port);
    return 0;
}

LSHM_EXPORT int lshm_connect(struct lshm_ctx *ctx, const char *path, int timeout_ms,
                             struct lshm_port **port)
{
    int ret;

    if (ctx == NULL || port == NULL)
        return lshm__fail(-EINVAL, "NULL argument");
    ret = lshm__ctx_check(ctx);
    if (ret < 0)
        return ret;
    return lshm__connect(ctx, path, timeout_ms, port);
}

LSHM_EXPORT void lshm_port_close(struct lshm_port *port)
{
    if (port == NULL || port->user_closed || port_check(port) < 0)
        return;
    lshm__port_close(port);
}

LSHM_EXPORT int lshm_listen(struct lshm_ctx *ctx, const char *path, int mode,
                            struct lshm_listener **listener)
{
    int ret;

    if (ctx == NULL || listener == NULL || mode < 0 || mode > 0777)
        return lshm__fail(-EINVAL, "bad context, listener or mode");
    ret = lshm__ctx_check(ctx);
    if (ret < 0)
        return ret;
    return lshm__listen(ctx, path, mode ? (mode_t)mode : 0600, listener);
}

LSHM_EXPORT int lshm_accept(struct lshm_listener *listener, struct lshm_port **port,
                            int timeout_ms)
{
    int ret;

    if (port == NULL)
        return lshm__fail(-EINVAL, "bad listener");
    ret = lshm__listener_check(listener, true);
    if (ret < 0)
        return ret;
    return lshm__accept(listener, port, timeout_ms);
}

LSHM_EXPORT void lshm_listener_close(struct lshm_listener *listener)
{
    if (lshm__listener_check(listener, false) < 0)
        return;
    lshm__listener_close(listener);
}

LSHM_EXPORT int lshm_port_wait(struct lshm_port *port, unsigned events, int timeout_ms)
{
    const unsigned all = LSHM_WAIT_READY | LSHM_WAIT_SEND | LSHM_WAIT_SHM |
                         LSHM_WAIT_RECV | LSHM_WAIT_IDLE;

    int ret;

    if (port == NULL || port->user_closed || events == 0 || (events & ~all))
        return lshm__fail(-EINVAL, "bad port or events");
    ret = port_check(port);
    if (ret < 0)
        return ret;
    return lshm__port_wait(port, events, timeout_ms);
}

LSHM_EXPORT int lshm_port_peer(const struct lshm_port *port, pid_t *pid, uid_t *uid, gid_t *gid)
{
    int ret;

    if (port == NULL)
        return lshm__fail(-EINVAL, "port is NULL");
    ret = port_check(port);
    if (ret < 0)
        return ret;
    return lshm__port_peer(port, pid, uid, gid);
}

LSHM_EXPORT const char *lshm_port_error(const struct lshm_port *port)
{
    return port == NULL ? NULL : lshm__port_error(port);
}

LSHM_EXPORT int lshm_port_id(const struct lshm_port *port)
{
    int ret;

    if (port == NULL)
        return lshm__fail(-EINVAL, "port is NULL");
    ret = port_check(port);
    if (ret < 0)
        return ret;
    return port->id;
}

LSHM_EXPORT int lshm_port_stats(const struct lshm_port *port, struct lshm_port_stats *stats)
{
    if (port == NULL || stats == NULL)
        return lshm__fail(-EINVAL, "port or stats is NULL");
    if (port_check(port) < 0)
        return -EPERM;
    *stats = port->stats;
    return 0;
}

/* ---- shared-memory buffers ---- */

LSHM_EXPORT int lshm_buf_alloc(struct lshm_port *port, size_t size, struct lshm_buf **buf)
{
    int ret;

    if (buf == NULL)
        return lshm__fail(-EINVAL, "buf is NULL");
    if (port == NULL || port->user_closed)
        return lshm__fail(-EINVAL, "bad port");
    ret = port_check(port);
    if (ret < 0)
        return ret;
    return lshm__port_buf_alloc(port, size, buf);
}

LSHM_EXPORT int lshm_buf_grow(struct lshm_buf *buf, size_t size, size_t min_size)
{
    if (buf != NULL && buf_check(buf) < 0)
        return -EPERM;
    return lshm__buf_grow(buf, size, min_size);
}

LSHM_EXPORT void *lshm_buf_data(struct lshm_buf *buf)
{
    if (buf != NULL && buf_check(buf) < 0)
        return NULL;
    return lshm__buf_data(buf);
}

LSHM_EXPORT size_t lshm_buf_capacity(const struct lshm_buf *buf)
{
    if (buf != NULL && buf_check(buf) < 0)
        return 0;
    return lshm__buf_capacity(buf);
}

LSHM_EXPORT int lshm_buf_set_size(struct lshm_buf *buf, size_t size)
{
    if (buf != NULL && buf_check(buf) < 0)
        return -EPERM;
    return lshm__buf_set_size(buf, size);
}

LSHM_EXPORT void lshm_buf_free(struct lshm_buf *buf)
{
    if (buf != NULL && buf_check(buf) < 0)
        return;
    lshm__buf_free(buf);
}

/* ---- whole payloads ---- */

/* Every piece present and this thread's. */
static int bufs_check(struct lshm_buf *const *bufs, unsigned n)
{
    unsigned i;

    if (bufs == NULL || n == 0 || n > LSHM_MAX_DESCS)
        return lshm__fail(-EINVAL, "bufs is NULL, or nbufs %u not 1 to %u", n, LSHM_MAX_DESCS);
    for (i = 0; i < n; i++) {
        if (bufs[i] == NULL || bufs[i]->sent)
            return lshm__fail(-EINVAL, "buffer %u is NULL or was sent", i);
        if (buf_check(bufs[i]) < 0)
            return -EPERM;
    }
    return 0;
}

LSHM_EXPORT int lshm_bufs_alloc(struct lshm_port *port, size_t size, int timeout_ms,
                                struct lshm_buf **bufs, unsigned *nbufs)
{
    int ret;

    if (bufs == NULL || nbufs == NULL)
        return lshm__fail(-EINVAL, "bufs or nbufs is NULL");
    *nbufs = 0;
    if (port == NULL || port->user_closed)
        return lshm__fail(-EINVAL, "bad port");
    ret = port_check(port);
    if (ret < 0)
        return ret;
    if (size == 0 || size > (size_t)LSHM_MAX_DESCS * LSHM_DATA_SIZE)
        return lshm__fail(-EMSGSIZE, "a payload of %zu bytes: 1 to %u pieces of at most "
                          "%u bytes", size, LSHM_MAX_DESCS, LSHM_DATA_SIZE);
    return lshm__bufs_alloc(port, size, timeout_ms, bufs, nbufs);
}

LSHM_EXPORT size_t lshm_bufs_iov(struct lshm_buf *const *bufs, unsigned nbufs,
                                 struct iovec *iov)
{
    if (iov == NULL || bufs_check(bufs, nbufs) < 0)
        return 0;
    lshm__bufs_iov(bufs, nbufs, iov);
    return lshm__bufs_size(bufs, nbufs);
}

LSHM_EXPORT int lshm_bufs_copy_in(struct lshm_buf *const *bufs, unsigned nbufs, size_t off,
                                  const void *src, size_t len)
{
    size_t total;
    int ret = bufs_check(bufs, nbufs);

    if (ret < 0)
        return ret;
    total = lshm__bufs_size(bufs, nbufs);
    if (off > total || len > total - off)
        return lshm__fail(-ERANGE, "%zu bytes at offset %zu: the payload holds %zu",
                          len, off, total);
    if (src == NULL && len > 0)
        return lshm__fail(-EINVAL, "src is NULL");
    lshm__bufs_copy_in(bufs, nbufs, off, src, len);
    return 0;
}

LSHM_EXPORT void lshm_bufs_free(struct lshm_buf **bufs, unsigned nbufs)
{
    if (nbufs == 0 || bufs_check(bufs, nbufs) < 0)
        return;
    lshm__bufs_free(bufs, nbufs);
}

/* ---- sending ---- */

LSHM_EXPORT int lshm_send(struct lshm_port *port, const struct lshm_out *msg, unsigned flags)
{
    int ret;

    if (port == NULL || msg == NULL || port->user_closed || (flags & ~LSHM_MORE))
        return lshm__fail(-EINVAL, "bad port, message or flags");
    if (port->ctx == NULL)
        return lshm__fail(-EPIPE, "the port's context is gone");
    ret = lshm__ctx_check(port->ctx);
    if (ret < 0)
        return ret;
    return lshm__send(port, msg, flags);
}

LSHM_EXPORT int lshm_flush(struct lshm_ctx *ctx)
{
    int ret;

    if (ctx == NULL)
        return lshm__fail(-EINVAL, "ctx is NULL");
    ret = lshm__ctx_check(ctx);
    if (ret < 0)
        return ret;
    return lshm__ctx_flush(ctx);
}

/* ---- receiving ---- */

LSHM_EXPORT int lshm_port_set_handler(struct lshm_port *port, lshm_msg_fn on_msg,
                                      lshm_close_fn on_close, void *arg)
{
    int ret;

    if (port == NULL || port->user_closed)
        return lshm__fail(-EINVAL, "bad port");
    ret = port_check(port);
    if (ret < 0)
        return ret;
    return lshm__port_set_handler(port, on_msg, on_close, arg);
}

LSHM_EXPORT int lshm_port_set_event_handler(struct lshm_port *port, lshm_event_fn on_event,
                                            void *arg)
{
    if (port == NULL || port->user_closed)
        return lshm__fail(-EINVAL, "port is NULL or closed");
    if (port_check(port) < 0)
        return -EPERM;
    lshm__port_set_event_handler(port, on_event, arg);
    return 0;
}

LSHM_EXPORT int lshm_listener_set_handler(struct lshm_listener *listener,
                                          lshm_accept_fn on_accept, void *arg)
{
    int ret = lshm__listener_check(listener, false);

    if (ret < 0)
        return ret;
    lshm__listener_set_handler(listener, on_accept, arg);
    return 0;
}

LSHM_EXPORT int lshm_recv(struct lshm_port *port, struct lshm_msg *msg, int timeout_ms)
{
    int ret;

    if (port == NULL || msg == NULL || port->user_closed)
        return lshm__fail(-EINVAL, "bad port or message");
    ret = port_check(port);
    if (ret < 0)
        return ret;
    if (port->on_msg != NULL)
        return lshm__fail(-EBUSY, "the port has a message handler");
    return lshm__recv(port, msg, timeout_ms);
}

LSHM_EXPORT void lshm_msg_done(struct lshm_msg *msg)
{
    struct lshm_msg copy;

    if (msg == NULL || msg->priv == NULL)
        return;
    if (msg->port != NULL && port_check(msg->port) < 0)
        return;     /* the chunks stay with the owner's copy */
    /* A handler's msg is the library's own copy, freed by the release:
     * mark it done first, release through a copy. */
    copy = *msg;
    msg->priv = NULL;
    lshm__recv_done(&copy);
}

/* ---- tracking ---- */

LSHM_EXPORT int lshm_tracking_new(struct lshm_port *port, uint32_t stream,
                                  struct lshm_tracking **t)
{
    int ret;

    if (t == NULL || stream == 0)
        return lshm__fail(-EINVAL, "stream 0 cannot be tracked (0 marks a cancelled stream)");
    if (port == NULL || port->user_closed)
        return lshm__fail(-EINVAL, "bad port");
    ret = port_check(port);
    if (ret < 0)
        return ret;
    return lshm__port_tracking_new(port, stream, t);
}

LSHM_EXPORT bool lshm_tracking_cancel(struct lshm_tracking *t)
{
    if (t == NULL || port_check(t->port) < 0)
        return false;
    return lshm__tracking_cancel(t);
}

/* ---- what the kernel offers ---- */

LSHM_EXPORT int lshm_probe(struct lshm_probe *out)
{
    if (out == NULL)
        return lshm__fail(-EINVAL, "lshm_probe: out is NULL");
    return lshm__probe(out);
}
