/*
 * Segments: create, seal and map a memfd; validate and map one a peer sent;
 * the chunk search of the allocator.
 */
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "shm.h"

#ifndef MFD_NOEXEC_SEAL
#define MFD_NOEXEC_SEAL 0x0008u
#endif
#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ  22
#define MADV_POPULATE_WRITE 23
#endif

#define SCRUB_BYTE 0xA5

/*
 * A peer flipping bits in a word can make every compare-and-swap lose; give
 * up after this many in one search rather than spin for it.  Honest
 * contention loses a handful at most.
 */
#define MAX_LOST_CAS 4096

bool lshm__chunk_get_free(uint64_t *map, uint32_t *c)
{
    uint32_t pos, lost = 0;
    uint64_t bits, mask;

    if (*c >= LSHM_CHUNK_COUNT)
        return false;
    pos = *c / 64;
    mask = ~0ull << (*c % 64);
    bits = __atomic_load_n(&map[pos], __ATOMIC_RELAXED);

    /* pos stays below LSHM_FREE_WORDS: the padding word is never read. */
    for (;;) {
        uint64_t avail = bits & mask;

        if (avail != 0) {
            unsigned bit = (unsigned)__builtin_ctzll(avail);

            if (__atomic_compare_exchange_n(&map[pos], &bits, bits & ~(1ull << bit),
                                            false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
                *c = pos * 64 + bit;
                return true;
            }
            /* Lost: bits now holds the word's new value; look at it again. */
            if (++lost >= MAX_LOST_CAS)
                return false;
            continue;
        }
        if (++pos >= LSHM_FREE_WORDS)
            return false;
        mask = ~0ull;
        bits = __atomic_load_n(&map[pos], __ATOMIC_RELAXED);
    }
}

void lshm__seg_shmem_thp(char *word, size_t len)
{
    char line[128], *open, *close;
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/shmem_enabled", "re");

    word[0] = '\0';
    if (f == NULL)
        return;
    if (fgets(line, sizeof(line), f) != NULL && (open = strchr(line, '[')) != NULL &&
        (close = strchr(open, ']')) != NULL && (size_t)(close - open - 1) < len)
        snprintf(word, len, "%.*s", (int)(close - open - 1), open + 1);
    fclose(f);
}

/*
 * Is shmem_enabled "advise"?  Then only a fault through a mapping marked
 * MADV_HUGEPAGE gets a huge page, never write(2).  Read once.
 */
static bool thp_by_advice_only(void)
{
    static _Atomic int known = -1;
    char word[16];

    if (known < 0) {
        lshm__seg_shmem_thp(word, sizeof(word));
        known = strcmp(word, "advise") == 0;
    }
    return known;
}

/*
 * Read a byte of each page: kernels before 5.14 have no MADV_POPULATE_*.
 * A read fault maps a page of a shared memfd mapping writable, and maps the
 * neighbours that are already in the file with it (fault-around).
 */
static int populate(void *mem, size_t len)
{
    volatile const uint8_t *p = mem;
    size_t page = (size_t)sysconf(_SC_PAGESIZE), off;

    if (madvise(mem, len, MADV_POPULATE_READ) == 0)
        return 0;
    if (errno != EINVAL)
        return -errno;
    for (off = 0; off < len; off += page)
        (void)p[off];
    return 0;
}

/* Zeros written to the file: its pages exist, each ready to map. */
static int write_zeros(int fd, size_t len)
{
    static uint8_t zeros[64 * 1024];    /* never written: the shared zero page */
    struct iovec iov[16];
    size_t off = 0, i;

    for (i = 0; i < ARRAY_SIZE(iov); i++)
        iov[i] = (struct iovec){ .iov_base = zeros, .iov_len = sizeof(zeros) };
    while (off < len) {
        ssize_t n = pwritev(fd, iov, ARRAY_SIZE(iov), (off_t)off);

        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? -errno : -EIO;
        off += (size_t)n;
    }
    return 0;
}

/*
 * Give a new segment all its pages now, so that no message pays a page
 * fault per 4 KiB the first time it lands there.  Writing zeros to the
 * file makes its pages without a fault each; mapping them is then one
 * fault per 16 pages (fault-around) instead of one per page.  Huge pages
 * are asked for first: they come where the machine allows them for shmem
 * (transparent_hugepage/shmem_enabled), and the request is ignored
 * elsewhere; under "advise" only a fault through the mapping gets them,
 * so the zeros are not written.  -ENOMEM (or another -errno) when the
 * memory is not there: better now than SIGBUS on a write later.
 */
static int populate_new(int fd, void *mem, size_t len)
{
    int ret;

    (void)madvise(mem, len, MADV_HUGEPAGE);
    if (!thp_by_advice_only()) {
        ret = write_zeros(fd, len);
        if (ret < 0)
            return ret;
    }
    return populate(mem, len);
}

static int make_memfd(const char *name)
{
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_NOEXEC_SEAL);

    /* Kernels before 6.3 reject the flag they do not know. */
    if (fd < 0 && errno == EINVAL)
        fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    return fd < 0 ? -errno : fd;
}

int lshm__memfd_new(const char *what, size_t size)
{
    /* Named so that /proc/PID/maps tells segments ("lshm") from rings. */
    int fd;
    struct rlimit rl;

    /* Above RLIMIT_FSIZE, ftruncate would raise SIGXFSZ, which kills. */
    if (getrlimit(RLIMIT_FSIZE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        rl.rlim_cur < size)
        return lshm__fail(-EFBIG, "%s of %zu bytes is above the file size limit "
                          "(RLIMIT_FSIZE %llu)", what, size, (unsigned long long)rl.rlim_cur);
    fd = make_memfd(strcmp(what, "segment") == 0 ? "lshm" : "lshm-ring");

    if (fd < 0)
        return lshm__fail(fd, "memfd_create: %s%s", lshm__limit_text(fd),
                          fd == -ENOSYS ? " (the kernel has no memfd; there is no fallback)"
                                        : "");
    if (ftruncate(fd, (off_t)size) < 0) {
        int ret = lshm__fail(-errno, "%s: ftruncate: %s", what, strerror(errno));

        close(fd);
        return ret;
    }
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
        int ret = lshm__fail(-errno, "%s: sealing: %s", what, strerror(errno));

        close(fd);
        return ret;
    }
    return fd;
}

int lshm__seg_create(uint32_t id, pid_t src, pid_t dst, uint16_t port_id,
                    struct lshm_seg **out)
{
    struct lshm_segment_header *hdr;
    struct lshm_seg *seg;
    void *mem;
    int fd, ret;

    seg = calloc(1, sizeof(*seg));
    if (seg == NULL)
        return lshm__fail(-ENOMEM, "segment: out of memory");

    fd = lshm__memfd_new("segment", LSHM_SEGMENT_SIZE);
    if (fd < 0) {
        ret = fd;
        goto fail_free;
    }
    mem = mmap(NULL, LSHM_SEGMENT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (mem == MAP_FAILED) {
        ret = lshm__fail(-errno, "segment: mmap: %s", lshm__limit_text(-errno));
        goto fail_close;
    }
    /* A forked child must not keep the peer's memory (or its pages) alive. */
    if (madvise(mem, LSHM_SEGMENT_SIZE, MADV_DONTFORK) < 0) {
        ret = lshm__fail(-errno, "segment: madvise: %s", strerror(errno));
        goto fail_unmap;
    }
    ret = populate_new(fd, mem, LSHM_SEGMENT_SIZE);
    if (ret < 0) {
        lshm__fail(ret, "segment: populating its %u bytes: %s", LSHM_SEGMENT_SIZE,
                  strerror(-ret));
        goto fail_unmap;
    }

    /* A fresh memfd reads as zeros: oosm, the paddings and tracking[] are 0. */
    hdr = mem;
    hdr->magic = LSHM_MAGIC;
    hdr->version = LSHM_SEGMENT_VERSION;
    hdr->sent_over = port_id;
    hdr->id = id;
    hdr->src_pid = src;
    hdr->dst_pid = dst;
    memset(hdr->free_map, 0xff, sizeof(hdr->free_map));
    memset(hdr->free_tracking_map, 0xff, sizeof(hdr->free_tracking_map));

    seg->hdr = hdr;
    seg->data = (uint8_t *)mem + LSHM_HEADER_SIZE;
    seg->id = id;
    seg->src_pid = src;
    seg->dst_pid = dst;
    seg->fd = fd;
    atomic_init(&seg->use, 1);
    *out = seg;
    return 0;

fail_unmap:
    munmap(mem, LSHM_SEGMENT_SIZE);
fail_close:
    close(fd);
fail_free:
    free(seg);
    return ret;
}

/*
 * Seals cannot tell a memfd made without MFD_ALLOW_SEALING from another
 * tmpfs file; its name can.  Without /proc, the seals check still stands.
 */
static bool fd_is_other_file(int fd)
{
    char path[64], target[64];
    ssize_t n;

    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    n = readlink(path, target, sizeof(target) - 1);
    if (n < 0)
        return false;
    target[n] = '\0';
    return strncmp(target, "/memfd:", 7) != 0;
}

int lshm__memfd_check(int fd, size_t size)
{
    struct stat st;
    int seals;

    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
        return -EBADF;
    seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0)
        return errno == EINVAL ? -EOPNOTSUPP : -errno;
    if (fd_is_other_file(fd))
        return -EOPNOTSUPP;
    if ((seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW))
        return -EPERM;
    if (seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE))
        return -EACCES;
    /* Only now that the size is sealed does it stay what fstat says. */
    if (fstat(fd, &st) < 0)
        return -errno;
    if (st.st_size != (off_t)size)
        return -EMSGSIZE;
    return 0;
}

int lshm__seg_import(int fd, uint32_t id, pid_t src, pid_t dst, struct lshm_seg **out)
{
    struct lshm_segment_header *hdr;
    struct lshm_seg *seg;
    void *mem;
    int ret;

    ret = lshm__memfd_check(fd, LSHM_SEGMENT_SIZE);
    if (ret < 0)
        return ret;

    seg = calloc(1, sizeof(*seg));
    if (seg == NULL)
        return -ENOMEM;
    mem = mmap(NULL, LSHM_SEGMENT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (mem == MAP_FAILED) {
        ret = -errno;
        goto fail_free;
    }

    /* Each field is read once: the sender can rewrite them under us. */
    hdr = mem;
    if (__atomic_load_n(&hdr->magic, __ATOMIC_RELAXED) != LSHM_MAGIC)
        ret = -EPROTO;
    else if (__atomic_load_n(&hdr->version, __ATOMIC_RELAXED) != LSHM_SEGMENT_VERSION)
        ret = -EPROTONOSUPPORT;
    else if (__atomic_load_n(&hdr->id, __ATOMIC_RELAXED) != id)
        ret = -ERANGE;
    else if (__atomic_load_n(&hdr->src_pid, __ATOMIC_RELAXED) != src)
        ret = -ESRCH;
    else if (__atomic_load_n(&hdr->dst_pid, __ATOMIC_RELAXED) != dst)
        ret = -ENXIO;
    else if (madvise(mem, LSHM_SEGMENT_SIZE, MADV_DONTFORK) < 0)
        ret = -errno;
    else
        ret = populate(mem, LSHM_SEGMENT_SIZE);
    if (ret < 0)
        goto fail_unmap;

    __atomic_store_n(&hdr->sent_over, (uint16_t)LSHM_SENT_OVER_ANY, __ATOMIC_RELEASE);
    seg->hdr = hdr;
    seg->data = (uint8_t *)mem + LSHM_HEADER_SIZE;
    seg->id = id;
    seg->src_pid = src;
    seg->dst_pid = dst;
    seg->fd = -1;
    atomic_init(&seg->use, 1);
    *out = seg;
    return 0;

fail_unmap:
    munmap(mem, LSHM_SEGMENT_SIZE);
fail_free:
    free(seg);
    return ret;
}

const char *lshm__seg_strerror(int err)
{
    switch (err) {
    case 0:
        return "segment accepted";
    case -EBADF:
        return "segment fd is not a regular file";
    case -EOPNOTSUPP:
        return "segment fd is not a memfd";
    case -EPERM:
        return "segment is not sealed against shrinking and growing";
    case -EACCES:
        return "segment cannot be mapped for writing (write seal or read-only fd)";
    case -EMSGSIZE:
        return "segment has the wrong size";
    case -EPROTO:
        return "segment header has a bad magic number";
    case -EPROTONOSUPPORT:
        return "segment header has an unsupported version";
    case -ERANGE:
        return "segment id is not the next one expected";
    case -ESRCH:
        return "segment source pid is not the sending peer";
    case -ENXIO:
        return "segment destination pid is not this process";
    case -ENOMEM:
        return "out of memory or address space mapping the segment (RLIMIT_AS, "
               "vm.max_map_count)";
    default:
        return "segment cannot be mapped";
    }
}

void lshm__seg_ref(struct lshm_seg *seg)
{
    atomic_fetch_add_explicit(&seg->use, 1, memory_order_relaxed);
}

void lshm__seg_unref(struct lshm_seg *seg)
{
    if (seg == NULL)
        return;
    /* Release our uses of the mapping before the last owner unmaps it. */
    if (atomic_fetch_sub_explicit(&seg->use, 1, memory_order_acq_rel) != 1)
        return;
    if (seg->hdr != NULL)
        munmap(seg->hdr, LSHM_SEGMENT_SIZE);
    if (seg->fd >= 0)
        close(seg->fd);
    free(seg);
}

void lshm__seg_close_fd(struct lshm_seg *seg)
{
    if (seg->fd >= 0) {
        close(seg->fd);
        seg->fd = -1;
    }
}

void lshm__seg_free_chunks(struct lshm_seg *seg, uint32_t chunk, uint32_t nchunks)
{
    if (chunk >= LSHM_CHUNK_COUNT)
        return;
    if (nchunks > LSHM_CHUNK_COUNT - chunk)
        nchunks = LSHM_CHUNK_COUNT - chunk;
    /* Scrub while the chunks are still ours: once a bit is set they are not. */
    if (seg->scrub)
        memset(seg->data + (size_t)chunk * LSHM_CHUNK_SIZE, SCRUB_BYTE,
               (size_t)nchunks * LSHM_CHUNK_SIZE);
    lshm__chunks_set_free(seg->hdr->free_map, chunk, nchunks);
}

bool lshm__seg_take_oosm(struct lshm_seg *seg)
{
    uint32_t one = 1;

    return __atomic_compare_exchange_n(&seg->hdr->oosm, &one, 0, false,
                                       __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
}
