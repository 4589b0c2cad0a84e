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

/* Snapshot counts in .init, check them in .fini: nothing may be left. */
void leak_snapshot(void);
void leak_check(void);

/* Every test that can block gets a timeout; LTEST adds the leak check. */
#define LTEST(suite, name, ...) \
    Test(suite, name, .timeout = 60, .init = leak_snapshot, .fini = leak_check, ##__VA_ARGS__)

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
