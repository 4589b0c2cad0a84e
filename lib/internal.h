/* Private helpers shared by every layer of liblinuxshm. */
#ifndef LSHM_INTERNAL_H
#define LSHM_INTERNAL_H

#include <errno.h>
#include <stdarg.h>

#include "linuxshm.h"

#define LSHM_EXPORT    __attribute__((visibility("default")))
#define likely(x)      __builtin_expect(!!(x), 1)
#define unlikely(x)    __builtin_expect(!!(x), 0)
#define ARRAY_SIZE(a)  (sizeof(a) / sizeof((a)[0]))

/*
 * Record why the calling thread's last call failed, for lshm_last_error();
 * returns err so that a failure path reads "return lshm_fail(-EINVAL, ...)".
 */
int lshm_fail(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Log one line to stderr when LSHM_DEBUG is set in the environment. */
void lshm_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
