/*
 * The harness checks itself, as Wayland's sanity tests do: the leak check
 * that LTEST runs after each test (leak_check, common.c) must fail a test
 * that leaks an fd or a memfd mapping, and pass the same test when it gives
 * everything back.  The test that leaks runs in a second copy of this
 * program, told by LSHM_LEAK what to keep.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"

#define LEAKER "harness/leaks_what_LSHM_LEAK_names"

/*
 * Makes an fd and a mapping of a memfd, checks that the counts saw both, and
 * gives both back, except what LSHM_LEAK names: "fd" (the fd stays open) or
 * "map" (the mapping stays).  Unset, it is the control: nothing leaks and the
 * leak check must pass.
 */
LTEST(harness, leaks_what_LSHM_LEAK_names)
{
    const char *leak = getenv("LSHM_LEAK");
    int fds0 = count_fds(), maps0 = count_maps("memfd:");
    int fd = memfd_create("lshm-harness", MFD_CLOEXEC);
    void *p;

    cr_assert_geq(fd, 0, "memfd_create: %s", strerror(errno));
    cr_assert_eq(ftruncate(fd, 4096), 0);
    p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    cr_assert_neq(p, MAP_FAILED);
    cr_assert_eq(count_fds(), fds0 + 1, "the new fd is not counted");
    cr_assert_eq(count_maps("memfd:"), maps0 + 1, "the memfd mapping is not counted");
    if (leak == NULL || strcmp(leak, "map") != 0)
        munmap(p, 4096);
    if (leak == NULL || strcmp(leak, "fd") != 0)
        close(fd);
}

/*
 * Run LEAKER alone in a copy of this program (LSHM_LEAK = leak, or unset when
 * NULL); its output (stdout and stderr) into out, its wait status returned.
 */
static int run_leaker(const char *leak, char *out, size_t cap)
{
    char *argv[] = { "run", "--filter", LEAKER, NULL };
    size_t len = 0;
    int pfd[2], status;
    long long end;
    pid_t pid;

    cr_assert_eq(pipe2(pfd, O_CLOEXEC), 0);
    fflush(NULL);
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        dup2(pfd[1], STDOUT_FILENO);
        dup2(pfd[1], STDERR_FILENO);
        /* Criterion marks its workers with BXFI_MAP: the copy is a runner. */
        unsetenv("BXFI_MAP");
        if (leak != NULL)
            setenv("LSHM_LEAK", leak, 1);
        else
            unsetenv("LSHM_LEAK");
        execv("/proc/self/exe", argv);
        _exit(127);
    }
    close(pfd[1]);
    end = now_ms() + 30000;
    for (;;) {
        struct pollfd q = { .fd = pfd[0], .events = POLLIN };
        ssize_t n;

        cr_assert_lt(now_ms(), end, "the copy running " LEAKER " did not finish");
        if (poll(&q, 1, 1000) <= 0)
            continue;
        n = read(pfd[0], out + len, cap - 1 - len);
        if (n <= 0)
            break;
        len += (size_t)n;
        if (len == cap - 1)
            break;
    }
    out[len] = '\0';
    close(pfd[0]);
    status = wait_child(pid, 10000);
    cr_assert_neq(status, -1, "the copy running " LEAKER " did not exit");
    return status;
}

/* The copy ran exactly the one test: Criterion's summary, or tests/tsan's. */
static bool ran_one(const char *out)
{
    return strstr(out, "Tested: 1 ") != NULL || strstr(out, "tsan: 1 passed") != NULL ||
           strstr(out, "tsan: 0 passed, 1 failed") != NULL;
}

LTEST(harness, leak_check_passes_a_test_that_gives_everything_back)
{
    static char out[16384];
    int status = run_leaker(NULL, out, sizeof(out));

    cr_assert(ran_one(out), "the copy did not run " LEAKER ":\n%s", out);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "the control failed (status %#x):\n%s", status, out);
    cr_assert_null(strstr(out, "leaked"), "a leak reported without one:\n%s", out);
}

LTEST(harness, leak_check_fails_a_test_that_leaks_an_fd)
{
    static char out[16384];
    int status = run_leaker("fd", out, sizeof(out));

    cr_assert(ran_one(out), "the copy did not run " LEAKER ":\n%s", out);
    cr_assert(!(WIFEXITED(status) && WEXITSTATUS(status) == 0),
              "a leaked fd passed the leak check:\n%s", out);
    cr_assert_not_null(strstr(out, "fds leaked"), "no fd leak reported:\n%s", out);
    cr_assert_null(strstr(out, "memfd mappings leaked"), "a mapping leak reported:\n%s", out);
}

LTEST(harness, leak_check_fails_a_test_that_leaks_a_memfd_mapping)
{
    static char out[16384];
    int status = run_leaker("map", out, sizeof(out));

    cr_assert(ran_one(out), "the copy did not run " LEAKER ":\n%s", out);
    cr_assert(!(WIFEXITED(status) && WEXITSTATUS(status) == 0),
              "a leaked memfd mapping passed the leak check:\n%s", out);
    cr_assert_not_null(strstr(out, "memfd mappings leaked"), "no mapping leak reported:\n%s",
                       out);
    cr_assert_null(strstr(out, "fds leaked"), "an fd leak reported:\n%s", out);
}
