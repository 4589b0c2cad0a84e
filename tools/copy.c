/*
 * shmping --mode copy and --mode seqpacket: the baselines the other modes
 * are measured against.  The payload goes through an AF_UNIX socketpair
 * with blocking write and read, each message prefixed by a copy_hdr: no
 * io_uring, no shared memory.  copy is a SOCK_STREAM (any size); seqpacket
 * is a SOCK_SEQPACKET, one datagram per message (what the library's own
 * transport is made of, without the library).  Only against a forked peer,
 * which echoes MSG_PING after reading the whole message (so neither side
 * ever writes while the other is blocked writing), counts MSG_DATA and
 * answers MSG_END with its counts.  Both sides write every payload byte and
 * read (check) every byte they receive, as the io_uring modes do.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "shmping.h"

#define NS_PER_S        1000000000ull
#define REPLY_TIMEOUT_S 10

struct copy_hdr {
    uint32_t type;
    uint32_t seq;
    uint64_t len;
};

/* Writes everything, retrying short writes and EINTR: a message is never cut. */
static int write_all(int fd, const void *hdr, size_t hlen, const void *data, size_t dlen)
{
    struct iovec iov[2] = {
        { .iov_base = (void *)hdr, .iov_len = hlen },
        { .iov_base = (void *)data, .iov_len = dlen },
    };
    struct iovec *v = iov;
    int n = dlen ? 2 : 1;

    while (n > 0) {
        ssize_t w = writev(fd, v, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        while (n > 0 && (size_t)w >= v->iov_len) {
            w -= (ssize_t)v->iov_len;
            v++;
            n--;
        }
        if (n > 0) {
            v->iov_base = (uint8_t *)v->iov_base + w;
            v->iov_len -= (size_t)w;
        }
    }
    return 0;
}

/*
 * len bytes, or 0 on end of file before the first byte; -EPIPE on end of file
 * inside them; -EINTR only once a stop was requested; -EAGAIN on the receive
 * timeout.
 */
static ssize_t read_full(int fd, void *buf, size_t len)
{
    size_t got = 0;

    while (got < len) {
        ssize_t r = read(fd, (uint8_t *)buf + got, len - got);
        if (r == 0)
            return got == 0 ? 0 : -EPIPE;
        if (r < 0) {
            if (errno == EINTR && !stop_requested)
                continue;
            return errno == EWOULDBLOCK ? -EAGAIN : -errno;
        }
        got += (size_t)r;
    }
    return (ssize_t)len;
}

/*
 * One message: its header into h and its payload into *buf (grown to fit
 * on a stream).  A datagram must be read whole in one call, or the rest of
 * it is lost, so a packet socket reads header and payload together into a
 * buffer of the largest size the mode allows.  Returns as read_full().
 */
static ssize_t read_msg(int fd, bool packet, struct copy_hdr *h, uint8_t **buf, size_t *cap)
{
    ssize_t r;

    if (packet) {
        struct iovec iov[2] = {
            { .iov_base = h, .iov_len = sizeof(*h) },
            { .iov_base = *buf, .iov_len = *cap },
        };

        do
            r = readv(fd, iov, 2);
        while (r < 0 && errno == EINTR && !stop_requested);
        if (r < 0)
            return errno == EWOULDBLOCK ? -EAGAIN : -errno;
        if (r == 0)
            return 0;
        if ((size_t)r < sizeof(*h) || h->len != (uint64_t)r - sizeof(*h))
            return -EPROTO;
        return r;
    }
    r = read_full(fd, h, sizeof(*h));
    if (r <= 0)
        return r;
    if (h->len > MAX_SIZE)
        return -EMSGSIZE;
    if (h->len > *cap) {
        uint8_t *nb = realloc(*buf, h->len);

        if (nb == NULL)
            return -ENOMEM;
        *buf = nb;
        *cap = h->len;
    }
    if (h->len > 0)
        r = read_full(fd, *buf, h->len);
    return r == 0 ? -EPIPE : r;
}

static bool mode_is_packet(const struct config *cfg)
{
    return cfg->mode == MODE_SEQPACKET;
}

/* Payload room: a datagram carries the whole message, so it is sized once. */
static size_t payload_room(const struct config *cfg)
{
    if (mode_is_packet(cfg))
        return SEQPACKET_MAX;
    return cfg->size ? cfg->size : 1;
}

/* Sleep until when (now_ns); a signal ends it early only if interruptible. */
static void sleep_until(uint64_t when, bool interruptible)
{
    uint64_t now = now_ns();
    struct timespec ts;

    while (when > now) {
        ts.tv_sec = (time_t)((when - now) / NS_PER_S);
        ts.tv_nsec = (long)((when - now) % NS_PER_S);
        if (nanosleep(&ts, NULL) == 0 || interruptible)
            return;     /* EINTR: the caller looks at stop_requested */
        now = now_ns();
    }
}

/* Read every byte of a received payload: its pattern (--verify) or its sum. */
static bool payload_ok(const struct config *cfg, const uint8_t *buf, size_t len, uint32_t seq)
{
    return cfg->verify ? verify_piece(buf, 0, len, seq) : fast_check(buf, len, seq);
}

static int copy_peer(const struct config *cfg, int fd)
{
    struct peer_stats st = { 0 };
    size_t cap = payload_room(cfg);
    uint8_t *buf = malloc(cap);
    bool packet = mode_is_packet(cfg);
    int status = 0;

    if (buf == NULL) {
        err("peer: out of memory for a %zu-byte payload", cap);
        return EXIT_ERROR;
    }
    for (;;) {
        struct copy_hdr h;
        ssize_t r = read_msg(fd, packet, &h, &buf, &cap);

        if (r == 0)
            break;
        if (r < 0) {
            if (r != -EPIPE)
                err("peer: read: %s", strerror((int)-r));
            status = r != -EPIPE ? EXIT_ERROR : 0;
            break;
        }
        if (h.type == MSG_PING) {
            /* Read what it echoes, as a receiver does; a bad one is
             * reported here and counted by the client. */
            payload_ok(cfg, buf, h.len, h.seq);
            r = write_all(fd, &h, sizeof(h), buf, h.len);
        } else if (h.type == MSG_DATA) {
            st.received++;
            st.bytes += h.len;
            if (!payload_ok(cfg, buf, h.len, h.seq))
                st.corrupt++;
            if (st.received <= cfg->slow_n)
                sleep_until(now_ns() + (uint64_t)cfg->slow_ms * 1000000u, false);
        } else if (h.type == MSG_END) {
            h.len = sizeof(st);
            r = write_all(fd, &h, sizeof(h), &st, sizeof(st));
        } else {
            err("peer: unknown message type %u", h.type);
            status = EXIT_ERROR;
            break;
        }
        if (r < 0) {
            if (r != -EPIPE)
                err("peer: write: %s", strerror((int)-r));
            break;
        }
    }
    free(buf);
    close(fd);
    return status;
}

static const char *copy_why(ssize_t r)
{
    if (r == 0 || r == -EPIPE)
        return "peer closed the connection";
    if (r == -EAGAIN)
        return "no reply within 10 s";
    return strerror((int)-r);
}

static int copy_ping(const struct config *cfg, int fd, struct results *res,
                     uint8_t *sendbuf, uint8_t **recvbuf, size_t *recvcap)
{
    uint64_t interval = cfg->flood ? 0 : (uint64_t)(cfg->interval * (double)NS_PER_S);
    uint64_t start = now_ns(), next_send = start;
    uint64_t deadline = cfg->deadline > 0 ? start + (uint64_t)(cfg->deadline * NS_PER_S) : 0;

    faults_start(res);
    while (res->sent < cfg->count) {
        uint32_t seq = (uint32_t)(res->sent + 1);
        struct copy_hdr h = { .type = MSG_PING, .seq = seq, .len = cfg->size }, rh;
        uint64_t t0, now = now_ns();
        ssize_t r;
        double us;

        if (stop_requested) {
            res->interrupted = true;
            break;
        }
        if (deadline && now >= deadline)
            break;
        if (now < next_send) {
            sleep_until(deadline && deadline < next_send ? deadline : next_send, true);
            continue;
        }
        /* The pattern is made before the clock starts; the fast payload is
         * written as part of each message, as in the other modes. */
        if (cfg->verify)
            pattern_write(sendbuf, 0, cfg->size, seq);
        t0 = now_ns();
        if (!cfg->verify)
            fast_fill(sendbuf, 0, cfg->size, seq);
        r = write_all(fd, &h, sizeof(h), sendbuf, cfg->size);
        if (r < 0) {
            err("connection to peer closed: %s", copy_why(r));
            res->error = 1;
            break;
        }
        res->sent++;
        r = read_msg(fd, mode_is_packet(cfg), &rh, recvbuf, recvcap);
        if (r > 0 && (rh.type != MSG_PING || rh.seq != seq || rh.len != cfg->size)) {
            err("peer answered seq=%u with type %u, seq=%u, %llu bytes", seq, rh.type,
                rh.seq, (unsigned long long)rh.len);
            res->error = 1;
            break;
        }
        if (r == -EINTR) {
            res->interrupted = true;
            break;
        }
        if (r <= 0) {
            err("%s", copy_why(r));
            if (r != -EAGAIN)
                res->error = 1;
            break;
        }
        us = (double)(now_ns() - t0) / 1e3;
        res->received++;
        if (!payload_ok(cfg, *recvbuf, cfg->size, seq))
            res->corrupt++;
        if (results_add_rtt(res, us) < 0)
            err("out of memory for RTT samples");
        if (!cfg->quiet && !cfg->flood)
            print_reply(cfg, "peer", seq, cfg->size, us);
        next_send = interval ? next_send + interval : now;
    }
    faults_stop(res);
    res->bytes_moved = 2 * res->received * cfg->size;
    res->time_ms = (double)(now_ns() - start) / 1e6;
    return res->error ? -1 : 0;
}

static int copy_throughput(const struct config *cfg, int fd, struct results *res,
                           uint8_t *sendbuf, uint8_t **recvbuf, size_t *recvcap)
{
    uint64_t start = now_ns();
    uint64_t deadline = cfg->deadline > 0 ? start + (uint64_t)(cfg->deadline * NS_PER_S) : 0;
    struct copy_hdr h = { .type = MSG_DATA, .len = cfg->size };
    struct peer_stats st;
    uint64_t unclocked = 0;     /* as the io_uring modes: the clock every 32 or 64 KiB */
    ssize_t r = 0;

    faults_start(res);
    while (res->sent < cfg->count && !stop_requested) {
        if (deadline && unclocked >= 65536) {
            if (now_ns() >= deadline)
                break;
            unclocked = 0;
        }
        unclocked += cfg->size > 2048 ? cfg->size : 2048;
        h.seq = (uint32_t)(res->sent + 1);
        if (cfg->verify)
            pattern_write(sendbuf, 0, cfg->size, h.seq);
        else
            fast_fill(sendbuf, 0, cfg->size, h.seq);
        r = write_all(fd, &h, sizeof(h), sendbuf, cfg->size);
        if (r < 0)
            break;
        res->sent++;
    }
    res->interrupted = stop_requested;
    if (r == 0) {
        h = (struct copy_hdr){ .type = MSG_END, .seq = (uint32_t)res->sent, .len = 0 };
        r = write_all(fd, &h, sizeof(h), NULL, 0);
    }
    if (r == 0) {
        do
            r = read_msg(fd, mode_is_packet(cfg), &h, recvbuf, recvcap);
        while (r == -EINTR);    /* a second look at stop: the answer is near */
        if (r > 0 && (h.type != MSG_END || h.len != sizeof(st))) {
            err("peer's answer to the end of the stream is malformed");
            res->error = 1;
            return -1;
        }
        if (r > 0)
            memcpy(&st, *recvbuf, sizeof(st));
        if (r == 0)
            r = -EPIPE;
    }
    if (r < 0) {
        err("connection to peer closed: %s", copy_why(r));
        res->error = 1;
        return -1;
    }
    faults_stop(res);
    results_set_throughput(res, start, &st);
    return 0;
}

static int copy_peer_start(const struct config *cfg, int fd)
{
    if (drop_caps(cfg) < 0) {
        close(fd);
        return EXIT_ERROR;
    }
    return copy_peer(cfg, fd);
}

int copy_run_forked(const struct config *cfg, struct results *res)
{
    struct timeval tv = { .tv_sec = REPLY_TIMEOUT_S };
    uint8_t *sendbuf = NULL, *recvbuf = NULL;
    size_t recvcap = payload_room(cfg);
    int sock, status;
    pid_t pid;

    pid = fork_peer(cfg, mode_is_packet(cfg) ? SOCK_SEQPACKET : SOCK_STREAM, copy_peer_start,
                    &sock);
    if (pid < 0)
        return EXIT_ERROR;
    res->peer_pid = pid;
    sendbuf = malloc(cfg->size ? cfg->size : 1);
    recvbuf = malloc(recvcap < sizeof(struct peer_stats) ? sizeof(struct peer_stats) : recvcap);
    if (sendbuf == NULL || recvbuf == NULL) {
        err("out of memory for a %zu-byte payload", cfg->size);
        res->error = 1;
        goto out;
    }
    memset(sendbuf, 0x5a, cfg->size);
    /* A peer that hangs must not hang us: reads give up after 10 s. */
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (drop_caps(cfg) < 0) {
        res->error = 1;
        goto out;
    }
    if (!cfg->json && !cfg->bench)
        print_header(cfg, "peer", NULL, NULL);
    if (cfg->throughput)
        copy_throughput(cfg, sock, res, sendbuf, &recvbuf, &recvcap);
    else
        copy_ping(cfg, sock, res, sendbuf, &recvbuf, &recvcap);
out:
    free(sendbuf);
    free(recvbuf);
    close(sock);    /* the peer ends at end of file */
    status = reap_child(pid);
    if (!res->error && status != 0) {
        err("forked peer failed (wait status %d)", status);
        res->error = 1;
    }
    return res->error ? EXIT_ERROR : 0;
}
