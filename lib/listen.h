/*
 * Listeners and connecting, above the port: the public functions of
 * api.c call these after checking their arguments.
 */
#ifndef LSHM_LISTEN_H
#define LSHM_LISTEN_H

#include "port.h"

int  lshm__listen(struct lshm_ctx *ctx, const char *path, mode_t mode,
                  struct lshm_listener **out);
void lshm__listener_set_handler(struct lshm_listener *l, lshm_accept_fn on_accept, void *arg);
int  lshm__accept(struct lshm_listener *l, struct lshm_port **port, int timeout_ms);
void lshm__listener_close(struct lshm_listener *l);
/* Is the listener usable: not closing, no handler (for lshm_accept)? */
int  lshm__listener_check(const struct lshm_listener *l, bool accepting);
int  lshm__connect(struct lshm_ctx *ctx, const char *path, int timeout_ms,
                   struct lshm_port **out);

/* The context's callback (struct lshm_ctx_ops.accept) and walks of its listeners. */
void lshm__listeners_dispatch(struct lshm_ctx *ctx);
void lshm__listeners_close(struct lshm_ctx *ctx);
void lshm__listeners_reap(struct lshm_ctx *ctx);
void lshm__listeners_forget(struct lshm_ctx *ctx);

#endif
