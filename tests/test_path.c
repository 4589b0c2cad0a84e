/*
 * The socket path's life: a listener never removes, replaces or takes over
 * a file that is not its own (a path that changed hands while it ran,
 * another user's stale socket, a stranger's file under its temporary name),
 * and a limit of its own process is named as such, never taken for a live
 * server.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include "port_util.h"

static ino_t ino_of(const char *path)
{
    struct stat st;

    cr_assert_eq(lstat(path, &st), 0, "%s is gone", path);
    return st.st_ino;
}

LTEST(path, close_leaves_a_path_that_changed_hands)
{
    char *dir = tmp_dir(), path[128], moved[160];
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_listener *l1, *l2;
    struct lshm_port *p;
    ino_t second;
    int ret;

    snprintf(path, sizeof(path), "%s/srv", dir);
    snprintf(moved, sizeof(moved), "%s/srv.old", dir);
    cr_assert_eq(lshm_listen(ctx, path, 0, &l1), 0, "%s", lshm_last_error());
    /* Someone moves the first server's socket away and starts another. */
    cr_assert_eq(rename(path, moved), 0);
    cr_assert_eq(lshm_listen(ctx, path, 0, &l2), 0, "%s", lshm_last_error());
    second = ino_of(path);
    lshm_listener_close(l1);
    cr_assert_eq(ino_of(path), second, "closing the first listener removed the second's socket");
    /* And the second still takes clients there. */
    {
        pid_t pid = fork();

        cr_assert_geq(pid, 0);
        if (pid == 0) {
            struct lshm_ctx *c2;
            struct lshm_port *cp;

            lshm_ctx_free(ctx);
            if (lshm_ctx_new(&c2, NULL) < 0)
                _exit(90);
            ret = lshm_connect(c2, path, 5000, &cp);
            if (ret == 0)
                lshm_port_close(cp);
            lshm_ctx_free(c2);
            _exit(ret == 0 ? 0 : 1);
        }
        ret = lshm_accept(l2, &p, 5000);
        cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
        lshm_port_close(p);
        child_ok(pid, 10000);
    }
    lshm_listener_close(l2);
    cr_assert_neq(access(path, F_OK), 0, "a listener left its own socket behind");
    cr_assert_eq(access(moved, F_OK), 0, "the moved socket is not the listener's to remove");
    unlink(moved);
    lshm_ctx_free(ctx);
    rmdir(dir);
    free(dir);
}

LTEST(path, context_free_leaves_a_path_that_changed_hands)
{
    char *dir = tmp_dir(), path[128];
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_listener *l;
    int fd;

    snprintf(path, sizeof(path), "%s/srv", dir);
    cr_assert_eq(lshm_listen(ctx, path, 0, &l), 0, "%s", lshm_last_error());
    /* The path now names a stranger's file. */
    cr_assert_eq(unlink(path), 0);
    fd = open(path, O_CREAT | O_WRONLY, 0600);
    cr_assert_geq(fd, 0);
    close(fd);
    lshm_ctx_free(ctx);
    cr_assert_eq(access(path, F_OK), 0, "freeing the context removed a file not its own");
    unlink(path);
    rmdir(dir);
    free(dir);
}

LTEST(path, another_users_stale_socket_is_not_removed)
{
    char *dir = tmp_dir(), path[128];
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_listener *l = NULL;
    int ret;

    if (geteuid() != 0) {
        lshm_ctx_free(ctx);
        rmdir(dir);
        free(dir);
        cr_skip_test("needs root to give a socket file to another user");
    }
    close(bound_socket(path, dir, "sock", SOCK_SEQPACKET, false));
    cr_assert_eq(chown(path, 4242, 4242), 0);
    ret = lshm_listen(ctx, path, 0, &l);
    cr_assert_eq(ret, -EADDRINUSE, "%d %s", ret, lshm_last_error());
    cr_assert(strstr(lshm_last_error(), "uid 4242") != NULL, "%s", lshm_last_error());
    cr_assert_null(l);
    cr_assert_eq(access(path, F_OK), 0, "another user's socket file was removed");
    unlink(path);
    lshm_ctx_free(ctx);
    rmdir(dir);
    free(dir);
}

LTEST(path, a_strangers_file_under_the_temporary_name_stays)
{
    char *dir = tmp_dir(), path[128], tmp[200];
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_listener *l = NULL;
    int fd, ret;

    snprintf(path, sizeof(path), "%s/srv", dir);
    snprintf(tmp, sizeof(tmp), "%s.%d.tmp", path, (int)getpid());
    fd = open(tmp, O_CREAT | O_WRONLY, 0600);
    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, "keep", 4), 4);
    close(fd);
    ret = lshm_listen(ctx, path, 0, &l);
    cr_assert_eq(ret, -EEXIST, "%d %s", ret, lshm_last_error());
    cr_assert_eq(access(tmp, F_OK), 0, "lshm_listen removed a file that was not its own");
    cr_assert_neq(access(path, F_OK), 0);
    unlink(tmp);
    lshm_ctx_free(ctx);
    rmdir(dir);
    free(dir);
}

LTEST(path, out_of_fds_is_not_taken_for_a_live_server)
{
    char *dir = tmp_dir(), path[128];
    struct lshm_ctx *ctx = ctx_make(NULL);
    struct lshm_listener *l = NULL;
    struct rlimit old, low;
    int fill[256], nfill = 0, ret;

    close(bound_socket(path, dir, "sock", SOCK_SEQPACKET, false));
    cr_assert_eq(getrlimit(RLIMIT_NOFILE, &old), 0);
    low = old;
    low.rlim_cur = count_fds() + 20;
    cr_assert_eq(setrlimit(RLIMIT_NOFILE, &low), 0);
    while (nfill < 256 && (fill[nfill] = dup(2)) >= 0)
        nfill++;
    ret = lshm_listen(ctx, path, 0, &l);
    for (int i = 0; i < nfill; i++)
        close(fill[i]);
    cr_assert_eq(setrlimit(RLIMIT_NOFILE, &old), 0);
    cr_assert_eq(ret, -EMFILE, "%d %s", ret, lshm_last_error());
    cr_assert(strstr(lshm_last_error(), "RLIMIT_NOFILE") != NULL, "%s", lshm_last_error());
    cr_assert_eq(access(path, F_OK), 0);
    /* With fds again, the stale socket is taken over. */
    ret = lshm_listen(ctx, path, 0, &l);
    cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    lshm_listener_close(l);
    lshm_ctx_free(ctx);
    rmdir(dir);
    free(dir);
}
