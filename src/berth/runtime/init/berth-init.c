/*
 * berth-init: PID 1 of every berth container.
 *
 * runc 1.1 (Debian 12) refuses a rootless user namespace that does not map
 * container uid 0 (libcontainer HostRootUID), so the container is created with
 * "0 -> caller" mappings.  When asked (-u/-g), this init then enters one more,
 * nested user namespace that maps the caller's own uid/gid to themselves, so the
 * job sees its real identity (uid, gid, /etc/passwd entry) instead of root.  No
 * privilege is needed for that: an unprivileged process may always map its own
 * effective ids, and the capabilities it holds in the new namespace are cleared
 * by execve because the new uid is not 0.
 *
 * As an init it forwards the usual termination and job-control signals to the
 * command's process group, reaps every orphan re-parented to it, and exits with
 * the command's status (128+N when the command died of signal N), like tini.
 *
 * Before anything runs, each -b DEV:INO:PATH is checked: PATH (a bind mount's destination) must
 * be the inode berth judged when it checked the mount's source (a bind mount shows its source's
 * st_dev and st_ino).  A source swapped between berth's policy check and runc's mount (a path
 * component replaced by a symbolic link) is refused with status 125 instead of run.
 *
 * -d BYTES sets the command's RLIMIT_DATA (soft and hard) just before it execs.  `berth exec`
 * under runc passes the container's data limit so, instead of in the process's rlimits: runc
 * applies those to its own Go init process before that execs, and a limit of tens of MiB
 * kills it ("pthread_create failed") before the command exists.
 *
 * Exit status: the command's; 128+N when it died of signal N; 127 when it was not found and 126
 * when it could not be run; 125 when berth-init itself failed (a bad option, the identity switch
 * refused: "not found" was a lie there, and berth's own failures are 125 everywhere).
 *
 * Built static at install time so it runs in any image, whatever its libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/capability.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define OWN_FAILURE 125

static void die(const char *what)
{
    fprintf(stderr, "berth-init: %s: %s\n", what, strerror(errno));
    _exit(OWN_FAILURE);
}

/* A uid or gid of -u/-g: decimal, 0 to 2^32 - 2 (strtol took "1x" as 1 and "x" as 0, root). */
static int parse_id(const char *text, long *out)
{
    char *end;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 10);
    if (errno || end == text || *end || text[0] == '-' || value > 0xFFFFFFFEULL) {
        fprintf(stderr, "berth-init: -u and -g want a number from 0 to 4294967294, not '%s'\n", text);
        return -1;
    }
    *out = (long)value;
    return 0;
}

static void write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        die(path);
    ssize_t len = (ssize_t)strlen(text);
    if (write(fd, text, (size_t)len) != len)
        die(path);
    close(fd);
}

static void enter_identity(long uid, long gid)
{
    char map[64];
    uid_t outer_uid = geteuid();
    gid_t outer_gid = getegid();
    if (unshare(CLONE_NEWUSER) != 0)
        die("unshare(CLONE_NEWUSER)");
    /* setgroups must be denied before an unprivileged gid_map write (user_namespaces(7)). */
    write_file("/proc/self/setgroups", "deny");
    snprintf(map, sizeof map, "%ld %u 1\n", uid, (unsigned)outer_uid);
    write_file("/proc/self/uid_map", map);
    snprintf(map, sizeof map, "%ld %u 1\n", gid, (unsigned)outer_gid);
    write_file("/proc/self/gid_map", map);
    /* The new namespace starts with a full bounding set: empty it, so nothing the command
     * executes (setuid or file-capability binaries) can ever regain a capability. */
    for (int cap = 0; cap <= 63; cap++) {
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EINVAL)
            die("prctl(PR_CAPBSET_DROP)");
    }
    if (setresgid((gid_t)gid, (gid_t)gid, (gid_t)gid) != 0)
        die("setresgid");
    if (setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) != 0)
        die("setresuid");
}

/* The init itself needs no capability once the command is started: drop them all (it stays
 * uid 0 of the runtime's namespace, which is the caller on the host) and refuse ptrace from
 * the command, which runs with the same host uid. */
static void drop_privileges(void)
{
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    for (int cap = 0; cap <= 63; cap++)
        prctl(PR_CAPBSET_DROP, cap, 0, 0, 0);
    if (syscall(SYS_capset, &header, data) != 0)
        die("capset");
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
}

/* Every signal gets this handler, which never runs (they are all blocked first, and taken by
 * sigtimedwait), so that the init catches every signal from its first moments on (SigCgt in
 * /proc/PID/status, also while it waits, when the kernel shows nothing blocked): the kernel
 * drops a signal that a pid namespace's init leaves at SIG_DFL, so berth-launcher forwards the
 * first one only once the init blocks or catches it.  The command gets the dispositions back. */
static void never_called(int sig)
{
    (void)sig;
}

static struct sigaction original_actions[NSIG];
static int caught[NSIG];

static void catch_every_signal(void)
{
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = never_called;
    sigfillset(&action.sa_mask);
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            caught[sig] = sigaction(sig, &action, &original_actions[sig]) == 0;
}

static void restore_signal_actions(void)
{
    for (int sig = 1; sig < NSIG; sig++)
        if (caught[sig])
            sigaction(sig, &original_actions[sig], NULL);
}

/* "DEV:INO:PATH": PATH must be that inode (it is the root of a bind mount of it); 0 if so. */
static int check_bind(const char *arg)
{
    char *end;
    errno = 0;
    unsigned long long dev = strtoull(arg, &end, 10);
    if (errno || *end != ':')
        goto usage;
    unsigned long long ino = strtoull(end + 1, &end, 10);
    if (errno || *end != ':' || end[1] != '/')
        goto usage;
    const char *path = end + 1;
    struct stat info;
    if (stat(path, &info) != 0) {
        fprintf(stderr, "berth-init: cannot check the mount at %s: %s\n", path, strerror(errno));
        return -1;
    }
    if ((unsigned long long)info.st_dev != dev || (unsigned long long)info.st_ino != ino) {
        fprintf(stderr, "berth-init: the mount at %s is not the host path berth checked (its source "
                "was replaced after the check): refusing to start\n", path);
        return -1;
    }
    return 0;
usage:
    fprintf(stderr, "berth-init: -b wants DEV:INO:/PATH, not '%s'\n", arg);
    return -1;
}

int main(int argc, char **argv)
{
    long uid = -1, gid = -1;
    /* First of all, every signal blocked (so that none is lost or taken by the handler), then
     * caught: see never_called. */
    sigset_t all, old;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &old);
    catch_every_signal();
    int opt, bad_binds = 0, data_limited = 0;
    struct rlimit data_limit = {0, 0};
    char *end;
    while ((opt = getopt(argc, argv, "+u:g:b:d:V")) != -1) {
        switch (opt) {
        case 'V': puts("berth-init 3"); return 0;
        case 'u':
            if (parse_id(optarg, &uid) != 0)
                return OWN_FAILURE;
            break;
        case 'g':
            if (parse_id(optarg, &gid) != 0)
                return OWN_FAILURE;
            break;
        case 'b': bad_binds |= check_bind(optarg) != 0; break;
        case 'd':
            errno = 0;
            data_limit.rlim_cur = data_limit.rlim_max = strtoull(optarg, &end, 10);
            if (errno || end == optarg || *end || optarg[0] == '-') {
                fprintf(stderr, "berth-init: -d wants a number of bytes, not '%s'\n", optarg);
                return OWN_FAILURE;
            }
            data_limited = 1;
            break;
        default:
            fprintf(stderr, "usage: berth-init [-V] [-b DEV:INO:PATH]... [-d BYTES] [-u UID -g GID] [--] COMMAND [ARG...]\n");
            return OWN_FAILURE;
        }
    }
    if (bad_binds)
        return OWN_FAILURE;
    if (optind >= argc) {
        fprintf(stderr, "berth-init: no command given\n");
        return OWN_FAILURE;
    }
    if ((uid < 0) != (gid < 0)) {
        fprintf(stderr, "berth-init: -u and -g go together\n");
        return OWN_FAILURE;
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        die("prctl(PR_SET_NO_NEW_PRIVS)");

    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0) {
        setpgid(0, 0);
        if (isatty(STDIN_FILENO)) {
            signal(SIGTTOU, SIG_IGN);
            tcsetpgrp(STDIN_FILENO, getpgrp());
        }
        restore_signal_actions();
        /* Only the command enters the nested namespace: this init stays in the runtime's
         * user namespace, so `runc exec` (berth exec), which joins the namespaces of the
         * container's init, lands in namespaces it can enter. */
        if (uid >= 0)
            enter_identity(uid, gid);
        sigprocmask(SIG_SETMASK, &old, NULL);
        if (data_limited && setrlimit(RLIMIT_DATA, &data_limit) != 0)
            die("setrlimit(RLIMIT_DATA)");
        execvp(argv[optind], &argv[optind]);
        fprintf(stderr, "berth-init: cannot run '%s': %s\n", argv[optind], strerror(errno));
        _exit(errno == ENOENT ? 127 : 126);
    }
    setpgid(child, child);
    drop_privileges();

    int status = 0;
    for (;;) {
        siginfo_t info;
        struct timespec tick = {1, 0};
        int sig = sigtimedwait(&all, &info, &tick);
        if (sig > 0 && sig != SIGCHLD) {
            /* Forward to the whole job: MPI launchers and shells start helpers. */
            if (kill(-child, sig) != 0)
                kill(child, sig);
        }
        for (;;) {
            int st;
            pid_t pid = waitpid(-1, &st, WNOHANG);
            if (pid <= 0)
                break;
            if (pid == child) {
                status = st;
                /* As PID 1, leave no orphans behind once the command has ended. Under
                 * `berth exec` this is not the container's init: kill only our own job. */
                if (getpid() == 1) {
                    kill(-1, SIGKILL);
                    while (waitpid(-1, NULL, 0) > 0)
                        ;
                } else {
                    kill(-child, SIGKILL);
                }
                if (WIFSIGNALED(status))
                    return 128 + WTERMSIG(status);
                return WEXITSTATUS(status);
            }
        }
    }
}
