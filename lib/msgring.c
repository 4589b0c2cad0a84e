/*
 * Message rings: layout, producer and consumer (linuxshm-protocol(7),
 * "Wire protocol, version 2").  The other side can write every byte of the
 * ring at any time, so each side keeps private copies of what it owns or
 * validated, reads a shared counter once per decision, and bounds it before
 * use: nothing read from the ring can make this code touch memory outside
 * it.
 */
#include <linux/futex.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "msgring.h"
#include "shm.h"

#define NO_WAKE  UINT64_MAX

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/* Map every page of the ring now, not one fault per page on the message
 * path (Linux 5.14+; elsewhere the pages fault in as they are used). */
static void populate(void *mem, size_t len)
{
    (void)madvise(mem, len, MADV_POPULATE_WRITE);
}

static size_t map_size(uint32_t size)
{
    return (size_t)LSHM_RING_HEADER_SIZE + size;
}

static uint64_t load_acquire(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

int lshm__msgring_create(struct lshm_msgring *r, uint32_t size, uint16_t port_id,
                         pid_t src, pid_t dst)
{
    struct lshm_msgring_header *hdr;
    void *mem;
    int fd, ret;

    if (!lshm__ring_size_is_valid(size))
        return lshm__fail(-EINVAL, "ring: size %u is not a power of two from %u to %u",
                          size, LSHM_RING_SIZE_MIN, LSHM_RING_SIZE_MAX);
    fd = lshm__memfd_new("ring", map_size(size));
    if (fd < 0)
        return fd;
    mem = mmap(NULL, map_size(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (mem == MAP_FAILED) {
        ret = lshm__fail(-errno, "ring: mmap: %s", lshm__limit_text(-errno));
        close(fd);
        return ret;
    }
    if (madvise(mem, map_size(size), MADV_DONTFORK) < 0) {
        ret = lshm__fail(-errno, "ring: madvise: %s", strerror(errno));
        munmap(mem, map_size(size));
        close(fd);
        return ret;
    }

    populate(mem, map_size(size));
    /* A fresh memfd reads as zeros: tail, head, wake and space are 0. */
    hdr = mem;
    hdr->magic = LSHM_RING_MAGIC;
    hdr->version = LSHM_RING_VERSION;
    hdr->port_id = port_id;
    hdr->size = size;
    hdr->src_pid = src;
    hdr->dst_pid = dst;

    memset(r, 0, sizeof(*r));
    r->hdr = hdr;
    r->data = (uint8_t *)mem + LSHM_RING_HEADER_SIZE;
    r->size = size;
    r->fd = fd;
    r->woke_at = NO_WAKE;
    return 0;
}

/*
 * The consumer's head, bounded: it never passes our tail nor lags it by
 * more than the ring.  A head that moves back within that costs only the
 * consumer (it reads its records again); one outside is its violation.
 */
static int read_head(struct lshm_msgring *r)
{
    uint64_t head = load_acquire(&r->hdr->head);

    if (head > r->pos || r->pos - head > r->size)
        return -EPROTO;
    r->seen = head;
    return 0;
}

/* Bytes a record of len needs from the tail on, with the SKIP to the end
 * of the ring first when it would cross it. */
static uint64_t need_for(const struct lshm_msgring *r, uint32_t len)
{
    uint64_t span = LSHM_REC_SPAN(len);
    uint64_t room = r->size - (r->pos & (r->size - 1));

    return span > room ? room + span : span;
}

static void put_rec(struct lshm_msgring *r, uint32_t kind, uint32_t len)
{
    struct lshm_wire_record rec = { .len = len, .kind = kind };

    memcpy(r->data + (r->pos & (r->size - 1)), &rec, sizeof(rec));
}

void *lshm__msgring_reserve(struct lshm_msgring *r, uint32_t kind, uint32_t len, int *err)
{
    uint64_t need = need_for(r, len);
    uint64_t room = r->size - (r->pos & (r->size - 1));
    uint8_t *body;

    if (r->size - (r->pos - r->seen) < need) {
        if (read_head(r) < 0) {
            *err = -EPROTO;
            return NULL;
        }
        if (r->size - (r->pos - r->seen) < need) {
            *err = -EAGAIN;
            return NULL;
        }
    }
    if (LSHM_REC_SPAN(len) > room) {
        put_rec(r, LSHM_REC_SKIP, 0);
        r->pos += room;
    }
    put_rec(r, kind, len);
    body = r->data + (r->pos & (r->size - 1)) + LSHM_REC_HDR;
    r->pos += LSHM_REC_SPAN(len);
    return body;
}

bool lshm__msgring_publish(struct lshm_msgring *r, uint64_t limit)
{
    uint64_t head, tail = r->pos < limit ? r->pos : limit;

    if (tail <= r->published)
        return false;
    /* Sequentially consistent, as the consumer's store of wake before it
     * reads tail again (a full fence between the two): either it sees this
     * tail, or we see its wake. */
    __atomic_store_n(&r->hdr->tail, tail, __ATOMIC_SEQ_CST);
    r->published = tail;
    if (__atomic_load_n(&r->hdr->wake, __ATOMIC_SEQ_CST) == 0)
        return false;
    /* One wake-up per movement of head: a consumer that sets wake and
     * never reads costs nothing more. */
    head = __atomic_load_n(&r->hdr->head, __ATOMIC_ACQUIRE);
    if (head == r->woke_at)
        return false;
    if (__atomic_exchange_n(&r->hdr->wake, 0, __ATOMIC_SEQ_CST) == 0)
        return false;
    r->woke_at = head;
    return true;
}

int lshm__msgring_want_room(struct lshm_msgring *r, uint32_t len)
{
    __atomic_store_n(&r->hdr->space, 1, __ATOMIC_SEQ_CST);
    if (read_head(r) < 0)
        return -EPROTO;
    if (r->size - (r->pos - r->seen) < need_for(r, len))
        return 0;
    __atomic_store_n(&r->hdr->space, 0, __ATOMIC_RELAXED);
    return 1;
}

int lshm__msgring_import(struct lshm_msgring *r, int fd, uint32_t size, uint16_t port_id,
                         pid_t src, pid_t dst, const char **why)
{
    struct lshm_msgring_header *hdr;
    void *mem;
    int ret;

    if (!lshm__ring_size_is_valid(size)) {
        *why = "ring size is not a power of two from 65536 to 16777216";
        return -EPROTO;
    }
    ret = lshm__memfd_check(fd, map_size(size));
    if (ret < 0) {
        switch (ret) {
        case -EBADF:      *why = "ring fd is not a regular file"; break;
        case -EOPNOTSUPP: *why = "ring fd is not a memfd"; break;
        case -EPERM:      *why = "ring is not sealed against shrinking and growing"; break;
        case -EACCES:     *why = "ring cannot be mapped for writing"; break;
        case -EMSGSIZE:   *why = "ring memfd is not 4096 + ring_size bytes"; break;
        default:          *why = "ring fd cannot be checked"; break;
        }
        return ret;
    }
    mem = mmap(NULL, map_size(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (mem == MAP_FAILED) {
        *why = "ring cannot be mapped";
        return -errno;
    }

    /* Each field is read once: the producer can rewrite them under us. */
    hdr = mem;
    ret = -EPROTO;
    if (__atomic_load_n(&hdr->magic, __ATOMIC_RELAXED) != LSHM_RING_MAGIC)
        *why = "ring header has a bad magic number";
    else if (__atomic_load_n(&hdr->version, __ATOMIC_RELAXED) != LSHM_RING_VERSION)
        *why = "ring header has an unsupported version";
    else if (__atomic_load_n(&hdr->size, __ATOMIC_RELAXED) != size)
        *why = "ring header size differs from the RING message";
    else if (__atomic_load_n(&hdr->port_id, __ATOMIC_RELAXED) != port_id)
        *why = "ring header port_id is not the peer's port";
    else if (__atomic_load_n(&hdr->src_pid, __ATOMIC_RELAXED) != src)
        *why = "ring source pid is not the sending peer";
    else if (__atomic_load_n(&hdr->dst_pid, __ATOMIC_RELAXED) != dst)
        *why = "ring destination pid is not this process";
    else if (madvise(mem, map_size(size), MADV_DONTFORK) < 0)
        *why = "ring cannot be kept from forked children", ret = -errno;
    else
        ret = 0;
    if (ret < 0) {
        munmap(mem, map_size(size));
        return ret;
    }
    populate(mem, map_size(size));
    memset(r, 0, sizeof(*r));
    r->hdr = hdr;
    r->data = (uint8_t *)mem + LSHM_RING_HEADER_SIZE;
    r->size = size;
    r->fd = -1;
    r->woke_at = NO_WAKE;
    return 0;
}

static int violation(const char **why, const char *reason)
{
    *why = reason;
    return -EPROTO;
}

/* Read tail once and bound it: a multiple of 8, not behind our head, not
 * more than the ring ahead of it. */
static int read_tail(struct lshm_msgring *r, const char **why)
{
    uint64_t tail = load_acquire(&r->hdr->tail);

    if (tail % 8 != 0)
        return violation(why, "ring tail is not a multiple of 8");
    if (tail < r->pos)
        return violation(why, "ring tail moved back behind head");
    if (tail - r->pos > r->size)
        return violation(why, "ring tail more than the ring size ahead of head");
    r->seen = tail;
    return 0;
}

int lshm__msgring_next(struct lshm_msgring *r, void *buf, struct lshm_wire_record *rec,
                       const char **why)
{
    for (;;) {
        uint64_t off, room;
        int64_t span;

        if (r->pos == r->seen) {
            int ret = read_tail(r, why);

            if (ret < 0)
                return ret;
            if (r->pos == r->seen)
                return 0;
        }
        off = r->pos & (r->size - 1);
        room = r->size - off;
        /* The header is copied once and every decision is made on the copy. */
        memcpy(rec, r->data + off, sizeof(*rec));
        span = lshm__wire_record_check(*rec, r->seen - r->pos, room, why);
        if (span < 0)
            return (int)span;
        if (rec->kind == LSHM_REC_MSG)
            memcpy(buf, r->data + off + LSHM_REC_HDR, rec->len);
        r->pos += (uint64_t)span;
        if (rec->kind != LSHM_REC_SKIP)
            return 1;
    }
}

bool lshm__msgring_pending(struct lshm_msgring *r)
{
    return r->pos != r->seen ||
           __atomic_load_n(&r->hdr->tail, __ATOMIC_ACQUIRE) != r->pos;
}

bool lshm__msgring_publish_head(struct lshm_msgring *r)
{
    if (r->pos == r->published)
        return false;
    /* Sequentially consistent, as the producer's store of space before it
     * reads head: either it sees this head, or we see its space. */
    __atomic_store_n(&r->hdr->head, r->pos, __ATOMIC_SEQ_CST);
    r->published = r->pos;
    if (__atomic_load_n(&r->hdr->space, __ATOMIC_SEQ_CST) == 0)
        return false;
    return __atomic_exchange_n(&r->hdr->space, 0, __ATOMIC_SEQ_CST) != 0;
}

bool lshm__msgring_may_sleep(struct lshm_msgring *r)
{
    __atomic_store_n(&r->hdr->wake, 1, __ATOMIC_SEQ_CST);
    if (r->pos == r->seen && __atomic_load_n(&r->hdr->tail, __ATOMIC_SEQ_CST) == r->pos)
        return true;
    __atomic_store_n(&r->hdr->wake, 0, __ATOMIC_RELAXED);
    return false;
}

void lshm__msgring_awake(struct lshm_msgring *r)
{
    if (__atomic_load_n(&r->hdr->wake, __ATOMIC_RELAXED) != 0)
        __atomic_store_n(&r->hdr->wake, 0, __ATOMIC_RELAXED);
}

uint32_t *lshm__msgring_wake_word(struct lshm_msgring *r)
{
    return &r->hdr->wake;
}

int lshm__futex_wake(uint32_t *word)
{
    /* Shared, not private: the word is in a memfd the peer maps. */
    return syscall(SYS_futex, word, FUTEX_WAKE, 1, NULL, NULL, 0) < 0 ? -errno : 0;
}

void lshm__msgring_free(struct lshm_msgring *r)
{
    /* A ring never made (zeroed) holds nothing: its fd 0 is not ours. */
    if (r->hdr == NULL)
        return;
    munmap(r->hdr, map_size(r->size));
    if (r->fd >= 0)
        close(r->fd);
    memset(r, 0, sizeof(*r));
    r->fd = -1;
}
