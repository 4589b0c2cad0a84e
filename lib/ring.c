/*
 * The io_uring behind a context: set-up with fallbacks, provided buffers for
 * multishot receives, submission and completion dispatch.  A ring whose ep
 * is set runs on the epoll carrier instead (epoll.c): chosen when io_uring
 * is refused or on request, and each function hands over to it first.
 */
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ring.h"

/*
 * Futex opcodes (kernel 6.7), newer than the liburing that Debian 12 ships:
 * the values of the kernel's enum io_uring_op and futex2 flags.  Whether
 * the running kernel has them is probed, never assumed.
 */
#define OP_FUTEX_WAIT      51
#define OP_FUTEX_WAKE      52
#define FUTEX2_SIZE_U32    0x02u
#define FUTEX_MATCH_ANY    0xffffffffu

#define BUF_GROUP    1
#define BUF_COUNT    128u    /* provided buffers shared by the context's ports */

struct lshm_ring {
    struct lshm_epoll        *ep;            /* NULL: io_uring */
    struct io_uring          ring;
    unsigned                 features;       /* LSHM_FEAT_* */
    bool                     has_evfd;       /* evfd registered for lshm__ring_fd */
    int                      evfd;
    struct io_uring_buf_ring *br;            /* NULL: no provided buffers */
    size_t                   br_size;
    uint8_t                  *bufs;          /* BUF_COUNT * LSHM_RING_BUF_SIZE */
    struct lshm_ctx_stats    stats;
    unsigned                 sends;          /* sends submitted, not completed */
    bool                     taskrun_flag;   /* the kernel flags pending task work */
    char                     carrier[200];   /* lshm__ring_carrier() */
};

/* Set-up flags in the order we try them: best first. */
static const struct {
    unsigned flags;
    unsigned feats;
} setups[] = {
    { IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_SUBMIT_ALL |
      IORING_SETUP_TASKRUN_FLAG,
      LSHM_FEAT_SINGLE_ISSUER | LSHM_FEAT_DEFER_TASKRUN },
    { IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_SUBMIT_ALL,
      LSHM_FEAT_SINGLE_ISSUER | LSHM_FEAT_DEFER_TASKRUN },
    { IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL,
      LSHM_FEAT_SINGLE_ISSUER | LSHM_FEAT_COOP_TASKRUN },
    { IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL, LSHM_FEAT_COOP_TASKRUN },
    { 0, 0 },
};

static int disabled_why(int err)
{
    char val[16] = "";
    FILE *f;

    if (err == -ENOSYS)
        return lshm__fail(err, "io_uring is not available: the kernel was built without it "
                              "(CONFIG_IO_URING) or a seccomp filter hides it");
    if (err != -EPERM && err != -EACCES)
        return lshm__fail(err, "io_uring_setup failed: %s", strerror(-err));
    f = fopen("/proc/sys/kernel/io_uring_disabled", "r");
    if (f != NULL) {
        if (fgets(val, sizeof(val), f) == NULL)
            val[0] = '\0';
        fclose(f);
    }
    if (val[0] == '2')
        return lshm__fail(-EPERM, "io_uring is disabled by sysctl kernel.io_uring_disabled=2; "
                                 "set it to 0 to use liblinuxshm");
    if (val[0] == '1')
        return lshm__fail(-EPERM, "io_uring is restricted by sysctl kernel.io_uring_disabled=1 "
                                 "to the group in kernel.io_uring_group; join it or set the "
                                 "sysctl to 0");
    return lshm__fail(-EPERM, "io_uring_setup is refused (EPERM), most likely by a seccomp "
                             "profile (container runtime); allow io_uring_setup/enter/register");
}

static int setup_buffers(struct lshm_ring *r)
{
    struct io_uring_buf_reg reg;
    unsigned i;
    int ret;

    r->br_size = BUF_COUNT * sizeof(struct io_uring_buf);
    r->br = mmap(NULL, r->br_size, PROT_READ | PROT_WRITE,
                 MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (r->br == MAP_FAILED) {
        r->br = NULL;
        return -ENOMEM;
    }
    r->bufs = malloc((size_t)BUF_COUNT * LSHM_RING_BUF_SIZE);
    if (r->bufs == NULL)
        goto fail;
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (unsigned long)r->br;
    reg.ring_entries = BUF_COUNT;
    reg.bgid = BUF_GROUP;
    ret = io_uring_register_buf_ring(&r->ring, &reg, 0);
    if (ret < 0)
        goto fail;
    io_uring_buf_ring_init(r->br);
    for (i = 0; i < BUF_COUNT; i++)
        io_uring_buf_ring_add(r->br, r->bufs + (size_t)i * LSHM_RING_BUF_SIZE,
                              LSHM_RING_BUF_SIZE, i, io_uring_buf_ring_mask(BUF_COUNT), i);
    io_uring_buf_ring_advance(r->br, BUF_COUNT);
    return 0;
fail:
    munmap(r->br, r->br_size);
    r->br = NULL;
    free(r->bufs);
    r->bufs = NULL;
    return -ENOTSUP;
}

/* Does the kernel's probe list both opcodes? */
static bool ops_supported(struct lshm_ring *r, int op1, int op2)
{
    struct io_uring_probe *p = io_uring_get_probe_ring(&r->ring);
    bool ok;

    if (p == NULL)
        return false;
    ok = io_uring_opcode_supported(p, op1) && io_uring_opcode_supported(p, op2);
    io_uring_free_probe(p);
    return ok;
}

static bool futex_ops_work(struct lshm_ring *r)
{
    return ops_supported(r, OP_FUTEX_WAIT, OP_FUTEX_WAKE);
}

static bool multishot_recvmsg_works(struct lshm_ring *r)
{
    /* IORING_OP_SOCKET arrived in 5.19, multishot recvmsg in 6.0: the
     * probe has no bit for the flag itself, so go by a sibling opcode
     * of 6.0 (IORING_OP_SEND_ZC). */
    return ops_supported(r, IORING_OP_RECVMSG, IORING_OP_SEND_ZC);
}

/* io_uring refused by policy or missing: the cases the epoll carrier is for. */
static bool io_uring_refused(int err)
{
    return err == -EPERM || err == -EACCES || err == -ENOSYS;
}

static int use_epoll(struct lshm_ring *r, unsigned entries, const char *why)
{
    int ret = lshm__ep_new(&r->ep, entries);

    if (ret < 0)
        return ret;
    r->features = LSHM_FEAT_EPOLL;
    snprintf(r->carrier, sizeof(r->carrier), "epoll: %s", why);
    lshm__log("context on the epoll carrier: %s", why);
    return 0;
}

/* LSHM_NO_IO_URING=1 in the environment: as LSHM_CTX_NO_IO_URING. */
static bool env_forbids_io_uring(void)
{
    const char *v = getenv("LSHM_NO_IO_URING");

    return v != NULL && v[0] != '\0' && strcmp(v, "0") != 0;
}

int lshm__ring_new(struct lshm_ring **out, unsigned entries, unsigned ctx_flags)
{
    struct lshm_ring *r;
    unsigned i = 0;
    int ret = -EINVAL;

    r = calloc(1, sizeof(*r));
    if (r == NULL)
        return lshm__fail(-ENOMEM, "out of memory");
    if (!(ctx_flags & LSHM_CTX_IO_URING_ONLY) &&
        ((ctx_flags & LSHM_CTX_NO_IO_URING) || env_forbids_io_uring())) {
        ret = use_epoll(r, entries, (ctx_flags & LSHM_CTX_NO_IO_URING) ?
                        "asked for with LSHM_CTX_NO_IO_URING" :
                        "asked for with LSHM_NO_IO_URING in the environment");
        if (ret < 0)
            goto fail;
        *out = r;
        return 0;
    }
    if (ctx_flags & LSHM_CTX_NO_DEFER_TASKRUN)
        i = ARRAY_SIZE(setups) - 1;
    for (; i < ARRAY_SIZE(setups); i++) {
        ret = io_uring_queue_init(entries, &r->ring, setups[i].flags);
        if (ret != -EINVAL)
            break;
    }
    if (ret < 0) {
        if (ret == -ENOMEM)
            ret = lshm__fail(ret, "io_uring_setup: out of memory (RLIMIT_MEMLOCK too low "
                             "for %u entries?)", entries);
        else if (ret == -EMFILE || ret == -ENFILE)
            ret = lshm__fail(ret, "io_uring_setup: %s", lshm__limit_text(ret));
        else
            ret = disabled_why(ret);
        if ((ctx_flags & LSHM_CTX_IO_URING_ONLY) || !io_uring_refused(ret))
            goto fail;
        /* The reason stays in lshm_last_error() for whoever looks. */
        ret = use_epoll(r, entries, lshm_last_error());
        if (ret < 0)
            goto fail;
        *out = r;
        return 0;
    }
    r->features = setups[i].feats;
    r->taskrun_flag = (setups[i].flags & IORING_SETUP_TASKRUN_FLAG) != 0;
    snprintf(r->carrier, sizeof(r->carrier), "io_uring");
    if (!(ctx_flags & LSHM_CTX_NO_MULTISHOT) && multishot_recvmsg_works(r) &&
        setup_buffers(r) == 0)
        r->features |= LSHM_FEAT_MULTISHOT_RECV | LSHM_FEAT_BUF_RING |
                       LSHM_FEAT_MULTISHOT_ACCEPT;
    if (!(ctx_flags & LSHM_CTX_NO_FUTEX) && futex_ops_work(r))
        r->features |= LSHM_FEAT_FUTEX;
    *out = r;
    return 0;
fail:
    free(r);
    return ret;
}

const char *lshm__ring_carrier(const struct lshm_ring *r)
{
    return r->carrier;
}

static void release(struct lshm_ring *r)
{
    if (r->has_evfd)
        close(r->evfd);
    if (r->br != NULL)
        munmap(r->br, r->br_size);
    free(r->bufs);
    free(r);
}

void lshm__ring_free(struct lshm_ring *r)
{
    if (r == NULL)
        return;
    if (r->ep != NULL) {
        lshm__ep_free(r->ep);
        free(r);
        return;
    }
    if (r->br != NULL)
        io_uring_unregister_buf_ring(&r->ring, BUF_GROUP);
    io_uring_queue_exit(&r->ring);
    release(r);
}

void lshm__ring_forget(struct lshm_ring *r)
{
    if (r == NULL)
        return;
    if (r->ep != NULL) {
        lshm__ep_forget(r->ep);
        free(r);
        return;
    }
    /* io_uring_queue_exit() only unmaps and closes: nothing the parent's
     * ring can feel.  Unregistering anything would reach it. */
    io_uring_queue_exit(&r->ring);
    release(r);
}

/*
 * With DEFER_TASKRUN a completion waits as task work until we enter, and
 * that wakes no poll(2) on the ring fd.  A registered eventfd is signalled
 * for that work too; it is made on first use and drained by lshm__ring_run.
 */
int lshm__ring_fd(const struct lshm_ring *cr)
{
    struct lshm_ring *r = (struct lshm_ring *)cr;
    int fd;

    if (r->ep != NULL)
        return lshm__ep_fd(r->ep);
    if (r->has_evfd)
        return r->evfd;
    fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd < 0)
        return r->ring.ring_fd;
    if (io_uring_register_eventfd(&r->ring, fd) < 0) {
        close(fd);
        return r->ring.ring_fd;
    }
    r->evfd = fd;
    r->has_evfd = true;
    return fd;
}

void lshm__ring_close(struct lshm_ring *r, int fd)
{
    if (r != NULL && r->ep != NULL)
        lshm__ep_unwatch(r->ep, fd);
    close(fd);
}

void lshm__ring_wake(struct lshm_ring *r)
{
    uint64_t one = 1;

    if (unlikely(r->ep != NULL)) {
        lshm__ep_wake(r->ep);
        return;
    }
    if (r->has_evfd && write(r->evfd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        lshm__log("eventfd write: %s", strerror(errno));
}

unsigned lshm__ring_features(const struct lshm_ring *r)
{
    return r->features;
}

void lshm__ring_stats(const struct lshm_ring *r, struct lshm_ctx_stats *st)
{
    if (r->ep != NULL) {
        lshm__ep_stats(r->ep, st);
        return;
    }
    *st = r->stats;
}

unsigned lshm__ring_space(struct lshm_ring *r)
{
    if (unlikely(r->ep != NULL))
        return lshm__ep_space(r->ep);
    return io_uring_sq_space_left(&r->ring);
}

static struct io_uring_sqe *get_sqe(struct lshm_ring *r)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);

    if (sqe == NULL) {
        /* The SQ is full: submit what is there to make room. */
        lshm__ring_submit(r);
        sqe = io_uring_get_sqe(&r->ring);
    }
    return sqe;
}

int lshm__ring_sendmsg(struct lshm_ring *r, int fd, const struct msghdr *m,
                      struct lshm_op *op, bool link)
{
    struct io_uring_sqe *sqe;

    if (unlikely(r->ep != NULL))
        return lshm__ep_queue(r->ep, op, LSHM_OP_SEND, fd, (void *)m, 0, link);
    sqe = get_sqe(r);
    if (sqe == NULL)
        return -EBUSY;
    io_uring_prep_sendmsg(sqe, fd, m, MSG_NOSIGNAL);
    io_uring_sqe_set_data(sqe, op);
    if (link)
        sqe->flags |= IOSQE_IO_LINK;
    return 0;
}

int lshm__ring_recvmsg(struct lshm_ring *r, int fd, struct msghdr *m, struct lshm_op *op)
{
    struct io_uring_sqe *sqe;

    if (unlikely(r->ep != NULL))
        return lshm__ep_queue(r->ep, op, LSHM_OP_RECV, fd, m, 0, false);
    sqe = get_sqe(r);
    if (sqe == NULL)
        return -EBUSY;
    io_uring_prep_recvmsg(sqe, fd, m, MSG_CMSG_CLOEXEC);
    io_uring_sqe_set_data(sqe, op);
    return 0;
}

int lshm__ring_recvmsg_multishot(struct lshm_ring *r, int fd, struct msghdr *m,
                                struct lshm_op *op)
{
    struct io_uring_sqe *sqe;

    if (r->br == NULL)
        return -ENOTSUP;
    sqe = get_sqe(r);
    if (sqe == NULL)
        return -EBUSY;
    io_uring_prep_recvmsg_multishot(sqe, fd, m, MSG_CMSG_CLOEXEC);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = BUF_GROUP;
    io_uring_sqe_set_data(sqe, op);
    return 0;
}

void lshm__ring_buf_put(struct lshm_ring *r, void *buf)
{
    size_t off = (uint8_t *)buf - r->bufs;
    unsigned bid = off / LSHM_RING_BUF_SIZE;

    io_uring_buf_ring_add(r->br, buf, LSHM_RING_BUF_SIZE, bid,
                          io_uring_buf_ring_mask(BUF_COUNT), 0);
    io_uring_buf_ring_advance(r->br, 1);
}

bool lshm__ring_recvmsg_parse(void *buf, unsigned len, const struct msghdr *m,
                             void **payload, unsigned *payload_len, struct msghdr *out)
{
    struct msghdr tmpl = *m;
    struct io_uring_recvmsg_out *o;

    o = io_uring_recvmsg_validate(buf, (int)len, &tmpl);
    if (o == NULL)
        return false;
    memset(out, 0, sizeof(*out));
    out->msg_flags = o->flags;
    out->msg_controllen = o->controllen;
    out->msg_control = o->controllen ? (uint8_t *)(o + 1) + tmpl.msg_namelen : NULL;
    *payload = io_uring_recvmsg_payload(o, &tmpl);
    *payload_len = io_uring_recvmsg_payload_length(o, (int)len, &tmpl);
    /* A datagram longer than the buffer is cut: the kernel says so in
     * the flags, and payloadlen holds the full length. */
    if (o->payloadlen > *payload_len)
        out->msg_flags |= MSG_TRUNC;
    return true;
}

int lshm__ring_accept(struct lshm_ring *r, int fd, struct lshm_op *op, bool multishot)
{
    struct io_uring_sqe *sqe;

    if (r->ep != NULL)
        return lshm__ep_queue(r->ep, op, LSHM_OP_ACCEPT, fd, NULL, 0, false);
    sqe = get_sqe(r);
    if (sqe == NULL)
        return -EBUSY;
    if (multishot && (r->features & LSHM_FEAT_MULTISHOT_ACCEPT))
        io_uring_prep_multishot_accept(sqe, fd, NULL, NULL, SOCK_CLOEXEC);
    else
        io_uring_prep_accept(sqe, fd, NULL, NULL, SOCK_CLOEXEC);
    io_uring_sqe_set_data(sqe, op);
    return 0;
}

int lshm__ring_connect(struct lshm_ring *r, int fd, const struct sockaddr *addr,
                      socklen_t len, struct lshm_op *op)
{
    struct io_uring_sqe *sqe;

    if (r->ep != NULL)
        return lshm__ep_queue(r->ep, op, LSHM_OP_CONNECT, fd, (void *)addr, len, false);
    sqe = get_sqe(r);
    if (sqe == NULL)
        return -EBUSY;
    io_uring_prep_connect(sqe, fd, addr, len);
    io_uring_sqe_set_data(sqe, op);
    return 0;
}

int lshm__ring_timeout(struct lshm_ring *r, unsigned ms, struct lshm_op *op)
{
    struct io_uring_sqe *sqe;

    if (r->ep != NULL)
        return lshm__ep_queue(r->ep, op, LSHM_OP_TIMEOUT, -1, NULL, ms, false);
    sqe = get_sqe(r);
    if (sqe == NULL)
        return -EBUSY;
    /* The kernel reads the timespec when the SQE is submitted, which may
     * be later than this call: it lives in the operation, one each. */
    op->ts.tv_sec = ms / 1000;
    op->ts.tv_nsec = (long long)(ms % 1000) * 1000000;
    io_uring_prep_timeout(sqe, &op->ts, 0, 0);
    io_uring_sqe_set_data(sqe, op);
    return 0;
}

static void prep_futex(struct io_uring_sqe *sqe, int opcode, uint32_t *word, uint64_t val)
{
    /* Shared, not private: the word is in a memfd another process maps. */
    io_uring_prep_rw(opcode, sqe, (int)FUTEX2_SIZE_U32, word, 0, val);
    sqe->rw_flags = 0;
    sqe->addr3 = FUTEX_MATCH_ANY;
}

int lshm__ring_futex_wait(struct lshm_ring *r, uint32_t *word, uint32_t val,
                          struct lshm_op *op)
{
    struct io_uring_sqe *sqe;

    /* The epoll carrier has no futex wait to run beside its sockets: its
     * peers wake it with WAKE datagrams. */
    if (unlikely(r->ep != NULL) || !(r->features & LSHM_FEAT_FUTEX))
        return -EOPNOTSUPP;
    sqe = get_sqe(r);
    if (sqe == NULL)
        return -EBUSY;
    prep_futex(sqe, OP_FUTEX_WAIT, word, val);
    io_uring_sqe_set_data(sqe, op);
    return 0;
}

int lshm__ring_futex_wake(struct lshm_ring *r, uint32_t *word)
{
    struct io_uring_sqe *sqe;

    if (unlikely(r->ep != NULL) || !(r->features & LSHM_FEAT_FUTEX))
        return -EOPNOTSUPP;
    sqe = get_sqe(r);
    if (sqe == NULL)
        return -EBUSY;
    prep_futex(sqe, OP_FUTEX_WAKE, word, 1);
    /* Nothing to learn from a wake that worked: no completion for it. */
    sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
    io_uring_sqe_set_data(sqe, NULL);
    return 0;
}

int lshm__ring_cancel(struct lshm_ring *r, struct lshm_op *op)
{
    struct io_uring_sqe *sqe;

    if (r->ep != NULL)
        return lshm__ep_cancel(r->ep, op);
    sqe = get_sqe(r);
    if (sqe == NULL)
        return -EBUSY;
    io_uring_prep_cancel(sqe, op, 0);
    io_uring_sqe_set_data(sqe, NULL);
    return 0;
}

int lshm__ring_submit(struct lshm_ring *r)
{
    int ret;

    if (unlikely(r->ep != NULL))
        return lshm__ep_submit(r->ep);
    if (io_uring_sq_ready(&r->ring) == 0)
        return 0;
    ret = io_uring_submit(&r->ring);
    r->stats.enters++;
    if (ret > 0)
        r->stats.submitted += ret;
    return ret;
}

static int dispatch(struct lshm_ring *r)
{
    struct io_uring_cqe *cqe;
    unsigned n = 0;

    /* Handlers may queue new SQEs; they never free the ring itself. */
    while (io_uring_peek_cqe(&r->ring, &cqe) == 0) {
        struct lshm_op *op = io_uring_cqe_get_data(cqe);
        int res = cqe->res;
        unsigned flags = cqe->flags;
        void *buf = NULL;
        unsigned len = 0;

        io_uring_cqe_seen(&r->ring, cqe);
        n++;
        if (flags & IORING_CQE_F_BUFFER) {
            buf = r->bufs + (size_t)(flags >> IORING_CQE_BUFFER_SHIFT) * LSHM_RING_BUF_SIZE;
            len = res > 0 ? (unsigned)res : 0;
        }
        if (op != NULL)
            op->complete(op, res, flags & IORING_CQE_F_MORE, buf, len);
        else if (buf != NULL)
            lshm__ring_buf_put(r, buf);
    }
    r->stats.completions += n;
    return (int)n;
}

bool lshm__ring_is_idle(struct lshm_ring *r)
{
    /* Only an epoll_wait can tell whether a socket is ready. */
    if (unlikely(r->ep != NULL))
        return false;
    /* Without the flag, completions may wait as task work unseen; with
     * the eventfd of lshm_ctx_fd, only a run drains it. */
    if (!r->taskrun_flag || r->has_evfd)
        return false;
    return io_uring_sq_ready(&r->ring) == 0 && r->sends == 0 &&
           io_uring_cq_ready(&r->ring) == 0 &&
           !(IO_URING_READ_ONCE(*r->ring.sq.kflags) & IORING_SQ_TASKRUN);
}

bool lshm__ring_has_completions(struct lshm_ring *r)
{
    if (unlikely(r->ep != NULL) || !r->taskrun_flag)
        return false;
    return io_uring_cq_ready(&r->ring) != 0 ||
           (IO_URING_READ_ONCE(*r->ring.sq.kflags) & IORING_SQ_TASKRUN);
}

void lshm__ring_sends(struct lshm_ring *r, int delta)
{
    r->sends += delta;
}

/*
 * Submit and run completions without sleeping.  Under DEFER_TASKRUN each
 * link of a chain runs as task work queued by the one before, and the
 * kernel keeps running such work only while fewer than min_complete items
 * ran: asking for the links behind the head lets a whole chain go out in
 * this one enter.  The zero timeout keeps it from sleeping, but arming it
 * costs a trip through the scheduler when too little happens, so a lone
 * send (which completes during submission) asks for nothing.
 */
static int enter_nowait(struct lshm_ring *r)
{
    struct __kernel_timespec zero = { 0, 0 };
    struct io_uring_cqe *cqe;
    unsigned queued = io_uring_sq_ready(&r->ring);
    unsigned want = r->sends > 1 ? r->sends - 1 : 0;
    int ret;

    if (want > r->ring.cq.ring_entries)
        want = r->ring.cq.ring_entries;
    if (want == 0)
        ret = io_uring_submit_and_get_events(&r->ring);
    else
        ret = io_uring_submit_and_wait_timeout(&r->ring, &cqe, want, &zero, NULL);
    r->stats.enters++;
    r->stats.submitted += queued - io_uring_sq_ready(&r->ring);
    if (ret == -ETIME || ret == -EINTR || ret == -EAGAIN || ret == -EBUSY)
        ret = 0;
    if (ret < 0)
        return lshm__fail(ret, "io_uring_enter: %s", strerror(-ret));
    return 0;
}

int lshm__ring_pump(struct lshm_ring *r)
{
    int ret;

    if (unlikely(r->ep != NULL))
        return lshm__ep_pump(r->ep);
    ret = enter_nowait(r);

    if (ret < 0)
        return ret;
    return dispatch(r);
}

int lshm__ring_run(struct lshm_ring *r, int timeout_ms)
{
    struct io_uring_cqe *cqe;
    int ret, n;

    if (unlikely(r->ep != NULL))
        return lshm__ep_run(r->ep, timeout_ms);
    if (r->has_evfd) {
        uint64_t v;

        /* Reset before looking: whatever comes later signals it again. */
        if (read(r->evfd, &v, sizeof(v)) < 0 && errno != EAGAIN)
            lshm__log("eventfd read: %s", strerror(errno));
    }
    n = dispatch(r);
    if (n == 0 && timeout_ms != 0 && r->sends > 0) {
        /* Move chains along before sleeping: their links only run in an
         * enter that asks for them. */
        ret = enter_nowait(r);
        if (ret < 0)
            return ret;
        n = dispatch(r);
    }
    if (n > 0 || timeout_ms == 0) {
        /* Something happened, or the caller won't wait: submit and
         * collect what is ready in one enter. */
        if (n > 0 && io_uring_sq_ready(&r->ring) == 0 && r->sends == 0)
            return n;
        ret = enter_nowait(r);
    } else {
        struct __kernel_timespec ts, *tsp = NULL;
        unsigned queued = io_uring_sq_ready(&r->ring);

        if (timeout_ms > 0) {
            ts.tv_sec = timeout_ms / 1000;
            ts.tv_nsec = (long long)(timeout_ms % 1000) * 1000000;
            tsp = &ts;
        }
        ret = io_uring_submit_and_wait_timeout(&r->ring, &cqe, 1, tsp, NULL);
        r->stats.enters++;
        if (ret > 0)
            r->stats.submitted += queued;
        if (ret == -ETIME || ret == -EINTR)
            ret = 0;
    }
    if (ret < 0 && ret != -EBUSY && ret != -EAGAIN)
        return lshm__fail(ret, "io_uring_enter: %s", strerror(-ret));
    return n + dispatch(r);
}

int lshm__ring_probe(struct lshm_probe *p)
{
    static const unsigned all[] = {
        IORING_SETUP_IOPOLL, IORING_SETUP_SQPOLL, IORING_SETUP_CLAMP,
        IORING_SETUP_SUBMIT_ALL, IORING_SETUP_COOP_TASKRUN,
        IORING_SETUP_TASKRUN_FLAG, IORING_SETUP_SQE128, IORING_SETUP_CQE32,
        IORING_SETUP_SINGLE_ISSUER,
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
    };
    struct io_uring_probe *pr;
    struct lshm_ring *r;
    struct io_uring ring;
    unsigned i;
    int ret;

    ret = lshm__ring_new(&r, 8, LSHM_CTX_IO_URING_ONLY);
    if (ret < 0) {
        p->io_uring = ret;
        snprintf(p->io_uring_why, sizeof(p->io_uring_why), "%s", lshm_last_error());
        /* What a context will run on instead. */
        if (io_uring_refused(ret))
            p->features = LSHM_FEAT_EPOLL;
        return 0;
    }
    p->io_uring = 0;
    p->features = r->features;
    pr = io_uring_get_probe_ring(&r->ring);
    if (pr != NULL) {
        p->op_sendmsg = io_uring_opcode_supported(pr, IORING_OP_SENDMSG);
        p->op_recvmsg = io_uring_opcode_supported(pr, IORING_OP_RECVMSG);
        p->op_accept = io_uring_opcode_supported(pr, IORING_OP_ACCEPT);
        io_uring_free_probe(pr);
    }
    lshm__ring_free(r);

    p->setup_flags = 0;
    for (i = 0; i < ARRAY_SIZE(all); i++) {
        /* SQPOLL may need privileges; the question is only whether the
         * kernel knows the flag, so EPERM counts as known. */
        ret = io_uring_queue_init(4, &ring, all[i]);
        if (ret == 0) {
            io_uring_queue_exit(&ring);
            p->setup_flags |= all[i];
        } else if (ret == -EPERM) {
            p->setup_flags |= all[i];
        }
    }
    return 0;
}
