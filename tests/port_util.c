#include "port_util.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
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

    memcpy(buf, &h, sizeof(h));
    memcpy(buf + sizeof(h), &b, sizeof(b));
    return sizeof(h) + sizeof(b);
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
