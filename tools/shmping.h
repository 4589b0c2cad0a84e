/*
 * shmping: measures and checks a liblinuxshm link.  Pieces shared by the
 * files of the tool: options, results, timing, the payload pattern.
 */
#ifndef SHMPING_H
#define SHMPING_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#include "linuxshm.h"
#include "pattern.h"

/* Exit statuses. */
#define EXIT_LOST   1   /* replies lost or corrupt */
#define EXIT_ERROR  2   /* no server, protocol failure, io_uring unavailable, ... */
#define EXIT_USAGE  64  /* bad option or value (EX_USAGE) */

#define MAX_SIZE        (64u << 20)
#define SEQPACKET_MAX   LSHM_INLINE_MAX   /* --mode seqpacket: one datagram */
#define COUNT_FOREVER   UINT64_MAX
#define BENCH_IDLE      1000    /* --bench: idle ports of its last row */
#define HANDSHAKE_MS    5000    /* a peer, a server or an idle port must greet within */
#define MAX_SPIN_US     1000000u  /* --spin: lshm_ctx_params.spin_us's maximum */
/* --bench's busy-poll rows: ten times a busy-poll round trip of 4 KiB and
 * longer than a sleeping one, so that a waiter whose peer has a CPU of its
 * own sees the answer without falling asleep; short, because a waiter whose
 * peer shares its CPU spins the whole budget before the peer can run (each
 * round trip then costs about two budgets). */
#define BENCH_SPIN_US   50u

/* User message types of shmping's own protocol (a server echoes them all). */
enum {
    MSG_PING = LSHM_TYPE_USER_MIN,   /* echoed; stream = sequence number */
    MSG_DATA,                        /* throughput: the forked peer counts it */
    MSG_END,                         /* throughput: the peer answers with peer_stats */
};

enum mode { MODE_AUTO, MODE_SHM, MODE_INLINE, MODE_COPY, MODE_SEQPACKET };

/* The answer to MSG_END: what the forked peer saw. */
struct peer_stats {
    uint64_t received;
    uint64_t corrupt;
    uint64_t bytes;
};

struct config {
    const char *path;       /* server to ping, or NULL: a forked peer */
    const char *listen;     /* -l PATH */
    enum mode   mode;       /* never MODE_AUTO once options are parsed */
    uint64_t    count;      /* COUNT_FOREVER: until -w or SIGINT */
    size_t      size;
    double      interval;   /* seconds */
    double      deadline;   /* seconds, 0: none */
    unsigned    batch;      /* 0 until set: 1, or BENCH_BATCH for --bench */
    unsigned    idle;       /* --idle: more ports, doing nothing, in every context */
    bool        count_set, flood, quiet, throughput, verify, json, keep_caps;
    bool        bench;      /* a --bench cell: no output, results only */
    uint64_t    frames;     /* --frames: a one-way run of that many, 0: none */
    uint64_t    slow_n;     /* --slow N:MS: the peer sleeps MS ms after each */
    unsigned    slow_ms;    /*   of its first N messages of a one-way run */
    unsigned    spin_us;    /* --spin: lshm_ctx_params.spin_us of both contexts */
    bool        spin_set;
    bool        no_ring;    /* --no-ring: LSHM_CTX_NO_RING in both contexts */
    bool        no_futex;   /* --no-futex: LSHM_CTX_NO_FUTEX in both contexts */
    bool        no_io_uring; /* LSHM_CTX_NO_IO_URING in both contexts (--bench's epoll rows) */
    bool        with_epoll; /* --with-epoll: --bench adds the library's rows on epoll */
};

struct results {
    uint64_t sent, received, corrupt;
    double   time_ms;
    double  *rtt_us;        /* one sample per reply */
    size_t   nrtt, rtt_cap;
    double   msgs_per_s, gb_per_s;
    bool     interrupted;
    int      error;         /* nonzero: EXIT_ERROR was reported on stderr */
    /* Minor page faults during the run, of this process and of the forked
     * peer (-1: not known), and the payload bytes that crossed the link. */
    pid_t    peer_pid;      /* 0: no forked peer */
    long     minflt_self, minflt_peer;
    uint64_t bytes_moved;
    /* The CPU each process last ran on at the end of the run, plus 1 (0:
     * not known): one CPU or two changes what a run measures. */
    int      cpu_self, cpu_peer;
    /* io_uring modes: the port's counters at the end of the run, and the
     * features of this side's context. */
    bool     has_port_stats;
    struct lshm_port_stats port_stats;
    unsigned features;
    char     io[200];       /* lshm_ctx_carrier(): "io_uring" or "epoll: why"; "": none */
};

/* Which way a run's user messages went, and why (output.c: carrier_of). */
struct carrier {
    bool        ring;       /* message rings; else the socket */
    bool        futex;      /* ring: this side is woken by futex, not WAKE datagrams */
    const char *why;        /* socket: why not the rings; ring: why WAKE, or NULL */
};

struct rtt_summary {
    double min, avg, max, mdev, p50, p90, p99, p999;
};

/*
 * The files of the tool in layers, lowest first; each calls only files
 * before it in this list (main calls them all):
 *
 *   pattern.c  the --verify payload pattern and random numbers (shared with
 *              the tests)
 *   errors.c   err(), lib_why(): what went wrong, on stderr
 *   payload.c  what payloads hold, how receivers read and check them
 *   stats.c    RTT samples, their summary, rates, page faults
 *   proc.c     signals, privileges, fd limits, the forked peer's life
 *   output.c   names, header, replies, summary, --probe
 *   context.c  io_uring contexts and --idle ports
 *   server.c   the echo server and the io_uring modes' forked peer
 *   copy.c     the copy and seqpacket baselines
 *   floor.c    the floors of --bench: futex and cache-line ping-pong
 *   client.c   the io_uring modes' client
 *   bench.c    --bench
 *   shmping.c  options, main
 */

static inline uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* errors.c */
void err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* One-line text for a failed library call: the library's detail if any. */
const char *lib_why(int ret);

/* Check a piece at offset off of payload seq; a mismatch is reported on stderr. */
bool     verify_piece(const void *src, size_t off, size_t len, uint32_t seq);

/* payload.c: a message's payload in shared-memory buffers. */
struct payload {
    struct lshm_buf *bufs[LSHM_MAX_DESCS];
    struct iovec     iov[LSHM_MAX_DESCS];   /* where each piece's bytes go */
    unsigned         n;
};

int    payload_alloc(struct lshm_port *port, size_t size, struct payload *p);
void   payload_free(struct payload *p);
void   payload_copy_in(struct payload *p, const void *src);
void   payload_fill(struct payload *p, uint32_t seq);
void   payload_copy_msg(struct payload *p, const struct lshm_msg *m);
size_t msg_iov_bytes(const struct lshm_msg *m);
bool   msg_verify(const struct lshm_msg *m, uint32_t seq);

/* payload.c: the fast payload, written and summed at memory speed. */
void     fast_fill(void *dst, size_t off, size_t len, uint32_t seq);
/* The sum of the payload's words in src, a piece at offset off: the sums
 * of the pieces add up to the payload's. */
uint64_t fast_sum(const void *src, size_t off, size_t len);
uint64_t fast_sum_expected(size_t len, uint32_t seq);
/* Whether a whole payload of len bytes sums right; a mismatch is reported. */
bool     fast_check(const void *src, size_t len, uint32_t seq);
void     payload_fast_fill(struct payload *p, uint32_t seq);
/* Read every byte of m: its pattern (verify) or its sum; a mismatch is reported. */
bool     msg_check(const struct lshm_msg *m, uint32_t seq, bool verify);

/* stats.c */
int      results_add_rtt(struct results *r, double us);
void     results_free(struct results *r);
void     rtt_summarize(const struct results *r, struct rtt_summary *s);
/* A throughput run's results: time since start (now_ns), what the peer counted. */
void     results_set_throughput(struct results *r, uint64_t start, const struct peer_stats *st);
/* Page faults: faults_start at the start of the measured part of a run
 * (r->peer_pid set), faults_stop at its end. */
void     faults_start(struct results *r);
void     faults_stop(struct results *r);
/* Faults per MiB moved, or -1 when not known. */
double   faults_per_mib(long faults, uint64_t bytes);
/* Minor faults of this process so far, and of process pid (-1: unknown). */
long     minflt_self(void);
long     minflt_of(pid_t pid);
/* How many CPUs the two processes were on at the end: 1, 2, or 0 unknown. */
int      results_cpus(const struct results *r);

/* proc.c.  Set by SIGINT/SIGTERM; every loop of the tool checks it. */
extern volatile sig_atomic_t stop_requested;
void     install_signals(void);
void     peer_signals(void);
int      drop_caps(const struct config *cfg);
/* Room for n more file descriptors (--idle): the soft RLIMIT_NOFILE is
 * raised within the hard one; -1 (reported) if it cannot be. */
int      fd_room(unsigned n);
/* A socketpair of type, and a child running peer(cfg, its end) then exiting
 * with what it returns; *sock is the parent's end.  -1 (reported) on failure. */
pid_t    fork_peer(const struct config *cfg, int type,
                   int (*peer)(const struct config *cfg, int sock), int *sock);
/* The child's wait status; -1 if it had to be killed after 5 s. */
int      reap_child(pid_t pid);

/* output.c */
const char *mode_name(enum mode m);
/* A bit of a flag word and its name, for flags_text. */
struct flag_name {
    unsigned    bit;
    const char *name;
};
/* The names of the bits of flags set, from names[0 .. n), space-separated
 * in buf ("none" when there is none). */
void flags_text(unsigned flags, const struct flag_name *names, size_t n, char *buf,
                size_t len);
void features_text(unsigned feat, char *buf, size_t len);
/*
 * The carrier of a run of cfg on a context with features: from the port's
 * counters st once messages went (NULL: none yet), else from the options,
 * which a forked peer shares.
 */
void carrier_of(const struct config *cfg, unsigned features, const struct lshm_port_stats *st,
                struct carrier *c);
/* "message rings, futex wake-ups, busy-poll 200 us" or "socket (why)". */
void carrier_text(const struct config *cfg, const struct carrier *c, bool forked, char *buf,
                  size_t len);
/* The context's I/O: "io_uring FEATURES", or "epoll (why io_uring is not used)". */
void io_text(const struct lshm_ctx *ctx, char *buf, size_t len);
/* ctx: NULL in the socket modes, which print neither carrier nor I/O. */
void print_header(const struct config *cfg, const char *peer, const struct lshm_ctx *ctx,
                  const struct carrier *c);
void print_reply(const struct config *cfg, const char *peer, uint32_t seq, size_t size,
                 double us);
void print_summary(const struct config *cfg, const struct results *res, const char *peer);
int  print_probe(bool json);
/* s as a JSON string, quoted and escaped. */
void json_string(const char *s);
/* ,"io":"io_uring" or "epoll","io_why":why; carrier: lshm_ctx_carrier(), "" for none. */
void json_io(unsigned features, const char *carrier);

/* context.c: lshm_ctx_new() with cfg's --spin, --no-ring and --no-futex, the
 * failure reported on stderr, prefixed by who. */
int  ctx_new_reported(struct lshm_ctx **ctx, const struct config *cfg, const char *who);
/* --idle: ports that do nothing, to measure what they cost the busy one. */
struct idle_ports {
    struct lshm_port **ports;
    unsigned           n;
};
/* cfg->idle of them in ctx, handshakes done; -1 (reported, who as above)
 * on failure, with what was opened closed again. */
int  idle_open(const struct config *cfg, struct lshm_ctx *ctx, struct idle_ports *ip,
               const char *who);
void idle_close(struct idle_ports *ip);

/* server.c: the echo server (-l), and the forked peer of the io_uring modes. */
int  serve(const struct config *cfg);
int  peer_serve(const struct config *cfg, int sock);

/* copy.c: the AF_UNIX baselines, against a forked peer. */
int  copy_run_forked(const struct config *cfg, struct results *res);

/* floor.c: a ping-pong between this process and a forked child through a
 * MAP_SHARED page, for seconds: sleeping (futex) or spinning (cache line). */
enum floor_kind { FLOOR_FUTEX, FLOOR_CACHELINE };
struct floor_result {
    double   p50_us, avg_us;    /* one round trip */
    uint64_t trips;
};
int  floor_run(enum floor_kind kind, double seconds, struct floor_result *out);

/* client.c: io_uring modes (shm, inline), against a forked peer or a server. */
int  uring_run_forked(const struct config *cfg, struct results *res);
int  uring_run_client(const struct config *cfg, struct results *res);

/* bench.c */
int  run_bench(const struct config *cfg);

#endif
