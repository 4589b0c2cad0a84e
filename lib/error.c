/* The text of the calling thread's last failure (lshm_last_error()) and debug logging. */
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
