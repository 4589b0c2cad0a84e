/* shmping: timing, the payload pattern, RTT statistics, signals, privileges. */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/capability.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "shmping.h"

volatile sig_atomic_t stop_requested;

void err(const char *fmt, ...)
{
    va_list ap;

    fputs("shmping: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/*
 * The payload of message seq is a stream of 64-bit words, word k a mix of seq
 * and k, so that a byte out of place, a stale chunk or another message's
 * payload all show.  Bytes are taken from each word in memory order, so the
 * pattern is the same whichever piece (iov, buffer) a byte lands in.
 */
static inline uint64_t pattern_word(uint32_t seq, uint64_t k)
{
    uint64_t v = (k ^ ((uint64_t)seq << 40)) * 0x9e3779b97f4a7c15ull + seq;

    return v ^ (v >> 29);
}

void pattern_fill(void *dst, size_t off, size_t len, uint32_t seq)
{
    uint8_t *d = dst;
    size_t i = 0;

    while (i < len) {
        size_t pos = off + i;
        uint64_t w = pattern_word(seq, pos / 8);

        if (pos % 8 == 0 && len - i >= 8) {
            memcpy(d + i, &w, 8);
            i += 8;
        } else {
            uint8_t b[8];
            memcpy(b, &w, 8);
            d[i++] = b[pos % 8];
        }
    }
}

long pattern_check(const void *src, size_t off, size_t len, uint32_t seq)
{
    const uint8_t *s = src;
    size_t i = 0;

    while (i < len) {
        size_t pos = off + i;
        uint64_t w = pattern_word(seq, pos / 8);
        uint8_t b[8];

        memcpy(b, &w, 8);
        if (pos % 8 == 0 && len - i >= 8) {
            if (memcmp(s + i, b, 8) == 0) {
                i += 8;
                continue;
            }
            while (s[i] == b[(off + i) % 8])
                i++;
            return (long)i;
        }
        if (s[i] != b[pos % 8])
            return (long)i;
        i++;
    }
    return -1;
}

bool verify_piece(const void *src, size_t off, size_t len, uint32_t seq)
{
    long at = pattern_check(src, off, len, seq);
    uint64_t w;
    uint8_t b[8];
    size_t pos;

    if (at < 0)
        return true;
    pos = off + (size_t)at;
    w = pattern_word(seq, pos / 8);
    memcpy(b, &w, 8);
    err("seq=%u: payload differs at byte %zu: 0x%02x, expected 0x%02x",
        seq, pos, ((const uint8_t *)src)[at], b[pos % 8]);
    return false;
}

int results_add_rtt(struct results *r, double us)
{
    if (r->nrtt == r->rtt_cap) {
        size_t cap = r->rtt_cap ? r->rtt_cap * 2 : 1024;
        double *p = realloc(r->rtt_us, cap * sizeof(*p));
        if (p == NULL)
            return -ENOMEM;
        r->rtt_us = p;
        r->rtt_cap = cap;
    }
    r->rtt_us[r->nrtt++] = us;
    return 0;
}

void results_free(struct results *r)
{
    free(r->rtt_us);
    r->rtt_us = NULL;
    r->nrtt = r->rtt_cap = 0;
}

void results_set_throughput(struct results *r, uint64_t start, const struct peer_stats *st)
{
    r->time_ms = (double)(now_ns() - start) / 1e6;
    r->received = st->received;
    r->corrupt = st->corrupt;
    if (r->time_ms > 0) {
        double secs = r->time_ms / 1e3;
        r->msgs_per_s = (double)st->received / secs;
        r->gb_per_s = (double)st->bytes / secs / 1e9;
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return (x > y) - (x < y);
}

/* Nearest rank: the smallest sample with at least p% of them at or below it. */
static double percentile(const double *sorted, size_t n, double p)
{
    size_t rank = (size_t)ceil(p / 100.0 * (double)n);

    return sorted[rank == 0 ? 0 : rank - 1];
}

void rtt_summarize(const struct results *r, struct rtt_summary *s)
{
    double sum = 0, sum2 = 0, *sorted;
    size_t n = r->nrtt;

    memset(s, 0, sizeof(*s));
    if (n == 0)
        return;
    sorted = malloc(n * sizeof(*sorted));
    if (sorted == NULL) {
        err("out of memory for %zu samples", n);
        return;
    }
    memcpy(sorted, r->rtt_us, n * sizeof(*sorted));
    qsort(sorted, n, sizeof(*sorted), cmp_double);
    for (size_t i = 0; i < n; i++) {
        sum += sorted[i];
        sum2 += sorted[i] * sorted[i];
    }
    s->min = sorted[0];
    s->max = sorted[n - 1];
    s->avg = sum / (double)n;
    /* As ping: the standard deviation, sqrt(E[x^2] - E[x]^2). */
    s->mdev = sqrt(fmax(0.0, sum2 / (double)n - s->avg * s->avg));
    s->p50 = percentile(sorted, n, 50);
    s->p90 = percentile(sorted, n, 90);
    s->p99 = percentile(sorted, n, 99);
    s->p999 = percentile(sorted, n, 99.9);
    free(sorted);
}

/*
 * Called after set-up (ring, sockets) and before anything is read from a
 * peer, so that a bug in the receive path cannot use the process's
 * privileges.  Lowering capabilities never needs a privilege.
 */
int fd_room(unsigned n)
{
    rlim_t want = (rlim_t)n + 256;   /* and the rest: rings, segments, stdio */
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur == RLIM_INFINITY ||
        rl.rlim_cur >= want)
        return 0;
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < want) {
        err("--idle %u needs about %llu file descriptors a process; the hard limit is "
            "%llu (ulimit -Hn)", n, (unsigned long long)want, (unsigned long long)rl.rlim_max);
        return -1;
    }
    rl.rlim_cur = want;
    if (setrlimit(RLIMIT_NOFILE, &rl) < 0) {
        err("--idle %u: cannot raise RLIMIT_NOFILE to %llu: %s", n,
            (unsigned long long)want, strerror(errno));
        return -1;
    }
    return 0;
}

int drop_caps(const struct config *cfg)
{
    cap_t none;
    int ret;

    if (cfg->keep_caps)
        return 0;
    none = cap_init();
    if (none == NULL) {
        err("cannot drop capabilities: cap_init: %s", strerror(errno));
        return -1;
    }
    ret = cap_set_proc(none);
    if (ret != 0)
        err("cannot drop capabilities: cap_set_proc: %s", strerror(errno));
    cap_free(none);
    if (ret == 0 && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        err("cannot set no_new_privs: %s", strerror(errno));
        ret = -1;
    }
    return ret == 0 ? 0 : -1;
}

static void on_stop(int sig)
{
    (void)sig;
    stop_requested = 1;
}

/* No SA_RESTART: a blocking read or wait returns EINTR and the loop stops. */
void install_signals(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_stop;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

/*
 * A forked peer leaves Ctrl-C to its parent (which then prints its summary
 * and closes the link) and dies with it.
 */
void peer_signals(void)
{
    signal(SIGINT, SIG_IGN);
    signal(SIGTERM, SIG_DFL);
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
}

const char *mode_name(enum mode m)
{
    switch (m) {
    case MODE_SHM:    return "shm";
    case MODE_INLINE: return "inline";
    case MODE_COPY:   return "copy";
    case MODE_SEQPACKET: return "seqpacket";
    default:          return "auto";
    }
}

void flags_text(unsigned flags, const struct flag_name *names, size_t n, char *buf, size_t len)
{
    size_t used = 0;

    buf[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        if (!(flags & names[i].bit))
            continue;
        int w = snprintf(buf + used, len - used, "%s%s", used ? " " : "", names[i].name);
        if (w < 0 || (size_t)w >= len - used)
            break;
        used += (size_t)w;
    }
    if (used == 0)
        snprintf(buf, len, "none");
}

/* "io_uring FEATURES", or "epoll (why io_uring is not used)". */
void carrier_text(const struct lshm_ctx *ctx, char *buf, size_t len)
{
    char feat[160];

    features_text(lshm_ctx_features(ctx), feat, sizeof(feat));
    if (lshm_ctx_features(ctx) & LSHM_FEAT_EPOLL)
        snprintf(buf, len, "epoll (%s)", lshm_ctx_carrier(ctx) + strlen("epoll: "));
    else
        snprintf(buf, len, "io_uring %s", feat);
}

void features_text(unsigned feat, char *buf, size_t len)
{
    static const struct flag_name names[] = {
        { LSHM_FEAT_SINGLE_ISSUER,    "single_issuer" },
        { LSHM_FEAT_DEFER_TASKRUN,    "defer_taskrun" },
        { LSHM_FEAT_COOP_TASKRUN,     "coop_taskrun" },
        { LSHM_FEAT_MULTISHOT_RECV,   "multishot_recv" },
        { LSHM_FEAT_BUF_RING,         "buf_ring" },
        { LSHM_FEAT_MULTISHOT_ACCEPT, "multishot_accept" },
        { LSHM_FEAT_NOEXEC_SEAL,      "noexec_seal" },
        { LSHM_FEAT_EPOLL,            "epoll" },
    };

    flags_text(feat, names, sizeof(names) / sizeof(names[0]), buf, len);
}

pid_t fork_peer(const struct config *cfg, int type,
                int (*peer)(const struct config *cfg, int sock), int *sock)
{
    int sv[2];
    pid_t pid;

    if (socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv) < 0) {
        err("socketpair: %s", strerror(errno));
        return -1;
    }
    /* What stdio holds must not come out twice. */
    fflush(stdout);
    fflush(stderr);
    pid = fork();
    if (pid < 0) {
        err("fork: %s", strerror(errno));
        close(sv[0]);
        close(sv[1]);
        return -1;
    }
    if (pid == 0) {
        close(sv[0]);
        peer_signals();
        exit(peer(cfg, sv[1]));   /* exit: leak checkers see the peer too */
    }
    close(sv[1]);
    *sock = sv[0];
    return pid;
}

int reap_child(pid_t pid)
{
    uint64_t until = now_ns() + 5000000000ull;
    int status;

    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid)
            return status;
        if (r < 0 && errno != EINTR)
            return -1;
        if (now_ns() > until) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            return -1;
        }
        usleep(1000);
    }
}
