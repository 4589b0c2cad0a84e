/*
 * The context: its parameters, the io_uring features it uses and falls back
 * from, lshm_ctx_fd in a poll loop, and a context without io_uring: it runs
 * on the epoll carrier and says why; with LSHM_CTX_IO_URING_ONLY the error
 * says why and what to do (a seccomp filter in a forked child plays the
 * container runtime that hides io_uring_setup (EPERM) or the kernel built
 * without it (ENOSYS)).
 */
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"
#include "linuxshm.h"
#include "port_util.h"

enum {
    OK = 0,
    NO_FILTER = 10,
    WRONG_CTX_ERROR,
    WRONG_CTX_TEXT,
    WRONG_PROBE,
    NO_FALLBACK,
    WRONG_CARRIER,
};

/* Make io_uring_setup(2) fail with err in this process. */
static int deny_io_uring(int err)
{
    struct sock_filter prog[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (err & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog fprog = { .len = sizeof(prog) / sizeof(prog[0]), .filter = prog };

    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return -1;
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog, 0, 0);
}

static int child(int err, const char *must_say)
{
    struct lshm_ctx_params only = { .flags = LSHM_CTX_IO_URING_ONLY };
    struct lshm_probe p;
    struct lshm_ctx *ctx;
    int ret;

    if (deny_io_uring(err) < 0)
        return NO_FILTER;
    ret = lshm_ctx_new(&ctx, &only);
    if (ret != -err) {
        if (ret == 0)
            lshm_ctx_free(ctx);
        fprintf(stderr, "lshm_ctx_new: %d, expected %d\n", ret, -err);
        return WRONG_CTX_ERROR;
    }
    if (strstr(lshm_last_error(), must_say) == NULL) {
        fprintf(stderr, "lshm_last_error: \"%s\" does not say \"%s\"\n", lshm_last_error(),
                must_say);
        return WRONG_CTX_TEXT;
    }
    memset(&p, 0, sizeof(p));
    if (lshm_probe(&p) != 0 || p.io_uring != -err || strstr(p.io_uring_why, must_say) == NULL ||
        !(p.features & LSHM_FEAT_EPOLL)) {
        fprintf(stderr, "lshm_probe: io_uring %d, why \"%s\", features %#x\n", p.io_uring,
                p.io_uring_why, p.features);
        return WRONG_PROBE;
    }
    /* Without the flag the same refusal gives a context on epoll. */
    ret = lshm_ctx_new(&ctx, NULL);
    if (ret != 0) {
        fprintf(stderr, "lshm_ctx_new without io_uring: %d %s\n", ret, lshm_last_error());
        return NO_FALLBACK;
    }
    ret = (lshm_ctx_features(ctx) & LSHM_FEAT_EPOLL) &&
          strncmp(lshm_ctx_carrier(ctx), "epoll: ", 7) == 0 &&
          strstr(lshm_ctx_carrier(ctx), must_say) != NULL;
    if (!ret)
        fprintf(stderr, "features %#x, carrier \"%s\"\n", lshm_ctx_features(ctx),
                lshm_ctx_carrier(ctx));
    lshm_ctx_free(ctx);
    return ret ? OK : WRONG_CARRIER;
}

static void expect_refusal(int err, const char *must_say)
{
    int status;
    pid_t pid;

    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0)
        _exit(child(err, must_say));
    status = wait_child(pid, 20000);
    cr_assert(status >= 0 && WIFEXITED(status), "child did not finish");
    if (WEXITSTATUS(status) == NO_FILTER)
        cr_skip_test("seccomp filters are not available here");
    cr_assert_eq(WEXITSTATUS(status), OK, "child failed with %d (see its stderr)",
                 WEXITSTATUS(status));
}

LTEST(ctx, io_uring_refused_by_seccomp_falls_back_to_epoll_and_says_why)
{
    expect_refusal(EPERM, "seccomp");
}

LTEST(ctx, io_uring_missing_from_kernel_falls_back_to_epoll_and_says_why)
{
    expect_refusal(ENOSYS, "CONFIG_IO_URING");
}

LTEST(ctx, bad_params_rejected)
{
    struct lshm_ctx_params p;
    struct lshm_ctx *ctx;

    memset(&p, 0, sizeof(p));
    p.ring_entries = 100;
    cr_assert_eq(lshm_ctx_new(&ctx, &p), -EINVAL);
    cr_assert_neq(strstr(lshm_last_error(), "ring_entries"), NULL);
    memset(&p, 0, sizeof(p));
    p.reserved[3] = 1;
    cr_assert_eq(lshm_ctx_new(&ctx, &p), -EINVAL);
    memset(&p, 0, sizeof(p));
    p.flags = 1u << 30;
    cr_assert_eq(lshm_ctx_new(&ctx, &p), -EINVAL);
    memset(&p, 0, sizeof(p));
    p.max_segments = 1025;
    cr_assert_eq(lshm_ctx_new(&ctx, &p), -EINVAL);
    cr_assert_eq(lshm_ctx_new(NULL, NULL), -EINVAL);
    memset(&p, 0, sizeof(p));
    p.flags = LSHM_CTX_NO_IO_URING | LSHM_CTX_IO_URING_ONLY;
    cr_assert_eq(lshm_ctx_new(&ctx, &p), -EINVAL);
    cr_assert_neq(strstr(lshm_last_error(), "together"), NULL);
}

LTEST(ctx, no_io_uring_flag_gives_the_epoll_carrier)
{
    struct lshm_ctx_params p = { .flags = LSHM_CTX_NO_IO_URING };
    struct lshm_ctx *ctx;
    struct lshm_ctx_stats st;
    struct pollfd pfd;
    unsigned f;

    cr_assert_eq(lshm_ctx_new(&ctx, &p), 0, "%s", lshm_last_error());
    f = lshm_ctx_features(ctx);
    cr_assert(f & LSHM_FEAT_EPOLL, "features %#x", f);
    cr_assert_eq(f & (LSHM_FEAT_MULTISHOT_RECV | LSHM_FEAT_BUF_RING | LSHM_FEAT_MULTISHOT_ACCEPT |
                      LSHM_FEAT_DEFER_TASKRUN | LSHM_FEAT_SINGLE_ISSUER | LSHM_FEAT_COOP_TASKRUN),
                 0, "features %#x", f);
    cr_assert_str_eq(lshm_ctx_carrier(ctx), "epoll: asked for with LSHM_CTX_NO_IO_URING");
    /* Pollable, and quiet while nothing happens. */
    pfd.fd = lshm_ctx_fd(ctx);
    pfd.events = POLLIN;
    cr_assert_geq(pfd.fd, 0);
    cr_assert_eq(poll(&pfd, 1, 0), 0);
    cr_assert_eq(lshm_ctx_run(ctx, 10), 0);
    cr_assert_eq(lshm_ctx_stats(ctx, &st), 0);
    cr_assert_geq(st.enters, 1, "a run that waits is an epoll_wait");
    lshm_ctx_free(ctx);
}

LTEST(ctx, io_uring_only_flag_gives_io_uring_where_it_runs)
{
    struct lshm_ctx_params p = { .flags = LSHM_CTX_IO_URING_ONLY };
    struct lshm_ctx *ctx;

    require_io_uring(0);
    cr_assert_eq(lshm_ctx_new(&ctx, &p), 0, "%s", lshm_last_error());
    cr_assert_eq(lshm_ctx_features(ctx) & LSHM_FEAT_EPOLL, 0);
    cr_assert_str_eq(lshm_ctx_carrier(ctx), "io_uring");
    lshm_ctx_free(ctx);
}

/* LSHM_NO_IO_URING in the environment moves a program unchanged to epoll;
 * LSHM_CTX_IO_URING_ONLY wins over it. */
LTEST(ctx, environment_variable_forces_the_epoll_carrier)
{
    struct lshm_ctx_params p = { .flags = LSHM_CTX_IO_URING_ONLY };
    const char *old = getenv("LSHM_NO_IO_URING");
    char *saved = old != NULL ? strdup(old) : NULL;
    struct lshm_ctx *ctx;
    int ret;

    setenv("LSHM_NO_IO_URING", "1", 1);
    ret = lshm_ctx_new(&ctx, NULL);
    cr_assert_eq(ret, 0, "%s", lshm_last_error());
    cr_expect(lshm_ctx_features(ctx) & LSHM_FEAT_EPOLL);
    cr_expect_str_eq(lshm_ctx_carrier(ctx),
                     "epoll: asked for with LSHM_NO_IO_URING in the environment");
    lshm_ctx_free(ctx);
    ret = lshm_ctx_new(&ctx, &p);
    if (ret == 0) {
        cr_expect_eq(lshm_ctx_features(ctx) & LSHM_FEAT_EPOLL, 0);
        lshm_ctx_free(ctx);
    } else {
        /* io_uring refused here: the flag keeps the refusal. */
        cr_expect(ret == -EPERM || ret == -ENOSYS, "%d %s", ret, lshm_last_error());
    }
    if (saved != NULL)
        setenv("LSHM_NO_IO_URING", saved, 1);
    else
        unsetenv("LSHM_NO_IO_URING");
    free(saved);
}

/* lshm_probe says what shmem_enabled selects, as the file does (or "" without it). */
LTEST(ctx, probe_reports_shmem_huge_pages)
{
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/shmem_enabled", "re");
    char line[128] = "", want[16] = "";
    struct lshm_probe p;
    char *open, *close;

    if (f != NULL) {
        cr_assert_not_null(fgets(line, sizeof(line), f));
        fclose(f);
        open = strchr(line, '[');
        close = open != NULL ? strchr(open, ']') : NULL;
        cr_assert(open != NULL && close != NULL, "no selected word in \"%s\"", line);
        snprintf(want, sizeof(want), "%.*s", (int)(close - open - 1), open + 1);
    }
    cr_assert_eq(lshm_probe(&p), 0);
    cr_assert_str_eq(p.shmem_thp, want);
    cr_log_info("shmem huge pages: \"%s\"", p.shmem_thp);
}

LTEST(ctx, version_matches_header)
{
    char want[32];

    snprintf(want, sizeof(want), "%d.%d.%d", LSHM_VERSION_MAJOR, LSHM_VERSION_MINOR,
             LSHM_VERSION_PATCH);
    cr_assert_str_eq(lshm_version(), want);
}

/*
 * A client that connects and never says HELLO is closed after
 * handshake_ms, and handed over closed so that the server can log why.
 */
LTEST(ctx, silent_client_closed_after_handshake_timeout)
{
    struct lshm_ctx_params p = { .handshake_ms = 200 };
    char dir[] = "/tmp/lshm-ctx-XXXXXX", path[64], byte;
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    struct lshm_listener *l;
    struct lshm_port *port;
    struct lshm_ctx *ctx;
    long long t0;
    int fd, ret;

    cr_assert_not_null(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/s", dir);
    cr_assert_eq(lshm_ctx_new(&ctx, &p), 0);
    cr_assert_eq(lshm_listen(ctx, path, 0, &l), 0);
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
    fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    cr_assert_geq(fd, 0);
    cr_assert_eq(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    t0 = now_ms();
    ret = lshm_accept(l, &port, 5000);
    cr_assert_eq(ret, 0, "lshm_accept: %d %s", ret, lshm_last_error());
    cr_expect_geq(now_ms() - t0, 150, "closed after %lld ms, before its deadline",
                  now_ms() - t0);
    cr_assert_not_null(lshm_port_error(port), "the silent client's port is still open");
    cr_expect_neq(strstr(lshm_port_error(port), "no HELLO"), NULL, "%s", lshm_port_error(port));
    cr_expect_eq(lshm_recv(port, &(struct lshm_msg){ 0 }, 0), -ETIMEDOUT);
    lshm_port_close(port);
    /* The client sees our HELLO, then the end. */
    while ((ret = (int)recv(fd, path, sizeof(path), 0)) > 0)
        ;
    cr_expect_eq(ret, 0, "the client's socket was not closed");
    (void)byte;
    close(fd);
    lshm_listener_close(l);
    lshm_ctx_free(ctx);
    rmdir(dir);
}

/* ======================================================================
 * Context basics
 * ====================================================================== */

LTEST(ctx, new_rejects_bad_params)
{
    static const struct lshm_ctx_params bad[] = {
        { .ring_entries = 3 },
        { .ring_entries = 4 },
        { .ring_entries = 8192 },
        { .ring_entries = 1000 },
        { .max_segments = 1025 },
        { .send_queue = 65537 },
        { .recv_queue = 65537 },
        { .handshake_ms = 3600001 },
        { .flags = 1u << 20 },
        { .reserved = { [0] = 1 } },
        { .reserved = { [6] = 1 } },
        { .ring_size = 65535 },
        { .ring_size = 32768 },
        { .ring_size = 3u << 16 },
        { .ring_size = 1u << 25 },
        { .spin_us = 1000001 },
        { .prealloc_segments = 17 },                    /* above the default 16 */
        { .max_segments = 4, .prealloc_segments = 5 },
    };
    struct lshm_ctx *ctx = NULL;
    unsigned i;

    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int ret = lshm_ctx_new(&ctx, &bad[i]);

        cr_expect_eq(ret, -EINVAL, "params %u accepted: %d", i, ret);
        if (ret == 0)
            lshm_ctx_free(ctx);
        else
            cr_expect_str_neq(lshm_last_error(), "", "params %u: no reason given", i);
    }
    cr_assert_eq(lshm_ctx_new(NULL, NULL), -EINVAL);
    cr_assert_eq(lshm_ctx_stats(NULL, NULL), -EINVAL);
    cr_assert_eq(lshm_ctx_fd(NULL), -EINVAL);
    /* The edges are accepted. */
    {
        struct lshm_ctx_params ok = { .ring_entries = 8, .max_segments = 1024,
                                      .send_queue = 65536, .recv_queue = 65536,
                                      .prealloc_segments = 1024 };

        cr_assert_eq(lshm_ctx_new(&ctx, &ok), 0, "%s", lshm_last_error());
        lshm_ctx_free(ctx);
    }
}

static int wait_go_send_one(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct lshm_msg m;

    CK(lshm_recv(port, &m, 10000) == 0);
    lshm_msg_done(&m);
    usleep(100 * 1000);
    CK(send_pat(port, 5, 300, 0) == 0);
    return wait_bye(port);
}

static void ctx_fd_polls(const struct lshm_ctx_params *prm)
{
    struct lshm_ctx *ctx = ctx_make(prm);
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, wait_go_send_one, NULL);
    struct pollfd pfd = { .fd = lshm_ctx_fd(ctx), .events = POLLIN };
    struct lshm_msg m;
    int ret, n = 0;
    long long end;

    cr_assert_geq(pfd.fd, 0);
    wait_ready(port);
    cr_assert_eq(send_inline(port, T_CTRL, 0, NULL, 0, -1), 0);
    cr_assert_gt(lshm_port_wait(port, LSHM_WAIT_IDLE, 5000), 0);
    /* Only poll(2) from here on: the fd alone must say a message came. */
    end = now_ms() + 5000;
    for (;;) {
        ret = poll(&pfd, 1, 5000);
        cr_assert_eq(ret, 1, "lshm_ctx_fd never polled readable (%d)", ret);
        cr_assert(pfd.revents & POLLIN);
        n++;
        ret = lshm_recv(port, &m, 0);
        if (ret == 0)
            break;
        cr_assert_eq(ret, -ETIMEDOUT, "%d %s", ret, lshm_last_error());
        cr_assert_lt(now_ms(), end, "readable %d times, no message", n);
    }
    /* The message is sent 100 ms after "go": poll must wake for it then,
     * not at the end of its timeout. */
    cr_assert_lt(now_ms() - (end - 5000), 2000, "poll woke only after %lld ms",
                 now_ms() - (end - 5000));
    cr_assert_eq(m.stream, 5);
    cr_assert(msg_check(&m, 5, 300));
    lshm_msg_done(&m);
    spawn_end(ctx, port, pid);
}

LTEST(ctx, fd_polls_readable_when_a_message_arrived)
{
    ctx_fd_polls(NULL);
}

#define POLL_TRIPS 2000

struct poll_loop {
    unsigned got;
};

/* Answer each echo with the next message, until POLL_TRIPS came back. */
static void on_echo(struct lshm_port *port, struct lshm_msg *m, void *arg)
{
    struct poll_loop *pl = arg;

    cr_assert(msg_check(m, pl->got, 48), "echo %u differs", pl->got);
    lshm_msg_done(m);
    if (++pl->got < POLL_TRIPS)
        cr_assert_eq(send_pat(port, pl->got, 48, 0), 0, "%s", lshm_last_error());
}

/*
 * The loop lshm_ctx_fd(3) shows: lshm_ctx_run(ctx, 0), then poll(2) on the
 * fd.  The messages travel in the message rings, which the kernel does not
 * see: every answer must still make the fd readable, on either carrier.
 */
static void poll_loop(unsigned flags)
{
    struct lshm_ctx_params prm = { .flags = flags };
    struct lshm_ctx *ctx = ctx_make(&prm);
    struct poll_loop pl = { 0 };
    struct lshm_port_stats st;
    struct lshm_port *port;
    pid_t pid = spawn(ctx, NULL, &port, echo_pull, NULL);
    struct pollfd pfd = { .fd = lshm_ctx_fd(ctx), .events = POLLIN };
    unsigned stalls = 0;

    cr_assert_geq(pfd.fd, 0);
    wait_ready(port);
    lshm_port_set_handler(port, on_echo, NULL, &pl);
    cr_assert_eq(send_pat(port, 0, 48, 0), 0);
    while (pl.got < POLL_TRIPS && stalls == 0) {
        cr_assert_geq(lshm_ctx_run(ctx, 0), 0, "%s", lshm_last_error());
        /* 10 s: a wake-up lost stays lost; a busy machine's delay does not. */
        if (pl.got < POLL_TRIPS && poll(&pfd, 1, 10000) == 0)
            stalls++;
    }
    cr_assert_eq(stalls, 0, "%s: the fd stayed quiet for 10 s after %u of %u echoes",
                 lshm_ctx_carrier(ctx), pl.got, POLL_TRIPS);
    cr_assert_eq(lshm_port_stats(port, &st), 0);
    cr_assert_gt(st.ring_msgs_in, POLL_TRIPS / 2, "the echoes did not take the ring");
    lshm_port_set_handler(port, NULL, NULL, NULL);
    spawn_end(ctx, port, pid);
}

LTEST(ctx, fd_polls_readable_for_ring_messages_in_a_run_0_loop)
{
    poll_loop(0);
}

LTEST(ctx, fd_polls_readable_for_ring_messages_in_a_run_0_loop_on_epoll)
{
    poll_loop(LSHM_CTX_NO_IO_URING);
}

LTEST(ctx, fd_polls_readable_without_multishot_or_defer_taskrun)
{
    struct lshm_ctx_params prm = { .flags = LSHM_CTX_NO_MULTISHOT |
                                            LSHM_CTX_NO_DEFER_TASKRUN };

    require_io_uring(prm.flags);
    ctx_fd_polls(&prm);
}

/* Ping-pong of 1,000 (inline and shm) on contexts forced onto fallbacks. */
static void fallback_pingpong(unsigned flags)
{
    struct lshm_ctx_params prm = { .flags = flags };
    struct lshm_ctx *ctx;
    unsigned f, i;
    struct lshm_port *port;
    pid_t pid;

    require_io_uring(flags);
    ctx = ctx_make(&prm);
    f = lshm_ctx_features(ctx);
    pid = spawn(ctx, &prm, &port, echo_pull, NULL);

    if (flags & LSHM_CTX_NO_MULTISHOT)
        cr_assert_eq(f & (LSHM_FEAT_MULTISHOT_RECV | LSHM_FEAT_BUF_RING), 0, "features %#x", f);
    if (flags & LSHM_CTX_NO_DEFER_TASKRUN)
        cr_assert_eq(f & LSHM_FEAT_DEFER_TASKRUN, 0, "features %#x", f);
    wait_ready(port);
    for (i = 0; i < 1000; i++) {
        size_t size = (i % 4 == 3) ? 5000 + i : i % 700;

        /* The echo copies inline: shared-memory payloads stay <= 16 KiB. */
        echo_roundtrip(port, i, size, size > 4096);
    }
    spawn_end(ctx, port, pid);
}

LTEST(ctx, features_default_context_uses_multishot_and_defer_taskrun)
{
    struct lshm_ctx *ctx;
    unsigned f;

    require_io_uring(0);
    ctx = ctx_make(NULL);
    f = lshm_ctx_features(ctx);

    /* This kernel (6.x) has both; an older one would fall back. */
    cr_log_info("default features %#x", f);
    cr_expect(f & LSHM_FEAT_MULTISHOT_RECV, "features %#x", f);
    cr_expect(f & LSHM_FEAT_DEFER_TASKRUN, "features %#x", f);
    cr_expect(f & LSHM_FEAT_SINGLE_ISSUER, "features %#x", f);
    lshm_ctx_free(ctx);
}

LTEST(ctx, pingpong_without_multishot_falls_back)
{
    fallback_pingpong(LSHM_CTX_NO_MULTISHOT);
}

LTEST(ctx, pingpong_without_defer_taskrun_falls_back)
{
    fallback_pingpong(LSHM_CTX_NO_DEFER_TASKRUN);
}

LTEST(ctx, pingpong_without_either_falls_back)
{
    fallback_pingpong(LSHM_CTX_NO_MULTISHOT | LSHM_CTX_NO_DEFER_TASKRUN);
}
