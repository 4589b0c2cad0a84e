/*
 * Listening sockets and connecting to them.  Accept and connect are ring
 * operations like every other socket operation.  An accepted port is shown
 * to the caller once its handshake ends: the port tells its listener
 * through a callback (lshm__port_set_owner).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "listen.h"

struct lshm_listener {
    struct lshm_ctx      *ctx;
    struct lshm_listener *next, *prev;
    int                   fd;
    char                 *path;
    struct lshm_sock_file own;          /* the file path named when bound */
    struct lshm_op        op;
    bool                  armed;
    bool                  closing;
    /* Out of fds (or memory), accept(2) fails while a client waits: retry
     * on a timer, backing off, rather than at once. */
    struct lshm_op        retry_op;
    bool                  retry_armed;
    unsigned              backoff_ms;   /* the next retry's delay; 0: none pending */
    int                   error;        /* the last accept's failure, or 0 */
    struct lshm_port    **ready;        /* accepted, waiting for lshm_accept */
    unsigned              nready, capready;
    lshm_accept_fn        on_accept;
    void                 *arg;
};

static void listener_unlink(struct lshm_listener *l)
{
    if (l->prev != NULL)
        l->prev->next = l->next;
    else if (l->ctx != NULL && l->ctx->listeners == l)
        l->ctx->listeners = l->next;
    if (l->next != NULL)
        l->next->prev = l->prev;
    l->next = l->prev = NULL;
}

static void listener_free(struct lshm_listener *l)
{
    listener_unlink(l);
    free(l->ready);
    if (l->fd >= 0)
        lshm__ring_close(l->ctx->ring, l->fd);
    free(l->path);
    free(l);
}

/* Both its operations ended: nothing in the ring points at l any more. */
static bool listener_idle(const struct lshm_listener *l)
{
    return !l->armed && !l->retry_armed;
}

static void listener_arm(struct lshm_listener *l)
{
    if (l->armed || l->retry_armed || l->closing)
        return;
    if (lshm__ring_accept(l->ctx->ring, l->fd, &l->op, true) == 0)
        l->armed = true;
}

/* A port accepted on owner ended its handshake: hand it to the caller. */
static void port_ready(void *owner, struct lshm_port *port)
{
    struct lshm_listener *l = owner;

    if (l->nready == l->capready) {
        unsigned cap = l->capready * 2 + 4;
        struct lshm_port **ready = realloc(l->ready, cap * sizeof(*ready));

        if (ready == NULL) {
            /* Out of memory: the connection is refused, not lost silently. */
            lshm__port_close(port);
            return;
        }
        l->ready = ready;
        l->capready = cap;
    }
    l->ready[l->nready++] = port;
}

#define BACKOFF_MIN_MS 10u
#define BACKOFF_MAX_MS 500u

/* Is this accept failure one of the process's limits (fds, memory)? */
static bool is_resource_error(int res)
{
    return res == -EMFILE || res == -ENFILE || res == -ENOBUFS || res == -ENOMEM;
}

static void retry_done(struct lshm_op *op, int res, bool more, void *buf, unsigned len)
{
    struct lshm_listener *l = (struct lshm_listener *)((char *)op -
                                                       offsetof(struct lshm_listener, retry_op));

    l->retry_armed = false;
    if (l->closing) {
        if (listener_idle(l))
            listener_free(l);
        return;
    }
    listener_arm(l);
}

/* accept(2) failed for want of a resource: try again after a pause that
 * doubles up to BACKOFF_MAX_MS, and say so once per failure kind. */
static void accept_back_off(struct lshm_listener *l, int res)
{
    if (l->error != res) {
        struct rlimit rl = { 0, 0 };

        getrlimit(RLIMIT_NOFILE, &rl);
        lshm__log("accept on %s failed: %s (RLIMIT_NOFILE %llu); retrying every %u ms at most",
                  l->path, strerror(-res), (unsigned long long)rl.rlim_cur, BACKOFF_MAX_MS);
    }
    l->error = res;
    l->backoff_ms = l->backoff_ms == 0 ? BACKOFF_MIN_MS
                  : l->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : l->backoff_ms * 2;
    if (l->armed) {
        /* A multishot accept still armed: stop it, the timer re-arms. */
        lshm__ring_cancel(l->ctx->ring, &l->op);
    }
    l->retry_op.complete = retry_done;
    /* The ring keeps one timespec for timeouts, read at submission:
     * submit what is queued before and this one at once. */
    lshm__ring_submit(l->ctx->ring);
    if (lshm__ring_timeout(l->ctx->ring, l->backoff_ms, &l->retry_op) == 0)
        l->retry_armed = true;
    lshm__ring_submit(l->ctx->ring);
}

static void accept_done(struct lshm_op *op, int res, bool more, void *buf, unsigned len)
{
    struct lshm_listener *l = (struct lshm_listener *)((char *)op -
                                                       offsetof(struct lshm_listener, op));
    struct lshm_port *port;

    if (!more)
        l->armed = false;
    if (l->closing) {
        if (res >= 0)
            close(res);
        if (listener_idle(l))
            listener_free(l);
        return;
    }
    if (is_resource_error(res)) {
        if (!l->retry_armed)
            accept_back_off(l, res);
        return;
    }
    if (res >= 0) {
        l->error = 0;
        l->backoff_ms = 0;
        /* The caller sees the port once its handshake is done (port_ready);
         * one that leaves before is never shown. */
        if (lshm__port_new(l->ctx, res, &port) < 0) {
            close(res);
        } else {
            lshm__port_start(port);
            lshm__port_set_owner(port, port_ready, l,
                                 lshm__now_ms() + l->ctx->p.handshake_ms);
        }
    } else if (res != -ECANCELED && res != -EINTR && res != -ECONNABORTED && res != -EAGAIN) {
        lshm__log("accept on %s failed: %s", l->path, strerror(-res));
    }
    listener_arm(l);
}

int lshm__listen(struct lshm_ctx *ctx, const char *path, mode_t mode,
                 struct lshm_listener **out)
{
    struct lshm_listener *l;
    struct lshm_sock_file own;
    struct sockaddr_un sun;
    int fd, ret;

    ret = lshm__sock_addr(path, &sun);
    if (ret < 0)
        return ret;
    ret = lshm__sock_listen(&sun, mode, &fd, &own);
    if (ret < 0)
        return ret;
    l = calloc(1, sizeof(*l));
    if (l == NULL || (l->path = strdup(path)) == NULL) {
        free(l);
        lshm__sock_unlink_own(path, &own);
        close(fd);
        return lshm__fail(-ENOMEM, "out of memory");
    }
    l->ctx = ctx;
    l->fd = fd;
    l->own = own;
    l->op.complete = accept_done;
    l->next = ctx->listeners;
    if (ctx->listeners != NULL)
        ctx->listeners->prev = l;
    ctx->listeners = l;
    listener_arm(l);
    lshm__ring_submit(ctx->ring);
    *out = l;
    return 0;
}

static void listener_dispatch(struct lshm_listener *l)
{
    while (l->on_accept != NULL && !l->closing && l->nready > 0) {
        struct lshm_port *port = l->ready[0];

        memmove(l->ready, l->ready + 1, --l->nready * sizeof(*l->ready));
        l->on_accept(l, port, l->arg);
    }
}

void lshm__listeners_dispatch(struct lshm_ctx *ctx)
{
    struct lshm_listener *l, *lnext;

    for (l = ctx->listeners; l != NULL; l = lnext) {
        lnext = l->next;
        listener_dispatch(l);
    }
}

int lshm__listener_check(const struct lshm_listener *l, bool accepting)
{
    if (l == NULL || l->closing)
        return lshm__fail(-EINVAL, "bad listener");
    if (lshm__ctx_check(l->ctx) < 0)
        return -EPERM;
    if (accepting && l->on_accept != NULL)
        return lshm__fail(-EBUSY, "the listener has an accept handler");
    return 0;
}

void lshm__listener_set_handler(struct lshm_listener *l, lshm_accept_fn on_accept, void *arg)
{
    l->on_accept = on_accept;
    l->arg = arg;
    listener_dispatch(l);
}

int lshm__accept(struct lshm_listener *l, struct lshm_port **port, int timeout_ms)
{
    long long end = lshm__now_ms() + timeout_ms;
    int ret;

    while (l->nready == 0) {
        int step = -1;

        if (timeout_ms >= 0) {
            long long left = end - lshm__now_ms();

            if (left <= 0 && l->error != 0)
                return lshm__fail(l->error, "no connection accepted within %d ms: accept "
                                  "fails with \"%s\" (RLIMIT_NOFILE, or the system's file "
                                  "table); it is retried until fds are free", timeout_ms,
                                  strerror(-l->error));
            if (left <= 0)
                return lshm__fail(-ETIMEDOUT, "no connection within %d ms", timeout_ms);
            step = (int)left;
        }
        ret = lshm__ctx_run(l->ctx, step);
        if (ret < 0)
            return ret;
    }
    *port = l->ready[0];
    memmove(l->ready, l->ready + 1, --l->nready * sizeof(*l->ready));
    return 0;
}

void lshm__listener_close(struct lshm_listener *l)
{
    struct lshm_port *port, *next;
    unsigned i;

    l->closing = true;
    if (l->path != NULL)
        lshm__sock_unlink_own(l->path, &l->own);
    /* Accepted, never taken: their peers get a BYE. */
    for (i = 0; i < l->nready; i++)
        if (!l->ready[i]->user_closed)
            lshm__port_close(l->ready[i]);
    l->nready = 0;
    for (port = l->ctx->ports; port != NULL; port = next) {
        next = port->next;
        if (port->owner == l) {
            lshm__port_disown(port);
            if (!port->user_closed)
                lshm__port_close(port);
        }
    }
    if (!listener_idle(l)) {
        /* An accept or a retry timer in flight still points at l: free it
         * at their end. */
        shutdown(l->fd, SHUT_RDWR);
        if (l->armed)
            lshm__ring_cancel(l->ctx->ring, &l->op);
        if (l->retry_armed)
            lshm__ring_cancel(l->ctx->ring, &l->retry_op);
        lshm__ring_submit(l->ctx->ring);
        return;
    }
    listener_free(l);
}

void lshm__listeners_close(struct lshm_ctx *ctx)
{
    struct lshm_listener *l, *lnext;

    for (l = ctx->listeners; l != NULL; l = lnext) {
        lnext = l->next;
        if (!l->closing)
            lshm__listener_close(l);
    }
}

/* The context is going away and its ring is gone: nothing is in flight. */
void lshm__listeners_reap(struct lshm_ctx *ctx)
{
    struct lshm_listener *l;

    while ((l = ctx->listeners) != NULL) {
        if (!l->closing && l->path != NULL)
            lshm__sock_unlink_own(l->path, &l->own);
        l->armed = false;
        l->retry_armed = false;
        listener_free(l);
    }
}

/* A forked child's copy: close our fds, leave the path to the parent. */
void lshm__listeners_forget(struct lshm_ctx *ctx)
{
    struct lshm_listener *l;

    /* Their accepted ports are in the context's list: forgotten there. */
    while ((l = ctx->listeners) != NULL) {
        listener_unlink(l);
        free(l->ready);
        if (l->fd >= 0)
            close(l->fd);
        free(l->path);
        free(l);
    }
}

/* A connect in flight.  It lives on the heap: a connect the kernel does
 * not let go of in time is abandoned, and frees itself when it ends. */
struct connect_op {
    struct lshm_op op;
    bool           done;
    bool           abandoned;
    int            res;
};

static void connect_done(struct lshm_op *op, int res, bool more, void *buf, unsigned len)
{
    struct connect_op *c = (struct connect_op *)op;

    if (c->abandoned) {
        free(c);
        return;
    }
    c->done = true;
    c->res = res;
}

/* Milliseconds left until end (end 0: no limit, -1). */
static int left_ms(long long end)
{
    long long left;

    if (end == 0)
        return -1;
    left = end - lshm__now_ms();
    return left <= 0 ? 0 : left > INT32_MAX ? INT32_MAX : (int)left;
}

/* A server that is alive but does not accept, its backlog full, keeps a
 * connect(2) waiting: the kernel bounds that wait by SO_SNDTIMEO (and the
 * sends after it, so it is taken off again: -1). */
static void bound_connect(int fd, int timeout_ms)
{
    struct timeval tv = { 0, 0 };

    if (timeout_ms >= 0) {
        tv.tv_sec = timeout_ms / 1000;
        tv.tv_usec = timeout_ms % 1000 * 1000;
        if (timeout_ms == 0)
            tv.tv_usec = 1000;      /* 0 would mean no limit */
    }
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

/* Wait for c within end; on time out cancel it, and give the cancel a
 * moment before c is abandoned.  0, or -ETIMEDOUT with c abandoned. */
static int connect_wait(struct lshm_ctx *ctx, struct connect_op *c, long long end)
{
    long long stop;

    while (!c->done) {
        int step = left_ms(end);

        if (step == 0)
            break;
        lshm__ctx_step(ctx, step);
    }
    if (c->done)
        return 0;
    lshm__ring_cancel(ctx->ring, &c->op);
    stop = lshm__now_ms() + 100;
    while (!c->done && lshm__now_ms() < stop)
        lshm__ctx_step(ctx, 10);
    if (c->done)
        return c->res == -ECANCELED || c->res == -EINTR ? -ETIMEDOUT : 0;
    c->abandoned = true;
    return -ETIMEDOUT;
}

int lshm__connect(struct lshm_ctx *ctx, const char *path, int timeout_ms,
                  struct lshm_port **out)
{
    long long end = timeout_ms >= 0 ? lshm__now_ms() + timeout_ms : 0;
    struct connect_op *c;
    struct sockaddr_un sun;
    struct lshm_port *port;
    int fd, ret, res;

    ret = lshm__sock_addr(path, &sun);
    if (ret < 0)
        return ret;
    c = calloc(1, sizeof(*c));
    if (c == NULL)
        return lshm__fail(-ENOMEM, "out of memory");
    c->op.complete = connect_done;
    fd = lshm__sock_new();
    if (fd < 0) {
        free(c);
        return fd;
    }
    if (timeout_ms >= 0)
        bound_connect(fd, timeout_ms);
    ret = lshm__ring_connect(ctx->ring, fd, (struct sockaddr *)&sun, sizeof(sun), &c->op);
    if (ret < 0) {
        free(c);
        close(fd);
        return lshm__fail(ret, "connect %s: no room in the ring", path);
    }
    ret = connect_wait(ctx, c, end);
    res = c->res;
    if (!c->abandoned)
        free(c);
    if (ret == 0 && res == -EAGAIN)
        ret = -ETIMEDOUT;   /* SO_SNDTIMEO ran out */
    if (ret == -ETIMEDOUT) {
        close(fd);
        return lshm__fail(-ETIMEDOUT, "connect %s: not accepted within %d ms (the server is "
                          "alive but not accepting: its backlog is full)", path, timeout_ms);
    }
    if (res < 0) {
        close(fd);
        return lshm__fail(res, "connect %s: %s", path, strerror(-res));
    }
    bound_connect(fd, -1);
    ret = lshm__port_new(ctx, fd, &port);
    if (ret < 0) {
        close(fd);
        return ret;
    }
    lshm__port_start(port);
    ret = lshm__port_wait(port, LSHM_WAIT_READY, left_ms(end));
    if (ret < 0) {
        /* The wait's text, before closing can write another. */
        char why[256];

        snprintf(why, sizeof(why), "%s", lshm__error_text());
        lshm__port_close(port);
        return lshm__fail(ret, "handshake with %s failed: %s", path, why);
    }
    *out = port;
    return 0;
}
