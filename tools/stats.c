/* shmping: what a run measured: RTT samples and their summary, rates. */
#include <errno.h>
#include <math.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "shmping.h"

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
    r->bytes_moved = st->bytes;
}

long minflt_self(void)
{
    struct rusage ru;

    return getrusage(RUSAGE_SELF, &ru) == 0 ? ru.ru_minflt : -1;
}

/* Field field (3 or more: 3 is the state) of /proc/PID/stat, counted after
 * the ')' that ends the name; -1 when it cannot be read. */
static long stat_field(pid_t pid, int field)
{
    char path[64], buf[1024], *p, *end;
    long v;
    ssize_t n;
    FILE *f;
    int i;

    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    f = fopen(path, "re");
    if (f == NULL)
        return -1;
    n = (ssize_t)fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    p = strrchr(buf, ')');
    if (p == NULL)
        return -1;
    p++;
    for (i = 3; i < field; i++) {
        p = strchr(p + 1, ' ');
        if (p == NULL)
            return -1;
    }
    errno = 0;
    v = strtol(p + 1, &end, 10);
    return errno != 0 || end == p + 1 ? -1 : v;
}

long minflt_of(pid_t pid)
{
    return stat_field(pid, 10);
}

int results_cpus(const struct results *r)
{
    if (r->cpu_self <= 0 || r->cpu_peer <= 0)
        return 0;
    return r->cpu_self == r->cpu_peer ? 1 : 2;
}

void faults_start(struct results *r)
{
    r->cpu_self = r->cpu_peer = 0;
    r->minflt_self = minflt_self();
    r->minflt_peer = r->peer_pid > 0 ? minflt_of(r->peer_pid) : -1;
}

void faults_stop(struct results *r)
{
    long self = minflt_self(), peer = r->peer_pid > 0 ? minflt_of(r->peer_pid) : -1;

    r->minflt_self = self >= 0 && r->minflt_self >= 0 ? self - r->minflt_self : -1;
    r->minflt_peer = peer >= 0 && r->minflt_peer >= 0 ? peer - r->minflt_peer : -1;
    /* Field 39: the CPU the process last ran on. */
    r->cpu_self = sched_getcpu() + 1;
    r->cpu_peer = r->peer_pid > 0 ? (int)stat_field(r->peer_pid, 39) + 1 : 0;
}

double faults_per_mib(long faults, uint64_t bytes)
{
    if (faults < 0 || bytes == 0)
        return -1;
    return (double)faults / ((double)bytes / (1u << 20));
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

