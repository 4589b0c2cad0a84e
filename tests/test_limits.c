/*
 * Limits and timeouts: a call that takes a timeout returns within it
 * whatever the server does; a listener at its fd limit sleeps and says why;
 * resource limits give an -errno that names them, never a signal.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>

#include "port_util.h"

/* ======================================================================
 * Timeouts are kept: a live server whose backlog is full
 * ====================================================================== */

/* A server that listens and never accepts, its backlog filled by clients
 * that wait; their fds (and the server's) go to fds[], count to *n. */
static void full_backlog(const char *dir, char *path, int *fds, int max, int *n)
{
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    int srv = bound_socket(path, dir, "full", SOCK_SEQPACKET, false);

    cr_assert_eq(listen(srv, 4), 0);
    fds[0] = srv;
    *n = 1;
    cr_assert_lt(strlen(path), sizeof(sun.sun_path));
    memcpy(sun.sun_path, path, strlen(path) + 1);
    while (*n < max) {
        int c = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

        cr_assert_geq(c, 0);
        if (connect(c, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
            cr_assert_eq(errno, EAGAIN, "connect: %s", strerror(errno));
            close(c);
            return;
        }
        fds[(*n)++] = c;
    }
    cr_assert_fail("the backlog never filled");
}

static void connect_keeps_timeout(int timeout_ms)
{
    char *dir = tmp_dir(), path[128];
    int fds[64], n, st;
    long long t0;
    pid_t pid;

    full_backlog(dir, path, fds, 64, &n);
    t0 = now_ms();
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        struct lshm_ctx *ctx;
        struct lshm_port *p = NULL;
        int ret;

        if (lshm_ctx_new(&ctx, NULL) < 0)
            _exit(90);
        ret = lshm_connect(ctx, path, timeout_ms, &p);
        if (ret != -ETIMEDOUT || strstr(lshm_last_error(), "backlog") == NULL) {
            fprintf(stderr, "lshm_connect: %d %s\n", ret, lshm_last_error());
            _exit(1);
        }
        lshm_ctx_free(ctx);
        _exit(0);
    }
    st = wait_child(pid, timeout_ms + 2000);
    cr_assert_neq(st, -1, "lshm_connect(%d ms) to a full backlog did not return in %d ms",
                  timeout_ms, timeout_ms + 2000);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "status %d", st);
    cr_expect_lt(now_ms() - t0, timeout_ms + 700, "took %lld ms", now_ms() - t0);
    for (int i = 0; i < n; i++)
        close(fds[i]);
    unlink(path);
    rmdir(dir);
    free(dir);
}

LTEST(limits, connect_to_full_backlog_keeps_its_timeout)
{
    connect_keeps_timeout(500);
}

LTEST(limits, connect_to_full_backlog_with_timeout_0_returns)
{
    connect_keeps_timeout(0);
}

/* ======================================================================
 * A listener at its fd limit sleeps, says why, and accepts later
 * ====================================================================== */

static long cpu_ms(void)
{
    struct rusage ru;

    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec * 1000 + ru.ru_utime.tv_usec / 1000 +
           ru.ru_stime.tv_sec * 1000 + ru.ru_stime.tv_usec / 1000;
}

LTEST(limits, listener_at_fd_limit_sleeps_says_why_and_accepts_later)
{
    char *dir = tmp_dir(), path[128];
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_listener *l;
    struct lshm_port *p = NULL;
    struct lshm_ctx_stats st0, st1;
    struct rlimit old, low;
    int fill[256], nfill = 0, ret;
    long cpu;
    pid_t pid;

    snprintf(path, sizeof(path), "%s/srv", dir);
    /* The kernel reads the limit when the accept is armed: lower it first. */
    cr_assert_eq(getrlimit(RLIMIT_NOFILE, &old), 0);
    low = old;
    low.rlim_cur = count_fds() + 40;
    cr_assert_eq(setrlimit(RLIMIT_NOFILE, &low), 0);
    cr_assert_eq(lshm_listen(ctx, path, 0, &l), 0, "%s", lshm_last_error());
    while (nfill < 256) {
        int fd = dup(0);

        if (fd < 0)
            break;
        fill[nfill++] = fd;
    }
    cr_assert_eq(errno, EMFILE);
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        struct lshm_ctx *cctx;
        struct lshm_port *cp;
        struct lshm_msg m;

        for (int i = 0; i < nfill; i++)
            close(fill[i]);
        if (lshm_ctx_new(&cctx, NULL) < 0)
            _exit(90);
        if (lshm_connect(cctx, path, 10000, &cp) < 0) {
            fprintf(stderr, "client: %s\n", lshm_last_error());
            _exit(1);
        }
        /* Until the server closes the port. */
        while (lshm_recv(cp, &m, 10000) == 0)
            lshm_msg_done(&m);
        lshm_port_close(cp);
        lshm_ctx_free(cctx);
        _exit(0);
    }
    cr_assert_eq(lshm_ctx_stats(ctx, &st0), 0);
    cpu = cpu_ms();
    ret = lshm_accept(l, &p, 1000);
    cpu = cpu_ms() - cpu;
    cr_assert_eq(lshm_ctx_stats(ctx, &st1), 0);
    cr_expect_eq(ret, -EMFILE, "lshm_accept at the fd limit: %d %s", ret, lshm_last_error());
    cr_expect(strstr(lshm_last_error(), "RLIMIT_NOFILE") != NULL, "%s", lshm_last_error());
    cr_expect_lt(cpu, 150, "lshm_accept spun: %ld ms of CPU in 1000 ms", cpu);
    cr_expect_lt(st1.enters - st0.enters, 100, "lshm_accept spun: %llu io_uring_enter calls "
                 "in 1000 ms", (unsigned long long)(st1.enters - st0.enters));
    for (int i = 0; i < nfill; i++)
        close(fill[i]);
    cr_assert_eq(setrlimit(RLIMIT_NOFILE, &old), 0);
    if (ret == 0)
        lshm_port_close(p);
    else {
        ret = lshm_accept(l, &p, 5000);
        cr_assert_eq(ret, 0, "fds free again, the client is still not accepted: %d %s", ret,
                     lshm_last_error());
        lshm_port_close(p);
    }
    lshm_listener_close(l);
    lshm_ctx_free(ctx);
    child_ok(pid, 10000);
    rmdir(dir);
    free(dir);
}

/* ======================================================================
 * Resource limits name themselves: never a signal, never the peer's fault
 * ====================================================================== */

LTEST(limits, file_size_limit_gives_efbig_not_sigxfsz)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    struct lshm_buf *b = NULL;
    struct rlimit old, low;
    pid_t pid;
    int ret;

    pid = spawn(ctx, NULL, &port, echo_pull, NULL);
    wait_ready(port);
    cr_assert_eq(getrlimit(RLIMIT_FSIZE, &old), 0);
    low = old;
    low.rlim_cur = 1 << 20;
    cr_assert_eq(setrlimit(RLIMIT_FSIZE, &low), 0);
    ret = lshm_buf_alloc(port, 1000, &b);
    cr_assert_eq(setrlimit(RLIMIT_FSIZE, &old), 0);
    cr_assert_eq(ret, -EFBIG, "%d %s", ret, lshm_last_error());
    cr_assert(strstr(lshm_last_error(), "RLIMIT_FSIZE") != NULL, "%s", lshm_last_error());
    /* Nothing is left half made: with the limit back it works. */
    echo_roundtrip(port, 1, 10000, true);
    spawn_end(ctx, port, pid);
}

LTEST(limits, fd_limit_at_segment_creation_names_rlimit_nofile)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    struct lshm_buf *b = NULL;
    struct rlimit old, low;
    int fill[256], nfill = 0, ret;
    pid_t pid;

    pid = spawn(ctx, NULL, &port, echo_pull, NULL);
    wait_ready(port);
    cr_assert_eq(getrlimit(RLIMIT_NOFILE, &old), 0);
    low = old;
    low.rlim_cur = count_fds() + 20;
    cr_assert_eq(setrlimit(RLIMIT_NOFILE, &low), 0);
    while (nfill < 256 && (fill[nfill] = dup(2)) >= 0)
        nfill++;
    ret = lshm_buf_alloc(port, 1000, &b);
    for (int i = 0; i < nfill; i++)
        close(fill[i]);
    cr_assert_eq(setrlimit(RLIMIT_NOFILE, &old), 0);
    cr_assert_eq(ret, -EMFILE, "%d %s", ret, lshm_last_error());
    cr_assert(strstr(lshm_last_error(), "RLIMIT_NOFILE") != NULL, "%s", lshm_last_error());
    echo_roundtrip(port, 1, 10000, true);
    spawn_end(ctx, port, pid);
}

/* The address space this process maps now plus slack bytes; 0 if unknown. */
static rlim_t as_now_plus(unsigned long slack)
{
    unsigned long pages = 0;
    FILE *f = fopen("/proc/self/statm", "r");

    if (f == NULL)
        return 0;
    if (fscanf(f, "%lu", &pages) != 1)
        pages = 0;
    fclose(f);
    return pages == 0 ? 0 : pages * (unsigned long)sysconf(_SC_PAGESIZE) + slack;
}

/* A child at its address-space limit, and what it must fail to map. */
struct as_child {
    unsigned long slack;    /* bytes it may still map */
    const char    *what;    /* in its error text */
    int           ready;    /* pipe: a byte once the limit is lowered */
};

/* The child: at its address-space limit, it cannot map what the peer sends
 * (a segment, a ring), and says so without blaming the peer. */
static int recv_at_as_limit(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    const struct as_child *c = arg;
    struct lshm_msg m;
    struct rlimit rl;
    int ret;

    CK(lshm_port_wait(port, LSHM_WAIT_READY, 10000) > 0);
    rl.rlim_cur = rl.rlim_max = as_now_plus(c->slack);
    CK(rl.rlim_cur > 0);
    CK(setrlimit(RLIMIT_AS, &rl) == 0);
    CK(write(c->ready, "l", 1) == 1);
    ret = lshm_recv(port, &m, 10000);
    if (ret == 0)
        lshm_msg_done(&m);
    CK(ret == -ENOMEM);
    CK(strstr(lshm_last_error(), c->what) != NULL);
    CK(strstr(lshm_last_error(), "protocol violation") == NULL);
    return 0;
}

/* Send to such a child once it lowered its limit (shared memory or inline);
 * it must end well. */
static void send_to_child_at_as_limit(struct lshm_ctx *ctx, struct as_child *c, bool shm)
{
    struct lshm_port *port;
    struct pollfd pfd;
    int ready[2];
    pid_t pid;
    char b;

    cr_assert_eq(pipe2(ready, O_CLOEXEC), 0);
    c->ready = ready[1];
    pid = spawn(ctx, NULL, &port, recv_at_as_limit, c);
    close(ready[1]);
    wait_ready(port);
    pfd = (struct pollfd){ .fd = ready[0], .events = POLLIN };
    cr_assert_eq(poll(&pfd, 1, 10000), 1, "the child did not lower its limit");
    cr_assert_eq(read(ready[0], &b, 1), 1, "the child ended before lowering its limit");
    close(ready[0]);
    if (shm)
        cr_assert_eq(send_shm(port, 1, 100000, -1), 0, "%s", lshm_last_error());
    else
        cr_assert_eq(send_pat(port, 1, 100, 0), 0, "%s", lshm_last_error());
    child_ok(pid, 10000);
    lshm_port_close(port);
    lshm_ctx_free(ctx);
}

LTEST(limits, receiver_at_address_space_limit_does_not_blame_the_peer)
{
    /* Room for this side's message ring (256 KiB), not for a segment of
     * 10 MiB. */
    struct as_child c = { .slack = 4u << 20, .what = "RLIMIT_AS" };

    if (getenv("LSHM_SANITIZER") != NULL)
        cr_skip_test("a sanitizer's shadow memory does not fit under RLIMIT_AS");
    send_to_child_at_as_limit(ctx_make(NULL), &c, true);
}

LTEST(limits, segment_limit_names_max_segments)
{
    struct lshm_ctx_params cp = { .max_segments = 1 };
    struct lshm_ctx *ctx = ctx_make(&cp);
    struct lshm_port *port;
    struct lshm_buf *b[2] = { NULL, NULL };
    pid_t pid;
    int ret;

    pid = spawn(ctx, NULL, &port, echo_pull, NULL);
    wait_ready(port);
    cr_assert_eq(lshm_buf_alloc(port, LSHM_DATA_SIZE, &b[0]), 0, "%s", lshm_last_error());
    ret = lshm_buf_alloc(port, 1000, &b[1]);
    cr_assert_eq(ret, -EAGAIN, "%d %s", ret, lshm_last_error());
    cr_assert(strstr(lshm_last_error(), "max_segments") != NULL, "%s", lshm_last_error());
    lshm_buf_free(b[0]);
    spawn_end(ctx, port, pid);
}

LTEST(limits, address_space_limit_at_segment_creation_names_rlimit_as)
{
    struct lshm_ctx *ctx;
    struct lshm_port *port;
    struct lshm_buf *b = NULL;
    struct rlimit old, low;
    pid_t pid;
    int ret;

    if (getenv("LSHM_SANITIZER") != NULL)
        cr_skip_test("a sanitizer's shadow memory does not fit under RLIMIT_AS");
    ctx = ctx_make(NULL);
    pid = spawn(ctx, NULL, &port, echo_pull, NULL);
    wait_ready(port);
    cr_assert_eq(getrlimit(RLIMIT_AS, &old), 0);
    low = old;
    low.rlim_cur = as_now_plus(4u << 20);
    cr_assert_gt(low.rlim_cur, 0, "/proc/self/statm: %s", strerror(errno));
    cr_assert_eq(setrlimit(RLIMIT_AS, &low), 0);
    ret = lshm_buf_alloc(port, 1000, &b);
    cr_assert_eq(setrlimit(RLIMIT_AS, &old), 0);
    cr_assert_eq(ret, -ENOMEM, "%d %s", ret, lshm_last_error());
    cr_assert(strstr(lshm_last_error(), "RLIMIT_AS") != NULL, "%s", lshm_last_error());
    echo_roundtrip(port, 1, 10000, true);
    spawn_end(ctx, port, pid);
}

LTEST(limits, receiver_at_address_space_limit_does_not_blame_the_peers_ring)
{
    /* No room for the peer's message ring (256 KiB). */
    struct as_child c = { .slack = 64u << 10, .what = "ring" };
    struct lshm_ctx *ctx;

    if (getenv("LSHM_SANITIZER") != NULL)
        cr_skip_test("a sanitizer's shadow memory does not fit under RLIMIT_AS");
    ctx = ctx_make(NULL);
    if (!(lshm_ctx_features(ctx) & LSHM_FEAT_RING)) {
        lshm_ctx_free(ctx);
        cr_skip_test("no message rings here (LSHM_FEAT_RING)");
    }
    send_to_child_at_as_limit(ctx, &c, false);
}
