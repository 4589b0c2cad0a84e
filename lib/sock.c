/*
 * Sockets: the checks on a port's socket, the fds and credentials of
 * control messages (taken out in one place, surplus closed), addresses,
 * and binding a listening socket without ever replacing a live one.
 */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sock.h"

int lshm__sock_check(int fd)
{
    int one = 1, type = 0, domain = 0;
    socklen_t len = sizeof(type);

    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0)
        return lshm__fail(errno == ENOTSOCK ? -ENOTSOCK : -errno,
                         "fd %d is not a socket", fd);
    len = sizeof(domain);
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) < 0 || domain != AF_UNIX ||
        type != SOCK_SEQPACKET)
        return lshm__fail(-EPROTOTYPE, "fd %d is not an AF_UNIX SOCK_SEQPACKET socket", fd);
    if (setsockopt(fd, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)) < 0)
        return lshm__fail(-errno, "SO_PASSCRED: %s", strerror(errno));
    return 0;
}

int lshm__sock_pair(int sv[2])
{
    int ret;

    if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv) < 0)
        return lshm__fail(-errno, "socketpair: %s", strerror(errno));
    if (fcntl(sv[0], F_SETFD, FD_CLOEXEC) < 0) {
        ret = lshm__fail(-errno, "fcntl: %s", strerror(errno));
        close(sv[0]);
        close(sv[1]);
        return ret;
    }
    return 0;
}

int lshm__sock_new(void)
{
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);

    if (fd < 0)
        return lshm__fail(-errno, "socket: %s", lshm__limit_text(-errno));
    return fd;
}

void lshm__sock_take_cmsg(const struct msghdr *mh, struct lshm_sock_cmsg *out)
{
    struct cmsghdr *c;

    out->nfds = 0;
    out->has_cred = false;
    for (c = mh->msg_controllen ? CMSG_FIRSTHDR((struct msghdr *)mh) : NULL; c != NULL;
         c = CMSG_NXTHDR((struct msghdr *)mh, c)) {
        if (c->cmsg_level != SOL_SOCKET)
            continue;
        if (c->cmsg_type == SCM_RIGHTS) {
            size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            size_t i;

            for (i = 0; i < n; i++) {
                int fd;

                memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                if (out->nfds < ARRAY_SIZE(out->fds))
                    out->fds[out->nfds++] = fd;
                else
                    close(fd);
            }
        } else if (c->cmsg_type == SCM_CREDENTIALS &&
                   c->cmsg_len >= CMSG_LEN(sizeof(struct ucred))) {
            memcpy(&out->cred, CMSG_DATA(c), sizeof(out->cred));
            out->has_cred = true;
        }
    }
}

void lshm__sock_close_fds(const int *fds, unsigned n)
{
    unsigned i;

    for (i = 0; i < n; i++)
        close(fds[i]);
}

void lshm__sock_put_fd(struct msghdr *mh, void *buf, int fd)
{
    struct cmsghdr *c = buf;

    memset(buf, 0, LSHM_SOCK_FD_SPACE);
    mh->msg_control = buf;
    mh->msg_controllen = LSHM_SOCK_FD_SPACE;
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
}

int lshm__sock_addr(const char *path, struct sockaddr_un *sun)
{
    size_t len;

    if (path == NULL || path[0] == '\0')
        return lshm__fail(-EINVAL, "empty socket path");
    len = strlen(path);
    if (len >= sizeof(sun->sun_path))
        return lshm__fail(-ENAMETOOLONG, "socket path of %zu bytes, at most %zu", len,
                         sizeof(sun->sun_path) - 1);
    memset(sun, 0, sizeof(*sun));
    sun->sun_family = AF_UNIX;
    memcpy(sun->sun_path, path, len + 1);
    return 0;
}

/* Is someone accepting on this path: 1 yes, 0 no (a dead server's socket
 * refuses), or -errno when that cannot be told. */
static int socket_is_live(const struct sockaddr_un *sun)
{
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    int ret;

    if (fd < 0)
        return lshm__fail(-errno, "cannot tell whether a server listens on %s: socket: %s",
                          sun->sun_path, lshm__limit_text(-errno));
    /* Only ECONNREFUSED (or the file gone) means nobody is there: a live
     * server of another socket type answers EPROTOTYPE, one that does not
     * accept EAGAIN, and their sockets are not ours to take. */
    ret = connect(fd, (const struct sockaddr *)sun, sizeof(*sun)) == 0 ? 0 : errno;
    close(fd);
    switch (ret) {
    case ECONNREFUSED:
    case ENOENT:
        return 0;
    case 0:
    case EAGAIN:
    case EPROTOTYPE:
    case EINPROGRESS:
        return 1;
    default:
        return lshm__fail(-ret, "cannot tell whether a server listens on %s: connect: %s",
                          sun->sun_path, strerror(ret));
    }
}

static bool same_file(const struct stat *a, const struct stat *b)
{
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino;
}

/*
 * Bind and listen under a temporary name beside path, set the mode, then
 * link the socket to path: the path appears only once a server listens on
 * it, with its final mode, and an existing path (a server that won a race)
 * is never replaced.  umask(2) is left alone: it belongs to the process.
 */
static int bind_listening(int fd, const struct sockaddr_un *sun, mode_t mode,
                          struct lshm_sock_file *own)
{
    const char *path = sun->sun_path;
    struct sockaddr_un tmp = *sun;
    struct stat st;
    int n, ret;

    n = snprintf(tmp.sun_path, sizeof(tmp.sun_path), "%s.%d.tmp", path, (int)getpid());
    if (n < 0 || (size_t)n >= sizeof(tmp.sun_path))
        tmp = *sun;     /* no room for a longer name: bind in place */
    if (strcmp(tmp.sun_path, path) != 0 && lstat(tmp.sun_path, &st) == 0) {
        /* Left by an earlier process of this pid: only a socket is ours. */
        if (!S_ISSOCK(st.st_mode) || st.st_uid != geteuid())
            return lshm__fail(-EEXIST, "%s exists and is not a socket of this user: "
                              "not replaced", tmp.sun_path);
        unlink(tmp.sun_path);
    }
    if (bind(fd, (const struct sockaddr *)&tmp, sizeof(tmp)) < 0)
        return lshm__fail(-errno, "bind %s: %s", tmp.sun_path, strerror(errno));
    if (chmod(tmp.sun_path, mode) < 0 || listen(fd, 128) < 0 || lstat(tmp.sun_path, &st) < 0) {
        ret = lshm__fail(-errno, "listen %s: %s", path, strerror(errno));
        unlink(tmp.sun_path);
        return ret;
    }
    own->dev = st.st_dev;
    own->ino = st.st_ino;
    if (strcmp(tmp.sun_path, path) == 0)
        return 0;
    ret = link(tmp.sun_path, path) < 0 ? -errno : 0;
    if (ret == -EPERM || ret == -EOPNOTSUPP)
        ret = rename(tmp.sun_path, path) < 0 ? -errno : 0;   /* no hard links here */
    unlink(tmp.sun_path);
    if (ret == -EEXIST)
        return lshm__fail(-EADDRINUSE, "another server took %s meanwhile", path);
    if (ret < 0)
        return lshm__fail(ret, "link %s: %s", path, strerror(-ret));
    return 0;
}

/* A socket file at path: take it over only if it is this user's and its
 * server is gone; refuse anything else, saying why. */
static int remove_stale(const struct sockaddr_un *sun, const struct stat *st)
{
    const char *path = sun->sun_path;
    struct stat now;
    int live;

    if (!S_ISSOCK(st->st_mode))
        return lshm__fail(-EEXIST, "%s exists and is not a socket: not replaced", path);
    live = socket_is_live(sun);
    if (live < 0)
        return live;
    if (live)
        return lshm__fail(-EADDRINUSE, "a server is already listening on %s", path);
    if (st->st_uid != geteuid())
        return lshm__fail(-EADDRINUSE, "%s is a stale socket of uid %u, not of this user "
                          "(uid %u): not removed", path, (unsigned)st->st_uid,
                          (unsigned)geteuid());
    /* Still the file that was found dead, not one a new server put there? */
    if (lstat(path, &now) < 0)
        return errno == ENOENT ? 0 : lshm__fail(-errno, "%s: %s", path, strerror(errno));
    if (!same_file(st, &now))
        return lshm__fail(-EADDRINUSE, "%s changed hands while it was checked", path);
    if (unlink(path) < 0 && errno != ENOENT)
        return lshm__fail(-errno, "cannot remove the stale socket %s: %s", path,
                          strerror(errno));
    return 0;
}

int lshm__sock_listen(const struct sockaddr_un *sun, mode_t mode, int *out,
                      struct lshm_sock_file *own)
{
    const char *path = sun->sun_path;
    struct stat st;
    int fd, ret;

    if (lstat(path, &st) == 0) {
        ret = remove_stale(sun, &st);
        if (ret < 0)
            return ret;
    }
    fd = lshm__sock_new();
    if (fd < 0)
        return fd;
    ret = bind_listening(fd, sun, mode, own);
    if (ret < 0) {
        close(fd);
        return ret;
    }
    *out = fd;
    return 0;
}

bool lshm__sock_out_of_fds(int fd)
{
    int dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);

    if (dup >= 0) {
        close(dup);
        return false;
    }
    return errno == EMFILE || errno == ENFILE;
}

void lshm__sock_unlink_own(const char *path, const struct lshm_sock_file *own)
{
    struct stat st;

    if (lstat(path, &st) < 0)
        return;
    if (st.st_dev != own->dev || st.st_ino != own->ino) {
        lshm__log("%s is no longer this listener's socket: left in place", path);
        return;
    }
    unlink(path);
}
