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
    OPT_BENCH, OPT_KEEP_CAPS, OPT_VERSION, OPT_IDLE, OPT_NO_IO_URING,
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
    { "idle",       required_argument, NULL, OPT_IDLE },
    { "help",       no_argument,       NULL, 'h' },
    { "version",    no_argument,       NULL, OPT_VERSION },
    { NULL, 0, NULL, 0 },
};

#define MAX_BATCH     1024u
#define MAX_IDLE      20000u
#define BENCH_BATCH   32u
#define MAX_SECONDS   (365.0 * 86400)

static void usage(FILE *f)
{
    fprintf(f,
"usage: shmping [options]            ping a forked peer\n"
"       shmping [options] PATH       ping the shmping server at PATH\n"
"       shmping -l PATH              serve (echo) at PATH until SIGINT/SIGTERM\n"
"       shmping --probe | --bench | --version | --help\n"
"\n"
"  -c COUNT        messages to send (default 10; with -w, until the deadline)\n"
"  -s SIZE         payload bytes, suffix K or M, 0 .. 64M (default 64)\n"
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
"  --json          print the summary as one JSON object\n"
"  --probe         print what the kernel and the process offer\n"
"  --bench         rtt and throughput for 64 B, 4K, 1M in every mode, with\n"
"                  ratios to copy mode (about 10 s)\n"
"  --idle N        N more ports (0 .. %u, rounded up to even) in every\n"
"                  context, connected but doing nothing, to see what they\n"
"                  cost the busy one; io_uring modes only\n"
"  --keep-caps     do not drop capabilities after set-up\n"
"  --no-io-uring   run on the library's epoll carrier, as where io_uring\n"
"                  is refused (sets LSHM_NO_IO_URING=1)\n"
"  -h, --help      this text\n"
"      --version   shmping and library versions\n"
"\n"
"exit status: 0 every reply came back (and verified), 1 replies lost or\n"
"corrupt, 2 other errors, 64 bad usage\n", MAX_BATCH, MAX_IDLE);
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

/* N, NK or NM (also NKiB, NMiB); bytes. */
static bool parse_size(const char *s, uint64_t *v)
{
    char *end;
    uint64_t n, mult = 1;

    if (!isdigit((unsigned char)s[0]))
        return false;
    errno = 0;
    n = strtoull(s, &end, 10);
    if (errno != 0)
        return false;
    if (*end == 'K' || *end == 'k')
        mult = 1024;
    else if (*end == 'M' || *end == 'm')
        mult = 1024 * 1024;
    if (mult != 1) {
        end++;
        if (strcmp(end, "iB") == 0)
            end += 2;
    }
    if (*end != '\0' || n > UINT64_MAX / mult)
        return false;
    *v = n * mult;
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
                         bool *version, bool *help)
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

int main(int argc, char **argv)
{
    struct config cfg = {
        .mode = MODE_AUTO, .count = 10, .size = 64, .interval = 0.1, .batch = 0,
    };
    struct results res = { 0 };
    bool probe = false, version = false, help = false;
    int ret;

    ret = parse_options(argc, argv, &cfg, &probe, &version, &help);
    if (ret != 0)
        return ret;
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

    if (cfg.mode == MODE_COPY || cfg.mode == MODE_SEQPACKET)
        ret = copy_run_forked(&cfg, &res);
    else if (cfg.path)
        ret = lshm_run_client(&cfg, &res);
    else
        ret = lshm_run_forked(&cfg, &res);

    if (res.sent > 0 || ret == 0)
        print_summary(&cfg, &res, cfg.path ? cfg.path : "peer");
    results_free(&res);
    if (ret != 0)
        return ret;
    return res.received == res.sent && res.corrupt == 0 ? 0 : EXIT_LOST;
}
