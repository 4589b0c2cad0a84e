/*
 * Listeners and connecting, end to end: two clients at once, the socket's
 * mode, stale and live socket files, the version handshake refused, and
 * the errors of lshm_connect.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "linuxshm.h"
#include "port_util.h"

/* ======================================================================
 * Listeners: two clients at once, the socket's mode, stale and live
 * socket files
 * ====================================================================== */

struct client_arg {
    const char *path;
    unsigned    id;
    unsigned    n;
};

/* Connect and stream n messages (inline and shm, pattern keyed by id),
 * a window of 8 unanswered; check each echo (inline, size and seq). */
static int client(struct lshm_ctx *ctx, struct lshm_port *unused, void *arg)
{
    struct client_arg *a = arg;
    struct lshm_port *port;
    struct lshm_msg m;
    uint32_t sent = 0, got = 0;
    uint64_t rng = a->id * 77 + 1;
    int ret;

    ret = lshm_connect(ctx, a->path, 10000, &port);
    CK(ret == 0);
    while (got < a->n) {
        while (sent < a->n && sent - got < 8) {
            uint32_t seq = a->id << 24 | sent;
            size_t size = (sent % 2) ? 16385 + pattern_rand_below(&rng, 600000)
                                     : pattern_rand_below(&rng, 16385);

            CK(send_any(port, seq, size) == 0);
            sent++;
        }
        CK(lshm_recv(port, &m, 10000) == 0);
        CK(m.stream == (a->id << 24 | got));
        CK(m.type == T_CTRL);
        CK(m.size == 0);
        lshm_msg_done(&m);
        got++;
    }
    lshm_port_close(port);
    return 0;
}

static int run_client(struct client_arg *a)
{
    struct lshm_ctx *ctx;
    int rc;

    if (lshm_ctx_new(&ctx, NULL) < 0)
        return 90;
    rc = client(ctx, NULL, a);
    lshm_ctx_free(ctx);
    return rc;
}

static void srv_on_accept(struct lshm_listener *l, struct lshm_port *port, void *arg)
{
    struct server *s = arg;

    s->open++;
    if (lshm_port_set_handler(port, srv_on_msg, srv_on_close, s) != 0)
        s->error = 4;
}

LTEST(listen, listener_serves_two_clients_at_once)
{
    char *dir = tmp_dir(), path[128];
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_listener *l;
    struct server srv = { 0 };
    struct client_arg a[2];
    pid_t pid[2];
    struct stat st;
    long long end;
    int i, ret;

    snprintf(path, sizeof(path), "%s/sock", dir);
    ret = lshm_listen(ctx, path, 0, &l);
    cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    cr_assert_eq(stat(path, &st), 0);
    cr_assert(S_ISSOCK(st.st_mode));
    cr_assert_eq(st.st_mode & 07777, 0600, "socket mode %o", st.st_mode & 07777);
    cr_assert_eq(lshm_listener_set_handler(l, srv_on_accept, &srv), 0);
    for (i = 0; i < 2; i++) {
        a[i] = (struct client_arg){ .path = path, .id = i + 1, .n = 1000 };
        pid[i] = fork();
        cr_assert_geq(pid[i], 0);
        if (pid[i] == 0) {
            lshm_ctx_free(ctx);
            _exit(run_client(&a[i]));
        }
    }
    end = now_ms() + 30000;
    while (srv.closed < 2 && srv.error == 0 && now_ms() < end)
        cr_assert_geq(lshm_ctx_run(ctx, 100), 0);
    cr_assert_eq(srv.error, 0);
    cr_assert_eq(srv.open, 2);
    cr_assert_eq(srv.closed, 2);
    cr_assert_eq(srv.msgs, 2000);
    child_ok(pid[0], 10000);
    child_ok(pid[1], 10000);
    lshm_listener_close(l);
    cr_assert_neq(access(path, F_OK), 0, "lshm_listener_close left the socket file");
    lshm_ctx_free(ctx);
    rmdir(dir);
    free(dir);
}

LTEST(listen, listen_replaces_stale_socket_refuses_live_one)
{
    char *dir = tmp_dir(), path[128], file[128];
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_listener *l, *l2 = NULL;
    struct lshm_port *p;
    struct stat st;
    int fd, ret;

    /* A stale socket file: bound, never listened on, its socket closed. */
    close(bound_socket(path, dir, "sock", SOCK_SEQPACKET, false));
    cr_assert_eq(stat(path, &st), 0);
    ret = lshm_listen(ctx, path, 0640, &l);
    cr_assert_eq(ret, 0, "stale socket not replaced: %d %s", ret, lshm_last_error());
    cr_assert_eq(stat(path, &st), 0);
    cr_assert_eq(st.st_mode & 07777, 0640, "socket mode %o", st.st_mode & 07777);
    /* A live one is refused. */
    ret = lshm_listen(ctx, path, 0, &l2);
    cr_assert_eq(ret, -EADDRINUSE, "%d %s", ret, lshm_last_error());
    cr_assert_null(l2);
    cr_assert_eq(access(path, F_OK), 0, "the live server's socket file was removed");
    /* A live server of another socket type is not "stale" either. */
    {
        char spath[128];
        struct lshm_listener *l3 = NULL;
        int sfd = bound_socket(spath, dir, "stream", SOCK_STREAM, true);

        ret = lshm_listen(ctx, spath, 0, &l3);
        cr_expect_eq(ret, -EADDRINUSE, "a live SOCK_STREAM server's socket was replaced: "
                     "%d %s", ret, lshm_last_error());
        if (ret == 0)
            lshm_listener_close(l3);
        close(sfd);
        unlink(spath);
    }
    /* Something that is not a socket is never replaced. */
    snprintf(file, sizeof(file), "%s/file", dir);
    fd = open(file, O_CREAT | O_WRONLY, 0600);
    close(fd);
    cr_assert_eq(lshm_listen(ctx, file, 0, &l2), -EEXIST);
    unlink(file);
    /* The liveness probe connected to the live listener: that connection
     * ends at once and must not be a usable port (it reports closure). */
    if (lshm_accept(l, &p, 200) == 0) {
        struct lshm_msg m;

        cr_log_info("lshm_listen's liveness probe shows up as an accepted connection");
        ret = lshm_recv(p, &m, 2000);
        cr_assert_lt(ret, 0);
        lshm_port_close(p);
    }
    lshm_listener_close(l);
    lshm_ctx_free(ctx);
    rmdir(dir);
    free(dir);
}

/* ======================================================================
 * A HELLO with another protocol version is refused, saying so
 * ====================================================================== */

static void hello_version_refused(uint16_t version, const char *reason)
{
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port;
    uint8_t buf[64];
    int peer = raw_peer(ctx, &port), ret;

    raw_sendv(peer, buf, raw_hello_build(buf, getpid(), version), NULL, 0);
    ret = lshm_port_wait(port, LSHM_WAIT_READY, 5000);
    cr_assert_eq(ret, -EPROTONOSUPPORT, "%d %s", ret, lshm_last_error());
    cr_assert_not_null(lshm_port_error(port));
    cr_assert(strstr(lshm_port_error(port), reason) != NULL, "reason: %s",
              lshm_port_error(port));
    cr_assert(strstr(lshm_last_error(), reason) != NULL, "%s", lshm_last_error());
    cr_log_info("version %u: %s", version, lshm_port_error(port));
    lshm_port_close(port);
    close(peer);
    lshm_ctx_free(ctx);
}

/* What a 1.0 library sends: a 24-byte HELLO of version 1.  Both versions named. */
LTEST(listen, hello_version_1_refused_on_adopted_port)
{
    hello_version_refused(1, "peer speaks protocol version 1, this side version 2");
}

LTEST(listen, hello_version_3_refused_on_adopted_port)
{
    hello_version_refused(3, "protocol version 3, expected 2");
}

LTEST(listen, hello_version_1_refused_by_lshm_connect)
{
    char *dir = tmp_dir(), path[128];
    struct lshm_ctx *ctx;
    struct lshm_port *port = NULL;
    int lfd = bound_socket(path, dir, "sock", SOCK_SEQPACKET, true), ret, one = 1;
    pid_t pid;

    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        /* A raw server that speaks version 1. */
        uint8_t buf[LSHM_WIRE_MAX];
        int c = accept(lfd, NULL, NULL);

        if (c < 0 || setsockopt(c, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)) < 0)
            _exit(1);
        if (send(c, buf, raw_hello_build(buf, getpid(), 1), MSG_NOSIGNAL) < 0)
            _exit(2);
        /* Wait for the client to hang up. */
        while (recv(c, buf, sizeof(buf), 0) > 0)
            ;
        _exit(0);
    }
    close(lfd);
    ctx = ctx_make(NULL);
    ret = lshm_connect(ctx, path, 5000, &port);
    cr_assert_eq(ret, -EPROTONOSUPPORT, "%d %s", ret, lshm_last_error());
    cr_assert(strstr(lshm_last_error(), "version 1") != NULL, "%s", lshm_last_error());
    cr_log_info("lshm_connect to a version 1 server: %s", lshm_last_error());
    lshm_ctx_free(ctx);
    child_ok(pid, 5000);
    unlink(path);
    rmdir(dir);
    free(dir);
}

LTEST(listen, connect_errors_are_clear)
{
    char *dir = tmp_dir(), path[128], longp[200];
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_port *port = NULL;
    int fd, ret;
    long long t0;

    snprintf(path, sizeof(path), "%s/none", dir);
    cr_assert_eq(lshm_connect(ctx, path, 1000, &port), -ENOENT, "%s", lshm_last_error());
    memset(longp, 'x', sizeof(longp) - 1);
    longp[sizeof(longp) - 1] = '\0';
    cr_assert_eq(lshm_connect(ctx, longp, 1000, &port), -ENAMETOOLONG);
    /* A stale socket: nobody listens. */
    close(bound_socket(path, dir, "stale", SOCK_SEQPACKET, false));
    cr_assert_eq(lshm_connect(ctx, path, 1000, &port), -ECONNREFUSED, "%s", lshm_last_error());
    unlink(path);
    /* A server that never says HELLO. */
    fd = bound_socket(path, dir, "mute", SOCK_SEQPACKET, true);
    t0 = now_ms();
    ret = lshm_connect(ctx, path, 300, &port);
    cr_assert_eq(ret, -ETIMEDOUT, "%d %s", ret, lshm_last_error());
    cr_assert_geq(now_ms() - t0, 250);
    cr_assert_lt(now_ms() - t0, 3000);
    cr_assert_null(port);
    close(fd);
    unlink(path);
    lshm_ctx_free(ctx);
    rmdir(dir);
    free(dir);
}
