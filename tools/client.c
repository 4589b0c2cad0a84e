/*
 * shmping: the io_uring modes (shm, inline) on the client side, against a
 * forked peer (default) or a server (PATH).
 *
 * Ping: sequence numbers travel in the stream id; each is sent at its time
 * (interval), with at most a window of them unanswered, and its echo gives
 * one RTT sample.  Throughput against the forked peer: a one-way stream of
 * MSG_DATA, then MSG_END, answered with what the peer counted.  Throughput
 * against a server (which echoes everything): the ping loop with no
 * interval and a wide window.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "shmping.h"

#define NS_PER_S        1000000000ull
#define NS_PER_MS       1000000ull
#define SLOTS           4096                  /* power of two, > any window */
#define PING_WINDOW     64
#define STREAM_WINDOW   256
#define MAX_WINDOW      1024
#define MAX_INFLIGHT_BYTES (128ull << 20)
#define STALL_NS        (10 * NS_PER_S)       /* no progress for this long: give up */
#define DRAIN_NS        (2 * NS_PER_S)        /* after -w, for replies on their way */
#define WAIT_SLICE_MS   100                   /* how often loops look at signals */
#define CLOCK_EVERY     65536                 /* a one-way run reads the clock per this many bytes */

struct slot {
    uint32_t seq;
    uint64_t t;     /* send time; 0: answered or never sent */
};

struct session {
    const struct config *cfg;
    struct lshm_ctx     *ctx;
    struct lshm_port    *port;
    const char          *peer;
    struct results      *res;
    uint8_t             *staging;   /* the payload (cfg->size bytes) */
    struct slot         *slots;
    uint64_t             inflight;
    unsigned             blocked_on; /* LSHM_WAIT_SEND / _SHM after -EAGAIN */
    bool                 forked;
    bool                 header_pending; /* printed once the carrier shows */
};

static int ms_until(uint64_t now, uint64_t when)
{
    uint64_t d = when > now ? when - now : 0;
    uint64_t ms = (d + NS_PER_MS - 1) / NS_PER_MS;

    return ms > WAIT_SLICE_MS ? WAIT_SLICE_MS : (int)ms;
}

/* The link went away or broke: say so once. */
static void link_failed(struct session *s, int ret)
{
    const char *why = lshm_port_error(s->port);

    if (s->res->error)
        return;
    s->res->error = 1;
    err("connection to %s closed: %s", s->peer, why ? why : lib_why(ret));
}

/*
 * Queue one message, every payload byte written as a program writes its
 * data: the fast payload of seq, straight into the shared-memory buffers or
 * the bytes to send inline.  With verify, the pattern of seq instead: written
 * there when fresh, else copied from the staging bytes.  -EAGAIN
 * (no room now) sets s->blocked_on to what to wait for.
 */
static int send_msg(struct session *s, uint8_t type, uint32_t seq, unsigned flags, bool fresh)
{
    const struct config *cfg = s->cfg;
    struct lshm_out out = { .type = type, .last = 1, .stream = seq, .fd = -1 };
    struct payload p;   /* not zeroed: 1 KiB a message; n says what it holds */
    int ret;

    p.n = 0;
    if (type == MSG_END) {
        /* no payload */
    } else if (cfg->mode == MODE_SHM && cfg->size > 0) {
        ret = payload_alloc(s->port, cfg->size, &p);
        if (ret == -EAGAIN)
            s->blocked_on = LSHM_WAIT_SHM;
        if (ret < 0)
            return ret;
        if (!cfg->verify)
            payload_fast_fill(&p, seq);
        else if (fresh)
            payload_fill(&p, seq);
        else
            payload_copy_in(&p, s->staging);
        out.bufs = p.bufs;
        out.nbufs = p.n;
    } else if (cfg->size > 0) {
        if (!cfg->verify)
            fast_fill(s->staging, 0, cfg->size, seq);
        else if (fresh)
            pattern_write(s->staging, 0, cfg->size, seq);
        out.data = s->staging;
        out.size = cfg->size;
    }
    ret = lshm_send(s->port, &out, flags);
    if (ret < 0)
        payload_free(&p);
    if (ret == -EAGAIN)
        s->blocked_on = LSHM_WAIT_SEND;
    return ret;
}

/*
 * After -EAGAIN: submit what LSHM_MORE held back, then wait a little for
 * room or a reply.  Returns 0, or the port's error.
 */
static int wait_room(struct session *s, bool flush, int timeout_ms)
{
    int ret;

    if (flush) {
        ret = lshm_flush(s->ctx);
        if (ret < 0)
            return ret;
    }
    ret = lshm_port_wait(s->port, s->blocked_on | LSHM_WAIT_RECV, timeout_ms);
    s->blocked_on = 0;
    return ret == -ETIMEDOUT || ret == -EINTR || ret > 0 ? 0 : ret;
}

static void handle_reply(struct session *s, struct lshm_msg *m)
{
    const struct config *cfg = s->cfg;
    struct results *res = s->res;
    uint64_t t1 = now_ns();
    uint32_t seq = m->stream;
    struct slot *sl = &s->slots[seq % SLOTS];
    double us;

    if (m->fd >= 0) {
        close(m->fd);
        m->fd = -1;
    }
    if (m->type != MSG_PING || sl->seq != seq || sl->t == 0) {
        err("unexpected reply from %s: type %u, seq=%u", s->peer, m->type, seq);
        res->corrupt++;
        lshm_msg_done(m);
        return;
    }
    us = (double)(t1 - sl->t) / 1e3;
    sl->t = 0;
    s->inflight--;
    res->received++;
    if (m->size != cfg->size || msg_iov_bytes(m) != m->size) {
        err("seq=%u: reply has %zu bytes, %zu were sent", seq, m->size, cfg->size);
        res->corrupt++;
    } else if (!msg_check(m, seq, cfg->verify)) {
        res->corrupt++;
    }
    lshm_msg_done(m);
    if (results_add_rtt(res, us) < 0)
        err("out of memory for RTT samples");
    if (!cfg->quiet && !cfg->flood && !cfg->throughput)
        print_reply(cfg, s->peer, seq, cfg->size, us);
}

/*
 * The header, with the carrier: a forked peer has our options, so ours tell;
 * a server's HELLO is known to the port alone, so its carrier shows in the
 * counters once a message went.
 */
static void session_header(struct session *s)
{
    struct lshm_port_stats st;
    struct carrier c;
    bool went = lshm_port_stats(s->port, &st) == 0 && st.ring_msgs + st.sock_msgs > 0;

    carrier_of(s->cfg, lshm_ctx_features(s->ctx), went ? &st : NULL, &c);
    print_header(s->cfg, s->peer, s->ctx, &c);
    s->header_pending = false;
}

/* Send up to n pings as one submit.  Returns how many went, or -errno. */
static int send_pings(struct session *s, unsigned n)
{
    const struct config *cfg = s->cfg;
    struct results *res = s->res;
    unsigned i;

    for (i = 0; i < n; i++) {
        uint32_t seq = (uint32_t)(res->sent + 1);
        uint64_t t;
        int ret;

        /* The pattern is made before the clock starts: it is not transport. */
        if (cfg->verify && cfg->size > 0)
            pattern_write(s->staging, 0, cfg->size, seq);
        t = now_ns();
        ret = send_msg(s, MSG_PING, seq, i + 1 < n ? LSHM_MORE : 0, false);
        if (ret < 0) {
            if (ret == -EAGAIN && i == 0)
                return -EAGAIN;
            if (ret == -EAGAIN)
                break;
            return ret;
        }
        s->slots[seq % SLOTS] = (struct slot){ .seq = seq, .t = t };
        s->inflight++;
        res->sent++;
    }
    if (i < n) {
        /* Stopped short of the batch: submit the part LSHM_MORE queued. */
        int ret = lshm_flush(s->ctx);
        if (ret < 0)
            return ret;
    }
    return (int)i;
}

/* Replies already here are timed now, not after the next send. */
static int take_replies(struct session *s, uint64_t max)
{
    for (uint64_t k = 0; k < max && s->inflight > 0; k++) {
        struct lshm_msg m;
        int ret = lshm_recv(s->port, &m, 0);

        if (ret == -ETIMEDOUT || ret == -EINTR)
            break;
        if (ret < 0) {
            link_failed(s, ret);
            return -1;
        }
        handle_reply(s, &m);
    }
    return 0;
}

static uint64_t session_window(const struct config *cfg)
{
    uint64_t w;

    if (cfg->throughput)
        w = cfg->batch * 2 > STREAM_WINDOW ? cfg->batch * 2 : STREAM_WINDOW;
    else if (cfg->flood)
        w = cfg->batch;
    else
        w = cfg->batch > PING_WINDOW ? cfg->batch : PING_WINDOW;
    if (w > MAX_WINDOW)
        w = MAX_WINDOW;
    /* Large payloads: keep what is in flight well inside the segments a
     * peer may hold, so that sending waits for replies, not for chunks. */
    if (cfg->size > 0 && w > MAX_INFLIGHT_BYTES / cfg->size)
        w = MAX_INFLIGHT_BYTES / cfg->size > 0 ? MAX_INFLIGHT_BYTES / cfg->size : 1;
    return w;
}

static int ping_session(struct session *s)
{
    const struct config *cfg = s->cfg;
    struct results *res = s->res;
    uint64_t window = session_window(cfg);
    uint64_t interval = (cfg->flood || cfg->throughput) ? 0
                        : (uint64_t)(cfg->interval * (double)NS_PER_S);
    uint64_t start = now_ns(), next_send = start, progress = start;
    uint64_t deadline = cfg->deadline > 0 ? start + (uint64_t)(cfg->deadline * NS_PER_S) : 0;
    bool sending_over = false;
    int ret = 0;

    faults_start(res);

    for (;;) {
        uint64_t now = now_ns();
        struct lshm_msg m;
        bool more;
        int wait_ms;

        if (stop_requested) {
            res->interrupted = true;
            break;
        }
        /* At the deadline sending stops; replies on their way get a little
         * longer to come in, so that a run cut short loses nothing. */
        if (deadline && now >= deadline) {
            if (sending_over)
                break;
            sending_over = true;
            deadline = now + DRAIN_NS;
        }
        more = !sending_over && res->sent < cfg->count;
        if (!more && s->inflight == 0)
            break;
        if (s->inflight == 0 && more && now < next_send)
            progress = now;     /* idle until the next ping: not a stall */
        if (now - progress > STALL_NS) {
            err("%s %s for %llu s", s->inflight ? "no reply from" : "nothing could be queued to",
                s->peer, (unsigned long long)(STALL_NS / NS_PER_S));
            if (s->inflight == 0)
                res->error = 1;
            break;
        }

        if (more && s->inflight < window && now >= next_send && !s->blocked_on) {
            uint64_t n = cfg->batch;

            if (take_replies(s, window) < 0)
                break;
            if (n > cfg->count - res->sent)
                n = cfg->count - res->sent;
            if (n > window - s->inflight)
                n = window - s->inflight;
            ret = send_pings(s, (unsigned)n);
            if (ret < 0 && ret != -EAGAIN) {
                link_failed(s, ret);
                break;
            }
            if (ret > 0 && s->header_pending)
                session_header(s);
            if (ret > 0) {
                progress = now;
                next_send = interval ? next_send + interval : now;
                if (next_send < now)
                    next_send = now;
            }
            continue;
        }

        if (s->blocked_on) {
            /* No room to send: take a reply if one is there, else wait. */
            ret = lshm_recv(s->port, &m, 0);
            if (ret == -ETIMEDOUT) {
                ret = wait_room(s, false, 10);
                if (ret < 0) {
                    link_failed(s, ret);
                    break;
                }
                continue;
            }
            s->blocked_on = 0;
        } else {
            wait_ms = WAIT_SLICE_MS;
            if (more && s->inflight < window)
                wait_ms = ms_until(now, next_send);
            if (deadline && ms_until(now, deadline) < wait_ms)
                wait_ms = ms_until(now, deadline);
            ret = lshm_recv(s->port, &m, wait_ms);
        }
        if (ret == 0) {
            handle_reply(s, &m);
            progress = now_ns();
        } else if (ret != -ETIMEDOUT && ret != -EINTR) {
            link_failed(s, ret);
            break;
        }
    }
    faults_stop(res);
    res->bytes_moved = 2 * res->received * cfg->size;
    res->time_ms = (double)(now_ns() - start) / 1e6;
    if (cfg->throughput && res->time_ms > 0) {
        double secs = res->time_ms / 1e3;
        res->msgs_per_s = (double)res->received / secs;
        res->gb_per_s = (double)res->received * (double)cfg->size / secs / 1e9;
    }
    return res->error ? -1 : 0;
}

/* Wait for the answer to MSG_END: the peer's counts. */
static int sink_answer(struct session *s, struct peer_stats *st)
{
    uint64_t until = now_ns() + STALL_NS * 3;

    while (now_ns() < until) {
        struct lshm_msg m;
        int ret = lshm_recv(s->port, &m, WAIT_SLICE_MS);

        if (ret == -ETIMEDOUT || ret == -EINTR)
            continue;
        if (ret < 0) {
            link_failed(s, ret);
            return -1;
        }
        if (m.fd >= 0)
            close(m.fd);
        if (m.type == MSG_END) {
            bool ok = m.size == sizeof(*st) && !(m.flags & LSHM_MSG_SHM) && m.niov == 1;
            if (ok)
                memcpy(st, m.iov[0].base, sizeof(*st));
            lshm_msg_done(&m);
            if (!ok) {
                err("peer's answer to the end of the stream is malformed (%zu bytes)", m.size);
                s->res->error = 1;
                return -1;
            }
            return 0;
        }
        lshm_msg_done(&m);
    }
    err("peer did not answer the end of the stream within %llu s",
        (unsigned long long)(STALL_NS * 3 / NS_PER_S));
    s->res->error = 1;
    return -1;
}

/* Queue one message, waiting (bounded) while there is no room. */
static int send_blocking(struct session *s, uint8_t type, uint32_t seq, unsigned flags,
                         bool flush_first, uint64_t deadline)
{
    uint64_t start = 0;     /* the clock is read once there is no room */
    bool flush = flush_first;

    for (;;) {
        int ret = send_msg(s, type, seq, flags, true);

        if (ret != -EAGAIN)
            return ret;
        if (start == 0)
            start = now_ns();
        if (now_ns() - start > STALL_NS) {
            err("nothing could be queued to %s for %llu s", s->peer,
                (unsigned long long)(STALL_NS / NS_PER_S));
            return -ETIMEDOUT;
        }
        if ((stop_requested || (deadline && now_ns() >= deadline)) && type == MSG_DATA)
            return -ECANCELED;
        ret = wait_room(s, flush, 10);
        if (ret < 0)
            return ret;
        flush = false;
    }
}

static int sink_session(struct session *s)
{
    const struct config *cfg = s->cfg;
    struct results *res = s->res;
    uint64_t start = now_ns();
    uint64_t deadline = cfg->deadline > 0 ? start + (uint64_t)(cfg->deadline * NS_PER_S) : 0;
    struct peer_stats st;
    uint64_t unclocked = 0;     /* bytes sent since the clock was last read */
    int ret = 0;

    faults_start(res);
    while (res->sent < cfg->count && !stop_requested) {
        uint64_t n = cfg->count - res->sent;

        /* A clock read costs as much as sending a small message: the
         * deadline is looked at every 32 messages or 64 KiB. */
        if (deadline && unclocked >= CLOCK_EVERY) {
            if (now_ns() >= deadline)
                break;
            unclocked = 0;
        }
        if (n > cfg->batch)
            n = cfg->batch;
        unclocked += n * (cfg->size > CLOCK_EVERY / 32 ? cfg->size : CLOCK_EVERY / 32);
        for (uint64_t i = 0; i < n; i++) {
            ret = send_blocking(s, MSG_DATA, (uint32_t)(res->sent + 1),
                                i + 1 < n ? LSHM_MORE : 0, i > 0, deadline);
            if (ret < 0)
                break;
            res->sent++;
        }
        if (ret < 0)
            break;
    }
    res->interrupted = stop_requested;
    if (ret == -ECANCELED)
        ret = 0;
    if (ret == 0)
        ret = send_blocking(s, MSG_END, (uint32_t)res->sent, 0, true, 0);
    if (ret < 0) {
        if (ret != -ETIMEDOUT)      /* that one was reported already */
            link_failed(s, ret);
        res->error = 1;
        return -1;
    }
    if (sink_answer(s, &st) < 0)
        return -1;
    faults_stop(res);
    results_set_throughput(res, start, &st);
    return 0;
}

static int run_session(const struct config *cfg, struct lshm_ctx *ctx, struct lshm_port *port,
                       const char *peer, bool forked, struct results *res)
{
    struct session s = {
        .cfg = cfg, .ctx = ctx, .port = port, .peer = peer, .res = res, .forked = forked,
    };
    int ret;

    s.staging = malloc(cfg->size ? cfg->size : 1);
    s.slots = calloc(SLOTS, sizeof(*s.slots));
    if (s.staging == NULL || s.slots == NULL) {
        err("out of memory for a %zu-byte payload", cfg->size);
        free(s.staging);
        free(s.slots);
        res->error = 1;
        return -1;
    }
    memset(s.staging, 0x5a, cfg->size);
    res->features = lshm_ctx_features(ctx);
    snprintf(res->io, sizeof(res->io), "%s", lshm_ctx_carrier(ctx));
    if (!cfg->json && !cfg->bench) {
        s.header_pending = true;
        if (forked || cfg->no_ring)
            session_header(&s);
    }
    if (cfg->throughput && forked)
        ret = sink_session(&s);
    else
        ret = ping_session(&s);
    if (s.header_pending)
        session_header(&s);
    res->has_port_stats = lshm_port_stats(port, &res->port_stats) == 0;
    free(s.staging);
    free(s.slots);
    return ret;
}

int uring_run_forked(const struct config *cfg, struct results *res)
{
    struct idle_ports idle = { NULL, 0 };
    struct lshm_ctx *ctx = NULL;
    struct lshm_port *port = NULL;
    int sock, ret, status;
    pid_t pid;

    /*
     * Each side makes its own context after fork: a ring made before fork()
     * is unusable in the child.
     */
    pid = fork_peer(cfg, SOCK_SEQPACKET, peer_serve, &sock);
    if (pid < 0)
        return EXIT_ERROR;
    res->peer_pid = pid;
    if (ctx_new_reported(&ctx, cfg, "") < 0) {
        close(sock);
        goto fail;
    }
    ret = lshm_port_adopt(ctx, sock, &port);
    if (ret < 0) {
        err("cannot adopt the socket of the forked peer: %s", lib_why(ret));
        close(sock);
        goto fail;
    }
    if (drop_caps(cfg) < 0)
        goto fail;
    ret = lshm_port_wait(port, LSHM_WAIT_READY, HANDSHAKE_MS);
    if (ret < 0) {
        const char *why = lshm_port_error(port);
        err("handshake with the forked peer failed: %s", why ? why : lib_why(ret));
        goto fail;
    }
    if (idle_open(cfg, ctx, &idle, "") < 0)
        goto fail;
    run_session(cfg, ctx, port, "peer", true, res);
    idle_close(&idle);
    lshm_port_close(port);
    lshm_ctx_free(ctx);
    status = reap_child(pid);
    if (!res->error && status != 0) {
        if (status < 0)
            err("forked peer did not exit; killed");
        else if (WIFSIGNALED(status))
            err("forked peer died of signal %d", WTERMSIG(status));
        else
            err("forked peer failed (exit status %d)", WEXITSTATUS(status));
        res->error = 1;
    }
    return res->error ? EXIT_ERROR : 0;

fail:
    if (port != NULL)
        lshm_port_close(port);
    lshm_ctx_free(ctx);
    kill(pid, SIGKILL);
    reap_child(pid);
    res->error = 1;
    return EXIT_ERROR;
}

int uring_run_client(const struct config *cfg, struct results *res)
{
    struct idle_ports idle = { NULL, 0 };
    struct lshm_ctx *ctx = NULL;
    struct lshm_port *port = NULL;
    int ret;

    if (ctx_new_reported(&ctx, cfg, "") < 0)
        goto fail;
    /* Before lshm_connect: it reads the server's HELLO. */
    if (drop_caps(cfg) < 0)
        goto fail;
    ret = lshm_connect(ctx, cfg->path, HANDSHAKE_MS, &port);
    if (ret < 0) {
        if (ret == -ENOENT || ret == -ECONNREFUSED)
            err("no server at %s: %s", cfg->path, lib_why(ret));
        else if (ret == -ETIMEDOUT)
            err("%s did not complete the handshake within %d ms", cfg->path, HANDSHAKE_MS);
        else
            err("cannot connect to %s: %s", cfg->path, lib_why(ret));
        goto fail;
    }
    if (idle_open(cfg, ctx, &idle, "") < 0) {
        lshm_port_close(port);
        goto fail;
    }
    run_session(cfg, ctx, port, cfg->path, false, res);
    idle_close(&idle);
    lshm_port_close(port);
    lshm_ctx_free(ctx);
    return res->error ? EXIT_ERROR : 0;

fail:
    lshm_ctx_free(ctx);
    res->error = 1;
    return EXIT_ERROR;
}
