/*
 * A stand-in for <criterion/criterion.h> used by `make tsan` only:
 * Criterion's runner cannot start under ThreadSanitizer (its inheritable
 * arena wants addresses TSan reserves), so the same test files are built
 * against this header and tests/tsan/runner.c instead.  It covers the part
 * of Criterion's API the suite uses; each test still runs in its own forked
 * process with its timeout, .init and .fini.
 */
#ifndef LSHM_TSAN_CRITERION_H
#define LSHM_TSAN_CRITERION_H

#include <stdbool.h>
#include <stddef.h>
#include <string.h>

struct shim_opts {
    double timeout;
    void (*init)(void);
    void (*fini)(void);
};

struct shim_test {
    const char       *suite;
    const char       *name;
    void            (*fn)(void);
    struct shim_opts  opts;
    struct shim_test *next;
};

void shim_register(struct shim_test *t);
void shim_check(bool ok, bool fatal, const char *file, int line, const char *expr,
                const char *fmt, ...);
void shim_skip(const char *fmt, ...) __attribute__((noreturn));
void shim_log(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define Test(suite, name, ...)                                                   \
    static void suite##_##name##_fn(void);                                       \
    static struct shim_test suite##_##name##_test = {                            \
        #suite, #name, suite##_##name##_fn, { __VA_ARGS__ }, NULL };             \
    __attribute__((constructor)) static void suite##_##name##_reg(void)          \
    {                                                                            \
        shim_register(&suite##_##name##_test);                                   \
    }                                                                            \
    static void suite##_##name##_fn(void)

#define SHIM_(fatal, cond, expr, ...) \
    shim_check((cond), (fatal), __FILE__, __LINE__, (expr), "" __VA_ARGS__)

#define cr_assert(c, ...)        SHIM_(true, !!(c), #c, __VA_ARGS__)
#define cr_expect(c, ...)        SHIM_(false, !!(c), #c, __VA_ARGS__)
#define cr_assert_not(c, ...)    SHIM_(true, !(c), "!(" #c ")", __VA_ARGS__)
#define cr_expect_not(c, ...)    SHIM_(false, !(c), "!(" #c ")", __VA_ARGS__)
#define cr_assert_fail(...)      SHIM_(true, false, "fail", __VA_ARGS__)

#define SHIM_CMP_(fatal, a, op, b, ...) SHIM_(fatal, (a) op (b), #a " " #op " " #b, __VA_ARGS__)
#define cr_assert_eq(a, b, ...)  SHIM_CMP_(true, a, ==, b, __VA_ARGS__)
#define cr_assert_neq(a, b, ...) SHIM_CMP_(true, a, !=, b, __VA_ARGS__)
#define cr_assert_lt(a, b, ...)  SHIM_CMP_(true, a, <, b, __VA_ARGS__)
#define cr_assert_leq(a, b, ...) SHIM_CMP_(true, a, <=, b, __VA_ARGS__)
#define cr_assert_gt(a, b, ...)  SHIM_CMP_(true, a, >, b, __VA_ARGS__)
#define cr_assert_geq(a, b, ...) SHIM_CMP_(true, a, >=, b, __VA_ARGS__)
#define cr_expect_eq(a, b, ...)  SHIM_CMP_(false, a, ==, b, __VA_ARGS__)
#define cr_expect_neq(a, b, ...) SHIM_CMP_(false, a, !=, b, __VA_ARGS__)
#define cr_expect_lt(a, b, ...)  SHIM_CMP_(false, a, <, b, __VA_ARGS__)
#define cr_expect_leq(a, b, ...) SHIM_CMP_(false, a, <=, b, __VA_ARGS__)
#define cr_expect_gt(a, b, ...)  SHIM_CMP_(false, a, >, b, __VA_ARGS__)
#define cr_expect_geq(a, b, ...) SHIM_CMP_(false, a, >=, b, __VA_ARGS__)

#define cr_assert_null(p, ...)      SHIM_(true, (p) == NULL, #p " == NULL", __VA_ARGS__)
#define cr_assert_not_null(p, ...)  SHIM_(true, (p) != NULL, #p " != NULL", __VA_ARGS__)
#define cr_expect_null(p, ...)      SHIM_(false, (p) == NULL, #p " == NULL", __VA_ARGS__)
#define cr_expect_not_null(p, ...)  SHIM_(false, (p) != NULL, #p " != NULL", __VA_ARGS__)

#define cr_assert_str_eq(a, b, ...)  SHIM_(true, strcmp((a), (b)) == 0, #a " eq " #b, __VA_ARGS__)
#define cr_assert_str_neq(a, b, ...) SHIM_(true, strcmp((a), (b)) != 0, #a " neq " #b, __VA_ARGS__)
#define cr_expect_str_eq(a, b, ...)  SHIM_(false, strcmp((a), (b)) == 0, #a " eq " #b, __VA_ARGS__)
#define cr_expect_str_neq(a, b, ...) SHIM_(false, strcmp((a), (b)) != 0, #a " neq " #b, __VA_ARGS__)
#define cr_assert_arr_eq(a, b, n, ...) \
    SHIM_(true, memcmp((a), (b), (n)) == 0, #a " == " #b, __VA_ARGS__)

#define cr_skip_test(...)  shim_skip("" __VA_ARGS__)
#define cr_log_info(...)   shim_log("info", __VA_ARGS__)
#define cr_log_warn(...)   shim_log("warn", __VA_ARGS__)

#endif
