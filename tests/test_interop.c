/*
 * Interoperability with an independent implementation of the wire protocol.
 *
 * The peer below was written from linuxshm-protocol(7) alone: its own
 * structures and constants, raw SOCK_SEQPACKET sendmsg/recvmsg with
 * SCM_RIGHTS and SCM_CREDENTIALS, its own sealed memfd segments.  It runs in
 * a forked child and calls no lshm_* function; the library port lives in the
 * test process (made with lshm_socketpair before the fork).  The child
 * reports a failed check on stderr and in its exit status; results that the
 * parent must compare travel back as inline user messages of type 20.
 *
 *   handshake            HELLOs both ways, credentials, port ids
 *   lib_to_peer          inline and shared-memory messages to the peer, which
 *                        frees the chunks; they all come back; oosm, SHM_ACK
 *   peer_to_lib          the peer's own segment; the library frees exactly
 *                        the chunks each descriptor covers; SHM_ACK from it
 *   tracking_from_peer   cancelled and not cancelled tracked messages
 *   bye_from_peer        BYE after queued messages: drained, then -EPIPE
 *   tracking_from_lib    the library's tracking slots, seen by the peer
 *   peer_max_segments    the peer's HELLO bounds the library's segments
 *   segment_ids_per_pair two ports share the pair's ids; a later connection
 *                        starts again from 0
 *   pair_restarts_after_peer_closed_unread_port
 *                        the peer closed every port, one still unread here
 *                        (recv_queue 1): its new port starts again from 0
 *   second_port_mmap_id_0_while_first_open_is_violation
 *                        with a port still open at the peer, id 0 on another
 *                        is refused; only that port closes
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"
#include "linuxshm.h"

/* ---- The protocol, as the page states it (own names, own values) ---- */

#define P_MAGIC         0x4d48534cu
#define P_VERSION       1u
#define P_HEADER_SIZE   4096u
#define P_CHUNK_SIZE    16384u
#define P_CHUNK_COUNT   640u
#define P_DATA_SIZE     10485760u
#define P_SEGMENT_SIZE  10489856u
#define P_INLINE_MAX    16384u
#define P_WIRE_MAX      16448u
#define P_MAX_DESCS     64u
#define P_USER_MIN      16u
#define P_MAP_WORDS     10u
#define P_SENT_OVER_ANY 0xffffu

#define P_HELLO   0
#define P_MMAP    1
#define P_SHM_ACK 2
#define P_BYE     3

#define P_F_LAST     0x01
#define P_F_MMAP     0x02
#define P_F_TRACKING 0x04

/* The page and <linuxshm.h> must agree. */
_Static_assert(P_MAGIC == LSHM_MAGIC, "magic");
_Static_assert(P_VERSION == LSHM_PROTOCOL_VERSION, "version");
_Static_assert(P_HEADER_SIZE == LSHM_HEADER_SIZE, "header size");
_Static_assert(P_CHUNK_SIZE == LSHM_CHUNK_SIZE, "chunk size");
_Static_assert(P_CHUNK_COUNT == LSHM_CHUNK_COUNT, "chunk count");
_Static_assert(P_DATA_SIZE == LSHM_DATA_SIZE, "data size");
_Static_assert(P_SEGMENT_SIZE == LSHM_SEGMENT_SIZE, "segment size");
_Static_assert(P_DATA_SIZE == P_CHUNK_SIZE * P_CHUNK_COUNT, "data area");
_Static_assert(P_SEGMENT_SIZE == P_HEADER_SIZE + P_DATA_SIZE, "segment");
_Static_assert(P_INLINE_MAX == LSHM_INLINE_MAX, "inline max");
_Static_assert(P_WIRE_MAX == LSHM_WIRE_MAX, "wire max");
_Static_assert(P_MAX_DESCS == LSHM_MAX_DESCS, "max descs");
_Static_assert(P_USER_MIN == LSHM_TYPE_USER_MIN, "user types");

struct w_hdr {
    uint32_t stream;
    int32_t  pid;
    uint16_t port_id;
    uint8_t  type;
    uint8_t  flags;
    uint32_t size;
};
_Static_assert(sizeof(struct w_hdr) == 16, "header");
_Static_assert(offsetof(struct w_hdr, pid) == 4 && offsetof(struct w_hdr, port_id) == 8 &&
               offsetof(struct w_hdr, type) == 10 && offsetof(struct w_hdr, flags) == 11 &&
               offsetof(struct w_hdr, size) == 12, "header offsets");

struct w_tracking {
    uint32_t mmap_id;
    uint32_t tracking_id;
};
_Static_assert(sizeof(struct w_tracking) == 8, "tracking");

struct w_desc {
    uint32_t mmap_id;
    uint32_t chunk_id;
    uint32_t size;
};
_Static_assert(sizeof(struct w_desc) == 12, "desc");

struct w_hello {
    uint32_t magic;
    uint16_t version;
    uint16_t port_id;
    uint32_t header_size;
    uint32_t chunk_size;
    uint32_t chunk_count;
    uint32_t max_segments;
};
_Static_assert(sizeof(struct w_hello) == 24, "hello");
_Static_assert(16 + offsetof(struct w_hello, version) == 20 &&
               16 + offsetof(struct w_hello, port_id) == 22 &&
               16 + offsetof(struct w_hello, header_size) == 24 &&
               16 + offsetof(struct w_hello, max_segments) == 36, "hello offsets");

struct seg_hdr {
    uint32_t magic;
    uint16_t version;
    uint16_t sent_over;
    uint32_t id;
    int32_t  src_pid;
    int32_t  dst_pid;
    uint32_t oosm;
    uint64_t free_map[P_MAP_WORDS];
    uint64_t free_map_padding;
    uint64_t free_tracking_map[P_MAP_WORDS];
    uint64_t free_tracking_map_padding;
    uint32_t tracking[P_CHUNK_COUNT];
};
_Static_assert(offsetof(struct seg_hdr, version) == 4, "seg version");
_Static_assert(offsetof(struct seg_hdr, sent_over) == 6, "seg sent_over");
_Static_assert(offsetof(struct seg_hdr, id) == 8, "seg id");
_Static_assert(offsetof(struct seg_hdr, src_pid) == 12, "seg src_pid");
_Static_assert(offsetof(struct seg_hdr, dst_pid) == 16, "seg dst_pid");
_Static_assert(offsetof(struct seg_hdr, oosm) == 20, "seg oosm");
_Static_assert(offsetof(struct seg_hdr, free_map) == 24, "seg free_map");
_Static_assert(offsetof(struct seg_hdr, free_map_padding) == 104, "seg padding");
_Static_assert(offsetof(struct seg_hdr, free_tracking_map) == 112, "seg tracking map");
_Static_assert(offsetof(struct seg_hdr, free_tracking_map_padding) == 192, "seg padding 2");
_Static_assert(offsetof(struct seg_hdr, tracking) == 200, "seg tracking");
_Static_assert(sizeof(struct seg_hdr) == 2760, "seg header used bytes");

#ifndef MFD_NOEXEC_SEAL
#define MFD_NOEXEC_SEAL 0x0008u
#endif
#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif

/* ---- Shared by both sides of the test (not protocol) ---- */

#define PEER_PORT_ID   4242
#define PEER_MAX_SEGS  4
#define T_REPORT       20
#define T_SIGNAL       21
#define TIMEOUT_MS     5000

/* What the peer reports back, inline, in a message of type T_REPORT. */
struct report {
    uint32_t tag;
    uint32_t a, b, c, d;
    uint32_t pad;
    uint64_t bytes;
    uint64_t fnv;
};

static uint8_t pat(uint32_t stream, uint64_t off)
{
    uint32_t x = (uint32_t)off * 2654435761u ^ stream * 0x27d4eb2du;

    return (uint8_t)((x >> 24) ^ (x >> 11) ^ off);
}

#define FNV_INIT 0xcbf29ce484222325ull

static uint64_t fnv_byte(uint64_t h, uint8_t b)
{
    return (h ^ b) * 0x100000001b3ull;
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

/* One port of the peer. */
struct peer {
    int          sock;
    pid_t        me;
    uint16_t     port_id;           /* ours, in every header */
    uint32_t     max_segments;      /* ours, in our HELLO */
    struct pair *pr;
    pid_t        lib_pid;           /* from the credentials of the library's HELLO */
    uint16_t     lib_port;
    uint32_t     lib_max_segments;
    unsigned     acks;              /* SHM_ACKs received */
    bool         got_bye;
    bool         sent_bye;
};

/* A user message as the peer received it; inl points into the receive buffer. */
struct pmsg {
    struct w_hdr      h;
    bool              tracked;
    struct w_tracking trk;
    unsigned          ndesc;
    struct w_desc     desc[P_MAX_DESCS];
    const uint8_t    *inl;
    int               fd;
};

static uint8_t rbuf[P_WIRE_MAX];
static uint8_t sbuf[P_WIRE_MAX];

__attribute__((noreturn, format(printf, 2, 3)))
static void peer_fail(int line, const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "interop peer %d: test_interop.c:%d: ", (int)getpid(), line);
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

static void peer_send(struct peer *p, uint32_t stream, uint8_t type, uint8_t flags,
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

/* One user message: tracking (or NULL), descriptors or an inline payload. */
static void peer_send_user(struct peer *p, uint32_t stream, uint8_t type, bool last,
                           const struct w_tracking *trk, const struct w_desc *d,
                           unsigned nd, const void *inl, uint32_t inl_len, int fd)
{
    size_t len = 0;
    uint64_t size = 0;
    uint8_t flags = last ? P_F_LAST : 0;
    unsigned i;

    if (trk != NULL) {
        memcpy(sbuf, trk, sizeof(*trk));
        len += sizeof(*trk);
        flags |= P_F_TRACKING;
    }
    if (nd > 0) {
        flags |= P_F_MMAP;
        for (i = 0; i < nd; i++) {
            memcpy(sbuf + len, &d[i], sizeof(d[i]));
            len += sizeof(d[i]);
            size += d[i].size;
        }
    } else {
        PCK(inl_len <= P_INLINE_MAX);
        if (inl_len > 0)
            memcpy(sbuf + len, inl, inl_len);
        len += inl_len;
        size = inl_len;
    }
    peer_send(p, stream, type, flags, (uint32_t)size, sbuf, len, fd);
}

static void peer_report(struct peer *p, const struct report *r)
{
    peer_send_user(p, 0, T_REPORT, false, NULL, NULL, 0, r, sizeof(*r), -1);
}

/*
 * Receive one datagram: returns its length (0 at end of file), with the fd
 * that came with it (-1 if none) and the credentials the kernel attached.
 */
static size_t peer_recv_raw(struct peer *p, int *fd, struct ucred *cred, bool *has_cred,
                            int timeout_ms)
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
        PFAIL("port %u: no datagram from the library within %d ms", p->port_id, timeout_ms);
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
    return (size_t)n;
}

static void peer_handshake(struct peer *p)
{
    struct ucred cred;
    struct w_hdr h;
    struct w_hello hello, mine = { P_MAGIC, P_VERSION, p->port_id, P_HEADER_SIZE,
                                   P_CHUNK_SIZE, P_CHUNK_COUNT, p->max_segments };
    bool has_cred;
    size_t n;
    int one = 1, fd;

    /* SO_PASSCRED before our HELLO.  The library sends its own at once,
     * without waiting for ours: read it first to prove that. */
    PCK(setsockopt(p->sock, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)) == 0);
    n = peer_recv_raw(p, &fd, &cred, &has_cred, TIMEOUT_MS);
    PCK(n == 40);
    PCK(fd < 0);
    memcpy(&h, rbuf, sizeof(h));
    memcpy(&hello, rbuf + 16, sizeof(hello));
    PCK(h.stream == 0 && h.type == P_HELLO && h.flags == 0 && h.size == 24);
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
    p->lib_pid = cred.pid;
    p->lib_port = h.port_id;
    p->lib_max_segments = hello.max_segments;

    peer_send(p, 0, P_HELLO, 0, sizeof(mine), &mine, sizeof(mine), -1);
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
    PCK(h->version == P_VERSION);
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

/*
 * The next user message, with every check of RECEIVER'S DUTIES; MMAP,
 * SHM_ACK and BYE are handled on the way.  Returns false at end of file.
 */
static bool peer_next(struct peer *p, struct pmsg *m, int timeout_ms)
{
    for (;;) {
        struct ucred cred;
        bool has_cred;
        size_t n, t;
        uint64_t sum = 0;
        unsigned i;
        int fd;

        n = peer_recv_raw(p, &fd, &cred, &has_cred, timeout_ms);
        if (n == 0)
            return false;
        PCK(!p->got_bye);               /* nothing after BYE */
        PCK(n >= 16 && n <= P_WIRE_MAX);
        memcpy(&m->h, rbuf, sizeof(m->h));
        PCK(has_cred && cred.pid == p->lib_pid);
        PCK(m->h.pid == p->lib_pid);
        PCK(m->h.port_id == p->lib_port);
        PCK((m->h.flags & ~(P_F_LAST | P_F_MMAP | P_F_TRACKING)) == 0);

        if (m->h.type < P_USER_MIN) {
            PCK(m->h.type <= P_BYE);
            PCK(m->h.type != P_HELLO);  /* sent exactly once */
            PCK(m->h.stream == 0 && m->h.flags == 0);
            if (m->h.type == P_MMAP) {
                uint32_t id;

                PCK(n == 20 && m->h.size == 4 && fd >= 0);
                memcpy(&id, rbuf + 16, sizeof(id));
                peer_map(p, id, fd);
            } else {
                PCK(n == 16 && m->h.size == 0 && fd < 0);
                if (m->h.type == P_SHM_ACK)
                    p->acks++;
                else
                    p->got_bye = true;
            }
            continue;
        }

        m->tracked = m->h.flags & P_F_TRACKING;
        t = m->tracked ? sizeof(m->trk) : 0;
        PCK(n >= 16 + t);
        if (m->tracked) {
            memcpy(&m->trk, rbuf + 16, sizeof(m->trk));
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

                memcpy(d, rbuf + 16 + t + i * sizeof(*d), sizeof(*d));
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
            m->inl = rbuf + 16 + t;
        }
        m->fd = fd;
        return true;
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
 * Check every payload byte against pat(stream, offset) and fold it into *fnv;
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
            if (m->inl[off] != pat(m->h.stream, off))
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
            if (b[k] != pat(m->h.stream, off))
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
    h->version = P_VERSION;
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

/* Write pat(stream, offset) into our segments where the descriptors say. */
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
            b[k] = pat(stream, off++);
    }
}

/* Poll a bitmap word set for bit i to become set; false on timeout. */
static bool wait_bit(const uint64_t *map, uint32_t i, int timeout_ms)
{
    long long end = now_ms() + timeout_ms;

    while (!bit_is_set(map, i)) {
        if (now_ms() > end)
            return false;
        usleep(200);
    }
    return true;
}

static bool wait_u32(const uint32_t *v, uint32_t want, int timeout_ms)
{
    long long end = now_ms() + timeout_ms;

    while (__atomic_load_n(v, __ATOMIC_ACQUIRE) != want) {
        if (now_ms() > end)
            return false;
        usleep(200);
    }
    return true;
}

static bool wait_u16(const uint16_t *v, uint16_t want, int timeout_ms)
{
    long long end = now_ms() + timeout_ms;

    while (__atomic_load_n(v, __ATOMIC_ACQUIRE) != want) {
        if (now_ms() > end)
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

/* p is an array of as many ports as the test made (mostly one). */
typedef void (*peer_fn)(struct peer *p);

__attribute__((noreturn))
static void peer_run(const int *socks, unsigned n, peer_fn fn)
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
        p[k].sock = socks[k];
        p[k].me = getpid();
        p[k].port_id = (uint16_t)(PEER_PORT_ID + k);
        p[k].max_segments = PEER_MAX_SEGS;
        p[k].pr = &pr;
    }
    fn(p);
    _exit(0);
}

/* ---- The library side (the test process) ---- */

struct ipair {
    struct lshm_ctx  *ctx;
    struct lshm_port *port;
    pid_t             pid;
};

static void ip_start(struct ipair *ip, unsigned max_segments, peer_fn fn)
{
    struct lshm_ctx_params prm;
    int sock, ret;

    memset(&prm, 0, sizeof(prm));
    prm.max_segments = max_segments;
    ret = lshm_ctx_new(&ip->ctx, &prm);
    cr_assert_eq(ret, 0, "lshm_ctx_new: %d %s", ret, lshm_last_error());
    ret = lshm_socketpair(ip->ctx, &ip->port, &sock);
    cr_assert_eq(ret, 0, "lshm_socketpair: %d %s", ret, lshm_last_error());
    fflush(NULL);
    ip->pid = fork();
    cr_assert_geq(ip->pid, 0);
    if (ip->pid == 0)
        peer_run(&sock, 1, fn);
    close(sock);
}

static void ip_ready(struct ipair *ip)
{
    int ret = lshm_port_wait(ip->port, LSHM_WAIT_READY, TIMEOUT_MS);

    cr_assert(ret > 0 && (ret & LSHM_WAIT_READY), "handshake: %d %s", ret,
              lshm_port_error(ip->port) ? lshm_port_error(ip->port) : lshm_last_error());
}

static void ip_finish(struct ipair *ip)
{
    int st;

    lshm_port_close(ip->port);
    lshm_ctx_free(ip->ctx);
    st = wait_child(ip->pid, TIMEOUT_MS);
    cr_assert_neq(st, -1, "the independent peer did not finish");
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0,
              "the independent peer failed (%s %d), see its line on stderr",
              WIFEXITED(st) ? "exit" : "signal", WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
}

static void ip_recv(struct ipair *ip, struct lshm_msg *msg)
{
    int ret = lshm_recv(ip->port, msg, TIMEOUT_MS);

    cr_assert_eq(ret, 0, "lshm_recv: %d (%s); the peer's stderr may say why", ret,
                 lshm_port_error(ip->port) ? lshm_port_error(ip->port) : lshm_last_error());
}

static void ip_recv_report(struct ipair *ip, uint32_t tag, struct report *r)
{
    struct lshm_msg msg;

    ip_recv(ip, &msg);
    cr_assert_eq(msg.type, T_REPORT);
    cr_assert_eq(msg.flags, 0);
    cr_assert_eq(msg.size, sizeof(*r));
    cr_assert_eq(msg.niov, 1);
    memcpy(r, msg.iov[0].base, sizeof(*r));
    cr_assert_eq(msg.fd, -1);
    lshm_msg_done(&msg);
    cr_assert_eq(r->tag, tag);
}

static void ip_expect_closed(struct ipair *ip)
{
    struct lshm_msg msg;
    int ret = lshm_recv(ip->port, &msg, TIMEOUT_MS);

    cr_assert_eq(ret, -EPIPE, "lshm_recv after the peer's BYE: %d", ret);
    cr_assert_not_null(lshm_port_error(ip->port));
    cr_log_info("interop: port closed: %s", lshm_port_error(ip->port));
}

static void ip_signal(struct ipair *ip, const char *word)
{
    struct lshm_out out = { .type = T_SIGNAL, .data = word, .size = strlen(word), .fd = -1 };
    int ret = lshm_send(ip->port, &out, 0);

    cr_assert_eq(ret, 0, "lshm_send: %d %s", ret, lshm_last_error());
}

/* Check a received payload against pat(stream, offset). */
static void check_bytes(const struct lshm_msg *msg, uint32_t stream)
{
    uint64_t off = 0;
    unsigned i;
    size_t k;

    for (i = 0; i < msg->niov; i++) {
        const uint8_t *b = msg->iov[i].base;

        for (k = 0; k < msg->iov[i].len; k++, off++)
            if (b[k] != pat(stream, off))
                cr_assert_fail("stream %u: byte %llu is %#x, want %#x", stream,
                               (unsigned long long)off, b[k], pat(stream, off));
    }
    cr_assert_eq(off, msg->size);
}

static uint64_t fnv_pat(uint64_t h, uint32_t stream, uint64_t size)
{
    uint64_t off;

    for (off = 0; off < size; off++)
        h = fnv_byte(h, pat(stream, off));
    return h;
}

/* ================= 1. handshake both ways ================= */

static void peer_handshake_main(struct peer *p)
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

LTEST(interop, handshake)
{
    struct lshm_out ping = { .type = T_SIGNAL, .last = 1, .stream = 5, .data = "ping",
                             .size = 4, .fd = -1 };
    struct ipair ip;
    struct report r;
    pid_t pid = 0;
    uid_t uid = 0;
    gid_t gid = 0;
    int ret;

    ip_start(&ip, 7, peer_handshake_main);
    ret = lshm_send(ip.port, &ping, 0);
    cr_assert_eq(ret, 0, "inline send before the handshake: %d", ret);
    ip_ready(&ip);
    ret = lshm_port_peer(ip.port, &pid, &uid, &gid);
    cr_assert_eq(ret, 0);
    cr_assert_eq(pid, ip.pid, "peer pid %d, child %d", (int)pid, (int)ip.pid);
    cr_assert_eq(uid, getuid());
    cr_assert_eq(gid, getgid());

    ip_recv_report(&ip, 1, &r);
    cr_assert_eq(r.a, (uint32_t)lshm_port_id(ip.port), "HELLO port_id %u, lshm_port_id %d",
                 r.a, lshm_port_id(ip.port));
    cr_assert_eq(r.b, 7, "HELLO max_segments %u", r.b);
    cr_assert_eq(r.c, (uint32_t)getpid());
    ip_signal(&ip, "bye");
    ip_expect_closed(&ip);
    ip_finish(&ip);
}

/* ================= 2. library -> peer ================= */

struct lib_msg {
    uint32_t stream;
    uint8_t  type;
    uint8_t  flags;      /* wire flags */
    uint32_t nbufs;      /* 0: inline */
    uint32_t sizes[3];
};

#define SZ_3M (3u << 20)

static const struct lib_msg lib_msgs[] = {
    { 1, 16, 0, 0, { 0 } },
    { 2, 16, 0, 0, { 1 } },
    { 3, 16, 0, 0, { 16384 } },
    { 4, 17, P_F_MMAP, 1, { 1 } },
    { 5, 17, P_F_MMAP, 1, { 16384 } },
    { 6, 17, P_F_MMAP, 1, { 16385 } },
    { 7, 17, P_F_MMAP, 1, { SZ_3M } },
    { 8, 18, P_F_MMAP | P_F_LAST, 3, { 100, 20000, 40000 } },   /* with a user fd */
};
#define N_LIB_MSGS (sizeof(lib_msgs) / sizeof(lib_msgs[0]))

static uint64_t lib_msg_size(const struct lib_msg *l)
{
    return l->nbufs == 0 ? l->sizes[0] : (uint64_t)l->sizes[0] + l->sizes[1] + l->sizes[2];
}

static void peer_lib_to_peer(struct peer *p)
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
    PCK(p->pr->in[0].hdr->free_map_padding == 0 && p->pr->in[0].hdr->free_tracking_map_padding == 0);
}

static void fill_buf(struct lshm_buf *b, uint32_t stream, uint64_t off, size_t len)
{
    uint8_t *d = lshm_buf_data(b);
    size_t i;

    for (i = 0; i < len; i++)
        d[i] = pat(stream, off + i);
}

static void lib_send(struct ipair *ip, const struct lib_msg *l, int fd)
{
    static uint8_t inl[P_INLINE_MAX];
    struct lshm_out out = { .type = l->type, .last = !!(l->flags & P_F_LAST),
                            .stream = l->stream, .fd = fd };
    struct lshm_buf *bufs[3];
    uint64_t off = 0;
    unsigned i;
    int ret;

    if (l->nbufs == 0) {
        for (i = 0; i < l->sizes[0]; i++)
            inl[i] = pat(l->stream, i);
        out.data = l->sizes[0] > 0 ? inl : NULL;
        out.size = l->sizes[0];
    } else {
        for (i = 0; i < l->nbufs; i++) {
            ret = lshm_buf_alloc(ip->port, l->sizes[i], &bufs[i]);
            cr_assert_eq(ret, 0, "lshm_buf_alloc(%u): %d %s", l->sizes[i], ret,
                         lshm_last_error());
            cr_assert_geq(lshm_buf_capacity(bufs[i]), l->sizes[i],
                          "a fresh segment gave %zu bytes for %u",
                          lshm_buf_capacity(bufs[i]), l->sizes[i]);
            fill_buf(bufs[i], l->stream, off, l->sizes[i]);
            cr_assert_eq(lshm_buf_set_size(bufs[i], l->sizes[i]), 0);
            off += l->sizes[i];
        }
        out.bufs = bufs;
        out.nbufs = l->nbufs;
    }
    ret = lshm_send(ip->port, &out, 0);
    cr_assert_eq(ret, 0, "lshm_send stream %u: %d %s", l->stream, ret, lshm_last_error());
}

static bool wait_readable(int fd, int timeout_ms)
{
    struct pollfd pfd = { .fd = fd, .events = POLLIN };

    return poll(&pfd, 1, timeout_ms) == 1;
}

LTEST(interop, lib_to_peer)
{
    static struct lshm_buf *all[LSHM_CHUNK_COUNT + 1];
    struct lshm_buf *big;
    struct ipair ip;
    struct report r;
    uint64_t fnv = FNV_INIT, bytes = 0;
    long long end;
    char got[8];
    int maps0, maps1, pfd[2], ret;
    unsigned i, n;

    /* One segment at most: its chunks must come back, or allocation fails. */
    ip_start(&ip, 1, peer_lib_to_peer);
    ip_ready(&ip);
    maps0 = count_maps("memfd:");
    cr_assert_eq(pipe2(pfd, O_CLOEXEC), 0);
    for (i = 0; i < N_LIB_MSGS; i++) {
        lib_send(&ip, &lib_msgs[i], lib_msgs[i].stream == 8 ? pfd[1] : -1);
        fnv = fnv_pat(fnv, lib_msgs[i].stream, lib_msg_size(&lib_msgs[i]));
        bytes += lib_msg_size(&lib_msgs[i]);
    }
    maps1 = count_maps("memfd:");
    cr_expect_eq(maps1, maps0 + 1, "one segment: memfd mappings %d -> %d", maps0, maps1);

    ip_recv_report(&ip, 1, &r);
    cr_assert_eq(r.a, N_LIB_MSGS);
    cr_assert_eq(r.b, 5, "shared-memory messages seen: %u", r.b);
    cr_assert_eq(r.bytes, bytes);
    cr_assert_eq(r.fnv, fnv, "payload checksum differs");
    cr_expect_eq(r.c, 0, "oosm was set although chunks never ran out");

    /* The user fd arrived: the peer wrote into it; every copy is closed. */
    cr_assert(wait_readable(pfd[0], TIMEOUT_MS));
    cr_assert_eq(read(pfd[0], got, sizeof(got)), 5);
    cr_assert_arr_eq(got, "fd-ok", 5);
    /* The library closes its copy once the send completed, which it learns
     * only while its context runs. */
    end = now_ms() + TIMEOUT_MS;
    while (!wait_readable(pfd[0], 0) && now_ms() < end)
        lshm_ctx_run(ip.ctx, 10);
    cr_expect(wait_readable(pfd[0], 0) && read(pfd[0], got, sizeof(got)) == 0,
              "the write end of the pipe is still open somewhere");
    close(pfd[0]);

    /* Every chunk came back: 640 single chunks, not one more, no new segment. */
    for (n = 0; n <= LSHM_CHUNK_COUNT; n++) {
        ret = lshm_buf_alloc(ip.port, 1, &all[n]);
        if (ret < 0)
            break;
        cr_assert_eq(lshm_buf_capacity(all[n]), LSHM_CHUNK_SIZE);
    }
    cr_assert_eq(n, LSHM_CHUNK_COUNT, "allocated %u chunks, then %d", n, ret);
    cr_assert_eq(ret, -EAGAIN);
    cr_assert_eq(count_maps("memfd:"), maps1);
    for (i = 0; i < n; i++)
        lshm_buf_free(all[i]);

    /* ... and as one run: the whole data area of segment 0. */
    ret = lshm_buf_alloc(ip.port, LSHM_DATA_SIZE, &big);
    cr_assert_eq(ret, 0, "whole segment: %d %s", ret, lshm_last_error());
    cr_assert_eq(lshm_buf_capacity(big), LSHM_DATA_SIZE);
    fill_buf(big, 9, 0, LSHM_DATA_SIZE);
    {
        struct lshm_out out = { .type = 19, .stream = 9, .bufs = &big, .nbufs = 1, .fd = -1 };

        ret = lshm_send(ip.port, &out, 0);
        cr_assert_eq(ret, 0, "lshm_send: %d %s", ret, lshm_last_error());
    }
    /* Out of chunks at the segment limit: the library sets oosm, and the
     * peer's SHM_ACK (or the timer) wakes LSHM_WAIT_SHM once it frees. */
    ret = lshm_buf_alloc(ip.port, 1, &all[0]);
    cr_assert_eq(ret, -EAGAIN, "segment full, limit 1: %d", ret);
    ip_signal(&ip, "release");
    end = now_ms() + TIMEOUT_MS;
    while ((ret = lshm_buf_alloc(ip.port, LSHM_DATA_SIZE, &big)) == -EAGAIN) {
        cr_assert(now_ms() < end, "the chunks of the whole-segment message never came back");
        ret = lshm_port_wait(ip.port, LSHM_WAIT_SHM, 1000);
        cr_assert(ret > 0 || ret == -ETIMEDOUT, "lshm_port_wait(SHM): %d", ret);
    }
    cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    cr_assert_eq(lshm_buf_capacity(big), LSHM_DATA_SIZE);
    lshm_buf_free(big);
    cr_assert_eq(count_maps("memfd:"), maps1);

    ip_recv_report(&ip, 2, &r);
    cr_assert_eq(r.fnv, fnv_pat(FNV_INIT, 9, LSHM_DATA_SIZE), "10 MiB checksum differs");
    cr_expect_eq(r.a, 1, "oosm after an allocation failed at the segment limit: %u", r.a);
    cr_expect_eq(r.b, 1, "the peer's CAS of oosm 1 -> 0 (and SHM_ACK): %u", r.b);
    ip_finish(&ip);
}

/* ================= 3. peer -> library ================= */

#define P2L_GUARDS 4
static const uint32_t p2l_guards[P2L_GUARDS] = { 0, 2, 4, 12 };

/* m1 at chunk 1; m2 at 3; m3 at 5..11; m4 at 639 then 20. */
static const struct w_desc p2l_d1[] = { { 0, 1, 1 } };
static const struct w_desc p2l_d2[] = { { 0, 3, 16384 } };
static const struct w_desc p2l_d3[] = { { 0, 5, 102400 } };
static const struct w_desc p2l_d4[] = { { 0, 639, 16384 }, { 0, 20, 5 } };

static void peer_to_lib_main(struct peer *p)
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

LTEST(interop, peer_to_lib)
{
    static const struct {
        uint32_t stream;
        uint8_t  type, flags;
        size_t   size;
        unsigned niov;
    } want[4] = {
        { 11, 16, LSHM_MSG_SHM, 1, 1 },
        { 12, 17, LSHM_MSG_SHM, 16384, 1 },
        { 13, 18, LSHM_MSG_SHM, 102400, 1 },
        { 14, 19, LSHM_MSG_SHM | LSHM_MSG_LAST, 16389, 2 },
    };
    struct lshm_msg msg[4];
    struct ipair ip;
    int maps0, i;

    maps0 = count_maps("memfd:");
    ip_start(&ip, 0, peer_to_lib_main);
    ip_ready(&ip);
    for (i = 0; i < 4; i++) {
        ip_recv(&ip, &msg[i]);
        cr_assert_eq(msg[i].stream, want[i].stream, "message %d: stream %u", i, msg[i].stream);
        cr_assert_eq(msg[i].type, want[i].type);
        cr_assert_eq(msg[i].flags, want[i].flags, "stream %u: flags %#x", msg[i].stream,
                     msg[i].flags);
        cr_assert_eq(msg[i].size, want[i].size);
        cr_assert_eq(msg[i].niov, want[i].niov);
        check_bytes(&msg[i], want[i].stream);
        if (i == 2) {
            cr_assert_geq(msg[i].fd, 0);
            cr_assert(fcntl(msg[i].fd, F_GETFD) & FD_CLOEXEC);
        } else {
            cr_assert_eq(msg[i].fd, -1);
        }
    }
    cr_assert_eq(msg[3].iov[0].len, 16384);
    cr_assert_eq(msg[3].iov[1].len, 5);
    cr_expect_eq(count_maps("memfd:"), maps0 + 1, "the peer's segment is mapped once");
    cr_assert_eq(write(msg[2].fd, "x", 1), 1);
    close(msg[2].fd);
    for (i = 0; i < 4; i++)
        lshm_msg_done(&msg[i]);
    ip_signal(&ip, "done");
    ip_expect_closed(&ip);
    ip_finish(&ip);
}

/* ================= 4. tracking from the independent peer ================= */

static void peer_tracking_main(struct peer *p)
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

LTEST(interop, tracking_from_peer)
{
    struct lshm_msg a, b, c;
    struct ipair ip;

    ip_start(&ip, 0, peer_tracking_main);
    ip_ready(&ip);
    ip_recv(&ip, &a);
    cr_assert_eq(a.stream, 100);
    cr_assert_eq(a.type, 16);
    cr_assert_eq(a.flags, LSHM_MSG_SHM | LSHM_MSG_CANCELLED, "cancelled: flags %#x", a.flags);
    cr_assert_eq(a.size, 500);
    check_bytes(&a, 100);
    ip_recv(&ip, &b);
    cr_assert_eq(b.stream, 200);
    cr_assert_eq(b.type, 17);
    cr_assert_eq(b.flags, 0, "not cancelled, inline: flags %#x", b.flags);
    cr_assert_eq(b.size, 3);
    cr_assert_arr_eq(b.iov[0].base, "bbb", 3);
    ip_recv(&ip, &c);
    cr_assert_eq(c.stream, 300);
    cr_assert_eq(c.flags, LSHM_MSG_SHM | LSHM_MSG_LAST, "not cancelled: flags %#x", c.flags);
    check_bytes(&c, 300);
    lshm_msg_done(&a);
    lshm_msg_done(&b);
    lshm_msg_done(&c);
    ip_signal(&ip, "got");
    ip_expect_closed(&ip);
    ip_finish(&ip);
}

/* ================= 5. BYE from the independent peer ================= */

static void peer_bye_main(struct peer *p)
{
    static const struct w_desc d[] = { { 0, 0, 1000 } };
    static uint8_t one[3], three[5];
    struct seg_hdr *h;
    unsigned i;

    peer_handshake(p);
    h = peer_make_segment(p, (const uint32_t[]){ 0 }, 1);
    peer_fill(p, d, 1, 2);
    for (i = 0; i < sizeof(one); i++)
        one[i] = pat(1, i);
    for (i = 0; i < sizeof(three); i++)
        three[i] = pat(3, i);
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

LTEST(interop, bye_from_peer)
{
    struct lshm_out out = { .type = 16, .data = "x", .size = 1, .fd = -1 };
    struct lshm_msg m1, m2, m3, m4;
    struct ipair ip;
    long long end;
    int ret;

    ip_start(&ip, 0, peer_bye_main);
    /* No waiting for READY: once BYE is in, every wait on the port returns
     * -EPIPE (lshm_port_wait(3)).  Let the library read everything, BYE
     * included, before we pull. */
    end = now_ms() + TIMEOUT_MS;
    while (lshm_port_error(ip.port) == NULL && now_ms() < end)
        lshm_ctx_run(ip.ctx, 10);
    cr_assert_not_null(lshm_port_error(ip.port), "BYE did not close the port");
    cr_log_info("interop: closed by BYE: %s", lshm_port_error(ip.port));

    ip_recv(&ip, &m1);
    cr_assert_eq(m1.stream, 1);
    cr_assert_eq(m1.flags, 0);
    check_bytes(&m1, 1);
    ip_recv(&ip, &m2);
    cr_assert_eq(m2.stream, 2);
    cr_assert_eq(m2.flags, LSHM_MSG_SHM);
    cr_assert_eq(m2.size, 1000);
    check_bytes(&m2, 2);
    ip_recv(&ip, &m3);
    cr_assert_eq(m3.stream, 3);
    cr_assert_eq(m3.flags, LSHM_MSG_LAST);
    check_bytes(&m3, 3);
    lshm_msg_done(&m1);
    lshm_msg_done(&m3);

    ret = lshm_recv(ip.port, &m4, TIMEOUT_MS);
    cr_assert_eq(ret, -EPIPE, "after the queue drained: %d", ret);
    ret = lshm_recv(ip.port, &m4, 0);
    cr_assert_eq(ret, -EPIPE, "again: %d", ret);
    ret = lshm_send(ip.port, &out, 0);
    cr_assert_eq(ret, -EPIPE, "send on a port closed by BYE: %d", ret);
    cr_assert_not_null(lshm_port_error(ip.port));
    {
        pid_t pid = 0;

        ret = lshm_port_peer(ip.port, &pid, NULL, NULL);
        cr_expect(ret == 0 && pid == ip.pid, "lshm_port_peer after BYE: %d, pid %d", ret,
                  (int)pid);
    }
    /* The peer's segment still holds m2, which stays valid. */
    check_bytes(&m2, 2);
    lshm_msg_done(&m2);
    ip_finish(&ip);
}

/* ================= 6. tracking from the library ================= */

static void peer_lib_tracking_main(struct peer *p)
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

LTEST(interop, tracking_from_lib)
{
    struct lshm_out o1 = { .type = 16, .stream = 77, .data = NULL, .size = 0, .fd = -1 };
    struct lshm_out o2 = { .type = 16, .stream = 78, .last = 1, .fd = -1 };
    struct lshm_tracking *t1, *t2;
    struct lshm_buf *buf;
    struct ipair ip;
    struct report r;
    bool lib_won;
    int ret;

    ip_start(&ip, 0, peer_lib_tracking_main);
    ip_ready(&ip);
    ret = lshm_tracking_new(ip.port, 77, &t1);
    cr_assert_eq(ret, 0, "lshm_tracking_new: %d %s", ret, lshm_last_error());
    o1.tracking = t1;
    cr_assert_eq(lshm_send(ip.port, &o1, 0), 0);
    /* A race with the peer's swap: exactly one side must win. */
    lib_won = lshm_tracking_cancel(t1);
    ip_recv_report(&ip, 10, &r);
    cr_assert_neq(lib_won, (bool)r.a, "library cancel %d, peer swap %u: not exactly one won",
                  lib_won, r.a);
    cr_log_info("interop: tracking race won by the %s", lib_won ? "library" : "peer");

    ret = lshm_tracking_new(ip.port, 78, &t2);
    cr_assert_eq(ret, 0);
    cr_assert_eq(lshm_buf_alloc(ip.port, 5000, &buf), 0);
    fill_buf(buf, 78, 0, 5000);
    cr_assert_eq(lshm_buf_set_size(buf, 5000), 0);
    o2.bufs = &buf;
    o2.nbufs = 1;
    o2.tracking = t2;
    cr_assert_eq(lshm_send(ip.port, &o2, 0), 0);
    ip_recv_report(&ip, 11, &r);
    cr_assert_eq(r.a, 1, "the peer read it first, so its swap must win");
    cr_assert_not(lshm_tracking_cancel(t2), "cancel after the peer read it must lose");
    ip_finish(&ip);
}

/* ================= 7. the peer's max_segments binds the library ================= */

static void peer_one_segment_main(struct peer *p)
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

LTEST(interop, peer_max_segments)
{
    struct lshm_out out = { .type = 16, .stream = 31, .fd = -1 };
    struct lshm_buf *big, *more;
    struct ipair ip;
    struct report r;
    long long end;
    int ret, maps;

    /* The library may make 32 segments, but the peer accepts one. */
    ip_start(&ip, 0, peer_one_segment_main);
    ip_ready(&ip);
    ret = lshm_buf_alloc(ip.port, LSHM_DATA_SIZE, &big);
    cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    cr_assert_eq(lshm_buf_capacity(big), LSHM_DATA_SIZE);
    maps = count_maps("memfd:");
    ret = lshm_buf_alloc(ip.port, 1, &more);
    if (ret == 0)
        lshm_buf_free(more);
    cr_assert_eq(ret, -EAGAIN, "a second segment for a peer whose HELLO said max_segments 1: %d",
                 ret);
    cr_assert_eq(count_maps("memfd:"), maps);

    /* Send 100 bytes of it: the other 639 chunks come back at the send. */
    fill_buf(big, 31, 0, 100);
    cr_assert_eq(lshm_buf_set_size(big, 100), 0);
    out.bufs = &big;
    out.nbufs = 1;
    ret = lshm_send(ip.port, &out, 0);
    cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    ip_recv_report(&ip, 20, &r);
    cr_assert_eq(r.bytes, 100);
    cr_assert_eq(r.fnv, fnv_pat(FNV_INIT, 31, 100));
    end = now_ms() + TIMEOUT_MS;
    while ((ret = lshm_buf_alloc(ip.port, LSHM_DATA_SIZE, &big)) == -EAGAIN) {
        cr_assert(now_ms() < end, "the segment never became whole again");
        lshm_port_wait(ip.port, LSHM_WAIT_SHM, 100);
    }
    cr_assert_eq(ret, 0, "%d %s", ret, lshm_last_error());
    cr_assert_eq(lshm_buf_capacity(big), LSHM_DATA_SIZE);
    lshm_buf_free(big);
    ip_finish(&ip);
}

/* ================= 8. segment ids belong to the pair ================= */

static void peer_pair_main(struct peer *p)
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

LTEST(interop, segment_ids_per_pair)
{
    struct lshm_port *pa, *pb, *pc;
    struct lshm_msg m1, m2, m3;
    struct lshm_ctx *ctx;
    int socks[3], ret, st;
    pid_t pid;

    ret = lshm_ctx_new(&ctx, NULL);
    cr_assert_eq(ret, 0, "lshm_ctx_new: %d %s", ret, lshm_last_error());
    cr_assert_eq(lshm_socketpair(ctx, &pa, &socks[0]), 0);
    cr_assert_eq(lshm_socketpair(ctx, &pb, &socks[1]), 0);
    cr_assert_eq(lshm_socketpair(ctx, &pc, &socks[2]), 0);
    fflush(NULL);
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0)
        peer_run(socks, 3, peer_pair_main);
    close(socks[0]);
    close(socks[1]);
    close(socks[2]);

    ret = lshm_recv(pa, &m1, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "A: %d %s", ret, lshm_port_error(pa));
    cr_assert_eq(m1.stream, 1);
    cr_assert_eq(m1.size, 100);
    check_bytes(&m1, 1);
    ret = lshm_recv(pb, &m2, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "B: %d %s", ret, lshm_port_error(pb));
    cr_assert_eq(m2.stream, 2);
    cr_assert_eq(m2.flags, LSHM_MSG_SHM | LSHM_MSG_LAST);
    cr_assert_eq(m2.niov, 2);
    cr_assert_eq(m2.size, 500);
    check_bytes(&m2, 2);
    lshm_msg_done(&m1);
    lshm_msg_done(&m2);
    {
        struct lshm_out out = { .type = T_SIGNAL, .data = "got", .size = 3, .fd = -1 };

        cr_assert_eq(lshm_send(pa, &out, 0), 0);
    }
    ret = lshm_recv(pa, &m1, TIMEOUT_MS);
    cr_assert_eq(ret, -EPIPE, "A after BYE: %d", ret);
    ret = lshm_recv(pb, &m1, TIMEOUT_MS);
    cr_assert_eq(ret, -EPIPE, "B after BYE: %d", ret);
    lshm_port_close(pa);
    lshm_port_close(pb);

    /* A new connection of the same two processes: ids from 0 again. */
    ret = lshm_recv(pc, &m3, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "C: %d %s", ret, lshm_port_error(pc) ? lshm_port_error(pc) : "");
    cr_assert_eq(m3.stream, 3);
    cr_assert_eq(m3.size, 50);
    check_bytes(&m3, 3);
    lshm_msg_done(&m3);
    {
        struct lshm_out out = { .type = T_SIGNAL, .data = "got", .size = 3, .fd = -1 };

        cr_assert_eq(lshm_send(pc, &out, 0), 0);
    }
    ret = lshm_recv(pc, &m3, TIMEOUT_MS);
    cr_assert_eq(ret, -EPIPE, "C after BYE: %d", ret);
    lshm_port_close(pc);
    lshm_ctx_free(ctx);
    st = wait_child(pid, TIMEOUT_MS);
    cr_assert(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0,
              "the independent peer failed (status %#x), see its line on stderr", st);
}

/* ========= 9. a new pair while the library still holds an unread port ========= */

/*
 * Two ports of the library, A and C, in a context that holds one message
 * per port: once A's first message is queued and unread, the library reads
 * no more of A.  The peer then ends A (more messages, BYE, close) and,
 * having no port left, starts a new pair on C from id 0, as the page says:
 * the library has not seen A end yet, but A is hung up at the other end.
 */
static void peer_restart_main(struct peer *p)
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
        two[i] = pat(2, i);
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

/* Two ports in a context holding one message per port; fork the peer. */
static pid_t restart_start(struct lshm_ctx **ctx, struct lshm_port **pa,
                           struct lshm_port **pc, peer_fn fn)
{
    struct lshm_ctx_params prm;
    int socks[2], ret;
    pid_t pid;

    memset(&prm, 0, sizeof(prm));
    prm.recv_queue = 1;
    ret = lshm_ctx_new(ctx, &prm);
    cr_assert_eq(ret, 0, "lshm_ctx_new: %d %s", ret, lshm_last_error());
    cr_assert_eq(lshm_socketpair(*ctx, pa, &socks[0]), 0);
    cr_assert_eq(lshm_socketpair(*ctx, pc, &socks[1]), 0);
    fflush(NULL);
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0)
        peer_run(socks, 2, fn);
    close(socks[0]);
    close(socks[1]);
    return pid;
}

/* A's first message is queued, unread: reading A stops; say so to the peer. */
static void restart_hold_first(struct lshm_ctx *ctx, struct lshm_port *pa)
{
    struct lshm_out held = { .type = T_SIGNAL, .data = "held", .size = 4, .fd = -1 };
    int ret = lshm_port_wait(pa, LSHM_WAIT_RECV, TIMEOUT_MS);

    cr_assert(ret > 0 && (ret & LSHM_WAIT_RECV), "A's first message: %d %s", ret,
              lshm_port_error(pa) ? lshm_port_error(pa) : lshm_last_error());
    /* Let the stop reach the kernel before the peer writes more to A. */
    lshm_ctx_run(ctx, 0);
    ret = lshm_send(pa, &held, 0);
    cr_assert_eq(ret, 0, "lshm_send: %d %s", ret, lshm_last_error());
}

static void restart_finish(struct lshm_ctx *ctx, pid_t pid)
{
    int st;

    lshm_ctx_free(ctx);
    st = wait_child(pid, TIMEOUT_MS);
    cr_assert(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0,
              "the independent peer failed (status %#x), see its line on stderr", st);
}

LTEST(interop, pair_restarts_after_peer_closed_unread_port)
{
    struct lshm_out done = { .type = T_SIGNAL, .data = "done", .size = 4, .fd = -1 };
    struct lshm_port *pa, *pc;
    struct lshm_msg m1, m2, m3, m4, x;
    struct lshm_ctx *ctx;
    int maps0, ret;
    pid_t pid;

    /* Stopped at recv_queue 1 with its first message held, A is read to
     * its end only by a multishot receive, which runs past the bound;
     * single-shot receives (the epoll carrier's) wait for that message. */
    require_io_uring(0);
    maps0 = count_maps("memfd:");
    pid = restart_start(&ctx, &pa, &pc, peer_restart_main);
    restart_hold_first(ctx, pa);

    /* C: HELLO and MMAP id 0 of a new segment, while A's end of file and
     * BYE wait unread in A's socket. */
    ret = lshm_recv(pc, &m4, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "C: %d (%s)", ret,
                 lshm_port_error(pc) ? lshm_port_error(pc) : lshm_last_error());
    cr_assert_null(lshm_port_error(pc));
    /* The race of the review: A has not been read past its first message. */
    cr_assert_null(lshm_port_error(pa), "A was read to its end before C's HELLO (%s): "
                   "the race was not reproduced", lshm_port_error(pa));
    cr_assert_eq(m4.stream, 4);
    cr_assert_eq(m4.type, 17);
    cr_assert_eq(m4.flags, LSHM_MSG_SHM | LSHM_MSG_LAST, "flags %#x", m4.flags);
    cr_assert_eq(m4.size, 5000);
    cr_assert_eq(m4.niov, 1);
    check_bytes(&m4, 4);
    cr_expect_eq(count_maps("memfd:"), maps0 + 2, "both segments 0 mapped: %d -> %d", maps0,
                 count_maps("memfd:"));

    /* A still delivers what it holds, from the old segment 0 ... */
    ret = lshm_recv(pa, &m1, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "A: %d (%s)", ret,
                 lshm_port_error(pa) ? lshm_port_error(pa) : lshm_last_error());
    cr_assert_eq(m1.stream, 1);
    cr_assert_eq(m1.flags, LSHM_MSG_SHM);
    cr_assert_eq(m1.size, 3000);
    cr_assert_eq(m1.niov, 1);
    check_bytes(&m1, 1);
    check_bytes(&m4, 4);
    cr_assert_neq(m1.iov[0].base, m4.iov[0].base);
    lshm_msg_done(&m1);
    /* ... then, reading again, the rest, and the BYE. */
    ret = lshm_recv(pa, &m2, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "A: %d (%s)", ret,
                 lshm_port_error(pa) ? lshm_port_error(pa) : lshm_last_error());
    cr_assert_eq(m2.stream, 2);
    cr_assert_eq(m2.flags, 0);
    cr_assert_eq(m2.size, 7);
    check_bytes(&m2, 2);
    ret = lshm_recv(pa, &m3, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "A: %d (%s)", ret,
                 lshm_port_error(pa) ? lshm_port_error(pa) : lshm_last_error());
    cr_assert_eq(m3.stream, 3);
    cr_assert_eq(m3.flags, LSHM_MSG_SHM | LSHM_MSG_LAST);
    cr_assert_eq(m3.size, 20000);
    check_bytes(&m3, 3);
    ret = lshm_recv(pa, &x, TIMEOUT_MS);
    cr_assert_eq(ret, -EPIPE, "A after its queue: %d", ret);
    cr_assert_not_null(lshm_port_error(pa));
    cr_log_info("interop: A closed: %s", lshm_port_error(pa));
    cr_assert_null(lshm_port_error(pc), "C closed: %s", lshm_port_error(pc));
    check_bytes(&m3, 3);
    check_bytes(&m4, 4);
    lshm_msg_done(&m2);
    lshm_msg_done(&m3);
    lshm_port_close(pa);
    lshm_msg_done(&m4);

    ret = lshm_send(pc, &done, 0);
    cr_assert_eq(ret, 0, "lshm_send on C: %d %s", ret, lshm_last_error());
    ret = lshm_recv(pc, &x, TIMEOUT_MS);
    cr_assert_eq(ret, -EPIPE, "C after BYE: %d (%s)", ret,
                 lshm_port_error(pc) ? lshm_port_error(pc) : "");
    lshm_port_close(pc);
    restart_finish(ctx, pid);
}

/*
 * The same, but A stays open at the peer's side: the pair goes on, and an
 * MMAP id 0 on a second port is a violation that closes that port only.
 */
static void peer_second_port_main(struct peer *p)
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

LTEST(interop, second_port_mmap_id_0_while_first_open_is_violation)
{
    struct lshm_out out = { .type = 18, .stream = 5, .fd = -1 };
    struct lshm_port *pa, *pc;
    struct lshm_msg m1, m2, rep, x;
    struct lshm_ctx *ctx;
    struct lshm_buf *buf;
    struct report r;
    const char *why;
    int ret;
    pid_t pid;

    pid = restart_start(&ctx, &pa, &pc, peer_second_port_main);
    restart_hold_first(ctx, pa);

    ret = lshm_recv(pc, &x, TIMEOUT_MS);
    cr_assert_eq(ret, -EPROTO, "C's MMAP id 0 while A is open: %d", ret);
    why = lshm_port_error(pc);
    cr_assert_not_null(why);
    cr_log_info("interop: C closed: %s", why);
    cr_assert(strstr(why, "protocol violation") && strstr(why, "MMAP id 0, expected 1"),
              "C closed for another reason: %s", why);
    cr_assert_null(lshm_port_error(pa), "A closed too: %s", lshm_port_error(pa));
    lshm_port_close(pc);

    ret = lshm_recv(pa, &m1, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "A: %d (%s)", ret,
                 lshm_port_error(pa) ? lshm_port_error(pa) : lshm_last_error());
    cr_assert_eq(m1.stream, 1);
    cr_assert_eq(m1.size, 3000);
    check_bytes(&m1, 1);
    lshm_msg_done(&m1);
    ret = lshm_recv(pa, &m2, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "A: %d (%s)", ret,
                 lshm_port_error(pa) ? lshm_port_error(pa) : lshm_last_error());
    cr_assert_eq(m2.stream, 2);
    cr_assert_eq(m2.flags, LSHM_MSG_SHM);
    cr_assert_eq(m2.size, 100);
    check_bytes(&m2, 2);
    lshm_msg_done(&m2);

    ret = lshm_buf_alloc(pa, 1000, &buf);
    cr_assert_eq(ret, 0, "lshm_buf_alloc on A: %d %s", ret, lshm_last_error());
    fill_buf(buf, 5, 0, 1000);
    cr_assert_eq(lshm_buf_set_size(buf, 1000), 0);
    out.bufs = &buf;
    out.nbufs = 1;
    ret = lshm_send(pa, &out, 0);
    cr_assert_eq(ret, 0, "lshm_send on A: %d %s", ret, lshm_last_error());
    ret = lshm_recv(pa, &rep, TIMEOUT_MS);
    cr_assert_eq(ret, 0, "A: %d (%s)", ret,
                 lshm_port_error(pa) ? lshm_port_error(pa) : lshm_last_error());
    cr_assert_eq(rep.type, T_REPORT);
    cr_assert_eq(rep.size, sizeof(r));
    memcpy(&r, rep.iov[0].base, sizeof(r));
    lshm_msg_done(&rep);
    cr_assert_eq(r.tag, 30);
    cr_assert_eq(r.bytes, 1000);
    cr_assert_eq(r.fnv, fnv_pat(FNV_INIT, 5, 1000));
    ret = lshm_recv(pa, &x, TIMEOUT_MS);
    cr_assert_eq(ret, -EPIPE, "A after BYE: %d", ret);
    lshm_port_close(pa);
    restart_finish(ctx, pid);
}
