/* Private helpers shared by every layer of liblinuxshm. */
#ifndef LSHM_INTERNAL_H
#define LSHM_INTERNAL_H

#include <errno.h>
#include <stdarg.h>
#include <sys/types.h>
#include <time.h>

#include "linuxshm.h"

#define LSHM_EXPORT    __attribute__((visibility("default")))
#define likely(x)      __builtin_expect(!!(x), 1)
#define unlikely(x)    __builtin_expect(!!(x), 0)
#define ARRAY_SIZE(a)  (sizeof(a) / sizeof((a)[0]))

/*
 * Chunks go to the peer process and come back through its stores to the
 * free map: an order ThreadSanitizer cannot see, since it watches one
 * process.  Tell it: handing chunks over releases the segment, claiming
 * chunks acquires it.  Nothing at all outside a TSan build.
 */
#if defined(__SANITIZE_THREAD__)
#define LSHM_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define LSHM_TSAN 1
#endif
#endif
#ifdef LSHM_TSAN
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
#define lshm__tsan_acquire(p) __tsan_acquire(p)
#define lshm__tsan_release(p) __tsan_release(p)
#else
#define lshm__tsan_acquire(p) ((void)(p))
#define lshm__tsan_release(p) ((void)(p))
#endif

/* Milliseconds on CLOCK_MONOTONIC, for deadlines. */
static inline long long lshm__now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

/* A polite spin: tell the CPU we wait (the other hyperthread may run). */
static inline void lshm__cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Microseconds on CLOCK_MONOTONIC, for spin budgets. */
static inline long long lshm__now_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

/*
 * Record why the calling thread's last call failed, for lshm_last_error();
 * returns err so that a failure path reads "return lshm__fail(-EINVAL, ...)".
 */
int lshm__fail(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The text of the calling thread's last failure, or "" if none. */
const char *lshm__error_text(void);

/* Fill in what the kernel and the process offer (probe.c). */
int lshm__probe(struct lshm_probe *out);

/* err (-errno) in words, naming the limit it comes from when it is one
 * (RLIMIT_NOFILE, RLIMIT_FSIZE, RLIMIT_AS, vm.max_map_count, fs.file-max). */
const char *lshm__limit_text(int err);

/* The calling thread's id, cached (and forgotten in a forked child). */
pid_t lshm__thread_id(void);

/* Log one line to stderr when LSHM_DEBUG is set in the environment. */
void lshm__log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
