#include "common.h"
#include "linuxshm.h"

#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int fds_before = -1;
static int maps_before = -1;

int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int n = 0;

    if (d == NULL)
        return -1;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1;   /* the directory's own fd */
}

int count_maps(const char *what)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    int n = 0;

    if (f == NULL)
        return -1;
    while (fgets(line, sizeof(line), f) != NULL)
        if (what == NULL || strstr(line, what) != NULL)
            n++;
    fclose(f);
    return n;
}

void leak_snapshot(void)
{
    fds_before = count_fds();
    maps_before = count_maps("memfd:");
}

void leak_check(void)
{
    int fds = count_fds(), maps = count_maps("memfd:");

    cr_expect_eq(fds, fds_before, "fds leaked: %d before, %d after", fds_before, fds);
    cr_expect_eq(maps, maps_before, "memfd mappings leaked: %d before, %d after",
                 maps_before, maps);
}

int wait_child(pid_t pid, int timeout_ms)
{
    long long end = now_ms() + timeout_ms;
    int status;

    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid)
            return status;
        if (r < 0)
            return -1;
        if (now_ms() > end) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            return -1;
        }
        usleep(1000);
    }
}

long long now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

void require_io_uring(unsigned ctx_flags)
{
    struct lshm_ctx_params prm = { .flags = ctx_flags };
    struct lshm_ctx *ctx;
    char why[256];
    int ret = lshm_ctx_new(&ctx, &prm);

    cr_assert_eq(ret, 0, "lshm_ctx_new: %d %s", ret, lshm_last_error());
    snprintf(why, sizeof(why), "%s", lshm_ctx_carrier(ctx));
    ret = (lshm_ctx_features(ctx) & LSHM_FEAT_EPOLL) != 0;
    lshm_ctx_free(ctx);
    if (ret)
        cr_skip_test("needs io_uring; contexts here run on %s", why);
}
