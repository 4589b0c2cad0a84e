/*
 * Message rings without ports: a producer and a consumer over one memfd,
 * in one process and across a fork.  Records round-trip with wrap-around,
 * a full ring refuses without overwriting, wake and space hand-offs follow
 * the protocol, every header check of the import has a test, and every
 * producer's and consumer's violation is caught with its reason.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"
#include "msgring.h"
#include "ring.h"
#include "shm.h"

#define SIZE  65536u

struct pair {
    struct lshm_msgring prod, cons;
};

static void pair_open(struct pair *p, uint32_t size)
{
    const char *why = "";
    pid_t me = getpid();

    cr_assert_eq(lshm__msgring_create(&p->prod, size, 7, me, me), 0, "%s", lshm_last_error());
    cr_assert_geq(p->prod.fd, 0);
    cr_assert_eq(lshm__msgring_import(&p->cons, p->prod.fd, size, 7, me, me, &why), 0,
                 "%s", why);
    close(p->prod.fd);
    p->prod.fd = -1;
}

static void pair_close(struct pair *p)
{
    lshm__msgring_free(&p->prod);
    lshm__msgring_free(&p->cons);
}

/* A MSG record whose body is a valid inline user message of n bytes. */
static int put_msg(struct lshm_msgring *r, uint32_t seq, uint32_t n)
{
    uint8_t data[LSHM_INLINE_MAX];
    struct lshm_wire_msg h = { .stream = seq, .pid = 1, .port_id = 7, .type = 16, .size = n };
    uint8_t tmp[LSHM_WIRE_MAX];
    size_t len;
    void *body;
    int err = 0;

    for (uint32_t i = 0; i < n; i++)
        data[i] = (uint8_t)(seq * 31 + i);
    len = lshm__wire_encode_user(tmp, &h, NULL, NULL, 0, data);
    cr_assert_gt(len, 0);
    body = lshm__msgring_reserve(r, LSHM_REC_MSG, (uint32_t)len, &err);
    if (body == NULL)
        return err;
    memcpy(body, tmp, len);
    return 0;
}

static void expect_msg(struct lshm_msgring *r, uint32_t seq, uint32_t n)
{
    uint8_t buf[LSHM_WIRE_MAX];
    struct lshm_wire_record rec;
    struct lshm_wire_view v;
    const char *why = "";
    int ret = lshm__msgring_next(r, buf, &rec, &why);

    cr_assert_eq(ret, 1, "seq %u: %d %s", seq, ret, why);
    cr_assert_eq(rec.kind, LSHM_REC_MSG);
    cr_assert_eq(lshm__wire_decode_record(buf, rec.len, &v, &why), 0, "%s", why);
    cr_assert_eq(v.hdr.stream, seq);
    cr_assert_eq(v.hdr.size, n);
    for (uint32_t i = 0; i < n; i++)
        cr_assert_eq(v.payload[i], (uint8_t)(seq * 31 + i), "seq %u byte %u", seq, i);
}

static int next_rec(struct lshm_msgring *r, struct lshm_wire_record *rec, const char **why)
{
    static uint8_t buf[LSHM_WIRE_MAX];

    *why = "";
    return lshm__msgring_next(r, buf, rec, why);
}

LTEST(msgring, layout_of_a_new_ring)
{
    struct pair p;
    const struct lshm_msgring_header *h;
    int seals;

    pair_open(&p, SIZE);
    h = p.cons.hdr;
    cr_assert_eq(h->magic, 0x5248534cu);
    cr_assert_eq(memcmp(h, "LSHR", 4), 0);
    cr_assert_eq(h->version, 2);
    cr_assert_eq(h->port_id, 7);
    cr_assert_eq(h->size, SIZE);
    cr_assert_eq(h->src_pid, getpid());
    cr_assert_eq(h->dst_pid, getpid());
    cr_assert_eq(h->tail, 0);
    cr_assert_eq(h->head, 0);
    cr_assert_eq(h->wake, 0);
    cr_assert_eq(h->space, 0);
    pair_close(&p);

    /* Sealed as the protocol asks before it is sent. */
    cr_assert_eq(lshm__msgring_create(&p.prod, SIZE, 1, getpid(), getpid()), 0);
    seals = fcntl(p.prod.fd, F_GET_SEALS);
    cr_assert_eq(seals & (F_SEAL_SHRINK | F_SEAL_GROW), F_SEAL_SHRINK | F_SEAL_GROW);
    lshm__msgring_free(&p.prod);
}

LTEST(msgring, create_refuses_bad_sizes)
{
    struct lshm_msgring r;
    static const uint32_t bad[] = { 0, 4096, 65535, 65537, 3u << 16, 1u << 25 };

    for (unsigned i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        cr_assert_eq(lshm__msgring_create(&r, bad[i], 1, 1, 2), -EINVAL, "%u", bad[i]);
}

LTEST(msgring, records_round_trip_across_many_wraps)
{
    struct pair p;
    uint32_t sent = 0, got = 0, skips_seen = 0;
    uint64_t last_pos = 0;

    pair_open(&p, SIZE);
    /* Sizes that do not divide the ring, so records meet its end at every
     * offset and SKIPs are needed. */
    while (got < 20000) {
        while (sent - got < 40) {
            uint32_t n = (sent * 7919u) % 3000;

            if (put_msg(&p.prod, sent, n) != 0)
                break;
            sent++;
        }
        lshm__msgring_publish(&p.prod, UINT64_MAX);
        while (got < sent) {
            uint64_t before = p.cons.pos;

            expect_msg(&p.cons, got, (got * 7919u) % 3000);
            if ((before & (SIZE - 1)) + LSHM_REC_SPAN(16 + (got * 7919u) % 3000) > SIZE)
                skips_seen++;
            got++;
        }
        lshm__msgring_publish_head(&p.cons);
        cr_assert_geq(p.cons.pos, last_pos);
        last_pos = p.cons.pos;
    }
    cr_assert_gt(p.cons.pos, 100ull * SIZE, "wrapped %llu times",
                 (unsigned long long)(p.cons.pos / SIZE));
    cr_assert_gt(skips_seen, 50);
    cr_assert_eq(p.cons.hdr->head, p.prod.pos);
    pair_close(&p);
}

LTEST(msgring, full_ring_refuses_and_overwrites_nothing)
{
    struct pair p;
    uint32_t n = 0;
    int ret;

    pair_open(&p, SIZE);
    while ((ret = put_msg(&p.prod, n, 1000)) == 0)
        n++;
    cr_assert_eq(ret, -EAGAIN);
    cr_assert_eq(n, SIZE / LSHM_REC_SPAN(16 + 1000));
    lshm__msgring_publish(&p.prod, UINT64_MAX);
    /* The producer asks for room: space = 1, still full. */
    cr_assert_eq(lshm__msgring_want_room(&p.prod, 16 + 1000), 0);
    cr_assert_eq(p.cons.hdr->space, 1);
    /* Reading one record and publishing head owes the producer an ACK, once. */
    expect_msg(&p.cons, 0, 1000);
    cr_assert(lshm__msgring_publish_head(&p.cons));
    cr_assert_eq(p.cons.hdr->space, 0);
    cr_assert_not(lshm__msgring_publish_head(&p.cons));
    cr_assert_eq(lshm__msgring_want_room(&p.prod, 16 + 1000), 1);
    cr_assert_eq(p.cons.hdr->space, 0);
    cr_assert_eq(put_msg(&p.prod, n, 1000), 0);
    lshm__msgring_publish(&p.prod, UINT64_MAX);
    /* Every record intact and in order, the new one last. */
    for (uint32_t i = 1; i <= n; i++)
        expect_msg(&p.cons, i, 1000);
    pair_close(&p);
}

LTEST(msgring, wake_is_owed_once_per_movement_of_head)
{
    struct pair p;
    struct lshm_wire_record rec;
    const char *why;

    pair_open(&p, SIZE);
    /* Awake consumer: nothing owed. */
    cr_assert_eq(put_msg(&p.prod, 0, 8), 0);
    cr_assert_not(lshm__msgring_publish(&p.prod, UINT64_MAX));
    /* Records unread: it may not sleep, and wake stays 0. */
    cr_assert_not(lshm__msgring_may_sleep(&p.cons));
    cr_assert_eq(p.cons.hdr->wake, 0);
    expect_msg(&p.cons, 0, 8);
    lshm__msgring_publish_head(&p.cons);
    cr_assert_eq(next_rec(&p.cons, &rec, &why), 0);
    cr_assert(lshm__msgring_may_sleep(&p.cons));
    cr_assert_eq(p.cons.hdr->wake, 1);

    cr_assert_eq(put_msg(&p.prod, 1, 8), 0);
    cr_assert(lshm__msgring_publish(&p.prod, UINT64_MAX));
    cr_assert_eq(p.cons.hdr->wake, 0);
    /* A consumer that sets wake again without reading costs nothing more. */
    __atomic_store_n(&p.cons.hdr->wake, 1, __ATOMIC_SEQ_CST);
    cr_assert_eq(put_msg(&p.prod, 2, 8), 0);
    cr_assert_not(lshm__msgring_publish(&p.prod, UINT64_MAX));
    /* Once head moved, the next publish wakes it again. */
    expect_msg(&p.cons, 1, 8);
    expect_msg(&p.cons, 2, 8);
    lshm__msgring_publish_head(&p.cons);
    cr_assert(lshm__msgring_may_sleep(&p.cons));
    cr_assert_eq(put_msg(&p.prod, 3, 8), 0);
    cr_assert(lshm__msgring_publish(&p.prod, UINT64_MAX));
    /* Nothing new: publishing again owes nothing. */
    cr_assert_not(lshm__msgring_publish(&p.prod, UINT64_MAX));
    lshm__msgring_awake(&p.cons);
    cr_assert_eq(p.cons.hdr->wake, 0);
    pair_close(&p);
}

LTEST(msgring, fence_records_keep_their_place)
{
    struct pair p;
    struct lshm_wire_record rec;
    const char *why;
    int err = 0;

    pair_open(&p, SIZE);
    cr_assert_eq(put_msg(&p.prod, 0, 4), 0);
    cr_assert_not_null(lshm__msgring_reserve(&p.prod, LSHM_REC_FENCE, 0, &err));
    cr_assert_eq(put_msg(&p.prod, 1, 4), 0);
    lshm__msgring_publish(&p.prod, UINT64_MAX);
    expect_msg(&p.cons, 0, 4);
    cr_assert_eq(next_rec(&p.cons, &rec, &why), 1);
    cr_assert_eq(rec.kind, LSHM_REC_FENCE);
    cr_assert_eq(rec.len, 0);
    expect_msg(&p.cons, 1, 4);
    cr_assert_eq(next_rec(&p.cons, &rec, &why), 0);
    pair_close(&p);
}

/* ---- a hostile producer: the consumer refuses, with the reason ---- */

static void expect_violation(struct pair *p, const char *reason)
{
    struct lshm_wire_record rec;
    const char *why;

    cr_assert_eq(next_rec(&p->cons, &rec, &why), -EPROTO, "expected: %s", reason);
    cr_assert_str_eq(why, reason);
}

static void raw_rec(struct pair *p, uint64_t at, uint32_t len, uint32_t kind)
{
    struct lshm_wire_record rec = { .len = len, .kind = kind };

    memcpy(p->prod.data + (at & (p->prod.size - 1)), &rec, sizeof(rec));
}

LTEST(msgring, consumer_refuses_a_bad_tail)
{
    struct pair p;

    pair_open(&p, SIZE);
    __atomic_store_n(&p.prod.hdr->tail, 12, __ATOMIC_RELEASE);
    expect_violation(&p, "ring tail is not a multiple of 8");
    __atomic_store_n(&p.prod.hdr->tail, SIZE + 8, __ATOMIC_RELEASE);
    expect_violation(&p, "ring tail more than the ring size ahead of head");
    pair_close(&p);

    /* Backwards, behind what was consumed. */
    pair_open(&p, SIZE);
    cr_assert_eq(put_msg(&p.prod, 0, 100), 0);
    lshm__msgring_publish(&p.prod, UINT64_MAX);
    expect_msg(&p.cons, 0, 100);
    __atomic_store_n(&p.prod.hdr->tail, 8, __ATOMIC_RELEASE);
    expect_violation(&p, "ring tail moved back behind head");
    pair_close(&p);
}

LTEST(msgring, consumer_refuses_bad_records)
{
    struct pair p;

    pair_open(&p, SIZE);
    raw_rec(&p, 0, 100, LSHM_REC_MSG);
    __atomic_store_n(&p.prod.hdr->tail, 64, __ATOMIC_RELEASE);
    expect_violation(&p, "record ends beyond tail");
    pair_close(&p);

    pair_open(&p, SIZE);
    raw_rec(&p, 0, LSHM_WIRE_MAX + 8, LSHM_REC_MSG);
    __atomic_store_n(&p.prod.hdr->tail, SIZE, __ATOMIC_RELEASE);
    expect_violation(&p, "MSG record length out of range");
    pair_close(&p);

    pair_open(&p, SIZE);
    raw_rec(&p, 0, 0, 9);
    __atomic_store_n(&p.prod.hdr->tail, 8, __ATOMIC_RELEASE);
    expect_violation(&p, "unknown record kind");
    pair_close(&p);

    /* A record that would cross the end of the ring. */
    pair_open(&p, SIZE);
    p.cons.pos = p.cons.seen = p.cons.published = SIZE - 64;
    raw_rec(&p, SIZE - 64, 100, LSHM_REC_MSG);
    __atomic_store_n(&p.prod.hdr->tail, SIZE + 1024, __ATOMIC_RELEASE);
    expect_violation(&p, "record crosses the end of the ring");
    pair_close(&p);

    /* A SKIP whose end (the end of the ring) is not published. */
    pair_open(&p, SIZE);
    p.cons.pos = p.cons.seen = p.cons.published = SIZE - 64;
    raw_rec(&p, SIZE - 64, 0, LSHM_REC_SKIP);
    __atomic_store_n(&p.prod.hdr->tail, SIZE - 32, __ATOMIC_RELEASE);
    expect_violation(&p, "SKIP record past tail");
    pair_close(&p);
}

LTEST(msgring, record_rewritten_after_publish_is_read_once)
{
    struct pair p;
    uint8_t buf[LSHM_WIRE_MAX];
    struct lshm_wire_record rec;
    struct lshm_wire_view v;
    const char *why = "";

    pair_open(&p, SIZE);
    cr_assert_eq(put_msg(&p.prod, 5, 32), 0);
    lshm__msgring_publish(&p.prod, UINT64_MAX);
    cr_assert_eq(lshm__msgring_next(&p.cons, buf, &rec, &why), 1);
    /* The producer scribbles the record after it was taken: the copy the
     * consumer validates does not change. */
    memset(p.prod.data, 0xff, 64);
    cr_assert_eq(lshm__wire_decode_record(buf, rec.len, &v, &why), 0, "%s", why);
    cr_assert_eq(v.hdr.stream, 5);
    pair_close(&p);
}

/* ---- a hostile consumer: the producer stays inside its ring ---- */

LTEST(msgring, producer_refuses_a_scribbled_head)
{
    struct pair p;
    int err = 0;

    pair_open(&p, SIZE);
    while (put_msg(&p.prod, 0, 1000) == 0)
        ;
    lshm__msgring_publish(&p.prod, UINT64_MAX);
    /* Ahead of tail. */
    __atomic_store_n(&p.cons.hdr->head, p.prod.pos + 8, __ATOMIC_RELEASE);
    cr_assert_null(lshm__msgring_reserve(&p.prod, LSHM_REC_MSG, 1016, &err));
    cr_assert_eq(err, -EPROTO);
    cr_assert_eq(lshm__msgring_want_room(&p.prod, 1016), -EPROTO);
    /* More than a ring behind (it wrapped). */
    __atomic_store_n(&p.cons.hdr->head, UINT64_MAX - 7, __ATOMIC_RELEASE);
    cr_assert_null(lshm__msgring_reserve(&p.prod, LSHM_REC_MSG, 1016, &err));
    cr_assert_eq(err, -EPROTO);
    /* Back within bounds, which only costs the consumer: still full. */
    __atomic_store_n(&p.cons.hdr->head, 0, __ATOMIC_RELEASE);
    cr_assert_null(lshm__msgring_reserve(&p.prod, LSHM_REC_MSG, 1016, &err));
    cr_assert_eq(err, -EAGAIN);
    pair_close(&p);
}

LTEST(msgring, forced_wake_costs_one_wake_up)
{
    struct pair p;
    unsigned owed = 0;

    pair_open(&p, SIZE);
    for (unsigned i = 0; i < 1000; i++) {
        __atomic_store_n(&p.cons.hdr->wake, 1, __ATOMIC_SEQ_CST);
        cr_assert_eq(put_msg(&p.prod, i, 0), 0);
        owed += lshm__msgring_publish(&p.prod, UINT64_MAX);
    }
    cr_assert_eq(owed, 1);
    pair_close(&p);
}

/* ---- the import checks ---- */

static int make_ring_fd(uint32_t size, size_t file_size, unsigned seals,
                        void (*edit)(struct lshm_msgring_header *))
{
    int fd = memfd_create("lshm", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    struct lshm_msgring_header *h;

    cr_assert_geq(fd, 0);
    cr_assert_eq(ftruncate(fd, (off_t)file_size), 0);
    h = mmap(NULL, file_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    cr_assert_neq(h, MAP_FAILED);
    h->magic = LSHM_RING_MAGIC;
    h->version = 2;
    h->port_id = 7;
    h->size = size;
    h->src_pid = 100;
    h->dst_pid = getpid();
    if (edit != NULL)
        edit(h);
    munmap(h, file_size);
    if (seals != 0)
        cr_assert_eq(fcntl(fd, F_ADD_SEALS, seals), 0);
    return fd;
}

static void bad_magic(struct lshm_msgring_header *h) { h->magic = LSHM_MAGIC; }
static void bad_version(struct lshm_msgring_header *h) { h->version = 1; }
static void bad_size(struct lshm_msgring_header *h) { h->size = 131072; }
static void bad_port(struct lshm_msgring_header *h) { h->port_id = 8; }
static void bad_src(struct lshm_msgring_header *h) { h->src_pid = 101; }
static void bad_dst(struct lshm_msgring_header *h) { h->dst_pid = 1; }

static void expect_import(int fd, uint32_t size, int err, const char *reason)
{
    struct lshm_msgring r;
    const char *why = "";

    cr_assert_eq(lshm__msgring_import(&r, fd, size, 7, 100, getpid(), &why), err,
                 "expected %s, got %s", reason, why);
    if (err == 0)
        lshm__msgring_free(&r);
    else
        cr_assert_str_eq(why, reason);
    close(fd);
}

LTEST(msgring, import_checks_every_field)
{
    const unsigned both = F_SEAL_SHRINK | F_SEAL_GROW;
    const size_t full = 4096 + SIZE;

    expect_import(make_ring_fd(SIZE, full, both, NULL), SIZE, 0, "");
    expect_import(make_ring_fd(SIZE, full, F_SEAL_SHRINK, NULL), SIZE, -EPERM,
                  "ring is not sealed against shrinking and growing");
    expect_import(make_ring_fd(SIZE, full, 0, NULL), SIZE, -EPERM,
                  "ring is not sealed against shrinking and growing");
    expect_import(make_ring_fd(SIZE, full - 4096, both, NULL), SIZE, -EMSGSIZE,
                  "ring memfd is not 4096 + ring_size bytes");
    expect_import(make_ring_fd(SIZE, full, both | F_SEAL_WRITE, NULL), SIZE, -EACCES,
                  "ring cannot be mapped for writing");
    expect_import(make_ring_fd(SIZE, full, both, bad_magic), SIZE, -EPROTO,
                  "ring header has a bad magic number");
    expect_import(make_ring_fd(SIZE, full, both, bad_version), SIZE, -EPROTO,
                  "ring header has an unsupported version");
    expect_import(make_ring_fd(SIZE, full, both, bad_size), SIZE, -EPROTO,
                  "ring header size differs from the RING message");
    expect_import(make_ring_fd(SIZE, full, both, bad_port), SIZE, -EPROTO,
                  "ring header port_id is not the peer's port");
    expect_import(make_ring_fd(SIZE, full, both, bad_src), SIZE, -EPROTO,
                  "ring source pid is not the sending peer");
    expect_import(make_ring_fd(SIZE, full, both, bad_dst), SIZE, -EPROTO,
                  "ring destination pid is not this process");
    expect_import(make_ring_fd(SIZE, full, both, NULL), 65536 + 8, -EPROTO,
                  "ring size is not a power of two from 65536 to 16777216");
    {
        int fds[2];

        cr_assert_eq(pipe(fds), 0);
        close(fds[1]);
        expect_import(fds[0], SIZE, -EBADF, "ring fd is not a regular file");
    }
}

/* ---- two threads: a sleeping consumer woken through the futex ---- */

struct futex_run {
    struct pair *p;
    uint32_t     n;
    uint32_t     got;
    uint32_t     tries;     /* may_sleep calls: each stores wake = 1 */
    uint32_t     sleeps;    /* those that found the ring still empty */
    uint32_t     wakes;
    bool         bad;
};

static long futex(uint32_t *word, int op, uint32_t val)
{
    /* Shared, not private: the word lives in a memfd two processes map. */
    struct timespec ts = { .tv_sec = 5 };

    return syscall(SYS_futex, word, op, val, op == FUTEX_WAIT ? &ts : NULL, NULL, 0);
}

static void *consumer(void *arg)
{
    struct futex_run *f = arg;
    struct lshm_msgring *r = &f->p->cons;
    uint8_t buf[LSHM_WIRE_MAX];

    while (f->got < f->n) {
        struct lshm_wire_record rec;
        struct lshm_wire_view v;
        const char *why = "";
        int ret = lshm__msgring_next(r, buf, &rec, &why);

        if (ret < 0 || (ret == 1 && (lshm__wire_decode_record(buf, rec.len, &v, &why) != 0 ||
                                     v.hdr.stream != f->got))) {
            f->bad = true;
            return NULL;
        }
        if (ret == 1) {
            f->got++;
            lshm__msgring_publish_head(r);
            continue;
        }
        f->tries++;
        if (lshm__msgring_may_sleep(r)) {
            f->sleeps++;
            futex(lshm__msgring_wake_word(r), FUTEX_WAIT, 1);
            lshm__msgring_awake(r);
        }
    }
    return NULL;
}

LTEST(msgring, sleeping_consumer_wakes_on_the_futex)
{
    struct pair p;
    struct futex_run f = { .p = &p, .n = 2000 };
    pthread_t t;

    pair_open(&p, SIZE);
    cr_assert_eq(pthread_create(&t, NULL, consumer, &f), 0);
    for (uint32_t i = 0; i < f.n; i++) {
        while (put_msg(&p.prod, i, 16) == -EAGAIN)
            usleep(100);
        if (lshm__msgring_publish(&p.prod, UINT64_MAX)) {
            f.wakes++;
            futex(lshm__msgring_wake_word(&p.prod), FUTEX_WAKE, 1);
        }
        /* Now and then give the consumer time to fall asleep. */
        if (i % 50 == 0)
            usleep(2000);
    }
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_not(f.bad);
    cr_assert_eq(f.got, f.n);
    /* Not vacuous: the consumer did sleep and was woken through the futex. */
    cr_assert_gt(f.sleeps, 10, "sleeps %u", f.sleeps);
    cr_assert_gt(f.wakes, 10, "wakes %u", f.wakes);
    /* A wake for each time the consumer said it may sleep, at most: also
     * one that took it back on finding records (wake was 1 for a moment;
     * a spurious wake-up is harmless), never one it did not ask for. */
    cr_assert_leq(f.wakes, f.tries, "wakes %u, tries %u, sleeps %u", f.wakes, f.tries, f.sleeps);
    pair_close(&p);
}

/* ---- the futex through io_uring: one ring waits, another wakes ---- */

struct futex_op {
    struct lshm_op op;
    int            res;
    bool           done;
};

static void futex_done(struct lshm_op *op, int res, bool more, void *buf, unsigned len)
{
    struct futex_op *f = (struct futex_op *)op;

    (void)more, (void)buf, (void)len;
    f->res = res;
    f->done = true;
}

LTEST(msgring, io_uring_futex_wait_is_woken_by_io_uring_futex_wake)
{
    struct lshm_ring *waiter, *waker;
    struct futex_op f = { .op.complete = futex_done };
    struct pair p;
    long long start;

    require_io_uring(0);
    cr_assert_eq(lshm__ring_new(&waiter, 8, 0), 0, "%s", lshm_last_error());
    if (!(lshm__ring_features(waiter) & LSHM_FEAT_FUTEX)) {
        lshm__ring_free(waiter);
        cr_skip_test("the kernel has no IORING_OP_FUTEX_WAIT (6.7+)");
    }
    cr_assert_eq(lshm__ring_new(&waker, 8, 0), 0);
    pair_open(&p, SIZE);
    cr_assert(lshm__msgring_may_sleep(&p.cons));
    cr_assert_eq(lshm__ring_futex_wait(waiter, lshm__msgring_wake_word(&p.cons), 1, &f.op), 0);
    /* Armed, and nothing wakes it: a zero wait completes nothing. */
    cr_assert_eq(lshm__ring_run(waiter, 0), 0);
    cr_assert_not(f.done);

    cr_assert_eq(put_msg(&p.prod, 0, 8), 0);
    cr_assert(lshm__msgring_publish(&p.prod, UINT64_MAX));
    cr_assert_eq(lshm__ring_futex_wake(waker, lshm__msgring_wake_word(&p.prod)), 0);
    cr_assert_geq(lshm__ring_submit(waker), 1);
    start = now_ms();
    while (!f.done && now_ms() - start < 2000)
        cr_assert_geq(lshm__ring_run(waiter, 100), 0);
    cr_assert(f.done, "the wake did not reach the waiter");
    cr_assert_eq(f.res, 0, "futex wait completed with %d", f.res);
    /* A successful wake leaves no completion behind. */
    cr_assert_eq(lshm__ring_run(waker, 0), 0);
    expect_msg(&p.cons, 0, 8);
    pair_close(&p);
    lshm__ring_free(waker);
    lshm__ring_free(waiter);
}
