/*
 * shmping --bench: round trip and one-way throughput for a few sizes in
 * every mode against a forked peer, each cell a time-bounded run, and each
 * figure's ratio to copy mode's for the same size.  Every mode writes every
 * payload byte and reads every byte received; the memory row does the same
 * writing and reading inside one process, the floor a transport could reach.
 * The library's rows run on both carriers (message rings, and the socket
 * with LSHM_CTX_NO_RING), each with sleeping waits and with busy-poll
 * (spin_us); a second table sets their median round trips against
 * seqpacket mode's and against the floors of the same two processes (a
 * futex ping-pong for sleeping waits, a cache-line ping-pong for busy-poll),
 * and a last block checks the targets.  With --with-epoll the shm and inline
 * rows run once more on the epoll carrier, set against io_uring's.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shmping.h"

#define CELL_S        0.4
#define FLOOR_S       0.3

struct cell {
    bool   ran, failed, no_rtt;
    double rtt_avg, rtt_p50, rtt_p99, msgs_per_s, gb_per_s;
    double msgs_b1;             /* msgs/s with batch 1; -1: not measured */
    double flt_self, flt_peer;  /* minor faults per MiB of the one-way run; -1 unknown */
    int    cpus_rtt, cpus_ow;   /* CPUs the two processes ended on (results_cpus) */
};

/* A row of a size: a mode, on which carrier, waiting how. */
struct row {
    const char *label;
    enum mode   mode;
    bool        no_ring;    /* the socket carrier (LSHM_CTX_NO_RING) */
    bool        spin;       /* busy-poll: spin_us of the bench */
    bool        batch1;     /* a one-way run with batch 1 too */
    bool        epoll;      /* on the epoll carrier (--with-epoll), else as the bench runs */
};

/* copy first: the other rows are measured against it. */
static const struct row rows[] = {
    { "copy",         MODE_COPY,      false, false, false, false },
    { "seqpacket",    MODE_SEQPACKET, false, false, false, false },
    { "shm",          MODE_SHM,       false, false, false, false },
    { "inline",       MODE_INLINE,    false, false, true,  false },
    { "inline+spin",  MODE_INLINE,    false, true,  true,  false },
    { "socket",       MODE_INLINE,    true,  false, false, false },
    { "socket+spin",  MODE_INLINE,    true,  true,  false, false },
    { "shm/epoll",    MODE_SHM,       false, false, false, true },
    { "inline/epoll", MODE_INLINE,    false, false, false, true },
};
enum { R_COPY, R_SEQPACKET, R_SHM, R_INLINE, R_SPIN, R_SOCKET, R_SOCKET_SPIN, R_SHM_EPOLL,
       R_INLINE_EPOLL, NROWS };
/* The epoll rows' io_uring counterparts. */
#define IO_URING_ROW(k) ((k) == R_SHM_EPOLL ? R_SHM : R_INLINE)

static const size_t sizes[] = { 64, 4096, 1u << 20 };
#define NSIZES (sizeof(sizes) / sizeof(sizes[0]))
#define MEMORY_LABEL "memory"

/* The last row of 64 B: inline again, with BENCH_IDLE idle ports in each
 * process, against the same copy figures. */
#define IDLE_LABEL "inline*"

static bool row_fits(const struct row *r, size_t size)
{
    return !((r->mode == MODE_INLINE || r->mode == MODE_SEQPACKET) && size > LSHM_INLINE_MAX);
}

static int run_one(const struct config *cfg, struct results *res)
{
    memset(res, 0, sizeof(*res));
    if (cfg->mode == MODE_COPY || cfg->mode == MODE_SEQPACKET)
        return copy_run_forked(cfg, res);
    return uring_run_forked(cfg, res);
}

/* The messages of an io_uring run took the row's carrier, and only it. */
static bool carrier_right(const struct row *row, size_t size, const struct results *res)
{
    const struct lshm_port_stats *st = &res->port_stats;
    bool ring = st->ring_msgs > 0 && st->sock_msgs == 0;
    bool sock = st->sock_msgs > 0 && st->ring_msgs == 0;

    if (row->mode == MODE_COPY || row->mode == MODE_SEQPACKET || !res->has_port_stats)
        return true;
    if (row->epoll && strncmp(res->io, "epoll", 5) != 0) {
        err("%zu-byte %s row ran on %s, not on epoll", size, row->label, res->io);
        return false;
    }
    if (row->no_ring ? sock : ring)
        return true;
    err("%zu-byte %s row: %llu messages by ring and %llu by socket, not the %s alone", size,
        row->label, (unsigned long long)st->ring_msgs, (unsigned long long)st->sock_msgs,
        row->no_ring ? "socket" : "rings");
    return false;
}

/* Returns whether every reply came back (and verified). */
static bool run_cell(const struct config *base, const struct row *row, size_t size,
                     unsigned idle, unsigned spin_us, struct cell *c)
{
    struct config cfg = *base;
    struct results res;
    struct rtt_summary r;
    bool complete = true;

    cfg.mode = row->mode;
    cfg.no_ring = row->no_ring;
    cfg.no_futex = false;
    cfg.no_io_uring = row->epoll;
    cfg.spin_us = row->spin ? spin_us : 0;
    cfg.size = size;
    cfg.idle = idle;
    cfg.count = COUNT_FOREVER;
    cfg.deadline = CELL_S;
    cfg.flood = true;
    cfg.quiet = true;
    cfg.bench = true;
    cfg.json = false;
    cfg.batch = 1;
    c->msgs_b1 = -1;

    cfg.throughput = false;
    if (run_one(&cfg, &res) != 0 || !carrier_right(row, size, &res))
        c->failed = true;
    rtt_summarize(&res, &r);
    c->rtt_avg = r.avg;
    c->rtt_p50 = r.p50;
    c->rtt_p99 = r.p99;
    c->cpus_rtt = results_cpus(&res);
    complete &= res.received == res.sent && res.corrupt == 0;
    results_free(&res);

    cfg.throughput = true;
    cfg.batch = base->batch;
    if (!stop_requested && (run_one(&cfg, &res) != 0 || !carrier_right(row, size, &res)))
        c->failed = true;
    c->msgs_per_s = res.msgs_per_s;
    c->gb_per_s = res.gb_per_s;
    c->flt_self = faults_per_mib(res.minflt_self, res.bytes_moved);
    c->flt_peer = faults_per_mib(res.minflt_peer, res.bytes_moved);
    c->cpus_ow = results_cpus(&res);
    complete &= res.received == res.sent && res.corrupt == 0;
    results_free(&res);

    if (row->batch1 && idle == 0 && !stop_requested) {
        cfg.batch = 1;
        if (run_one(&cfg, &res) != 0 || !carrier_right(row, size, &res))
            c->failed = true;
        c->msgs_b1 = res.msgs_per_s;
        complete &= res.received == res.sent && res.corrupt == 0;
        results_free(&res);
    }
    c->ran = true;
    return complete;
}

/*
 * The floor: the one-way run's work, each message written (fast_fill) and
 * then read (fast_sum, checked) by the same process, in one buffer of the
 * size, for as long as a cell runs.  Returns whether every sum was right.
 */
static bool run_memory(size_t size, struct cell *c)
{
    uint8_t *buf = malloc(size ? size : 1);
    uint64_t start, end, n = 0, bad = 0;
    long flt;

    c->ran = true;
    c->no_rtt = true;
    c->msgs_b1 = -1;
    if (buf == NULL) {
        err("out of memory for a %zu-byte buffer", size);
        c->failed = true;
        return false;
    }
    fast_fill(buf, 0, size, 0);     /* first touch, outside the measure */
    flt = minflt_self();
    start = now_ns();
    end = start + (uint64_t)(CELL_S * 1e9);
    do {
        /* A batch between clock reads: 64 B takes a few nanoseconds. */
        for (unsigned i = 0; i < 64; i++, n++) {
            fast_fill(buf, 0, size, (uint32_t)n);
            bad += fast_sum(buf, 0, size) != fast_sum_expected(size, (uint32_t)n);
        }
    } while (now_ns() < end && !stop_requested);
    end = now_ns();
    flt = minflt_self() - flt;
    free(buf);
    c->msgs_per_s = (double)n / ((double)(end - start) / 1e9);
    c->gb_per_s = c->msgs_per_s * (double)size / 1e9;
    c->flt_self = faults_per_mib(flt, n * size);
    c->flt_peer = -1;
    if (bad > 0)
        err("memory row: %llu of %llu sums wrong", (unsigned long long)bad,
            (unsigned long long)n);
    return bad == 0;
}

/* v over base; 0 when either is not known. */
static double ratio(double v, double base)
{
    return base > 0 && v > 0 ? v / base : 0;
}

/* "0.12", or "-" when not known. */
static void fmt_faults(double v, char *buf, size_t len)
{
    if (v < 0)
        snprintf(buf, len, "-");
    else
        snprintf(buf, len, "%.2f", v);
}

static void size_text(size_t size, char *buf, size_t len)
{
    if (size >= (1u << 20))
        snprintf(buf, len, "%zu MiB", size >> 20);
    else if (size >= 1024)
        snprintf(buf, len, "%zu KiB", size >> 10);
    else
        snprintf(buf, len, "%zu B", size);
}

/* '1' or '2' CPUs, '-' when not known (the memory row, a failed run). */
static char cpus_char(int cpus)
{
    return cpus == 1 ? '1' : cpus == 2 ? '2' : '-';
}

static void print_row(size_t size, const char *label, const struct cell *c,
                      const struct cell *copy, const struct cell *mem)
{
    char sz[24], fs[16], fp[16];

    size_text(size, sz, sizeof(sz));
    if (c->failed) {
        printf("%-8s %-12s %s\n", sz, label, "failed (see above)");
        fflush(stdout);
        return;
    }
    fmt_faults(c->flt_self, fs, sizeof(fs));
    fmt_faults(c->flt_peer, fp, sizeof(fp));
    if (c->no_rtt)
        printf("%-8s %-12s %11s %7s %11s %7s", sz, label, "-", "", "-", "");
    else
        printf("%-8s %-12s %11.1f %6.2fx %11.1f %6.2fx", sz, label,
               c->rtt_avg, ratio(c->rtt_avg, copy->rtt_avg),
               c->rtt_p99, ratio(c->rtt_p99, copy->rtt_p99));
    printf(" %11.0f %6.2fx %9.3f %6.2fx %5.2fx %7s %7s  %c %c\n",
           c->msgs_per_s, ratio(c->msgs_per_s, copy->msgs_per_s),
           c->gb_per_s, ratio(c->gb_per_s, copy->gb_per_s), ratio(c->gb_per_s, mem->gb_per_s),
           fs, fp, cpus_char(c->cpus_rtt), cpus_char(c->cpus_ow));
    fflush(stdout);
}

/* A JSON number, or null when v is below 0 (not known). */
static void json_opt(const char *name, double v)
{
    if (v < 0)
        printf(",\"%s\":null", name);
    else
        printf(",\"%s\":%.4f", name, v);
}

/* 1 or 2 CPUs, or null when not known (0). */
static void json_cpus(const char *name, int cpus)
{
    if (cpus > 0)
        printf(",\"%s\":%d", name, cpus);
    else
        printf(",\"%s\":null", name);
}

/* A ratio, or null when it is not known (0). */
static void json_ratio(const char *name, double v)
{
    json_opt(name, v > 0 ? v : -1);
}

struct bench {
    const struct config *cfg;
    unsigned             spin_us;
    bool                 complete, failed, first;
    bool                 with_epoll;    /* the epoll rows run (--with-epoll on io_uring) */
    struct cell          mem[NSIZES], cells[NSIZES][NROWS], idle;
    struct floor_result  futex, cacheline;
    bool                 futex_ok, cacheline_ok;
    unsigned             features;      /* of a context as the rows' */
    char                 io[256];       /* io_text() */
    char                 io_carrier[200]; /* lshm_ctx_carrier() */
};

/*
 * Spinning can only beat sleeping when each process has a CPU of its own:
 * a cache-line round trip slower than a futex one says they had not (the
 * other CPUs were busy, or they shared one), and then it is no floor.
 */
static bool cacheline_valid(const struct bench *b)
{
    return b->cacheline_ok && b->futex_ok && b->cacheline.p50_us < b->futex.p50_us;
}

/* The floor that a row's round trip is set against: busy-poll's or sleep's. */
static double floor_of(const struct bench *b, const struct row *row)
{
    if (row->spin)
        return cacheline_valid(b) ? b->cacheline.p50_us : 0;
    return b->futex_ok ? b->futex.p50_us : 0;
}

static void json_row(struct bench *b, size_t i, const struct row *row, unsigned idle,
                     const struct cell *c)
{
    const struct cell *copy = &b->cells[i][R_COPY], *mem = &b->mem[i];
    const struct cell *seq = &b->cells[i][R_SEQPACKET];
    bool lib = row != NULL && row->mode != MODE_COPY && row->mode != MODE_SEQPACKET;

    if (!c->ran)
        return;
    printf("%s{\"size\":%zu,\"mode\":\"%s\",\"label\":\"%s\",\"idle_ports\":%u,\"failed\":%s",
           b->first ? "" : ",", sizes[i], row ? mode_name(row->mode) : MEMORY_LABEL,
           row ? (idle ? IDLE_LABEL : row->label) : MEMORY_LABEL, idle,
           c->failed ? "true" : "false");
    b->first = false;
    if (lib)
        printf(",\"carrier\":\"%s\",\"spin_us\":%u,\"io\":\"%s\"",
               row->no_ring ? "socket" : "ring", row->spin ? b->spin_us : 0,
               row->epoll || (b->features & LSHM_FEAT_EPOLL) ? "epoll" : "io_uring");
    else
        printf(",\"carrier\":null,\"spin_us\":null,\"io\":null");
    if (c->no_rtt) {
        printf(",\"rtt_avg_us\":null,\"rtt_p50_us\":null,\"rtt_p99_us\":null"
               ",\"rtt_avg_ratio\":null,\"rtt_p99_ratio\":null,\"rtt_p50_seqpacket_ratio\":null"
               ",\"rtt_p50_floor_ratio\":null,\"floor\":null");
    } else {
        printf(",\"rtt_avg_us\":%.3f,\"rtt_p50_us\":%.3f,\"rtt_p99_us\":%.3f"
               ",\"rtt_avg_ratio\":%.4f,\"rtt_p99_ratio\":%.4f", c->rtt_avg, c->rtt_p50,
               c->rtt_p99, ratio(c->rtt_avg, copy->rtt_avg), ratio(c->rtt_p99, copy->rtt_p99));
        json_ratio("rtt_p50_seqpacket_ratio", ratio(c->rtt_p50, seq->rtt_p50));
        json_ratio("rtt_p50_floor_ratio", ratio(c->rtt_p50, floor_of(b, row)));
        printf(",\"floor\":\"%s\"", row->spin ? "cacheline" : "futex");
    }
    printf(",\"msgs_per_s\":%.1f,\"gb_per_s\":%.6f,\"msgs_per_s_ratio\":%.4f"
           ",\"gb_per_s_ratio\":%.4f,\"gb_per_s_memory_ratio\":%.4f",
           c->msgs_per_s, c->gb_per_s, ratio(c->msgs_per_s, copy->msgs_per_s),
           ratio(c->gb_per_s, copy->gb_per_s), ratio(c->gb_per_s, mem->gb_per_s));
    json_ratio("msgs_per_s_seqpacket_ratio", ratio(c->msgs_per_s, seq->msgs_per_s));
    json_opt("msgs_per_s_batch1", c->msgs_b1);
    json_ratio("msgs_per_s_batch1_seqpacket_ratio", ratio(c->msgs_b1, seq->msgs_per_s));
    json_opt("minflt_self_per_mib", c->flt_self);
    json_opt("minflt_peer_per_mib", c->flt_peer);
    json_cpus("cpus_rtt", c->cpus_rtt);
    json_cpus("cpus_oneway", c->cpus_ow);
    printf("}");
}

/* ---- the second table: against seqpacket and the floors ---- */

static void print_versus(const struct bench *b)
{
    printf("\nround trips (p50) against seqpacket mode and the floor of the same two processes "
           "(sleeping rows: futex, +spin rows: cache line);\none-way msgs/s against seqpacket "
           "mode's (one write a message), batch 1 and batch %u\n", b->cfg->batch);
    if (b->futex_ok && b->cacheline_ok)
        printf("floors: futex ping-pong p50 %.2f us (avg %.2f), cache-line ping-pong p50 %.3f us "
               "(avg %.3f)\n", b->futex.p50_us, b->futex.avg_us, b->cacheline.p50_us,
               b->cacheline.avg_us);
    else
        printf("floors: failed (see above)\n");
    if (b->futex_ok && b->cacheline_ok && !cacheline_valid(b))
        printf("the cache-line round trip is slower than the futex one: the two processes "
               "did not each have a CPU,\nso it is no floor (/floor: -) and the +spin rows "
               "measure the scheduler more than the transport\n");
    printf("\n");
    printf("%-8s %-12s %11s %8s %8s %11s %8s %11s %8s\n", "size", "mode", "rtt p50 us",
           "/seqpkt", "/floor", "msgs/s b1", "/seqpkt", "msgs/s b32", "/seqpkt");
    for (size_t i = 0; i < 2 && i < NSIZES; i++) {
        const struct cell *seq = &b->cells[i][R_SEQPACKET];
        char sz[24], b1[16] = "-", b1r[16] = "-", b32[16] = "-", b32r[16] = "-";

        size_text(sizes[i], sz, sizeof(sz));
        for (size_t k = R_SEQPACKET; k < NROWS; k++) {
            const struct cell *c = &b->cells[i][k];

            if (!c->ran || c->failed || k == R_SHM || rows[k].epoll)
                continue;
            if (k == R_SEQPACKET) {
                snprintf(b1, sizeof(b1), "%.0f", c->msgs_per_s);
                snprintf(b1r, sizeof(b1r), "1.00x");
                snprintf(b32, sizeof(b32), "-");
                snprintf(b32r, sizeof(b32r), "-");
            } else {
                if (c->msgs_b1 >= 0) {
                    snprintf(b1, sizeof(b1), "%.0f", c->msgs_b1);
                    snprintf(b1r, sizeof(b1r), "%.2fx", ratio(c->msgs_b1, seq->msgs_per_s));
                } else {
                    snprintf(b1, sizeof(b1), "-");
                    snprintf(b1r, sizeof(b1r), "-");
                }
                snprintf(b32, sizeof(b32), "%.0f", c->msgs_per_s);
                snprintf(b32r, sizeof(b32r), "%.2fx", ratio(c->msgs_per_s, seq->msgs_per_s));
            }
            double fr = ratio(c->rtt_p50, floor_of(b, &rows[k]));
            char frs[16] = "-";

            if (fr > 0)
                snprintf(frs, sizeof(frs), "%.2fx", fr);
            printf("%-8s %-12s %11.2f %7.2fx %8s %11s %8s %11s %8s\n", sz, rows[k].label,
                   c->rtt_p50, ratio(c->rtt_p50, seq->rtt_p50), frs, b1, b1r, b32, b32r);
        }
    }
}

/* The epoll rows against io_uring's: round trip p50 and one-way time (the
 * inverse of the rate) over io_uring's, per size. */
static void print_epoll(const struct bench *b)
{
    printf("\nthe epoll carrier against io_uring, same run: round trip p50 and one-way time "
           "(1 / msgs/s), epoll's over io_uring's\n\n");
    printf("%-8s %-12s %13s %10s %8s %15s %13s %10s\n", "size", "mode", "io_uring us",
           "epoll us", "ratio", "io_uring msgs/s", "epoll msgs/s", "time ratio");
    for (size_t i = 0; i < NSIZES; i++)
        for (size_t k = R_SHM_EPOLL; k <= R_INLINE_EPOLL; k++) {
            const struct cell *e = &b->cells[i][k], *u = &b->cells[i][IO_URING_ROW(k)];
            char sz[24];

            if (!e->ran || e->failed || !u->ran || u->failed)
                continue;
            size_text(sizes[i], sz, sizeof(sz));
            printf("%-8s %-12s %13.2f %10.2f %7.2fx %15.0f %13.0f %9.2fx\n", sz,
                   rows[IO_URING_ROW(k)].label, u->rtt_p50, e->rtt_p50,
                   ratio(e->rtt_p50, u->rtt_p50), u->msgs_per_s, e->msgs_per_s,
                   ratio(u->msgs_per_s, e->msgs_per_s));
        }
}

/* ---- targets ---- */

struct target {
    const char *figure;
    double      ratio;      /* 0: not measured */
    double      limit;
    bool        at_most;    /* ratio <= limit; else ratio >= limit */
};

static bool cell_ok(const struct cell *c)
{
    return c->ran && !c->failed;
}

static size_t targets(const struct bench *b, struct target *t)
{
    const struct cell *seq = &b->cells[0][R_SEQPACKET], *in = &b->cells[0][R_INLINE];
    const struct cell *spin = &b->cells[0][R_SPIN], *ein = &b->cells[0][R_INLINE_EPOLL];
    const struct cell *shm = &b->cells[NSIZES - 1][R_SHM];
    const struct cell *eshm = &b->cells[NSIZES - 1][R_SHM_EPOLL];
    bool ok = !seq->failed && !in->failed, sok = !seq->failed && !spin->failed;

    t[0] = (struct target){ "64 B rtt p50, sleeping: inline over seqpacket",
                            ok ? ratio(in->rtt_p50, seq->rtt_p50) : 0, 0.6, true };
    t[1] = (struct target){ "64 B rtt p50, busy-poll: inline+spin over seqpacket",
                            sok ? ratio(spin->rtt_p50, seq->rtt_p50) : 0, 0.05, true };
    t[2] = (struct target){ "64 B rtt p50, busy-poll: inline+spin over cache-line floor",
                            !spin->failed && cacheline_valid(b)
                            ? ratio(spin->rtt_p50, b->cacheline.p50_us) : 0, 20, true };
    t[3] = (struct target){ "64 B msgs/s, batch 1: inline over seqpacket",
                            ok ? ratio(in->msgs_b1, seq->msgs_per_s) : 0, 8, false };
    t[4] = (struct target){ "64 B msgs/s, batch 32: inline over seqpacket",
                            ok && b->cfg->batch == 32 ? ratio(in->msgs_per_s, seq->msgs_per_s)
                                                      : 0, 20, false };
    if (!b->with_epoll)
        return 5;
    t[5] = (struct target){ "64 B rtt p50, sleeping: inline on epoll over io_uring",
                            cell_ok(in) && cell_ok(ein) ? ratio(ein->rtt_p50, in->rtt_p50) : 0,
                            1.3, true };
    t[6] = (struct target){ "1 MiB one-way time: shm on epoll over io_uring",
                            cell_ok(shm) && cell_ok(eshm)
                            ? ratio(shm->msgs_per_s, eshm->msgs_per_s) : 0, 1.3, true };
    return 7;
}

static bool target_met(const struct target *t)
{
    return t->ratio > 0 && (t->at_most ? t->ratio <= t->limit : t->ratio >= t->limit);
}

static void print_targets(const struct bench *b)
{
    struct target t[8];
    size_t n = targets(b, t);

    printf("\ntargets (this run's ratios)\n");
    for (size_t i = 0; i < n; i++) {
        if (t[i].ratio <= 0)
            printf("  %-58s %9s   %s %6.2fx  no figure\n", t[i].figure, "-",
                   t[i].at_most ? "<=" : ">=", t[i].limit);
        else
            printf("  %-58s %8.3fx   %s %6.2fx  %s\n", t[i].figure, t[i].ratio,
                   t[i].at_most ? "<=" : ">=", t[i].limit, target_met(&t[i]) ? "met" : "missed");
    }
}

static void json_targets(const struct bench *b)
{
    struct target t[8];
    size_t n = targets(b, t);

    printf(",\"targets\":[");
    for (size_t i = 0; i < n; i++) {
        printf("%s{\"figure\":\"%s\"", i ? "," : "", t[i].figure);
        json_ratio("ratio", t[i].ratio);
        printf(",\"op\":\"%s\",\"target\":%.4f,\"met\":%s}", t[i].at_most ? "<=" : ">=",
               t[i].limit, target_met(&t[i]) ? "true" : "false");
    }
    printf("]");
}

static void json_floor(const char *name, bool ok, bool valid, const struct floor_result *f)
{
    if (!ok)
        printf("\"%s\":null", name);
    else
        printf("\"%s\":{\"rtt_p50_us\":%.4f,\"rtt_avg_us\":%.4f,\"trips\":%llu"
               ",\"valid\":%s}", name, f->p50_us, f->avg_us, (unsigned long long)f->trips,
               valid ? "true" : "false");
}

static void json_bench(struct bench *b)
{
    printf("{\"cell_s\":%.2f,\"batch\":%u,\"spin_us\":%u,\"floor_s\":%.2f", CELL_S,
           b->cfg->batch, b->spin_us, FLOOR_S);
    json_io(b->features, b->io_carrier);
    printf(",\"floors\":{");
    json_floor("futex", b->futex_ok, b->futex_ok, &b->futex);
    printf(",");
    json_floor("cacheline", b->cacheline_ok, cacheline_valid(b), &b->cacheline);
    printf("},\"bench\":[");
    for (size_t i = 0; i < NSIZES; i++) {
        json_row(b, i, NULL, 0, &b->mem[i]);
        for (size_t k = 0; k < NROWS; k++)
            json_row(b, i, &rows[k], 0, &b->cells[i][k]);
        if (i == 0)
            json_row(b, i, &rows[R_INLINE], BENCH_IDLE, &b->idle);
    }
    printf("]");
    json_targets(b);
    printf(",\"interrupted\":%s}\n", stop_requested ? "true" : "false");
}

static void print_intro(const struct bench *b)
{
    printf("shmping --bench: forked peer, %.1f s per figure, throughput batch %u, busy-poll "
           "%u us, %s\n", CELL_S, b->cfg->batch, b->spin_us, b->io);
    printf("every message's bytes written by the sender and read (summed) by the "
           "receiver;\n%s: the same writing and reading in one process\n", MEMORY_LABEL);
    printf("shm, inline: the library on message rings, sleeping waits; +spin: busy-poll "
           "(--spin %u);\nsocket: inline with every message a datagram (--no-ring)\n",
           b->spin_us);
    if (b->with_epoll)
        printf("/epoll: the same on the epoll carrier (LSHM_CTX_NO_IO_URING), as where "
               "io_uring is refused\n");
    else if (b->cfg->with_epoll)
        printf("--with-epoll: every row runs on epoll already (%s)\n", b->io);
    printf("ratio: the figure over copy mode's for the same size "
           "(rtt: below 1 is faster; msgs/s, GB/s: above 1 is faster);\n"
           "mem: GB/s over the memory row's; faults: minor page faults per MiB of the "
           "one-way run, sender and receiver;\ncpus: on how many CPUs the two processes "
           "ended the round trips and the one-way run (1 or 2)\n\n");
    printf("%-8s %-12s %11s %7s %11s %7s %11s %7s %9s %7s %6s %7s %7s %s\n", "size", "mode",
           "rtt avg us", "ratio", "rtt p99 us", "ratio", "msgs/s", "ratio", "GB/s", "ratio",
           "mem", "flt snd", "flt rcv", "cpus");
    fflush(stdout);
}

int run_bench(const struct config *cfg)
{
    static struct bench b;
    struct lshm_ctx *ctx;
    bool text = !cfg->json;

    memset(&b, 0, sizeof(b));
    b.cfg = cfg;
    b.spin_us = cfg->spin_set ? cfg->spin_us : BENCH_SPIN_US;
    b.complete = true;
    b.first = true;
    /* The rows' contexts are made as this one: io_uring, or epoll and why. */
    if (ctx_new_reported(&ctx, cfg, "") < 0)
        return EXIT_ERROR;
    io_text(ctx, b.io, sizeof(b.io));
    b.features = lshm_ctx_features(ctx);
    snprintf(b.io_carrier, sizeof(b.io_carrier), "%s", lshm_ctx_carrier(ctx));
    lshm_ctx_free(ctx);
    b.with_epoll = cfg->with_epoll && !(b.features & LSHM_FEAT_EPOLL);
    if (text)
        print_intro(&b);
    b.futex_ok = floor_run(FLOOR_FUTEX, FLOOR_S, &b.futex) == 0;
    if (!stop_requested)
        b.cacheline_ok = floor_run(FLOOR_CACHELINE, FLOOR_S, &b.cacheline) == 0;
    b.failed |= !b.futex_ok || !b.cacheline_ok;
    for (size_t i = 0; i < NSIZES && !stop_requested; i++) {
        struct cell *cells = b.cells[i], *mem = &b.mem[i];

        /* The memory row and copy mode first: the other rows' ratios need both. */
        b.complete &= run_memory(sizes[i], mem);
        if (!stop_requested)
            b.complete &= run_cell(cfg, &rows[R_COPY], sizes[i], 0, b.spin_us, &cells[R_COPY]);
        if (text) {
            print_row(sizes[i], MEMORY_LABEL, mem, &cells[R_COPY], mem);
            print_row(sizes[i], rows[R_COPY].label, &cells[R_COPY], &cells[R_COPY], mem);
        }
        for (size_t k = 1; k < NROWS && !stop_requested; k++) {
            if (!row_fits(&rows[k], sizes[i]) || (rows[k].epoll && !b.with_epoll))
                continue;
            b.complete &= run_cell(cfg, &rows[k], sizes[i], 0, b.spin_us, &cells[k]);
            if (text)
                print_row(sizes[i], rows[k].label, &cells[k], &cells[R_COPY], mem);
        }
        if (i == 0 && !stop_requested) {
            b.complete &= run_cell(cfg, &rows[R_INLINE], sizes[i], BENCH_IDLE, 0, &b.idle);
            if (text)
                print_row(sizes[i], IDLE_LABEL, &b.idle, &cells[R_COPY], mem);
        }
        for (size_t k = 0; k < NROWS; k++)
            b.failed |= cells[k].failed;
        b.failed |= mem->failed || b.idle.failed;
    }
    if (cfg->json) {
        json_bench(&b);
    } else {
        printf("\n" IDLE_LABEL ": inline with %u idle ports in each process\n", BENCH_IDLE);
        print_versus(&b);
        if (b.with_epoll)
            print_epoll(&b);
        print_targets(&b);
    }
    fflush(stdout);
    if (b.failed)
        return EXIT_ERROR;
    return b.complete ? 0 : EXIT_LOST;
}
