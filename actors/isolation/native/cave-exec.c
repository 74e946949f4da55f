/* cave-exec: started by the zygote (posix_spawn, so no Python fork) for every command of a sandbox.
 *
 *   cave-exec ISOLATED BPF_FD ENV_FD CWD -- ARGV...
 *
 * stdin/stdout/stderr are already the exec's pipes. cave-exec itself runs with an empty
 * environment (it is static, and holds every capability of the sandbox until the command's exec):
 * the command's environment arrives in ENV_FD (a memfd of NUL-terminated KEY=VALUE strings, -1 for
 * none) and is installed only after the privileges are gone. With
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
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define COMMAND_OOM_SCORE_ADJ "1000" /* first to go in a node-wide OOM: see launcher._first_to_go */
#define MAX_BPF_BYTES (64 * 1024)
#define MAX_ENV_BYTES (4 << 20) /* more than execve takes (ARG_MAX is a quarter of the stack) */
#define COMMAND_NOFILE 4096     /* soft and hard RLIMIT_NOFILE of every command */

extern char **environ;

/* /proc entries that show the host (or hand it commands) in spite of the pid namespace: what runc
 * and Docker mask. Files get /dev/null bound over them, directories an empty read-only tmpfs; the
 * rest of /proc/sys and the like become read-only. An entry this kernel lacks is skipped. */
static const char *const MASKED_FILES[] = {"/proc/kcore", "/proc/keys", "/proc/timer_list",
    "/proc/sched_debug", "/proc/latency_stats", "/proc/sysrq-trigger", "/proc/kallsyms", NULL};
static const char *const MASKED_DIRS[] = {"/proc/acpi", "/proc/asound", "/proc/scsi",
    "/proc/driver", NULL};
static const char *const READ_ONLY[] = {"/proc/sys", "/proc/bus", "/proc/fs", "/proc/irq", NULL};

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

/* The command's environment: NUL-terminated KEY=VALUE strings read from env_fd. */
static char **read_environment(int env_fd) {
    static char *empty[] = {NULL};
    if (env_fd < 0) return empty;
    struct stat st;
    if (fstat(env_fd, &st) || st.st_size > MAX_ENV_BYTES) die(126, "cannot read the environment", NULL);
    char *block = malloc((size_t)st.st_size + 1);
    size_t count = 0;
    if (!block) die(126, "malloc", NULL);
    for (ssize_t got = 0, n; got < st.st_size; got += n)
        if ((n = pread(env_fd, block + got, (size_t)(st.st_size - got), got)) <= 0)
            die(126, "cannot read the environment", NULL);
    block[st.st_size] = '\0';
    for (off_t i = 0; i < st.st_size; i++) count += block[i] == '\0';
    char **env = calloc(count + 1, sizeof *env);
    if (!env) die(126, "malloc", NULL);
    for (size_t i = 0, at = 0; i < count; i++, at += strlen(block + at) + 1) env[i] = block + at;
    return env;
}

static void limit_resources(void) {
    struct rlimit none = {0, 0}, files;
    if (setrlimit(RLIMIT_CORE, &none)) die(126, "setrlimit(RLIMIT_CORE)", NULL);
    if (getrlimit(RLIMIT_NOFILE, &files)) die(126, "getrlimit(RLIMIT_NOFILE)", NULL);
    if (files.rlim_max > COMMAND_NOFILE) files.rlim_max = COMMAND_NOFILE;
    files.rlim_cur = files.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &files)) die(126, "setrlimit(RLIMIT_NOFILE)", NULL);
}

static void run_command(int bpf_fd, int env_fd, const char *cwd, char **argv) {
    if (cwd[0] && chdir(cwd)) die(126, "cannot enter", cwd);
    char **env = read_environment(env_fd);
    limit_resources();
    drop_privileges(bpf_fd);
    syscall(SYS_close_range, 3, ~0U, 0);
    signal(SIGPIPE, SIG_DFL);
    environ = env; /* only now: execvp searches the command's PATH */
    execvp(argv[0], argv);
    die(errno == ENOENT || errno == ENOTDIR ? 127 : 126, argv[0], NULL);
}

/* pid 1 of the exec's namespace: start the command, reap orphans, exit with the command's status. */
static void mask_proc(void) {
    for (const char *const *path = MASKED_FILES; *path; path++)
        if (mount("/dev/null", *path, NULL, MS_BIND, NULL) && errno != ENOENT)
            die(126, "mask", *path);
    for (const char *const *path = MASKED_DIRS; *path; path++)
        if (mount("cave-mask", *path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL)
            && errno != ENOENT)
            die(126, "mask", *path);
    for (const char *const *path = READ_ONLY; *path; path++) {
        if (mount(*path, *path, NULL, MS_BIND | MS_REC, NULL)) {
            if (errno == ENOENT) continue;
            die(126, "bind", *path);
        }
        if (mount(NULL, *path, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  NULL))
            die(126, "read-only", *path);
    }
}

static void namespace_init(int bpf_fd, int env_fd, const char *cwd, char **argv, int parent_alive_fd) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    struct pollfd alive = {parent_alive_fd, POLLIN, 0};
    if (parent_alive_fd >= 0 && poll(&alive, 1, 0) > 0) _exit(137); /* parent died before prctl */
    /* A /proc of the exec's own pid namespace, so that ps and /proc/self work inside it. */
    if (parent_alive_fd >= 0) {
        if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL))
            die(126, "mount /proc", NULL);
        mask_proc();
    }
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
        run_command(bpf_fd, env_fd, cwd, argv);
    }
    for (;;) {
        int status;
        pid_t pid = wait(&status);
        if (pid == command) _exit(status_code(status));
        if (pid < 0 && errno != EINTR) _exit(126);
    }
}

int main(int argc, char **argv) {
    if (argc < 7 || strcmp(argv[5], "--")) {
        dprintf(2, "usage: cave-exec ISOLATED BPF_FD ENV_FD CWD -- ARGV...\n");
        return 126;
    }
    int isolated = atoi(argv[1]), bpf_fd = atoi(argv[2]), env_fd = atoi(argv[3]);
    const char *cwd = argv[4];
    char **command = argv + 6;
    if (environ && environ[0]) { /* nothing may steer us while we hold the sandbox's capabilities */
        dprintf(2, "cave: refusing to run with an environment (the command's comes in ENV_FD)\n");
        return 126;
    }
    if (!isolated) /* degraded: the zygote spawned us as a process group leader, its kill target */
        namespace_init(bpf_fd, env_fd, cwd, command, -1);
    int alive[2];
    if (pipe2(alive, O_CLOEXEC)) die(126, "pipe", NULL);
    if (unshare(CLONE_NEWPID | CLONE_NEWNS)) die(126, "unshare(CLONE_NEWPID|CLONE_NEWNS)", NULL);
    pid_t init = fork();
    if (init < 0) die(126, "fork", NULL);
    if (init == 0) {
        close(alive[1]);
        namespace_init(bpf_fd, env_fd, cwd, command, alive[0]);
    }
    close(alive[0]);
    for (;;) {
        int status;
        if (waitpid(init, &status, 0) == init) return status_code(status);
        if (errno != EINTR) return 126;
    }
}
