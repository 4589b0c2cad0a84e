/*
 * The runner behind tests/tsan/criterion/criterion.h: forks each test,
 * arms its timeout, runs .init, the test and .fini, and ends with the line
 * "tsan: N passed, M failed, K skipped".  --filter takes a glob on
 * "suite/name" as Criterion's does.
 */
#include <criterion/criterion.h>
#include <fnmatch.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#define EXIT_SKIP 77

static struct shim_test *tests, **tail = &tests;
static bool failed;

void shim_register(struct shim_test *t)
{
    *tail = t;
    tail = &t->next;
}

void shim_check(bool ok, bool fatal, const char *file, int line, const char *expr,
                const char *fmt, ...)
{
    va_list ap;

    if (ok)
        return;
    fprintf(stderr, "%s:%d: %s: ", file, line, fatal ? "assertion failed" : "expectation failed");
    if (fmt[0] != '\0') {
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
    } else {
        fputs(expr, stderr);
    }
    fputc('\n', stderr);
    failed = true;
    if (fatal)
        _exit(1);
}

void shim_skip(const char *fmt, ...)
{
    va_list ap;

    fputs("skipped: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    _exit(EXIT_SKIP);
}

void shim_log(const char *level, const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "[%s] ", level);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

static int run_one(const struct shim_test *t)
{
    int status;
    pid_t pid;

    fflush(NULL);
    pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        alarm(t->opts.timeout > 0 ? (unsigned)t->opts.timeout : 120);
        if (t->opts.init != NULL)
            t->opts.init();
        t->fn();
        if (t->opts.fini != NULL)
            t->opts.fini();
        fflush(NULL);
        _exit(failed ? 1 : 0);
    }
    while (waitpid(pid, &status, 0) < 0)
        ;
    return status;
}

int main(int argc, char **argv)
{
    const char *filter = "*";
    unsigned passed = 0, nfailed = 0, skipped = 0;
    struct shim_test *t;
    int i;

    for (i = 1; i < argc; i++) {
        if (strncmp(argv[i], "--filter=", 9) == 0)
            filter = argv[i] + 9;
        else if (strcmp(argv[i], "--filter") == 0 && i + 1 < argc)
            filter = argv[++i];
    }
    for (t = tests; t != NULL; t = t->next) {
        char id[256];
        int status;

        snprintf(id, sizeof(id), "%s/%s", t->suite, t->name);
        if (fnmatch(filter, id, FNM_EXTMATCH) != 0)
            continue;
        status = run_one(t);
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
            passed++;
        } else if (WIFEXITED(status) && WEXITSTATUS(status) == EXIT_SKIP) {
            skipped++;
            printf("[SKIP] %s\n", id);
        } else {
            nfailed++;
            if (WIFSIGNALED(status))
                printf("[FAIL] %s: killed by signal %d%s\n", id, WTERMSIG(status),
                       WTERMSIG(status) == SIGALRM ? " (timeout)" : "");
            else
                printf("[FAIL] %s: exit status %d\n", id, WEXITSTATUS(status));
        }
    }
    printf("tsan: %u passed, %u failed, %u skipped\n", passed, nfailed, skipped);
    return nfailed ? 1 : 0;
}
