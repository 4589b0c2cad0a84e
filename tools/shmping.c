/*
 * shmping: ping, throughput, echo server and probe for liblinuxshm.
 * See shmping(1).  This file: options and what runs.
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shmping.h"

enum {
    OPT_MODE = 256, OPT_THROUGHPUT, OPT_BATCH, OPT_VERIFY, OPT_JSON, OPT_PROBE,
    OPT_BENCH, OPT_KEEP_CAPS, OPT_VERSION, OPT_IDLE, OPT_FRAMES, OPT_SLOW, OPT_SPIN,
    OPT_NO_RING, OPT_NO_FUTEX, OPT_NO_IO_URING, OPT_WITH_EPOLL,
};

static const struct option long_options[] = {
    { "mode",       required_argument, NULL, OPT_MODE },
    { "throughput", no_argument,       NULL, OPT_THROUGHPUT },
    { "batch",      required_argument, NULL, OPT_BATCH },
    { "verify",     no_argument,       NULL, OPT_VERIFY },
    { "json",       no_argument,       NULL, OPT_JSON },
    { "probe",      no_argument,       NULL, OPT_PROBE },
    { "bench",      no_argument,       NULL, OPT_BENCH },
    { "keep-caps",  no_argument,       NULL, OPT_KEEP_CAPS },
    { "no-io-uring", no_argument,      NULL, OPT_NO_IO_URING },
    { "with-epoll", no_argument,       NULL, OPT_WITH_EPOLL },
    { "idle",       required_argument, NULL, OPT_IDLE },
    { "frames",     required_argument, NULL, OPT_FRAMES },
    { "slow",       required_argument, NULL, OPT_SLOW },
    { "spin",       required_argument, NULL, OPT_SPIN },
    { "no-ring",    no_argument,       NULL, OPT_NO_RING },
    { "no-futex",   no_argument,       NULL, OPT_NO_FUTEX },
    { "help",       no_argument,       NULL, 'h' },
    { "version",    no_argument,       NULL, OPT_VERSION },
    { NULL, 0, NULL, 0 },
};

#define MAX_BATCH     1024u
#define MAX_IDLE      20000u
#define BENCH_BATCH   32u
#define MAX_SECONDS   (365.0 * 86400)
#define MAX_SLOW_MS   60000u
#define FRAME_SIZE    (3670016u)  /* --frames without -s: 3.5 MiB */

static void usage(FILE *f)
{
    fprintf(f,
"usage: shmping [options]            ping a forked peer\n"
"       shmping [options] PATH       ping the shmping server at PATH\n"
"       shmping -l PATH              serve (echo) at PATH until SIGINT/SIGTERM\n"
"       shmping --frames N [--slow N:MS] [options]\n"
"                                    a slow consumer's frames, against copy mode\n"
"       shmping --probe | --bench | --version | --help\n"
"\n"
"  -c COUNT        messages to send (default 10; with -w, until the deadline)\n"
"  -s SIZE         payload bytes, suffix K or M, 0 .. 64M (default 64;\n"
"                  fractions if the bytes come out whole: 3.5M)\n"
"  -i INTERVAL     seconds between pings, fractions allowed (default 0.1)\n"
"  -f              flood: the next ping as soon as the reply is in\n"
"  -w DEADLINE     stop sending after DEADLINE seconds (replies on their\n"
"                  way get up to 2 s more)\n"
"  -q              quiet: only the header and the summary\n"
"  -l PATH         run the echo server on PATH\n"
"  --mode MODE     shm: payload in shared memory; inline: in the datagram\n"
"                  (at most 16K); copy: AF_UNIX stream socket with blocking\n"
"                  write/read, no io_uring, forked peer only; seqpacket:\n"
"                  the same over SOCK_SEQPACKET, one datagram (at most 16K)\n"
"                  (default: shm above 16K, inline otherwise)\n"
"  --throughput    one-way stream, the peer counts; prints msgs/s and GB/s\n"
"                  (default: for 1 s unless -c or -w)\n"
"  --batch N       messages per submit (LSHM_MORE), 1 .. %u (default 1,\n"
"                  32 for --bench throughput);\n"
"                  copy mode writes one message per write\n"
"  --verify        fill each payload with a pattern of its sequence number and\n"
"                  check every byte at the receiver; a mismatch exits 1\n"
"                  (without it every byte is still written and read: the\n"
"                  receiver checks a sum of the payload)\n"
"  --json          print the summary as one JSON object\n"
"  --probe         print what the kernel and the process offer\n"
"  --bench         rtt and throughput for 64 B, 4K, 1M in every mode, on\n"
"                  message rings and on the socket, sleeping and busy-polling,\n"
"                  with ratios to copy mode, to a memory row, to seqpacket\n"
"                  mode and to futex and cache-line floors, page faults, and\n"
"                  the targets (about 20 s)\n"
"  --frames N      stream N frames (default -s 3.5M) one way to the forked\n"
"                  peer, every byte checked, and time the whole run; without\n"
"                  --mode, once in shm (or inline) and once in copy mode, with\n"
"                  the ratio\n"
"  --slow N:MS     the consumer of a one-way run (--frames, --throughput)\n"
"                  takes MS ms (0 .. %u) over each of its first N messages\n"
"  --idle N        N more ports (0 .. %u, rounded up to even) in every\n"
"                  context, connected but doing nothing, to see what they\n"
"                  cost the busy one; io_uring modes only\n"
"  --spin US       waits poll the message rings US microseconds (0 .. %u)\n"
"                  before sleeping (busy-poll, lshm_ctx_params.spin_us), in\n"
"                  this process and the forked peer or server; with --bench,\n"
"                  the busy-poll rows' budget (default %u)\n"
"  --no-ring       every message over the socket (LSHM_CTX_NO_RING), not\n"
"                  the message rings\n"
"  --no-futex      wake-ups as WAKE datagrams, not futex (LSHM_CTX_NO_FUTEX)\n"
"  --keep-caps     do not drop capabilities after set-up\n"
"  --no-io-uring   run on the library's epoll carrier, as where io_uring\n"
"                  is refused (sets LSHM_NO_IO_URING=1)\n"
"  --with-epoll    with --bench: the shm and inline rows once more on the\n"
"                  epoll carrier, set against io_uring's in the same run\n"
"  -h, --help      this text\n"
"      --version   shmping and library versions\n"
"\n"
"exit status: 0 every reply came back (and verified), 1 replies lost or\n"
"corrupt, 2 other errors, 64 bad usage\n", MAX_BATCH, MAX_SLOW_MS, MAX_IDLE, MAX_SPIN_US,
            BENCH_SPIN_US);
}

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static int usage_error(const char *fmt, ...)
{
    va_list ap;

    fputs("shmping: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\nTry 'shmping --help'.\n", stderr);
    return EXIT_USAGE;
}

static bool parse_u64(const char *s, uint64_t *v)
{
    char *end;

    if (!isdigit((unsigned char)s[0]))
        return false;
    errno = 0;
    *v = strtoull(s, &end, 10);
    return errno == 0 && *end == '\0';
}

/* N, NK or NM (also NKiB, NMiB), N with a fraction if the bytes come out
 * whole (3.5M); bytes. */
static bool parse_size(const char *s, uint64_t *v)
{
    char *end;
    uint64_t n, mult = 1;
    double frac = 0;

    if (!isdigit((unsigned char)s[0]))
        return false;
    errno = 0;
    n = strtoull(s, &end, 10);
    if (errno != 0)
        return false;
    if (*end == '.') {
        char *fend;

        if (!isdigit((unsigned char)end[1]))
            return false;
        frac = strtod(end, &fend);
        end = fend;
    }
    if (*end == 'K' || *end == 'k')
        mult = 1024;
    else if (*end == 'M' || *end == 'm')
        mult = 1024 * 1024;
    if (mult != 1) {
        end++;
        if (strcmp(end, "iB") == 0)
            end += 2;
    }
    if (*end != '\0' || n > UINT64_MAX / mult - 1)
        return false;
    frac *= (double)mult;
    if (frac != floor(frac))
        return false;
    *v = n * mult + (uint64_t)frac;
    return true;
}

/* N:MS for --slow: a count, and milliseconds up to a minute. */
static bool parse_slow(const char *s, uint64_t *n, unsigned *ms)
{
    const char *colon = strchr(s, ':');
    char head[32];
    uint64_t v;

    if (colon == NULL || (size_t)(colon - s) >= sizeof(head))
        return false;
    memcpy(head, s, (size_t)(colon - s));
    head[colon - s] = '\0';
    if (!parse_u64(head, n) || !parse_u64(colon + 1, &v) || v > MAX_SLOW_MS)
        return false;
    *ms = (unsigned)v;
    return true;
}

static bool parse_seconds(const char *s, double *v)
{
    char *end;

    if (!isdigit((unsigned char)s[0]) && s[0] != '.')
        return false;
    errno = 0;
    *v = strtod(s, &end);
    return errno == 0 && *end == '\0' && isfinite(*v) && *v >= 0 && *v <= MAX_SECONDS;
}

static int parse_options(int argc, char **argv, struct config *cfg, bool *probe,
                         bool *version, bool *help, bool *size_set)
{
    int opt;
    uint64_t v;

    opterr = 0;
    while ((opt = getopt_long(argc, argv, ":c:s:i:fw:ql:h", long_options, NULL)) != -1) {
        switch (opt) {
        case 'c':
            if (!parse_u64(optarg, &v) || v == 0)
                return usage_error("-c %s: the count must be a whole number >= 1", optarg);
            cfg->count = v;
            cfg->count_set = true;
            break;
        case 's':
            if (!parse_size(optarg, &v))
                return usage_error("-s %s: the size must be bytes, with an optional K or M",
                                   optarg);
            if (v > MAX_SIZE)
                return usage_error("-s %s: the size is above the maximum 64M", optarg);
            cfg->size = (size_t)v;
            *size_set = true;
            break;
        case 'i':
            if (!parse_seconds(optarg, &cfg->interval))
                return usage_error("-i %s: the interval must be seconds >= 0", optarg);
            break;
        case 'f':
            cfg->flood = true;
            break;
        case 'w':
            if (!parse_seconds(optarg, &cfg->deadline) || cfg->deadline <= 0)
                return usage_error("-w %s: the deadline must be seconds > 0", optarg);
            break;
        case 'q':
            cfg->quiet = true;
            break;
        case 'l':
            cfg->listen = optarg;
            break;
        case 'h':
            *help = true;
            break;
        case OPT_MODE:
            if (strcmp(optarg, "shm") == 0)
                cfg->mode = MODE_SHM;
            else if (strcmp(optarg, "inline") == 0)
                cfg->mode = MODE_INLINE;
            else if (strcmp(optarg, "copy") == 0)
                cfg->mode = MODE_COPY;
            else if (strcmp(optarg, "seqpacket") == 0)
                cfg->mode = MODE_SEQPACKET;
            else
                return usage_error("--mode %s: the mode must be shm, inline, copy or seqpacket",
                                   optarg);
            break;
        case OPT_THROUGHPUT:
            cfg->throughput = true;
            break;
        case OPT_BATCH:
            if (!parse_u64(optarg, &v) || v == 0 || v > MAX_BATCH)
                return usage_error("--batch %s: the batch must be 1 .. %u", optarg, MAX_BATCH);
            cfg->batch = (unsigned)v;
            break;
        case OPT_VERIFY:
            cfg->verify = true;
            break;
        case OPT_JSON:
            cfg->json = true;
            break;
        case OPT_PROBE:
            *probe = true;
            break;
        case OPT_BENCH:
            cfg->bench = true;
            break;
        case OPT_KEEP_CAPS:
            cfg->keep_caps = true;
            break;
        case OPT_NO_IO_URING:
            /* The library reads it; forked peers inherit it. */
            setenv("LSHM_NO_IO_URING", "1", 1);
            break;
        case OPT_IDLE:
            if (!parse_u64(optarg, &v) || v > MAX_IDLE)
                return usage_error("--idle %s: the number of idle ports must be 0 .. %u",
                                   optarg, MAX_IDLE);
            cfg->idle = (unsigned)(v + (v & 1));  /* a socketpair is two ports */
            break;
        case OPT_FRAMES:
            if (!parse_u64(optarg, &v) || v == 0 || v > UINT32_MAX)
                return usage_error("--frames %s: the number of frames must be 1 .. %u", optarg,
                                   UINT32_MAX);
            cfg->frames = v;
            break;
        case OPT_SLOW:
            if (!parse_slow(optarg, &cfg->slow_n, &cfg->slow_ms))
                return usage_error("--slow %s: give N:MS, the first N messages, MS (0 .. %u) "
                                   "milliseconds each", optarg, MAX_SLOW_MS);
            break;
        case OPT_SPIN:
            if (!parse_u64(optarg, &v) || v > MAX_SPIN_US)
                return usage_error("--spin %s: the spin must be microseconds, 0 .. %u", optarg,
                                   MAX_SPIN_US);
            cfg->spin_us = (unsigned)v;
            cfg->spin_set = true;
            break;
        case OPT_WITH_EPOLL:
            cfg->with_epoll = true;
            break;
        case OPT_NO_RING:
            cfg->no_ring = true;
            break;
        case OPT_NO_FUTEX:
            cfg->no_futex = true;
            break;
        case OPT_VERSION:
            *version = true;
            break;
        case ':':
            if (optopt != 0 && optopt < 256)
                return usage_error("option -%c needs a value", optopt);
            return usage_error("option %s needs a value", argv[optind - 1]);
        default:
            if (optopt != 0 && optopt < 256)
                return usage_error("unknown option -%c", optopt);
            return usage_error("unknown option %s", argv[optind - 1]);
        }
    }
    if (optind < argc)
        cfg->path = argv[optind++];
    if (optind < argc)
        return usage_error("unexpected argument %s: give at most one PATH", argv[optind]);
    return 0;
}

/* What options imply, and the combinations that make no sense. */
static int check_options(struct config *cfg, bool probe)
{
    if (probe)
        return 0;
    if (cfg->listen && cfg->path)
        return usage_error("-l %s and PATH %s: serve or ping, not both", cfg->listen, cfg->path);
    if (cfg->bench && (cfg->path || cfg->listen))
        return usage_error("--bench runs against a forked peer; it takes no PATH or -l");
    if ((cfg->mode == MODE_COPY || cfg->mode == MODE_SEQPACKET) && cfg->path)
        return usage_error("--mode %s works with a forked peer only, not with PATH %s",
                           mode_name(cfg->mode), cfg->path);
    if ((cfg->mode == MODE_COPY || cfg->mode == MODE_SEQPACKET) && cfg->listen)
        return usage_error("--mode %s works with a forked peer only, not with -l",
                           mode_name(cfg->mode));
    if ((cfg->mode == MODE_COPY || cfg->mode == MODE_SEQPACKET) && cfg->idle > 0)
        return usage_error("--idle: --mode %s has no ports; use shm or inline",
                           mode_name(cfg->mode));
    if (cfg->bench && cfg->idle > 0)
        return usage_error("--idle: --bench measures with and without idle ports itself");
    if (cfg->bench && cfg->spin_set && cfg->spin_us == 0)
        return usage_error("--spin 0: --bench's busy-poll rows need a spin above 0");
    if (cfg->with_epoll && !cfg->bench)
        return usage_error("--with-epoll adds rows to --bench; without it, use --no-io-uring");
    if (cfg->bench && (cfg->no_ring || cfg->no_futex))
        return usage_error("--no-ring, --no-futex: --bench measures both carriers itself");
    if ((cfg->mode == MODE_COPY || cfg->mode == MODE_SEQPACKET) &&
        (cfg->spin_set || cfg->no_ring || cfg->no_futex))
        return usage_error("--spin, --no-ring, --no-futex: --mode %s has no library context; "
                           "use shm or inline", mode_name(cfg->mode));
    if (cfg->frames > 0 && (cfg->path || cfg->listen || cfg->bench))
        return usage_error("--frames runs against a forked peer; it takes no PATH, -l or --bench");
    if (cfg->frames > 0 && cfg->count_set)
        return usage_error("--frames %llu and -c %llu: --frames is the count",
                           (unsigned long long)cfg->frames, (unsigned long long)cfg->count);
    if (cfg->slow_n > 0 && !(cfg->throughput || cfg->frames > 0))
        return usage_error("--slow: the consumer of a one-way run (--frames or --throughput) "
                           "is slow, not an echo");
    if (cfg->slow_n > 0 && (cfg->path || cfg->listen))
        return usage_error("--slow: the forked peer is the slow consumer; no PATH or -l");
    if (cfg->frames > 0) {
        cfg->throughput = true;
        cfg->count = cfg->frames;
        cfg->count_set = true;
    }
    if (cfg->mode == MODE_SEQPACKET && cfg->size > SEQPACKET_MAX)
        return usage_error("--mode seqpacket: -s %zu is above one datagram's %u bytes",
                           cfg->size, SEQPACKET_MAX);
    if (cfg->mode == MODE_INLINE && cfg->size > LSHM_INLINE_MAX)
        return usage_error("--mode inline: -s %zu is above the inline maximum %u; "
                           "use --mode shm", cfg->size, LSHM_INLINE_MAX);
    if (cfg->mode == MODE_AUTO)
        cfg->mode = cfg->size > LSHM_INLINE_MAX ? MODE_SHM : MODE_INLINE;

    if (!cfg->count_set && (cfg->deadline > 0 || cfg->throughput))
        cfg->count = COUNT_FOREVER;
    if (cfg->throughput && !cfg->count_set && cfg->deadline == 0)
        cfg->deadline = 1.0;
    return 0;
}

/* One run as cfg says, its summary printed; the exit status.  gb_per_s: the
 * run's rate, or 0 if it did not complete. */
static int run_once(const struct config *cfg, double *gb_per_s)
{
    struct results res = { 0 };
    int ret;

    if (cfg->mode == MODE_COPY || cfg->mode == MODE_SEQPACKET)
        ret = copy_run_forked(cfg, &res);
    else if (cfg->path)
        ret = uring_run_client(cfg, &res);
    else
        ret = uring_run_forked(cfg, &res);

    if (res.sent > 0 || ret == 0)
        print_summary(cfg, &res, cfg->path ? cfg->path : "peer");
    results_free(&res);
    if (ret == 0 && (res.received != res.sent || res.corrupt != 0))
        ret = EXIT_LOST;
    if (gb_per_s != NULL)
        *gb_per_s = ret == 0 ? res.gb_per_s : 0;
    return ret;
}

/* The consumer's imposed sleep over a run (--slow), in ms. */
static double slow_total_ms(const struct config *cfg)
{
    uint64_t n = cfg->slow_n < cfg->frames ? cfg->slow_n : cfg->frames;

    return (double)n * cfg->slow_ms;
}

/*
 * The best ratio any transport could reach against a copy run at base GB/s:
 * its whole time over the consumer's imposed sleep, which every mode pays
 * in full.  0 without --slow or a copy figure.
 */
static double slow_ceiling(const struct config *cfg, double base)
{
    double sleep_ms = slow_total_ms(cfg);

    if (sleep_ms <= 0 || base <= 0)
        return 0;
    return (double)cfg->frames * (double)cfg->size / base / 1e6 / sleep_ms;
}

/* --frames without --mode: the same frames in the library's mode and in copy
 * mode, one after the other, and the ratio of their whole-run rates. */
static int run_compare(const struct config *cfg)
{
    struct config copy = *cfg;
    double lib = 0, base = 0, ceiling;
    int ret, ret2 = 0;

    if (cfg->json)
        printf("{\"runs\":[");
    ret = run_once(cfg, &lib);
    if (!stop_requested) {
        if (cfg->json)
            printf(",");
        else
            printf("\n");
        copy.mode = MODE_COPY;
        ret2 = run_once(&copy, &base);
    }
    ceiling = slow_ceiling(cfg, base);
    if (cfg->json) {
        printf("],\"gb_per_s_ratio\":%.4f", base > 0 ? lib / base : 0);
        if (ceiling > 0)
            printf(",\"gb_per_s_ratio_ceiling\":%.4f}\n", ceiling);
        else
            printf(",\"gb_per_s_ratio_ceiling\":null}\n");
    } else if (lib > 0 && base > 0) {
        printf("\n%s %.3f GB/s, copy %.3f GB/s: %.2fx copy over the whole run\n",
               mode_name(cfg->mode), lib, base, lib / base);
        if (ceiling > 0)
            printf("ceiling: the consumer sleeps %.0f ms of copy's %.0f ms, which no transport "
                   "shortens: at most %.2fx\n", slow_total_ms(cfg),
                   (double)cfg->frames * (double)cfg->size / base / 1e6, ceiling);
    }
    fflush(stdout);
    return ret != 0 ? ret : ret2;
}

int main(int argc, char **argv)
{
    struct config cfg = {
        .mode = MODE_AUTO, .count = 10, .size = 64, .interval = 0.1, .batch = 0,
    };
    bool probe = false, version = false, help = false, size_set = false, compare;
    int ret;

    ret = parse_options(argc, argv, &cfg, &probe, &version, &help, &size_set);
    if (ret != 0)
        return ret;
    if (cfg.frames > 0 && !size_set)
        cfg.size = FRAME_SIZE;
    /* --frames without --mode: the library's mode, then copy, and the ratio. */
    compare = cfg.frames > 0 && cfg.mode == MODE_AUTO;
    /* Batching is how a stream is meant to be sent; a ping waits anyway. */
    if (cfg.batch == 0)
        cfg.batch = cfg.bench ? BENCH_BATCH : 1;
    if (help) {
        usage(stdout);
        return 0;
    }
    if (version) {
        printf("shmping %d.%d.%d (liblinuxshm %s)\n", LSHM_VERSION_MAJOR, LSHM_VERSION_MINOR,
               LSHM_VERSION_PATCH, lshm_version());
        return 0;
    }
    ret = check_options(&cfg, probe);
    if (ret != 0)
        return ret;
    if (probe)
        return print_probe(cfg.json);

    install_signals();
    if (fd_room(cfg.bench ? BENCH_IDLE : cfg.idle) < 0)
        return EXIT_ERROR;
    if (cfg.bench)
        return run_bench(&cfg);
    if (cfg.listen)
        return serve(&cfg);
    if (compare)
        return run_compare(&cfg);
    return run_once(&cfg, NULL);
}
