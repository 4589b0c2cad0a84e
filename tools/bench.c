/*
 * shmping --bench: round trip and one-way throughput for a few sizes in
 * every mode against a forked peer, each cell a time-bounded run, and each
 * figure's ratio to copy mode's for the same size.
 */
#include <stdio.h>
#include <string.h>

#include "shmping.h"

#define CELL_S        0.4

struct cell {
    bool   ran, failed;
    double rtt_avg, rtt_p99, msgs_per_s, gb_per_s;
};

static const size_t sizes[] = { 64, 4096, 1u << 20 };
static const enum mode modes[] = { MODE_COPY, MODE_SEQPACKET, MODE_SHM, MODE_INLINE };
#define NMODES (sizeof(modes) / sizeof(modes[0]))

/* The last row: inline 64 B again, with BENCH_IDLE idle ports in each
 * process, against the same copy figures. */
#define IDLE_LABEL "inline*"

static int run_one(const struct config *cfg, struct results *res)
{
    memset(res, 0, sizeof(*res));
    if (cfg->mode == MODE_COPY || cfg->mode == MODE_SEQPACKET)
        return copy_run_forked(cfg, res);
    return lshm_run_forked(cfg, res);
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
    complete &= res.received == res.sent && res.corrupt == 0;
    results_free(&res);
    c->ran = true;
    return complete;
}

static double ratio(double v, double copy)
{
    return copy > 0 ? v / copy : 0;
}

static void print_row(size_t size, const char *label, const struct cell *c,
                      const struct cell *copy)
{
    char sz[24];

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
    printf("%-8s %-9s %11.1f %6.2fx %11.1f %6.2fx %11.0f %6.2fx %9.3f %6.2fx\n",
           sz, label,
           c->rtt_avg, ratio(c->rtt_avg, copy->rtt_avg),
           c->rtt_p99, ratio(c->rtt_p99, copy->rtt_p99),
           c->msgs_per_s, ratio(c->msgs_per_s, copy->msgs_per_s),
           c->gb_per_s, ratio(c->gb_per_s, copy->gb_per_s));
    fflush(stdout);
}

static void json_row(bool first, size_t size, enum mode mode, unsigned idle,
                     const struct cell *c, const struct cell *copy)
{
    printf("%s{\"size\":%zu,\"mode\":\"%s\",\"idle_ports\":%u,\"failed\":%s,"
           "\"rtt_avg_us\":%.3f,"
           "\"rtt_p99_us\":%.3f,\"msgs_per_s\":%.1f,\"gb_per_s\":%.6f,"
           "\"rtt_avg_ratio\":%.4f,\"rtt_p99_ratio\":%.4f,\"msgs_per_s_ratio\":%.4f,"
           "\"gb_per_s_ratio\":%.4f}",
           first ? "" : ",", size, mode_name(mode), idle, c->failed ? "true" : "false",
           c->rtt_avg, c->rtt_p99, c->msgs_per_s, c->gb_per_s,
           ratio(c->rtt_avg, copy->rtt_avg), ratio(c->rtt_p99, copy->rtt_p99),
           ratio(c->msgs_per_s, copy->msgs_per_s), ratio(c->gb_per_s, copy->gb_per_s));
}

struct bench {
    const struct config *cfg;
    bool complete, failed, first;
};

/* One cell, run and printed; copy is the copy mode cell of its size. */
static void bench_row(struct bench *b, size_t size, enum mode mode, unsigned idle,
                      const char *label, struct cell *c, const struct cell *copy)
{
    b->complete &= run_cell(b->cfg, mode, size, idle, c);
    b->failed |= c->failed;
    if (!c->ran)
        return;
    if (b->cfg->json)
        json_row(b->first, size, mode, idle, c, copy);
    else
        print_row(size, label, c, copy);
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
        printf("ratio: the figure over copy mode's for the same size "
               "(rtt: below 1 is faster; msgs/s, GB/s: above 1 is faster)\n\n");
        printf("%-8s %-9s %11s %7s %11s %7s %11s %7s %9s %7s\n", "size", "mode",
               "rtt avg us", "ratio", "rtt p99 us", "ratio", "msgs/s", "ratio", "GB/s", "ratio");
    }
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]) && !stop_requested; i++) {
        struct cell cells[NMODES] = { { .ran = false } }, idle = { .ran = false };

        for (size_t m = 0; m < NMODES && !stop_requested; m++) {
            if ((modes[m] == MODE_INLINE || modes[m] == MODE_SEQPACKET) &&
                sizes[i] > LSHM_INLINE_MAX)
                continue;
            bench_row(&b, sizes[i], modes[m], 0, mode_name(modes[m]), &cells[m], &cells[0]);
        }
        if (i == 0 && !stop_requested)
            bench_row(&b, sizes[i], MODE_INLINE, BENCH_IDLE, IDLE_LABEL, &idle, &cells[0]);
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
