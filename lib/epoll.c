/*
 * The epoll carrier: the ring layer's operations done with non-blocking
 * socket calls and epoll readiness, for where io_uring is refused (the
 * default seccomp profiles of Docker and containerd, kernel.io_uring_disabled)
 * or not wanted (LSHM_CTX_NO_IO_URING).
 *
 * An operation is queued, started by submit, and when its socket says
 * EAGAIN it waits for epoll: a receive or accept for EPOLLIN, sends for
 * EPOLLOUT in the order they were queued.  Completions are kept in a list
 * and handed to their callbacks from run and pump, as io_uring's CQEs are:
 * never from inside the call that queued them.  Linked sends go out in
 * order and a failed one cancels the rest of its chain (-ECANCELED).
 * Timeouts wait on a timerfd, wake-ups on an eventfd, both in the epoll
 * set, whose fd is the context's pollable fd.
 *
 * When all there is to wait for is one socket's receive (a client, a
 * forked pair), the wait is that receive itself: a blocking recvmsg(2)
 * bounded by SO_RCVTIMEO, one system call where epoll_wait(2) and then
 * recvmsg(2) take two, and a socket wake-up where epoll adds its own.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "ring.h"

#define MAX_EVENTS       64
#define SEND_BATCH       64         /* linked sends given to one sendmmsg */
#define CONNECT_RETRY_NS 1000000LL  /* a full backlog: try connect again after 1 ms */
#define LONG_WAIT_MS     3600000    /* SO_RCVTIMEO of a wait without a limit */

/* Where an operation is (lshm_op.where). */
enum { AT_NONE, AT_QUEUED, AT_WAITING, AT_TIMER, AT_DONE };

/* What the carrier knows of one socket, indexed by fd. */
struct fdent {
    struct lshm_op *reader;             /* receive or accept waiting for EPOLLIN */
    struct lshm_op *wq_head, *wq_tail;  /* sends waiting for EPOLLOUT, in order */
    unsigned        nops;               /* operations queued or waiting */
    uint32_t        events;             /* registered with epoll; 0: not registered */
    bool            dirty;              /* on the dirty list: events may change */
    bool            readable;           /* the last receive got a datagram */
    signed char     blocking;           /* O_NONBLOCK clear: 1, set: 0 (by us for accept
                                         * and connect, or found), not known: -1 */
    int             rcvtimeo_ms;        /* SO_RCVTIMEO set, -1: not known */
};

struct lshm_epoll {
    int                   epfd, evfd, tfd;
    bool                  fd_asked;     /* the caller may poll epfd: wake it */
    bool                  woken;        /* evfd written, not yet read */
    unsigned              running;      /* inside run or pump */
    unsigned              entries, nqueued;
    struct lshm_op        *q_head, *q_tail;     /* queued, not started */
    struct lshm_op        *d_head, *d_tail;     /* completed, to dispatch */
    struct lshm_op        *timers;              /* unsorted */
    long long             timer_armed_ns;       /* tfd's deadline, 0: disarmed */
    struct fdent          **fds;
    int                   nfds;
    int                   n_in, n_out;  /* sockets registered for EPOLLIN, EPOLLOUT */
    long long             in_fd_sum;    /* sum of those for EPOLLIN: the fd when n_in is 1 */
    bool                  skipped_poll; /* the last run dispatched without looking */
    int                   *dirty;
    int                   ndirty, capdirty;
    struct lshm_ctx_stats stats;
};

static long long now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int watch(int epfd, int fd)
{
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };

    return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

int lshm__ep_new(struct lshm_epoll **out, unsigned entries)
{
    struct lshm_epoll *ep = calloc(1, sizeof(*ep));
    int ret;

    if (ep == NULL)
        return lshm__fail(-ENOMEM, "out of memory");
    ep->entries = entries;
    ep->epfd = epoll_create1(EPOLL_CLOEXEC);
    ep->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    ep->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    if (ep->epfd < 0 || ep->evfd < 0 || ep->tfd < 0) {
        ret = lshm__fail(-errno, "epoll carrier: %s", strerror(errno));
        goto fail;
    }
    if ((ret = watch(ep->epfd, ep->evfd)) < 0 || (ret = watch(ep->epfd, ep->tfd)) < 0) {
        ret = lshm__fail(ret, "epoll_ctl: %s", strerror(-ret));
        goto fail;
    }
    *out = ep;
    return 0;
fail:
    if (ep->epfd >= 0)
        close(ep->epfd);
    if (ep->evfd >= 0)
        close(ep->evfd);
    if (ep->tfd >= 0)
        close(ep->tfd);
    free(ep);
    return ret;
}

/* Closing the three fds touches nothing a forked parent shares. */
void lshm__ep_forget(struct lshm_epoll *ep)
{
    int i;

    close(ep->epfd);
    close(ep->evfd);
    close(ep->tfd);
    for (i = 0; i < ep->nfds; i++)
        free(ep->fds[i]);
    free(ep->fds);
    free(ep->dirty);
    free(ep);
}

/* Operations still queued or waiting are dropped: their owners are being
 * reaped with the context. */
void lshm__ep_free(struct lshm_epoll *ep)
{
    lshm__ep_forget(ep);
}

int lshm__ep_fd(struct lshm_epoll *ep)
{
    ep->fd_asked = true;
    return ep->epfd;
}

/* Record fd's epoll interest, keeping the counts poll_once() decides by. */
static void set_events(struct lshm_epoll *ep, int fd, struct fdent *fe, uint32_t events)
{
    if ((fe->events & EPOLLIN) != (events & EPOLLIN)) {
        ep->n_in += events & EPOLLIN ? 1 : -1;
        ep->in_fd_sum += events & EPOLLIN ? fd : -fd;
    }
    if ((fe->events & EPOLLOUT) != (events & EPOLLOUT))
        ep->n_out += events & EPOLLOUT ? 1 : -1;
    fe->events = events;
}

/* Out of the epoll set, and nothing known of the socket kept: the number
 * may next name another one. */
static void forget_fd(struct lshm_epoll *ep, int fd, struct fdent *fe)
{
    if (fe->events != 0)
        epoll_ctl(ep->epfd, EPOLL_CTL_DEL, fd, NULL);
    set_events(ep, fd, fe, 0);
    fe->readable = false;
    fe->blocking = -1;
    fe->rcvtimeo_ms = -1;
}

void lshm__ep_unwatch(struct lshm_epoll *ep, int fd)
{
    struct fdent *fe = fd >= 0 && fd < ep->nfds ? ep->fds[fd] : NULL;

    if (fe != NULL)
        forget_fd(ep, fd, fe);
}

void lshm__ep_wake(struct lshm_epoll *ep)
{
    uint64_t one = 1;

    if (!ep->fd_asked || ep->woken)
        return;
    if (write(ep->evfd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        lshm__log("eventfd write: %s", strerror(errno));
    ep->woken = true;
}

void lshm__ep_stats(const struct lshm_epoll *ep, struct lshm_ctx_stats *st)
{
    *st = ep->stats;
}

unsigned lshm__ep_space(const struct lshm_epoll *ep)
{
    return ep->nqueued < ep->entries ? ep->entries - ep->nqueued : 0;
}

static struct fdent *fdent_get(struct lshm_epoll *ep, int fd)
{
    if (fd >= ep->nfds) {
        int n = ep->nfds ? ep->nfds : 64;
        struct fdent **fds;

        while (n <= fd)
            n *= 2;
        fds = realloc(ep->fds, (size_t)n * sizeof(*fds));
        if (fds == NULL)
            return NULL;
        memset(fds + ep->nfds, 0, (size_t)(n - ep->nfds) * sizeof(*fds));
        ep->fds = fds;
        ep->nfds = n;
    }
    if (ep->fds[fd] == NULL && (ep->fds[fd] = calloc(1, sizeof(struct fdent))) != NULL) {
        ep->fds[fd]->blocking = -1;
        ep->fds[fd]->rcvtimeo_ms = -1;
    }
    return ep->fds[fd];
}

/* Its epoll interest is looked at before the next wait (sync_fds). */
static void mark_dirty(struct lshm_epoll *ep, int fd, struct fdent *fe)
{
    if (fe->dirty)
        return;
    if (ep->ndirty == ep->capdirty) {
        int n = ep->capdirty ? 2 * ep->capdirty : 16;
        int *d = realloc(ep->dirty, (size_t)n * sizeof(*d));

        if (d == NULL)
            return;     /* looked at when it is next marked */
        ep->dirty = d;
        ep->capdirty = n;
    }
    ep->dirty[ep->ndirty++] = fd;
    fe->dirty = true;
}

static void append(struct lshm_op **head, struct lshm_op **tail, struct lshm_op *op)
{
    op->next = NULL;
    if (*tail != NULL)
        (*tail)->next = op;
    else
        *head = op;
    *tail = op;
}

static bool unlink_op(struct lshm_op **head, struct lshm_op **tail, struct lshm_op *op)
{
    struct lshm_op *prev = NULL, *o;

    for (o = *head; o != NULL && o != op; o = o->next)
        prev = o;
    if (o == NULL)
        return false;
    if (prev != NULL)
        prev->next = op->next;
    else
        *head = op->next;
    if (*tail == op)
        *tail = prev;
    op->next = NULL;
    return true;
}

/* The operation is over: its callback runs from the next dispatch. */
static void post(struct lshm_epoll *ep, struct lshm_op *op, int res)
{
    op->res = res;
    op->where = AT_DONE;
    append(&ep->d_head, &ep->d_tail, op);
    if (op->kind != LSHM_OP_TIMEOUT && op->fd >= 0 && op->fd < ep->nfds &&
        ep->fds[op->fd] != NULL) {
        ep->fds[op->fd]->nops--;
        mark_dirty(ep, op->fd, ep->fds[op->fd]);
    }
}

/* A failed link cancels the sends linked behind it, as IOSQE_IO_LINK does. */
static void cancel_chain(struct lshm_epoll *ep, struct lshm_op *op, struct lshm_op **head,
                         struct lshm_op **tail)
{
    while (op->link && *head != NULL) {
        struct lshm_op *next = *head;

        *head = next->next;
        if (*head == NULL)
            *tail = NULL;
        if (head == &ep->q_head)
            ep->nqueued--;
        post(ep, next, -ECANCELED);
        op = next;
    }
}

static void arm_timerfd(struct lshm_epoll *ep)
{
    struct itimerspec its = { { 0, 0 }, { 0, 0 } };
    long long next = 0;
    struct lshm_op *t;

    for (t = ep->timers; t != NULL; t = t->next)
        if (next == 0 || t->due_ns < next)
            next = t->due_ns;
    if (next == ep->timer_armed_ns)
        return;
    ep->timer_armed_ns = next;
    its.it_value.tv_sec = next / 1000000000LL;
    its.it_value.tv_nsec = next % 1000000000LL;
    if (timerfd_settime(ep->tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0)
        lshm__log("timerfd_settime: %s", strerror(errno));
}

static void add_timer(struct lshm_epoll *ep, struct lshm_op *op, long long due_ns)
{
    op->due_ns = due_ns;
    op->where = AT_TIMER;
    op->next = ep->timers;
    ep->timers = op;
    if (ep->timer_armed_ns == 0 || due_ns < ep->timer_armed_ns)
        arm_timerfd(ep);
}

static bool remove_timer(struct lshm_epoll *ep, struct lshm_op *op)
{
    struct lshm_op **pp;

    for (pp = &ep->timers; *pp != NULL; pp = &(*pp)->next)
        if (*pp == op) {
            *pp = op->next;
            op->next = NULL;
            return true;
        }
    return false;
}

static int set_nonblock(struct fdent *fe, int fd)
{
    int fl;

    if (fe->blocking == 0)
        return 0;
    fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -errno;
    fe->blocking = 0;
    return 0;
}

/* A connected socket is blocking again: every call on it says
 * MSG_DONTWAIT, and its receive may be the wait (poll_once). */
static void clear_nonblock(struct lshm_epoll *ep, int fd)
{
    struct fdent *fe = ep->fds[fd];
    int fl = fcntl(fd, F_GETFL);

    if (fl >= 0 && fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) == 0)
        fe->blocking = 1;
}

/* One try of a socket call: its result, or -EAGAIN to wait for epoll. */
static int try_op(struct lshm_epoll *ep, struct lshm_op *op)
{
    ssize_t n;
    int ret;

    switch (op->kind) {
    case LSHM_OP_SEND:
        n = sendmsg(op->fd, op->arg, MSG_DONTWAIT | MSG_NOSIGNAL);
        break;
    case LSHM_OP_RECV:
        n = recvmsg(op->fd, op->arg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        break;
    case LSHM_OP_ACCEPT:
        n = accept4(op->fd, NULL, NULL, SOCK_CLOEXEC);
        break;
    case LSHM_OP_CONNECT:
        if (op->where == AT_WAITING) {
            /* EINPROGRESS earlier: the socket says how it ended. */
            socklen_t len = sizeof(ret);

            if (getsockopt(op->fd, SOL_SOCKET, SO_ERROR, &ret, &len) < 0)
                return -errno;
            if (ret != 0)
                return -ret;
            clear_nonblock(ep, op->fd);
            return 0;
        }
        n = connect(op->fd, op->arg, op->arglen);
        if (n < 0 && errno == EISCONN)
            n = 0;
        if (n == 0)
            clear_nonblock(ep, op->fd);
        break;
    default:
        return -EINVAL;
    }
    if (n < 0)
        return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    return n > INT32_MAX ? INT32_MAX : (int)n;
}

/* Start a queued operation: it completes now or waits for readiness. */
static void start(struct lshm_epoll *ep, struct lshm_op *op)
{
    struct fdent *fe;
    int res;

    ep->stats.submitted++;
    if (op->kind == LSHM_OP_TIMEOUT) {
        add_timer(ep, op, now_ns() + (long long)op->arglen * 1000000);
        return;
    }
    fe = ep->fds[op->fd];
    switch (op->kind) {
    case LSHM_OP_SEND:
        /* Behind sends already waiting: keep the order. */
        if (fe->wq_head != NULL) {
            op->where = AT_WAITING;
            append(&fe->wq_head, &fe->wq_tail, op);
            return;
        }
        res = try_op(ep, op);
        if (res == -EAGAIN) {
            op->where = AT_WAITING;
            append(&fe->wq_head, &fe->wq_tail, op);
            mark_dirty(ep, op->fd, fe);
            return;
        }
        post(ep, op, res);
        if (res < 0)
            cancel_chain(ep, op, &ep->q_head, &ep->q_tail);
        return;
    case LSHM_OP_RECV:
    case LSHM_OP_ACCEPT:
        if (fe->reader != NULL) {
            post(ep, op, -EBUSY);
            return;
        }
        if (op->kind == LSHM_OP_ACCEPT && (res = set_nonblock(fe, op->fd)) < 0) {
            post(ep, op, res);
            return;
        }
        /* A socket not in the epoll set yet may hold data already (a
         * HELLO sent before we adopted it), and one that just gave a
         * datagram likely holds more (a stream): try, as io_uring does.
         * Otherwise wait for EPOLLIN, level-triggered, so what came
         * shows in the next wait; trying would mostly say EAGAIN. */
        if (fe->events == 0 || fe->readable) {
            res = try_op(ep, op);
            fe->readable = res >= 0 && op->kind == LSHM_OP_RECV;
            if (res != -EAGAIN) {
                post(ep, op, res);
                return;
            }
        }
        op->where = AT_WAITING;
        fe->reader = op;
        mark_dirty(ep, op->fd, fe);
        return;
    case LSHM_OP_CONNECT:
        if ((res = set_nonblock(fe, op->fd)) < 0) {
            post(ep, op, res);
            return;
        }
        res = try_op(ep, op);
        if (res == -EAGAIN) {
            /* AF_UNIX: the listener's backlog is full.  Nothing to wait
             * on in epoll (an unconnected socket polls writable): retry. */
            add_timer(ep, op, now_ns() + CONNECT_RETRY_NS);
            return;
        }
        if (res == -EINPROGRESS) {
            op->where = AT_WAITING;
            append(&fe->wq_head, &fe->wq_tail, op);
            mark_dirty(ep, op->fd, fe);
            return;
        }
        post(ep, op, res);
        return;
    }
}

int lshm__ep_queue(struct lshm_epoll *ep, struct lshm_op *op, unsigned kind, int fd,
                   void *arg, unsigned arglen, bool link)
{
    struct fdent *fe = NULL;

    if (ep->nqueued >= ep->entries) {
        lshm__ep_submit(ep);
        if (ep->nqueued >= ep->entries)
            return -EBUSY;
    }
    if (kind != LSHM_OP_TIMEOUT) {
        if (fd < 0)
            return -EBADF;
        fe = fdent_get(ep, fd);
        if (fe == NULL)
            return -ENOMEM;
        fe->nops++;
    }
    op->kind = (unsigned char)kind;
    op->fd = kind == LSHM_OP_TIMEOUT ? -1 : fd;
    op->arg = arg;
    op->arglen = arglen;
    op->link = link;
    op->where = AT_QUEUED;
    append(&ep->q_head, &ep->q_tail, op);
    ep->nqueued++;
    return 0;
}

int lshm__ep_cancel(struct lshm_epoll *ep, struct lshm_op *op)
{
    struct fdent *fe = op->fd >= 0 && op->fd < ep->nfds ? ep->fds[op->fd] : NULL;
    bool found = false;

    switch (op->where) {
    case AT_QUEUED:
        found = unlink_op(&ep->q_head, &ep->q_tail, op);
        if (found)
            ep->nqueued--;
        break;
    case AT_WAITING:
        if (fe != NULL && fe->reader == op) {
            fe->reader = NULL;
            found = true;
        } else if (fe != NULL) {
            found = unlink_op(&fe->wq_head, &fe->wq_tail, op);
        }
        break;
    case AT_TIMER:
        found = remove_timer(ep, op);
        break;
    default:
        /* Completed already, or not ours: nothing to cancel. */
        return 0;
    }
    if (found)
        post(ep, op, -ECANCELED);
    return 0;
}

/*
 * A linked chain of sends on a socket with nothing waiting: as many as go
 * in one sendmmsg(2), each completed with its length.  Returns how many
 * left the queue; 0 leaves the first to start() (EAGAIN, an error).
 */
static int send_chain(struct lshm_epoll *ep, struct lshm_op *first)
{
    struct mmsghdr vec[SEND_BATCH];
    struct lshm_op *op = first;
    int n = 0, sent, i;

    for (; op != NULL && n < SEND_BATCH; op = op->next) {
        if (op->kind != LSHM_OP_SEND || op->fd != first->fd)
            break;
        vec[n].msg_hdr = *(const struct msghdr *)op->arg;
        vec[n].msg_len = 0;
        n++;
        if (!op->link)
            break;
    }
    sent = sendmmsg(first->fd, vec, (unsigned)n, MSG_DONTWAIT | MSG_NOSIGNAL);
    for (i = 0; i < sent; i++) {
        op = ep->q_head;
        ep->q_head = op->next;
        if (ep->q_head == NULL)
            ep->q_tail = NULL;
        ep->nqueued--;
        ep->stats.submitted++;
        post(ep, op, vec[i].msg_len > INT32_MAX ? INT32_MAX : (int)vec[i].msg_len);
    }
    return sent > 0 ? sent : 0;
}

static void sync_fds(struct lshm_epoll *ep);

int lshm__ep_submit(struct lshm_epoll *ep)
{
    struct lshm_op *op;
    int n = 0, k;

    while ((op = ep->q_head) != NULL) {
        /* A chain goes out in one call where the socket has room. */
        if (op->kind == LSHM_OP_SEND && op->link && ep->fds[op->fd]->wq_head == NULL &&
            (k = send_chain(ep, op)) > 0) {
            n += k;
            continue;
        }
        ep->q_head = op->next;
        if (ep->q_head == NULL)
            ep->q_tail = NULL;
        ep->nqueued--;
        start(ep, op);
        n++;
    }
    if (ep->running == 0 && ep->fd_asked) {
        /* The caller may sleep on the fd next, not in poll_once: the epoll
         * set must show the sockets waited on now (a receive started here
         * on a socket taken out of the set would wake nobody). */
        sync_fds(ep);
        /* Completions outside run: a caller asleep on the fd must come for them. */
        if (ep->d_head != NULL)
            lshm__ep_wake(ep);
    }
    return n;
}

/* Retry what waits on fd after epoll said it is ready. */
static void on_ready(struct lshm_epoll *ep, int fd, uint32_t events)
{
    struct fdent *fe = fd >= 0 && fd < ep->nfds ? ep->fds[fd] : NULL;
    struct lshm_op *op;
    int res;

    if (fe == NULL)
        return;
    if ((events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && fe->reader != NULL) {
        op = fe->reader;
        res = try_op(ep, op);
        fe->readable = res >= 0 && op->kind == LSHM_OP_RECV && (events & EPOLLIN) &&
                       !(events & EPOLLHUP);
        if (res != -EAGAIN) {
            fe->reader = NULL;
            post(ep, op, res);
        }
    }
    if (!(events & (EPOLLOUT | EPOLLHUP | EPOLLERR)))
        return;
    while ((op = fe->wq_head) != NULL) {
        res = try_op(ep, op);
        if (res == -EAGAIN)
            break;
        fe->wq_head = op->next;
        if (fe->wq_head == NULL)
            fe->wq_tail = NULL;
        post(ep, op, res);
        if (res < 0 && op->kind == LSHM_OP_SEND)
            cancel_chain(ep, op, &fe->wq_head, &fe->wq_tail);
    }
}

static void expire_timers(struct lshm_epoll *ep)
{
    long long now = now_ns();
    struct lshm_op **pp = &ep->timers, *op;

    while ((op = *pp) != NULL) {
        if (op->due_ns > now) {
            pp = &op->next;
            continue;
        }
        *pp = op->next;
        if (op->kind == LSHM_OP_CONNECT) {
            op->where = AT_NONE;
            start(ep, op);
        } else {
            post(ep, op, -ETIME);
        }
    }
    ep->timer_armed_ns = -1;    /* force: the timerfd fired or may have */
    arm_timerfd(ep);
}

/*
 * Bring each changed socket's epoll interest up to date: EPOLLIN while a
 * receive or accept waits, EPOLLOUT while sends do.  Level-triggered, so
 * a socket nobody waits on is taken out (its EPOLLHUP would never stop).
 * Done only before waiting: a receive completed and rearmed in between
 * costs no epoll_ctl.
 */
static void sync_fds(struct lshm_epoll *ep)
{
    int i;

    for (i = 0; i < ep->ndirty; i++) {
        int fd = ep->dirty[i];
        struct fdent *fe = ep->fds[fd];
        struct epoll_event ev = { .data.fd = fd };
        int op;

        fe->dirty = false;
        ev.events = (fe->reader ? EPOLLIN : 0) | (fe->wq_head ? EPOLLOUT : 0);
        if (ev.events == fe->events)
            continue;
        op = ev.events == 0 ? EPOLL_CTL_DEL : fe->events == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
        if (epoll_ctl(ep->epfd, op, fd, &ev) < 0) {
            /* Closed and reused since it was registered, or the other
             * way round: the kernel's view is the one to follow. */
            if (errno == ENOENT && op == EPOLL_CTL_MOD)
                epoll_ctl(ep->epfd, EPOLL_CTL_ADD, fd, &ev);
            else if (errno == EEXIST && op == EPOLL_CTL_ADD)
                epoll_ctl(ep->epfd, EPOLL_CTL_MOD, fd, &ev);
        }
        set_events(ep, fd, fe, ev.events);
    }
    ep->ndirty = 0;
}

/* The receive that was the wait or the look completed with res. */
static void recv_taken(struct lshm_epoll *ep, struct fdent *fe, struct lshm_op *op, int res)
{
    /* Not readable: the next receive waits in wait_in_recv() again (where
     * a datagram already there costs nothing more), not in a try that
     * mostly finds none. */
    fe->readable = false;
    fe->reader = NULL;
    post(ep, op, res);
}

/*
 * The wait as one blocking receive, when that is all there is to wait
 * for: one socket's receive (blocking, no O_NONBLOCK), no sends waiting
 * for room, no timer due within the wait (nor the time a cancelled one
 * left on the timerfd), no wake-up pending.  SO_RCVTIMEO bounds it (set
 * again only when the wait's length changes).  A look
 * (timeout 0) is the receive with MSG_DONTWAIT: one call where
 * epoll_wait(2) and recvmsg(2) take two when a datagram is there.  False
 * when the wait must go to epoll.
 */
static bool wait_in_recv(struct lshm_epoll *ep, int timeout_ms)
{
    struct fdent *fe;
    struct lshm_op *op;
    int fd, res, ms;

    if (ep->n_in != 1 || ep->n_out != 0 || ep->woken || ep->q_head != NULL)
        return false;
    fd = (int)ep->in_fd_sum;
    if (fd < 0 || fd >= ep->nfds || (fe = ep->fds[fd]) == NULL || (op = fe->reader) == NULL ||
        op->kind != LSHM_OP_RECV)
        return false;
    /* The timerfd, not the list: a cancelled timeout leaves it armed, and
     * when that time comes only epoll_wait reads it (the caller's poll on
     * the fd would otherwise never stop waking). */
    if (ep->timer_armed_ns != 0) {
        long long left = ep->timer_armed_ns - now_ns();

        if (timeout_ms < 0 || left <= (long long)timeout_ms * 1000000)
            return false;
    }
    if (timeout_ms == 0) {
        /* A look: the receive itself, without waiting. */
        ep->stats.enters++;
        res = (int)recvmsg(fd, op->arg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (res < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return true;
        recv_taken(ep, fe, op, res < 0 ? -errno : res);
        return true;
    }
    if (fe->blocking < 0) {
        int fl = fcntl(fd, F_GETFL);

        fe->blocking = fl >= 0 && !(fl & O_NONBLOCK);
    }
    if (!fe->blocking)
        return false;
    /* Never without a timeout: a receive with none is restarted after a
     * signal handler with SA_RESTART, where a wait must return (as
     * epoll_wait does).  A wait without a limit takes turns of an hour. */
    ms = timeout_ms < 0 ? LONG_WAIT_MS : timeout_ms;
    if (fe->rcvtimeo_ms != ms) {
        struct timeval tv = { ms / 1000, ms % 1000 * 1000 };

        if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0)
            return false;
        fe->rcvtimeo_ms = ms;
    }
    for (;;) {
        long long t0 = now_ns();

        ep->stats.enters++;
        res = (int)recvmsg(fd, op->arg, MSG_CMSG_CLOEXEC);
        if (res < 0)
            res = errno == EWOULDBLOCK ? -EAGAIN : -errno;
        if (res != -EAGAIN)
            break;
        /* Over well before its time: the socket is not as we set it (a
         * process that passed it to us and kept a copy made it
         * non-blocking, or changed its timeout).  Look again next wait. */
        if (now_ns() - t0 < (long long)ms * 500000) {
            fe->blocking = -1;
            fe->rcvtimeo_ms = -1;
            break;
        }
        if (timeout_ms >= 0)
            break;
    }
    /* Timed out, or a signal: as an epoll_wait that saw nothing. */
    if (res != -EAGAIN && res != -EINTR)
        recv_taken(ep, fe, op, res);
    return true;
}

/* Wait up to timeout_ms (-1: forever) for readiness and act on it. */
static void poll_once(struct lshm_epoll *ep, int timeout_ms)
{
    struct epoll_event evs[MAX_EVENTS];
    int i, n;

    lshm__ep_submit(ep);
    if (ep->d_head != NULL)
        timeout_ms = 0;
    sync_fds(ep);
    if (wait_in_recv(ep, timeout_ms))
        return;
    n = epoll_wait(ep->epfd, evs, MAX_EVENTS, timeout_ms);
    ep->stats.enters++;
    for (i = 0; i < n; i++) {
        int fd = evs[i].data.fd;

        if (fd == ep->evfd) {
            uint64_t v;

            if (read(ep->evfd, &v, sizeof(v)) < 0 && errno != EAGAIN)
                lshm__log("eventfd read: %s", strerror(errno));
            ep->woken = false;
        } else if (fd == ep->tfd) {
            uint64_t v;

            if (read(ep->tfd, &v, sizeof(v)) < 0 && errno != EAGAIN)
                lshm__log("timerfd read: %s", strerror(errno));
            expire_timers(ep);
        } else {
            on_ready(ep, fd, evs[i].events);
        }
    }
}

/*
 * Hand completions to their callbacks.  A socket nobody waits on any more
 * leaves the epoll set right after its last callback: its owner may close
 * it only then, and a new socket may get the same number.
 */
static int dispatch(struct lshm_epoll *ep)
{
    struct lshm_op *op;
    int n = 0;

    while ((op = ep->d_head) != NULL) {
        int fd = op->kind == LSHM_OP_TIMEOUT ? -1 : op->fd;
        struct fdent *fe;

        ep->d_head = op->next;
        if (ep->d_head == NULL)
            ep->d_tail = NULL;
        op->where = AT_NONE;
        op->next = NULL;
        n++;
        op->complete(op, op->res, false, NULL, 0);
        if (fd >= 0 && (fe = ep->fds[fd]) != NULL && fe->nops == 0)
            forget_fd(ep, fd, fe);
    }
    ep->stats.completions += (uint64_t)n;
    return n;
}

int lshm__ep_pump(struct lshm_epoll *ep)
{
    int n;

    ep->running++;
    lshm__ep_submit(ep);
    n = dispatch(ep);
    ep->running--;
    return n;
}

int lshm__ep_run(struct lshm_epoll *ep, int timeout_ms)
{
    int n;

    ep->running++;
    lshm__ep_submit(ep);
    n = dispatch(ep);
    /* Look at the sockets even when something completed, every other
     * run at least: a caller whose every run completes a send must still
     * come to its receives, and one that runs again to sleep (after its
     * reply's send completed) saves a look. */
    if (n == 0 || ep->skipped_poll) {
        poll_once(ep, n > 0 ? 0 : timeout_ms);
        n += dispatch(ep);
        ep->skipped_poll = false;
    } else {
        ep->skipped_poll = true;
    }
    ep->running--;
    return n;
}
