/*
 * shmping --bench's floors: the least a round trip between two processes
 * can cost, measured between the same two kinds of process as every other
 * row (this one and a forked child), with no payload and no library.
 *
 * futex:      one 32-bit word in a MAP_SHARED page; each side stores the
 *             next value, FUTEX_WAKEs the other and FUTEX_WAITs for its
 *             answer: the floor of a transport whose waits sleep.
 * cache line: two words on cache lines of their own, each written by one
 *             side and spun on by the other: the floor of busy-poll.
 *
 * Each round trip is one sample (a clock read, some 20 ns, included), so
 * that the median is the trip of two processes that both hold a CPU even
 * where they often do not.  A spinner that has waited YIELD_NS yields its
 * CPU, so that two processes on one CPU still take turns.
 */
#include <errno.h>
#include <sched.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "shmping.h"

#define YIELD_NS    1000000ull      /* a spinner waiting this long yields */
#define STALL_NS    2000000000ull   /* the other side silent this long: give up */
#define FLOOR_STOP  UINT32_MAX      /* the parent's last value: the child exits */

struct floor_page {
    _Alignas(64) _Atomic uint32_t ping;     /* written by the parent */
    _Alignas(64) _Atomic uint32_t pong;     /* written by the child (cache line) */
};

static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void futex_wake(_Atomic uint32_t *w)
{
    syscall(SYS_futex, w, FUTEX_WAKE, 1, NULL, NULL, 0);
}

/* Sleep while *w holds v, at most 100 ms at a time. */
static void futex_wait(_Atomic uint32_t *w, uint32_t v)
{
    struct timespec ts = { .tv_sec = 0, .tv_nsec = 100000000 };

    syscall(SYS_futex, w, FUTEX_WAIT, v, &ts, NULL, 0);
}

/*
 * futex: one word.  The parent stores odd values (2k + 1), the child
 * answers with the even one after it; whoever waits sleeps on the word.
 * Returns the value the word settled on: want, FLOOR_STOP, or anything
 * else after STALL_NS.
 */
static uint32_t futex_await(_Atomic uint32_t *w, uint32_t want)
{
    uint64_t start = 0;

    for (;;) {
        uint32_t v = atomic_load_explicit(w, memory_order_acquire);

        if (v == want || v == FLOOR_STOP)
            return v;
        if (start == 0)
            start = now_ns();
        else if (now_ns() - start > STALL_NS)
            return v;
        futex_wait(w, v);
    }
}

/* cache line: spin until *w holds want (or FLOOR_STOP, or a stall). */
static uint32_t spin_await(_Atomic uint32_t *w, uint32_t want)
{
    uint64_t start = 0;

    for (unsigned i = 1;; i++) {
        uint32_t v = atomic_load_explicit(w, memory_order_acquire);

        if (v == want || v == FLOOR_STOP)
            return v;
        if ((i & 0xff) == 0) {
            uint64_t now = now_ns();

            if (start == 0)
                start = now;
            else if (now - start > STALL_NS)
                return v;
            else if (now - start > YIELD_NS)
                sched_yield();
        }
        cpu_relax();
    }
}

static void floor_child(enum floor_kind kind, struct floor_page *pg)
{
    for (uint32_t k = 0;; k++) {
        uint32_t ping = 2 * k + 1;

        if (kind == FLOOR_FUTEX) {
            if (futex_await(&pg->ping, ping) != ping)
                _exit(0);
            atomic_store_explicit(&pg->ping, ping + 1, memory_order_release);
            futex_wake(&pg->ping);
        } else {
            if (spin_await(&pg->ping, ping) != ping)
                _exit(0);
            atomic_store_explicit(&pg->pong, ping, memory_order_release);
        }
    }
}

/* One round trip k from the parent's side: false if the child is gone. */
static bool floor_trip(enum floor_kind kind, struct floor_page *pg, uint32_t k)
{
    uint32_t ping = 2 * k + 1;

    atomic_store_explicit(&pg->ping, ping, memory_order_release);
    if (kind == FLOOR_FUTEX) {
        futex_wake(&pg->ping);
        return futex_await(&pg->ping, ping + 1) == ping + 1;
    }
    return spin_await(&pg->pong, ping) == ping;
}

int floor_run(enum floor_kind kind, double seconds, struct floor_result *out)
{
    struct results res = { 0 };
    struct rtt_summary s;
    struct floor_page *pg;
    uint64_t start, end;
    uint32_t k = 0;
    bool ok = true;
    pid_t pid;
    int status;

    memset(out, 0, sizeof(*out));
    pg = mmap(NULL, sizeof(*pg), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (pg == MAP_FAILED) {
        err("floor: mmap: %s", strerror(errno));
        return -errno;
    }
    atomic_init(&pg->ping, 0);
    atomic_init(&pg->pong, 0);
    fflush(stdout);
    fflush(stderr);
    pid = fork();
    if (pid < 0) {
        int e = errno;

        err("floor: fork: %s", strerror(e));
        munmap(pg, sizeof(*pg));
        return -e;
    }
    if (pid == 0) {
        peer_signals();
        floor_child(kind, pg);
        _exit(0);
    }
    /* The first trip, untimed, waits for the child to be there. */
    ok = floor_trip(kind, pg, k++);
    start = now_ns();
    end = start + (uint64_t)(seconds * 1e9);
    while (ok && !stop_requested) {
        uint64_t t0 = now_ns(), t1;

        ok = floor_trip(kind, pg, k++);
        t1 = now_ns();
        if (ok && results_add_rtt(&res, (double)(t1 - t0) / 1e3) < 0) {
            err("floor: out of memory for samples");
            ok = false;
        }
        if (t1 >= end)
            break;
    }
    atomic_store_explicit(&pg->ping, FLOOR_STOP, memory_order_release);
    futex_wake(&pg->ping);
    status = reap_child(pid);
    munmap(pg, sizeof(*pg));
    if (!ok)
        err("floor: the child stopped answering (%s ping-pong)",
            kind == FLOOR_FUTEX ? "futex" : "cache-line");
    else if (status != 0)
        err("floor: the child failed (status %d)", status);
    if (!ok || status != 0 || res.nrtt == 0) {
        results_free(&res);
        return -EIO;
    }
    rtt_summarize(&res, &s);
    out->p50_us = s.p50;
    out->avg_us = s.avg;
    out->trips = res.nrtt;
    results_free(&res);
    return 0;
}
