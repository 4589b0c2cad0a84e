/*
 * Sockets, below the port: what a port's socket must be, the control
 * messages that carry fds and credentials, and the addresses and binding
 * of listening sockets.  No io_uring here: these are the parts done with
 * plain system calls or on bytes already received.
 */
#ifndef LSHM_SOCK_H
#define LSHM_SOCK_H

#include <stdbool.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>

#include "internal.h"

/* Room for the one fd a datagram may carry. */
#define LSHM_SOCK_FD_SPACE  CMSG_SPACE(sizeof(int))

/* The fds and credentials taken out of one received control message. */
struct lshm_sock_cmsg {
    int          fds[8];        /* the first ones; the surplus is closed */
    unsigned     nfds;
    bool         has_cred;
    struct ucred cred;
};

/* Is fd an AF_UNIX SOCK_SEQPACKET socket?  Then turn on SO_PASSCRED. */
int  lshm__sock_check(int fd);
/* A connected SOCK_SEQPACKET pair, sv[0] close-on-exec. */
int  lshm__sock_pair(int sv[2]);
/* A new close-on-exec AF_UNIX SOCK_SEQPACKET socket: its fd, or -errno. */
int  lshm__sock_new(void);
/* Take the fds and credentials out of mh's control data, closing surplus fds. */
void lshm__sock_take_cmsg(const struct msghdr *mh, struct lshm_sock_cmsg *out);
void lshm__sock_close_fds(const int *fds, unsigned n);
/* Is this process at its fd limit (a dup of fd fails with EMFILE)? */
bool lshm__sock_out_of_fds(int fd);
/* Attach fd to mh as SCM_RIGHTS in buf (LSHM_SOCK_FD_SPACE bytes, aligned). */
void lshm__sock_put_fd(struct msghdr *mh, void *buf, int fd);

/* path as an AF_UNIX address: EINVAL if empty, ENAMETOOLONG if too long. */
int  lshm__sock_addr(const char *path, struct sockaddr_un *sun);
/* Which file a listener's path named when it was bound. */
struct lshm_sock_file {
    dev_t dev;
    ino_t ino;
};

/* A listening socket on path with mode, taking over a stale socket file of
 * this user; *own says which file it is. */
int  lshm__sock_listen(const struct sockaddr_un *sun, mode_t mode, int *fd,
                       struct lshm_sock_file *own);
/* Remove path if it is still the file own: never another server's. */
void lshm__sock_unlink_own(const char *path, const struct lshm_sock_file *own);

#endif
