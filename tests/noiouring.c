/*
 * noiouring: run a program where io_uring is refused, as in a container
 * under Docker's or containerd's default seccomp profile: io_uring_setup,
 * io_uring_enter and io_uring_register fail with EPERM, everything else is
 * allowed.  The filter stays on across fork and exec.  `make check` runs the
 * suite a second time under it.
 *
 * Usage: noiouring PROGRAM [ARG...]
 */
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#define NATIVE_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define NATIVE_ARCH AUDIT_ARCH_AARCH64
#elif defined(__i386__)
#define NATIVE_ARCH AUDIT_ARCH_I386
#else
#error "noiouring: add this architecture's AUDIT_ARCH_*"
#endif

#define DENY_EPERM  BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA))

int main(int argc, char **argv)
{
    struct sock_filter prog[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, NATIVE_ARCH, 1, 0),
        DENY_EPERM,     /* another ABI: nothing of ours runs there */
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 3, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_enter, 2, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_register, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        DENY_EPERM,
    };
    struct sock_fprog fprog = { .len = sizeof(prog) / sizeof(prog[0]), .filter = prog };

    if (argc < 2) {
        fprintf(stderr, "usage: noiouring PROGRAM [ARG...]\n");
        return 2;
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog, 0, 0) < 0) {
        fprintf(stderr, "noiouring: cannot install the seccomp filter: %s\n", strerror(errno));
        return 2;
    }
    if (syscall(__NR_io_uring_setup, 1, NULL) != -1 || errno != EPERM) {
        fprintf(stderr, "noiouring: io_uring_setup is not refused with EPERM\n");
        return 2;
    }
    fprintf(stderr, "noiouring: io_uring_setup, io_uring_enter, io_uring_register "
                    "refused with EPERM\n");
    execvp(argv[1], argv + 1);
    fprintf(stderr, "noiouring: %s: %s\n", argv[1], strerror(errno));
    return 127;
}
