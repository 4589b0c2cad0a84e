/* shmping: how the tool says what went wrong: one line on stderr, with the
 * library's own detail when it has one.  The bottom layer of the tool. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "shmping.h"

void err(const char *fmt, ...)
{
    va_list ap;

    fputs("shmping: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

const char *lib_why(int ret)
{
    static char buf[320];
    const char *detail = lshm_last_error();

    if (detail == NULL || detail[0] == '\0')
        return strerror(-ret);
    if (strstr(detail, strerror(-ret)) != NULL)
        return detail;
    snprintf(buf, sizeof(buf), "%s (%s)", strerror(-ret), detail);
    return buf;
}
