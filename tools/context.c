/*
 * shmping: io_uring contexts as the tool makes them: a context whose failure
 * is reported, and --idle ports that sit in it doing nothing.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "shmping.h"

int ctx_new_reported(struct lshm_ctx **ctx, const struct config *cfg, const char *who)
{
    struct lshm_ctx_params p = {
        .flags = (cfg->no_ring ? LSHM_CTX_NO_RING : 0u) | (cfg->no_futex ? LSHM_CTX_NO_FUTEX : 0u) |
                 (cfg->no_io_uring ? LSHM_CTX_NO_IO_URING : 0u),
        .spin_us = cfg->spin_us,
    };
    int ret = lshm_ctx_new(ctx, &p);

    if (ret == -EPERM || ret == -ENOSYS)
        err("%sio_uring unavailable: %s", who, lib_why(ret));
    else if (ret < 0)
        err("%scannot create an io_uring context: %s", who, lib_why(ret));
    return ret;
}

void idle_close(struct idle_ports *ip)
{
    unsigned i;

    for (i = 0; i < ip->n; i++)
        lshm_port_close(ip->ports[i]);
    free(ip->ports);
    ip->ports = NULL;
    ip->n = 0;
}

/*
 * Each socketpair gives two ports: the context adopts both ends, so every
 * port makes a real handshake (with itself) and then stays open, idle.
 */
int idle_open(const struct config *cfg, struct lshm_ctx *ctx, struct idle_ports *ip,
              const char *who)
{
    unsigned n = cfg->idle, i;
    int sv[2], ret;

    ip->n = 0;
    ip->ports = NULL;
    if (n == 0)
        return 0;
    ip->ports = calloc(n + 1, sizeof(*ip->ports));   /* n is even; + 1 all the same */
    if (ip->ports == NULL) {
        err("%s--idle %u: out of memory", who, n);
        return -1;
    }
    while (ip->n < n) {
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
            err("%s--idle %u: socketpair after %u ports: %s", who, n, ip->n, strerror(errno));
            goto fail;
        }
        for (i = 0; i < 2; i++) {
            ret = lshm_port_adopt(ctx, sv[i], &ip->ports[ip->n]);
            if (ret < 0) {
                err("%s--idle %u: adopting port %u: %s", who, n, ip->n, lib_why(ret));
                close(sv[i]);
                if (i == 0)
                    close(sv[1]);
                goto fail;
            }
            ip->n++;
        }
    }
    for (i = 0; i < ip->n; i++) {
        ret = lshm_port_wait(ip->ports[i], LSHM_WAIT_READY, HANDSHAKE_MS);
        if (ret < 0) {
            err("%s--idle %u: handshake of port %u: %s", who, n, i, lib_why(ret));
            goto fail;
        }
    }
    return 0;
fail:
    idle_close(ip);
    return -1;
}
