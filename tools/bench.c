/*
 * shmping --bench: round trip and one-way throughput for a few sizes in
 * every mode against a forked peer, each cell a time-bounded run, and each
 * figure's ratio to copy mode's for the same size.  Every mode writes every
 * payload byte and reads every byte received; the memory row does the same
 * writing and reading inside one process, the floor a transport could reach.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shmping.h"

#define CELL_S        0.4

struct cell {
    bool   ran, failed, no_rtt;
    double rtt_avg, rtt_p99, msgs_per_s, gb_per_s;
    double flt_self, flt_peer;  /* minor faults per MiB of the one-way run; -1 unknown */
};

static const size_t sizes[] = { 64, 4096, 1u << 20 };
/* copy first: the other rows are measured against it. */
static const enum mode modes[] = { MODE_COPY, MODE_SEQPACKET, MODE_SHM, MODE_INLINE };
#define MEMORY_LABEL "memory"
#define NMODES (sizeof(modes) / sizeof(modes[0]))

/* The last row: inline 64 B again, with BENCH_IDLE idle ports in each
 * process, against the same copy figures. */
#define IDLE_LABEL "inline*"

static int run_one(const struct config *cfg, struct results *res)
{
    memset(res, 0, sizeof(*res));
    if (cfg->mode == MODE_COPY || cfg->mode == MODE_SEQPACKET)
        return copy_run_forked(cfg, res);
    return uring_run_forked(cfg, res);
}

/* Returns whether every reply came back (and verified). */
static bool run_cell(const struct config *base, enum mode mode, size_t size, unsigned idle,
                     struct cell *c)
{
    struct config cfg = *base;
    struct results res;
    struct rtt_summary r;
    bool complete = true;

    cfg.mode = mode;
    cfg.size = size;
    cfg.idle = idle;
    cfg.count = COUNT_FOREVER;
    cfg.deadline = CELL_S;
    cfg.flood = true;
    cfg.quiet = true;
    cfg.bench = true;
    cfg.json = false;
    cfg.batch = 1;

    cfg.throughput = false;
    if (run_one(&cfg, &res) != 0)
        c->failed = true;
    rtt_summarize(&res, &r);
    c->rtt_avg = r.avg;
    c->rtt_p99 = r.p99;
    complete &= res.received == res.sent && res.corrupt == 0;
    results_free(&res);

    cfg.throughput = true;
    cfg.batch = base->batch;
    if (!stop_requested && run_one(&cfg, &res) != 0)
        c->failed = true;
    c->msgs_per_s = res.msgs_per_s;
    c->gb_per_s = res.gb_per_s;
    c->flt_self = faults_per_mib(res.minflt_self, res.bytes_moved);
    c->flt_peer = faults_per_mib(res.minflt_peer, res.bytes_moved);
    complete &= res.received == res.sent && res.corrupt == 0;
    results_free(&res);
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

static double ratio(double v, double copy)
{
    return copy > 0 ? v / copy : 0;
}

/* "0.12", or "-" when not known. */
static void fmt_faults(double v, char *buf, size_t len)
{
    if (v < 0)
        snprintf(buf, len, "-");
    else
        snprintf(buf, len, "%.2f", v);
}

static void print_row(size_t size, const char *label, const struct cell *c,
                      const struct cell *copy, const struct cell *mem)
{
    char sz[24], fs[16], fp[16];

    if (size >= (1u << 20))
        snprintf(sz, sizeof(sz), "%zu MiB", size >> 20);
    else if (size >= 1024)
        snprintf(sz, sizeof(sz), "%zu KiB", size >> 10);
    else
        snprintf(sz, sizeof(sz), "%zu B", size);
    if (c->failed) {
        printf("%-8s %-9s %s\n", sz, label, "failed (see above)");
        return;
    }
    fmt_faults(c->flt_self, fs, sizeof(fs));
    fmt_faults(c->flt_peer, fp, sizeof(fp));
    if (c->no_rtt)
        printf("%-8s %-9s %11s %7s %11s %7s", sz, label, "-", "", "-", "");
    else
        printf("%-8s %-9s %11.1f %6.2fx %11.1f %6.2fx", sz, label,
               c->rtt_avg, ratio(c->rtt_avg, copy->rtt_avg),
               c->rtt_p99, ratio(c->rtt_p99, copy->rtt_p99));
    printf(" %11.0f %6.2fx %9.3f %6.2fx %5.2fx %7s %7s\n",
           c->msgs_per_s, ratio(c->msgs_per_s, copy->msgs_per_s),
           c->gb_per_s, ratio(c->gb_per_s, copy->gb_per_s), ratio(c->gb_per_s, mem->gb_per_s),
           fs, fp);
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

static void json_row(bool first, size_t size, const char *mode, unsigned idle,
                     const struct cell *c, const struct cell *copy, const struct cell *mem)
{
    printf("%s{\"size\":%zu,\"mode\":\"%s\",\"idle_ports\":%u,\"failed\":%s",
           first ? "" : ",", size, mode, idle, c->failed ? "true" : "false");
    if (c->no_rtt)
        printf(",\"rtt_avg_us\":null,\"rtt_p99_us\":null,\"rtt_avg_ratio\":null"
               ",\"rtt_p99_ratio\":null");
    else
        printf(",\"rtt_avg_us\":%.3f,\"rtt_p99_us\":%.3f,\"rtt_avg_ratio\":%.4f"
               ",\"rtt_p99_ratio\":%.4f", c->rtt_avg, c->rtt_p99,
               ratio(c->rtt_avg, copy->rtt_avg), ratio(c->rtt_p99, copy->rtt_p99));
    printf(",\"msgs_per_s\":%.1f,\"gb_per_s\":%.6f,\"msgs_per_s_ratio\":%.4f"
           ",\"gb_per_s_ratio\":%.4f,\"gb_per_s_memory_ratio\":%.4f",
           c->msgs_per_s, c->gb_per_s, ratio(c->msgs_per_s, copy->msgs_per_s),
           ratio(c->gb_per_s, copy->gb_per_s), ratio(c->gb_per_s, mem->gb_per_s));
    json_opt("minflt_self_per_mib", c->flt_self);
    json_opt("minflt_peer_per_mib", c->flt_peer);
    printf("}");
}

struct bench {
    const struct config *cfg;
    bool complete, failed, first;
};

/* One cell run; mode MODE_AUTO is the memory row. */
static void bench_run(struct bench *b, size_t size, enum mode mode, unsigned idle,
                      struct cell *c)
{
    if (mode == MODE_AUTO)
        b->complete &= run_memory(size, c);
    else
        b->complete &= run_cell(b->cfg, mode, size, idle, c);
    b->failed |= c->failed;
}

/* One cell printed; copy and mem are the copy mode and memory cells of its size. */
static void bench_print(struct bench *b, size_t size, enum mode mode, unsigned idle,
                        const char *label, const struct cell *c, const struct cell *copy,
                        const struct cell *mem)
{
    if (!c->ran)
        return;
    if (b->cfg->json)
        json_row(b->first, size, mode == MODE_AUTO ? MEMORY_LABEL : mode_name(mode), idle, c,
                 copy, mem);
    else
        print_row(size, label, c, copy, mem);
    b->first = false;
}

int run_bench(const struct config *cfg)
{
    struct bench b = { .cfg = cfg, .complete = true, .first = true };
    struct lshm_ctx *ctx;
    char feat[256];

    if (ctx_new_reported(&ctx, "") < 0)
        return EXIT_ERROR;
    carrier_text(ctx, feat, sizeof(feat));
    lshm_ctx_free(ctx);
    if (cfg->json) {
        printf("{\"cell_s\":%.2f,\"batch\":%u,\"bench\":[", CELL_S, cfg->batch);
    } else {
        printf("shmping --bench: forked peer, %.1f s per figure, throughput batch %u, "
               "%s\n", CELL_S, cfg->batch, feat);
        printf("every message's bytes written by the sender and read (summed) by the "
               "receiver;\n%s: the same writing and reading in one process\n", MEMORY_LABEL);
        printf("ratio: the figure over copy mode's for the same size "
               "(rtt: below 1 is faster; msgs/s, GB/s: above 1 is faster);\n"
               "mem: GB/s over the memory row's; faults: minor page faults per MiB of the "
               "one-way run, sender and receiver\n\n");
        printf("%-8s %-9s %11s %7s %11s %7s %11s %7s %9s %7s %6s %7s %7s\n", "size", "mode",
               "rtt avg us", "ratio", "rtt p99 us", "ratio", "msgs/s", "ratio", "GB/s", "ratio",
               "mem", "flt snd", "flt rcv");
    }
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]) && !stop_requested; i++) {
        struct cell cells[NMODES] = { { .ran = false } }, idle = { .ran = false };
        struct cell mem = { .ran = false };

        /* The memory row and copy mode first: the other rows' ratios need both. */
        bench_run(&b, sizes[i], MODE_AUTO, 0, &mem);
        if (!stop_requested)
            bench_run(&b, sizes[i], MODE_COPY, 0, &cells[0]);
        bench_print(&b, sizes[i], MODE_AUTO, 0, MEMORY_LABEL, &mem, &cells[0], &mem);
        bench_print(&b, sizes[i], MODE_COPY, 0, mode_name(MODE_COPY), &cells[0], &cells[0], &mem);
        for (size_t m = 1; m < NMODES && !stop_requested; m++) {
            if ((modes[m] == MODE_INLINE || modes[m] == MODE_SEQPACKET) &&
                sizes[i] > LSHM_INLINE_MAX)
                continue;
            bench_run(&b, sizes[i], modes[m], 0, &cells[m]);
            bench_print(&b, sizes[i], modes[m], 0, mode_name(modes[m]), &cells[m], &cells[0],
                        &mem);
        }
        if (i == 0 && !stop_requested) {
            bench_run(&b, sizes[i], MODE_INLINE, BENCH_IDLE, &idle);
            bench_print(&b, sizes[i], MODE_INLINE, BENCH_IDLE, IDLE_LABEL, &idle, &cells[0],
                        &mem);
        }
    }
    if (cfg->json)
        printf("],\"interrupted\":%s}\n", stop_requested ? "true" : "false");
    else
        printf("\n" IDLE_LABEL ": inline with %u idle ports in each process\n", BENCH_IDLE);
    fflush(stdout);
    if (b.failed)
        return EXIT_ERROR;
    return b.complete ? 0 : EXIT_LOST;
}
