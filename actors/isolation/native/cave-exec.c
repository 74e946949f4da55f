/* cave-exec: started by the zygote (posix_spawn, so no Python fork) for every command of a sandbox.
 *
 *   cave-exec ISOLATED BPF_FD CWD -- ARGV...
 *
 * stdin/stdout/stderr are already the exec's pipes, the environment is the command's. With
 * ISOLATED=1 the command runs under fresh pid and mount namespaces (the latter only for a /proc
 * that matches the former) whose init (our child) exits when the
 * command exits, so the kernel kills every process the command left behind, daemons included.
 * The zygote ends a timed-out exec by killing this process: PR_SET_PDEATHSIG carries the kill to
 * the namespace init. Exit status: the command's code, 128+signal, 126 cannot run, 127 not found.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define COMMAND_OOM_SCORE_ADJ "500"
#define MAX_BPF_BYTES (64 * 1024)

static void die(int code, const char *what, const char *arg) {
    dprintf(2, "cave: %s%s%s: %s\n", what, arg ? " " : "", arg ? arg : "", strerror(errno));
    _exit(code);
}

static int status_code(int status) {
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return WEXITSTATUS(status);
}

static void drop_privileges(int bpf_fd) {
    static unsigned char bpf[MAX_BPF_BYTES];
    ssize_t n = bpf_fd >= 0 ? pread(bpf_fd, bpf, sizeof bpf, 0) : 0;
    if (n < 0 || n % sizeof(struct sock_filter)) die(126, "cannot read the seccomp filter", NULL);
    /* Dropping needs CAP_SETPCAP, which a degraded (non-root) zygote lacks. Without it nothing
     * can be gained from the bounding set anyway: no_new_privs below blocks setuid and file caps. */
    for (int cap = 0; cap <= 63; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) && errno != EINVAL && errno != EPERM)
            die(126, "PR_CAPBSET_DROP", NULL);
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capset, &hdr, data)) die(126, "capset", NULL);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) die(126, "PR_SET_NO_NEW_PRIVS", NULL);
    if (n > 0) {
        struct sock_fprog prog = {(unsigned short)(n / sizeof(struct sock_filter)),
                                  (struct sock_filter *)bpf};
        if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0)) die(126, "seccomp", NULL);
    }
}

static void run_command(int bpf_fd, const char *cwd, char **argv) {
    if (cwd[0] && chdir(cwd)) die(126, "cannot enter", cwd);
    drop_privileges(bpf_fd);
    syscall(SYS_close_range, 3, ~0U, 0);
    signal(SIGPIPE, SIG_DFL);
    execvp(argv[0], argv);
    die(errno == ENOENT || errno == ENOTDIR ? 127 : 126, argv[0], NULL);
}

/* pid 1 of the exec's namespace: start the command, reap orphans, exit with the command's status. */
static void namespace_init(int bpf_fd, const char *cwd, char **argv, int parent_alive_fd) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    struct pollfd alive = {parent_alive_fd, POLLIN, 0};
    if (parent_alive_fd >= 0 && poll(&alive, 1, 0) > 0) _exit(137); /* parent died before prctl */
    /* A /proc of the exec's own pid namespace, so that ps and /proc/self work inside it. */
    if (parent_alive_fd >= 0 && mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL))
        die(126, "mount /proc", NULL);
    int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        (void)!write(fd, COMMAND_OOM_SCORE_ADJ, strlen(COMMAND_OOM_SCORE_ADJ));
        close(fd);
    }
    pid_t command = fork();
    if (command < 0) die(126, "fork", NULL);
    if (command == 0) {
        /* Isolated: a new session, so no controlling terminal for TIOCSTI. Degraded: stay in the
         * process group the zygote made, the only handle it has to kill the exec's processes. */
        if (parent_alive_fd >= 0) setsid();
        run_command(bpf_fd, cwd, argv);
    }
    for (;;) {
        int status;
        pid_t pid = wait(&status);
        if (pid == command) _exit(status_code(status));
        if (pid < 0 && errno != EINTR) _exit(126);
    }
}

int main(int argc, char **argv) {
    if (argc < 5 || strcmp(argv[4], "--") || argc < 6) {
        dprintf(2, "usage: cave-exec ISOLATED BPF_FD CWD -- ARGV...\n");
        return 126;
    }
    int isolated = atoi(argv[1]), bpf_fd = atoi(argv[2]);
    const char *cwd = argv[3];
    char **command = argv + 5;
    if (!isolated) /* degraded: the zygote spawned us as a process group leader, its kill target */
        namespace_init(bpf_fd, cwd, command, -1);
    int alive[2];
    if (pipe2(alive, O_CLOEXEC)) die(126, "pipe", NULL);
    if (unshare(CLONE_NEWPID | CLONE_NEWNS)) die(126, "unshare(CLONE_NEWPID|CLONE_NEWNS)", NULL);
    pid_t init = fork();
    if (init < 0) die(126, "fork", NULL);
    if (init == 0) {
        close(alive[1]);
        namespace_init(bpf_fd, cwd, command, alive[0]);
    }
    close(alive[0]);
    for (;;) {
        int status;
        if (waitpid(init, &status, 0) == init) return status_code(status);
        if (errno != EINTR) return 126;
    }
}
