/*
 * Listening sockets and connecting to them.  Accept and connect are ring
 * operations like every other socket operation.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "port.h"

static int fill_addr(const char *path, struct sockaddr_un *sun)
{
    size_t len;

    if (path == NULL || path[0] == '\0')
        return lshm__fail(-EINVAL, "empty socket path");
    len = strlen(path);
    if (len >= sizeof(sun->sun_path))
        return lshm__fail(-ENAMETOOLONG, "socket path of %zu bytes, at most %zu", len,
                         sizeof(sun->sun_path) - 1);
    memset(sun, 0, sizeof(*sun));
    sun->sun_family = AF_UNIX;
    memcpy(sun->sun_path, path, len + 1);
    return 0;
}

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
        /* The caller sees the port once its handshake is done
         * (lshm__listener_ready); one that leaves before is never shown. */
        if (lshm__port_new(l->ctx, res, &port) < 0) {
            close(res);
        } else {
            port->listener = l;
            port->due = lshm__now_ms() + l->ctx->p.handshake_ms;
            lshm__ctx_due(l->ctx, &l->ctx->hs_timer, port->due);
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

/* Is someone accepting on this path?  A dead server's socket refuses. */
static bool socket_is_live(const struct sockaddr_un *sun)
{
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    bool live;

    if (fd < 0)
        return true;
    /* Only ECONNREFUSED (or the file gone) means nobody is there: a live
     * server of another socket type answers EPROTOTYPE, and its socket is
     * not ours to take. */
    live = connect(fd, (const struct sockaddr *)sun, sizeof(*sun)) == 0 ||
           (errno != ECONNREFUSED && errno != ENOENT);
    close(fd);
    return live;
}

/*
 * Bind and listen under a temporary name beside path, set the mode, then
 * link the socket to path: the path appears only once a server listens on
 * it, with its final mode, and an existing path (a server that won a race)
 * is never replaced.  umask(2) is left alone: it belongs to the process.
 */
static int bind_listening(int fd, const struct sockaddr_un *sun, mode_t mode)
{
    const char *path = sun->sun_path;
    struct sockaddr_un tmp = *sun;
    int n, ret;

    n = snprintf(tmp.sun_path, sizeof(tmp.sun_path), "%s.%d.tmp", path, (int)getpid());
    if (n < 0 || (size_t)n >= sizeof(tmp.sun_path))
        tmp = *sun;     /* no room for a longer name: bind in place */
    unlink(tmp.sun_path);
    if (bind(fd, (const struct sockaddr *)&tmp, sizeof(tmp)) < 0)
        return lshm__fail(-errno, "bind %s: %s", tmp.sun_path, strerror(errno));
    if (chmod(tmp.sun_path, mode) < 0 || listen(fd, 128) < 0) {
        ret = lshm__fail(-errno, "listen %s: %s", path, strerror(errno));
        unlink(tmp.sun_path);
        return ret;
    }
    if (strcmp(tmp.sun_path, path) == 0)
        return 0;
    ret = link(tmp.sun_path, path) < 0 ? -errno : 0;
    if (ret == -EPERM || ret == -EOPNOTSUPP)
        ret = rename(tmp.sun_path, path) < 0 ? -errno : 0;   /* no hard links here */
    unlink(tmp.sun_path);
    if (ret == -EEXIST)
        return lshm__fail(-EADDRINUSE, "another server took %s meanwhile", path);
    if (ret < 0)
        return lshm__fail(ret, "link %s: %s", path, strerror(-ret));
    return 0;
}

LSHM_EXPORT int lshm_listen(struct lshm_ctx *ctx, const char *path, int mode,
                            struct lshm_listener **out)
{
    struct lshm_listener *l;
    struct sockaddr_un sun;
    struct stat st;
    int fd, ret;

    if (ctx == NULL || out == NULL || mode < 0 || mode > 0777)
        return lshm__fail(-EINVAL, "bad context, listener or mode");
    ret = fill_addr(path, &sun);
    if (ret < 0)
        return ret;
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode))
            return lshm__fail(-EEXIST, "%s exists and is not a socket", path);
        if (socket_is_live(&sun))
            return lshm__fail(-EADDRINUSE, "a server is already listening on %s", path);
        unlink(path);   /* stale: its server is gone */
    }
    fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return lshm__fail(-errno, "socket: %s", strerror(errno));
    ret = bind_listening(fd, &sun, mode ? mode : 0600);
    if (ret < 0) {
        close(fd);
        return ret;
    }
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

/* A port accepted on l completed its handshake: hand it to the caller. */
void lshm__listener_ready(struct lshm_listener *l, struct lshm_port *port)
{
    if (l->nready == l->capready) {
        unsigned cap = l->capready * 2 + 4;
        struct lshm_port **ready = realloc(l->ready, cap * sizeof(*ready));

        if (ready == NULL) {
            /* Out of memory: the connection is refused, not lost silently. */
            lshm_port_close(port);
            return;
        }
        l->ready = ready;
        l->capready = cap;
    }
    l->ready[l->nready++] = port;
}

void lshm__listener_dispatch(struct lshm_listener *l)
{
    while (l->on_accept != NULL && !l->closing && l->nready > 0) {
        struct lshm_port *port = l->ready[0];

        memmove(l->ready, l->ready + 1, --l->nready * sizeof(*l->ready));
        l->on_accept(l, port, l->arg);
    }
}

LSHM_EXPORT int lshm_listener_set_handler(struct lshm_listener *l, lshm_accept_fn on_accept,
                                          void *arg)
{
    if (l == NULL || l->closing)
        return lshm__fail(-EINVAL, "bad listener");
    l->on_accept = on_accept;
    l->arg = arg;
    lshm__listener_dispatch(l);
    return 0;
}

LSHM_EXPORT int lshm_accept(struct lshm_listener *l, struct lshm_port **port, int timeout_ms)
{
    long long end = lshm__now_ms() + timeout_ms;
    int ret;

    if (l == NULL || port == NULL || l->closing)
        return lshm__fail(-EINVAL, "bad listener");
    if (l->on_accept != NULL)
        return lshm__fail(-EBUSY, "the listener has an accept handler");
    while (l->nready == 0) {
        int step = -1;

        if (timeout_ms >= 0) {
            long long left = end - lshm__now_ms();

            if (left <= 0)
                return lshm__fail(-ETIMEDOUT, "no connection within %d ms", timeout_ms);
            step = (int)left;
        }
        ret = lshm_ctx_run(l->ctx, step);
        if (ret < 0)
            return ret;
    }
    *port = l->ready[0];
    memmove(l->ready, l->ready + 1, --l->nready * sizeof(*l->ready));
    return 0;
}

LSHM_EXPORT void lshm_listener_close(struct lshm_listener *l)
{
    struct lshm_port *port;
    unsigned i;

    if (l == NULL || l->closing)
        return;
    l->closing = true;
    if (l->path != NULL)
        unlink(l->path);
    /* Accepted, never taken: their peers get a BYE. */
    for (i = 0; i < l->nready; i++)
        lshm_port_close(l->ready[i]);
    l->nready = 0;
    for (port = l->ctx->ports; port != NULL; port = port->next)
        if (port->listener == l) {
            port->listener = NULL;
            lshm_port_close(port);
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

/* The context is going away and its ring is gone: nothing is in flight. */
void lshm__listener_reap(struct lshm_listener *l)
{
    if (!l->closing && l->path != NULL)
        unlink(l->path);
    l->armed = false;
    /* Nothing watches it any more. */
    if (l->fd >= 0)
        close(l->fd);
    l->fd = -1;
    listener_free(l);
}

/* A forked child's copy: close our fds, leave the path to the parent. */
void lshm__listener_forget(struct lshm_listener *l)
{
    /* Its accepted ports are in the context's list: forgotten there. */
    listener_unlink(l);
    free(l->ready);
    l->ready = NULL;
    l->nready = 0;
    if (l->fd >= 0)
        close(l->fd);
    l->fd = -1;
    free(l->path);
    free(l);
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

LSHM_EXPORT int lshm_connect(struct lshm_ctx *ctx, const char *path, int timeout_ms,
                             struct lshm_port **out)
{
    struct connect_op c = { .op.complete = connect_done };
    struct sockaddr_un sun;
    struct lshm_port *port;
    int fd, ret;

    if (ctx == NULL || out == NULL)
        return lshm__fail(-EINVAL, "NULL argument");
    ret = fill_addr(path, &sun);
    if (ret < 0)
        return ret;
    fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return lshm__fail(-errno, "socket: %s", strerror(errno));
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
    ret = lshm_port_wait(port, LSHM_WAIT_READY, timeout_ms);
    if (ret < 0) {
        char why[256];

        snprintf(why, sizeof(why), "%s", lshm_last_error());
        lshm_port_close(port);
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
