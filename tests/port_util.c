#include "port_util.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

#include "wire.h"

struct lshm_ctx *ctx_make(const struct lshm_ctx_params *p)
{
    struct lshm_ctx *ctx;
    int ret = lshm_ctx_new(&ctx, p);

    cr_assert_eq(ret, 0, "lshm_ctx_new: %d %s", ret, lshm_last_error());
    return ctx;
}

pid_t spawn(struct lshm_ctx *ctx, const struct lshm_ctx_params *cp, struct lshm_port **port,
            child_fn fn, void *arg)
{
    int peer, ret;
    pid_t pid;

    ret = lshm_socketpair(ctx, port, &peer);
    cr_assert_eq(ret, 0, "lshm_socketpair: %d %s", ret, lshm_last_error());
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        struct lshm_ctx *cctx;
        struct lshm_port *cport;
        int rc;

        lshm_ctx_free(ctx);
        if (lshm_ctx_new(&cctx, cp) < 0) {
            fprintf(stderr, "child: lshm_ctx_new: %s\n", lshm_last_error());
            _exit(90);
        }
        if (lshm_port_adopt(cctx, peer, &cport) < 0) {
            fprintf(stderr, "child: lshm_port_adopt: %s\n", lshm_last_error());
            _exit(91);
        }
        rc = fn(cctx, cport, arg);
        lshm_port_close(cport);
        lshm_ctx_free(cctx);
        _exit(rc);
    }
    close(peer);
    return pid;
}

void child_ok(pid_t pid, int timeout_ms)
{
    int st = wait_child(pid, timeout_ms);

    cr_assert_neq(st, -1, "child %d did not finish within %d ms", (int)pid, timeout_ms);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0,
              "child %d failed: %s %d", (int)pid, WIFEXITED(st) ? "exit" : "signal",
              WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
}

void spawn_end(struct lshm_ctx *ctx, struct lshm_port *port, pid_t pid)
{
    lshm_port_close(port);
    lshm_ctx_free(ctx);
    child_ok(pid, 10000);
}

void wait_ready(struct lshm_port *port)
{
    int ret = lshm_port_wait(port, LSHM_WAIT_READY, 10000);

    cr_assert_gt(ret, 0, "handshake: %d %s", ret, lshm_last_error());
}

int send_out(struct lshm_port *port, const struct lshm_out *out, unsigned flags)
{
    int ret;

    while ((ret = lshm_send(port, out, flags)) == -EAGAIN) {
        ret = lshm_port_wait(port, LSHM_WAIT_SEND, 10000);
        if (ret < 0)
            return ret;
    }
    return ret;
}

int send_inline(struct lshm_port *port, uint8_t type, uint32_t stream, const void *data,
                size_t size, int fd)
{
    struct lshm_out out = {
        .type = type, .stream = stream, .data = size ? data : NULL, .size = size, .fd = fd,
    };

    return send_out(port, &out, 0);
}

int echo_pull(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    int timeout_ms = arg != NULL ? *(const int *)arg : 20000;
    struct lshm_msg m;
    int ret;

    for (;;) {
        uint8_t buf[LSHM_INLINE_MAX];
        size_t off = 0;
        unsigned i;

        ret = lshm_recv(port, &m, timeout_ms);
        if (ret == -EPIPE)
            return 0;
        CK(ret == 0);
        CK(m.size <= sizeof(buf));
        for (i = 0; i < m.niov; i++) {
            memcpy(buf + off, m.iov[i].base, m.iov[i].len);
            off += m.iov[i].len;
        }
        if (m.fd >= 0)
            close(m.fd);
        CK(send_inline(port, m.type, m.stream, buf, m.size, -1) == 0);
        lshm_msg_done(&m);
    }
}

int raw_peer(struct lshm_ctx *ctx, struct lshm_port **port)
{
    int raw, one = 1;

    cr_assert_eq(lshm_socketpair(ctx, port, &raw), 0, "%s", lshm_last_error());
    cr_assert_eq(setsockopt(raw, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)), 0);
    return raw;
}

size_t raw_hello_build(uint8_t *buf, pid_t pid, uint16_t version)
{
    struct lshm_wire_msg h = { .pid = pid, .port_id = RAW_PORT, .type = LSHM_WIRE_HELLO,
                               .size = sizeof(struct lshm_wire_hello) };
    struct lshm_wire_hello b = { .magic = LSHM_MAGIC, .version = version, .port_id = RAW_PORT,
                                 .header_size = 4096, .chunk_size = 16384,
                                 .chunk_count = 640, .max_segments = 32 };

    /* Version 1's HELLO is this one's first 24 bytes. */
    if (version == 1)
        h.size = 24;
    memcpy(buf, &h, sizeof(h));
    memcpy(buf + sizeof(h), &b, h.size);
    return sizeof(h) + h.size;
}

void raw_sendv(int fd, const void *buf, size_t len, const int *fds, unsigned nfds)
{
    union {
        struct cmsghdr align;
        char           buf[CMSG_SPACE(sizeof(int) * 32)];
    } cm;
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };

    if (nfds > 0) {
        struct cmsghdr *c;

        cr_assert_leq(nfds, 32);
        memset(&cm, 0, sizeof(cm));
        mh.msg_control = cm.buf;
        mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    cr_assert_eq(sendmsg(fd, &mh, MSG_NOSIGNAL), (ssize_t)len, "sendmsg: %m");
}

/* Scale a count down under a sanitizer (LSHM_SANITIZER is set by make asan/tsan). */
unsigned scaled(unsigned n, unsigned div)
{
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
    bool san = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
    bool san = true;
#else
    bool san = false;
#endif
#else
    bool san = false;
#endif

    if (san || getenv("LSHM_SANITIZER") != NULL)
        return n / div ? n / div : 1;
    return n;
}

/* ---- the payload pattern ---- */

bool msg_check(const struct lshm_msg *m, uint32_t seq, size_t size)
{
    size_t off = 0;
    unsigned i;

    if (m->size != size)
        return false;
    for (i = 0; i < m->niov; i++) {
        if (pattern_mismatch(m->iov[i].base, off, m->iov[i].len, seq) >= 0)
            return false;
        off += m->iov[i].len;
    }
    return off == size;
}

/* ---- sending ---- */

/* Inline message whose payload is pattern (seq, 0 .. size). */
int send_pat(struct lshm_port *port, uint32_t seq, size_t size, unsigned flags)
{
    uint8_t buf[LSHM_INLINE_MAX];
    struct lshm_out out = { .type = T_DATA, .stream = seq, .fd = -1 };

    pattern_write(buf, 0, size, seq);
    out.data = size ? buf : NULL;
    out.size = size;
    return send_out(port, &out, flags);
}

/* A shared-memory message of size bytes (pattern seq), in as many buffers
 * as it takes; waits for room in the queue or for chunks (bounded). */
int send_shm(struct lshm_port *port, uint32_t seq, size_t size, int fd)
{
    struct lshm_buf *bufs[LSHM_MAX_DESCS];
    struct iovec iov[LSHM_MAX_DESCS];
    struct lshm_out out = { .type = T_DATA, .stream = seq, .fd = fd };
    unsigned n = 0, i;
    size_t off = 0;
    int ret;

    ret = lshm_bufs_alloc(port, size, 10000, bufs, &n);
    if (ret < 0)
        return ret;
    lshm_bufs_iov(bufs, n, iov);
    for (i = 0; i < n; i++) {
        pattern_write(iov[i].iov_base, off, iov[i].iov_len, seq);
        off += iov[i].iov_len;
    }
    out.bufs = bufs;
    out.nbufs = n;
    ret = send_out(port, &out, 0);
    if (ret < 0)
        lshm_bufs_free(bufs, n);
    return ret;
}

/* Inline up to LSHM_INLINE_MAX bytes, in shared memory beyond. */
int send_any(struct lshm_port *port, uint32_t seq, size_t size)
{
    return size > LSHM_INLINE_MAX ? send_shm(port, seq, size, -1) : send_pat(port, seq, size, 0);
}

/* Fill the buffer b with pattern seq (size bytes) and send it as message seq. */
int send_buf(struct lshm_port *port, struct lshm_buf *b, uint32_t seq, size_t size)
{
    int ret;

    pattern_write(lshm_buf_data(b), 0, size, seq);
    ret = lshm_buf_set_size(b, size);
    if (ret < 0)
        return ret;
    return lshm_send(port, &(struct lshm_out){ .type = T_DATA, .stream = seq, .bufs = &b,
                                               .nbufs = 1, .fd = -1 }, 0);
}

/* The peer's T_CTRL answer: its stream (what the peer counted). */
uint32_t recv_ctrl(struct lshm_port *port, int timeout_ms)
{
    struct lshm_msg m;
    uint32_t stream;
    int ret = lshm_recv(port, &m, timeout_ms);

    cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    cr_assert_eq(m.type, T_CTRL);
    stream = m.stream;
    lshm_msg_done(&m);
    return stream;
}

/* In a child: wait for the parent's BYE (the port then closes with -EPIPE). */
int wait_bye(struct lshm_port *port)
{
    struct lshm_msg m;

    CK(lshm_recv(port, &m, 20000) == -EPIPE);
    return 0;
}

/* In a child: report value in an empty T_CTRL (recv_ctrl), then wait_bye. */
int report_then_bye(struct lshm_port *port, uint32_t value)
{
    CK(send_inline(port, T_CTRL, value, NULL, 0, -1) == 0);
    return wait_bye(port);
}

struct echo_state {
    int  error;
    bool closed;
};

static void echo_on_msg(struct lshm_port *port, struct lshm_msg *m, void *arg)
{
    struct echo_state *st = arg;
    uint8_t buf[LSHM_INLINE_MAX];
    size_t off = 0;
    unsigned i;

    if (m->size > sizeof(buf)) {
        st->error = 1;
    } else {
        for (i = 0; i < m->niov; i++) {
            memcpy(buf + off, m->iov[i].base, m->iov[i].len);
            off += m->iov[i].len;
        }
        if (send_inline(port, m->type, m->stream, buf, m->size, -1) != 0)
            st->error = 2;
    }
    if (m->fd >= 0)
        close(m->fd);
    lshm_msg_done(m);
}

static void echo_on_close(struct lshm_port *port, int error, void *arg)
{
    struct echo_state *st = arg;

    st->closed = true;
    if (error != -EPIPE)
        st->error = 3;
}

/* The same echo with a handler run by lshm_ctx_run. */
int echo_handler(struct lshm_ctx *ctx, struct lshm_port *port, void *arg)
{
    struct echo_state st = { 0, false };
    long long end = now_ms() + 30000;

    CK(lshm_port_set_handler(port, echo_on_msg, echo_on_close, &st) == 0);
    while (!st.closed && st.error == 0 && now_ms() < end)
        CK(lshm_ctx_run(ctx, 100) >= 0);
    CK(st.error == 0);
    CK(st.closed);
    return 0;
}

/* One round trip through an echo child: message seq of size bytes
 * (inline, or in shared memory when shm), and its echo checked. */
void echo_roundtrip(struct lshm_port *port, uint32_t seq, size_t size, bool shm)
{
    struct lshm_msg m;
    int ret;

    ret = shm ? send_shm(port, seq, size, -1) : send_pat(port, seq, size, 0);
    cr_assert_eq(ret, 0, "send %u: %d %s", seq, ret, lshm_last_error());
    ret = lshm_recv(port, &m, 10000);
    cr_assert_eq(ret, 0, "recv %u: %d %s", seq, ret, lshm_last_error());
    cr_assert_eq(m.stream, seq);
    cr_assert_eq(m.type, T_DATA);
    cr_assert(msg_check(&m, seq, size), "echo %u differs", seq);
    lshm_msg_done(&m);
}

void pingpong_pull(struct lshm_port *port, unsigned n, size_t size)
{
    unsigned i;

    for (i = 0; i < n; i++)
        echo_roundtrip(port, i, size, false);
}
void srv_on_msg(struct lshm_port *port, struct lshm_msg *m, void *arg)
{
    struct server *s = arg;
    uint32_t seq = m->stream;

    if (!msg_check(m, seq, m->size))
        s->error = 1;
    lshm_msg_done(m);
    if (send_inline(port, T_CTRL, seq, NULL, 0, -1) != 0)
        s->error = 2;
    s->msgs++;
}

void srv_on_close(struct lshm_port *port, int error, void *arg)
{
    struct server *s = arg;

    if (error != -EPIPE) {
        fprintf(stderr, "pid %d: port closed: %d %s\n", getpid(), error,
                lshm_port_error(port));
        s->error = 3;
    }
    s->closed++;
    lshm_port_close(port);
}

char *tmp_dir(void)
{
    char *d = strdup("/tmp/lshm-test-XXXXXX");

    cr_assert_not_null(mkdtemp(d));
    return d;
}

/* A socket of type bound to dir/name (its path into path[128]), listening
 * if asked; its fd.  Closed unlistened, it leaves a stale socket file. */
int bound_socket(char *path, const char *dir, const char *name, int type, bool listening)
{
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    int fd;

    snprintf(path, 128, "%s/%s", dir, name);
    strcpy(sun.sun_path, path);
    fd = socket(AF_UNIX, type, 0);
    cr_assert_eq(bind(fd, (struct sockaddr *)&sun, sizeof(sun)), 0);
    if (listening)
        cr_assert_eq(listen(fd, 4), 0);
    return fd;
}

/* Two socketpairs, and a child running fn on one end of each (ctx, when not
 * NULL, freed there first); mine[] are the parent's ends. */
pid_t fork_two(struct lshm_ctx *ctx, int mine[2], two_fn fn, unsigned arg)
{
    int sv[2][2], i;
    pid_t pid;

    for (i = 0; i < 2; i++)
        cr_assert_eq(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv[i]), 0);
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        if (ctx != NULL)
            lshm_ctx_free(ctx);
        close(sv[0][0]);
        close(sv[1][0]);
        _exit(fn(sv[0][1], sv[1][1], arg));
    }
    close(sv[0][1]);
    close(sv[1][1]);
    mine[0] = sv[0][0];
    mine[1] = sv[1][0];
    return pid;
}

/* fork_two, with ports A and B of ctx on the parent's ends, handshakes done. */
pid_t spawn_two(struct lshm_ctx *ctx, struct lshm_port **pa, struct lshm_port **pb,
                two_fn fn, unsigned arg)
{
    int mine[2];
    pid_t pid = fork_two(ctx, mine, fn, arg);

    cr_assert_eq(lshm_port_adopt(ctx, mine[0], pa), 0);
    cr_assert_eq(lshm_port_adopt(ctx, mine[1], pb), 0);
    wait_ready(*pa);
    wait_ready(*pb);
    return pid;
}

/* The end of a spawn_two. */
void spawn_two_end(struct lshm_ctx *ctx, struct lshm_port *pa, struct lshm_port *pb, pid_t pid)
{
    lshm_port_close(pa);
    lshm_port_close(pb);
    lshm_ctx_free(ctx);
    child_ok(pid, 10000);
}

/* One message (any) on port within 5 s, expected; what names the port. */
void expect_msg(struct lshm_port *port, const char *what)
{
    struct lshm_msg m;
    int ret = lshm_recv(port, &m, 5000);

    cr_expect_eq(ret, 0, "%s: %d %s", what, ret, lshm_port_error(port));
    if (ret == 0)
        lshm_msg_done(&m);
}
