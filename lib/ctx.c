/*
 * The context: parameters, the ring, the lists of ports to visit, the
 * deadline lists, and lshm_ctx_run as its phases in order.  Everything
 * the run does to ports and listeners goes through ctx->ops.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ctx.h"
#include "shm.h"
#include "wire.h"

#define DEFAULT_RING_ENTRIES 1024u
#define DEFAULT_MAX_SEGMENTS 16u
#define DEFAULT_SEND_QUEUE   1024u
#define DEFAULT_RECV_QUEUE   256u
#define DEFAULT_HANDSHAKE_MS 10000u

/* ---- parameters and life ---- */

static bool is_power_of_two(unsigned v)
{
    return v != 0 && (v & (v - 1)) == 0;
}

static int check_params(const struct lshm_ctx_params *in, struct lshm_ctx_params *p)
{
    const unsigned known = LSHM_CTX_SCRUB | LSHM_CTX_DROP_CANCELLED |
                           LSHM_CTX_NO_MULTISHOT | LSHM_CTX_NO_DEFER_TASKRUN |
                           LSHM_CTX_NO_RING | LSHM_CTX_NO_FUTEX |
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
    if (p->prealloc_segments > p->max_segments)
        return lshm__fail(-EINVAL, "prealloc_segments %u: at most max_segments (%u)",
                         p->prealloc_segments, p->max_segments);
    if (p->send_queue > 65536 || p->recv_queue > 65536)
        return lshm__fail(-EINVAL, "send_queue and recv_queue: at most 65536");
    if (p->handshake_ms > 3600000)
        return lshm__fail(-EINVAL, "handshake_ms %u: at most an hour", p->handshake_ms);
    if (p->ring_size == 0)
        p->ring_size = LSHM_RING_SIZE_DEFAULT;
    if (!lshm__ring_size_is_valid(p->ring_size))
        return lshm__fail(-EINVAL, "ring_size %u: a power of two from %u to %u bytes",
                          p->ring_size, LSHM_RING_SIZE_MIN, LSHM_RING_SIZE_MAX);
    if (p->spin_us > 1000000)
        return lshm__fail(-EINVAL, "spin_us %u: at most a second", p->spin_us);
    return 0;
}

/* ---- the owner thread ---- */

int lshm__ctx_check(const struct lshm_ctx *ctx)
{
    pid_t tid = lshm__thread_id();

    if (likely(ctx->tid == tid))
        return 0;
    if (ctx->pid != getpid())
        return lshm__fail(-EPERM, "the context belongs to the parent process %d: a forked "
                                  "child may only free it (lshm_ctx_free)", (int)ctx->pid);
    return lshm__fail(-EPERM, "the context belongs to thread %d, not to this thread %d",
                      (int)ctx->tid, (int)tid);
}

int lshm__ctx_new(struct lshm_ctx **out, const struct lshm_ctx_params *params,
                  const struct lshm_ctx_ops *ops)
{
    struct lshm_ctx *ctx;
    int ret;

    ctx = calloc(1, sizeof(*ctx));
    if (ctx == NULL)
        return lshm__fail(-ENOMEM, "out of memory");
    ret = check_params(params, &ctx->p);
    if (ret < 0)
        goto fail;
    ret = lshm__ring_new(&ctx->ring, ctx->p.ring_entries, ctx->p.flags);
    if (ret < 0)
        goto fail;
    ctx->ops = ops;
    ctx->pid = getpid();
    ctx->tid = lshm__thread_id();
    *out = ctx;
    return 0;
fail:
    free(ctx);
    return ret;
}

bool lshm__ctx_is_copy(const struct lshm_ctx *ctx)
{
    return ctx->pid != getpid();
}

void lshm__ctx_forget(struct lshm_ctx *ctx)
{
    lshm__peers_forget();
    lshm__ring_forget(ctx->ring);
    free(ctx);
}

void lshm__ctx_stop(struct lshm_ctx *ctx)
{
    lshm__ring_free(ctx->ring);
    ctx->ring = NULL;
}

static void free_cache(void *obj)
{
    while (obj != NULL) {
        void *next = *(void **)obj;

        free(obj);
        obj = next;
    }
}

void lshm__ctx_free(struct lshm_ctx *ctx)
{
    free_cache(ctx->rm_cache);
    free_cache(ctx->sm_cache);
    free(ctx);
}

int lshm__ctx_fd(const struct lshm_ctx *ctx)
{
    ((struct lshm_ctx *)ctx)->fd_asked = true;
    return lshm__ring_fd(ctx->ring);
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

unsigned lshm__ctx_features(const struct lshm_ctx *ctx)
{
    unsigned f = lshm__ring_features(ctx->ring);

    if (noexec_seal())
        f |= LSHM_FEAT_NOEXEC_SEAL;
    /* Rings are the library's own; the futex matters only for them. */
    if (ctx->p.flags & LSHM_CTX_NO_RING)
        f &= ~LSHM_FEAT_FUTEX;
    else
        f |= LSHM_FEAT_RING;
    return f;
}

const char *lshm__ctx_carrier(const struct lshm_ctx *ctx)
{
    return lshm__ring_carrier(ctx->ring);
}

void lshm__ctx_stats(const struct lshm_ctx *ctx, struct lshm_ctx_stats *st)
{
    lshm__ring_stats(ctx->ring, st);
    st->msgs_sent = ctx->msgs_sent;
    st->msgs_received = ctx->msgs_received;
}

/* ---- lists ---- */

void lshm__ctx_list_add(struct lshm_ctx *ctx, enum port_list_id which, struct lshm_link *k)
{
    struct lshm_list *l = &ctx->lists[which];

    if (k->on)
        return;
    k->on = true;
    k->next = NULL;
    k->prev = l->tail;
    if (l->tail != NULL)
        l->tail->next = k;
    else
        l->head = k;
    l->tail = k;
    l->len++;
}

void lshm__ctx_list_del(struct lshm_ctx *ctx, enum port_list_id which, struct lshm_link *k)
{
    struct lshm_list *l = &ctx->lists[which];

    if (!k->on)
        return;
    if (k->prev != NULL)
        k->prev->next = k->next;
    else
        l->head = k->next;
    if (k->next != NULL)
        k->next->prev = k->prev;
    else
        l->tail = k->prev;
    k->on = false;
    l->len--;
}

static struct lshm_port *list_pop(struct lshm_ctx *ctx, enum port_list_id which)
{
    struct lshm_link *k = ctx->lists[which].head;

    if (k == NULL)
        return NULL;
    lshm__ctx_list_del(ctx, which, k);
    return k->port;
}

/* ---- deadlines ---- */

static void timer_done(struct lshm_op *op, int res, bool more, void *buf, unsigned len)
{
    struct lshm_timer *t = (struct lshm_timer *)((char *)op - offsetof(struct lshm_timer, op));

    t->armed = false;
}

/* Wake the context by due, unless the list's timer is armed already. */
static void wake_by(struct lshm_ctx *ctx, enum port_list_id which, long long due)
{
    struct lshm_timer *t = &ctx->timers[which];
    long long now = lshm__now_ms();

    if (t->armed)
        return;
    t->op.complete = timer_done;
    if (lshm__ring_timeout(ctx->ring, due > now ? (unsigned)(due - now) + 1 : 1, &t->op) == 0)
        t->armed = true;
}

void lshm__ctx_deadline(struct lshm_ctx *ctx, enum port_list_id which, struct lshm_link *k,
                        long long due)
{
    k->due = due;
    lshm__ctx_list_add(ctx, which, k);
    wake_by(ctx, which, due);
}

/* Each deadline list in order: its head is the earliest.  A run that
 * finds none due costs one comparison per list. */
static void run_deadlines(struct lshm_ctx *ctx)
{
    static const enum port_list_id lists[] = { PL_HELLO, PL_DRAIN, PL_FENCE, PL_ROOM };
    long long now = lshm__now_ms();
    struct lshm_link *k;
    unsigned i;

    for (i = 0; i < ARRAY_SIZE(lists); i++) {
        while ((k = ctx->lists[lists[i]].head) != NULL && k->due <= now) {
            lshm__ctx_list_del(ctx, lists[i], k);
            ctx->ops->expire(k->port, lists[i]);
        }
        if (k != NULL)
            wake_by(ctx, lists[i], k->due);
    }
}

/* ---- the run loop ---- */

/* Free the ports whose free was put off while completions ran. */
static void run_closing(struct lshm_ctx *ctx)
{
    struct lshm_port *port;

    if (ctx->walking > 0)
        return;
    while ((port = list_pop(ctx, PL_ZOMBIE)) != NULL)
        ctx->ops->sweep(port);
}

/* Submit what was queued on ports with nothing in flight (LSHM_MORE). */
static void run_kicks(struct lshm_ctx *ctx)
{
    unsigned n = ctx->lists[PL_KICK].len;
    struct lshm_port *port;

    /* Only those listed now: a port the ring has no room for comes back. */
    while (n-- > 0 && (port = list_pop(ctx, PL_KICK)) != NULL)
        ctx->ops->kick(port);
}

/* Handlers run outside any completion: they may send, close, or run the
 * context again.  Ports made ready meanwhile wait for the next run. */
static void run_handlers(struct lshm_ctx *ctx)
{
    struct lshm_link *k, *next;
    unsigned n;
    struct lshm_port *port;

    ctx->ops->accept(ctx);
    for (k = ctx->lists[PL_WANT].head; k != NULL; k = next) {
        next = k->next;
        ctx->ops->events(k->port);
    }
    n = ctx->lists[PL_READY].len;
    while (n-- > 0 && (port = list_pop(ctx, PL_READY)) != NULL)
        ctx->ops->dispatch(port);
}

/* Read every peer's ring in use: true if any had something. */
static bool run_rings(struct lshm_ctx *ctx)
{
    struct lshm_link *k, *next;
    bool any = false;

    for (k = ctx->lists[PL_RING].head; k != NULL; k = next) {
        next = k->next;
        any |= ctx->ops->poll(k->port);
    }
    return any;
}

/* Is there anything for this run to do without waiting? */
static bool run_has_work(struct lshm_ctx *ctx)
{
    return ctx->lists[PL_READY].head != NULL || !lshm__ring_is_idle(ctx->ring);
}

/*
 * Busy-poll, when the caller asked for it (spin_us): read the rings for up
 * to spin_us before sleeping, since a wake-up costs a system call on each
 * side and a trip through the scheduler.  True when something came.
 */
static bool run_spin(struct lshm_ctx *ctx, int timeout_ms)
{
    long long end;

    if (ctx->p.spin_us == 0 || ctx->lists[PL_RING].head == NULL)
        return false;
    end = lshm__now_us() + (timeout_ms >= 0 && timeout_ms * 1000LL < ctx->p.spin_us
                            ? timeout_ms * 1000LL : ctx->p.spin_us);
    do {
        if (run_rings(ctx) || run_has_work(ctx))
            return true;
        lshm__cpu_relax();
    } while (lshm__now_us() < end);
    return false;
}

/* Tell every ring's producer that we sleep: false if records came meanwhile. */
static bool run_may_sleep(struct lshm_ctx *ctx)
{
    struct lshm_link *k;

    for (k = ctx->lists[PL_RING].head; k != NULL; k = k->next)
        if (!ctx->ops->sleep(k->port))
            return false;
    return true;
}

int lshm__ctx_run(struct lshm_ctx *ctx, int timeout_ms)
{
    /* A run without a wait from a caller that polls the context's fd: it
     * sleeps there, not here. */
    bool polled = timeout_ms == 0 && ctx->fd_asked;
    int ret = 0;

    ctx->walking++;
    /* Messages queued with LSHM_MORE go out with this run. */
    run_kicks(ctx);
    /* Records in the rings cost no system call to read. */
    if (run_rings(ctx))
        timeout_ms = 0;
    /* Handlers still to call (a nested run left them): do not sleep. */
    if (ctx->lists[PL_READY].head != NULL)
        timeout_ms = 0;
    if (timeout_ms != 0 && (run_spin(ctx, timeout_ms) || !run_may_sleep(ctx)))
        timeout_ms = 0;
    /* Freed chunks come back without a word unless the peer acks: look
     * again soon for an event handler that waits for them. */
    if (ctx->lists[PL_WANT].head != NULL && (timeout_ms < 0 || timeout_ms > LSHM_RECHECK_MS))
        timeout_ms = LSHM_RECHECK_MS;
    /* Nothing for the kernel to do and nothing to wait for: no enter. */
    if (timeout_ms != 0 || !lshm__ring_is_idle(ctx->ring)) {
        ret = lshm__ring_run(ctx->ring, timeout_ms < 0 ? -1 : timeout_ms);
        run_rings(ctx);
    }
    run_deadlines(ctx);
    run_handlers(ctx);
    /* Rings are read without the kernel: a producer wakes their consumer
     * (its futex wait completes, a WAKE datagram comes, either of which
     * makes the fd readable) only once told that it sleeps.  Tell it, or,
     * if records came meanwhile, make the fd readable now. */
    if (polled && ctx->lists[PL_READY].head == NULL && !run_may_sleep(ctx))
        lshm__ring_wake(ctx->ring);
    /* Completions may have queued more (a next chain, an ACK): push it
     * now, or a caller that sleeps in epoll would never see it go.  Nor
     * would it see handlers left to call: wake its poll. */
    lshm__ring_submit(ctx->ring);
    if (ctx->lists[PL_READY].head != NULL)
        lshm__ring_wake(ctx->ring);
    ctx->walking--;
    run_closing(ctx);
    return ret;
}

int lshm__ctx_step(struct lshm_ctx *ctx, int timeout_ms)
{
    int ret;

    ctx->walking++;
    ret = lshm__ring_run(ctx->ring, timeout_ms);
    ctx->walking--;
    run_closing(ctx);
    return ret;
}

int lshm__ctx_pump(struct lshm_ctx *ctx)
{
    int ret;

    ctx->walking++;
    ret = lshm__ring_pump(ctx->ring);
    ctx->walking--;
    run_closing(ctx);
    return ret;
}

int lshm__ctx_flush(struct lshm_ctx *ctx)
{
    int ret;

    run_kicks(ctx);
    ret = lshm__ring_submit(ctx->ring);
    if (ret < 0 && ret != -EAGAIN && ret != -EBUSY && ret != -EINTR)
        return lshm__fail(ret, "io_uring_enter: %s", strerror(-ret));
    return ret < 0 ? 0 : ret;
}

void lshm__ctx_kick(struct lshm_ctx *ctx, struct lshm_port *port)
{
    ctx->ops->kick(port);
    lshm__ring_submit(ctx->ring);
}

void lshm__ctx_linger(struct lshm_ctx *ctx, bool (*busy)(const struct lshm_ctx *), int ms)
{
    long long end = lshm__now_ms() + ms;

    while (busy(ctx) && lshm__now_ms() < end) {
        lshm__ctx_step(ctx, 10);
        run_deadlines(ctx);
    }
}
