/* The error text of lshm_last_error(), debug logging and the version call. */
#include <stdio.h>
#include <stdlib.h>
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

#define STR2(x) #x
#define STR(x) STR2(x)

LSHM_EXPORT const char *lshm_version(void)
{
    return STR(LSHM_VERSION_MAJOR) "." STR(LSHM_VERSION_MINOR) "." STR(LSHM_VERSION_PATCH);
}
