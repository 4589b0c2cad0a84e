/* The independent peer (see peer.h): child side only, no library code. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <linux/futex.h>
#include <time.h>
#include <unistd.h>

#include "pattern.h"
#include "peer.h"

#ifndef MFD_NOEXEC_SEAL
#define MFD_NOEXEC_SEAL 0x0008u
#endif
#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif

static long long peer_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

/* ---- The independent peer (child side only) ---- */

struct pseg {
    struct seg_hdr *hdr;
    uint8_t        *base;
};

/* Segments belong to the pair of processes, not to a port. */
struct pair {
    struct pseg in[PEER_MAX_SEGS];   /* the library's segments, by id */
    unsigned    n_in;
    struct pseg out[PEER_MAX_SEGS];  /* ours, by id */
    unsigned    n_out;
};

/* One side's view of a message ring: ours (we produce) or the library's
 * (we consume).  pos is the counter we own, kept here, never read back. */
struct pring {
    struct ring_hdr *hdr;            /* NULL until made or received */
    uint8_t         *data;
    uint32_t         size;
    uint64_t         pos;            /* producer: tail; consumer: head */
    uint64_t         woke_at;        /* producer: head when we last woke the consumer */
    bool             woke;
};

/* A datagram read from the socket and not yet taken in the port's order. */
struct held {
    uint8_t *buf;
    size_t   len;
    int      fd;
    bool     after_ring;             /* came after the library's RING: needs a FENCE */
};

#define HELD_MAX 32

/* One port of the peer. */
struct peer {
    int          sock;
    pid_t        me;
    uint16_t     port_id;           /* ours, in every header */
    uint32_t     max_segments;      /* ours, in our HELLO */
    uint32_t     features;          /* ours, in our HELLO */
    uint32_t     ring_size;         /* ours, in our HELLO: largest ring we accept */
    uint32_t     out_ring_size;     /* the ring we make (0: 65536) */
    bool         wake_by_datagram;  /* wake the library with WAKE even if it set FUTEX */
    struct pair *pr;
    pid_t        lib_pid;           /* from the credentials of the library's HELLO */
    uint16_t     lib_port;
    uint32_t     lib_max_segments;
    uint32_t     lib_features;
    uint32_t     lib_ring_size;
    bool         rings;             /* both HELLOs set RING */
    struct pring out;               /* ours */
    struct pring in;                /* the library's */
    struct held  q[HELD_MAX];
    unsigned     q_head, q_len;
    uint8_t     *mbuf;              /* the current message's bytes */
    bool         eof;
    unsigned     acks;              /* SHM_ACKs received */
    bool         got_bye;
    bool         sent_bye;
    /* What the peer counted, for the reports. */
    unsigned     ring_msgs_in, sock_msgs_in;   /* user messages by carrier */
    unsigned     ring_msgs_out, sock_msgs_out;
    unsigned     fences_in, skips_in, skips_out;
    unsigned     wake_dgrams_in, futex_woken;  /* how we were woken */
    unsigned     wake_dgrams_out, futex_wakes_out;
    unsigned     ring_full;                     /* times our ring was full */
    unsigned     space_acks_out;                /* SHM_ACKs for room in the library's ring */
    unsigned     sleeps;                        /* times we slept with wake = 1 */
};

/* A user message as the peer received it; inl points into p->mbuf. */
struct pmsg {
    struct w_hdr      h;
    bool              tracked;
    struct w_tracking trk;
    unsigned          ndesc;
    struct w_desc     desc[P_MAX_DESCS];
    const uint8_t    *inl;
    int               fd;
    bool              from_ring;
};

static uint8_t rbuf[P_WIRE_MAX];
static uint8_t sbuf[P_WIRE_MAX + sizeof(struct w_hdr)];

__attribute__((noreturn, format(printf, 2, 3)))
static void peer_fail(int line, const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "interop peer %d: %s:%d: ", (int)getpid(), __FILE__, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    _exit(1);
}

#define PFAIL(...) peer_fail(__LINE__, __VA_ARGS__)
#define PCK(c)                                                        \
    do {                                                              \
        if (!(c))                                                     \
            peer_fail(__LINE__, "check failed: %s (errno %d)", #c, errno); \
    } while (0)

static long futex(uint32_t *word, int op, uint32_t val, const struct timespec *ts)
{
    /* Shared, not private: the word lives in memory of two processes. */
    return syscall(SYS_futex, word, op, val, ts, NULL, 0);
}

/* ---- the ring we produce ---- */

static uint64_t rec_span(uint32_t len)
{
    return sizeof(struct rec_hdr) + (((uint64_t)len + 7) & ~7ull);
}

static void sock_send(struct peer *p, uint32_t stream, uint8_t type, uint8_t flags,
                      uint32_t size, const void *body, size_t body_len, int fd);
static void pump(struct peer *p, int timeout_ms);

/* Our ring: a sealed memfd of 4096 + size bytes, header written, then RING. */
static void ring_make(struct peer *p)
{
    uint32_t size = p->out_ring_size ? p->out_ring_size : P_RING_MIN;
    struct ring_hdr *h;
    int fd;

    PCK(p->rings && p->out.hdr == NULL);
    PCK(size <= p->lib_ring_size);
    fd = memfd_create("interop-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_NOEXEC_SEAL);
    if (fd < 0 && errno == EINVAL)
        fd = memfd_create("interop-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    PCK(fd >= 0);
    PCK(ftruncate(fd, (off_t)P_RING_HDR + size) == 0);
    h = mmap(NULL, (size_t)P_RING_HDR + size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    PCK(h != MAP_FAILED);
    h->magic = P_RING_MAGIC;          /* a new memfd reads as zeros */
    h->version = P_RING_VERSION;
    h->port_id = p->port_id;
    h->size = size;
    h->src_pid = p->me;
    h->dst_pid = p->lib_pid;
    /* The page asks for SHRINK | GROW only: no SEAL_SEAL, to show the
     * library asks no more. */
    PCK(fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) == 0);
    p->out.hdr = h;
    p->out.data = (uint8_t *)h + P_RING_HDR;
    p->out.size = size;
    p->out.pos = 0;
    p->out.woke = false;
    sock_send(p, 0, P_RING, 0, sizeof(size), &size, sizeof(size), fd);
    close(fd);
}

/* The consumer's head, bounded: not past our tail, not more than the ring behind. */
static uint64_t ring_head(struct peer *p)
{
    uint64_t head = __atomic_load_n(&p->out.hdr->head, __ATOMIC_ACQUIRE);

    if (head > p->out.pos || p->out.pos - head > p->out.size)
        PFAIL("the library's head %llu is out of bounds (our tail %llu, size %u)",
              (unsigned long long)head, (unsigned long long)p->out.pos, p->out.size);
    return head;
}

/* Wait until need bytes are free from tail on: space = 1, SHM_ACK or a recheck. */
static void ring_room(struct peer *p, uint64_t need)
{
    long long end = peer_now_ms() + TIMEOUT_MS;
    bool counted = false;

    while (p->out.size - (p->out.pos - ring_head(p)) < need) {
        if (!counted)
            p->ring_full++;
        counted = true;
        __atomic_store_n(&p->out.hdr->space, 1, __ATOMIC_SEQ_CST);
        if (p->out.size - (p->out.pos - ring_head(p)) >= need)
            break;
        if (peer_now_ms() > end)
            PFAIL("our ring stayed full for %d ms (head %llu, tail %llu)", TIMEOUT_MS,
                  (unsigned long long)ring_head(p), (unsigned long long)p->out.pos);
        pump(p, 10);                    /* an SHM_ACK, or the 10 ms recheck */
    }
}

/* Write one record at tail (a SKIP first where it would cross the end). */
static void ring_put(struct peer *p, uint32_t kind, const void *body, uint32_t len)
{
    uint64_t span = rec_span(len), off = p->out.pos % p->out.size, room = p->out.size - off;
    struct rec_hdr rh = { len, kind };

    ring_room(p, span > room ? room + span : span);
    if (span > room) {
        struct rec_hdr skip = { 0, P_REC_SKIP };

        memcpy(p->out.data + off, &skip, sizeof(skip));
        p->out.pos += room;
        p->skips_out++;
        off = 0;
    }
    memcpy(p->out.data + off, &rh, sizeof(rh));
    if (len > 0)
        memcpy(p->out.data + off + sizeof(rh), body, len);
    p->out.pos += span;
}

/* Publish tail (release), then wake the library if it sleeps on our ring:
 * at most once per movement of its head. */
static void ring_publish(struct peer *p)
{
    uint64_t head;

    /* Release, and sequentially consistent with the exchange of wake below:
     * either the consumer sees this tail after it set wake, or we see its
     * wake = 1. */
    __atomic_store_n(&p->out.hdr->tail, p->out.pos, __ATOMIC_SEQ_CST);
    if (__atomic_exchange_n(&p->out.hdr->wake, 0, __ATOMIC_SEQ_CST) != 1)
        return;
    head = ring_head(p);
    if (p->out.woke && head == p->out.woke_at)
        return;
    p->out.woke = true;
    p->out.woke_at = head;
    if ((p->lib_features & P_FEAT_FUTEX) && !p->wake_by_datagram) {
        PCK(futex(&p->out.hdr->wake, FUTEX_WAKE, 1, NULL) >= 0);
        p->futex_wakes_out++;
    } else {
        sock_send(p, 0, P_WAKE, 0, 0, NULL, 0, -1);
        p->wake_dgrams_out++;
    }
}

/* ---- sending ---- */

static void sock_send(struct peer *p, uint32_t stream, uint8_t type, uint8_t flags,
                      uint32_t size, const void *body, size_t body_len, int fd)
{
    struct w_hdr h = { stream, p->me, p->port_id, type, flags, size };
    struct iovec iov[2] = { { &h, sizeof(h) }, { (void *)body, body_len } };
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } c;
    struct msghdr m = { .msg_iov = iov, .msg_iovlen = body_len > 0 ? 2 : 1 };
    ssize_t n;

    PCK(!p->sent_bye);
    if (fd >= 0) {
        struct cmsghdr *cm;

        memset(&c, 0, sizeof(c));
        m.msg_control = c.buf;
        m.msg_controllen = sizeof(c.buf);
        cm = CMSG_FIRSTHDR(&m);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &fd, sizeof(int));
    }
    n = sendmsg(p->sock, &m, MSG_NOSIGNAL);
    PCK(n == (ssize_t)(sizeof(h) + body_len));
    if (type == P_BYE)
        p->sent_bye = true;
}

/* A datagram in the port's order: once our RING is out, a FENCE goes first
 * (user messages with an fd, MMAP, BYE; never WAKE, SHM_ACK or RING). */
static void peer_send(struct peer *p, uint32_t stream, uint8_t type, uint8_t flags,
                      uint32_t size, const void *body, size_t body_len, int fd)
{
    if (p->out.hdr != NULL && type != P_SHM_ACK && type != P_WAKE && type != P_RING) {
        ring_put(p, P_REC_FENCE, NULL, 0);
        ring_publish(p);
    }
    if (type >= P_USER_MIN)
        p->sock_msgs_out++;
    sock_send(p, stream, type, flags, size, body, body_len, fd);
}

/* One user message: tracking (or NULL), descriptors or an inline payload.
 * With rings, one without an fd is a MSG record (published at once unless
 * hold_tail, for batches: ring_publish then). */
static void peer_send_user_ex(struct peer *p, uint32_t stream, uint8_t type, bool last,
                              const struct w_tracking *trk, const struct w_desc *d,
                              unsigned nd, const void *inl, uint32_t inl_len, int fd,
                              bool hold_tail)
{
    size_t len = 0;
    uint64_t size = 0;
    uint8_t flags = last ? P_F_LAST : 0;
    uint8_t *body = sbuf + sizeof(struct w_hdr);
    unsigned i;

    if (trk != NULL) {
        memcpy(body, trk, sizeof(*trk));
        len += sizeof(*trk);
        flags |= P_F_TRACKING;
    }
    if (nd > 0) {
        flags |= P_F_MMAP;
        for (i = 0; i < nd; i++) {
            memcpy(body + len, &d[i], sizeof(d[i]));
            len += sizeof(d[i]);
            size += d[i].size;
        }
    } else {
        PCK(inl_len <= P_INLINE_MAX);
        if (inl_len > 0)
            memcpy(body + len, inl, inl_len);
        len += inl_len;
        size = inl_len;
    }
    if (p->rings && fd < 0) {
        struct w_hdr h = { stream, p->me, p->port_id, type, flags, (uint32_t)size };

        if (p->out.hdr == NULL)
            ring_make(p);
        memcpy(sbuf, &h, sizeof(h));
        ring_put(p, P_REC_MSG, sbuf, (uint32_t)(sizeof(h) + len));
        p->ring_msgs_out++;
        if (!hold_tail)
            ring_publish(p);
        return;
    }
    peer_send(p, stream, type, flags, (uint32_t)size, body, len, fd);
}

static void peer_send_user(struct peer *p, uint32_t stream, uint8_t type, bool last,
                           const struct w_tracking *trk, const struct w_desc *d,
                           unsigned nd, const void *inl, uint32_t inl_len, int fd)
{
    peer_send_user_ex(p, stream, type, last, trk, d, nd, inl, inl_len, fd, false);
}

static void peer_report(struct peer *p, const struct report *r)
{
    peer_send_user(p, 0, T_REPORT, false, NULL, NULL, 0, r, sizeof(*r), -1);
}

/* ---- receiving ---- */

/*
 * Receive one datagram: returns its length (0 at end of file), with the fd
 * that came with it (-1 if none) and the credentials the kernel attached.
 * false when nothing came within timeout_ms.
 */
static bool peer_recv_raw(struct peer *p, size_t *len, int *fd, struct ucred *cred,
                          bool *has_cred, int timeout_ms)
{
    union {
        char buf[CMSG_SPACE(sizeof(struct ucred)) + CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } c;
    struct iovec iov = { rbuf, sizeof(rbuf) };
    struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = c.buf,
                        .msg_controllen = sizeof(c.buf) };
    struct pollfd pfd = { .fd = p->sock, .events = POLLIN };
    struct cmsghdr *cm;
    unsigned nfds = 0;
    ssize_t n;
    int r;

    r = poll(&pfd, 1, timeout_ms);
    if (r == 0)
        return false;
    PCK(r == 1);
    n = recvmsg(p->sock, &m, MSG_CMSG_CLOEXEC);
    PCK(n >= 0);
    PCK(!(m.msg_flags & MSG_TRUNC));
    PCK(!(m.msg_flags & MSG_CTRUNC));
    *fd = -1;
    *has_cred = false;
    for (cm = CMSG_FIRSTHDR(&m); cm != NULL; cm = CMSG_NXTHDR(&m, cm)) {
        PCK(cm->cmsg_level == SOL_SOCKET);
        if (cm->cmsg_type == SCM_RIGHTS) {
            nfds += (unsigned)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            PCK(nfds == 1);
            memcpy(fd, CMSG_DATA(cm), sizeof(int));
        } else if (cm->cmsg_type == SCM_CREDENTIALS) {
            memcpy(cred, CMSG_DATA(cm), sizeof(*cred));
            *has_cred = true;
        } else {
            PFAIL("unexpected control message type %d", cm->cmsg_type);
        }
    }
    if (*fd >= 0)
        PCK(fcntl(*fd, F_GETFD) & FD_CLOEXEC);
    *len = (size_t)n;
    return true;
}

static void peer_handshake(struct peer *p)
{
    struct ucred cred;
    struct w_hdr h;
    struct w_hello hello, mine = { P_MAGIC, P_VERSION, p->port_id, P_HEADER_SIZE,
                                   P_CHUNK_SIZE, P_CHUNK_COUNT, p->max_segments,
                                   p->features, p->ring_size };
    bool has_cred;
    size_t n;
    int one = 1, fd;

    /* SO_PASSCRED before our HELLO.  The library sends its own at once,
     * without waiting for ours: read it first to prove that. */
    PCK(setsockopt(p->sock, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)) == 0);
    if (!peer_recv_raw(p, &n, &fd, &cred, &has_cred, TIMEOUT_MS))
        PFAIL("port %u: no HELLO from the library within %d ms", p->port_id, TIMEOUT_MS);
    PCK(n == 48);
    PCK(fd < 0);
    memcpy(&h, rbuf, sizeof(h));
    memcpy(&hello, rbuf + 16, sizeof(hello));
    PCK(h.stream == 0 && h.type == P_HELLO && h.flags == 0 && h.size == 32);
    PCK(has_cred);
    PCK(h.pid == cred.pid);
    PCK(cred.pid == getppid());
    PCK(cred.uid == getuid());
    PCK(hello.magic == P_MAGIC);
    PCK(hello.version == P_VERSION);
    PCK(hello.port_id == h.port_id);
    PCK(h.port_id != P_SENT_OVER_ANY);
    PCK(hello.header_size == P_HEADER_SIZE);
    PCK(hello.chunk_size == P_CHUNK_SIZE);
    PCK(hello.chunk_count == P_CHUNK_COUNT);
    PCK(hello.max_segments >= 1);
    /* A sender sets no bits but RING and FUTEX; FUTEX only with RING. */
    PCK((hello.features & ~(P_FEAT_RING | P_FEAT_FUTEX)) == 0);
    if (hello.features & P_FEAT_RING)
        PCK(hello.ring_size >= P_RING_MIN && hello.ring_size <= P_RING_MAX &&
            (hello.ring_size & (hello.ring_size - 1)) == 0);
    else
        PCK(!(hello.features & P_FEAT_FUTEX) && hello.ring_size == 0);
    p->lib_pid = cred.pid;
    p->lib_port = h.port_id;
    p->lib_max_segments = hello.max_segments;
    p->lib_features = hello.features;
    p->lib_ring_size = hello.ring_size;
    p->rings = (p->features & P_FEAT_RING) && (hello.features & P_FEAT_RING);
    if (p->mbuf == NULL)
        PCK((p->mbuf = malloc(P_WIRE_MAX)) != NULL);

    sock_send(p, 0, P_HELLO, 0, sizeof(mine), &mine, sizeof(mine), -1);
}

/* An MMAP from the library: the receiver's duties, and the sender's too. */
static void peer_map(struct peer *p, uint32_t id, int fd)
{
    struct seg_hdr *h;
    struct stat st;
    uint8_t *base;
    int seals;
    unsigned i;

    PCK(fstat(fd, &st) == 0);
    PCK(S_ISREG(st.st_mode));
    seals = fcntl(fd, F_GET_SEALS);
    PCK(seals >= 0);
    PCK((seals & (F_SEAL_SHRINK | F_SEAL_GROW)) == (F_SEAL_SHRINK | F_SEAL_GROW));
    /* The sender's side of SEGMENTS: SEAL_SEAL too, writes not sealed. */
    PCK(seals & F_SEAL_SEAL);
    PCK(!(seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)));
    PCK(st.st_size == (off_t)P_SEGMENT_SIZE);
    PCK(id == p->pr->n_in);                 /* the next id for the pair */
    if (id >= p->max_segments)
        PFAIL("MMAP of segment %u, but our HELLO said max_segments %u", id, p->max_segments);

    base = mmap(NULL, P_SEGMENT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    PCK(base != MAP_FAILED);
    close(fd);
    h = (struct seg_hdr *)base;
    PCK(h->magic == P_MAGIC);
    PCK(h->version == P_SEG_VERSION);
    PCK(h->id == id);
    PCK(h->src_pid == p->lib_pid);
    PCK(h->dst_pid == p->me);
    /* The sender wrote the id of the port that carries the MMAP. */
    PCK(__atomic_load_n(&h->sent_over, __ATOMIC_ACQUIRE) == p->lib_port);
    PCK(h->free_map_padding == 0);
    PCK(h->free_tracking_map_padding == 0);
    for (i = sizeof(*h); i < P_HEADER_SIZE; i++)
        PCK(base[i] == 0);
    __atomic_store_n(&h->sent_over, (uint16_t)P_SENT_OVER_ANY, __ATOMIC_RELEASE);
    p->pr->in[id].hdr = h;
    p->pr->in[id].base = base;
    p->pr->n_in++;
}

/* The library's RING: the consumer's checks of MESSAGE RINGS, then map it. */
static void peer_take_ring(struct peer *p, uint32_t size, int fd)
{
    struct ring_hdr *h;
    struct stat st;
    int seals;

    PCK(p->rings);                          /* both HELLOs set RING */
    PCK(p->in.hdr == NULL);                 /* one RING per port */
    PCK(size >= P_RING_MIN && size <= P_RING_MAX && (size & (size - 1)) == 0);
    if (size > p->ring_size)
        PFAIL("the library's ring has %u bytes, our HELLO said at most %u", size, p->ring_size);
    PCK(fstat(fd, &st) == 0);
    PCK(S_ISREG(st.st_mode));
    seals = fcntl(fd, F_GET_SEALS);
    PCK(seals >= 0);
    PCK((seals & (F_SEAL_SHRINK | F_SEAL_GROW)) == (F_SEAL_SHRINK | F_SEAL_GROW));
    PCK(!(seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)));
    PCK(st.st_size == (off_t)P_RING_HDR + size);
    h = mmap(NULL, (size_t)P_RING_HDR + size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    PCK(h != MAP_FAILED);
    close(fd);
    PCK(h->magic == P_RING_MAGIC);
    PCK(h->version == P_RING_VERSION);
    PCK(h->port_id == p->lib_port);
    PCK(h->size == size);
    PCK(h->src_pid == p->lib_pid);
    PCK(h->dst_pid == p->me);
    /* The producer wrote the header with every counter 0; it may have
     * published records already, so only head, wake and space stay 0. */
    PCK(__atomic_load_n(&h->head, __ATOMIC_ACQUIRE) == 0);
    PCK(__atomic_load_n(&h->wake, __ATOMIC_ACQUIRE) == 0);
    p->in.hdr = h;
    p->in.data = (uint8_t *)h + P_RING_HDR;
    p->in.size = size;
    p->in.pos = 0;
}

/*
 * Read what the socket has (waiting up to timeout_ms for the first) into
 * the held queue.  WAKE, SHM_ACK and RING are taken at once: they order
 * nothing.  Every header is checked here.
 */
static void pump(struct peer *p, int timeout_ms)
{
    while (!p->eof && p->q_len < HELD_MAX) {
        struct ucred cred;
        struct w_hdr h;
        struct held *d;
        bool has_cred;
        size_t n;
        int fd;

        if (!peer_recv_raw(p, &n, &fd, &cred, &has_cred, timeout_ms))
            return;
        timeout_ms = 0;
        if (n == 0) {
            p->eof = true;
            return;
        }
        PCK(n >= 16 && n <= P_WIRE_MAX);
        memcpy(&h, rbuf, sizeof(h));
        PCK(has_cred && cred.pid == p->lib_pid);
        PCK(h.pid == p->lib_pid);
        PCK(h.port_id == p->lib_port);
        PCK((h.flags & ~(P_F_LAST | P_F_MMAP | P_F_TRACKING)) == 0);
        if (h.type < P_USER_MIN) {
            PCK(h.type <= P_WAKE);
            PCK(h.type != P_HELLO);     /* sent exactly once */
            PCK(h.stream == 0 && h.flags == 0);
        }
        if (h.type == P_SHM_ACK || h.type == P_WAKE) {
            PCK(n == 16 && h.size == 0 && fd < 0);
            if (h.type == P_SHM_ACK) {
                p->acks++;
            } else {
                /* A WAKE from a side that has not sent its RING is a violation. */
                PCK(p->in.hdr != NULL);
                p->wake_dgrams_in++;
            }
            continue;
        }
        if (h.type == P_RING) {
            uint32_t size;

            PCK(n == 20 && h.size == 4 && fd >= 0);
            memcpy(&size, rbuf + 16, sizeof(size));
            peer_take_ring(p, size, fd);
            continue;
        }
        d = &p->q[(p->q_head + p->q_len) % HELD_MAX];
        if (d->buf == NULL)
            PCK((d->buf = malloc(P_WIRE_MAX)) != NULL);
        memcpy(d->buf, rbuf, n);
        d->len = n;
        d->fd = fd;
        d->after_ring = p->in.hdr != NULL;
        p->q_len++;
    }
}

/* A user message's body (datagram or MSG record, n bytes in buf), with
 * every check of RECEIVER'S DUTIES; buf becomes p->mbuf's copy. */
static void parse_user(struct peer *p, const uint8_t *buf, size_t n, int fd, struct pmsg *m)
{
    size_t t;
    uint64_t sum = 0;
    unsigned i;

    if (buf != p->mbuf)
        memcpy(p->mbuf, buf, n);
    buf = p->mbuf;
    memcpy(&m->h, buf, sizeof(m->h));
    m->tracked = m->h.flags & P_F_TRACKING;
    t = m->tracked ? sizeof(m->trk) : 0;
    PCK(n >= 16 + t);
    if (m->tracked) {
        memcpy(&m->trk, buf + 16, sizeof(m->trk));
        PCK(m->trk.tracking_id < P_CHUNK_COUNT);
        PCK(m->trk.mmap_id < p->pr->n_in);
    }
    m->ndesc = 0;
    m->inl = NULL;
    if (m->h.flags & P_F_MMAP) {
        PCK((n - 16 - t) % sizeof(struct w_desc) == 0);
        m->ndesc = (unsigned)((n - 16 - t) / sizeof(struct w_desc));
        PCK(m->ndesc >= 1 && m->ndesc <= P_MAX_DESCS);
        for (i = 0; i < m->ndesc; i++) {
            struct w_desc *d = &m->desc[i];

            memcpy(d, buf + 16 + t + i * sizeof(*d), sizeof(*d));
            PCK(d->size >= 1);
            PCK(d->mmap_id < p->pr->n_in);
            PCK(d->chunk_id < P_CHUNK_COUNT);
            PCK((uint64_t)d->chunk_id * P_CHUNK_SIZE + d->size <= P_DATA_SIZE);
            sum += d->size;
        }
        PCK(sum == m->h.size);
    } else {
        PCK(n - 16 - t == m->h.size);
        PCK(m->h.size <= P_INLINE_MAX);
        m->inl = buf + 16 + t;
    }
    m->fd = fd;
}

/* A held datagram in its turn: true if it is a user message (in m). */
static bool take_datagram(struct peer *p, struct pmsg *m)
{
    struct held *d = &p->q[p->q_head];
    struct w_hdr h;

    p->q_head = (p->q_head + 1) % HELD_MAX;
    p->q_len--;
    PCK(!p->got_bye);                   /* nothing after BYE */
    memcpy(&h, d->buf, sizeof(h));
    if (h.type == P_MMAP) {
        uint32_t id;

        PCK(d->len == 20 && h.size == 4 && d->fd >= 0);
        memcpy(&id, d->buf + 16, sizeof(id));
        peer_map(p, id, d->fd);
        return false;
    }
    if (h.type == P_BYE) {
        PCK(d->len == 16 && h.size == 0 && d->fd < 0);
        p->got_bye = true;
        return false;
    }
    PCK(h.type >= P_USER_MIN);
    /* After its RING, the library's user messages without an fd belong in
     * its ring. */
    if (d->after_ring && d->fd < 0)
        PFAIL("user message stream %u without an fd on the socket after RING", h.stream);
    parse_user(p, d->buf, d->len, d->fd, m);
    m->from_ring = false;
    p->sock_msgs_in++;
    return true;
}

/* Publish our head in the library's ring; SHM_ACK if it waits for room. */
static void ring_consumed(struct peer *p)
{
    /* Sequentially consistent with the exchange of space, as tail with wake. */
    __atomic_store_n(&p->in.hdr->head, p->in.pos, __ATOMIC_SEQ_CST);
    if (__atomic_exchange_n(&p->in.hdr->space, 0, __ATOMIC_SEQ_CST) == 1) {
        sock_send(p, 0, P_SHM_ACK, 0, 0, NULL, 0, -1);
        p->space_acks_out++;
    }
}

enum { R_EMPTY, R_MSG, R_FENCE };

/* The next record of the library's ring, with the consumer's checks. */
static int ring_next(struct peer *p, struct pmsg *m)
{
    for (;;) {
        uint64_t tail = __atomic_load_n(&p->in.hdr->tail, __ATOMIC_ACQUIRE);
        uint64_t off = p->in.pos % p->in.size, room = p->in.size - off, avail;
        struct rec_hdr rh;

        PCK(tail % 8 == 0);
        if (tail < p->in.pos || tail - p->in.pos > p->in.size)
            PFAIL("the library's tail %llu is out of bounds (head %llu, size %u)",
                  (unsigned long long)tail, (unsigned long long)p->in.pos, p->in.size);
        if (tail == p->in.pos)
            return R_EMPTY;
        avail = tail - p->in.pos;
        memcpy(&rh, p->in.data + off, sizeof(rh));      /* once */
        if (rh.kind == P_REC_SKIP) {
            PCK(rh.len == 0 && room <= avail);
            p->in.pos += room;
            p->skips_in++;
            ring_consumed(p);
            continue;
        }
        if (rh.kind == P_REC_FENCE) {
            PCK(rh.len == 0 && avail >= 8);
            p->in.pos += 8;
            p->fences_in++;
            ring_consumed(p);
            return R_FENCE;
        }
        if (rh.kind != P_REC_MSG)
            PFAIL("unknown record kind %u at %llu", rh.kind, (unsigned long long)p->in.pos);
        PCK(rh.len >= 16 && rh.len <= P_WIRE_MAX);
        PCK(rec_span(rh.len) <= room);          /* never crosses the end */
        PCK(rec_span(rh.len) <= avail);
        memcpy(p->mbuf, p->in.data + off + sizeof(rh), rh.len);
        p->in.pos += rec_span(rh.len);
        ring_consumed(p);
        PCK(!p->got_bye);               /* nothing published after BYE's FENCE */
        {
            struct w_hdr h;

            memcpy(&h, p->mbuf, sizeof(h));
            PCK(h.pid == p->lib_pid && h.port_id == p->lib_port);
            PCK((h.flags & ~(P_F_LAST | P_F_MMAP | P_F_TRACKING)) == 0);
            if (h.type < P_USER_MIN)
                PFAIL("control type %u in a MSG record", h.type);
        }
        parse_user(p, p->mbuf, rh.len, -1, m);
        m->from_ring = true;
        p->ring_msgs_in++;
        return R_MSG;
    }
}

/*
 * Sleep until something may have come, at most until end: with the
 * library's ring mapped, wake = 1 first (and not at all if records came
 * meanwhile); on the futex when our HELLO set FUTEX, in short slices so
 * that the socket is looked at too.
 */
static void peer_sleep(struct peer *p, long long end)
{
    long long left = end - peer_now_ms();

    if (left <= 0)
        return;
    if (p->in.hdr != NULL) {
        __atomic_store_n(&p->in.hdr->wake, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&p->in.hdr->tail, __ATOMIC_SEQ_CST) != p->in.pos) {
            __atomic_store_n(&p->in.hdr->wake, 0, __ATOMIC_RELAXED);
            return;
        }
        p->sleeps++;
        if (p->features & P_FEAT_FUTEX) {
            struct timespec ts = { 0, 20 * 1000000L };
            struct pollfd pfd = { .fd = p->sock, .events = POLLIN };

            while (peer_now_ms() < end && poll(&pfd, 1, 0) == 0) {
                long r = futex(&p->in.hdr->wake, FUTEX_WAIT, 1, &ts);

                if (r == 0 && __atomic_load_n(&p->in.hdr->wake, __ATOMIC_ACQUIRE) == 0) {
                    p->futex_woken++;
                    break;
                }
                if (r < 0 && errno == EAGAIN)   /* wake is 0 already */
                    break;
            }
            pump(p, 0);
        } else {
            pump(p, (int)left);
        }
        __atomic_store_n(&p->in.hdr->wake, 0, __ATOMIC_RELAXED);
        return;
    }
    pump(p, (int)left);
}

/*
 * The next user message in the port's order, with every check of
 * RECEIVER'S DUTIES and MESSAGE RINGS; MMAP, SHM_ACK, BYE, RING and WAKE
 * are handled on the way.  Returns false at end of file.
 */
static bool peer_next(struct peer *p, struct pmsg *m, int timeout_ms)
{
    long long end = peer_now_ms() + timeout_ms;

    for (;;) {
        pump(p, 0);
        /* Datagrams sent before the library's RING come first. */
        if (p->q_len > 0 && !p->q[p->q_head].after_ring) {
            if (take_datagram(p, m))
                return true;
            continue;
        }
        if (p->in.hdr != NULL) {
            int r = ring_next(p, m);

            if (r == R_MSG)
                return true;
            if (r == R_FENCE) {
                long long fend = peer_now_ms() + P_FENCE_WAIT_MS;

                while (p->q_len == 0 && !p->eof && peer_now_ms() < fend)
                    pump(p, (int)(fend - peer_now_ms()));
                if (p->q_len == 0) {
                    if (p->eof)         /* the datagram never came: the end */
                        return false;
                    PFAIL("FENCE, but no datagram within %d ms", P_FENCE_WAIT_MS);
                }
                if (take_datagram(p, m))
                    return true;
                continue;
            }
        }
        /* The ring was read (tail loaded) after these arrived: no FENCE. */
        if (p->q_len > 0) {
            struct w_hdr h;

            memcpy(&h, p->q[p->q_head].buf, sizeof(h));
            PFAIL("datagram type %u stream %u after RING with no FENCE in the ring", h.type,
                  h.stream);
        }
        if (p->eof)
            return false;
        if (peer_now_ms() >= end)
            PFAIL("port %u: no message from the library within %d ms", p->port_id, timeout_ms);
        peer_sleep(p, end);
    }
}

static bool bit_is_set(const uint64_t *map, uint32_t i)
{
    return __atomic_load_n(&map[i / 64], __ATOMIC_ACQUIRE) & (1ull << (i % 64));
}

static void peer_set_bit(uint64_t *map, uint32_t i)
{
    uint64_t old = __atomic_fetch_or(&map[i / 64], 1ull << (i % 64), __ATOMIC_RELEASE);

    PCK(!(old & (1ull << (i % 64))));  /* it was claimed */
}

static void peer_claim_bit(uint64_t *map, uint32_t i)
{
    uint64_t bit = 1ull << (i % 64), old = __atomic_load_n(&map[i / 64], __ATOMIC_ACQUIRE);

    do {
        PCK(old & bit);
    } while (!__atomic_compare_exchange_n(&map[i / 64], &old, old & ~bit, false,
                                          __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
}

static uint32_t desc_chunks(const struct w_desc *d)
{
    return (d->size + P_CHUNK_SIZE - 1) / P_CHUNK_SIZE;
}

/*
 * Check every payload byte against pattern_byte(stream, offset) and fold it into *fnv;
 * for descriptors, also that the sender claimed every chunk they cover.
 * Returns the payload length.
 */
static uint64_t peer_check_payload(struct peer *p, const struct pmsg *m, uint64_t *fnv)
{
    uint64_t off = 0;
    unsigned i;
    uint32_t c;

    if (m->ndesc == 0) {
        for (; off < m->h.size; off++) {
            if (m->inl[off] != pattern_byte(m->h.stream, off))
                PFAIL("stream %u: inline byte %llu is %#x", m->h.stream,
                      (unsigned long long)off, m->inl[off]);
            *fnv = fnv_byte(*fnv, m->inl[off]);
        }
        return off;
    }
    for (i = 0; i < m->ndesc; i++) {
        const struct w_desc *d = &m->desc[i];
        const struct pseg *s = &p->pr->in[d->mmap_id];
        const uint8_t *b = s->base + P_HEADER_SIZE + (size_t)d->chunk_id * P_CHUNK_SIZE;
        uint32_t k;

        for (c = d->chunk_id; c < d->chunk_id + desc_chunks(d); c++)
            if (bit_is_set(s->hdr->free_map, c))
                PFAIL("stream %u: chunk %u of segment %u is free, yet a descriptor covers it",
                      m->h.stream, c, d->mmap_id);
        for (k = 0; k < d->size; k++, off++) {
            if (b[k] != pattern_byte(m->h.stream, off))
                PFAIL("stream %u: byte %llu (desc %u) is %#x", m->h.stream,
                      (unsigned long long)off, i, b[k]);
            *fnv = fnv_byte(*fnv, b[k]);
        }
    }
    return off;
}

/* Free exactly the chunks the descriptors cover. */
static void peer_free_descs(struct peer *p, const struct w_desc *d, unsigned nd)
{
    unsigned i;
    uint32_t c;

    for (i = 0; i < nd; i++)
        for (c = d[i].chunk_id; c < d[i].chunk_id + desc_chunks(&d[i]); c++)
            peer_set_bit(p->pr->in[d[i].mmap_id].hdr->free_map, c);
}

/* After freeing into segment id: oosm 1 -> 0 by CAS, and SHM_ACK if it was set. */
static bool peer_oosm_ack(struct peer *p, uint32_t id)
{
    uint32_t one = 1;

    if (!__atomic_compare_exchange_n(&p->pr->in[id].hdr->oosm, &one, 0, false,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return false;
    peer_send(p, 0, P_SHM_ACK, 0, 0, NULL, 0, -1);
    return true;
}

/* Read to end of file; only control messages may come.  want_bye: the
 * library closes in order, so BYE must precede the end of file. */
static void peer_drain(struct peer *p, bool want_bye)
{
    struct pmsg m;

    if (peer_next(p, &m, TIMEOUT_MS))
        PFAIL("unexpected user message type %u stream %u", m.h.type, m.h.stream);
    if (want_bye)
        PCK(p->got_bye);
}

static void peer_bye(struct peer *p)
{
    peer_send(p, 0, P_BYE, 0, 0, NULL, 0, -1);
}

/* Make our next segment for the library, claim chunks `pre` first, send
 * its MMAP on this port.  Returns the header; the id is the pair's next. */
static struct seg_hdr *peer_make_segment(struct peer *p, const uint32_t *pre, unsigned npre)
{
    struct seg_hdr *h;
    uint32_t id = p->pr->n_out;
    uint8_t *base;
    unsigned i;
    int fd;

    PCK(id < PEER_MAX_SEGS && id < p->lib_max_segments);
    fd = memfd_create("interop-peer", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_NOEXEC_SEAL);
    if (fd < 0 && errno == EINVAL)
        fd = memfd_create("interop-peer", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    PCK(fd >= 0);
    PCK(ftruncate(fd, P_SEGMENT_SIZE) == 0);
    base = mmap(NULL, P_SEGMENT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    PCK(base != MAP_FAILED);
    h = (struct seg_hdr *)base;         /* a new memfd reads as zeros */
    h->magic = P_MAGIC;
    h->version = P_SEG_VERSION;
    h->sent_over = p->port_id;
    h->id = id;
    h->src_pid = p->me;
    h->dst_pid = p->lib_pid;
    h->oosm = 0;
    for (i = 0; i < P_MAP_WORDS; i++) {
        h->free_map[i] = ~0ull;
        h->free_tracking_map[i] = ~0ull;
    }
    for (i = 0; i < npre; i++)
        h->free_map[pre[i] / 64] &= ~(1ull << (pre[i] % 64));
    PCK(fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) == 0);
    peer_send(p, 0, P_MMAP, 0, sizeof(id), &id, sizeof(id), fd);
    close(fd);
    p->pr->out[id].hdr = h;
    p->pr->out[id].base = base;
    p->pr->n_out++;
    return h;
}

/* Write pattern_byte(stream, offset) into our segments where the descriptors say. */
static void peer_fill(struct peer *p, const struct w_desc *d, unsigned nd, uint32_t stream)
{
    uint64_t off = 0;
    unsigned i;
    uint32_t k;

    for (i = 0; i < nd; i++) {
        uint8_t *b;

        PCK(d[i].mmap_id < p->pr->n_out);
        b = p->pr->out[d[i].mmap_id].base + P_HEADER_SIZE + (size_t)d[i].chunk_id * P_CHUNK_SIZE;
        for (k = 0; k < d[i].size; k++)
            b[k] = pattern_byte(stream, off++);
    }
}

/* Poll a bitmap word set for bit i to become set; false on timeout. */
static bool wait_bit(const uint64_t *map, uint32_t i, int timeout_ms)
{
    long long end = peer_now_ms() + timeout_ms;

    while (!bit_is_set(map, i)) {
        if (peer_now_ms() > end)
            return false;
        usleep(200);
    }
    return true;
}

static bool wait_u32(const uint32_t *v, uint32_t want, int timeout_ms)
{
    long long end = peer_now_ms() + timeout_ms;

    while (__atomic_load_n(v, __ATOMIC_ACQUIRE) != want) {
        if (peer_now_ms() > end)
            return false;
        usleep(200);
    }
    return true;
}

static bool wait_u16(const uint16_t *v, uint16_t want, int timeout_ms)
{
    long long end = peer_now_ms() + timeout_ms;

    while (__atomic_load_n(v, __ATOMIC_ACQUIRE) != want) {
        if (peer_now_ms() > end)
            return false;
        usleep(200);
    }
    return true;
}

/* Expect the next user message to be the parent's inline signal `word`. */
static void peer_expect_signal(struct peer *p, const char *word)
{
    struct pmsg m;

    PCK(peer_next(p, &m, TIMEOUT_MS));
    if (m.h.type != T_SIGNAL)
        PFAIL("expected signal \"%s\", got type %u stream %u", word, m.h.type, m.h.stream);
    PCK(m.ndesc == 0 && m.fd < 0);
    PCK(m.h.size == strlen(word) && memcmp(m.inl, word, m.h.size) == 0);
}

void peer_run(const int *socks, unsigned n, peer_fn fn)
{
    static struct pair pr;
    struct peer p[4];
    int fds[256], nfds = 0, i;
    unsigned k;
    DIR *d;
    struct dirent *e;

    /* Keep only stdio and the sockets: not the parent's ring, its ends of
     * the pairs, or whatever else the test process holds. */
    d = opendir("/proc/self/fd");
    PCK(d != NULL);
    while ((e = readdir(d)) != NULL && nfds < 256)
        if (e->d_name[0] != '.')
            fds[nfds++] = atoi(e->d_name);
    closedir(d);
    for (i = 0; i < nfds; i++) {
        bool keep = fds[i] <= 2;

        for (k = 0; k < n; k++)
            keep |= fds[i] == socks[k];
        if (!keep)
            close(fds[i]);
    }
    alarm(20);
    memset(p, 0, sizeof(p));
    for (k = 0; k < n; k++) {
        p[k].features = peer_cfg.features;
        p[k].ring_size = peer_cfg.ring_size;
        p[k].out_ring_size = peer_cfg.out_ring_size;
        p[k].wake_by_datagram = peer_cfg.wake_by_datagram;
        p[k].sock = socks[k];
        p[k].me = getpid();
        p[k].port_id = (uint16_t)(PEER_PORT_ID + k);
        p[k].max_segments = PEER_MAX_SEGS;
        p[k].pr = &pr;
    }
    fn(p);
    _exit(0);
}

/* ---- Each test's side ---- */

struct peer_cfg peer_cfg;

const struct lib_msg lib_msgs[N_LIB_MSGS] = {
    { 1, 16, 0, 0, { 0 } },
    { 2, 16, 0, 0, { 1 } },
    { 3, 16, 0, 0, { 16384 } },
    { 4, 17, P_F_MMAP, 1, { 1 } },
    { 5, 17, P_F_MMAP, 1, { 16384 } },
    { 6, 17, P_F_MMAP, 1, { 16385 } },
    { 7, 17, P_F_MMAP, 1, { SZ_3M } },
    { 8, 18, P_F_MMAP | P_F_LAST, 3, { 100, 20000, 40000 } },   /* with a user fd */
};

uint64_t lib_msg_size(const struct lib_msg *l)
{
    return l->nbufs == 0 ? l->sizes[0] : (uint64_t)l->sizes[0] + l->sizes[1] + l->sizes[2];
}

/* interop/handshake: the peer's side. */
void peer_handshake_main(struct peer *p)
{
    struct report r = { .tag = 1 };
    struct pmsg m;

    peer_handshake(p);
    /* The library sent this before its handshake completed: it follows
     * the HELLO. */
    PCK(peer_next(p, &m, TIMEOUT_MS));
    PCK(m.h.type == T_SIGNAL && m.h.stream == 5 && m.h.flags == P_F_LAST);
    PCK(m.h.size == 4 && memcmp(m.inl, "ping", 4) == 0 && m.fd < 0);
    r.a = p->lib_port;
    r.b = p->lib_max_segments;
    r.c = (uint32_t)p->lib_pid;
    peer_report(p, &r);
    /* BYE only once the parent has looked at the open port. */
    peer_expect_signal(p, "bye");
    peer_bye(p);
    peer_drain(p, false);
}

/* interop/lib_to_peer: the peer's side. */
void peer_lib_to_peer(struct peer *p)
{
    static struct {
        unsigned      nd;
        struct w_desc d[P_MAX_DESCS];
    } held[N_LIB_MSGS];
    static uint8_t owner[PEER_MAX_SEGS][P_CHUNK_COUNT];
    struct report r = { .tag = 1 };
    uint64_t fnv = FNV_INIT, fnv9 = FNV_INIT;
    int user_fd = -1;
    uint32_t oosm_seen;
    struct pmsg m;
    unsigned i, k;
    uint32_t c;

    peer_handshake(p);
    for (i = 0; i < N_LIB_MSGS; i++) {
        const struct lib_msg *l = &lib_msgs[i];

        PCK(peer_next(p, &m, TIMEOUT_MS));
        if (m.h.stream != l->stream || m.h.type != l->type || m.h.flags != l->flags ||
            m.h.size != lib_msg_size(l))
            PFAIL("message %u: stream %u type %u flags %#x size %u", i, m.h.stream,
                  m.h.type, m.h.flags, m.h.size);
        if (l->nbufs > 0) {
            PCK(m.ndesc == l->nbufs);
            for (k = 0; k < m.ndesc; k++)
                PCK(m.desc[k].size == l->sizes[k]);
        }
        r.bytes += peer_check_payload(p, &m, &fnv);
        if (l->stream == 8) {
            PCK(m.fd >= 0);
            user_fd = m.fd;
        } else {
            PCK(m.fd < 0);
        }
        if (m.ndesc > 0)
            r.b++;
        r.a++;
        /* Hold every message; no two may share a chunk. */
        held[i].nd = m.ndesc;
        memcpy(held[i].d, m.desc, m.ndesc * sizeof(m.desc[0]));
        for (k = 0; k < m.ndesc; k++)
            for (c = m.desc[k].chunk_id; c < m.desc[k].chunk_id + desc_chunks(&m.desc[k]); c++) {
                if (owner[m.desc[k].mmap_id][c])
                    PFAIL("chunk %u of segment %u handed out twice", c, m.desc[k].mmap_id);
                owner[m.desc[k].mmap_id][c] = 1;
            }
    }
    PCK(p->pr->n_in == 1);
    PCK(p->acks == 0);
    for (i = 0; i < N_LIB_MSGS; i++)
        peer_free_descs(p, held[i].d, held[i].nd);
    r.c = peer_oosm_ack(p, 0);
    PCK(write(user_fd, "fd-ok", 5) == 5);
    close(user_fd);
    r.fnv = fnv;
    peer_report(p, &r);

    /* Phase 2: the whole data area in one message, then oosm and SHM_ACK. */
    PCK(peer_next(p, &m, TIMEOUT_MS));
    PCK(m.h.stream == 9 && m.h.type == 19 && m.h.flags == P_F_MMAP);
    PCK(m.ndesc == 1 && m.desc[0].mmap_id == 0 && m.desc[0].chunk_id == 0 &&
        m.desc[0].size == P_DATA_SIZE);
    PCK(peer_check_payload(p, &m, &fnv9) == P_DATA_SIZE);
    held[0].nd = 1;
    held[0].d[0] = m.desc[0];
    peer_expect_signal(p, "release");
    oosm_seen = __atomic_load_n(&p->pr->in[0].hdr->oosm, __ATOMIC_ACQUIRE);
    peer_free_descs(p, held[0].d, 1);
    memset(&r, 0, sizeof(r));
    r.tag = 2;
    r.a = oosm_seen;
    r.b = peer_oosm_ack(p, 0);
    r.fnv = fnv9;
    peer_report(p, &r);

    peer_drain(p, true);
    /* Everything came back: every chunk and slot of segment 0 is free. */
    for (k = 0; k < P_MAP_WORDS; k++) {
        if (p->pr->in[0].hdr->free_map[k] != ~0ull)
            PFAIL("at the end, free_map[%u] = %#llx", k,
                  (unsigned long long)p->pr->in[0].hdr->free_map[k]);
        PCK(p->pr->in[0].hdr->free_tracking_map[k] == ~0ull);
    }
    PCK(p->pr->in[0].hdr->free_map_padding == 0 &&
        p->pr->in[0].hdr->free_tracking_map_padding == 0);
}

/* interop/peer_to_lib: the peer's side. */
#define P2L_GUARDS 4
static const uint32_t p2l_guards[P2L_GUARDS] = { 0, 2, 4, 12 };

/* m1 at chunk 1; m2 at 3; m3 at 5..11; m4 at 639 then 20. */
static const struct w_desc p2l_d1[] = { { 0, 1, 1 } };
static const struct w_desc p2l_d2[] = { { 0, 3, 16384 } };
static const struct w_desc p2l_d3[] = { { 0, 5, 102400 } };
static const struct w_desc p2l_d4[] = { { 0, 639, 16384 }, { 0, 20, 5 } };

void peer_to_lib_main(struct peer *p)
{
    static const uint32_t pre[] = { 0, 1, 2, 4, 12 };   /* guards and m1 */
    static const uint32_t post[] = { 3, 5, 6, 7, 8, 9, 10, 11, 639, 20 };
    struct seg_hdr *h;
    int pfd[2];
    char x;
    unsigned i;

    peer_handshake(p);
    h = peer_make_segment(p, pre, 5);
    for (i = 0; i < sizeof(post) / sizeof(post[0]); i++)
        peer_claim_bit(h->free_map, post[i]);
    peer_fill(p, p2l_d1, 1, 11);
    peer_fill(p, p2l_d2, 1, 12);
    peer_fill(p, p2l_d3, 1, 13);
    peer_fill(p, p2l_d4, 2, 14);
    /* As if we had run out: the library must CAS it to 0 and send SHM_ACK. */
    __atomic_store_n(&h->oosm, 1, __ATOMIC_RELEASE);
    PCK(pipe2(pfd, O_CLOEXEC) == 0);

    peer_send_user(p, 11, 16, false, NULL, p2l_d1, 1, NULL, 0, -1);
    peer_send_user(p, 12, 17, false, NULL, p2l_d2, 1, NULL, 0, -1);
    peer_send_user(p, 13, 18, false, NULL, p2l_d3, 1, NULL, 0, pfd[1]);
    close(pfd[1]);
    peer_send_user(p, 14, 19, true, NULL, p2l_d4, 2, NULL, 0, -1);

    /* The library maps the segment and says so in sent_over. */
    PCK(wait_u16(&h->sent_over, P_SENT_OVER_ANY, TIMEOUT_MS));
    /* The library frees exactly the chunks the descriptors cover. */
    for (i = 0; i < sizeof(post) / sizeof(post[0]); i++)
        if (!wait_bit(h->free_map, post[i], TIMEOUT_MS))
            PFAIL("chunk %u never came back", post[i]);
    PCK(wait_bit(h->free_map, 1, TIMEOUT_MS));
    PCK(wait_u32(&h->oosm, 0, TIMEOUT_MS));
    peer_expect_signal(p, "done");
    for (i = 0; i < P_CHUNK_COUNT; i++) {
        bool guard = i == p2l_guards[0] || i == p2l_guards[1] || i == p2l_guards[2] ||
                     i == p2l_guards[3];

        if (bit_is_set(h->free_map, i) == guard)
            PFAIL("chunk %u is %s after the library freed its messages", i,
                  guard ? "free (a guard the library never saw)" : "still claimed");
    }
    PCK(h->free_map_padding == 0);
    for (i = 0; i < P_MAP_WORDS; i++)
        PCK(h->free_tracking_map[i] == ~0ull);
    /* The fd we passed reached the library, which wrote into it. */
    {
        struct pollfd pp = { .fd = pfd[0], .events = POLLIN };

        PCK(poll(&pp, 1, TIMEOUT_MS) == 1);
        PCK(read(pfd[0], &x, 1) == 1 && x == 'x');
        close(pfd[0]);
    }
    peer_bye(p);
    peer_drain(p, false);
    PCK(p->acks == 1);
}

/* interop/tracking_from_peer: the peer's side. */
void peer_tracking_main(struct peer *p)
{
    static const uint32_t chunks[] = { 10, 11 };
    static const struct w_desc da[] = { { 0, 10, 500 } };
    static const struct w_desc dc[] = { { 0, 11, 16384 } };
    struct w_tracking ta = { 0, 3 }, tb = { 0, 5 }, tc = { 0, 639 };
    struct seg_hdr *h;
    uint32_t expect;
    unsigned i;

    peer_handshake(p);
    h = peer_make_segment(p, NULL, 0);
    for (i = 0; i < 2; i++)
        peer_claim_bit(h->free_map, chunks[i]);
    peer_fill(p, da, 1, 100);
    peer_fill(p, dc, 1, 300);

    /* A: slot 3, cancelled before it is even sent. */
    peer_claim_bit(h->free_tracking_map, 3);
    __atomic_store_n(&h->tracking[3], 100, __ATOMIC_RELEASE);
    expect = 100;
    PCK(__atomic_compare_exchange_n(&h->tracking[3], &expect, 0, false, __ATOMIC_ACQ_REL,
                                    __ATOMIC_ACQUIRE));
    peer_send_user(p, 100, 16, false, &ta, da, 1, NULL, 0, -1);

    /* B: slot 5, inline, not cancelled. */
    peer_claim_bit(h->free_tracking_map, 5);
    __atomic_store_n(&h->tracking[5], 200, __ATOMIC_RELEASE);
    peer_send_user(p, 200, 17, false, &tb, NULL, 0, "bbb", 3, -1);

    /* C: the last slot, shared memory, not cancelled, LAST. */
    peer_claim_bit(h->free_tracking_map, 639);
    __atomic_store_n(&h->tracking[639], 300, __ATOMIC_RELEASE);
    peer_send_user(p, 300, 18, true, &tc, dc, 1, NULL, 0, -1);

    peer_expect_signal(p, "got");
    /* A: the library lost its swap, so it freed the slot. */
    if (!wait_bit(h->free_tracking_map, 3, TIMEOUT_MS))
        PFAIL("the library did not free tracking slot 3 of a cancelled message");
    PCK(__atomic_load_n(&h->tracking[3], __ATOMIC_ACQUIRE) == 0);
    /* B, C: the library won (tracking is 0) and left the slot to us. */
    PCK(__atomic_load_n(&h->tracking[5], __ATOMIC_ACQUIRE) == 0);
    PCK(__atomic_load_n(&h->tracking[639], __ATOMIC_ACQUIRE) == 0);
    if (bit_is_set(h->free_tracking_map, 5) || bit_is_set(h->free_tracking_map, 639))
        PFAIL("the library freed a tracking slot whose swap it won");
    expect = 200;
    PCK(!__atomic_compare_exchange_n(&h->tracking[5], &expect, 0, false, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE));
    peer_set_bit(h->free_tracking_map, 5);
    expect = 300;
    PCK(!__atomic_compare_exchange_n(&h->tracking[639], &expect, 0, false, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE));
    peer_set_bit(h->free_tracking_map, 639);
    for (i = 0; i < P_MAP_WORDS; i++)
        PCK(h->free_tracking_map[i] == ~0ull);
    /* The chunks of A (cancelled) and C came back too. */
    PCK(wait_bit(h->free_map, 10, TIMEOUT_MS));
    PCK(wait_bit(h->free_map, 11, TIMEOUT_MS));
    for (i = 0; i < P_MAP_WORDS; i++)
        PCK(h->free_map[i] == ~0ull);
    PCK(h->free_tracking_map_padding == 0);
    peer_bye(p);
    peer_drain(p, false);
}

/* interop/bye_from_peer: the peer's side. */
void peer_bye_main(struct peer *p)
{
    static const struct w_desc d[] = { { 0, 0, 1000 } };
    static uint8_t one[3], three[5];
    struct seg_hdr *h;
    unsigned i;

    peer_handshake(p);
    h = peer_make_segment(p, (const uint32_t[]){ 0 }, 1);
    peer_fill(p, d, 1, 2);
    for (i = 0; i < sizeof(one); i++)
        one[i] = pattern_byte(1, i);
    for (i = 0; i < sizeof(three); i++)
        three[i] = pattern_byte(3, i);
    peer_send_user(p, 1, 16, false, NULL, NULL, 0, one, sizeof(one), -1);
    peer_send_user(p, 2, 16, false, NULL, d, 1, NULL, 0, -1);
    peer_send_user(p, 3, 16, true, NULL, NULL, 0, three, sizeof(three), -1);
    peer_bye(p);
    /* The socket stays open: BYE alone must close the port.  The library
     * closes its end, and sends nothing in between but control messages. */
    peer_drain(p, false);
    /* The shared-memory message was released after the port closed (the
     * library may close its end before that). */
    if (!wait_bit(h->free_map, 0, TIMEOUT_MS))
        PFAIL("chunk 0 never came back after the port closed");
    for (i = 0; i < P_MAP_WORDS; i++)
        PCK(h->free_map[i] == ~0ull);
}

/* interop/tracking_from_lib: the peer's side. */
void peer_lib_tracking_main(struct peer *p)
{
    struct report r;
    struct pmsg m;
    uint64_t fnv = FNV_INIT;
    unsigned i, k;

    peer_handshake(p);
    for (i = 0; i < 2; i++) {
        struct seg_hdr *h;
        uint32_t expect, slot;
        bool won;

        PCK(peer_next(p, &m, TIMEOUT_MS));
        PCK(m.h.stream == 77 + i && m.tracked);
        h = p->pr->in[m.trk.mmap_id].hdr;
        slot = m.trk.tracking_id;
        /* The sender claimed the slot and stored the stream, or cancelled. */
        PCK(!bit_is_set(h->free_tracking_map, slot));
        expect = m.h.stream;
        won = __atomic_compare_exchange_n(&h->tracking[slot], &expect, 0, false,
                                          __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
        if (!won) {
            PCK(expect == 0);
            peer_set_bit(h->free_tracking_map, slot);     /* the loser frees */
        }
        peer_check_payload(p, &m, &fnv);
        peer_free_descs(p, m.desc, m.ndesc);
        for (k = 0; k < m.ndesc; k++)
            peer_oosm_ack(p, m.desc[k].mmap_id);
        memset(&r, 0, sizeof(r));
        r.tag = 10 + i;
        r.a = won;
        peer_report(p, &r);
    }
    peer_drain(p, true);
    for (i = 0; i < p->pr->n_in; i++)
        for (k = 0; k < P_MAP_WORDS; k++) {
            PCK(p->pr->in[i].hdr->free_map[k] == ~0ull);
            PCK(p->pr->in[i].hdr->free_tracking_map[k] == ~0ull);
        }
}

/* interop/peer_max_segments: the peer's side. */
void peer_one_segment_main(struct peer *p)
{
    struct report r = { .tag = 20 };
    uint64_t fnv = FNV_INIT;
    struct pmsg m;

    p->max_segments = 1;                /* we accept one segment only */
    peer_handshake(p);
    PCK(peer_next(p, &m, TIMEOUT_MS));
    PCK(m.h.stream == 31 && m.ndesc == 1 && m.h.size == 100);
    PCK(m.desc[0].mmap_id == 0);
    r.bytes = peer_check_payload(p, &m, &fnv);
    peer_free_descs(p, m.desc, 1);
    r.a = peer_oosm_ack(p, 0);
    r.fnv = fnv;
    peer_report(p, &r);
    peer_drain(p, true);
    PCK(p->pr->n_in == 1);
}

/* interop/segment_ids_per_pair: the peer's side. */
void peer_pair_main(struct peer *p)
{
    static const struct w_desc d1[] = { { 0, 0, 100 } };
    static const struct w_desc d2[] = { { 1, 0, 200 }, { 0, 1, 300 } };
    static const struct w_desc d3[] = { { 0, 5, 50 } };
    struct peer *a = &p[0], *b = &p[1], *c = &p[2];
    struct seg_hdr *h0, *h1;
    unsigned i;

    peer_handshake(a);
    peer_handshake(b);
    PCK(a->lib_port != b->lib_port);

    /* Segment 0 over port A, and a message on A into it. */
    h0 = peer_make_segment(a, (const uint32_t[]){ 0 }, 1);
    peer_fill(a, d1, 1, 1);
    peer_send_user(a, 1, 16, false, NULL, d1, 1, NULL, 0, -1);
    /* Segment 1 goes over port B only once the library mapped segment 0. */
    if (!wait_u16(&h0->sent_over, P_SENT_OVER_ANY, TIMEOUT_MS))
        PFAIL("the library never set sent_over of segment 0");
    h1 = peer_make_segment(b, (const uint32_t[]){ 0 }, 1);
    peer_claim_bit(h0->free_map, 1);
    peer_fill(b, d2, 2, 2);
    /* A message on B into both: segment 0 may be used by any port now. */
    peer_send_user(b, 2, 16, true, NULL, d2, 2, NULL, 0, -1);

    peer_expect_signal(a, "got");
    PCK(wait_u16(&h1->sent_over, P_SENT_OVER_ANY, TIMEOUT_MS));
    PCK(wait_bit(h0->free_map, 0, TIMEOUT_MS) && wait_bit(h0->free_map, 1, TIMEOUT_MS));
    PCK(wait_bit(h1->free_map, 0, TIMEOUT_MS));
    peer_bye(a);
    peer_bye(b);
    peer_drain(a, false);
    peer_drain(b, false);

    /* Every port of the pair is closed: both sides forget the segments,
     * and the next connection starts again from id 0. */
    for (i = 0; i < p->pr->n_out; i++)
        munmap(p->pr->out[i].base, P_SEGMENT_SIZE);
    memset(p->pr, 0, sizeof(*p->pr));
    peer_handshake(c);
    h0 = peer_make_segment(c, (const uint32_t[]){ 5 }, 1);
    PCK(h0->id == 0);
    peer_fill(c, d3, 1, 3);
    peer_send_user(c, 3, 16, true, NULL, d3, 1, NULL, 0, -1);
    peer_expect_signal(c, "got");
    PCK(wait_bit(h0->free_map, 5, TIMEOUT_MS));
    peer_bye(c);
    peer_drain(c, false);
}

/* interop/pair_restarts_after_peer_closed_unread_port: the peer's side. */
void peer_restart_main(struct peer *p)
{
    static const struct w_desc d1[] = { { 0, 0, 3000 } };    /* old segment 0 */
    static const struct w_desc d3[] = { { 0, 1, 20000 } };   /* old segment 0, chunks 1-2 */
    static const struct w_desc d4[] = { { 0, 0, 5000 } };    /* new segment 0 */
    static uint8_t two[7];
    struct peer *a = &p[0], *c = &p[1];
    struct seg_hdr *old, *nw;
    unsigned i;

    peer_handshake(a);
    old = peer_make_segment(a, (const uint32_t[]){ 0, 1, 2 }, 3);
    peer_fill(a, d1, 1, 1);
    peer_send_user(a, 1, 16, false, NULL, d1, 1, NULL, 0, -1);
    /* The library holds message 1 and has stopped reading A. */
    peer_expect_signal(a, "held");
    PCK(__atomic_load_n(&old->sent_over, __ATOMIC_ACQUIRE) == P_SENT_OVER_ANY);
    for (i = 0; i < sizeof(two); i++)
        two[i] = pattern_byte(2, i);
    peer_fill(a, d3, 1, 3);
    peer_send_user(a, 2, 16, false, NULL, NULL, 0, two, sizeof(two), -1);
    peer_send_user(a, 3, 16, true, NULL, d3, 1, NULL, 0, -1);
    peer_bye(a);
    PCK(close(a->sock) == 0);
    a->sock = -1;

    /* No port left: the pair is over for us.  (We keep our mapping of the
     * old segment only to watch its chunks come back.) */
    memset(p->pr, 0, sizeof(*p->pr));
    peer_handshake(c);
    nw = peer_make_segment(c, (const uint32_t[]){ 0 }, 1);
    PCK(nw->id == 0 && nw != old);
    peer_fill(c, d4, 1, 4);
    peer_send_user(c, 4, 17, true, NULL, d4, 1, NULL, 0, -1);
    PCK(wait_u16(&nw->sent_over, P_SENT_OVER_ANY, TIMEOUT_MS));

    /* The library released every message: each chunk came back to the
     * segment it was in. */
    peer_expect_signal(c, "done");
    if (!wait_bit(nw->free_map, 0, TIMEOUT_MS))
        PFAIL("chunk 0 of the new segment 0 never came back");
    for (i = 0; i < 3; i++)
        if (!wait_bit(old->free_map, i, TIMEOUT_MS))
            PFAIL("chunk %u of the old segment 0 never came back", i);
    for (i = 0; i < P_MAP_WORDS; i++) {
        PCK(old->free_map[i] == ~0ull && nw->free_map[i] == ~0ull);
        PCK(old->free_tracking_map[i] == ~0ull && nw->free_tracking_map[i] == ~0ull);
    }
    peer_bye(c);
    peer_drain(c, false);
    munmap(old, P_SEGMENT_SIZE);
    munmap(nw, P_SEGMENT_SIZE);
}

/* interop/second_port_mmap_id_0_while_first_open_is_violation: the peer's side. */
void peer_second_port_main(struct peer *p)
{
    static const struct w_desc d1[] = { { 0, 0, 3000 } };
    static const struct w_desc d2[] = { { 0, 1, 100 } };
    static struct pair fresh;
    struct peer *a = &p[0], *c = &p[1];
    struct report r = { .tag = 30 };
    uint64_t fnv = FNV_INIT;
    struct seg_hdr *h0, *wrong;
    struct pmsg m;
    unsigned i;

    peer_handshake(a);
    h0 = peer_make_segment(a, (const uint32_t[]){ 0, 1 }, 2);
    peer_fill(a, d1, 1, 1);
    peer_send_user(a, 1, 16, false, NULL, d1, 1, NULL, 0, -1);
    peer_expect_signal(a, "held");
    PCK(__atomic_load_n(&h0->sent_over, __ATOMIC_ACQUIRE) == P_SENT_OVER_ANY);
    peer_fill(a, d2, 1, 2);
    peer_send_user(a, 2, 16, false, NULL, d2, 1, NULL, 0, -1);

    /* A stays open.  C acts as if the pair were new: id 0 again. */
    c->pr = &fresh;
    peer_handshake(c);
    wrong = peer_make_segment(c, (const uint32_t[]){ 0 }, 1);
    PCK(wrong->id == 0);
    peer_drain(c, false);               /* the library closes C */
    PCK(wrong->sent_over == c->port_id); /* never mapped */
    munmap(wrong, P_SEGMENT_SIZE);

    /* A works on: the library sends over it, in its own segment. */
    PCK(peer_next(a, &m, TIMEOUT_MS));
    PCK(m.h.stream == 5 && m.h.type == 18 && m.ndesc == 1 && m.h.size == 1000);
    PCK(m.desc[0].mmap_id == 0);
    r.bytes = peer_check_payload(a, &m, &fnv);
    peer_free_descs(a, m.desc, 1);
    peer_oosm_ack(a, 0);
    r.fnv = fnv;
    /* Both our messages came back. */
    PCK(wait_bit(h0->free_map, 0, TIMEOUT_MS) && wait_bit(h0->free_map, 1, TIMEOUT_MS));
    for (i = 0; i < P_MAP_WORDS; i++)
        PCK(h0->free_map[i] == ~0ull);
    peer_report(a, &r);
    peer_bye(a);
    peer_drain(a, false);
}

/* ---- Message rings ---- */

/* The next user message must be stream, of size bytes, in shared memory or
 * not, with an fd or not: every byte checked into *fnv, its chunks freed
 * (and SHM_ACK owed for oosm), its fd closed.  Returns its carrier. */
static bool peer_take(struct peer *p, uint32_t stream, uint32_t size, bool shm, bool fd,
                      uint64_t *fnv)
{
    struct pmsg m;
    unsigned k;

    if (!peer_next(p, &m, TIMEOUT_MS))
        PFAIL("end of file before stream %u", stream);
    if (m.h.stream != stream || m.h.size != size || (m.ndesc > 0) != shm || (m.fd >= 0) != fd)
        PFAIL("expected stream %u (%u bytes, shm %d, fd %d), got stream %u type %u (%u bytes, "
              "%u descriptors, fd %d)", stream, size, shm, fd, m.h.stream, m.h.type, m.h.size,
              m.ndesc, m.fd);
    peer_check_payload(p, &m, fnv);
    peer_free_descs(p, m.desc, m.ndesc);
    for (k = 0; k < m.ndesc; k++)
        peer_oosm_ack(p, m.desc[k].mmap_id);
    if (m.fd >= 0)
        close(m.fd);
    return m.from_ring;
}

/* Chunks of our segment id for a message of size bytes: the next run from
 * a cursor, once the library has freed it; filled with the payload of stream. */
static struct w_desc peer_shm(struct peer *p, uint32_t id, uint32_t *cursor, uint32_t size,
                              uint32_t stream)
{
    struct w_desc d = { id, 0, size };
    uint32_t k = (size + P_CHUNK_SIZE - 1) / P_CHUNK_SIZE, c;

    PCK(k >= 1 && k <= P_CHUNK_COUNT);
    if (*cursor + k > P_CHUNK_COUNT)
        *cursor = 0;
    d.chunk_id = *cursor;
    for (c = d.chunk_id; c < d.chunk_id + k; c++) {
        if (!wait_bit(p->pr->out[id].hdr->free_map, c, TIMEOUT_MS))
            PFAIL("chunk %u of our segment %u never came back", c, id);
        peer_claim_bit(p->pr->out[id].hdr->free_map, c);
    }
    *cursor += k;
    peer_fill(p, &d, 1, stream);
    return d;
}

/* Inline payload of stream, size bytes, into sbuf's tail (not sbuf itself:
 * peer_send_user builds the message there). */
static const uint8_t *pat_inline(uint32_t stream, uint32_t size)
{
    static uint8_t b[P_INLINE_MAX];
    uint32_t i;

    for (i = 0; i < size; i++)
        b[i] = pattern_byte(stream, i);
    return b;
}

/* interop/ring_hello_*: the peer's side. */
void peer_ring_hello_main(struct peer *p)
{
    struct report r = { .tag = 40 };
    uint64_t fnv = FNV_INIT;
    int pfd[2];
    unsigned i;
    char x;

    peer_handshake(p);
    r.a = p->lib_features;
    r.b = p->lib_ring_size;
    peer_report(p, &r);
    /* 1..3 inline, 4 in shared memory, 5 with an fd (a pipe's write end). */
    peer_take(p, 1, 10, false, false, &fnv);
    peer_take(p, 2, 1000, false, false, &fnv);
    peer_take(p, 3, 16384, false, false, &fnv);
    peer_take(p, 4, 5000, true, false, &fnv);
    {
        struct pmsg m;

        PCK(peer_next(p, &m, TIMEOUT_MS));
        PCK(m.h.stream == 5 && m.h.size == 0 && m.fd >= 0 && !m.from_ring);
        PCK(write(m.fd, "y", 1) == 1);
        close(m.fd);
    }
    /* And back: 11..13 inline, 14 with an fd. */
    for (i = 11; i <= 13; i++)
        peer_send_user(p, i, 16, false, NULL, NULL, 0, pat_inline(i, 100 * i), 100 * i, -1);
    PCK(pipe2(pfd, O_CLOEXEC) == 0);
    peer_send_user(p, 14, 16, false, NULL, NULL, 0, NULL, 0, pfd[1]);
    close(pfd[1]);
    {
        struct pollfd pp = { .fd = pfd[0], .events = POLLIN };

        PCK(poll(&pp, 1, TIMEOUT_MS) == 1);
        PCK(read(pfd[0], &x, 1) == 1 && x == 'z');
        close(pfd[0]);
    }
    memset(&r, 0, sizeof(r));
    r.tag = 41;
    r.a = p->ring_msgs_in;
    r.b = p->sock_msgs_in;
    r.c = p->in.hdr != NULL;
    r.d = p->fences_in;
    r.pad = p->out.hdr != NULL;
    r.bytes = p->in.size;
    r.fnv = fnv;
    peer_report(p, &r);
    peer_drain(p, true);
}

/* interop/ring_inline_and_shm_both_ways_wrap_many_times: the peer's side. */
void peer_ring_wrap_main(struct peer *p)
{
    struct report r = { .tag = 50 };
    uint64_t fnv = FNV_INIT;
    uint32_t i, cursor = 0;

    peer_handshake(p);
    PCK(p->rings);
    for (i = 0; i < N_WRAP_MSGS; i++) {
        r.bytes += wrap_size(i);
        if (!peer_take(p, i, wrap_size(i), wrap_is_shm(i), false, &fnv))
            PFAIL("stream %u came over the socket", i);
    }
    r.a = p->ring_msgs_in;
    r.b = p->skips_in;
    r.c = p->in.size;
    r.fnv = fnv;
    peer_report(p, &r);

    /* And back, through our ring and our segment. */
    peer_make_segment(p, NULL, 0);
    for (i = 0; i < N_WRAP_MSGS; i++) {
        uint32_t size = wrap_size(i);

        if (wrap_is_shm(i)) {
            struct w_desc d = peer_shm(p, 0, &cursor, size, i);

            peer_send_user(p, i, 17, false, NULL, &d, 1, NULL, 0, -1);
        } else {
            peer_send_user(p, i, 16, false, NULL, NULL, 0, pat_inline(i, size), size, -1);
        }
    }
    memset(&r, 0, sizeof(r));
    r.tag = 51;
    r.a = p->ring_msgs_out;
    r.b = p->skips_out;
    r.c = p->out.size;
    r.d = p->sock_msgs_out;
    peer_report(p, &r);
    peer_drain(p, true);
}

const struct order_msg order_msgs[N_ORDER_MSGS] = {
    { 1, O_INLINE, 100 },
    { 2, O_INLINE, 200 },
    { 3, O_FD, 10 },
    { 4, O_INLINE, 300 },
    { 5, O_SHM, 5000 },          /* the first segment's first message */
    { 6, O_INLINE, 50 },
    { 7, O_SHM_FD, 20000 },
    { 8, O_INLINE, 0 },
    { 9, O_FD, 0 },
    { 10, O_INLINE, 16384 },
    { 11, O_SHM_NEWSEG, 3000 },  /* a second segment's first message */
    { 12, O_INLINE, 1 },
    { 13, O_FD, 16384 },
};

/* interop/ring_order_*: the peer's side, both directions. */
void peer_ring_order_main(struct peer *p)
{
    struct report r = { .tag = 60 };
    uint64_t fnv = FNV_INIT;
    uint32_t cursor[2] = { 0, 0 };
    unsigned i;

    peer_handshake(p);
    PCK(p->rings);
    for (i = 0; i < N_ORDER_MSGS; i++) {
        const struct order_msg *o = &order_msgs[i];
        bool fd = o->kind == O_FD || o->kind == O_SHM_FD;
        bool shm = o->kind >= O_SHM;

        if (peer_take(p, o->stream, o->size, shm, fd, &fnv) == fd)
            PFAIL("stream %u came %s", o->stream, fd ? "in the ring with an fd" :
                                                       "over the socket without an fd");
        r.bytes += o->size;
    }
    r.a = p->ring_msgs_in;
    r.b = p->sock_msgs_in;
    r.c = p->fences_in;
    r.d = p->pr->n_in;
    r.fnv = fnv;
    peer_report(p, &r);

    for (i = 0; i < N_ORDER_MSGS; i++) {
        const struct order_msg *o = &order_msgs[i];
        int pfd[2] = { -1, -1 };
        struct w_desc d;

        if (o->kind == O_FD || o->kind == O_SHM_FD)
            PCK(pipe2(pfd, O_CLOEXEC) == 0);
        if (o->kind == O_SHM && p->pr->n_out == 0)
            peer_make_segment(p, NULL, 0);
        if (o->kind == O_SHM_NEWSEG)
            peer_make_segment(p, NULL, 0);
        if (o->kind >= O_SHM) {
            uint32_t id = p->pr->n_out - 1;

            d = peer_shm(p, id, &cursor[id], o->size, o->stream);
            peer_send_user(p, o->stream, 18, false, NULL, &d, 1, NULL, 0, pfd[1]);
        } else {
            peer_send_user(p, o->stream, 18, false, NULL, NULL, 0,
                           pat_inline(o->stream, o->size), o->size, pfd[1]);
        }
        if (pfd[1] >= 0) {
            close(pfd[1]);
            close(pfd[0]);
        }
    }
    memset(&r, 0, sizeof(r));
    r.tag = 61;
    r.a = p->ring_msgs_out;
    r.b = p->sock_msgs_out;
    peer_report(p, &r);
    peer_drain(p, true);
}

/* interop/ring_full_library_producer_waits: the peer's side. */
void peer_ring_full_slow_consumer_main(struct peer *p)
{
    struct report r = { .tag = 70 };
    uint64_t fnv = FNV_INIT;
    uint32_t i;

    peer_handshake(p);
    PCK(p->rings);
    peer_report(p, &r);
    /* Let the library fill our 64 KiB ring and wait. */
    usleep(300000);
    for (i = 0; i < N_FULL_MSGS; i++) {
        if (!peer_take(p, 1000 + i, FULL_MSG_SIZE, false, false, &fnv))
            PFAIL("stream %u came over the socket", 1000 + i);
        if (i % 4 == 0)
            usleep(1000);
    }
    memset(&r, 0, sizeof(r));
    r.tag = 71;
    r.a = p->ring_msgs_in;
    r.b = p->space_acks_out;
    r.c = p->in.size;
    r.bytes = (uint64_t)N_FULL_MSGS * FULL_MSG_SIZE;
    r.fnv = fnv;
    peer_report(p, &r);
    peer_drain(p, true);
}

/* interop/ring_full_peer_producer_waits: the peer's side. */
void peer_ring_full_producer_main(struct peer *p)
{
    struct report r = { .tag = 72 };
    uint32_t i;

    peer_handshake(p);
    PCK(p->rings);
    for (i = 0; i < N_FULL_MSGS; i++)
        peer_send_user(p, 1000 + i, 16, false, NULL, NULL, 0,
                       pat_inline(1000 + i, FULL_MSG_SIZE), FULL_MSG_SIZE, -1);
    r.a = p->ring_full;
    r.b = p->acks;
    r.c = p->ring_msgs_out;
    r.d = p->out.size;
    peer_report(p, &r);
    peer_drain(p, true);
}

/* interop/ring_sleeping_consumers_woken_*: the peer's side. */
void peer_ring_wake_main(struct peer *p)
{
    struct report r = { .tag = 80 };
    uint64_t fnv = FNV_INIT;
    uint32_t i;

    peer_handshake(p);
    PCK(p->rings);
    for (i = 0; i < N_WAKE_ROUNDS; i++) {
        /* The library naps before each ping: we sleep on its ring. */
        if (!peer_take(p, 100 + i, 64, false, false, &fnv))
            PFAIL("ping %u came over the socket", i);
        /* We nap before each pong: the library sleeps on ours. */
        usleep(WAKE_NAP_US);
        peer_send_user(p, 200 + i, 16, false, NULL, NULL, 0, pat_inline(200 + i, 64), 64, -1);
    }
    r.a = p->futex_woken;
    r.b = p->wake_dgrams_in;
    r.c = p->futex_wakes_out;
    r.d = p->wake_dgrams_out;
    r.pad = p->sleeps;
    r.fnv = fnv;
    peer_report(p, &r);
    peer_drain(p, true);
}
