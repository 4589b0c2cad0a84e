/*
 * liblinuxshm: messages between processes through sealed memfd segments,
 * with every socket operation submitted through io_uring.
 *
 * Every function returns 0 (or a non-negative count) on success and a
 * negative errno value on failure; none of them sets errno.  All structs but
 * the parameter and message structs are opaque.  See linuxshm(7).
 */
#ifndef LINUXSHM_H
#define LINUXSHM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LSHM_VERSION_MAJOR  2
#define LSHM_VERSION_MINOR  0
#define LSHM_VERSION_PATCH  0

/* Protocol constants (linuxshm-protocol(7)). */
#define LSHM_PROTOCOL_VERSION  2
#define LSHM_SEGMENT_VERSION   1      /* a segment header's version field */
#define LSHM_RING_MAGIC        0x5248534cu
#define LSHM_RING_VERSION      2
#define LSHM_RING_HEADER_SIZE  4096u
#define LSHM_RING_SIZE_MIN     65536u
#define LSHM_RING_SIZE_MAX     16777216u
#define LSHM_RING_SIZE_DEFAULT 262144u
#define LSHM_MAGIC             0x4d48534cu
#define LSHM_HEADER_SIZE       4096u
#define LSHM_CHUNK_SIZE        16384u
#define LSHM_CHUNK_COUNT       640u
#define LSHM_DATA_SIZE         (LSHM_CHUNK_SIZE * LSHM_CHUNK_COUNT)
#define LSHM_SEGMENT_SIZE      (LSHM_HEADER_SIZE + LSHM_DATA_SIZE)
#define LSHM_INLINE_MAX        16384u
#define LSHM_WIRE_MAX          (16384u + 64u)
#define LSHM_MAX_DESCS         64u
#define LSHM_TYPE_USER_MIN     16u

struct lshm_ctx;
struct lshm_port;
struct lshm_listener;
struct lshm_buf;
struct lshm_tracking;

/* lshm_ctx_params.flags */
#define LSHM_CTX_SCRUB            (1u << 0) /* fill freed chunks with 0xA5 */
#define LSHM_CTX_DROP_CANCELLED   (1u << 1) /* drop cancelled messages */
#define LSHM_CTX_NO_MULTISHOT     (1u << 2) /* single-shot receives only */
#define LSHM_CTX_NO_DEFER_TASKRUN (1u << 3) /* plain ring set-up flags */
#define LSHM_CTX_NO_RING          (1u << 4) /* every message over the socket */
#define LSHM_CTX_NO_FUTEX         (1u << 5) /* wake-ups as WAKE datagrams only */
#define LSHM_CTX_NO_IO_URING      (1u << 6) /* run on the epoll carrier */
#define LSHM_CTX_IO_URING_ONLY    (1u << 7) /* fail rather than fall back to epoll */

struct lshm_ctx_params {
    unsigned int flags;          /* LSHM_CTX_* */
    unsigned int ring_entries;   /* submission queue size; 0: 1024 */
    unsigned int max_segments;   /* segments per peer and direction; 0: 16 */
    unsigned int send_queue;     /* messages queued per port; 0: 1024 */
    unsigned int recv_queue;     /* messages held for the caller per port; 0: 256 */
    unsigned int handshake_ms;   /* an accepted client's HELLO must come within; 0: 10000 */
    unsigned int ring_size;      /* message ring bytes, a power of two; 0: 262144 */
    unsigned int spin_us;        /* waits poll the rings this long before sleeping; 0: none */
    unsigned int prealloc_segments; /* made per peer as a port opens; 0: on demand */
    unsigned int reserved[7];    /* must be zero */
};

/* Features of a context's ring, from lshm_ctx_features(). */
#define LSHM_FEAT_SINGLE_ISSUER  (1u << 0)
#define LSHM_FEAT_DEFER_TASKRUN  (1u << 1)
#define LSHM_FEAT_COOP_TASKRUN   (1u << 2)
#define LSHM_FEAT_MULTISHOT_RECV (1u << 3)
#define LSHM_FEAT_BUF_RING       (1u << 4)
#define LSHM_FEAT_MULTISHOT_ACCEPT (1u << 5)
#define LSHM_FEAT_NOEXEC_SEAL    (1u << 6)
#define LSHM_FEAT_RING           (1u << 7)  /* message rings (protocol version 2) */
#define LSHM_FEAT_FUTEX          (1u << 8)  /* futex waits and wakes through io_uring */
#define LSHM_FEAT_EPOLL          (1u << 9)  /* epoll carrier, not io_uring */

struct lshm_ctx_stats {
    uint64_t enters;        /* io_uring_enter(2) calls made */
    uint64_t submitted;     /* SQEs submitted */
    uint64_t completions;   /* CQEs handled */
    uint64_t msgs_sent;     /* messages sent: datagram send completed, or ring record written */
    uint64_t msgs_received; /* messages delivered to the caller */
    uint64_t reserved[11];
};

/* ---- Contexts: one io_uring and the ports on it, used by one thread ---- */

/* Create a context; params NULL takes every default. */
int         lshm_ctx_new(struct lshm_ctx **ctx, const struct lshm_ctx_params *params);
/* Close its listeners and ports (queued messages go out first), then free it. */
void        lshm_ctx_free(struct lshm_ctx *ctx);
/* An fd that polls readable when lshm_ctx_run() has work: for epoll loops. */
int         lshm_ctx_fd(const struct lshm_ctx *ctx);
/* Submit, wait up to timeout_ms (-1: no limit) and call the ready handlers. */
int         lshm_ctx_run(struct lshm_ctx *ctx, int timeout_ms);
/* The LSHM_FEAT_* bits the context's ring and kernel gave it. */
unsigned    lshm_ctx_features(const struct lshm_ctx *ctx);
/* "io_uring", or "epoll: " and why io_uring is not used. */
const char *lshm_ctx_carrier(const struct lshm_ctx *ctx);
/* Counters of system calls, submissions, completions and messages. */
int         lshm_ctx_stats(const struct lshm_ctx *ctx, struct lshm_ctx_stats *stats);

/* ---- Errors and version ---- */

/* What went through a port, from lshm_port_stats(). */
struct lshm_port_stats {
    uint64_t ring_msgs;         /* user messages sent through our ring */
    uint64_t ring_bytes;        /* their payload bytes */
    uint64_t sock_msgs;         /* user messages sent over the socket */
    uint64_t sock_bytes;        /* their payload bytes */
    uint64_t ring_msgs_in;      /* user messages received through the peer's ring */
    uint64_t ring_bytes_in;
    uint64_t sock_msgs_in;      /* user messages received over the socket */
    uint64_t sock_bytes_in;
    uint64_t wakes_sent;        /* futex wakes and WAKE datagrams sent to the peer */
    uint64_t wakes_received;    /* futex wake-ups and WAKE datagrams received */
    uint64_t ring_full;         /* messages that found our ring full and waited */
    uint64_t reserved[5];
};

/* Text of the last failure in the calling thread, or "" if none. */
const char *lshm_last_error(void);
/* The library's version, "MAJOR.MINOR.PATCH". */
const char *lshm_version(void);

/* ---- Ports: one connection to a peer process ---- */

/* A connected socket pair: a port on one end, the other end's fd for a child. */
int  lshm_socketpair(struct lshm_ctx *ctx, struct lshm_port **port, int *peer_sock);
/* A port on a connected AF_UNIX SOCK_SEQPACKET socket (taken on success). */
int  lshm_port_adopt(struct lshm_ctx *ctx, int sock, struct lshm_port **port);
/* Connect to a listener's path and complete the handshake within timeout_ms. */
int  lshm_connect(struct lshm_ctx *ctx, const char *path, int timeout_ms,
                  struct lshm_port **port);
/* Give the port back: what is queued still goes out, then the peer is told BYE. */
void lshm_port_close(struct lshm_port *port);

/* ---- Listeners: accepting ports on a socket path ---- */

/* Listen on path with mode (0: 0600), never replacing a live server's socket. */
int  lshm_listen(struct lshm_ctx *ctx, const char *path, int mode,
                 struct lshm_listener **listener);
/* Take the next port whose handshake is done, waiting up to timeout_ms. */
int  lshm_accept(struct lshm_listener *listener, struct lshm_port **port, int timeout_ms);
/* Stop listening, remove the path, close the ports nobody accepted. */
void lshm_listener_close(struct lshm_listener *listener);

/* ---- Waiting on a port, and what it knows ---- */

/* lshm_port_wait() events */
#define LSHM_WAIT_READY  (1u << 0) /* handshake complete */
#define LSHM_WAIT_SEND   (1u << 1) /* room in the send queue */
#define LSHM_WAIT_SHM    (1u << 2) /* chunks came back (SHM_ACK or timer) */
#define LSHM_WAIT_RECV   (1u << 3) /* a message is waiting */
#define LSHM_WAIT_IDLE   (1u << 4) /* every queued message was sent */

/* Run the context until one of events holds; returns the LSHM_WAIT_* that do. */
int  lshm_port_wait(struct lshm_port *port, unsigned events, int timeout_ms);
/* The peer's pid, uid and gid, from the kernel, once the handshake is done. */
int  lshm_port_peer(const struct lshm_port *port, pid_t *pid, uid_t *uid, gid_t *gid);
/* Why the port closed, or NULL while it is open. */
const char *lshm_port_error(const struct lshm_port *port);
/* This side's port id, the one its HELLO and message headers carry. */
int  lshm_port_id(const struct lshm_port *port);
/* Counters of what went through the port: ring or socket, wake-ups, a full ring. */
int  lshm_port_stats(const struct lshm_port *port, struct lshm_port_stats *stats);

/* ---- Shared-memory buffers: payloads written once, read in place ---- */

/* Chunks for size bytes in a segment shared with the port's peer. */
int    lshm_buf_alloc(struct lshm_port *port, size_t size, struct lshm_buf **buf);
/* Grow in place to size if the next chunks are free, failing below min_size. */
int    lshm_buf_grow(struct lshm_buf *buf, size_t size, size_t min_size);
/* Where to write the payload. */
void  *lshm_buf_data(struct lshm_buf *buf);
/* How many bytes the buffer holds. */
size_t lshm_buf_capacity(const struct lshm_buf *buf);
/* How many bytes to send, at most the capacity. */
int    lshm_buf_set_size(struct lshm_buf *buf, size_t size);
/* Give back the chunks of a buffer that was not sent. */
void   lshm_buf_free(struct lshm_buf *buf);

/* Buffers for a whole payload of size bytes, waiting up to timeout_ms for chunks. */
int    lshm_bufs_alloc(struct lshm_port *port, size_t size, int timeout_ms,
                       struct lshm_buf **bufs, unsigned *nbufs);
/* Where the payload's pieces are: iov[i] for bufs[i]; returns their total size. */
size_t lshm_bufs_iov(struct lshm_buf *const *bufs, unsigned nbufs, struct iovec *iov);
/* Copy len bytes from src into the payload at offset off, across its pieces. */
int    lshm_bufs_copy_in(struct lshm_buf *const *bufs, unsigned nbufs, size_t off,
                         const void *src, size_t len);
/* Give back the buffers of a payload that was not sent. */
void   lshm_bufs_free(struct lshm_buf **bufs, unsigned nbufs);

/* ---- Sending ---- */
#define LSHM_MORE  (1u << 0)   /* queue, submit with a later call */

struct lshm_out {
    uint8_t               type;      /* >= LSHM_TYPE_USER_MIN */
    uint8_t               last;      /* nonzero: set the LAST flag */
    uint32_t              stream;
    const void           *data;      /* inline payload, or NULL */
    size_t                size;      /* inline bytes, <= LSHM_INLINE_MAX */
    struct lshm_buf     **bufs;      /* shared-memory buffers, or NULL */
    unsigned int          nbufs;     /* 0 .. LSHM_MAX_DESCS */
    int                   fd;        /* -1, or an fd to pass (taken on success) */
    struct lshm_tracking *tracking;  /* or NULL */
};

/* Queue one message; without LSHM_MORE it is submitted at once, in order. */
int lshm_send(struct lshm_port *port, const struct lshm_out *msg, unsigned flags);
/* Submit what LSHM_MORE left queued on the context's ports. */
int lshm_flush(struct lshm_ctx *ctx);

/* ---- Receiving ---- */
#define LSHM_MSG_LAST      (1u << 0)
#define LSHM_MSG_SHM       (1u << 1)  /* payload is in shared memory */
#define LSHM_MSG_CANCELLED (1u << 2)  /* sender cancelled the stream first */

struct lshm_iov {
    const void *base;
    size_t      len;
};

struct lshm_msg {
    struct lshm_port      *port;
    uint32_t               stream;
    uint8_t                type;
    uint8_t                flags;     /* LSHM_MSG_* */
    size_t                 size;      /* payload bytes in all of iov */
    unsigned int           niov;
    const struct lshm_iov *iov;
    int                    fd;        /* -1, or a received fd the caller owns */
    void                  *priv;      /* the library's */
};

typedef void (*lshm_msg_fn)(struct lshm_port *port, struct lshm_msg *msg, void *arg);
typedef void (*lshm_close_fn)(struct lshm_port *port, int error, void *arg);
/* Events for lshm_port_set_event_handler(): LSHM_WAIT_SEND, LSHM_WAIT_SHM. */
typedef void (*lshm_event_fn)(struct lshm_port *port, unsigned events, void *arg);
typedef void (*lshm_accept_fn)(struct lshm_listener *listener, struct lshm_port *port,
                               void *arg);

/* Have lshm_ctx_run() call on_msg for each message and on_close once. */
int  lshm_port_set_handler(struct lshm_port *port, lshm_msg_fn on_msg,
                           lshm_close_fn on_close, void *arg);
/* Have lshm_ctx_run() call on_event once room or memory that gave -EAGAIN is back. */
int  lshm_port_set_event_handler(struct lshm_port *port, lshm_event_fn on_event, void *arg);
/* Have lshm_ctx_run() call on_accept for each port whose handshake is done. */
int  lshm_listener_set_handler(struct lshm_listener *listener, lshm_accept_fn on_accept,
                               void *arg);
/* Take the next message, waiting up to timeout_ms; the payload stays in place. */
int  lshm_recv(struct lshm_port *port, struct lshm_msg *msg, int timeout_ms);
/* Done with a message: its chunks go back to the sender. */
void lshm_msg_done(struct lshm_msg *msg);

/* ---- Tracking: cancellable streams ---- */

/* A slot the sender can cancel a stream's message through until it is read. */
int  lshm_tracking_new(struct lshm_port *port, uint32_t stream, struct lshm_tracking **t);
/* Cancel the stream and free t; true if it came before the receiver read it. */
bool lshm_tracking_cancel(struct lshm_tracking *t);

/* ---- What the kernel and the process offer ---- */
struct lshm_probe {
    char          kernel[65];        /* uname release */
    int           io_uring;          /* 0, or -errno why it is unavailable */
    char          io_uring_why[160]; /* text for io_uring != 0 */
    unsigned int  setup_flags;       /* IORING_SETUP_* bits accepted */
    unsigned int  features;          /* LSHM_FEAT_* the library will use */
    bool          op_sendmsg, op_recvmsg, op_accept;
    bool          memfd, sealing, noexec_seal;
    uint64_t      memlock_cur, memlock_max;  /* RLIMIT_MEMLOCK, UINT64_MAX: unlimited */
    uint64_t      nofile_cur, nofile_max;
    long          max_map_count;     /* -1 if unknown */
    char          caps[256];         /* cap_to_text() of the process */
    char          shmem_thp[16];     /* transparent_hugepage/shmem_enabled, "" if unknown */
    char          reserved[48];
};

/* Fill out: kernel, io_uring operations and flags, memfd sealing, limits, caps, THP. */
int lshm_probe(struct lshm_probe *out);

#ifdef __cplusplus
}
#endif

#endif /* LINUXSHM_H */
