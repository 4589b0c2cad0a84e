/* The text of the calling thread's last failure (lshm_last_error()), debug logging,
 * and the calling thread's id. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "internal.h"

static __thread char last_error[256];

int lshm__fail(int err, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(last_error, sizeof(last_error), fmt, ap);
    va_end(ap);
    lshm__log("%s", last_error);
    return err;
}

const char *lshm__error_text(void)
{
    return last_error;
}

LSHM_EXPORT const char *lshm_last_error(void)
{
    return last_error;
}

void lshm__log(const char *fmt, ...)
{
    static _Atomic int enabled = -1;
    char line[512];
    va_list ap;

    if (enabled < 0)
        enabled = getenv("LSHM_DEBUG") != NULL;
    if (!enabled)
        return;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    fprintf(stderr, "linuxshm[%d]: %s\n", (int)getpid(), line);
}

/* A thread's id costs a system call: cache it, and forget it in a forked
 * child, whose one thread has a new id. */
static __thread pid_t this_tid;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void forget_tid(void)
{
    this_tid = 0;
}

static void register_atfork(void)
{
    pthread_atfork(NULL, NULL, forget_tid);
}

pid_t lshm__thread_id(void)
{
    if (unlikely(this_tid == 0)) {
        pthread_once(&atfork_once, register_atfork);
        this_tid = gettid();
    }
    return this_tid;
}

const char *lshm__limit_text(int err)
{
    static __thread char text[160];
    struct rlimit rl;
    int res = -1;

    switch (err) {
    case -EMFILE:
        res = RLIMIT_NOFILE;
        break;
    case -EFBIG:
        res = RLIMIT_FSIZE;
        break;
    case -ENFILE:
        return "the system's file table is full (fs.file-max)";
    case -ENOMEM:
        if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
            snprintf(text, sizeof(text), "out of memory or address space (RLIMIT_AS %llu "
                     "bytes), or of mappings (vm.max_map_count)",
                     (unsigned long long)rl.rlim_cur);
            return text;
        }
        return "out of memory, or of mappings (vm.max_map_count)";
    default:
        return strerror(-err);
    }
    if (getrlimit(res, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
        snprintf(text, sizeof(text), "%s: the process is at its limit (%s %llu)",
                 strerror(-err), res == RLIMIT_NOFILE ? "RLIMIT_NOFILE" : "RLIMIT_FSIZE",
                 (unsigned long long)rl.rlim_cur);
    else
        snprintf(text, sizeof(text), "%s", strerror(-err));
    return text;
}
