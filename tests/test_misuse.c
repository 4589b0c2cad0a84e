/*
 * A context used where it must not be: from a second thread, or from a
 * forked child through the parent's copy.  Every call answers -EPERM before
 * it touches anything, the owner carries on unharmed, and a child may still
 * free the copy it inherited.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>

#include "port_util.h"

struct other {
    struct lshm_ctx  *ctx;
    struct lshm_port *port;
    struct lshm_buf  *buf;      /* the owner's */
    struct lshm_listener *listener;     /* the owner's, or NULL */
    struct lshm_tracking *tracking;     /* the owner's, or NULL */
    struct lshm_msg   msg;              /* the owner's, priv NULL: none */
    int               bad;      /* first call that did not answer -EPERM, 0: none */
    int               got;      /* what it answered */
};

#define EXPECT_EPERM(o, n, call)              \
    do {                                      \
        int r_ = (call);                      \
        if (r_ != -EPERM && (o)->bad == 0) {  \
            (o)->bad = (n);                   \
            (o)->got = r_;                    \
        }                                     \
    } while (0)

/* Every call that takes the context or what hangs on it, from elsewhere. */
static void misuse_all(struct other *o)
{
    uint8_t byte = 1;
    struct lshm_out out = { .type = T_DATA, .data = &byte, .size = 1, .fd = -1 };
    struct lshm_buf *b = NULL;
    struct lshm_port *p2 = NULL;
    struct lshm_tracking *t = NULL;
    struct lshm_msg m;
    int sv = -1;

    EXPECT_EPERM(o, 1, lshm_ctx_run(o->ctx, 0));
    EXPECT_EPERM(o, 2, lshm_send(o->port, &out, 0));
    EXPECT_EPERM(o, 3, lshm_buf_alloc(o->port, 100, &b));
    EXPECT_EPERM(o, 4, lshm_recv(o->port, &m, 0));
    EXPECT_EPERM(o, 5, lshm_port_wait(o->port, LSHM_WAIT_RECV, 0));
    EXPECT_EPERM(o, 6, lshm_flush(o->ctx));
    EXPECT_EPERM(o, 7, lshm_socketpair(o->ctx, &p2, &sv));
    EXPECT_EPERM(o, 8, lshm_tracking_new(o->port, 1, &t));
    EXPECT_EPERM(o, 9, lshm_buf_set_size(o->buf, 1));
    EXPECT_EPERM(o, 10, lshm_buf_grow(o->buf, 2 * LSHM_CHUNK_SIZE, 1));
    EXPECT_EPERM(o, 11, lshm_port_set_handler(o->port, NULL, NULL, NULL));
    EXPECT_EPERM(o, 12, lshm_connect(o->ctx, "/nonexistent/lshm", 10, &p2));
    EXPECT_EPERM(o, 13, lshm_port_adopt(o->ctx, 0, &p2));
    EXPECT_EPERM(o, 14, lshm_port_id(o->port));
    EXPECT_EPERM(o, 15, lshm_ctx_stats(o->ctx, &(struct lshm_ctx_stats){ 0 }));
    EXPECT_EPERM(o, 16, lshm_bufs_alloc(o->port, 100, 0, &b, &(unsigned){ 0 }));
    EXPECT_EPERM(o, 17, lshm_bufs_copy_in(&o->buf, 1, 0, &byte, 1));
    if (lshm_buf_data(o->buf) != NULL || lshm_buf_capacity(o->buf) != 0)
        o->bad = 18;
    if (o->listener != NULL) {
        EXPECT_EPERM(o, 19, lshm_accept(o->listener, &p2, 0));
        EXPECT_EPERM(o, 20, lshm_listener_set_handler(o->listener, NULL, NULL));
        lshm_listener_close(o->listener);
    }
    if (o->tracking != NULL && lshm_tracking_cancel(o->tracking))
        o->bad = 21;
    /* Calls without a return value do nothing at all. */
    lshm_buf_free(o->buf);
    lshm_bufs_free(&o->buf, 1);
    lshm_port_close(o->port);
    if (o->msg.priv != NULL) {
        struct lshm_msg copy = o->msg;

        lshm_msg_done(&copy);
    }
    if (b != NULL || p2 != NULL || t != NULL) {
        o->bad = 99;
        o->got = 0;
    }
}

static void *thread_main(void *arg)
{
    struct other *o = arg;

    misuse_all(o);
    lshm_ctx_free(o->ctx);      /* not this thread's: nothing happens */
    return NULL;
}

static void from_second_thread(unsigned flags)
{
    struct lshm_ctx_params cp = { .flags = flags };
    struct lshm_ctx *ctx = ctx_make(&cp);
    struct other o = { .ctx = ctx };
    pthread_t th;
    pid_t pid;
    int ret;

    char *dir = tmp_dir(), path[128];

    pid = spawn(ctx, &cp, &o.port, echo_pull, NULL);
    wait_ready(o.port);
    ret = lshm_buf_alloc(o.port, 1000, &o.buf);
    cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    snprintf(path, sizeof(path), "%s/srv", dir);
    cr_assert_eq(lshm_listen(ctx, path, 0, &o.listener), 0, "%s", lshm_last_error());
    cr_assert_eq(lshm_tracking_new(o.port, 5, &o.tracking), 0, "%s", lshm_last_error());
    cr_assert_eq(send_pat(o.port, 3, 10, 0), 0);
    cr_assert_eq(lshm_recv(o.port, &o.msg, 10000), 0, "%s", lshm_last_error());
    cr_assert_eq(pthread_create(&th, NULL, thread_main, &o), 0);
    pthread_join(th, NULL);
    cr_expect_eq(o.bad, 0, "call %d from a second thread answered %d, not -EPERM",
                 o.bad, o.got);
    /* The owner's buffer, message, tracking, listener and port were left alone. */
    cr_assert(msg_check(&o.msg, 3, 10));
    lshm_msg_done(&o.msg);
    cr_assert_eq(lshm_tracking_cancel(o.tracking), true);
    cr_assert_eq(access(path, F_OK), 0, "another thread closed the listener");
    lshm_listener_close(o.listener);
    rmdir(dir);
    free(dir);
    cr_assert_eq(lshm_buf_set_size(o.buf, 10), 0);
    memset(lshm_buf_data(o.buf), 0, 10);
    lshm_buf_free(o.buf);
    echo_roundtrip(o.port, 7, 100, false);
    echo_roundtrip(o.port, 8, 10000, true);
    spawn_end(ctx, o.port, pid);
}

LTEST(misuse, second_thread_gets_eperm_from_every_call)
{
    from_second_thread(0);
}

LTEST(misuse, second_thread_gets_eperm_without_defer_taskrun)
{
    from_second_thread(LSHM_CTX_NO_DEFER_TASKRUN);
}

static void from_forked_child(unsigned flags)
{
    struct lshm_ctx_params cp = { .flags = flags };
    struct lshm_ctx *ctx = ctx_make(&cp);
    struct other o = { .ctx = ctx };
    pid_t pid, kid;
    int ret, st;

    pid = spawn(ctx, &cp, &o.port, echo_pull, NULL);
    wait_ready(o.port);
    ret = lshm_buf_alloc(o.port, 1000, &o.buf);
    cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    kid = fork();
    cr_assert_geq(kid, 0);
    if (kid == 0) {
        /* Try for a while: without the check, the child's runs would take
         * the parent's completions. */
        for (int i = 0; i < 20 && o.bad == 0; i++) {
            misuse_all(&o);
            usleep(5000);
        }
        if (o.bad != 0)
            fprintf(stderr, "forked child: call %d answered %d, not -EPERM\n", o.bad, o.got);
        lshm_ctx_free(ctx);     /* the inherited copy: safe to free */
        _exit(o.bad == 0 ? 0 : 1);
    }
    /* Meanwhile the parent's traffic goes on undisturbed. */
    for (uint32_t i = 0; i < 20; i++)
        echo_roundtrip(o.port, i, 64, false);
    st = wait_child(kid, 10000);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the forked child's calls: status %d", st);
    echo_roundtrip(o.port, 100, 10000, true);
    cr_assert_eq(lshm_buf_set_size(o.buf, 10), 0);
    lshm_buf_free(o.buf);
    spawn_end(ctx, o.port, pid);
}

LTEST(misuse, forked_child_gets_eperm_and_parent_is_unharmed)
{
    from_forked_child(0);
}

LTEST(misuse, forked_child_gets_eperm_without_defer_taskrun)
{
    from_forked_child(LSHM_CTX_NO_DEFER_TASKRUN);
}
