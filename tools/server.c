/*
 * shmping: the echo server (-l PATH) and the forked peer of the io_uring
 * modes.  Both run one lshm_ctx_run loop with a handler per port: every user
 * message is echoed (same type and stream, LAST, same bytes, inline when it
 * came inline, in this process's own chunks when it came in chunks); the
 * forked peer of a throughput run counts MSG_DATA instead, reading every
 * byte (its sum, or the --verify pattern) and taking --slow's time over the
 * first ones, and answers MSG_END with what it saw.  The forked peer also
 * reads every ping it echoes.
 *
 * An echo that cannot be queued now (send queue full, no free chunk) is not
 * dropped: the message is held, unreleased, in its client's FIFO and retried
 * from the loop.  Holding it keeps the client's chunks busy, which is the
 * backpressure a client that does not read its replies gets.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "shmping.h"

/* Loop timeouts: idle, and while echoes wait for room. */
#define RUN_IDLE_MS    100
#define RUN_RETRY_MS   1
/* A client holding this many messages unanswered is not reading: drop it. */
#define MAX_PENDING    65536

struct pending {
    struct pending *next;
    struct lshm_msg msg;
};

struct server;

struct client {
    struct client   *next;
    struct server   *srv;
    struct lshm_port *port;
    struct pending  *head, **tail;
    size_t           npending;
    unsigned         id;
    bool             dead;      /* closed or dropped: reaped by the loop */
};

struct server {
    const struct config  *cfg;
    struct lshm_ctx      *ctx;
    struct lshm_listener *listener;
    struct client        *clients;
    unsigned              next_id;
    bool                  sink;     /* forked peer of a throughput run */
    struct peer_stats     stats;
    struct idle_ports     idle;     /* --idle */
};

static void sleep_ms(unsigned ms)
{
    struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000 };

    while (nanosleep(&ts, &ts) < 0 && !stop_requested)
        ;
}

/* The server's log (stderr): one line for each client that goes. */
static void client_log(struct client *c, const char *what, const char *why)
{
    pid_t pid;

    if (lshm_port_peer(c->port, &pid, NULL, NULL) == 0)
        err("client %u (pid %d) %s: %s", c->id, (int)pid, what, why);
    else
        err("client %u %s: %s", c->id, what, why);
}

/* Drop a client that broke the protocol or cannot be served; one log line. */
static void client_drop(struct client *c, int ret)
{
    const char *why = lshm_port_error(c->port);

    if (c->dead)
        return;
    c->dead = true;
    if (ret == -EBADMSG)
        why = "message pieces do not add up to its size";
    else if (ret == -ENOBUFS)
        why = "does not read its replies";
    else if (why == NULL)
        why = lib_why(ret);
    if (c->srv->listener != NULL)
        client_log(c, "dropped", why);
    else if (ret != -EPIPE)
        err("peer: %s", why);
}

static int send_stats(struct client *c, const struct lshm_msg *m)
{
    struct lshm_out out = {
        .type = MSG_END, .last = 1, .stream = m->stream, .fd = -1,
        .data = &c->srv->stats, .size = sizeof(c->srv->stats),
    };

    return lshm_send(c->port, &out, LSHM_MORE);
}

static int echo(struct client *c, const struct lshm_msg *m)
{
    struct lshm_out out = {
        .type = m->type, .last = 1, .stream = m->stream, .fd = -1,
    };
    struct payload p;   /* not zeroed: 1 KiB a message; n says what it holds */
    int ret;

    p.n = 0;
    if (m->size > 0 && (m->flags & LSHM_MSG_SHM)) {
        ret = payload_alloc(c->port, m->size, &p);
        if (ret < 0)
            return ret;
        payload_copy_msg(&p, m);
        out.bufs = p.bufs;
        out.nbufs = p.n;
    } else if (m->size > 0) {
        out.data = m->iov[0].base;
        out.size = m->size;
    }
    /* Echoes of one dispatch round go out in one submit: the loop's next
     * lshm_ctx_run submits them. */
    ret = lshm_send(c->port, &out, LSHM_MORE);
    if (ret < 0)
        payload_free(&p);
    return ret;
}

/* 0: done with m (released); -EAGAIN: keep m and retry; else drop the client. */
static int serve_msg(struct client *c, struct lshm_msg *m)
{
    struct server *s = c->srv;
    int ret = 0;

    if ((m->size > 0 && m->iov == NULL) || msg_iov_bytes(m) != m->size ||
        (!(m->flags & LSHM_MSG_SHM) && m->size > 0 && m->niov != 1))
        return -EBADMSG;

    if (s->sink && m->type == MSG_DATA) {
        s->stats.received++;
        s->stats.bytes += m->size;
        if (!msg_check(m, m->stream, s->cfg->verify))
            s->stats.corrupt++;
        /* --slow: a consumer that takes its time over its first messages
         * (the chunks stay its until it is done with them). */
        if (s->stats.received <= s->cfg->slow_n)
            sleep_ms(s->cfg->slow_ms);
    } else if (s->sink && m->type == MSG_END) {
        ret = send_stats(c, m);
    } else {
        ret = echo(c, m);
    }
    if (ret == 0)
        lshm_msg_done(m);
    return ret;
}

static void on_msg(struct lshm_port *port, struct lshm_msg *msg, void *arg)
{
    struct client *c = arg;
    /* Our own copy: it may outlive this call in the pending FIFO, and
     * lshm_msg_done() is only ever given a copy. */
    struct lshm_msg m = *msg;
    struct pending *p;
    int ret;

    (void)port;
    /* A user fd is the receiver's to own; shmping has no use for it. */
    if (m.fd >= 0) {
        close(m.fd);
        m.fd = -1;
    }
    if (c->dead) {
        lshm_msg_done(&m);
        return;
    }
    /* The forked peer reads every ping it echoes, as a receiver does (once,
     * here, not on each retry; a bad one is reported, and counted by the
     * client); a server echoes any client's bytes. */
    if (c->srv->listener == NULL && !c->srv->sink && m.type == MSG_PING)
        msg_check(&m, m.stream, c->srv->cfg->verify);
    if (c->head == NULL) {
        ret = serve_msg(c, &m);
        if (ret == 0)
            return;
        if (ret != -EAGAIN) {
            client_drop(c, ret);
            lshm_msg_done(&m);
            return;
        }
    }
    /* Behind earlier held echoes, or no room now: keep order, hold it. */
    if (c->npending >= MAX_PENDING || (p = malloc(sizeof(*p))) == NULL) {
        client_drop(c, c->npending >= MAX_PENDING ? -ENOBUFS : -ENOMEM);
        lshm_msg_done(&m);
        return;
    }
    p->next = NULL;
    p->msg = m;
    *c->tail = p;
    c->tail = &p->next;
    c->npending++;
}

static void on_close(struct lshm_port *port, int error, void *arg)
{
    struct client *c = arg;
    const char *why = lshm_port_error(port);

    if (c->dead)
        return;
    c->dead = true;
    if (c->srv->listener == NULL) {
        /* Forked peer: the parent closing the link is the normal end. */
        if (error != -EPIPE)
            err("peer: link closed: %s", why ? why : lib_why(error));
        return;
    }
    /* One line for every end, orderly or not: EOF from a client that died
     * is an orderly end to the transport (-EPIPE), only the reason differs. */
    client_log(c, error == -EPIPE ? "disconnected" : "dropped",
               why ? why : lib_why(error));
}

static struct client *client_add(struct server *s, struct lshm_port *port)
{
    struct client *c = calloc(1, sizeof(*c));
    int ret;

    if (c == NULL)
        return NULL;
    c->srv = s;
    c->port = port;
    c->tail = &c->head;
    c->id = ++s->next_id;
    ret = lshm_port_set_handler(port, on_msg, on_close, c);
    if (ret < 0) {
        err("cannot serve a client: %s", lib_why(ret));
        free(c);
        return NULL;
    }
    c->next = s->clients;
    s->clients = c;
    return c;
}

static void client_free(struct client *c)
{
    struct pending *p, *next;

    for (p = c->head; p != NULL; p = next) {
        next = p->next;
        lshm_msg_done(&p->msg);
        free(p);
    }
    lshm_port_close(c->port);
    free(c);
}

static void on_accept(struct lshm_listener *l, struct lshm_port *port, void *arg)
{
    struct server *s = arg;
    struct client *c;

    (void)l;
    c = client_add(s, port);
    if (c == NULL) {
        lshm_port_close(port);
        return;
    }
    if (!s->cfg->quiet)
        err("client %u connected", c->id);
}

/* Retry held echoes in order; returns whether some are still held. */
static bool retry_pending(struct server *s)
{
    bool held = false;

    for (struct client *c = s->clients; c != NULL; c = c->next) {
        while (!c->dead && c->head != NULL) {
            struct pending *p = c->head;
            int ret = serve_msg(c, &p->msg);

            if (ret == -EAGAIN)
                break;
            if (ret < 0) {
                client_drop(c, ret);
                break;
            }
            c->head = p->next;
            if (c->head == NULL)
                c->tail = &c->head;
            c->npending--;
            free(p);
        }
        held |= !c->dead && c->head != NULL;
    }
    return held;
}

static void reap(struct server *s)
{
    struct client **pc = &s->clients;

    while (*pc != NULL) {
        struct client *c = *pc;
        if (c->dead) {
            *pc = c->next;
            client_free(c);
        } else {
            pc = &c->next;
        }
    }
}

/* The loop: returns 0 on a signal or (forked peer) once its link closed. */
static int run_loop(struct server *s)
{
    bool held = false;

    while (!stop_requested) {
        int ret = lshm_ctx_run(s->ctx, held ? RUN_RETRY_MS : RUN_IDLE_MS);

        if (ret < 0 && ret != -EINTR && ret != -ETIMEDOUT && ret != -EAGAIN) {
            err("%s: event loop failed: %s", s->listener ? "server" : "peer", lib_why(ret));
            return -1;
        }
        held = retry_pending(s);
        reap(s);
        if (s->listener == NULL && s->clients == NULL)
            break;
    }
    return 0;
}

static void server_close(struct server *s)
{
    struct client *c, *next;

    lshm_listener_close(s->listener);
    s->listener = NULL;
    for (c = s->clients; c != NULL; c = next) {
        next = c->next;
        client_free(c);
    }
    s->clients = NULL;
    idle_close(&s->idle);
    lshm_ctx_free(s->ctx);
}

int serve(const struct config *cfg)
{
    struct server s = { .cfg = cfg };
    char feat[256];
    int ret;

    if (ctx_new_reported(&s.ctx, cfg, "") < 0)
        return EXIT_ERROR;
    ret = lshm_listen(s.ctx, cfg->listen, 0, &s.listener);
    if (ret < 0) {
        if (ret == -EADDRINUSE)
            err("cannot listen on %s: a server is already running there", cfg->listen);
        else
            err("cannot listen on %s: %s", cfg->listen, lib_why(ret));
        lshm_ctx_free(s.ctx);
        return EXIT_ERROR;
    }
    ret = lshm_listener_set_handler(s.listener, on_accept, &s);
    if (ret < 0) {
        err("cannot accept on %s: %s", cfg->listen, lib_why(ret));
        server_close(&s);
        return EXIT_ERROR;
    }
    if (drop_caps(cfg) < 0 || idle_open(cfg, s.ctx, &s.idle, "") < 0) {
        server_close(&s);
        return EXIT_ERROR;
    }
    if (!cfg->quiet) {
        struct carrier c;
        char carrier[192], idle[48] = "";

        io_text(s.ctx, feat, sizeof(feat));
        /* Rings with each client whose HELLO offers them too. */
        carrier_of(cfg, lshm_ctx_features(s.ctx), NULL, &c);
        carrier_text(cfg, &c, false, carrier, sizeof(carrier));
        if (cfg->idle > 0)
            snprintf(idle, sizeof(idle), ", %u idle ports", cfg->idle);
        printf("SHMPING server on %s%s, carrier %s, %s\n", cfg->listen, idle, carrier, feat);
        fflush(stdout);
    }
    ret = run_loop(&s);
    server_close(&s);
    return ret < 0 ? EXIT_ERROR : 0;
}

/* The forked child: serves the one link sock until the parent closes it. */
int peer_serve(const struct config *cfg, int sock)
{
    struct server s = { .cfg = cfg, .sink = cfg->throughput };
    struct lshm_port *port;
    int ret;

    if (ctx_new_reported(&s.ctx, cfg, "peer: ") < 0) {
        close(sock);
        return EXIT_ERROR;
    }
    ret = lshm_port_adopt(s.ctx, sock, &port);
    if (ret < 0) {
        err("peer: cannot adopt its socket: %s", lib_why(ret));
        close(sock);
        lshm_ctx_free(s.ctx);
        return EXIT_ERROR;
    }
    if (client_add(&s, port) == NULL) {
        lshm_port_close(port);
        lshm_ctx_free(s.ctx);
        return EXIT_ERROR;
    }
    if (drop_caps(cfg) < 0 || idle_open(cfg, s.ctx, &s.idle, "peer: ") < 0) {
        server_close(&s);
        return EXIT_ERROR;
    }
    ret = run_loop(&s);
    server_close(&s);
    return ret < 0 ? EXIT_ERROR : 0;
}
