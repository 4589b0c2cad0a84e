/*
 * shmping, run as users run it: the binary named by LSHM_SHMPING, its
 * output, its exit status, its server.  Each run is bounded; a run that
 * overstays is killed and fails the test.
 */
#include "common.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include "linuxshm.h"

#define RUN_MS      60000
#define MAX_ARGS    32

struct run {
    int   status;   /* exit status; -1 killed (timeout) or died of a signal */
    char *out;
    char *err;
};

static const char *shmping_path(void)
{
    static char buf[4096];
    const char *p = getenv("LSHM_SHMPING"), *top = getenv("LSHM_TOP");

    if (p != NULL && p[0] != '\0')
        return p;
    snprintf(buf, sizeof(buf), "%s/build/default/tools/shmping", top ? top : ".");
    return buf;
}

/* "a b c" -> argv for shmping (arguments never hold spaces here). */
static void split_args(const char *args, char *buf, size_t len, char **argv)
{
    int n = 0;

    snprintf(buf, len, "%s", args);
    argv[n++] = (char *)shmping_path();
    for (char *tok = strtok(buf, " "); tok != NULL && n < MAX_ARGS - 1; tok = strtok(NULL, " "))
        argv[n++] = tok;
    argv[n] = NULL;
}

static void append(char **s, size_t *len, const char *data, size_t n)
{
    char *p = realloc(*s, *len + n + 1);

    cr_assert_not_null(p);
    memcpy(p + *len, data, n);
    *len += n;
    p[*len] = '\0';
    *s = p;
}

static pid_t spawn(const char *args, int *out_fd, int *err_fd)
{
    char buf[1024], *argv[MAX_ARGS];
    int out[2], errp[2];
    pid_t pid;

    split_args(args, buf, sizeof(buf), argv);
    cr_assert_eq(pipe2(out, O_CLOEXEC), 0);
    cr_assert_eq(pipe2(errp, O_CLOEXEC), 0);
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        dup2(out[1], 1);
        dup2(errp[1], 2);
        execv(argv[0], argv);
        fprintf(stderr, "exec %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(out[1]);
    close(errp[1]);
    *out_fd = out[0];
    *err_fd = errp[0];
    return pid;
}

/* Collect a spawned run's output until it exits (or kill it at the bound). */
static void finish(pid_t pid, int out_fd, int err_fd, int timeout_ms, struct run *r)
{
    long long end = now_ms() + timeout_ms;
    struct pollfd p[2] = { { .fd = out_fd, .events = POLLIN }, { .fd = err_fd, .events = POLLIN } };
    size_t olen = 0, elen = 0;
    int open_fds = 2, status;
    bool killed = false;

    r->out = calloc(1, 1);
    r->err = calloc(1, 1);
    while (open_fds > 0) {
        long long left = end - now_ms();
        char chunk[4096];

        if (left <= 0 && !killed) {
            kill(pid, SIGKILL);
            killed = true;
        }
        if (poll(p, 2, left > 0 ? (int)left : 100) < 0 && errno != EINTR)
            break;
        for (int i = 0; i < 2; i++) {
            if (p[i].fd < 0 || !(p[i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            ssize_t n = read(p[i].fd, chunk, sizeof(chunk));
            if (n > 0) {
                append(i == 0 ? &r->out : &r->err, i == 0 ? &olen : &elen, chunk, (size_t)n);
            } else {
                close(p[i].fd);
                p[i].fd = -1;
                open_fds--;
            }
        }
    }
    for (int i = 0; i < 2; i++)
        if (p[i].fd >= 0)
            close(p[i].fd);
    status = wait_child(pid, killed ? 1000 : 10000);
    r->status = status >= 0 && WIFEXITED(status) && !killed ? WEXITSTATUS(status) : -1;
}

static void run(struct run *r, const char *args)
{
    int out, err;
    pid_t pid = spawn(args, &out, &err);

    finish(pid, out, err, RUN_MS, r);
}

static void run_free(struct run *r)
{
    free(r->out);
    free(r->err);
}

static void expect_ok(struct run *r, const char *args)
{
    run(r, args);
    cr_expect_eq(r->status, 0, "shmping %s: exit %d\nstdout:\n%s\nstderr:\n%s", args,
                 r->status, r->out, r->err);
}

static int count_lines(const char *s, const char *what)
{
    int n = 0;

    for (const char *p = s; (p = strstr(p, what)) != NULL; p += strlen(what))
        n++;
    return n;
}

/* ---- the tool's own shape ---- */

/* Its files call downwards only, in the order tools/shmping.h lists them. */
Test(shmping, files_call_downwards_only, .timeout = 120)
{
    const char *top = getenv("LSHM_TOP");
    char script[4096];
    char *argv[] = { "sh", script, NULL };
    int out[2], status;
    char buf[4096] = "";
    size_t len = 0;
    ssize_t n;
    pid_t pid;

    snprintf(script, sizeof(script), "%s/tools/layers.sh", top ? top : ".");
    cr_assert_eq(pipe2(out, O_CLOEXEC), 0);
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        dup2(out[1], 1);
        dup2(out[1], 2);
        execvp(argv[0], argv);
        _exit(127);
    }
    close(out[1]);
    while (len < sizeof(buf) - 1 && (n = read(out[0], buf + len, sizeof(buf) - 1 - len)) > 0)
        len += (size_t)n;
    buf[len] = '\0';
    close(out[0]);
    status = wait_child(pid, 60000);
    cr_expect(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "%s failed:\n%s", script, buf);
    cr_expect(strstr(buf, "every call downwards") != NULL, "%s", buf);
}

/* ---- output ---- */

Test(shmping, summary_matches_count, .timeout = 120)
{
    struct run r;
    double min, avg, max, mdev, p50, p90, p99, p999;
    const char *l;

    expect_ok(&r, "-c 5 -i 0.01");
    cr_expect(strstr(r.out, "SHMPING peer") != NULL, "no header:\n%s", r.out);
    cr_expect(strstr(r.out, "5 sent, 5 received, 0% lost, time ") != NULL,
              "summary:\n%s", r.out);
    cr_expect_eq(count_lines(r.out, " bytes from peer: seq="), 5, "reply lines:\n%s", r.out);
    for (int seq = 1; seq <= 5; seq++) {
        char want[64];
        snprintf(want, sizeof(want), "64 bytes from peer: seq=%d time=", seq);
        cr_expect(strstr(r.out, want) != NULL, "no line for seq=%d:\n%s", seq, r.out);
    }
    l = strstr(r.out, "rtt min/avg/max/mdev = ");
    cr_assert_not_null(l, "no rtt line:\n%s", r.out);
    cr_assert_eq(sscanf(l, "rtt min/avg/max/mdev = %lf/%lf/%lf/%lf us", &min, &avg, &max,
                        &mdev), 4, "%s", l);
    l = strstr(r.out, "rtt p50/p90/p99/p99.9 = ");
    cr_assert_not_null(l, "no percentile line:\n%s", r.out);
    cr_assert_eq(sscanf(l, "rtt p50/p90/p99/p99.9 = %lf/%lf/%lf/%lf us", &p50, &p90, &p99,
                        &p999), 4, "%s", l);
    cr_expect(min > 0 && min <= avg && avg <= max && mdev >= 0, "%s", r.out);
    cr_expect(min <= p50 && p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max,
              "%s", r.out);
    run_free(&r);
}

Test(shmping, quiet_prints_header_and_summary, .timeout = 120)
{
    struct run r;

    expect_ok(&r, "-q -c 3 -i 0.001 -s 100K");
    cr_expect(strstr(r.out, "SHMPING peer: 102400 bytes, mode shm") != NULL, "%s", r.out);
    cr_expect(strstr(r.out, "bytes from") == NULL, "-q printed replies:\n%s", r.out);
    cr_expect(strstr(r.out, "3 sent, 3 received, 0% lost") != NULL, "%s", r.out);
    run_free(&r);
}

Test(shmping, copy_mode_summary, .timeout = 120)
{
    struct run r;

    expect_ok(&r, "--mode copy -c 4 -i 0.001");
    cr_expect(strstr(r.out, "mode copy") != NULL, "%s", r.out);
    cr_expect_eq(count_lines(r.out, "64 bytes from peer: seq="), 4, "%s", r.out);
    cr_expect(strstr(r.out, "4 sent, 4 received, 0% lost") != NULL, "%s", r.out);
    run_free(&r);
}

Test(shmping, deadline_stops_the_run, .timeout = 120)
{
    struct run r;
    long long t0 = now_ms();

    expect_ok(&r, "-w 0.5 -i 0.05 -q");
    cr_expect_lt(now_ms() - t0, 5000);
    cr_expect(strstr(r.out, " sent, ") != NULL, "%s", r.out);
    run_free(&r);
}

/* ---- --json ---- */

/* The JSON object has the fields, and they agree with what was asked. */
static void check_json(const char *json, const char *fields, const char *cond)
{
    static const char *script =
        "import json, sys\n"
        "d = json.loads(sys.argv[1])\n"
        "missing = [f for f in sys.argv[2].split() if f not in d]\n"
        "if missing: sys.exit('missing fields: %s' % missing)\n"
        "if not eval(sys.argv[3]): sys.exit('condition failed: %s in %s' % (sys.argv[3], d))\n";
    char *argv[] = { "python3", "-c", (char *)script, (char *)json, (char *)fields,
                     (char *)cond, NULL };
    int status;
    pid_t pid = fork();

    cr_assert_geq(pid, 0);
    if (pid == 0) {
        execvp(argv[0], argv);
        _exit(127);
    }
    status = wait_child(pid, 30000);
    if (status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 127)
        cr_skip_test("python3 is not available");
    cr_expect(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "JSON check failed for:\n%s", json);
}

#define PING_FIELDS "mode size sent received lost_pct time_ms rtt_min_us rtt_avg_us " \
                    "rtt_max_us rtt_mdev_us rtt_p50_us rtt_p90_us rtt_p99_us rtt_p999_us"

Test(shmping, json_has_every_field, .timeout = 120)
{
    struct run r;

    expect_ok(&r, "--json -c 3 -i 0.001");
    check_json(r.out, PING_FIELDS,
               "d['sent'] == 3 and d['received'] == 3 and d['lost_pct'] == 0 "
               "and d['size'] == 64 and d['mode'] == 'inline' "
               "and 0 < d['rtt_min_us'] <= d['rtt_p50_us'] <= d['rtt_max_us']");
    run_free(&r);
}

Test(shmping, json_throughput_and_copy, .timeout = 120)
{
    struct run r;

    expect_ok(&r, "--json --throughput -c 2000 --batch 16 -s 4K");
    check_json(r.out, PING_FIELDS " msgs_per_s gb_per_s",
               "d['sent'] == 2000 and d['received'] == 2000 and d['msgs_per_s'] > 0 "
               "and d['gb_per_s'] > 0");
    run_free(&r);

    expect_ok(&r, "--json --mode copy -c 3 -i 0.001 -s 1K");
    check_json(r.out, PING_FIELDS,
               "d['mode'] == 'copy' and d['size'] == 1024 and d['received'] == 3");
    run_free(&r);
}

/* ---- carriers: message rings or the socket, --spin ---- */

/* The I/O a context made here runs on, as the header names it after the
 * carrier: "io_uring FEATURES", or "epoll (why)" where io_uring is refused. */
static const char *io_word(void)
{
    struct lshm_ctx *ctx;
    bool epoll;

    cr_assert_eq(lshm_ctx_new(&ctx, NULL), 0, "%s", lshm_last_error());
    epoll = (lshm_ctx_features(ctx) & LSHM_FEAT_EPOLL) != 0;
    lshm_ctx_free(ctx);
    return epoll ? "epoll (" : "io_uring ";
}

/* The summary's line "carrier ...: ring S sent/R received, socket S/R, ...". */
static void carrier_counts(const char *out, unsigned long long v[4])
{
    const char *l = strstr(out, ": ring ");

    cr_assert_not_null(l, "no carrier line:\n%s", out);
    cr_assert_eq(sscanf(l, ": ring %llu sent/%llu received, socket %llu/%llu", &v[0], &v[1],
                        &v[2], &v[3]), 4, "%s", l);
}

Test(shmping, header_and_summary_name_the_carrier, .timeout = 120)
{
    const char *io = io_word();
    unsigned long long v[4];
    char want[256];
    struct run r;

    expect_ok(&r, "-c 3 -i 0.001");
    cr_expect(strstr(r.out, "mode inline, carrier message rings, ") != NULL, "%s", r.out);
    carrier_counts(r.out, v);
    cr_expect(v[0] == 3 && v[1] == 3 && v[2] == 0 && v[3] == 0, "%s", r.out);
    run_free(&r);

    expect_ok(&r, "-c 3 -i 0.001 --no-ring -s 100K");
    snprintf(want, sizeof(want), "mode shm, carrier socket (LSHM_CTX_NO_RING, --no-ring), %s", io);
    cr_expect(strstr(r.out, want) != NULL, "%s", r.out);
    carrier_counts(r.out, v);
    cr_expect(v[0] == 0 && v[1] == 0 && v[2] == 3 && v[3] == 3, "%s", r.out);
    run_free(&r);

    expect_ok(&r, "-c 3 -i 0.001 --no-futex");
    snprintf(want, sizeof(want), "carrier message rings, WAKE datagram wake-ups "
             "(LSHM_CTX_NO_FUTEX, --no-futex), %s", io);
    cr_expect(strstr(r.out, want) != NULL, "%s", r.out);
    run_free(&r);

    expect_ok(&r, "-c 3 -i 0.001 --spin 100");
    snprintf(want, sizeof(want), ", busy-poll 100 us, %s", io);
    cr_expect(strstr(r.out, "carrier message rings, ") != NULL && strstr(r.out, want) != NULL,
              "%s", r.out);
    run_free(&r);

    /* The library polls rings only: said so, not hidden. */
    expect_ok(&r, "-c 3 -i 0.001 --spin 100 --no-ring");
    cr_expect(strstr(r.out, "carrier socket (LSHM_CTX_NO_RING, --no-ring), busy-poll 100 us "
                     "(no effect: rings only)") != NULL, "%s", r.out);
    run_free(&r);
}

#define CARRIER_FIELDS "spin_us carrier carrier_why wakeups ring_msgs ring_msgs_in " \
                       "sock_msgs sock_msgs_in wakes_sent wakes_received ring_full io io_why"

/* The JSON counts where the messages went: --no-ring really takes the socket. */
Test(shmping, json_counts_ring_and_socket_messages, .timeout = 120)
{
    struct run r;

    expect_ok(&r, "--json -c 5 -i 0.001");
    check_json(r.out, PING_FIELDS " " CARRIER_FIELDS,
               "d['carrier'] == 'ring' and d['carrier_why'] in (None, "
               "'io_uring without FUTEX_WAIT and FUTEX_WAKE', 'epoll has no futex wait') "
               "and (d['carrier_why'] == 'epoll has no futex wait') == (d['io'] == 'epoll') "
               "and d['io'] in ('io_uring', 'epoll') "
               "and (d['io_why'] is None) == (d['io'] == 'io_uring') and d['wakeups'] in ('futex', "
               "'wake') and d['ring_msgs'] == 5 and d['ring_msgs_in'] == 5 "
               "and d['sock_msgs'] == 0 and d['sock_msgs_in'] == 0 and d['spin_us'] == 0 "
               "and d['ring_full'] == 0");
    run_free(&r);

    expect_ok(&r, "--json -c 5 -i 0.001 --no-ring");
    check_json(r.out, PING_FIELDS " " CARRIER_FIELDS,
               "d['carrier'] == 'socket' and d['carrier_why'] == 'LSHM_CTX_NO_RING, --no-ring' "
               "and d['wakeups'] is None and d['ring_msgs'] == 0 and d['ring_msgs_in'] == 0 "
               "and d['sock_msgs'] == 5 and d['sock_msgs_in'] == 5 and d['wakes_sent'] == 0 "
               "and d['wakes_received'] == 0");
    run_free(&r);

    /* A one-way stream: every MSG_DATA and the MSG_END by the socket. */
    expect_ok(&r, "--json --throughput -c 500 --batch 32 --no-ring");
    check_json(r.out, PING_FIELDS " " CARRIER_FIELDS,
               "d['carrier'] == 'socket' and d['received'] == 500 and d['ring_msgs'] == 0 "
               "and d['sock_msgs'] == 501 and d['sock_msgs_in'] == 1");
    run_free(&r);

    expect_ok(&r, "--json --throughput -c 500 --batch 32 --spin 20");
    check_json(r.out, PING_FIELDS " " CARRIER_FIELDS,
               "d['carrier'] == 'ring' and d['received'] == 500 and d['ring_msgs'] == 501 "
               "and d['sock_msgs'] == 0 and d['ring_msgs_in'] == 1 and d['spin_us'] == 20");
    run_free(&r);

    expect_ok(&r, "--json -c 3 -i 0.001 --no-futex");
    check_json(r.out, CARRIER_FIELDS, "d['carrier'] == 'ring' and d['wakeups'] == 'wake' "
               "and d['carrier_why'] == 'LSHM_CTX_NO_FUTEX, --no-futex' and d['ring_msgs'] == 3");
    run_free(&r);

    expect_ok(&r, "--json -c 3 -i 0.001 --mode seqpacket");
    check_json(r.out, CARRIER_FIELDS, "d['carrier'] is None and d['spin_us'] == 0 "
               "and d['io'] is None and d['io_why'] is None");
    run_free(&r);
}

/* --spin's bounds are spin_us's: 0 and a second both run. */
Test(shmping, spin_takes_0_to_a_second, .timeout = 120)
{
    struct run r;

    expect_ok(&r, "--json -c 2 -i 0.001 --spin 0");
    check_json(r.out, CARRIER_FIELDS, "d['spin_us'] == 0 and d['received'] == 2");
    run_free(&r);
    expect_ok(&r, "--json -c 2 -i 0.001 --spin 1000000");
    check_json(r.out, CARRIER_FIELDS, "d['spin_us'] == 1000000 and d['received'] == 2 "
               "and d['carrier'] == 'ring'");
    run_free(&r);
}

#define FAULT_FIELDS "bytes_moved minflt_self minflt_peer minflt_self_per_mib " \
                     "minflt_peer_per_mib"
/* The fault fields agree with each other (d: the JSON object). */
#define FAULTS_SANE \
    "d['minflt_self'] >= 0 and d['bytes_moved'] > 0 " \
    "and abs(d['minflt_self_per_mib'] - d['minflt_self'] / (d['bytes_moved'] / 2**20)) " \
    "<= 1e-3 + 1e-3 * d['minflt_self_per_mib'] " \
    "and (d['minflt_peer'] is None) == (d['minflt_peer_per_mib'] is None)"

/* Every run reports the minor faults of both processes and per MiB moved. */
Test(shmping, json_reports_page_faults_of_both_processes, .timeout = 120)
{
    struct run r;

    expect_ok(&r, "--json -c 3 -i 0.001 -s 1M");
    check_json(r.out, PING_FIELDS " " FAULT_FIELDS,
               FAULTS_SANE " and d['bytes_moved'] == 2 * 3 * 2**20 and d['minflt_peer'] >= 0");
    run_free(&r);

    expect_ok(&r, "--json --throughput -c 100 -s 64K --mode shm");
    check_json(r.out, PING_FIELDS " " FAULT_FIELDS,
               FAULTS_SANE " and d['bytes_moved'] == 100 * 65536 and d['minflt_peer'] >= 0");
    run_free(&r);

    /* The copy peer reads into a buffer it has just grown to 64 MiB: its
     * first touches must show. */
    expect_ok(&r, "--json --throughput -c 2 -s 64M --mode copy");
    check_json(r.out, PING_FIELDS " " FAULT_FIELDS,
               FAULTS_SANE " and d['bytes_moved'] == 2 * 2**26 and d['minflt_peer'] > 0 "
               "and d['minflt_peer_per_mib'] > 0");
    run_free(&r);
}

/* Where the two processes ran: pinned to one CPU, both say that CPU, in the
 * summary and in the JSON; unpinned, each a CPU of this machine. */
Test(shmping, summary_says_on_which_cpus_the_processes_ended, .timeout = 120)
{
    cpu_set_t one, all;
    long ncpu = sysconf(_SC_NPROCESSORS_CONF);
    char cond[256];
    struct run r;
    int cpu;

    cr_assert_eq(sched_getaffinity(0, sizeof(all), &all), 0);
    /* The highest CPU this test may use: not 0 where there are two. */
    for (cpu = CPU_SETSIZE - 1; cpu > 0 && !CPU_ISSET(cpu, &all); cpu--)
        ;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    cr_assert_eq(sched_setaffinity(0, sizeof(one), &one), 0);
    expect_ok(&r, "-q -c 3 -i 0.001 --mode shm -s 100K");
    sched_setaffinity(0, sizeof(all), &all);
    snprintf(cond, sizeof(cond), "cpus: both processes on CPU %d at the end\n", cpu);
    cr_expect(strstr(r.out, cond) != NULL, "pinned to CPU %d:\n%s", cpu, r.out);
    run_free(&r);

    cr_assert_eq(sched_setaffinity(0, sizeof(one), &one), 0);
    expect_ok(&r, "--json --throughput -c 50 --mode copy -s 64K");
    sched_setaffinity(0, sizeof(all), &all);
    snprintf(cond, sizeof(cond), "d['cpu_self'] == %d and d['cpu_peer'] == %d", cpu, cpu);
    check_json(r.out, "cpu_self cpu_peer", cond);
    run_free(&r);

    expect_ok(&r, "--json -c 3 -i 0.001");
    snprintf(cond, sizeof(cond), "0 <= d['cpu_self'] < %ld and 0 <= d['cpu_peer'] < %ld",
             ncpu, ncpu);
    check_json(r.out, "cpu_self cpu_peer", cond);
    run_free(&r);
}

Test(shmping, summary_reports_page_faults, .timeout = 120)
{
    struct run r;
    long here, peer;
    double here_mib, peer_mib;
    const char *l;

    expect_ok(&r, "-q --throughput -c 200 --mode seqpacket -s 16K");
    l = strstr(r.out, "minor page faults: ");
    cr_assert_not_null(l, "no fault line:\n%s", r.out);
    cr_expect_eq(sscanf(l, "minor page faults: %ld here (%lf/MiB), %ld peer (%lf/MiB)", &here,
                        &here_mib, &peer, &peer_mib), 4, "%s", l);
    cr_expect(here >= 0 && peer >= 0 && here_mib >= 0 && peer_mib >= 0, "%s", l);
    run_free(&r);

    /* Below a MiB moved, the counts alone. */
    expect_ok(&r, "-q -c 3 -i 0.001");
    l = strstr(r.out, "minor page faults: ");
    cr_assert_not_null(l, "no fault line:\n%s", r.out);
    cr_expect_eq(sscanf(l, "minor page faults: %ld here, %ld peer\n", &here, &peer), 2, "%s", l);
    cr_expect(strstr(l, "/MiB") == NULL, "%s", l);
    run_free(&r);
}

/* ---- the fast payload: every byte written and read, the sum checked ---- */

Test(shmping, size_takes_a_whole_fraction, .timeout = 120)
{
    struct run r;

    expect_ok(&r, "--json -c 1 -s 3.5M");
    check_json(r.out, PING_FIELDS, "d['size'] == 3670016 and d['mode'] == 'shm' "
               "and d['received'] == 1");
    run_free(&r);
}

/* ---- --frames and --slow ---- */

/* Without --mode: shm, then copy, each frame's sum checked, and the ratio. */
Test(shmping, frames_run_against_copy_mode, .timeout = 120)
{
    struct run r;

    expect_ok(&r, "--frames 20 -s 1M --slow 5:2 --json");
    check_json(r.out, "runs gb_per_s_ratio",
               "len(d['runs']) == 2 and [x['mode'] for x in d['runs']] == ['shm', 'copy'] "
               "and all(x['sent'] == 20 and x['received'] == 20 and x['corrupt'] == 0 "
               "and x['frames'] == 20 and x['slow_frames'] == 5 and x['slow_ms'] == 2 "
               "and x['gb_per_s'] > 0 and x['bytes_moved'] == 20 * 2**20 "
               "and x['minflt_self'] >= 0 and x['minflt_peer'] >= 0 for x in d['runs']) "
               "and abs(d['gb_per_s_ratio'] - d['runs'][0]['gb_per_s'] "
               "/ d['runs'][1]['gb_per_s']) < 1e-3 * d['gb_per_s_ratio'] + 1e-4 "
               "and abs(d['gb_per_s_ratio_ceiling'] - 20 * 2**20 / d['runs'][1]['gb_per_s'] "
               "/ 1e6 / 10) < 1e-3 * d['gb_per_s_ratio_ceiling'] + 1e-4");
    run_free(&r);

    /* The consumer's sleep bounds every mode: the ceiling says how much. */
    expect_ok(&r, "--frames 10 -s 100K --slow 4:5 -q");
    cr_expect(strstr(r.out, "ceiling: the consumer sleeps 20 ms of copy's ") != NULL, "%s",
              r.out);
    run_free(&r);

    expect_ok(&r, "--frames 10 -s 100K -q");
    cr_expect(strstr(r.out, "ceiling") == NULL, "%s", r.out);
    cr_expect(strstr(r.out, "mode shm, throughput, 10 frames") != NULL, "%s", r.out);
    cr_expect(strstr(r.out, "mode copy, throughput, 10 frames") != NULL, "%s", r.out);
    cr_expect_eq(count_lines(r.out, "10 sent, 10 received, 0% lost"), 2, "%s", r.out);
    cr_expect(strstr(r.out, "x copy over the whole run") != NULL, "%s", r.out);
    run_free(&r);
}

/* Every byte of every frame checked against the pattern, in each mode. */
Test(shmping, frames_verify_in_every_mode, .timeout = 120)
{
    static const char *const modes[] = {
        "--mode shm -s 3.5M", "--mode copy -s 3.5M", "--mode inline -s 16K",
        "--mode seqpacket -s 16K",
    };

    for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
        char args[256];
        struct run r;

        snprintf(args, sizeof(args), "--frames 12 --slow 3:1 --verify -q %s", modes[i]);
        expect_ok(&r, args);
        cr_expect(strstr(r.out, "12 sent, 12 received, 0% lost") != NULL, "shmping %s:\n%s",
                  args, r.out);
        cr_expect(strstr(r.out, "consumer slow for its first 3 (1 ms each)") != NULL, "%s", r.out);
        run_free(&r);
    }
}

/* The whole run waits for the slow consumer: 5 frames of 100 ms each. */
Test(shmping, slow_consumer_counts_in_the_whole_run, .timeout = 120)
{
    struct run r;

    expect_ok(&r, "--frames 5 -s 64K --slow 5:100 --mode shm --json");
    check_json(r.out, PING_FIELDS " frames slow_frames slow_ms",
               "d['received'] == 5 and d['time_ms'] >= 500");
    run_free(&r);
    expect_ok(&r, "--throughput -c 5 -s 64K --slow 5:100 --mode copy --json");
    check_json(r.out, PING_FIELDS " slow_frames", "d['received'] == 5 and d['time_ms'] >= 500");
    run_free(&r);
}

/* ---- options and exit statuses ---- */

Test(shmping, bad_options_exit_64, .timeout = 120)
{
    static const struct { const char *args, *names; } bad[] = {
        { "--bogus", "--bogus" },
        { "-x", "-x" },
        { "-c abc", "-c" },
        { "-c 0", "-c" },
        { "-s 65M", "-s" },
        { "-s 1X", "-s" },
        { "-s -1", "-s" },
        { "-i -1", "-i" },
        { "-i abc", "-i" },
        { "-w 0", "-w" },
        { "--mode bogus", "--mode" },
        { "--mode copy /tmp/shmping-test-none.sock", "--mode copy" },
        { "--mode seqpacket -l /tmp/shmping-test-none.sock", "--mode seqpacket" },
        { "--mode seqpacket -s 16385", "seqpacket" },
        { "--batch 0", "--batch" },
        { "--batch 1025", "--batch" },
        { "--mode inline -s 20K", "inline" },
        { "--idle abc", "--idle" },
        { "--idle 20001", "--idle" },
        { "--idle 4 --mode copy", "--idle" },
        { "--idle 2 --bench", "--idle" },
        { "-c", "-c" },
        { "one two", "two" },
        { "-s 3.5", "-s" },
        { "-s 0.1K", "-s" },
        { "-s 1.K", "-s" },
        { "--frames 0", "--frames" },
        { "--frames abc", "--frames" },
        { "--frames 4294967296", "--frames" },
        { "--frames 3 -c 4", "--frames" },
        { "--frames 3 /tmp/shmping-test-none.sock", "--frames" },
        { "--frames 3 -l /tmp/shmping-test-none.sock", "--frames" },
        { "--frames 3 --bench", "--frames" },
        { "--slow 5", "--slow" },
        { "--slow :5", "--slow" },
        { "--slow 5:", "--slow" },
        { "--slow a:5", "--slow" },
        { "--slow 5:60001", "--slow" },
        { "--slow 5:5", "--slow" },
        { "--slow 5:5 --throughput /tmp/shmping-test-none.sock", "--slow" },
        { "--spin", "--spin" },
        { "--spin abc", "--spin" },
        { "--spin -1", "--spin" },
        { "--spin 1000001", "--spin" },
        { "--spin 1.5", "--spin" },
        { "--spin 10 --mode copy", "--spin" },
        { "--no-ring --mode seqpacket", "--no-ring" },
        { "--no-futex --mode copy", "--no-futex" },
        { "--bench --no-ring", "--no-ring" },
        { "--bench --spin 0", "--spin 0" },
        { "--with-epoll", "--with-epoll" },
        { "--with-epoll --throughput", "--with-epoll" },
    };

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct run r;

        run(&r, bad[i].args);
        cr_expect_eq(r.status, 64, "shmping %s: exit %d, not 64", bad[i].args, r.status);
        cr_expect(strstr(r.err, bad[i].names) != NULL,
                  "shmping %s: the message does not name '%s': %s", bad[i].args,
                  bad[i].names, r.err);
        cr_expect_eq(r.out[0], '\0', "shmping %s printed on stdout: %s", bad[i].args, r.out);
        run_free(&r);
    }
}

Test(shmping, no_server_exits_2, .timeout = 120)
{
    struct run r;
    char args[128];

    snprintf(args, sizeof(args), "/tmp/shmping-test-%d-none.sock -c 1", (int)getpid());
    run(&r, args);
    cr_expect_eq(r.status, 2, "exit %d\n%s", r.status, r.err);
    cr_expect(strstr(r.err, "no server at /tmp/shmping-test-") != NULL, "%s", r.err);
    cr_expect_eq(count_lines(r.err, "\n"), 1, "not one line: %s", r.err);
    run_free(&r);
}

Test(shmping, version_and_help, .timeout = 120)
{
    struct run r;

    expect_ok(&r, "--version");
    cr_expect(strstr(r.out, "shmping ") != NULL, "%s", r.out);
    cr_expect(strstr(r.out, lshm_version()) != NULL, "%s", r.out);
    run_free(&r);
    expect_ok(&r, "--help");
    cr_expect(strstr(r.out, "usage: shmping") != NULL, "%s", r.out);
    run_free(&r);
}

/* The header names the carrier: io_uring, or epoll with the reason. */
Test(shmping, header_names_the_carrier_and_why, .timeout = 120)
{
    struct lshm_ctx *ctx;
    struct run r;
    bool epoll;

    cr_assert_eq(lshm_ctx_new(&ctx, NULL), 0, "%s", lshm_last_error());
    epoll = (lshm_ctx_features(ctx) & LSHM_FEAT_EPOLL) != 0;
    lshm_ctx_free(ctx);
    expect_ok(&r, "-c 2 -i 0.01 -q");
    cr_expect(strstr(r.out, epoll ? ", epoll (" : ", io_uring ") != NULL, "%s", r.out);
    run_free(&r);
    expect_ok(&r, "--no-io-uring -c 2 -i 0.01 -q");
    cr_expect(strstr(r.out, ", epoll (asked for with LSHM_NO_IO_URING") != NULL, "%s", r.out);
    cr_expect(strstr(r.out, "carrier message rings, WAKE datagram wake-ups "
                     "(epoll has no futex wait), epoll (") != NULL, "%s", r.out);
    cr_expect(strstr(r.out, "2 sent, 2 received") != NULL, "%s", r.out);
    run_free(&r);
    expect_ok(&r, "--no-io-uring -c 2 -i 0.01 --json");
    check_json(r.out, "io io_why carrier wakeups", "d['io'] == 'epoll' and "
               "d['io_why'].startswith('asked for with LSHM_NO_IO_URING') and "
               "d['carrier'] == 'ring' and d['wakeups'] == 'wake' and d['received'] == 2");
    run_free(&r);
    expect_ok(&r, "--no-io-uring --probe");
    cr_expect(strstr(r.out, "library will use: epoll (asked for with LSHM_NO_IO_URING") != NULL
              && strstr(r.out, "message rings with WAKE datagram wake-ups") != NULL,
              "%s", r.out);
    run_free(&r);
}

Test(shmping, probe_prints_kernel_release, .timeout = 120)
{
    struct utsname u;
    struct run r;

    cr_assert_eq(uname(&u), 0);
    expect_ok(&r, "--probe");
    cr_expect(strstr(r.out, u.release) != NULL, "no '%s' in:\n%s", u.release, r.out);
    cr_expect(strstr(r.out, "io_uring:") != NULL, "%s", r.out);
    cr_expect(strstr(r.out, "RLIMIT_MEMLOCK:") != NULL, "%s", r.out);
    cr_expect(strstr(r.out, "capabilities:") != NULL, "%s", r.out);
    run_free(&r);
}

/* Read fd until what shows (the rest of the stream stays to be read). */
static bool wait_output(int fd, const char *what, int timeout_ms)
{
    long long end = now_ms() + timeout_ms;
    char seen[8192];
    size_t len = 0;

    while (now_ms() < end) {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        ssize_t n;

        if (poll(&p, 1, 100) <= 0)
            continue;
        n = read(fd, seen + len, sizeof(seen) - 1 - len);
        if (n <= 0)
            return false;
        len += (size_t)n;
        seen[len] = '\0';
        if (strstr(seen, what) != NULL)
            return true;
        if (len == sizeof(seen) - 1)
            len = 0;
    }
    return false;
}

Test(shmping, sigint_prints_summary_so_far, .timeout = 120)
{
    struct run r;
    int out, err;
    pid_t pid = spawn("-c 10000 -i 0.01", &out, &err);

    /* Signal it once it is running (its handlers are in place by then). */
    cr_expect(wait_output(out, "bytes from peer: seq=3 ", 20000), "no replies");
    kill(pid, SIGINT);
    finish(pid, out, err, 10000, &r);
    cr_expect(r.status == 0 || r.status == 1, "exit %d\n%s", r.status, r.err);
    cr_expect(strstr(r.out, "--- peer shmping statistics ---") != NULL, "%s", r.out);
    cr_expect(strstr(r.out, " sent, ") != NULL, "%s", r.out);
    cr_expect(strstr(r.out, "10000 sent") == NULL, "ran to the end:\n%s", r.out);
    run_free(&r);
}

/* ---- --verify in every mode and size class ---- */

static void verify_sizes(const char *mode, const char *const *sizes, size_t n,
                         const char *extra)
{
    for (size_t i = 0; i < n; i++) {
        char args[256];
        struct run r;
        bool huge = strcmp(sizes[i], "64M") == 0;

        snprintf(args, sizeof(args), "--verify -q -i 0.001 -c %d --mode %s -s %s %s",
                 huge ? 2 : 3, mode, sizes[i], extra);
        expect_ok(&r, args);
        cr_expect(strstr(r.out, huge ? "2 sent, 2 received, 0% lost" :
                                       "3 sent, 3 received, 0% lost") != NULL,
                  "shmping %s:\n%s", args, r.out);
        run_free(&r);
    }
}

static const char *const all_sizes[] = { "0", "1", "16384", "16385", "1M", "64M" };
static const char *const inline_sizes[] = { "0", "1", "16384" };

Test(shmping, verify_inline, .timeout = 120)
{
    verify_sizes("inline", inline_sizes, 3, "");
}

Test(shmping, verify_shm, .timeout = 120)
{
    verify_sizes("shm", all_sizes, 6, "");
}

Test(shmping, verify_copy, .timeout = 120)
{
    verify_sizes("copy", all_sizes, 6, "");
}

Test(shmping, verify_seqpacket, .timeout = 120)
{
    verify_sizes("seqpacket", inline_sizes, 3, "");
}

Test(shmping, verify_throughput, .timeout = 120)
{
    static const char *const cases[] = {
        "--mode inline -s 16384 -c 3000 --batch 8",
        "--mode inline -s 0 -c 3000",
        "--mode shm -s 16385 -c 500 --batch 4",
        "--mode shm -s 3M -c 20",
        "--mode copy -s 64 -c 3000",
        "--mode copy -s 1M -c 50",
        "--mode seqpacket -s 16384 -c 3000",
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char args[256], want[64];
        struct run r;
        int count = atoi(strstr(cases[i], "-c ") + 3);

        snprintf(args, sizeof(args), "--throughput --verify -q %s", cases[i]);
        expect_ok(&r, args);
        snprintf(want, sizeof(want), "%d sent, %d received, 0%% lost", count, count);
        cr_expect(strstr(r.out, want) != NULL, "shmping %s:\n%s", args, r.out);
        cr_expect(strstr(r.out, "msgs/s") != NULL, "shmping %s:\n%s", args, r.out);
        run_free(&r);
    }
}

/* ---- the server ---- */

struct server {
    pid_t pid;
    int   out, err;
    char  path[108];
};

static void server_start(struct server *s, const char *extra)
{
    static int n;
    char args[256];
    struct stat st;
    long long end = now_ms() + 10000;

    snprintf(s->path, sizeof(s->path), "/tmp/shmping-test-%d-%d.sock", (int)getpid(), n++);
    unlink(s->path);
    snprintf(args, sizeof(args), "-l %s %s", s->path, extra);
    s->pid = spawn(args, &s->out, &s->err);
    while (stat(s->path, &st) != 0) {
        if (now_ms() > end || waitpid(s->pid, NULL, WNOHANG) != 0) {
            kill(s->pid, SIGKILL);
            waitpid(s->pid, NULL, 0);
            close(s->out);
            close(s->err);
            cr_assert_fail("the server did not create %s", s->path);
        }
        usleep(2000);
    }
}

/* Stop it with sig; it must exit 0 and leave no socket behind. */
static void server_stop(struct server *s, int sig, struct run *r)
{
    struct stat st;

    kill(s->pid, sig);
    finish(s->pid, s->out, s->err, 10000, r);
    cr_expect_eq(r->status, 0, "server exit %d after signal %d\nstderr:\n%s", r->status, sig,
                 r->err);
    cr_expect(stat(s->path, &st) != 0 && errno == ENOENT, "%s is still there", s->path);
    unlink(s->path);
}

Test(shmping, server_stops_on_sigterm_and_sigint, .timeout = 120)
{
    struct server s;
    struct run r;

    server_start(&s, "");
    server_stop(&s, SIGTERM, &r);
    cr_expect(strstr(r.out, "SHMPING server on ") != NULL, "%s", r.out);
    run_free(&r);

    server_start(&s, "-q");
    server_stop(&s, SIGINT, &r);
    run_free(&r);
}

/* A server with --no-ring: the client offers rings, sees the socket, says why. */
Test(shmping, server_without_rings_makes_the_socket_the_carrier, .timeout = 120)
{
    const char *io = io_word();
    unsigned long long v[4];
    struct server s;
    struct run r;
    char args[256], want[256];

    server_start(&s, "--no-ring");
    snprintf(args, sizeof(args), "%s -c 3 -i 0.001", s.path);
    expect_ok(&r, args);
    snprintf(want, sizeof(want), "carrier socket (the peer's HELLO offers no RING), %s", io);
    cr_expect(strstr(r.out, want) != NULL, "%s", r.out);
    carrier_counts(r.out, v);
    cr_expect(v[0] == 0 && v[1] == 0 && v[2] == 3 && v[3] == 3, "%s", r.out);
    run_free(&r);

    snprintf(args, sizeof(args), "%s -c 3 -i 0.001 --json", s.path);
    expect_ok(&r, args);
    check_json(r.out, CARRIER_FIELDS, "d['carrier'] == 'socket' and d['carrier_why'] == "
               "\"the peer's HELLO offers no RING\" and d['sock_msgs'] == 3");
    run_free(&r);
    server_stop(&s, SIGTERM, &r);
    snprintf(want, sizeof(want), "SHMPING server on %s, carrier socket (LSHM_CTX_NO_RING, "
             "--no-ring), %s", s.path, io);
    cr_expect(strstr(r.out, want) != NULL, "%s", r.out);
    run_free(&r);

    /* Both offer rings: the header comes once the first ping took them. */
    server_start(&s, "");
    snprintf(args, sizeof(args), "%s -c 3 -i 0.001", s.path);
    expect_ok(&r, args);
    cr_expect(strstr(r.out, "carrier message rings, ") != NULL, "%s", r.out);
    carrier_counts(r.out, v);
    cr_expect(v[0] == 3 && v[1] == 3 && v[2] == 0 && v[3] == 0, "%s", r.out);
    cr_expect(strstr(r.out, "SHMPING ") < strstr(r.out, "bytes from"), "%s", r.out);
    run_free(&r);
    server_stop(&s, SIGTERM, &r);
    run_free(&r);
}

Test(shmping, server_eight_verifying_clients, .timeout = 120)
{
    static const char *const clients[8] = {
        "-s 64", "-s 0", "-s 16384 --mode inline", "-s 16385",
        "-s 1M --batch 4", "-s 3M", "-s 1 --mode shm", "-s 100K --throughput -c 300",
    };
    struct { pid_t pid; int out, err; } c[8];
    struct server s;
    struct run r;

    server_start(&s, "");
    for (int i = 0; i < 8; i++) {
        char args[256];
        snprintf(args, sizeof(args), "%s --verify -q -c 40 -i 0.002 %s", s.path, clients[i]);
        c[i].pid = spawn(args, &c[i].out, &c[i].err);
    }
    for (int i = 0; i < 8; i++) {
        finish(c[i].pid, c[i].out, c[i].err, RUN_MS, &r);
        cr_expect_eq(r.status, 0, "client %d (%s): exit %d\nstdout:\n%s\nstderr:\n%s", i,
                     clients[i], r.status, r.out, r.err);
        cr_expect(strstr(r.out, " received, 0% lost") != NULL, "client %d:\n%s", i, r.out);
        run_free(&r);
    }
    server_stop(&s, SIGTERM, &r);
    cr_expect_eq(count_lines(r.err, "dropped"), 0, "server log:\n%s", r.err);
    run_free(&r);
}

Test(shmping, server_survives_a_killed_client, .timeout = 120)
{
    struct server s;
    struct run r, victim;
    int vo, ve, go, ge;
    char args[256];
    pid_t v, good;

    server_start(&s, "-q");
    snprintf(args, sizeof(args), "%s -f -c 100000000 -s 200K -q", s.path);
    v = spawn(args, &vo, &ve);
    snprintf(args, sizeof(args), "%s --verify -q -c 100 -i 0.005 -s 20K", s.path);
    good = spawn(args, &go, &ge);
    usleep(200 * 1000);
    kill(v, SIGKILL);
    finish(v, vo, ve, 10000, &victim);
    run_free(&victim);

    finish(good, go, ge, RUN_MS, &r);
    cr_expect_eq(r.status, 0, "exit %d\n%s\n%s", r.status, r.out, r.err);
    run_free(&r);

    /* The server still serves. */
    snprintf(args, sizeof(args), "%s --verify -q -c 5 -i 0.001", s.path);
    expect_ok(&r, args);
    run_free(&r);
    server_stop(&s, SIGTERM, &r);
    /* One line for each of the three clients' end, the killed one's included. */
    cr_expect_eq(count_lines(r.err, "disconnected") + count_lines(r.err, "dropped"), 3,
                 "server log:\n%s", r.err);
    run_free(&r);
}

/* The value of a "Name:\tvalue" line of /proc/PID/status, or "". */
static void proc_status(pid_t pid, const char *name, char *val, size_t len)
{
    char path[64], line[256];
    size_t n = strlen(name);
    FILE *f;

    val[0] = '\0';
    snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
    f = fopen(path, "re");
    if (f == NULL)
        return;
    while (fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, name, n) == 0 && line[n] == ':') {
            snprintf(val, len, "%s", line + n + 1 + strspn(line + n + 1, " \t"));
            val[strcspn(val, "\n")] = '\0';
            break;
        }
    }
    fclose(f);
}

/* Entries of /proc/PID/fd, or -1. */
static int proc_fds(pid_t pid)
{
    char path[64];
    struct dirent *e;
    int n = 0;
    DIR *d;

    snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
    d = opendir(path);
    if (d == NULL)
        return -1;
    while ((e = readdir(d)) != NULL)
        n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

/*
 * --idle: the server holds that many more ports (an fd each, past the
 * usual soft limit of 1024), a client with as many of its own gets every
 * reply, and both report them.
 */
Test(shmping, idle_ports_open_and_replies_all_come_back, .timeout = 120)
{
    struct server s;
    struct run r;
    char args[256];
    long long end = now_ms() + 10000;
    int fds;

    server_start(&s, "--idle 3000");
    while ((fds = proc_fds(s.pid)) < 3000 && now_ms() < end)
        usleep(5000);
    cr_expect_geq(fds, 3000, "the server holds %d fds, not 3000 idle ports' worth", fds);
    snprintf(args, sizeof(args), "%s --idle 2999 --verify -f -c 2000 --json", s.path);
    expect_ok(&r, args);
    check_json(r.out, PING_FIELDS " idle_ports",
               "d['idle_ports'] == 3000 and d['received'] == 2000 and d['corrupt'] == 0");
    run_free(&r);
    server_stop(&s, SIGTERM, &r);
    cr_expect(strstr(r.out, ", 3000 idle ports, ") != NULL, "%s", r.out);
    run_free(&r);

    expect_ok(&r, "--idle 1000 --verify -f -c 2000 -q -s 100K");
    cr_expect(strstr(r.out, "2000 sent, 2000 received, 0% lost") != NULL, "%s", r.out);
    run_free(&r);
}

Test(shmping, server_drops_capabilities, .timeout = 120)
{
    char eff[64], nnp[16];
    long long end;
    struct server s;
    struct run r;

    proc_status(getpid(), "CapEff", eff, sizeof(eff));
    if (strtoull(eff, NULL, 16) == 0)
        cr_skip_test("the tests hold no capabilities: nothing to see dropped");

    server_start(&s, "-q");
    end = now_ms() + 5000;
    do {
        proc_status(s.pid, "CapEff", eff, sizeof(eff));
        proc_status(s.pid, "NoNewPrivs", nnp, sizeof(nnp));
    } while (strtoull(eff, NULL, 16) != 0 && now_ms() < end && usleep(2000) == 0);
    cr_expect_eq(strtoull(eff, NULL, 16), 0, "the server kept capabilities %s", eff);
    cr_expect_str_eq(nnp, "1");
    server_stop(&s, SIGTERM, &r);
    run_free(&r);

    server_start(&s, "-q --keep-caps");
    usleep(100 * 1000);
    proc_status(s.pid, "CapEff", eff, sizeof(eff));
    cr_expect_neq(strtoull(eff, NULL, 16), 0, "--keep-caps dropped them");
    server_stop(&s, SIGTERM, &r);
    run_free(&r);
}

Test(shmping, server_refuses_a_second_server, .timeout = 120)
{
    struct server s;
    struct run r;
    char args[160];

    server_start(&s, "-q");
    snprintf(args, sizeof(args), "-l %s", s.path);
    run(&r, args);
    cr_expect_eq(r.status, 2, "exit %d\n%s", r.status, r.err);
    cr_expect(strstr(r.err, s.path) != NULL, "%s", r.err);
    run_free(&r);
    server_stop(&s, SIGTERM, &r);
    run_free(&r);
}

Test(shmping, server_drops_a_client_that_breaks_the_protocol, .timeout = 120)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    long long end;
    struct server s;
    struct run r;
    char args[256], buf[LSHM_WIRE_MAX];
    int fd;

    server_start(&s, "-q");
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", s.path);
    fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    cr_assert_geq(fd, 0);
    cr_assert_eq(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0, "%s", strerror(errno));
    cr_assert_eq(send(fd, "not a HELLO", 11, 0), 11);
    /* The server's own HELLO may come first; then it must hang up. */
    end = now_ms() + 10000;
    for (;;) {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        ssize_t n;

        cr_assert_lt(now_ms(), end, "the server kept a client that sent garbage");
        if (poll(&p, 1, 100) <= 0)
            continue;
        n = recv(fd, buf, sizeof(buf), 0);
        if (n <= 0)
            break;
    }
    close(fd);

    snprintf(args, sizeof(args), "%s --verify -q -c 5 -i 0.001 -s 40K", s.path);
    expect_ok(&r, args);
    run_free(&r);
    server_stop(&s, SIGTERM, &r);
    cr_expect_eq(count_lines(r.err, "dropped"), 1, "server log:\n%s", r.err);
    run_free(&r);
}

/* ---- a server that gets it wrong: shmping must notice ---- */

enum fake { FAKE_FLIP_A_BYTE, FAKE_SKIP_SEQ_2 };

/* An echo server made with the library itself, in a child, that corrupts
 * or drops on purpose.  Inline payloads only (the sizes used here). */
static pid_t fake_server(const char *path, enum fake how)
{
    long long end = now_ms() + 10000;
    struct stat st;
    pid_t pid;

    unlink(path);
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        static uint8_t buf[LSHM_INLINE_MAX];
        struct lshm_listener *l;
        struct lshm_port *port;
        struct lshm_ctx *ctx;
        struct lshm_msg m;

        if (lshm_ctx_new(&ctx, NULL) < 0 || lshm_listen(ctx, path, 0, &l) < 0)
            _exit(3);
        if (lshm_accept(l, &port, 20000) < 0)
            _exit(4);
        while (lshm_recv(port, &m, 20000) == 0) {
            struct lshm_out out = { .type = m.type, .last = 1, .stream = m.stream,
                                    .data = buf, .fd = -1 };
            bool skip = how == FAKE_SKIP_SEQ_2 && m.stream == 2;

            for (unsigned i = 0; m.iov != NULL && i < m.niov; i++) {
                if (out.size + m.iov[i].len > sizeof(buf))
                    break;
                memcpy(buf + out.size, m.iov[i].base, m.iov[i].len);
                out.size += m.iov[i].len;
            }
            if (how == FAKE_FLIP_A_BYTE && out.size > 0)
                buf[out.size / 2] ^= 0x40;
            if (out.size == 0)
                out.data = NULL;
            lshm_msg_done(&m);
            if (!skip)
                lshm_send(port, &out, 0);
        }
        lshm_port_close(port);
        lshm_listener_close(l);
        lshm_ctx_free(ctx);
        _exit(0);
    }
    while (stat(path, &st) != 0) {
        if (now_ms() > end || waitpid(pid, NULL, WNOHANG) != 0) {
            kill(pid, SIGKILL);
            waitpid(pid, NULL, 0);
            cr_assert_fail("the fake server did not create %s", path);
        }
        usleep(2000);
    }
    return pid;
}

/* shmping with opts against a fake server (socket named after tag) that
 * misbehaves as how: it must exit 1; its output in r, the server gone. */
static void run_against_fake(struct run *r, enum fake how, const char *tag, const char *opts)
{
    char path[108], args[256];
    pid_t fake;

    snprintf(path, sizeof(path), "/tmp/shmping-test-%d-%s.sock", (int)getpid(), tag);
    fake = fake_server(path, how);
    snprintf(args, sizeof(args), "%s %s", path, opts);
    run(r, args);
    cr_expect_eq(r->status, 1, "exit %d\n%s\n%s", r->status, r->out, r->err);
    cr_expect_eq(wait_child(fake, 10000), 0);
    unlink(path);
}

Test(shmping, verify_catches_a_corrupt_echo, .timeout = 120)
{
    struct run r;

    run_against_fake(&r, FAKE_FLIP_A_BYTE, "flip", "--verify -q -c 3 -i 0.001 -s 1000");
    cr_expect(strstr(r.err, "seq=1: payload differs at byte 500") != NULL, "%s", r.err);
    cr_expect(strstr(r.out, "3 sent, 3 received, 3 corrupt") != NULL, "%s", r.out);
    run_free(&r);
}

/* Without --verify the receiver still reads every byte: its sum shows a flip. */
Test(shmping, sum_catches_a_corrupt_echo, .timeout = 120)
{
    struct run r;

    run_against_fake(&r, FAKE_FLIP_A_BYTE, "sum", "-q -c 3 -i 0.001 -s 1000");
    cr_expect(strstr(r.err, "seq=1: the sum of the 1000 payload bytes is wrong") != NULL,
              "%s", r.err);
    cr_expect(strstr(r.out, "3 sent, 3 received, 3 corrupt") != NULL, "%s", r.out);
    run_free(&r);
}

Test(shmping, lost_reply_exits_1, .timeout = 120)
{
    struct run r;

    run_against_fake(&r, FAKE_SKIP_SEQ_2, "skip", "--json -c 3 -i 0.01 -w 0.3");
    check_json(r.out, PING_FIELDS " " FAULT_FIELDS, "d['sent'] == 3 and d['received'] == 2 "
               "and abs(d['lost_pct'] - 100.0 / 3) < 0.01 "
               "and d['minflt_peer'] is None and d['minflt_self'] >= 0");
    run_free(&r);
}

/* ---- --bench ---- */

Test(shmping, bench_fits_in_25_seconds, .timeout = 120)
{
    static const char *const rows[] = {
        "64 B     memory", "4 KiB    memory", "1 MiB    memory", "flt snd flt rcv",
        "64 B     copy", "64 B     seqpacket", "64 B     shm", "64 B     inline ",
        "64 B     inline+spin", "64 B     socket ", "64 B     socket+spin",
        "64 B     inline*", "inline*: inline with 1000 idle ports in each process",
        "4 KiB    copy", "4 KiB    seqpacket", "4 KiB    shm", "4 KiB    inline ",
        "4 KiB    inline+spin", "4 KiB    socket ", "4 KiB    socket+spin",
        "1 MiB    copy", "1 MiB    shm", "busy-poll 50 us",
        "floors: futex ping-pong p50 ", "cache-line ping-pong p50 ",
        "rtt p50 us  /seqpkt   /floor   msgs/s b1  /seqpkt  msgs/s b32  /seqpkt",
        "targets (this run's ratios)",
        "64 B rtt p50, sleeping: inline over seqpacket ",
        "64 B rtt p50, busy-poll: inline+spin over seqpacket ",
        "64 B rtt p50, busy-poll: inline+spin over cache-line floor ",
        "64 B msgs/s, batch 1: inline over seqpacket ",
        "64 B msgs/s, batch 32: inline over seqpacket ",
    };
    /* Its cells are timed; a sanitizer slows what is not (forks, exits
     * with their leak checks, handshakes, 1000 idle ports). */
    long long bound = getenv("LSHM_SANITIZER") != NULL ? 60000 : 25000;
    long long t0 = now_ms();
    struct run r;

    expect_ok(&r, "--bench");
    cr_expect_lt(now_ms() - t0, bound, "--bench took %lld ms", now_ms() - t0);
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++)
        cr_expect(strstr(r.out, rows[i]) != NULL, "no row '%s':\n%s", rows[i], r.out);
    cr_expect(strstr(r.out, "1 MiB    inline") == NULL, "%s", r.out);
    cr_expect(strstr(r.out, "1 MiB    seqpacket") == NULL, "%s", r.out);
    cr_expect(strstr(r.out, "1 MiB    socket") == NULL, "%s", r.out);
    cr_expect(strstr(r.out, "failed") == NULL, "%s", r.out);
    /* Every target has its figure, but the busy-poll floor's: a machine
     * without a free CPU for each process has no cache-line floor. */
    cr_expect_geq(count_lines(r.out, "x  met\n") + count_lines(r.out, "x  missed\n"), 4,
                  "%s", r.out);
    cr_expect_eq(count_lines(r.out, "x  met\n") + count_lines(r.out, "x  missed\n") +
                 count_lines(r.out, "x  no figure\n"), 5, "%s", r.out);
    cr_expect((strstr(r.out, "cache-line floor ") == NULL ||
               strstr(r.out, "x  no figure\n") == NULL) ==
              (strstr(r.out, "did not each have a CPU") == NULL), "%s", r.out);
    run_free(&r);
}

/* The JSON of --bench --with-epoll: a memory row per size, faults of the
 * one-way runs, each library row's carrier and I/O (the epoll rows where
 * the bench runs on io_uring), the floors and the targets (two more for the
 * epoll carrier). */
Test(shmping, bench_json_has_rows_carriers_floors_and_targets, .timeout = 120)
{
    struct run r;

    expect_ok(&r, "--bench --json --spin 30 --with-epoll");
    check_json(r.out, "cell_s batch spin_us io io_why floors bench targets interrupted",
               "[x['mode'] for x in d['bench'] if x['size'] == 2**20] == "
               "['memory', 'copy', 'shm'] + (d['io'] == 'io_uring') * ['shm'] "
               "and [x['label'] for x in d['bench'] if x['size'] == 64] == ['memory', 'copy', "
               "'seqpacket', 'shm', 'inline', 'inline+spin', 'socket', 'socket+spin'] + "
               "(d['io'] == 'io_uring') * ['shm/epoll', 'inline/epoll'] + ['inline*'] "
               "and [x['label'] for x in d['bench'] if x['size'] == 4096] == ['memory', 'copy', "
               "'seqpacket', 'shm', 'inline', 'inline+spin', 'socket', 'socket+spin'] + "
               "(d['io'] == 'io_uring') * ['shm/epoll', 'inline/epoll'] "
               "and all(x['io'] == ('epoll' if x['label'].endswith('/epoll') or d['io'] != 'io_uring' else "
               "'io_uring') for x in d['bench'] if x['carrier'] is not None) "
               "and all(x['io'] is None for x in d['bench'] if x['carrier'] is None) "
               "and all(x['mode'] != 'memory' or (x['rtt_avg_us'] is None "
               "and x['minflt_peer_per_mib'] is None and x['gb_per_s_memory_ratio'] == 1 "
               "and x['gb_per_s'] > 0) for x in d['bench']) "
               "and all(x['mode'] == 'memory' or (x['rtt_avg_us'] > 0 and x['rtt_p50_us'] > 0 "
               "and x['minflt_self_per_mib'] >= 0 and x['minflt_peer_per_mib'] >= 0 "
               "and x['gb_per_s_memory_ratio'] > 0 and (x['rtt_p50_floor_ratio'] is None) == "
               "(x['label'].endswith('+spin') and not d['floors']['cacheline']['valid'])) "
               "for x in d['bench']) "
               "and all(x['cpus_rtt'] in ((1, 2) if x['rtt_avg_us'] is not None else (None,)) "
               "and x['cpus_oneway'] in ((None,) if x['mode'] == 'memory' else (1, 2)) "
               "for x in d['bench']) "
               "and all((x['carrier'] is None) == (x['mode'] in ('memory', 'copy', "
               "'seqpacket')) for x in d['bench']) "
               "and all(x['carrier'] == ('socket' if x['label'].startswith('socket') else "
               "'ring') and x['spin_us'] == (30 if x['label'].endswith('+spin') else 0) "
               "and x['floor'] == ('cacheline' if x['label'].endswith('+spin') else 'futex') "
               "for x in d['bench'] if x['carrier'] is not None) "
               "and all((x['msgs_per_s_batch1'] is not None) == (x['label'] in ('inline', "
               "'inline+spin') and x['idle_ports'] == 0) for x in d['bench']) "
               "and all(x['msgs_per_s_batch1'] > 0 for x in d['bench'] "
               "if x['msgs_per_s_batch1'] is not None) "
               "and all(x['rtt_p50_seqpacket_ratio'] > 0 for x in d['bench'] "
               "if x['size'] < 2**20 and x['mode'] != 'memory') "
               "and d['spin_us'] == 30 and d['io'] in ('io_uring', 'epoll') "
               "and all(d['floors'][k]['rtt_p50_us'] > 0 and d['floors'][k]['trips'] > 0 "
               "for k in ('futex', 'cacheline')) "
               "and d['floors']['futex']['valid'] and d['floors']['cacheline']['valid'] == "
               "(d['floors']['cacheline']['rtt_p50_us'] < d['floors']['futex']['rtt_p50_us']) "
               "and len(d['targets']) == 5 + 2 * (d['io'] == 'io_uring') "
               "and all(t['ratio'] is not None for t in d['targets'][5:]) "
               "and all(t['op'] in ('<=', '>=') and (t['met'] == "
               "(t['ratio'] <= t['target'] if t['op'] == '<=' else t['ratio'] >= t['target']) "
               "if t['ratio'] is not None else not t['met']) for t in d['targets']) "
               "and sum(t['ratio'] is None for t in d['targets']) == "
               "(0 if d['floors']['cacheline']['valid'] else 1) "
               "and not any(x['failed'] for x in d['bench'])");
    run_free(&r);
}
