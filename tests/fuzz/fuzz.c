/* Helpers of the fuzz targets: see fuzz.h. */
#include "fuzz.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "msgring.h"
#include "wire.h"

uint8_t fin_u8(struct fin *in)
{
    uint8_t v = 0;

    fin_bytes(in, &v, 1);
    return v;
}

uint16_t fin_u16(struct fin *in)
{
    uint16_t v = 0;

    fin_bytes(in, &v, 2);
    return v;
}

uint32_t fin_u32(struct fin *in)
{
    uint32_t v = 0;

    fin_bytes(in, &v, 4);
    return v;
}

size_t fin_bytes(struct fin *in, void *out, size_t n)
{
    size_t k = n < in->left ? n : in->left;

    memcpy(out, in->p, k);
    memset((uint8_t *)out + k, 0, n - k);
    in->p += k;
    in->left -= k;
    return k;
}

int fuzz_count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int n = 0;

    if (d == NULL)
        abort();
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1;
}

int fuzz_count_memfd_maps(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    int n = 0;

    if (f == NULL)
        abort();
    while (fgets(line, sizeof(line), f) != NULL)
        if (strstr(line, "/memfd:") != NULL)
            n++;
    fclose(f);
    return n;
}

void fuzz_leaks_begin(struct fuzz_leaks *l)
{
    l->fds = fuzz_count_fds();
    l->maps = fuzz_count_memfd_maps();
}

void fuzz_leaks_end(const struct fuzz_leaks *l, const char *target)
{
    int fds = fuzz_count_fds(), maps = fuzz_count_memfd_maps();

    if (fds != l->fds || maps != l->maps) {
        fprintf(stderr, "%s: leaked: fds %d -> %d, memfd mappings %d -> %d\n", target,
                l->fds, fds, l->maps, maps);
        abort();
    }
}

struct lshm_ctx *fuzz_ctx(uint8_t sel)
{
    struct lshm_ctx_params p = { .ring_entries = 64 };
    struct lshm_ctx *ctx;

    if (sel & 1)
        p.flags |= LSHM_CTX_NO_MULTISHOT;
    if (sel & 2)
        p.flags |= LSHM_CTX_SCRUB;
    if (sel & 4)
        p.flags |= LSHM_CTX_DROP_CANCELLED;
    p.max_segments = 1 + ((sel >> 3) & 3);      /* limits within reach */
    p.recv_queue = (sel & 0x20) ? 2 : 0;
    p.send_queue = (sel & 0x40) ? 4 : 0;
    if (lshm_ctx_new(&ctx, &p) < 0) {
        fprintf(stderr, "lshm_ctx_new: %s\n", lshm_last_error());
        abort();
    }
    return ctx;
}

int fuzz_raw_port(struct lshm_ctx *ctx, struct lshm_port **port)
{
    int sv[2], one = 1;

    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        abort();
    if (setsockopt(sv[1], SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)) < 0 ||
        fcntl(sv[1], F_SETFL, O_NONBLOCK) < 0)
        abort();
    if (lshm_port_adopt(ctx, sv[0], port) < 0) {
        close(sv[0]);
        close(sv[1]);
        return -1;
    }
    return sv[1];
}

ssize_t fuzz_raw_send(int raw, const void *buf, size_t len, const int *fds, unsigned nfds,
                      const struct ucred *cred)
{
    union {
        struct cmsghdr align;
        char           buf[CMSG_SPACE(sizeof(int) * 32) + CMSG_SPACE(sizeof(struct ucred))];
    } cm;
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
    struct cmsghdr *c;

    if (nfds > 32)
        nfds = 32;
    if (nfds == 0 && cred == NULL)
        return sendmsg(raw, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    memset(&cm, 0, sizeof(cm));
    mh.msg_control = cm.buf;
    mh.msg_controllen = (nfds ? CMSG_SPACE(sizeof(int) * nfds) : 0) +
                        (cred ? CMSG_SPACE(sizeof(*cred)) : 0);
    c = CMSG_FIRSTHDR(&mh);
    if (nfds > 0) {
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
        c = CMSG_NXTHDR(&mh, c);
    }
    if (cred != NULL) {
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_CREDENTIALS;
        c->cmsg_len = CMSG_LEN(sizeof(*cred));
        memcpy(CMSG_DATA(c), cred, sizeof(*cred));
    }
    return sendmsg(raw, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
}

ssize_t fuzz_raw_recv(int raw, void *buf, size_t cap, int *fds, unsigned max, unsigned *nfds)
{
    union {
        struct cmsghdr align;
        char           buf[CMSG_SPACE(sizeof(int) * 16) + CMSG_SPACE(sizeof(struct ucred))];
    } cm;
    struct iovec iov = { .iov_base = buf, .iov_len = cap };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf,
                         .msg_controllen = sizeof(cm.buf) };
    struct cmsghdr *c;
    ssize_t n;

    *nfds = 0;
    n = recvmsg(raw, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0)
        return n;
    for (c = CMSG_FIRSTHDR(&mh); c != NULL; c = CMSG_NXTHDR(&mh, c)) {
        size_t i, k;

        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (i = 0; i < k; i++) {
            int fd;

            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            if (*nfds < max)
                fds[(*nfds)++] = fd;
            else
                close(fd);
        }
    }
    return n;
}

size_t fuzz_hello(uint8_t *buf, uint16_t port_id, uint32_t max_segments, uint32_t features,
                  uint32_t ring_size)
{
    return lshm__wire_encode_hello(buf, getpid(), port_id, max_segments, features, ring_size);
}

int fuzz_ring_memfd(size_t size, uint16_t port_id, int32_t src, int32_t dst)
{
    struct lshm_msgring_header h;
    int fd = memfd_create("fuzz-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);

    if (fd < 0)
        return -1;
    if (ftruncate(fd, (off_t)(LSHM_RING_HEADER_SIZE + size)) < 0) {
        close(fd);
        return -1;
    }
    memset(&h, 0, sizeof(h));
    h.magic = LSHM_RING_MAGIC;
    h.version = LSHM_RING_VERSION;
    h.port_id = port_id;
    h.size = (uint32_t)size;
    h.src_pid = src;
    h.dst_pid = dst;
    if (pwrite(fd, &h, sizeof(h), 0) != (ssize_t)sizeof(h)) {
        close(fd);
        return -1;
    }
    return fd;
}

void fuzz_pump(struct lshm_ctx *ctx, unsigned times)
{
    while (times-- > 0)
        lshm_ctx_run(ctx, 0);
}

bool fuzz_avoid(const char *what)
{
    const char *env = getenv("LSHM_FUZZ_AVOID");
    size_t n = strlen(what);

    while (env != NULL && *env != '\0') {
        size_t k = strcspn(env, ",");

        if (k == n && strncmp(env, what, n) == 0)
            return true;
        env += k + (env[k] == ',');
    }
    return false;
}
