/* Shared by the test files: timeouts, fd and mapping counts, fork helpers. */
#ifndef LSHM_TESTS_COMMON_H
#define LSHM_TESTS_COMMON_H

#include <criterion/criterion.h>
#include <stdbool.h>
#include <sys/types.h>

/* Open fds of this process (counted in /proc/self/fd). */
int count_fds(void);
/* Mappings of this process whose line in /proc/self/maps contains what
 * (NULL: all of them); memfd segments show as "/memfd:lshm". */
int count_maps(const char *what);
/* What count_maps() matches for segments alone (message rings are
 * "memfd:lshm-ring"; every memfd mapping: "memfd:"). */
#define SEG_MAPS "memfd:lshm (deleted)"

/* Snapshot the counts before a test, check them after: nothing may be left. */
void leak_snapshot(void);
void leak_check(void);

/*
 * Every test that can block gets a timeout; LTEST adds the leak check.  The
 * check runs in the test itself, after its body: Criterion reports a failed
 * assertion in a .fini but still counts the test as passed
 * (test_harness.c proves that a leak fails an LTEST).
 */
#define LTEST(suite, name, ...)                                   \
    static void suite##_##name##_body(void);                      \
    Test(suite, name, .timeout = 60, ##__VA_ARGS__)               \
    {                                                             \
        leak_snapshot();                                          \
        suite##_##name##_body();                                  \
        leak_check();                                             \
    }                                                             \
    static void suite##_##name##_body(void)

/* Wait for pid with a bound (ms); returns its wait status, or -1 on timeout
 * (the child is then killed). */
int wait_child(pid_t pid, int timeout_ms);

/* Milliseconds on CLOCK_MONOTONIC. */
long long now_ms(void);

/* Skip the calling test, saying why, when contexts made with these params
 * (NULL: defaults) run on the epoll carrier: io_uring refused here (the
 * suite's second pass runs under tests/noiouring) or LSHM_NO_IO_URING set.
 * For tests about io_uring itself or what only it does. */
void require_io_uring(unsigned ctx_flags);

#endif
