/*
 * shmping: the process: signals, privileges, file-descriptor room, and the
 * forked peer's birth and death.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/capability.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "shmping.h"

volatile sig_atomic_t stop_requested;

int fd_room(unsigned n)
{
    rlim_t want = (rlim_t)n + 256;   /* and the rest: rings, segments, stdio */
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur == RLIM_INFINITY ||
        rl.rlim_cur >= want)
        return 0;
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < want) {
        err("--idle %u needs about %llu file descriptors a process; the hard limit is "
            "%llu (ulimit -Hn)", n, (unsigned long long)want, (unsigned long long)rl.rlim_max);
        return -1;
    }
    rl.rlim_cur = want;
    if (setrlimit(RLIMIT_NOFILE, &rl) < 0) {
        err("--idle %u: cannot raise RLIMIT_NOFILE to %llu: %s", n,
            (unsigned long long)want, strerror(errno));
        return -1;
    }
    return 0;
}

/*
 * Called after set-up (ring, sockets) and before anything is read from a
 * peer, so that a bug in the receive path cannot use the process's
 * privileges.  Lowering capabilities never needs a privilege.
 */
int drop_caps(const struct config *cfg)
{
    cap_t none;
    int ret;

    if (cfg->keep_caps)
        return 0;
    none = cap_init();
    if (none == NULL) {
        err("cannot drop capabilities: cap_init: %s", strerror(errno));
        return -1;
    }
    ret = cap_set_proc(none);
    if (ret != 0)
        err("cannot drop capabilities: cap_set_proc: %s", strerror(errno));
    cap_free(none);
    if (ret == 0 && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        err("cannot set no_new_privs: %s", strerror(errno));
        ret = -1;
    }
    return ret == 0 ? 0 : -1;
}

static void on_stop(int sig)
{
    (void)sig;
    stop_requested = 1;
}

/* No SA_RESTART: a blocking read or wait returns EINTR and the loop stops. */
void install_signals(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_stop;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

/*
 * A forked peer leaves Ctrl-C to its parent (which then prints its summary
 * and closes the link) and dies with it.
 */
void peer_signals(void)
{
    signal(SIGINT, SIG_IGN);
    signal(SIGTERM, SIG_DFL);
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
}

pid_t fork_peer(const struct config *cfg, int type,
                int (*peer)(const struct config *cfg, int sock), int *sock)
{
    int sv[2];
    pid_t pid;

    if (socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv) < 0) {
        err("socketpair: %s", strerror(errno));
        return -1;
    }
    /* What stdio holds must not come out twice. */
    fflush(stdout);
    fflush(stderr);
    pid = fork();
    if (pid < 0) {
        err("fork: %s", strerror(errno));
        close(sv[0]);
        close(sv[1]);
        return -1;
    }
    if (pid == 0) {
        close(sv[0]);
        peer_signals();
        exit(peer(cfg, sv[1]));   /* exit: leak checkers see the peer too */
    }
    close(sv[1]);
    *sock = sv[0];
    return pid;
}

int reap_child(pid_t pid)
{
    uint64_t until = now_ns() + 5000000000ull;
    int status;

    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid)
            return status;
        if (r < 0 && errno != EINTR)
            return -1;
        if (now_ns() > until) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            return -1;
        }
        usleep(1000);
    }
}
