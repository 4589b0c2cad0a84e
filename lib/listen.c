/*
 * Listening sockets and connecting to them.  Accept and connect are ring
 * operations like every other socket operation.  An accepted port is shown
 * to the caller once its handshake ends: the port tells its listener
 * through a callback (lshm__port_set_owner).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "listen.h"

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

static void listener_arm(struct lshm_listener *l)
{
    if (l->armed || l->closing)
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
        if (!l->armed)
            listener_free(l);
        return;
    }
    if (res >= 0) {
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
    if (l->closing && !l->armed) {
        listener_free(l);
        return;
    }
    listener_arm(l);
}

int lshm__listen(struct lshm_ctx *ctx, const char *path, mode_t mode,
                 struct lshm_listener **out)
{
    struct lshm_listener *l;
    struct sockaddr_un sun;
    int fd, ret;

    ret = lshm__sock_addr(path, &sun);
    if (ret < 0)
        return ret;
    ret = lshm__sock_listen(&sun, mode, &fd);
    if (ret < 0)
        return ret;
    l = calloc(1, sizeof(*l));
    if (l == NULL || (l->path = strdup(path)) == NULL) {
        free(l);
        unlink(path);
        close(fd);
        return lshm__fail(-ENOMEM, "out of memory");
    }
    l->ctx = ctx;
    l->fd = fd;
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
        unlink(l->path);
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
    if (l->armed) {
        /* The accept in flight still points at l: free it at its end. */
        shutdown(l->fd, SHUT_RDWR);
        lshm__ring_cancel(l->ctx->ring, &l->op);
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
            unlink(l->path);
        l->armed = false;
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

struct connect_op {
    struct lshm_op op;
    bool           done;
    int            res;
};

static void connect_done(struct lshm_op *op, int res, bool more, void *buf, unsigned len)
{
    struct connect_op *c = (struct connect_op *)op;

    c->done = true;
    c->res = res;
}

int lshm__connect(struct lshm_ctx *ctx, const char *path, int timeout_ms,
                  struct lshm_port **out)
{
    struct connect_op c = { .op.complete = connect_done };
    struct sockaddr_un sun;
    struct lshm_port *port;
    int fd, ret;

    ret = lshm__sock_addr(path, &sun);
    if (ret < 0)
        return ret;
    fd = lshm__sock_new();
    if (fd < 0)
        return fd;
    ret = lshm__ring_connect(ctx->ring, fd, (struct sockaddr *)&sun, sizeof(sun), &c.op);
    if (ret < 0)
        goto fail;
    /* Only this operation points at the stack: wait for it whatever else
     * completes meanwhile. */
    while (!c.done) {
        ret = lshm__ctx_step(ctx, -1);
        if (ret < 0 && ret != -EINTR)
            goto fail_wait;
    }
    if (c.res < 0) {
        ret = lshm__fail(c.res, "connect %s: %s", path, strerror(-c.res));
        goto fail;
    }
    ret = lshm__port_new(ctx, fd, &port);
    if (ret < 0)
        goto fail;
    lshm__port_start(port);
    ret = lshm__port_wait(port, LSHM_WAIT_READY, timeout_ms);
    if (ret < 0) {
        /* The wait's text, before closing can write another. */
        char why[256];

        snprintf(why, sizeof(why), "%s", lshm__error_text());
        lshm__port_close(port);
        return lshm__fail(ret, "handshake with %s failed: %s", path, why);
    }
    *out = port;
    return 0;
fail_wait:
    /* Can't leave c on the stack with the ring still holding it. */
    close(fd);
    while (!c.done && lshm__ctx_step(ctx, 100) >= 0)
        ;
    return ret;
fail:
    close(fd);
    return ret;
}
