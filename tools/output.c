/*
 * shmping: what it prints: names of modes and flags, header, replies,
 * summary (text or JSON), --probe.
 */
#include <stdio.h>
#include <string.h>

#include "shmping.h"

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
        { LSHM_FEAT_RING,             "ring" },
        { LSHM_FEAT_FUTEX,            "futex" },
        { LSHM_FEAT_EPOLL,            "epoll" },
    };

    flags_text(feat, names, sizeof(names) / sizeof(names[0]), buf, len);
}

void carrier_of(const struct config *cfg, unsigned features, const struct lshm_port_stats *st,
                struct carrier *c)
{
    c->futex = (features & LSHM_FEAT_FUTEX) != 0;
    c->why = NULL;
    if (cfg->no_ring) {
        c->ring = false;
        c->why = "LSHM_CTX_NO_RING, --no-ring";
    } else if (st != NULL && st->ring_msgs + st->ring_msgs_in > 0) {
        c->ring = true;
    } else if (st != NULL && st->sock_msgs + st->sock_msgs_in > 0) {
        /* Rings offered here, yet the messages took the socket. */
        c->ring = false;
        c->why = "the peer's HELLO offers no RING";
    } else {
        c->ring = true;
    }
    if (c->ring && !c->futex)
        c->why = cfg->no_futex               ? "LSHM_CTX_NO_FUTEX, --no-futex"
                 : features & LSHM_FEAT_EPOLL ? "epoll has no futex wait"
                                              : "io_uring without FUTEX_WAIT and FUTEX_WAKE";
}

void carrier_text(const struct config *cfg, const struct carrier *c, bool forked, char *buf,
                  size_t len)
{
    int n;

    if (!c->ring)
        n = snprintf(buf, len, "socket (%s)", c->why);
    else if (c->futex)
        n = snprintf(buf, len, "message rings, futex wake-ups%s",
                     forked ? "" : " for this side");
    else
        n = snprintf(buf, len, "message rings, WAKE datagram wake-ups%s (%s)",
                     forked ? "" : " for this side", c->why);
    if (n < 0 || (size_t)n >= len || cfg->spin_us == 0)
        return;
    /* The library polls rings only: a socket carrier sleeps all the same. */
    snprintf(buf + n, len - (size_t)n, ", busy-poll %u us%s", cfg->spin_us,
             c->ring ? "" : " (no effect: rings only)");
}

/* "io_uring FEATURES", or "epoll (why io_uring is not used)". */
void io_text(const struct lshm_ctx *ctx, char *buf, size_t len)
{
    const char *why = lshm_ctx_carrier(ctx);
    char feat[160];

    features_text(lshm_ctx_features(ctx), feat, sizeof(feat));
    if (lshm_ctx_features(ctx) & LSHM_FEAT_EPOLL)
        snprintf(buf, len, "epoll (%s)",
                 strncmp(why, "epoll: ", 7) == 0 ? why + strlen("epoll: ") : why);
    else
        snprintf(buf, len, "io_uring %s", feat);
}

void print_header(const struct config *cfg, const char *peer, const struct lshm_ctx *ctx,
                  const struct carrier *c)
{
    char io[256], batch[192] = "", carrier[192];
    int n = 0;

    if (cfg->throughput && cfg->batch > 1)
        n = snprintf(batch, sizeof(batch), ", batch %u", cfg->batch);
    if (cfg->idle > 0)
        n += snprintf(batch + n, sizeof(batch) - (size_t)n, ", %u idle ports", cfg->idle);
    if (cfg->frames > 0)
        n += snprintf(batch + n, sizeof(batch) - (size_t)n, ", %llu frames",
                      (unsigned long long)cfg->frames);
    if (cfg->slow_n > 0)
        n += snprintf(batch + n, sizeof(batch) - (size_t)n,
                      ", consumer slow for its first %llu (%u ms each)",
                      (unsigned long long)cfg->slow_n, cfg->slow_ms);
    if (cfg->mode == MODE_COPY || cfg->mode == MODE_SEQPACKET) {
        printf("SHMPING %s: %zu bytes, mode %s%s%s (AF_UNIX %s socket, "
               "blocking write/read, no io_uring)\n",
               peer, cfg->size, mode_name(cfg->mode), cfg->throughput ? ", throughput" : "",
               cfg->frames > 0 || cfg->slow_n > 0 ? batch : "",
               cfg->mode == MODE_COPY ? "stream" : "seqpacket");
    } else {
        io_text(ctx, io, sizeof(io));
        carrier_text(cfg, c, cfg->path == NULL, carrier, sizeof(carrier));
        printf("SHMPING %s: %zu bytes, mode %s%s%s, carrier %s, %s\n", peer, cfg->size,
               mode_name(cfg->mode), cfg->throughput ? ", throughput" : "", batch, carrier, io);
    }
    fflush(stdout);
}

void print_reply(const struct config *cfg, const char *peer, uint32_t seq, size_t size,
                 double us)
{
    if (cfg->json || cfg->bench)
        return;
    printf("%zu bytes from %s: seq=%u time=%.1f us\n", size, peer, seq, us);
    fflush(stdout);
}

static double lost_pct(const struct results *res)
{
    if (res->sent == 0 || res->received >= res->sent)
        return 0;
    return (double)(res->sent - res->received) * 100.0 / (double)res->sent;
}

void json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

/* A JSON number, or null when v is below 0 (not known). */
static void json_num(const char *name, double v, int prec)
{
    if (v < 0)
        printf(",\"%s\":null", name);
    else
        printf(",\"%s\":%.*f", name, prec, v);
}

static void json_faults(const struct results *res)
{
    printf(",\"bytes_moved\":%llu", (unsigned long long)res->bytes_moved);
    json_num("minflt_self", (double)res->minflt_self, 0);
    json_num("minflt_peer", (double)res->minflt_peer, 0);
    json_num("minflt_self_per_mib", faults_per_mib(res->minflt_self, res->bytes_moved), 4);
    json_num("minflt_peer_per_mib", faults_per_mib(res->minflt_peer, res->bytes_moved), 4);
    json_num("cpu_self", res->cpu_self - 1, 0);
    json_num("cpu_peer", res->cpu_peer - 1, 0);
}

/* ,"io":"io_uring" or "epoll","io_why":why; carrier: lshm_ctx_carrier(), "" for none. */
void json_io(unsigned features, const char *carrier)
{
    if (carrier[0] == '\0') {
        printf(",\"io\":null,\"io_why\":null");
        return;
    }
    if (!(features & LSHM_FEAT_EPOLL)) {
        printf(",\"io\":\"io_uring\",\"io_why\":null");
        return;
    }
    if (strncmp(carrier, "epoll: ", 7) == 0)
        carrier += strlen("epoll: ");
    printf(",\"io\":\"epoll\",\"io_why\":");
    json_string(carrier);
}

/* The carrier the run's messages took, by the port's counters. */
static void json_carrier(const struct config *cfg, const struct results *res)
{
    const struct lshm_port_stats *st = &res->port_stats;
    struct carrier c;

    printf(",\"spin_us\":%u", cfg->spin_us);
    if (!res->has_port_stats) {
        printf(",\"carrier\":null,\"carrier_why\":null,\"wakeups\":null,\"ring_msgs\":null"
               ",\"ring_msgs_in\":null,\"sock_msgs\":null,\"sock_msgs_in\":null"
               ",\"wakes_sent\":null,\"wakes_received\":null,\"ring_full\":null");
        return;
    }
    carrier_of(cfg, res->features, st, &c);
    printf(",\"carrier\":\"%s\",\"carrier_why\":", c.ring ? "ring" : "socket");
    if (c.why != NULL)
        json_string(c.why);
    else
        printf("null");
    printf(",\"wakeups\":%s", c.ring ? (c.futex ? "\"futex\"" : "\"wake\"") : "null");
    printf(",\"ring_msgs\":%llu,\"ring_msgs_in\":%llu,\"sock_msgs\":%llu"
           ",\"sock_msgs_in\":%llu,\"wakes_sent\":%llu,\"wakes_received\":%llu"
           ",\"ring_full\":%llu",
           (unsigned long long)st->ring_msgs, (unsigned long long)st->ring_msgs_in,
           (unsigned long long)st->sock_msgs, (unsigned long long)st->sock_msgs_in,
           (unsigned long long)st->wakes_sent, (unsigned long long)st->wakes_received,
           (unsigned long long)st->ring_full);
}

static void json_summary(const struct config *cfg, const struct results *res, const char *peer)
{
    struct rtt_summary r;

    rtt_summarize(res, &r);
    printf("{\"peer\":");
    json_string(peer);
    printf(",\"mode\":\"%s\",\"size\":%zu,\"throughput\":%s,\"batch\":%u,\"verify\":%s"
           ",\"idle_ports\":%u",
           mode_name(cfg->mode), cfg->size, cfg->throughput ? "true" : "false", cfg->batch,
           cfg->verify ? "true" : "false", cfg->idle);
    printf(",\"sent\":%llu,\"received\":%llu,\"corrupt\":%llu,\"lost_pct\":%.4g"
           ",\"time_ms\":%.3f,\"interrupted\":%s",
           (unsigned long long)res->sent, (unsigned long long)res->received,
           (unsigned long long)res->corrupt, lost_pct(res), res->time_ms,
           res->interrupted ? "true" : "false");
    if (res->nrtt > 0)
        printf(",\"rtt_min_us\":%.3f,\"rtt_avg_us\":%.3f,\"rtt_max_us\":%.3f"
               ",\"rtt_mdev_us\":%.3f,\"rtt_p50_us\":%.3f,\"rtt_p90_us\":%.3f"
               ",\"rtt_p99_us\":%.3f,\"rtt_p999_us\":%.3f",
               r.min, r.avg, r.max, r.mdev, r.p50, r.p90, r.p99, r.p999);
    else
        printf(",\"rtt_min_us\":null,\"rtt_avg_us\":null,\"rtt_max_us\":null"
               ",\"rtt_mdev_us\":null,\"rtt_p50_us\":null,\"rtt_p90_us\":null"
               ",\"rtt_p99_us\":null,\"rtt_p999_us\":null");
    if (cfg->throughput)
        printf(",\"msgs_per_s\":%.1f,\"gb_per_s\":%.6f", res->msgs_per_s, res->gb_per_s);
    if (cfg->frames > 0 || cfg->slow_n > 0)
        printf(",\"frames\":%llu,\"slow_frames\":%llu,\"slow_ms\":%u",
               (unsigned long long)cfg->frames, (unsigned long long)cfg->slow_n, cfg->slow_ms);
    json_faults(res);
    json_io(res->features, res->io);
    json_carrier(cfg, res);
    printf("}\n");
}

/* "minor page faults: N here (F/MiB), N peer (F/MiB)"; per MiB once one moved. */
static void print_faults(const struct results *res)
{
    const long n[2] = { res->minflt_self, res->minflt_peer };
    const char *who[2] = { "here", "peer" };

    if (n[0] < 0)
        return;
    printf("minor page faults:");
    for (int i = 0; i < 2; i++) {
        double per = faults_per_mib(n[i], res->bytes_moved);

        if (n[i] < 0)
            continue;
        printf("%s %ld %s", i ? "," : "", n[i], who[i]);
        if (per >= 0 && res->bytes_moved >= (1u << 20))
            printf(" (%.2f/MiB)", per);
    }
    printf("\n");
}

/* "carrier message rings, ...: ring 10 sent/10 received, socket 0/0, wake-ups ..." */
static void print_carrier(const struct config *cfg, const struct results *res)
{
    const struct lshm_port_stats *st = &res->port_stats;
    struct carrier c;
    char text[192];

    if (!res->has_port_stats)
        return;
    carrier_of(cfg, res->features, st, &c);
    carrier_text(cfg, &c, cfg->path == NULL, text, sizeof(text));
    printf("carrier %s: ring %llu sent/%llu received, socket %llu/%llu, "
           "wake-ups %llu sent/%llu received, ring full %llu\n", text,
           (unsigned long long)st->ring_msgs, (unsigned long long)st->ring_msgs_in,
           (unsigned long long)st->sock_msgs, (unsigned long long)st->sock_msgs_in,
           (unsigned long long)st->wakes_sent, (unsigned long long)st->wakes_received,
           (unsigned long long)st->ring_full);
}

void print_summary(const struct config *cfg, const struct results *res, const char *peer)
{
    struct rtt_summary r;
    char corrupt[48] = "";

    if (cfg->json) {
        json_summary(cfg, res, peer);
        fflush(stdout);
        return;
    }
    if (res->corrupt > 0)
        snprintf(corrupt, sizeof(corrupt), ", %llu corrupt", (unsigned long long)res->corrupt);
    printf("\n--- %s shmping statistics ---\n", peer);
    printf("%llu sent, %llu received%s, %g%% lost, time %.1f ms\n",
           (unsigned long long)res->sent, (unsigned long long)res->received, corrupt,
           lost_pct(res), res->time_ms);
    if (res->nrtt > 0) {
        rtt_summarize(res, &r);
        printf("rtt min/avg/max/mdev = %.1f/%.1f/%.1f/%.1f us\n", r.min, r.avg, r.max, r.mdev);
        printf("rtt p50/p90/p99/p99.9 = %.1f/%.1f/%.1f/%.1f us\n", r.p50, r.p90, r.p99, r.p999);
    }
    if (cfg->throughput)
        printf("throughput: %.0f msgs/s, %.3f GB/s\n", res->msgs_per_s, res->gb_per_s);
    print_carrier(cfg, res);
    print_faults(res);
    if (results_cpus(res) == 1)
        printf("cpus: both processes on CPU %d at the end\n", res->cpu_self - 1);
    else if (results_cpus(res) == 2)
        printf("cpus: CPU %d here, CPU %d peer at the end\n", res->cpu_self - 1,
               res->cpu_peer - 1);
    fflush(stdout);
}

/* ---- --probe ---- */

/* IORING_SETUP_* bits, spelled here so that the tool needs linuxshm.h only. */
static const struct flag_name setup_names[] = {
    { 1u << 0,  "IOPOLL" },        { 1u << 1,  "SQPOLL" },
    { 1u << 2,  "SQ_AFF" },        { 1u << 3,  "CQSIZE" },
    { 1u << 4,  "CLAMP" },         { 1u << 5,  "ATTACH_WQ" },
    { 1u << 6,  "R_DISABLED" },    { 1u << 7,  "SUBMIT_ALL" },
    { 1u << 8,  "COOP_TASKRUN" },  { 1u << 9,  "TASKRUN_FLAG" },
    { 1u << 10, "SQE128" },        { 1u << 11, "CQE32" },
    { 1u << 12, "SINGLE_ISSUER" }, { 1u << 13, "DEFER_TASKRUN" },
    { 1u << 14, "NO_MMAP" },       { 1u << 15, "REGISTERED_FD_ONLY" },
    { 1u << 16, "NO_SQARRAY" },
};

static void setup_text(unsigned flags, char *buf, size_t len)
{
    flags_text(flags, setup_names, sizeof(setup_names) / sizeof(setup_names[0]), buf, len);
}

static void limit_text(uint64_t v, char *buf, size_t len)
{
    if (v == UINT64_MAX)
        snprintf(buf, len, "unlimited");
    else if (v >= (1u << 20) && v % (1u << 20) == 0)
        snprintf(buf, len, "%llu MiB", (unsigned long long)(v >> 20));
    else if (v >= 1024 && v % 1024 == 0)
        snprintf(buf, len, "%llu KiB", (unsigned long long)(v >> 10));
    else
        snprintf(buf, len, "%llu", (unsigned long long)v);
}

static const char *yes(bool b)
{
    return b ? "yes" : "no";
}

static bool caps_held(const struct lshm_probe *p)
{
    return p->caps[0] != '\0' && strcmp(p->caps, "=") != 0;
}

/* May a segment's memory come in huge pages?  (Segments ask with MADV_HUGEPAGE.) */
static bool shmem_huge(const struct lshm_probe *p)
{
    return strcmp(p->shmem_thp, "advise") == 0 || strcmp(p->shmem_thp, "always") == 0 ||
           strcmp(p->shmem_thp, "within_size") == 0 || strcmp(p->shmem_thp, "force") == 0;
}

static void probe_json(const struct lshm_probe *p, unsigned ctx_features, const char *io)
{
    printf("{\"kernel\":");
    json_string(p->kernel);
    printf(",\"io_uring\":%s,\"io_uring_errno\":%d,\"io_uring_why\":",
           p->io_uring == 0 ? "true" : "false", -p->io_uring);
    json_string(p->io_uring_why);
    printf(",\"setup_flags\":%u,\"features\":%u,\"op_sendmsg\":%s,\"op_recvmsg\":%s"
           ",\"op_accept\":%s,\"multishot_recv\":%s,\"memfd\":%s,\"sealing\":%s"
           ",\"noexec_seal\":%s",
           p->setup_flags, p->features, p->op_sendmsg ? "true" : "false",
           p->op_recvmsg ? "true" : "false", p->op_accept ? "true" : "false",
           (p->features & LSHM_FEAT_MULTISHOT_RECV) ? "true" : "false",
           p->memfd ? "true" : "false", p->sealing ? "true" : "false",
           p->noexec_seal ? "true" : "false");
    printf(",\"memlock_cur\":%.0f,\"memlock_max\":%.0f,\"nofile_cur\":%.0f,\"nofile_max\":%.0f"
           ",\"max_map_count\":%ld,\"caps\":",
           p->memlock_cur == UINT64_MAX ? -1.0 : (double)p->memlock_cur,
           p->memlock_max == UINT64_MAX ? -1.0 : (double)p->memlock_max,
           p->nofile_cur == UINT64_MAX ? -1.0 : (double)p->nofile_cur,
           p->nofile_max == UINT64_MAX ? -1.0 : (double)p->nofile_max, p->max_map_count);
    json_string(p->caps);
    printf(",\"shmem_thp\":");
    json_string(p->shmem_thp);
    printf(",\"shmem_huge_pages\":%s", shmem_huge(p) ? "true" : "false");
    printf(",\"drops_caps\":%s", caps_held(p) ? "true" : "false");
    json_io(ctx_features, io);
    printf(",\"wakeups\":%s}\n", io[0] == '\0' ? "null"
                                  : ctx_features & LSHM_FEAT_FUTEX ? "\"futex\"" : "\"wake\"");
}

int print_probe(bool json)
{
    struct lshm_probe p;
    char a[64], b[64], flags[256], feat[160], io[256] = "", carrier[200] = "";
    struct lshm_ctx *ctx;
    unsigned ctx_features = 0;
    int ret = lshm_probe(&p);

    if (ret < 0) {
        err("probe failed: %s", lib_why(ret));
        return EXIT_ERROR;
    }
    /* What a context made here runs on: io_uring, or epoll and why. */
    if (lshm_ctx_new(&ctx, NULL) == 0) {
        ctx_features = lshm_ctx_features(ctx);
        io_text(ctx, io, sizeof(io));
        snprintf(carrier, sizeof(carrier), "%s", lshm_ctx_carrier(ctx));
        lshm_ctx_free(ctx);
    }
    if (json) {
        probe_json(&p, ctx_features, carrier);
        return 0;
    }
    printf("kernel:           %s\n", p.kernel[0] ? p.kernel : "unknown");
    if (p.io_uring == 0) {
        setup_text(p.setup_flags, flags, sizeof(flags));
        printf("io_uring:         available\n");
        printf("  setup flags:    %s\n", flags);
        printf("  opcodes:        SENDMSG %s, RECVMSG %s, ACCEPT %s\n",
               yes(p.op_sendmsg), yes(p.op_recvmsg), yes(p.op_accept));
        printf("  multishot recv: %s\n", yes(p.features & LSHM_FEAT_MULTISHOT_RECV));
    } else {
        printf("io_uring:         unavailable: %s\n",
               p.io_uring_why[0] ? p.io_uring_why : strerror(-p.io_uring));
    }
    printf("memfd_create:     %s, sealing %s, MFD_NOEXEC_SEAL %s\n",
           yes(p.memfd), yes(p.sealing), yes(p.noexec_seal));
    limit_text(p.memlock_cur, a, sizeof(a));
    limit_text(p.memlock_max, b, sizeof(b));
    printf("RLIMIT_MEMLOCK:   %s (max %s)\n", a, b);
    limit_text(p.nofile_cur, a, sizeof(a));
    limit_text(p.nofile_max, b, sizeof(b));
    printf("RLIMIT_NOFILE:    %s (max %s)\n", a, b);
    if (p.max_map_count >= 0)
        printf("vm.max_map_count: %ld\n", p.max_map_count);
    else
        printf("vm.max_map_count: unknown\n");
    printf("capabilities:     %s\n",
           p.caps[0] == '\0' ? "unknown" : caps_held(&p) ? p.caps : "none");
    if (p.shmem_thp[0] == '\0')
        printf("shmem huge pages: unknown (no transparent_hugepage/shmem_enabled)\n");
    else if (shmem_huge(&p))
        printf("shmem huge pages: %s: segments get 2 MiB pages where the kernel has them\n",
               p.shmem_thp);
    else
        printf("shmem huge pages: %s: segments use 4 KiB pages (to allow huge ones: echo advise"
               " > /sys/kernel/mm/transparent_hugepage/shmem_enabled)\n", p.shmem_thp);

    features_text(p.features, feat, sizeof(feat));
    if (io[0] != '\0')
        printf("library will use: %s, message rings with %s wake-ups, sealed memfd segments\n",
               io, ctx_features & LSHM_FEAT_FUTEX ? "futex" : "WAKE datagram");
    else if (p.io_uring == 0 && p.memfd && p.sealing)
        printf("library will use: io_uring (%s), sealed memfd segments\n", feat);
    else if (!p.memfd || !p.sealing)
        printf("library will use: nothing: memfd_create with sealing is required\n");
    else
        printf("library will use: epoll, io_uring being unavailable, sealed memfd segments\n");
    if (caps_held(&p))
        printf("shmping drops:    every capability after set-up (keep them with --keep-caps)\n");
    else
        printf("shmping drops:    nothing (no capabilities held)\n");
    return 0;
}
