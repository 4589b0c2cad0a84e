/*
 * Whole payloads in shared-memory buffers, above the port: the public
 * functions of api.c call these after checking their arguments.
 */
#ifndef LSHM_PAYLOAD_H
#define LSHM_PAYLOAD_H

#include <sys/uio.h>

#include "port.h"

/* Buffers for size bytes in *nbufs pieces, waiting up to timeout_ms for chunks. */
int    lshm__bufs_alloc(struct lshm_port *port, size_t size, int timeout_ms,
                        struct lshm_buf **bufs, unsigned *nbufs);
void   lshm__bufs_iov(struct lshm_buf *const *bufs, unsigned n, struct iovec *iov);
/* The bytes the pieces will carry, summed. */
size_t lshm__bufs_size(struct lshm_buf *const *bufs, unsigned n);
/* Copy len bytes from src to the payload's offset off on (bounds checked above). */
void   lshm__bufs_copy_in(struct lshm_buf *const *bufs, unsigned n, size_t off,
                          const void *src, size_t len);
void   lshm__bufs_free(struct lshm_buf **bufs, unsigned n);

#endif
