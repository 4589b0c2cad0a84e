/*
 * Limits and timeouts: a call that takes a timeout returns within it
 * whatever the server does; a listener at its fd limit sleeps and says why;
 * resource limits give an -errno that names them, never a signal.
 */
#include <errno.h>
#include <fcntl.h>
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
