/*
 * Segments: what lshm__seg_create makes, what lshm__seg_import refuses (each
 * defect with its own code), scrubbing, oosm, references, and the tracking
 * race between a canceller and a receiver (threads, then processes).
 */
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"
#include "pattern.h"
#include "shm.h"

#define CH        ((size_t)LSHM_CHUNK_SIZE)
#define FAKE_PID  424242
#define PEER_PID  515151

#ifndef F_SEAL_EXEC
#define F_SEAL_EXEC 0x0020
#endif

/* ---- creation ---- */

LTEST(segment, create_initialises_header)
{
    struct lshm_seg *seg;
    struct lshm_segment_header *h;
    struct stat st;
    int seals;

    cr_assert_eq(lshm__seg_create(7, getpid(), FAKE_PID, 33, &seg), 0);
    h = seg->hdr;
    cr_assert_eq(h->magic, LSHM_MAGIC);
    cr_assert_eq(h->version, LSHM_SEGMENT_VERSION);
    cr_assert_eq(h->sent_over, 33);
    cr_assert_eq(h->id, 7);
    cr_assert_eq(h->src_pid, getpid());
    cr_assert_eq(h->dst_pid, FAKE_PID);
    cr_assert_eq(h->oosm, 0);
    for (unsigned w = 0; w < LSHM_FREE_WORDS; w++) {
        cr_assert_eq(h->free_map[w], ~0ull, "chunk 0 is not pre-claimed");
        cr_assert_eq(h->free_tracking_map[w], ~0ull);
    }
    cr_assert_eq(h->free_map_padding, 0);
    cr_assert_eq(h->free_tracking_map_padding, 0);
    for (unsigned i = 0; i < LSHM_CHUNK_COUNT; i++)
        cr_assert_eq(h->tracking[i], 0);
    cr_assert_eq((uint8_t *)seg->data, (uint8_t *)h + LSHM_HEADER_SIZE);
    cr_assert_eq(seg->id, 7);
    cr_assert_eq(seg->src_pid, getpid());
    cr_assert_eq(seg->dst_pid, FAKE_PID);
    cr_assert_eq(atomic_load(&seg->use), 1);

    cr_assert_geq(seg->fd, 0);
    cr_assert(fcntl(seg->fd, F_GETFD) & FD_CLOEXEC);
    cr_assert_eq(fstat(seg->fd, &st), 0);
    cr_assert_eq(st.st_size, (off_t)LSHM_SEGMENT_SIZE);
    seals = fcntl(seg->fd, F_GET_SEALS);
    cr_assert_eq(seals & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL),
                 F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL, "seals %#x", seals);
    cr_assert_eq(seals & F_SEAL_WRITE, 0);
    cr_assert_eq(ftruncate(seg->fd, 4096), -1, "sealed against shrinking");
    cr_assert_eq(count_maps("memfd:lshm"), 1);
    /* The whole segment is writable, up to its last byte. */
    seg->data[LSHM_DATA_SIZE - 1] = 1;
    lshm__seg_unref(seg);
    cr_assert_eq(count_maps("memfd:lshm"), 0);
}

/* MADV_DONTFORK: a child does not inherit the mapping. */
LTEST(segment, create_mapping_not_inherited)
{
    struct lshm_seg *seg;
    pid_t child;
    int status;

    cr_assert_eq(lshm__seg_create(0, getpid(), FAKE_PID, 1, &seg), 0);
    child = fork();
    cr_assert_geq(child, 0);
    if (child == 0)
        _exit(count_maps("memfd:lshm") == 0 ? 0 : 1);
    status = wait_child(child, 5000);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "the child has the segment mapped");
    cr_assert_eq(count_maps("memfd:lshm"), 1);
    lshm__seg_unref(seg);
}

LTEST(segment, ref_unref_close_fd)
{
    struct lshm_seg *seg;
    int fds;

    cr_assert_eq(lshm__seg_create(0, getpid(), FAKE_PID, 1, &seg), 0);
    fds = count_fds();
    lshm__seg_ref(seg);
    lshm__seg_ref(seg);
    lshm__seg_unref(seg);
    lshm__seg_unref(seg);
    cr_assert_eq(count_maps("memfd:lshm"), 1, "still referenced once");
    lshm__seg_close_fd(seg);
    cr_assert_eq(seg->fd, -1);
    cr_assert_eq(count_fds(), fds - 1);
    lshm__seg_close_fd(seg);
    cr_assert_eq(count_fds(), fds - 1);
    cr_assert_eq(count_maps("memfd:lshm"), 1, "the mapping outlives the fd");
    lshm__seg_unref(seg);
    lshm__seg_unref(NULL);
}

/* ---- import ---- */

struct craft {
    bool     allow_sealing;
    unsigned seals;
    off_t    size;
    uint32_t magic;
    uint16_t version;
    uint32_t id;
    pid_t    src, dst;
};

static struct craft good(void)
{
    return (struct craft){
        .allow_sealing = true,
        .seals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL,
        .size = LSHM_SEGMENT_SIZE,
        .magic = LSHM_MAGIC,
        .version = LSHM_SEGMENT_VERSION,
        .id = 3,
        .src = PEER_PID,
        .dst = getpid(),
    };
}

/* A segment as another program would make it, defects included. */
static int craft_fd(const struct craft *c)
{
    int fd = memfd_create("lshm", MFD_CLOEXEC | (c->allow_sealing ? MFD_ALLOW_SEALING : 0));
    struct lshm_segment_header *h;

    cr_assert_geq(fd, 0);
    cr_assert_eq(ftruncate(fd, c->size), 0);
    if (c->size >= (off_t)LSHM_HEADER_SIZE) {
        h = mmap(NULL, LSHM_HEADER_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        cr_assert_neq(h, MAP_FAILED);
        h->magic = c->magic;
        h->version = c->version;
        h->sent_over = 9;
        h->id = c->id;
        h->src_pid = c->src;
        h->dst_pid = c->dst;
        memset(h->free_map, 0xff, sizeof(h->free_map));
        munmap(h, LSHM_HEADER_SIZE);
    }
    if (c->seals != 0)
        cr_assert_eq(fcntl(fd, F_ADD_SEALS, c->seals), 0);
    return fd;
}

/* Import must fail with want, and leave no mapping or fd behind. */
static void expect_refused(int fd, int want, const char *what)
{
    struct craft g = good();
    struct lshm_seg *seg = NULL;
    int maps = count_maps("memfd:"), fds = count_fds();
    int ret = lshm__seg_import(fd, g.id, g.src, g.dst, &seg);

    cr_expect_eq(ret, want, "%s: got %d (%s), want %d (%s)", what, ret,
                 lshm__seg_strerror(ret), want, lshm__seg_strerror(want));
    cr_expect_null(seg, "%s", what);
    cr_expect_eq(count_maps("memfd:"), maps, "%s left a mapping", what);
    cr_expect_eq(count_fds(), fds, "%s changed the fds", what);
}

static void refuse_crafted(struct craft c, int want, const char *what)
{
    int fd = craft_fd(&c);

    expect_refused(fd, want, what);
    close(fd);
}

LTEST(segment, import_accepts_good_segment)
{
    struct craft c = good();
    struct lshm_seg *seg;
    int fd = craft_fd(&c);

    cr_assert_eq(lshm__seg_import(fd, c.id, c.src, c.dst, &seg), 0);
    cr_assert_eq(seg->hdr->sent_over, LSHM_SENT_OVER_ANY);
    cr_assert_eq(seg->id, c.id);
    cr_assert_eq(seg->src_pid, c.src);
    cr_assert_eq(seg->dst_pid, c.dst);
    cr_assert_eq(seg->fd, -1, "the fd stays the caller's");
    cr_assert_geq(fcntl(fd, F_GETFD), 0);
    cr_assert_eq(atomic_load(&seg->use), 1);
    /* Private copies: the sender rewriting the header changes nothing. */
    seg->hdr->id = 99;
    seg->hdr->src_pid = 1;
    cr_assert_eq(seg->id, c.id);
    cr_assert_eq(seg->src_pid, c.src);
    close(fd);
    seg->data[LSHM_DATA_SIZE - 1] = 1;
    lshm__seg_unref(seg);
}

LTEST(segment, import_accepts_lshm_seg_create)
{
    struct lshm_seg *mine, *theirs;

    cr_assert_eq(lshm__seg_create(0, PEER_PID, getpid(), 4, &mine), 0);
    cr_assert_eq(lshm__seg_import(mine->fd, 0, PEER_PID, getpid(), &theirs), 0);
    cr_assert_eq(mine->hdr->sent_over, LSHM_SENT_OVER_ANY, "both map the same memory");
    lshm__seg_unref(theirs);
    lshm__seg_unref(mine);
}

LTEST(segment, import_refuses_unsealed)
{
    struct craft c = good();

    c.seals = 0;
    refuse_crafted(c, -EPERM, "unsealed");
    c.seals = F_SEAL_SHRINK;
    refuse_crafted(c, -EPERM, "shrink seal only");
    c.seals = F_SEAL_GROW | F_SEAL_SEAL;
    refuse_crafted(c, -EPERM, "grow seal only");
    c = good();
    c.allow_sealing = false;
    c.seals = 0;
    refuse_crafted(c, -EPERM, "memfd without sealing");
}

LTEST(segment, import_refuses_write_seal)
{
    struct craft c = good();

    c.seals |= F_SEAL_WRITE;
    refuse_crafted(c, -EACCES, "write sealed");
}

LTEST(segment, import_refuses_read_only_fd)
{
    struct craft c = good();
    char path[64];
    int fd = craft_fd(&c), ro;

    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    ro = open(path, O_RDONLY | O_CLOEXEC);
    cr_assert_geq(ro, 0);
    expect_refused(ro, -EACCES, "read-only fd");
    close(ro);
    close(fd);
}

LTEST(segment, import_refuses_wrong_size)
{
    struct craft c = good();

    c.size = LSHM_SEGMENT_SIZE - 4096;
    refuse_crafted(c, -EMSGSIZE, "one page short");
    c.size = LSHM_SEGMENT_SIZE + 1;
    refuse_crafted(c, -EMSGSIZE, "one byte long");
    c.size = 0;
    refuse_crafted(c, -EMSGSIZE, "empty");
}

LTEST(segment, import_refuses_regular_file)
{
    int fd = open("/tmp", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);

    if (fd < 0)
        cr_skip_test("O_TMPFILE in /tmp: %s", strerror(errno));
    cr_assert_eq(ftruncate(fd, LSHM_SEGMENT_SIZE), 0);
    expect_refused(fd, -EOPNOTSUPP, "O_TMPFILE file");
    close(fd);
}

/* On tmpfs a plain file has seals too (just F_SEAL_SEAL): still not a memfd. */
LTEST(segment, import_refuses_tmpfs_file)
{
    int fd = open("/dev/shm", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);

    if (fd < 0)
        cr_skip_test("O_TMPFILE in /dev/shm: %s", strerror(errno));
    cr_assert_eq(ftruncate(fd, LSHM_SEGMENT_SIZE), 0);
    expect_refused(fd, -EOPNOTSUPP, "tmpfs file");
    close(fd);
}

LTEST(segment, import_refuses_pipe_socket_and_bad_fd)
{
    int p[2], s[2];

    cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
    expect_refused(p[0], -EBADF, "pipe");
    close(p[0]);
    close(p[1]);
    cr_assert_eq(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, s), 0);
    expect_refused(s[0], -EBADF, "socket");
    close(s[0]);
    close(s[1]);
    expect_refused(-1, -EBADF, "fd -1");
    expect_refused(p[0], -EBADF, "closed fd");
}

LTEST(segment, import_refuses_bad_header)
{
    struct craft c;

    c = good();
    c.magic = 0x12345678;
    refuse_crafted(c, -EPROTO, "bad magic");
    c = good();
    c.version = 2;
    refuse_crafted(c, -EPROTONOSUPPORT, "bad version");
    c = good();
    c.id = 4;
    refuse_crafted(c, -ERANGE, "wrong id");
    c = good();
    c.src = PEER_PID + 1;
    refuse_crafted(c, -ESRCH, "wrong src pid");
    c = good();
    c.dst = getpid() + 1;
    refuse_crafted(c, -ENXIO, "wrong dst pid");
}

LTEST(segment, import_codes_have_distinct_texts)
{
    int codes[] = { -EBADF, -EOPNOTSUPP, -EPERM, -EACCES, -EMSGSIZE, -EPROTO,
                    -EPROTONOSUPPORT, -ERANGE, -ESRCH, -ENXIO };

    for (unsigned i = 0; i < ARRAY_SIZE(codes); i++)
        for (unsigned j = i + 1; j < ARRAY_SIZE(codes); j++) {
            cr_expect_neq(codes[i], codes[j]);
            cr_expect_str_neq(lshm__seg_strerror(codes[i]), lshm__seg_strerror(codes[j]));
        }
}

/* ---- freeing, scrubbing, oosm ---- */

static void claim(struct lshm_seg *seg, uint32_t from, uint32_t to)
{
    for (uint32_t c = from; c < to; c++)
        cr_assert(lshm__chunk_try_busy(seg->hdr->free_map, c));
}

static bool chunk_is_all(const struct lshm_seg *seg, uint32_t c, uint8_t byte)
{
    const uint8_t *p = seg->data + (size_t)c * CH;

    for (size_t i = 0; i < CH; i++)
        if (p[i] != byte)
            return false;
    return true;
}

LTEST(segment, scrub_fills_freed_chunks)
{
    struct lshm_seg *seg;

    cr_assert_eq(lshm__seg_create(0, getpid(), FAKE_PID, 1, &seg), 0);
    seg->scrub = true;
    claim(seg, 3, 6);
    memset(seg->data + 2 * CH, 0x11, 5 * CH);
    lshm__seg_free_chunks(seg, 3, 3);
    for (uint32_t c = 3; c < 6; c++) {
        cr_expect(chunk_is_all(seg, c, 0xA5), "chunk %u scrubbed", c);
        cr_expect(lshm__chunk_is_free(seg->hdr->free_map, c));
    }
    cr_expect(chunk_is_all(seg, 2, 0x11), "the chunk before is not touched");
    cr_expect(chunk_is_all(seg, 6, 0x11), "the chunk after is not touched");
    lshm__seg_unref(seg);
}

LTEST(segment, no_scrub_when_off)
{
    struct lshm_seg *seg;

    cr_assert_eq(lshm__seg_create(0, getpid(), FAKE_PID, 1, &seg), 0);
    cr_assert_not(seg->scrub, "off by default");
    claim(seg, 3, 6);
    memset(seg->data + 3 * CH, 0x11, 3 * CH);
    lshm__seg_free_chunks(seg, 3, 3);
    for (uint32_t c = 3; c < 6; c++) {
        cr_expect(chunk_is_all(seg, c, 0x11), "chunk %u left as it was", c);
        cr_expect(lshm__chunk_is_free(seg->hdr->free_map, c));
    }
    lshm__seg_unref(seg);
}

/* Scrubbing the sent chunks would wipe what the receiver is reading. */
LTEST(segment, scrub_spares_sent_chunks)
{
    struct lshm_peer *peer;
    struct lshm_alloc a;
    struct lshm_buf *buf;
    struct lshm_seg *seg;

    cr_assert_eq(lshm__peer_get(FAKE_PID, &peer), 0);
    cr_assert_eq(lshm__peer_out_alloc(peer, 1, 4, false, true, &a), 0);
    seg = a.seg;
    cr_assert(seg->scrub, "scrub comes from the alloc");
    cr_assert_eq(lshm__buf_from_alloc(&a, peer, 3 * CH, &buf), 0);
    memset(lshm_buf_data(buf), 0x22, 3 * CH);
    cr_assert_eq(lshm_buf_set_size(buf, CH + 1), 0);
    buf->sent = true;
    lshm__buf_release_sent(buf);
    cr_expect(chunk_is_all(seg, 0, 0x22));
    cr_expect(chunk_is_all(seg, 1, 0x22));
    cr_expect(chunk_is_all(seg, 2, 0xA5), "the unsent chunk is scrubbed");

    cr_assert_eq(lshm__peer_out_alloc(peer, 1, 4, false, true, &a), 0);
    cr_assert_eq(a.chunk, 2);
    cr_assert_eq(lshm__buf_from_alloc(&a, peer, 2 * CH, &buf), 0);
    memset(lshm_buf_data(buf), 0x33, 2 * CH);
    lshm_buf_free(buf);
    cr_expect(chunk_is_all(seg, 2, 0xA5));
    cr_expect(chunk_is_all(seg, 3, 0xA5));
    lshm__peer_put(peer);
}

LTEST(segment, free_chunks_bounded)
{
    struct lshm_seg *seg;

    cr_assert_eq(lshm__seg_create(0, getpid(), FAKE_PID, 1, &seg), 0);
    seg->scrub = true;
    memset(seg->hdr->free_map, 0, sizeof(seg->hdr->free_map));
    lshm__seg_free_chunks(seg, 638, 100);
    cr_assert(lshm__chunk_is_free(seg->hdr->free_map, 638));
    cr_assert(lshm__chunk_is_free(seg->hdr->free_map, 639));
    cr_assert_eq(seg->hdr->free_map_padding, 0, "the sentinel stays");
    lshm__seg_free_chunks(seg, LSHM_CHUNK_COUNT, 1);
    lshm__seg_free_chunks(seg, 0xffffffffu, 2);
    cr_assert_eq(seg->hdr->free_map_padding, 0);
    cr_assert_eq(seg->hdr->free_map[0], 0);
    lshm__seg_free_chunks(seg, 1, 0xffffffffu);
    cr_assert_eq(seg->hdr->free_map[0], ~1ull);
    cr_assert_eq(seg->hdr->free_map_padding, 0);
    lshm__seg_unref(seg);
}

LTEST(segment, take_oosm)
{
    struct lshm_seg *seg;

    cr_assert_eq(lshm__seg_create(0, getpid(), FAKE_PID, 1, &seg), 0);
    cr_assert_not(lshm__seg_take_oosm(seg));
    seg->hdr->oosm = 1;
    cr_assert(lshm__seg_take_oosm(seg));
    cr_assert_eq(seg->hdr->oosm, 0);
    cr_assert_not(lshm__seg_take_oosm(seg), "one ACK per flag");
    seg->hdr->oosm = 7;
    cr_assert_not(lshm__seg_take_oosm(seg), "only 1 means set");
    lshm__seg_unref(seg);
}

/* ---- tracking: canceller against receiver ---- */

#define RACE_ROUNDS  20000
#define RACE_MS      4000

/* Shared between the racers; in MAP_SHARED memory for the process case. */
struct race {
    _Atomic uint32_t ready;    /* round the receiver waits for */
    _Atomic uint32_t go;       /* round number published */
    _Atomic uint32_t done;     /* rounds the other side finished */
    uint32_t         slot;
    uint32_t         stream;
    _Atomic uint8_t  other_won[RACE_ROUNDS];
    _Atomic int      stop;
};

/*
 * A random head start for either side, so that both win some rounds; the
 * yield lets the other side win when both share one CPU.
 */
static void spin(uint64_t *rng)
{
    unsigned n = (unsigned)pattern_rand_below(rng, 1024);

    if (n % 4 == 0) {
        sched_yield();
        return;
    }
    for (volatile unsigned i = 0; i < n; i++)
        ;
}

/* The receiver: waits for each round and resolves against the canceller. */
static int receiver(struct race *r, struct lshm_segment_header *hdr)
{
    uint64_t rng = pattern_seed(12345);
    long long end = now_ms() + RACE_MS + 5000;

    for (uint32_t round = 1; round <= RACE_ROUNDS; round++) {
        unsigned n = 0;

        atomic_store(&r->ready, round);
        while (atomic_load(&r->go) != round) {
            if (atomic_load(&r->stop))
                return 0;
            if (++n % 1024 == 0) {
                sched_yield();
                if (now_ms() > end)
                    return 1;
            }
        }
        spin(&rng);
        atomic_store(&r->other_won[round - 1],
                     lshm__tracking_resolve(hdr, r->slot, r->stream));
        atomic_store(&r->done, round);
    }
    return 0;
}

struct race_thread_arg {
    struct race                *r;
    struct lshm_segment_header *hdr;
};

static void *receiver_thread(void *arg)
{
    struct race_thread_arg *a = arg;

    return (void *)(intptr_t)receiver(a->r, a->hdr);
}

/*
 * The canceller's side of each round: take a slot, publish the stream,
 * start the round and race.  Exactly one side may win; the loser frees the
 * slot, so it is free once both are done.  One round in eight lets the
 * receiver go first and one the canceller, so that both outcomes are
 * checked even when the scheduler never lets the two really race.
 */
static void run_race(struct race *r, struct lshm_peer *peer)
{
    unsigned mine = 0, theirs = 0, raced = 0;
    uint64_t rng = pattern_seed(777);
    long long end = now_ms() + RACE_MS;
    struct lshm_segment_header *hdr = NULL;

    for (uint32_t round = 1; round <= RACE_ROUNDS; round++) {
        unsigned mode = round % 8, n = 0;
        uint32_t skip = round % 97;
        struct lshm_alloc a;
        bool won = false, theirs_won;

        /* Vary the slot: hold the ones below it for this round. */
        if (hdr != NULL)
            for (uint32_t k = 0; k < skip; k++)
                cr_assert(lshm__chunk_try_busy(hdr->free_tracking_map, k), "slot %u", k);
        cr_assert_eq(lshm__peer_out_alloc(peer, 1, 1, true, false, &a), 0,
                     "round %u: no free tracking slot (a loser did not free one)", round);
        if (hdr == NULL)
            skip = 0;
        hdr = a.seg->hdr;
        cr_assert_eq(a.chunk, skip, "round %u: slot %u", round, a.chunk);
        r->slot = a.chunk;
        r->stream = round * 2 + 1;
        lshm__tracking_set(hdr, a.chunk, r->stream);
        if (mode == 1)
            won = lshm__tracking_resolve(hdr, a.chunk, r->stream);
        /* Start the round only once the receiver is spinning for it. */
        while (atomic_load(&r->ready) != round) {
            if (++n % 1024 == 0)
                sched_yield();
            cr_assert(now_ms() < end + 5000, "round %u: the receiver is stuck", round);
        }
        atomic_store(&r->go, round);
        if (mode >= 2) {
            spin(&rng);
            won = lshm__tracking_resolve(hdr, a.chunk, r->stream);
        }
        while (atomic_load(&r->done) != round) {
            if (++n % 1024 == 0)
                sched_yield();
            cr_assert(now_ms() < end + 5000, "round %u: the receiver is stuck", round);
        }
        if (mode == 0)
            won = lshm__tracking_resolve(hdr, a.chunk, r->stream);
        theirs_won = atomic_load(&r->other_won[round - 1]);
        cr_assert_neq(won, theirs_won, "round %u: %s won", round, won ? "both" : "neither");
        if (mode < 2)
            cr_assert_eq(won, mode == 1, "round %u: the first to resolve wins", round);
        cr_assert(lshm__chunk_is_free(hdr->free_tracking_map, a.chunk),
                  "round %u: slot %u not freed by the loser", round, a.chunk);
        cr_assert_eq(hdr->tracking[a.chunk], 0, "round %u: the winner zeroes the slot", round);
        for (uint32_t k = 0; k < skip; k++)
            lshm__chunk_set_free(hdr->free_tracking_map, k);
        if (mode >= 2) {
            mine += won;
            theirs += theirs_won;
            raced++;
        }
        lshm__seg_unref(a.seg);
        if (now_ms() > end)
            break;
    }
    atomic_store(&r->stop, 1);
    /* Under load the two may never overlap: worth a note, not a failure. */
    cr_log_info("tracking race: %u raced rounds, canceller won %u, receiver %u",
                raced, mine, theirs);
    cr_expect_gt(raced, 1000);
    for (unsigned w = 0; w < LSHM_FREE_WORDS; w++)
        cr_expect_eq(hdr->free_tracking_map[w], ~0ull, "no slot leaked");
    cr_expect_eq(hdr->free_tracking_map_padding, 0);
}

LTEST(segment, tracking_race_threads)
{
    struct race *r = calloc(1, sizeof(*r));
    struct race_thread_arg arg;
    struct lshm_peer *peer;
    struct lshm_alloc a;
    pthread_t t;
    void *ret;

    cr_assert_not_null(r);
    cr_assert_eq(lshm__peer_get(FAKE_PID, &peer), 0);
    /* Make the segment first so that the receiver can be given its header. */
    cr_assert_eq(lshm__peer_out_alloc(peer, 1, 1, true, false, &a), 0);
    lshm__chunk_set_free(a.seg->hdr->free_tracking_map, a.chunk);
    arg = (struct race_thread_arg){ .r = r, .hdr = a.seg->hdr };
    cr_assert_eq(pthread_create(&t, NULL, receiver_thread, &arg), 0);
    run_race(r, peer);
    pthread_join(t, &ret);
    cr_expect_eq((intptr_t)ret, 0);
    lshm__seg_unref(a.seg);
    lshm__peer_put(peer);
    free(r);
}

LTEST(segment, tracking_race_processes)
{
    struct lshm_peer *peer;
    struct lshm_alloc a;
    struct race *r;
    pid_t child;
    int fd, status;

    r = mmap(NULL, sizeof(*r), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    cr_assert_neq(r, MAP_FAILED);
    cr_assert_eq(lshm__peer_get(FAKE_PID, &peer), 0);
    cr_assert_eq(lshm__peer_out_alloc(peer, 1, 1, true, false, &a), 0);
    lshm__chunk_set_free(a.seg->hdr->free_tracking_map, a.chunk);
    fd = dup(a.seg->fd);
    cr_assert_geq(fd, 0);

    child = fork();
    cr_assert_geq(child, 0);
    if (child == 0) {
        void *mem;

        prctl(PR_SET_PDEATHSIG, SIGKILL);
        /* The receiver maps the segment itself, as it would from SCM_RIGHTS. */
        mem = mmap(NULL, LSHM_SEGMENT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (mem == MAP_FAILED)
            _exit(2);
        _exit(receiver(r, mem));
    }
    run_race(r, peer);
    status = wait_child(child, 10000);
    cr_expect(WIFEXITED(status) && WEXITSTATUS(status) == 0, "receiver status %d", status);
    close(fd);
    lshm__seg_unref(a.seg);
    lshm__peer_put(peer);
    munmap(r, sizeof(*r));
}

LTEST(segment, tracking_stream_zero_never_wins)
{
    struct lshm_seg *seg;

    cr_assert_eq(lshm__seg_create(0, getpid(), FAKE_PID, 1, &seg), 0);
    cr_assert(lshm__chunk_try_busy(seg->hdr->free_tracking_map, 5));
    cr_assert_not(lshm__tracking_resolve(seg->hdr, 5, 0));
    cr_assert_not(lshm__chunk_is_free(seg->hdr->free_tracking_map, 5));
    cr_assert_not(lshm__tracking_resolve(seg->hdr, LSHM_CHUNK_COUNT, 1), "slot bounded");
    lshm__tracking_set(seg->hdr, LSHM_CHUNK_COUNT, 1);
    cr_assert_eq(seg->hdr->free_tracking_map_padding, 0);
    lshm__tracking_set(seg->hdr, 5, 9);
    cr_assert_not(lshm__tracking_resolve(seg->hdr, 5, 8), "another stream loses");
    cr_assert(lshm__chunk_is_free(seg->hdr->free_tracking_map, 5));
    lshm__seg_unref(seg);
}
