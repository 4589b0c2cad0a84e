/*
 * What the kernel and the process offer: kernel release, memfd and sealing,
 * resource limits, capabilities (libcap), and through the ring layer whether
 * io_uring can be used and with which set-up flags and opcodes, and which
 * carrier a context runs on.
 */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/capability.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/utsname.h>
#include <unistd.h>

#include "port.h"

/* Linux 6.3+; glibc headers of older systems lack it. */
#ifndef MFD_NOEXEC_SEAL
#define MFD_NOEXEC_SEAL 0x0008u
#endif

#define PROBE_SEALS (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)

static void probe_memfd(struct lshm_probe *p)
{
    int fd = memfd_create("lshm-probe", MFD_CLOEXEC | MFD_ALLOW_SEALING);

    if (fd < 0)
        return;
    p->memfd = true;
    /* A segment is sized before it is sealed; probe the same order. */
    if (ftruncate(fd, LSHM_HEADER_SIZE) == 0 && fcntl(fd, F_ADD_SEALS, PROBE_SEALS) == 0) {
        int seals = fcntl(fd, F_GET_SEALS);
        p->sealing = seals >= 0 && (seals & PROBE_SEALS) == PROBE_SEALS;
    }
    close(fd);

    fd = memfd_create("lshm-probe", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_NOEXEC_SEAL);
    if (fd >= 0) {
        p->noexec_seal = true;
        close(fd);
    }
}

static uint64_t rlim_value(rlim_t v)
{
    return v == RLIM_INFINITY ? UINT64_MAX : (uint64_t)v;
}

static void probe_limits(struct lshm_probe *p)
{
    struct rlimit rl;
    FILE *f;

    if (getrlimit(RLIMIT_MEMLOCK, &rl) == 0) {
        p->memlock_cur = rlim_value(rl.rlim_cur);
        p->memlock_max = rlim_value(rl.rlim_max);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        p->nofile_cur = rlim_value(rl.rlim_cur);
        p->nofile_max = rlim_value(rl.rlim_max);
    }

    p->max_map_count = -1;
    f = fopen("/proc/sys/vm/max_map_count", "re");
    if (f != NULL) {
        long v;
        if (fscanf(f, "%ld", &v) == 1 && v >= 0)
            p->max_map_count = v;
        fclose(f);
    }
}

/* cap_to_text() form, "=" when the process holds none; "" if unknown. */
static void probe_caps(struct lshm_probe *p)
{
    cap_t caps = cap_get_proc();
    char *text;

    if (caps == NULL)
        return;
    text = cap_to_text(caps, NULL);
    if (text != NULL) {
        snprintf(p->caps, sizeof(p->caps), "%s", text);
        cap_free(text);
    }
    cap_free(caps);
}

LSHM_EXPORT int lshm_probe(struct lshm_probe *out)
{
    struct utsname u;
    int ret;

    if (out == NULL)
        return lshm__fail(-EINVAL, "lshm_probe: out is NULL");
    memset(out, 0, sizeof(*out));

    if (uname(&u) == 0)
        snprintf(out->kernel, sizeof(out->kernel), "%s", u.release);
    probe_memfd(out);
    probe_limits(out);
    probe_caps(out);

    ret = lshm__ring_probe(out);
    if (ret < 0 && out->io_uring == 0) {
        /* The ring layer could not even look: report that, not "available". */
        out->io_uring = ret;
        snprintf(out->io_uring_why, sizeof(out->io_uring_why), "%s",
                 lshm_last_error()[0] != '\0' ? lshm_last_error() : strerror(-ret));
    }
    if (out->noexec_seal)
        out->features |= LSHM_FEAT_NOEXEC_SEAL;
    return 0;
}

LSHM_EXPORT const char *lshm_ctx_carrier(const struct lshm_ctx *ctx)
{
    if (ctx == NULL)
        return "";
    return lshm__ring_carrier(ctx->ring);
}
