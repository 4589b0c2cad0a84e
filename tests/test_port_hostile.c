/*
 * Hostile peers.  A raw SOCK_SEQPACKET end (the peer socket of
 * lshm_socketpair) speaks the protocol by hand: a correct HELLO, then one
 * bad message.  Each must close only that port, with a reason, -EPROTO from
 * lshm_recv, no crash, no fd or mapping left behind, while a second,
 * well-behaved port of the same context (a forked child echoing) keeps
 * working.  Every case runs with multishot receives and with single-shot
 * ones (LSHM_CTX_NO_MULTISHOT): the two receive paths differ.
 */
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "linuxshm.h"
#include "port.h"
#include "port_util.h"
#include "shm.h"
#include "wire.h"

/* ---- the well-behaved port: a forked child echoing inline (echo_pull) ---- */

struct hostile {
    struct lshm_ctx  *ctx;
    struct lshm_port *good;
    pid_t             child;
    uint32_t          seq;
    struct lshm_port *bad;
    int               raw;
    int               fds1, maps1;   /* with the good port up, before the bad one */
};

/* n round trips on the good port, inline and through shared memory. */
static void good_pingpong(struct hostile *h, unsigned n)
{
    unsigned i, j;

    for (i = 0; i < n; i++) {
        uint32_t seq = h->seq++;
        size_t size = (i % 3 == 2) ? 10000 + i : 64 + i;
        struct lshm_out out = { .type = T_DATA, .stream = seq, .fd = -1 };
        uint8_t buf[256];
        struct lshm_buf *b = NULL;
        struct lshm_msg m;
        int ret;

        if (size <= sizeof(buf)) {
            for (j = 0; j < size; j++)
                buf[j] = pattern_byte(seq, j);
            out.data = buf;
            out.size = size;
        } else {
            ret = lshm_buf_alloc(h->good, size, &b);
            cr_assert_eq(ret, 0, "good port: alloc %d %s", ret, lshm_last_error());
            for (j = 0; j < size; j++)
                ((uint8_t *)lshm_buf_data(b))[j] = pattern_byte(seq, j);
            lshm_buf_set_size(b, size);
            out.bufs = &b;
            out.nbufs = 1;
        }
        ret = lshm_send(h->good, &out, 0);
        cr_assert_eq(ret, 0, "good port: send %d %s", ret, lshm_last_error());
        ret = lshm_recv(h->good, &m, 10000);
        cr_assert_eq(ret, 0, "good port stopped working: %d %s", ret, lshm_last_error());
        cr_assert_eq(m.stream, seq);
        cr_assert_eq(m.size, size);
        for (j = 0; j < size; j++)
            cr_assert_eq(((uint8_t *)m.iov[0].base)[j], pattern_byte(seq, j));
        lshm_msg_done(&m);
    }
}

static size_t put_hdr(uint8_t *p, uint32_t stream, pid_t pid, uint8_t type, uint8_t flags,
                      uint32_t size)
{
    struct lshm_wire_msg h = { .stream = stream, .pid = pid, .port_id = RAW_PORT,
                               .type = type, .flags = flags, .size = size };

    memcpy(p, &h, sizeof(h));
    return sizeof(h);
}

static void raw_hello(int fd, pid_t pid)
{
    uint8_t buf[64];

    raw_sendv(fd, buf, raw_hello_build(buf, pid, LSHM_PROTOCOL_VERSION), NULL, 0);
}

/* A control or user message with no body beyond what is given. */
static void raw_msg(struct hostile *h, uint32_t stream, pid_t pid, uint8_t type, uint8_t flags,
                    uint32_t size, const void *body, size_t blen, const int *fds, unsigned nfds)
{
    uint8_t buf[LSHM_WIRE_MAX + 200];
    size_t off = put_hdr(buf, stream, pid, type, flags, size);

    cr_assert_leq(off + blen, sizeof(buf));
    if (blen)
        memcpy(buf + off, body, blen);
    raw_sendv(h->raw, buf, off + blen, fds, nfds);
}

static void raw_mmap(struct hostile *h, uint32_t id, int fd)
{
    raw_msg(h, 0, getpid(), LSHM_WIRE_MMAP_MSG, 0, 4, &id, 4, &fd, 1);
}

/* One user message pointing into shared memory. */
static void raw_desc(struct hostile *h, uint32_t size, const struct lshm_wire_desc *d,
                     unsigned n)
{
    raw_msg(h, 1, getpid(), T_DATA, LSHM_WIRE_MMAP, size, d, n * sizeof(*d), NULL, 0);
}

/* A segment as the protocol lays it out, from us to us (the raw peer is
 * this process); sealed or not. */
static int make_segment(uint32_t id, bool seal, struct lshm_segment_header **map)
{
    int fd = memfd_create("lshm-hostile", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    struct lshm_segment_header *hdr;

    cr_assert_geq(fd, 0);
    cr_assert_eq(ftruncate(fd, LSHM_SEGMENT_SIZE), 0);
    hdr = mmap(NULL, LSHM_SEGMENT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    cr_assert_neq(hdr, MAP_FAILED);
    hdr->magic = LSHM_MAGIC;
    hdr->version = LSHM_SEGMENT_VERSION;
    hdr->sent_over = RAW_PORT;
    hdr->id = id;
    hdr->src_pid = getpid();
    hdr->dst_pid = getpid();
    memset(hdr->free_map, 0xff, sizeof(hdr->free_map));
    memset(hdr->free_tracking_map, 0xff, sizeof(hdr->free_tracking_map));
    if (seal)
        cr_assert_eq(fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL), 0);
    if (map != NULL)
        *map = hdr;
    else
        munmap(hdr, LSHM_SEGMENT_SIZE);
    return fd;
}

static void hostile_setup(struct hostile *h, unsigned flags, bool hello)
{
    static int echo_timeout_ms = 30000;
    struct lshm_ctx_params prm = { .flags = flags };
    int ret;

    memset(h, 0, sizeof(*h));
    h->ctx = ctx_make(&prm);
    h->child = spawn(h->ctx, &prm, &h->good, echo_pull, &echo_timeout_ms);
    wait_ready(h->good);
    good_pingpong(h, 6);   /* segments both ways exist from here on */
    h->fds1 = count_fds();
    h->maps1 = count_maps(SEG_MAPS);

    h->raw = raw_peer(h->ctx, &h->bad);
    if (hello) {
        raw_hello(h->raw, getpid());
        ret = lshm_port_wait(h->bad, LSHM_WAIT_READY, 5000);
        cr_assert_gt(ret, 0, "raw HELLO refused: %d %s", ret, lshm_last_error());
    }
}

/* The bad port closed with -EPROTO and a reason containing why. */
static void hostile_closed(struct hostile *h, const char *why)
{
    struct lshm_msg m;
    const char *reason;
    int ret;

    ret = lshm_recv(h->bad, &m, 5000);
    if (ret == 0)
        lshm_msg_done(&m);
    cr_assert_eq(ret, -EPROTO, "lshm_recv on the hostile port: %d (%s)", ret,
                 lshm_last_error());
    reason = lshm_port_error(h->bad);
    cr_assert_not_null(reason);
    cr_assert(strstr(reason, why) != NULL, "reason \"%s\" does not say \"%s\"", reason, why);
    cr_log_info("hostile: %s", reason);
    cr_assert_eq(lshm_send(h->bad, &(struct lshm_out){ .type = T_DATA, .fd = -1 }, 0), -EPROTO);
}

/* The good port still works; nothing the bad one had is left. */
static void hostile_finish(struct hostile *h)
{
    int i;

    good_pingpong(h, 6);
    lshm_port_close(h->bad);
    h->bad = NULL;
    for (i = 0; i < 5; i++)
        lshm_ctx_run(h->ctx, 5);
    close(h->raw);
    h->raw = -1;
    cr_assert_eq(count_fds(), h->fds1, "fds: %d, %d before the hostile port", count_fds(),
                 h->fds1);
    cr_assert_eq(count_maps(SEG_MAPS), h->maps1, "memfd mappings: %d, %d before",
                 count_maps(SEG_MAPS), h->maps1);
    good_pingpong(h, 3);
}

static void hostile_check(struct hostile *h, const char *why)
{
    hostile_closed(h, why);
    hostile_finish(h);
}

static void hostile_teardown(struct hostile *h)
{
    spawn_end(h->ctx, h->good, h->child);
}

/* hostile_check for a message that carried a pipe's write end: rd, the read
 * end, sees EOF once every copy was closed. */
static void hostile_check_eof(struct hostile *h, const char *why, int rd)
{
    char c;

    hostile_closed(h, why);
    cr_assert_eq(read(rd, &c, 1), 0, "a write end we sent is still open");
    close(rd);
    hostile_finish(h);
}

typedef void (*hostile_case)(struct hostile *h);

static void both_modes(hostile_case fn, bool hello)
{
    static const unsigned modes[] = { 0, LSHM_CTX_NO_MULTISHOT };
    unsigned i;

    for (i = 0; i < 2; i++) {
        struct hostile h;

        hostile_setup(&h, modes[i], hello);
        fn(&h);
        hostile_teardown(&h);
    }
}

/* ---- the cases ---- */

static void first_not_hello(struct hostile *h)
{
    uint8_t body[4] = { 1, 2, 3, 4 };

    raw_msg(h, 1, getpid(), T_DATA, 0, 4, body, 4, NULL, 0);
    cr_assert_eq(lshm_port_wait(h->bad, LSHM_WAIT_READY, 5000), -EPROTO);
    hostile_check(h, "not HELLO");
}

LTEST(hostile, first_message_not_hello)
{
    both_modes(first_not_hello, false);
}

static void hello_pid_not_credentials(struct hostile *h)
{
    raw_hello(h->raw, getpid() + 1);
    cr_assert_eq(lshm_port_wait(h->bad, LSHM_WAIT_READY, 5000), -EPROTO);
    hostile_check(h, "PID namespace");
}

LTEST(hostile, hello_pid_differs_from_credentials)
{
    both_modes(hello_pid_not_credentials, false);
}

/* A user message with a 4-byte body, its header from pid with flags: refused for why. */
static void bad_header(struct hostile *h, pid_t pid, uint8_t flags, const char *why)
{
    uint8_t body[4] = { 0 };

    raw_msg(h, 1, pid, T_DATA, flags, 4, body, 4, NULL, 0);
    hostile_check(h, why);
}

static void header_pid_not_credentials(struct hostile *h)
{
    bad_header(h, getpid() + 1, 0, "pid");
}

LTEST(hostile, header_pid_differs_from_credentials)
{
    both_modes(header_pid_not_credentials, true);
}

static void unknown_flag(struct hostile *h)
{
    bad_header(h, getpid(), 0x08, "unknown flag");
}

LTEST(hostile, unknown_flag_bit)
{
    both_modes(unknown_flag, true);
}

static void desc_unknown_segment(struct hostile *h)
{
    struct lshm_wire_desc d = { .mmap_id = 3, .chunk_id = 0, .size = 100 };

    raw_desc(h, 100, &d, 1);
    hostile_check(h, "never sent");
}

LTEST(hostile, descriptor_for_unknown_mmap_id)
{
    both_modes(desc_unknown_segment, true);
}

/* A valid segment and a valid descriptor first, then one past the end. */
static void desc_out_of_data_area(struct hostile *h)
{
    struct lshm_segment_header *hdr;
    struct lshm_wire_desc d = { .mmap_id = 0, .chunk_id = 0, .size = 100 };
    int fd = make_segment(0, true, &hdr);
    uint8_t *data = (uint8_t *)hdr + LSHM_HEADER_SIZE;
    struct lshm_msg m;
    unsigned i;

    raw_mmap(h, 0, fd);
    close(fd);
    lshm__chunk_set_busy(hdr->free_map, 0);
    for (i = 0; i < 100; i++)
        data[i] = pattern_byte(1, i);
    raw_desc(h, 100, &d, 1);
    cr_assert_eq(lshm_recv(h->bad, &m, 5000), 0, "valid descriptor refused: %s",
                 lshm_port_error(h->bad));
    cr_assert_eq(m.size, 100);
    cr_assert(m.flags & LSHM_MSG_SHM);
    cr_assert_eq(m.niov, 1);
    for (i = 0; i < 100; i++)
        cr_assert_eq(((uint8_t *)m.iov[0].base)[i], pattern_byte(1, i));
    cr_assert_eq(hdr->sent_over, LSHM_SENT_OVER_ANY, "receiver did not claim the segment");
    lshm_msg_done(&m);
    cr_assert(lshm__chunk_is_free(hdr->free_map, 0), "chunk 0 not given back");

    d.chunk_id = 639;
    d.size = 32768;
    raw_desc(h, 32768, &d, 1);
    hostile_closed(h, "past the data area");
    munmap(hdr, LSHM_SEGMENT_SIZE);
    hostile_finish(h);
}

LTEST(hostile, descriptor_past_the_data_area)
{
    both_modes(desc_out_of_data_area, true);
}

static void mmap_pipe(struct hostile *h)
{
    int p[2];

    cr_assert_eq(pipe(p), 0);
    raw_mmap(h, 0, p[1]);
    close(p[1]);
    hostile_check_eof(h, "not a regular file", p[0]);
}

LTEST(hostile, mmap_with_a_pipe_fd)
{
    both_modes(mmap_pipe, true);
}

/* MMAP of a segment made with id and seal: refused for why. */
static void bad_mmap(struct hostile *h, uint32_t id, bool seal, const char *why)
{
    int fd = make_segment(id, seal, NULL);

    raw_mmap(h, id, fd);
    close(fd);
    hostile_check(h, why);
}

static void mmap_unsealed(struct hostile *h)
{
    bad_mmap(h, 0, false, "not sealed");
}

LTEST(hostile, mmap_with_an_unsealed_memfd)
{
    both_modes(mmap_unsealed, true);
}

static void mmap_skips_id(struct hostile *h)
{
    bad_mmap(h, 1, true, "expected 0");
}

LTEST(hostile, mmap_id_skipping_0)
{
    both_modes(mmap_skips_id, true);
}

/* A user message (4-byte body) carrying n copies of a pipe's write end, our
 * copies closed once sent; returns the read end. */
static int send_pipe_copies(struct hostile *h, unsigned n)
{
    uint8_t body[4] = { 0 };
    int p[2], fds[30];
    unsigned i;

    cr_assert_leq(n, 30);
    cr_assert_eq(pipe(p), 0);
    fds[0] = p[1];
    for (i = 1; i < n; i++)
        fds[i] = dup(p[1]);
    raw_msg(h, 1, getpid(), T_DATA, 0, 4, body, 4, fds, n);
    for (i = 0; i < n; i++)
        close(fds[i]);
    return p[0];
}

static void three_fds(struct hostile *h)
{
    int rd = send_pipe_copies(h, 3);
    int before = count_fds();

    cr_assert_eq(lshm_recv(h->bad, &(struct lshm_msg){ 0 }, 5000), -EPROTO);
    /* The three received copies are closed at once, not at port close. */
    cr_assert_leq(count_fds(), before, "received fds kept open");
    hostile_check_eof(h, "more than one fd", rd);
}

LTEST(hostile, user_message_with_3_fds)
{
    both_modes(three_fds, true);
}

static void ctrl_with_fd(struct hostile *h)
{
    int p[2];

    cr_assert_eq(pipe(p), 0);
    raw_msg(h, 0, getpid(), LSHM_WIRE_SHM_ACK, 0, 0, NULL, 0, &p[1], 1);
    close(p[1]);
    hostile_check_eof(h, "fd on a message type", p[0]);
}

LTEST(hostile, control_message_with_an_fd)
{
    both_modes(ctrl_with_fd, true);
}

static void oversized(struct hostile *h)
{
    static uint8_t body[LSHM_WIRE_MAX + 100];

    raw_msg(h, 1, getpid(), T_DATA, 0, LSHM_WIRE_MAX + 100 - 16, body,
            LSHM_WIRE_MAX + 100 - 16, NULL, 0);
    hostile_check(h, "longer than");
}

LTEST(hostile, datagram_longer_than_wire_max_truncated)
{
    both_modes(oversized, true);
}

static void one_byte_over(struct hostile *h)
{
    static uint8_t body[LSHM_WIRE_MAX];

    raw_msg(h, 1, getpid(), T_DATA, 0, LSHM_WIRE_MAX + 1 - 16, body, LSHM_WIRE_MAX + 1 - 16,
            NULL, 0);
    hostile_check(h, "longer than");
}

LTEST(hostile, datagram_one_byte_over_wire_max)
{
    both_modes(one_byte_over, true);
}

static void sum_mismatch(struct hostile *h)
{
    struct lshm_segment_header *hdr;
    struct lshm_wire_desc d[2] = { { 0, 0, 100 }, { 0, 1, 200 } };
    int fd = make_segment(0, true, &hdr);

    raw_mmap(h, 0, fd);
    close(fd);
    raw_desc(h, 301, d, 2);
    hostile_closed(h, "do not sum");
    munmap(hdr, LSHM_SEGMENT_SIZE);
    hostile_finish(h);
}

LTEST(hostile, descriptor_sizes_do_not_sum_to_size)
{
    both_modes(sum_mismatch, true);
}

/* An empty datagram is not EOF: it is a violation, the port keeps no fd. */
static void empty_datagram(struct hostile *h)
{
    raw_sendv(h->raw, "", 0, NULL, 0);
    hostile_check(h, "shorter than header");
}

LTEST(hostile, empty_datagram)
{
    both_modes(empty_datagram, true);
}

/* More fds than the receive's control buffer holds: MSG_CTRUNC; every
 * fd that did arrive is closed (the kernel drops the rest). */
static void too_many_fds(struct hostile *h)
{
    hostile_check_eof(h, "truncated", send_pipe_copies(h, 30));
}

LTEST(hostile, too_many_fds_control_truncated)
{
    both_modes(too_many_fds, true);
}

static void second_hello(struct hostile *h)
{
    raw_hello(h->raw, getpid());
    hostile_check(h, "second HELLO");
}

LTEST(hostile, second_hello)
{
    both_modes(second_hello, true);
}

static void tracking_unknown(struct hostile *h)
{
    uint8_t body[8 + 4] = { 0 };
    struct lshm_wire_tracking t = { .mmap_id = 0, .tracking_id = 5 };

    memcpy(body, &t, sizeof(t));
    raw_msg(h, 9, getpid(), T_DATA, LSHM_WIRE_TRACKING, 4, body, sizeof(body), NULL, 0);
    hostile_check(h, "does not exist");
}

LTEST(hostile, tracking_in_a_segment_never_sent)
{
    both_modes(tracking_unknown, true);
}

/* What the library sends the raw end: one datagram, and its fd if any. */
static ssize_t raw_recv(int fd, struct lshm_wire_msg *hdr, void *body, size_t blen, int *rfd)
{
    uint8_t buf[LSHM_WIRE_MAX + 64];
    union {
        struct cmsghdr align;
        char           buf[256];
    } cm;
    struct iovec iov = { .iov_base = buf, .iov_len = sizeof(buf) };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf,
                         .msg_controllen = sizeof(cm.buf) };
    struct cmsghdr *c;
    struct pollfd pfd = { .fd = fd, .events = POLLIN };
    ssize_t n;

    *rfd = -1;
    cr_assert_eq(poll(&pfd, 1, 5000), 1, "the library sent nothing");
    n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
    cr_assert_geq(n, (ssize_t)sizeof(*hdr));
    for (c = CMSG_FIRSTHDR(&mh); c != NULL; c = CMSG_NXTHDR(&mh, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
            memcpy(rfd, CMSG_DATA(c), sizeof(int));
    memcpy(hdr, buf, sizeof(*hdr));
    if (body != NULL)
        memcpy(body, buf + sizeof(*hdr), (size_t)n - sizeof(*hdr) < blen ?
                                         (size_t)n - sizeof(*hdr) : blen);
    return n;
}

/*
 * The peer owns our segment's header as much as we do: with every free
 * bit and both paddings set and oosm garbage, allocation, growth and
 * tracking stay inside the segment.
 */
static void corrupt_header(struct hostile *h)
{
    struct lshm_wire_msg hdr;
    struct lshm_segment_header *sh;
    struct lshm_buf *b;
    uint32_t mmap_id;
    int fd, i, ret;
    uint8_t *base;

    ret = lshm_buf_alloc(h->bad, 100, &b);
    cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    memset(lshm_buf_data(b), 0x5a, 100);
    cr_assert_eq(lshm_buf_set_size(b, 100), 0);
    cr_assert_eq(lshm_send(h->bad, &(struct lshm_out){ .type = T_DATA, .bufs = &b, .nbufs = 1,
                                                       .fd = -1 }, 0), 0);
    raw_recv(h->raw, &hdr, NULL, 0, &fd);          /* HELLO */
    cr_assert_eq(hdr.type, LSHM_WIRE_HELLO);
    cr_assert_eq(fd, -1);
    raw_recv(h->raw, &hdr, &mmap_id, sizeof(mmap_id), &fd);
    cr_assert_eq(hdr.type, LSHM_WIRE_MMAP_MSG);
    cr_assert_eq(mmap_id, 0);
    cr_assert_geq(fd, 0);
    sh = mmap(NULL, LSHM_SEGMENT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    cr_assert_neq(sh, MAP_FAILED);
    close(fd);
    /* Everything free, sentinels gone, oosm garbage, tracking garbage. */
    memset(sh->free_map, 0xff, sizeof(sh->free_map) + sizeof(sh->free_map_padding));
    memset(sh->free_tracking_map, 0xff,
           sizeof(sh->free_tracking_map) + sizeof(sh->free_tracking_map_padding));
    sh->oosm = 0xdeadbeef;
    memset(sh->tracking, 0xee, sizeof(sh->tracking));

    for (i = 0; i < 3; i++) {
        /* The free run starts at chunk 0, 630, 639 and "goes on" into the
         * padding. */
        uint32_t first = i == 0 ? 0 : i == 1 ? 630 : 639, c;

        for (c = 0; c < first; c++)
            lshm__chunk_set_busy(sh->free_map, c);
        ret = lshm_buf_alloc(h->bad, LSHM_DATA_SIZE, &b);
        cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
        base = (uint8_t *)b->seg->hdr;   /* the library's own mapping */
        cr_assert_eq(lshm_buf_capacity(b), (size_t)(640 - first) * LSHM_CHUNK_SIZE,
                     "capacity %zu from chunk %u", lshm_buf_capacity(b), first);
        cr_assert_geq((uint8_t *)lshm_buf_data(b), base + LSHM_HEADER_SIZE);
        cr_assert_leq((uint8_t *)lshm_buf_data(b) + lshm_buf_capacity(b),
                      base + LSHM_SEGMENT_SIZE, "buffer runs past the segment");
        /* Growth past the last chunk finds the padding set: refused anyway. */
        lshm_buf_grow(b, LSHM_DATA_SIZE, 0);
        cr_assert_leq((uint8_t *)lshm_buf_data(b) + lshm_buf_capacity(b),
                      base + LSHM_SEGMENT_SIZE, "growth ran past the segment");
        memset(lshm_buf_data(b), 0x77, lshm_buf_capacity(b));
        lshm_buf_free(b);
        memset(sh->free_map, 0xff, sizeof(sh->free_map) + sizeof(sh->free_map_padding));
    }
    for (i = 0; i < 700; i++) {
        struct lshm_tracking *t;

        ret = lshm_tracking_new(h->bad, 1 + i, &t);
        if (ret == -EAGAIN)
            break;
        cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
        cr_assert_lt(t->slot, LSHM_CHUNK_COUNT, "tracking slot %u", t->slot);
        lshm_tracking_cancel(t);
        memset(sh->free_tracking_map, 0xff,
               sizeof(sh->free_tracking_map) + sizeof(sh->free_tracking_map_padding));
    }
    munmap(sh, LSHM_SEGMENT_SIZE);
    /* Not a violation by itself: close from our side. */
    shutdown(h->raw, SHUT_RDWR);
    cr_assert_eq(lshm_recv(h->bad, &(struct lshm_msg){ 0 }, 5000), -EPIPE);
    hostile_finish(h);
}

LTEST(hostile, peer_corrupting_our_segment_header_stays_in_bounds)
{
    both_modes(corrupt_header, true);
}

/*
 * A peer that frees chunks (sets their bits) but never sends SHM_ACK: the
 * sender waiting for memory must still notice within its recheck period.
 */
LTEST(hostile, chunks_freed_without_shm_ack_wake_the_sender)
{
    struct lshm_ctx_params prm = { .max_segments = 1 };
    struct lshm_ctx *ctx = ctx_make(&prm);
    struct lshm_port *port;
    int raw = raw_peer(ctx, &port), fd, ret;
    struct lshm_segment_header *sh = NULL;
    struct lshm_wire_msg hdr;
    struct lshm_buf *b;
    unsigned sent = 0;
    long long t0;

    raw_hello(raw, getpid());
    cr_assert_gt(lshm_port_wait(port, LSHM_WAIT_READY, 5000), 0);
    while ((ret = lshm_buf_alloc(port, 1024 * 1024, &b)) == 0) {
        lshm_buf_set_size(b, 1024 * 1024);
        cr_assert_eq(lshm_send(port, &(struct lshm_out){ .type = T_DATA, .stream = sent,
                                                         .bufs = &b, .nbufs = 1, .fd = -1 },
                               0), 0);
        sent++;
        cr_assert_leq(sent, 10);
    }
    cr_assert_eq(ret, -EAGAIN);
    cr_assert_eq(sent, 10);
    cr_assert_gt(lshm_port_wait(port, LSHM_WAIT_IDLE, 5000), 0);
    /* Our side of the raw socket: HELLO, MMAP, ten user messages. */
    raw_recv(raw, &hdr, NULL, 0, &fd);
    cr_assert_eq(hdr.type, LSHM_WIRE_HELLO);
    raw_recv(raw, &hdr, NULL, 0, &fd);
    cr_assert_eq(hdr.type, LSHM_WIRE_MMAP_MSG);
    cr_assert_geq(fd, 0);
    sh = mmap(NULL, LSHM_SEGMENT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    cr_assert_neq(sh, MAP_FAILED);
    close(fd);
    cr_assert_eq(lshm_port_wait(port, LSHM_WAIT_SHM, 100), -ETIMEDOUT);
    cr_assert_eq(__atomic_load_n(&sh->oosm, __ATOMIC_ACQUIRE), 1);
    /* Free the first message's 64 chunks, say nothing. */
    for (unsigned c = 0; c < 64; c++)
        lshm__chunk_set_free(sh->free_map, c);
    t0 = now_ms();
    ret = lshm_port_wait(port, LSHM_WAIT_SHM, 2000);
    cr_assert_gt(ret, 0, "%d %s", ret, lshm_last_error());
    cr_assert_lt(now_ms() - t0, 500, "noticed only after %lld ms", now_ms() - t0);
    ret = lshm_buf_alloc(port, 1024 * 1024, &b);
    cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    cr_assert_eq(lshm_buf_capacity(b), 1024 * 1024);
    lshm_buf_free(b);
    munmap(sh, LSHM_SEGMENT_SIZE);
    lshm_port_close(port);
    lshm_ctx_free(ctx);
    close(raw);
}

/*
 * We close a port while the peer still sends: what it sent before it saw
 * our BYE is read and released, not dropped with the socket (its chunks
 * and tracking slot would stay lost to the peer while the pair lives).  A
 * peer that then never closes its end does not keep our socket either.
 */
static void drain_after_bye(struct hostile *h)
{
    uint8_t body[sizeof(struct lshm_wire_tracking) + sizeof(struct lshm_wire_desc)];
    struct lshm_wire_tracking t = { .mmap_id = 0, .tracking_id = 7 };
    struct lshm_wire_desc d = { .mmap_id = 0, .chunk_id = 5, .size = 20000 };
    struct lshm_segment_header *hdr;
    struct lshm_wire_msg wm;
    int fd = make_segment(0, true, &hdr), rfd, open_fds, i;
    long long t0;
    char c;

    raw_mmap(h, 0, fd);
    close(fd);
    /* Let the library map it while the port is open, as a peer would. */
    for (i = 0; i < 50 && hdr->sent_over != LSHM_SENT_OVER_ANY; i++)
        lshm_ctx_run(h->ctx, 10);
    cr_assert_eq(hdr->sent_over, LSHM_SENT_OVER_ANY, "segment not claimed");

    lshm_port_close(h->bad);
    h->bad = NULL;
    for (i = 0; i < 5; i++)
        lshm_ctx_run(h->ctx, 5);
    /* HELLO, then BYE, then end of file: we stopped writing. */
    cr_assert_gt(raw_recv(h->raw, &wm, NULL, 0, &rfd), 0);
    cr_assert_eq(wm.type, LSHM_WIRE_HELLO);
    cr_assert_gt(raw_recv(h->raw, &wm, NULL, 0, &rfd), 0);
    cr_assert_eq(wm.type, LSHM_WIRE_BYE);
    cr_assert_eq(recv(h->raw, &c, 1, MSG_DONTWAIT), 0, "no end of file after BYE");

    /* Sent before it saw the BYE: two chunks and a tracking slot. */
    lshm__chunk_set_busy(hdr->free_map, 5);
    lshm__chunk_set_busy(hdr->free_map, 6);
    lshm__chunk_set_busy(hdr->free_tracking_map, 7);
    __atomic_store_n(&hdr->tracking[7], 9, __ATOMIC_RELEASE);
    memcpy(body, &t, sizeof(t));
    memcpy(body + sizeof(t), &d, sizeof(d));
    raw_msg(h, 9, getpid(), T_DATA, LSHM_WIRE_TRACKING | LSHM_WIRE_MMAP, d.size, body,
            sizeof(body), NULL, 0);
    open_fds = count_fds();
    t0 = now_ms();
    while (count_fds() == open_fds && now_ms() - t0 < 3000)
        lshm_ctx_run(h->ctx, 10);
    cr_assert_eq(count_fds(), open_fds - 1, "our socket still open %lld ms after BYE",
                 now_ms() - t0);
    cr_log_info("drain: socket closed %lld ms after BYE (peer kept its end open)",
                now_ms() - t0);
    cr_assert(lshm__chunk_is_free(hdr->free_map, 5) && lshm__chunk_is_free(hdr->free_map, 6),
              "chunks of a message sent before our BYE not given back");
    cr_assert_eq(__atomic_load_n(&hdr->tracking[7], __ATOMIC_ACQUIRE), 0,
                 "tracking slot of a message sent before our BYE not resolved");
    munmap(hdr, LSHM_SEGMENT_SIZE);
    hostile_finish(h);      /* h->bad is NULL: closed above */
}

LTEST(hostile, closing_port_reads_what_the_peer_sent_before_bye)
{
    both_modes(drain_after_bye, true);
}
