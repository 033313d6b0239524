/*
 * berth-launcher: runs the OCI config.json that berth generates, without runc (issue 10).
 *
 * berth's hot path used to hand every container to runc, a Go program whose own start costs
 * ~15-22 ms here.  This program executes the same config.json, for the subset of the OCI
 * runtime spec that berth generates, in ~1-2 ms.  config.json stays the contract
 * (DESIGN.md decisions 5 and 13): berth decides everything (berth.runtime.plan), this program
 * only executes, and it refuses -- exit 1 with a clear message, nothing started -- any key or
 * value it does not understand instead of ignoring it.  berth checks the same rules in Python
 * first (berth.runtime.launcher.unsupported) and hands such a config to runc.
 *
 * It speaks the part of runc's command line berth uses, with runc's behaviour, so that the
 * supervision code (signals, stop timeout, teardown, stale clean-up, exec, ps) is one:
 *
 *   berth-launcher [--parent-death PID] [--root DIR] [--log FILE] [--log-format text] run [--preserve-fds N] (-b|--bundle) DIR ID
 *   berth-launcher [--root DIR] kill ID SIGNAL
 *   berth-launcher [--root DIR] delete [--force] ID
 *   berth-launcher [--root DIR] state ID
 *   berth-launcher [--root DIR] exec [--tty] [--cwd DIR] [--env K=V]... [--preserve-fds N] ID COMMAND [ARG...]
 *   berth-launcher check (-b|--bundle) DIR      (exit 0 when it can run the bundle's config)
 *   berth-launcher --version
 *
 * "run": the container's first process (berth-init) is cloned into new user, mount, and the
 * config's other namespaces; its uid/gid maps are the caller's own ids (no newuidmap, no
 * privilege: an unprivileged process may map its own ids); the mounts are made in config
 * order with every destination resolved inside the root (openat2 RESOLVE_IN_ROOT: an image's
 * symbolic links cannot point a mount out of it), rootless /dev devices bind-mounted from the
 * host as runc does, pivot_root, readonly and masked paths, the root remounted read-only,
 * rlimits, the process user, capabilities, no_new_privs, then exec.  The launcher stays as
 * the container's parent: it forwards every signal it gets to the container's init (runc
 * run's behaviour), and exits with the init's status (128+N when it died of signal N); 1
 * when the container could not be started, with runc's "level=error msg=..." line in --log.
 * The state (ROOT/ID/state.json: the init's host pid and start time) lets "kill", "delete",
 * "state" and "exec" find the container; "delete --force" kills a container whose launcher
 * died.  The init gets PR_SET_PDEATHSIG(SIGKILL): a launcher killed with SIGKILL takes its
 * container with it.
 *
 * "--preserve-fds N" (runc's option): descriptors 3 to 3+N-1 reach the container's process too
 * (Slurm's PMI socket, berth.runtime.pmix).
 *
 * "--parent-death PID" (berth's own, before the command): SIGTERM to the launcher when its parent
 * dies (PR_SET_PDEATHSIG), the launcher forwarding it to the container like any signal; a
 * parent that is not PID any more (it died before the prctl took effect) sends it at once.
 * berth.runtime.supervise gives it instead of running the launcher under ``setpriv --pdeathsig
 * TERM``: one exec less on every container's start (issue 10), the same guarantee.
 *
 * No setuid, no capabilities of its own: it runs as the calling user only.
 * Built static at install time like berth-init (setup.py).
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/openat2.h>
#include <poll.h>
#include <termios.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <net/if.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif
#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_RAISE 2
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

#define LAUNCHER_VERSION "berth-launcher 1"
#define MAX_CONFIG_BYTES (4 << 20)
#define MAX_DEPTH 32
/* Keys of one object: each new key is compared with every earlier one (duplicates are refused),
 * so 150,000 keys in a 2 MiB state.json kept "state" (berth ps) busy for minutes. */
#define MAX_KEYS 4096

/* ------------------------------------------------------------------ errors and the log */

/* strerror as runc (Go) words it, lower-case: "not a directory". */
static const char *error_text(int number)
{
    static char text[128];
    snprintf(text, sizeof text, "%s", strerror(number));
    text[0] = (char)tolower((unsigned char)text[0]);
    return text;
}

static int log_fd = -1;
/* "--preserve-fds N": descriptors 3 .. 3+N-1 stay open for the container's process. */
static unsigned preserve_fds = 0;
/* In the launcher during "run": the container's state to remove, and its first process to
 * kill, when the launcher fails. */
static const char *cleanup_id;
static pid_t cleanup_child = -1;
static void remove_state(const char *id);
/* In the container's child: errors go to this pipe, the launcher reports them. */
static int error_pipe = -1;

static void log_error(const char *message)
{
    fprintf(stderr, "berth-launcher: %s\n", message);
    if (log_fd < 0)
        return;
    /* runc's text log format, which berth.runtime.supervise.runtime_error reads. */
    char line[8192];
    size_t n = (size_t)snprintf(line, sizeof line, "time=\"%ld\" level=error msg=\"", (long)time(NULL));
    for (const char *p = message; *p && n < sizeof line - 4; p++) {
        if (*p == '"' || *p == '\\')
            line[n++] = '\\';
        line[n++] = *p == '\n' ? ' ' : *p;
    }
    line[n++] = '"';
    line[n++] = '\n';
    if (write(log_fd, line, n) < 0) {
        /* nothing more to do: the message went to stderr */
    }
}

static void fail(const char *format, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void fail(const char *format, ...)
{
    char message[4096];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    if (error_pipe >= 0) {
        size_t len = strlen(message);
        if (write(error_pipe, message, len) < 0) {
            /* the launcher is gone: nobody to tell */
        }
        _exit(1);
    }
    if (cleanup_child > 0) {
        kill(cleanup_child, SIGKILL);
        waitpid(cleanup_child, NULL, 0);
    }
    if (cleanup_id)
        remove_state(cleanup_id);
    log_error(message);
    exit(1);
}

static void *xalloc(size_t size)
{
    void *p = calloc(1, size ? size : 1);
    if (!p)
        fail("out of memory");
    return p;
}

/* ------------------------------------------------------------------ a small JSON reader */

enum jtype { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ };

struct jval {
    enum jtype type;
    int boolean;
    char *text;          /* J_STR: the string (no NUL inside: refused); J_NUM: its text */
    size_t count;        /* J_ARR, J_OBJ */
    struct jval **items; /* J_ARR, J_OBJ: values */
    char **keys;         /* J_OBJ */
};

struct jparser {
    const char *s, *end, *start;
    const char *what;
};

static void jfail(struct jparser *p, const char *why) __attribute__((noreturn));
static void jfail(struct jparser *p, const char *why)
{
    fail("%s: not valid JSON at byte %ld: %s", p->what, (long)(p->s - p->start), why);
}

static void jskip(struct jparser *p)
{
    while (p->s < p->end && (*p->s == ' ' || *p->s == '\t' || *p->s == '\n' || *p->s == '\r'))
        p->s++;
}

static void put_utf8(char **out, unsigned code)
{
    char *o = *out;
    if (code < 0x80) {
        *o++ = (char)code;
    } else if (code < 0x800) {
        *o++ = (char)(0xC0 | (code >> 6));
        *o++ = (char)(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
        *o++ = (char)(0xE0 | (code >> 12));
        *o++ = (char)(0x80 | ((code >> 6) & 0x3F));
        *o++ = (char)(0x80 | (code & 0x3F));
    } else {
        *o++ = (char)(0xF0 | (code >> 18));
        *o++ = (char)(0x80 | ((code >> 12) & 0x3F));
        *o++ = (char)(0x80 | ((code >> 6) & 0x3F));
        *o++ = (char)(0x80 | (code & 0x3F));
    }
    *out = o;
}

static int hex4(struct jparser *p, unsigned *value)
{
    if (p->end - p->s < 4)
        return -1;
    *value = 0;
    for (int i = 0; i < 4; i++) {
        char c = p->s[i];
        *value <<= 4;
        if (c >= '0' && c <= '9')
            *value |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            *value |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            *value |= (unsigned)(c - 'A' + 10);
        else
            return -1;
    }
    p->s += 4;
    return 0;
}

static char *jstring(struct jparser *p)
{
    if (p->s >= p->end || *p->s != '"')
        jfail(p, "a string expected");
    p->s++;
    const char *start = p->s;
    while (p->s < p->end && *p->s != '"') {
        if (*p->s == '\\')
            p->s++;
        p->s++;
    }
    if (p->s >= p->end)
        jfail(p, "unterminated string");
    /* Decoded text is never longer than the escaped text (\uXXXX: 6 bytes for at most 4). */
    char *out = xalloc((size_t)(p->s - start) + 1), *o = out;
    p->s = start;
    while (*p->s != '"') {
        unsigned char c = (unsigned char)*p->s++;
        if (c < 0x20)
            jfail(p, "control character in a string");
        if (c != '\\') {
            *o++ = (char)c;
            continue;
        }
        char e = *p->s++;
        unsigned code, low;
        switch (e) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '/': *o++ = '/'; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u':
            if (hex4(p, &code))
                jfail(p, "bad \\u escape");
            if (code == 0)
                jfail(p, "NUL character in a string");
            if (code >= 0xD800 && code < 0xDC00) {
                if (p->end - p->s < 6 || p->s[0] != '\\' || p->s[1] != 'u')
                    jfail(p, "lone surrogate");
                p->s += 2;
                if (hex4(p, &low) || low < 0xDC00 || low > 0xDFFF)
                    jfail(p, "bad surrogate pair");
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
            } else if (code >= 0xDC00 && code < 0xE000) {
                jfail(p, "lone surrogate");
            }
            put_utf8(&o, code);
            break;
        default:
            jfail(p, "bad escape");
        }
    }
    p->s++;
    *o = 0;
    return out;
}

static struct jval *jvalue(struct jparser *p, int depth);

static void jappend(struct jval *v, char *key, struct jval *item)
{
    if ((v->count & (v->count - 1)) == 0) { /* grow at powers of two */
        size_t capacity = v->count ? v->count * 2 : 1;
        v->items = realloc(v->items, capacity * sizeof *v->items);
        v->keys = realloc(v->keys, capacity * sizeof *v->keys);
        if (!v->items || !v->keys)
            fail("out of memory");
    }
    v->items[v->count] = item;
    v->keys[v->count] = key;
    v->count++;
}

static struct jval *jvalue(struct jparser *p, int depth)
{
    if (depth > MAX_DEPTH)
        jfail(p, "nested too deeply");
    jskip(p);
    if (p->s >= p->end)
        jfail(p, "value expected");
    struct jval *v = xalloc(sizeof *v);
    char c = *p->s;
    if (c == '{' || c == '[') {
        v->type = c == '{' ? J_OBJ : J_ARR;
        char close = c == '{' ? '}' : ']';
        p->s++;
        jskip(p);
        if (p->s < p->end && *p->s == close) {
            p->s++;
            return v;
        }
        for (;;) {
            char *key = NULL;
            jskip(p);
            if (v->type == J_OBJ) {
                if (v->count == MAX_KEYS)
                    jfail(p, "more than 4096 keys in one object");
                key = jstring(p);
                for (size_t i = 0; i < v->count; i++)
                    if (strcmp(v->keys[i], key) == 0)
                        fail("%s: key '%s' appears twice in one object", p->what, key);
                jskip(p);
                if (p->s >= p->end || *p->s != ':')
                    jfail(p, "':' expected");
                p->s++;
            }
            jappend(v, key, jvalue(p, depth + 1));
            jskip(p);
            if (p->s < p->end && *p->s == ',') {
                p->s++;
                continue;
            }
            if (p->s < p->end && *p->s == close) {
                p->s++;
                return v;
            }
            jfail(p, "',' or end of object/array expected");
        }
    }
    if (c == '"') {
        v->type = J_STR;
        v->text = jstring(p);
        return v;
    }
    if (p->end - p->s >= 4 && memcmp(p->s, "true", 4) == 0) {
        v->type = J_BOOL, v->boolean = 1, p->s += 4;
        return v;
    }
    if (p->end - p->s >= 5 && memcmp(p->s, "false", 5) == 0) {
        v->type = J_BOOL, p->s += 5;
        return v;
    }
    if (p->end - p->s >= 4 && memcmp(p->s, "null", 4) == 0) {
        v->type = J_NULL, p->s += 4;
        return v;
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
        const char *start = p->s;
        p->s++;
        while (p->s < p->end && (isdigit((unsigned char)*p->s) || (*p->s && strchr("+-.eE", *p->s))))
            p->s++;
        v->type = J_NUM;
        v->text = xalloc((size_t)(p->s - start) + 1);
        memcpy(v->text, start, (size_t)(p->s - start));
        return v;
    }
    jfail(p, "unexpected character");
}

static struct jval *parse_json_file(const char *path, const char *what)
{
    /* Non-blocking, then a regular file only: a FIFO planted as state.json or config.json (by a
     * container that reaches berth's state directory) blocked "state", "kill", "delete" and
     * "exec" in open() for good. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        fail("cannot open %s: %s", path, error_text(errno));
    struct stat info;
    if (fstat(fd, &info) != 0 || !S_ISREG(info.st_mode))
        fail("%s is not a regular file", path);
    char *data = xalloc(MAX_CONFIG_BYTES + 1);
    size_t size = 0;
    for (;;) {
        ssize_t got = read(fd, data + size, MAX_CONFIG_BYTES + 1 - size);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            fail("cannot read %s: %s", path, error_text(errno));
        if (got == 0)
            break;
        size += (size_t)got;
        if (size > MAX_CONFIG_BYTES)
            fail("%s is larger than %d bytes", path, MAX_CONFIG_BYTES);
    }
    close(fd);
    struct jparser p = {data, data + size, data, what};
    struct jval *v = jvalue(&p, 0);
    jskip(&p);
    if (p.s != p.end)
        jfail(&p, "trailing data");
    return v;
}

/* ------------------------------------------------------------------ typed access, strictly */

static struct jval *jget(struct jval *obj, const char *key)
{
    for (size_t i = 0; obj && obj->type == J_OBJ && i < obj->count; i++)
        if (strcmp(obj->keys[i], key) == 0)
            return obj->items[i];
    return NULL;
}

/* Every key of ``obj`` must be one of ``allowed`` (NULL-terminated): what the launcher does not
 * know, it refuses (berth falls back to runc before it gets here). */
static void only_keys(struct jval *obj, const char *where, const char *const *allowed)
{
    if (!obj || obj->type != J_OBJ)
        fail("config.json: %s must be an object", where);
    for (size_t i = 0; i < obj->count; i++) {
        int known = 0;
        for (const char *const *a = allowed; *a; a++)
            known |= strcmp(obj->keys[i], *a) == 0;
        if (!known)
            fail("config.json: %s.%s is not supported by berth-launcher (berth uses runc for such a "
                 "configuration)", where, obj->keys[i]);
    }
}

static const char *want_string(struct jval *v, const char *where)
{
    if (!v || v->type != J_STR)
        fail("config.json: %s must be a string", where);
    return v->text;
}

static int want_bool(struct jval *v, const char *where, int absent)
{
    if (!v)
        return absent;
    if (v->type != J_BOOL)
        fail("config.json: %s must be true or false", where);
    return v->boolean;
}

static uint64_t want_u64(struct jval *v, const char *where)
{
    if (!v || v->type != J_NUM || v->text[0] == '-')
        fail("config.json: %s must be a non-negative integer", where);
    char *end;
    errno = 0;
    unsigned long long n = strtoull(v->text, &end, 10);
    if (errno || *end)
        fail("config.json: %s must be a non-negative integer, not %s", where, v->text);
    return n;
}

/* A uid or gid: 32 bits (a larger value was cast to unsigned: 2^32 + N became N). */
static unsigned want_id(struct jval *v, const char *where)
{
    uint64_t n = want_u64(v, where);
    if (n > UINT32_MAX - 1) /* (uid_t)-1 means "no id" to the kernel */
        fail("config.json: %s %llu is not a uid or gid (at most %u)", where, (unsigned long long)n, UINT32_MAX - 1);
    return (unsigned)n;
}

static struct jval *want_array(struct jval *v, const char *where)
{
    if (!v || v->type != J_ARR)
        fail("config.json: %s must be an array", where);
    return v;
}

/* NULL-terminated array of the strings of a JSON array of strings. */
static char **string_list(struct jval *v, const char *where)
{
    want_array(v, where);
    char **out = xalloc((v->count + 1) * sizeof *out);
    for (size_t i = 0; i < v->count; i++)
        out[i] = (char *)want_string(v->items[i], where);
    return out;
}

/* ------------------------------------------------------------------ the model of a config */

struct mount_entry {
    const char *destination, *type, *source;
    unsigned long flags;         /* MS_* flags */
    unsigned long propagation;   /* MS_PRIVATE etc, 0 for none */
    char data[1024];             /* options the kernel file system takes (mode=, size=...) */
    int bind;
};

struct rlimit_entry {
    int resource;
    struct rlimit limit;
};

struct config {
    const char *root;
    int readonly_root;
    int clone_flags;
    const char *hostname;
    unsigned host_uid, host_gid, container_uid, container_gid;
    unsigned uid, gid;
    char **args, **env;
    const char *cwd;
    int no_new_privileges;
    uint64_t bounding, effective, permitted, inheritable, ambient;
    struct mount_entry *mounts;
    size_t mount_count;
    struct rlimit_entry *rlimits;
    size_t rlimit_count;
    char **masked, **readonly;
    int deny_keyring; /* linux.seccomp: berth's keyring rule (see deny_keyring) */
};

static const char *const CAPABILITIES[] = {
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
    "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
};
#define CAPABILITY_COUNT (sizeof CAPABILITIES / sizeof *CAPABILITIES)

static uint64_t capability_set(struct jval *v, const char *where)
{
    uint64_t set = 0;
    if (!v)
        return 0;
    want_array(v, where);
    for (size_t i = 0; i < v->count; i++) {
        const char *name = want_string(v->items[i], where);
        size_t cap = 0;
        while (cap < CAPABILITY_COUNT && strcmp(CAPABILITIES[cap], name) != 0)
            cap++;
        if (cap == CAPABILITY_COUNT)
            fail("config.json: %s: unknown capability '%s'", where, name);
        set |= 1ULL << cap;
    }
    return set;
}

static const struct {
    const char *name;
    int resource;
} RLIMITS[] = {
    {"RLIMIT_AS", RLIMIT_AS}, {"RLIMIT_CORE", RLIMIT_CORE}, {"RLIMIT_CPU", RLIMIT_CPU},
    {"RLIMIT_DATA", RLIMIT_DATA}, {"RLIMIT_FSIZE", RLIMIT_FSIZE}, {"RLIMIT_LOCKS", RLIMIT_LOCKS},
    {"RLIMIT_MEMLOCK", RLIMIT_MEMLOCK}, {"RLIMIT_MSGQUEUE", RLIMIT_MSGQUEUE}, {"RLIMIT_NICE", RLIMIT_NICE},
    {"RLIMIT_NOFILE", RLIMIT_NOFILE}, {"RLIMIT_NPROC", RLIMIT_NPROC}, {"RLIMIT_RSS", RLIMIT_RSS},
    {"RLIMIT_RTPRIO", RLIMIT_RTPRIO}, {"RLIMIT_RTTIME", RLIMIT_RTTIME}, {"RLIMIT_SIGPENDING", RLIMIT_SIGPENDING},
    {"RLIMIT_STACK", RLIMIT_STACK},
};

/* Mount options that are flags (runc's table); a "clear" one removes its flag. */
static const struct {
    const char *name;
    int clear;
    unsigned long flag;
} MOUNT_FLAGS[] = {
    {"ro", 0, MS_RDONLY}, {"rw", 1, MS_RDONLY}, {"nosuid", 0, MS_NOSUID}, {"suid", 1, MS_NOSUID},
    {"nodev", 0, MS_NODEV}, {"dev", 1, MS_NODEV}, {"noexec", 0, MS_NOEXEC}, {"exec", 1, MS_NOEXEC},
    {"sync", 0, MS_SYNCHRONOUS}, {"async", 1, MS_SYNCHRONOUS}, {"dirsync", 0, MS_DIRSYNC},
    {"noatime", 0, MS_NOATIME}, {"atime", 1, MS_NOATIME}, {"nodiratime", 0, MS_NODIRATIME},
    {"diratime", 1, MS_NODIRATIME}, {"relatime", 0, MS_RELATIME}, {"norelatime", 1, MS_RELATIME},
    {"strictatime", 0, MS_STRICTATIME}, {"bind", 0, MS_BIND}, {"rbind", 0, MS_BIND | MS_REC},
    /* runc's recursive forms (it needs them to reach the mounts below an rbind's source); the
     * launcher applies an rbind's flags to the whole tree anyway (restrict_tree). */
    {"rro", 0, MS_RDONLY}, {"rnosuid", 0, MS_NOSUID}, {"rnodev", 0, MS_NODEV}, {"rnoexec", 0, MS_NOEXEC},
};

static const struct {
    const char *name;
    unsigned long flag;
} PROPAGATIONS[] = {
    {"private", MS_PRIVATE}, {"rprivate", MS_PRIVATE | MS_REC}, {"slave", MS_SLAVE},
    {"rslave", MS_SLAVE | MS_REC}, {"unbindable", MS_UNBINDABLE}, {"runbindable", MS_UNBINDABLE | MS_REC},
};

/* File system types the launcher mounts; "none" and "bind" are bind mounts. */
static const char *const FS_TYPES[] = {"proc", "tmpfs", "devpts", "mqueue", "sysfs", "overlay", NULL};

static void parse_mount(struct jval *m, struct mount_entry *out)
{
    static const char *const keys[] = {"destination", "type", "source", "options", NULL};
    only_keys(m, "mounts[]", keys);
    out->destination = want_string(jget(m, "destination"), "mounts[].destination");
    if (out->destination[0] != '/')
        fail("config.json: mount destination %s is not absolute", out->destination);
    out->type = jget(m, "type") ? want_string(jget(m, "type"), "mounts[].type") : "none";
    out->source = jget(m, "source") ? want_string(jget(m, "source"), "mounts[].source") : "";
    char **options = jget(m, "options") ? string_list(jget(m, "options"), "mounts[].options") : NULL;
    size_t used = 0;
    for (size_t i = 0; options && options[i]; i++) {
        const char *option = options[i];
        int handled = 0;
        for (size_t f = 0; f < sizeof MOUNT_FLAGS / sizeof *MOUNT_FLAGS && !handled; f++) {
            if (strcmp(option, MOUNT_FLAGS[f].name) == 0) {
                if (MOUNT_FLAGS[f].clear)
                    out->flags &= ~MOUNT_FLAGS[f].flag;
                else
                    out->flags |= MOUNT_FLAGS[f].flag;
                handled = 1;
            }
        }
        for (size_t f = 0; f < sizeof PROPAGATIONS / sizeof *PROPAGATIONS && !handled; f++) {
            if (strcmp(option, PROPAGATIONS[f].name) == 0) {
                out->propagation = PROPAGATIONS[f].flag;
                handled = 1;
            }
        }
        if (handled)
            continue;
        /* Anything else is the file system's own option: only for a real file system, whose
         * kernel code checks it; a bind mount has none. */
        if (strcmp(out->type, "none") == 0 || strcmp(out->type, "bind") == 0 || (out->flags & MS_BIND))
            fail("config.json: mount option '%s' of the bind mount at %s is not supported by berth-launcher",
                 option, out->destination);
        if (strchr(option, ',') || used + strlen(option) + 2 > sizeof out->data)
            fail("config.json: mount option '%s' at %s is not supported by berth-launcher", option,
                 out->destination);
        if (used)
            out->data[used++] = ',';
        strcpy(out->data + used, option);
        used += strlen(option);
    }
    out->bind = (out->flags & MS_BIND) != 0;
    if (!out->bind) {
        int known = 0;
        for (const char *const *t = FS_TYPES; *t; t++)
            known |= strcmp(out->type, *t) == 0;
        if (!known)
            fail("config.json: mount type '%s' at %s is not supported by berth-launcher", out->type,
                 out->destination);
    } else if (out->source[0] != '/') {
        fail("config.json: the bind mount at %s has a source that is not an absolute path", out->destination);
    }
}

/* linux.seccomp: only berth's keyring rule (berth.runtime.spec._seccomp, berth.runtime.launcher):
 * everything allowed, add_key, keyctl and request_key refused with EPERM.  Any other profile is
 * refused here (berth gives it to runc).  Returns 1. */
static int keyring_rule(struct jval *v)
{
    static const char *const profile_keys[] = {"defaultAction", "architectures", "syscalls", NULL};
    static const char *const rule_keys[] = {"names", "action", "errnoRet", NULL};
    static const char *const names[] = {"add_key", "keyctl", "request_key"};
    const char *what = "config.json: linux.seccomp other than berth's keyring rule is not supported by berth-launcher";
    only_keys(v, "linux.seccomp", profile_keys);
    if (strcmp(want_string(jget(v, "defaultAction"), "linux.seccomp.defaultAction"), "SCMP_ACT_ALLOW") != 0)
        fail("%s", what);
    if (jget(v, "architectures"))
        (void)string_list(jget(v, "architectures"), "linux.seccomp.architectures");
    struct jval *rules = want_array(jget(v, "syscalls"), "linux.seccomp.syscalls");
    if (rules->count != 1)
        fail("%s", what);
    struct jval *rule = rules->items[0];
    only_keys(rule, "linux.seccomp.syscalls[]", rule_keys);
    if (strcmp(want_string(jget(rule, "action"), "linux.seccomp.syscalls[].action"), "SCMP_ACT_ERRNO") != 0
        || want_u64(jget(rule, "errnoRet"), "linux.seccomp.syscalls[].errnoRet") != EPERM)
        fail("%s", what);
    struct jval *list = want_array(jget(rule, "names"), "linux.seccomp.syscalls[].names");
    if (list->count != 3)
        fail("%s", what);
    int seen = 0;
    for (size_t i = 0; i < list->count; i++) {
        const char *name = want_string(list->items[i], "linux.seccomp.syscalls[].names");
        int known = 0;
        for (int k = 0; k < 3; k++)
            if (strcmp(name, names[k]) == 0) {
                known = 1;
                seen |= 1 << k;
            }
        if (!known)
            fail("%s", what);
    }
    if (seen != 7)
        fail("%s", what);
    return 1;
}

/* One architecture's part of the filter: when the call's arch is ARCH, EPERM for the numbers in
 * NRS and allow the rest; other archs skip the block. */
static size_t filter_arch(struct sock_filter *f, size_t n, uint32_t arch, const uint32_t *nrs, size_t count)
{
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, arch, 0, (unsigned char)(2 * count + 2));
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
    for (size_t i = 0; i < count; i++) {
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nrs[i], 0, 1);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA));
    }
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    return n;
}

/* The kernel keyring is not namespaced by uid: the container must not reach the caller's host
 * keyrings (issue 8, scenario 9).  Every ABI the machine runs is covered (a 32-bit or x32
 * program calls keyctl under another number); needs no_new_privs (set just before). */
static void deny_keyring(void)
{
    struct sock_filter f[64];
    size_t n = 0;
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
#if defined(__x86_64__)
    static const uint32_t native[] = {__NR_add_key, __NR_keyctl, __NR_request_key, 0x40000000U | __NR_add_key,
                                      0x40000000U | __NR_keyctl, 0x40000000U | __NR_request_key};
    static const uint32_t i386[] = {286, 288, 287};
    n = filter_arch(f, n, AUDIT_ARCH_X86_64, native, 6);
    n = filter_arch(f, n, AUDIT_ARCH_I386, i386, 3);
#elif defined(__aarch64__)
    static const uint32_t native[] = {__NR_add_key, __NR_keyctl, __NR_request_key};
    static const uint32_t arm[] = {309, 311, 310};
    n = filter_arch(f, n, AUDIT_ARCH_AARCH64, native, 3);
    n = filter_arch(f, n, AUDIT_ARCH_ARM, arm, 3);
#else
#error "berth-launcher: the keyring filter knows x86_64 and aarch64 only"
#endif
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    struct sock_fprog prog = {.len = (unsigned short)n, .filter = f};
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) != 0)
        fail("prctl(PR_SET_SECCOMP): %s", error_text(errno));
}

static void parse_config(struct jval *c, struct config *cfg, const char *bundle)
{
    static const char *const top[] = {"ociVersion", "process", "root", "mounts", "linux", "hostname",
                                      "annotations", "hooks", NULL};
    static const char *const process_keys[] = {"terminal", "user", "args", "env", "cwd", "capabilities",
                                               "noNewPrivileges", "rlimits", NULL};
    static const char *const user_keys[] = {"uid", "gid", NULL};
    static const char *const caps_keys[] = {"bounding", "effective", "permitted", "inheritable", "ambient", NULL};
    static const char *const root_keys[] = {"path", "readonly", NULL};
    static const char *const linux_keys[] = {"uidMappings", "gidMappings", "namespaces", "maskedPaths",
                                             "readonlyPaths", "seccomp", "resources", NULL};
    /* Device allow rules only (a run by root: runc's device cgroup); the launcher makes no
     * cgroup, so nothing filters the device nodes it binds. cpu/memory need runc. */
    static const char *const resources_keys[] = {"devices", NULL};
    static const char *const map_keys[] = {"containerID", "hostID", "size", NULL};
    static const char *const ns_keys[] = {"type", NULL};
    static const char *const rlimit_keys[] = {"type", "soft", "hard", NULL};

    only_keys(c, "config", top);
    const char *version = want_string(jget(c, "ociVersion"), "ociVersion");
    if (strncmp(version, "1.", 2) != 0)
        fail("config.json: ociVersion %s is not supported by berth-launcher", version);
    struct jval *hooks = jget(c, "hooks");
    if (hooks) {
        if (hooks->type != J_OBJ)
            fail("config.json: hooks must be an object");
        for (size_t i = 0; i < hooks->count; i++)
            if (hooks->items[i]->type != J_ARR || hooks->items[i]->count)
                fail("config.json: OCI hooks (hooks.%s) are not supported by berth-launcher (berth uses runc "
                     "for a configuration with hooks)", hooks->keys[i]);
    }
    struct jval *annotations = jget(c, "annotations");
    if (annotations) {
        if (annotations->type != J_OBJ)
            fail("config.json: annotations must be an object");
        for (size_t i = 0; i < annotations->count; i++)
            want_string(annotations->items[i], "annotations value");
    }

    struct jval *process = jget(c, "process");
    only_keys(process, "process", process_keys);
    if (want_bool(jget(process, "terminal"), "process.terminal", 0))
        fail("config.json: process.terminal true is not supported by berth-launcher (berth uses runc with -t)");
    struct jval *user = jget(process, "user");
    only_keys(user, "process.user", user_keys);
    cfg->uid = want_id(jget(user, "uid"), "process.user.uid");
    cfg->gid = want_id(jget(user, "gid"), "process.user.gid");
    cfg->args = string_list(jget(process, "args"), "process.args");
    if (!cfg->args[0] || !cfg->args[0][0])
        fail("config.json: process.args is empty");
    cfg->env = jget(process, "env") ? string_list(jget(process, "env"), "process.env") : xalloc(sizeof(char *));
    cfg->cwd = want_string(jget(process, "cwd"), "process.cwd");
    if (cfg->cwd[0] != '/')
        fail("config.json: process.cwd %s is not absolute", cfg->cwd);
    struct jval *caps = jget(process, "capabilities");
    if (caps) {
        only_keys(caps, "process.capabilities", caps_keys);
        cfg->bounding = capability_set(jget(caps, "bounding"), "process.capabilities.bounding");
        cfg->effective = capability_set(jget(caps, "effective"), "process.capabilities.effective");
        cfg->permitted = capability_set(jget(caps, "permitted"), "process.capabilities.permitted");
        cfg->inheritable = capability_set(jget(caps, "inheritable"), "process.capabilities.inheritable");
        cfg->ambient = capability_set(jget(caps, "ambient"), "process.capabilities.ambient");
    }
    cfg->no_new_privileges = want_bool(jget(process, "noNewPrivileges"), "process.noNewPrivileges", 0);
    struct jval *rlimits = jget(process, "rlimits");
    if (rlimits) {
        want_array(rlimits, "process.rlimits");
        cfg->rlimits = xalloc(rlimits->count * sizeof *cfg->rlimits);
        for (size_t i = 0; i < rlimits->count; i++) {
            only_keys(rlimits->items[i], "process.rlimits[]", rlimit_keys);
            const char *type = want_string(jget(rlimits->items[i], "type"), "process.rlimits[].type");
            size_t r = 0;
            while (r < sizeof RLIMITS / sizeof *RLIMITS && strcmp(RLIMITS[r].name, type) != 0)
                r++;
            if (r == sizeof RLIMITS / sizeof *RLIMITS)
                fail("config.json: unknown rlimit %s", type);
            cfg->rlimits[i].resource = RLIMITS[r].resource;
            cfg->rlimits[i].limit.rlim_cur = want_u64(jget(rlimits->items[i], "soft"), "process.rlimits[].soft");
            cfg->rlimits[i].limit.rlim_max = want_u64(jget(rlimits->items[i], "hard"), "process.rlimits[].hard");
        }
        cfg->rlimit_count = rlimits->count;
    }

    struct jval *root = jget(c, "root");
    only_keys(root, "root", root_keys);
    const char *root_path = want_string(jget(root, "path"), "root.path");
    if (root_path[0] == '/') {
        cfg->root = root_path;
    } else {
        char *joined = xalloc(strlen(bundle) + strlen(root_path) + 2);
        sprintf(joined, "%s/%s", bundle, root_path);
        cfg->root = joined;
    }
    cfg->readonly_root = want_bool(jget(root, "readonly"), "root.readonly", 0);

    struct jval *mounts = jget(c, "mounts");
    if (mounts) {
        want_array(mounts, "mounts");
        cfg->mounts = xalloc(mounts->count * sizeof *cfg->mounts);
        for (size_t i = 0; i < mounts->count; i++)
            parse_mount(mounts->items[i], &cfg->mounts[i]);
        cfg->mount_count = mounts->count;
    }

    struct jval *lx = jget(c, "linux");
    only_keys(lx, "linux", linux_keys);
    struct jval *resources = jget(lx, "resources");
    if (resources) {
        only_keys(resources, "linux.resources", resources_keys);
        /* Full access only: a narrower rule (a CDI spec's "r") needs the device cgroup that
         * runc makes; berth sends such a config.json to runc (launcher.unsupported). */
        struct jval *rules = jget(resources, "devices");
        for (size_t i = 0; rules && i < rules->count; i++) {
            const char *access = want_string(jget(rules->items[i], "access"), "linux.resources.devices access");
            if (strcmp(access, "rw") != 0 && strcmp(access, "rwm") != 0)
                fail("config.json: a device rule allowing '%s' only needs a device cgroup, which berth-launcher "
                     "does not make (berth uses runc for it)", access);
        }
    }
    struct jval *maps[2] = {jget(lx, "uidMappings"), jget(lx, "gidMappings")};
    for (int k = 0; k < 2; k++) {
        const char *where = k ? "linux.gidMappings" : "linux.uidMappings";
        want_array(maps[k], where);
        if (maps[k]->count != 1)
            fail("config.json: %s must map exactly one id (the caller's): berth-launcher has no newuidmap", where);
        only_keys(maps[k]->items[0], where, map_keys);
        uint64_t container_id = want_id(jget(maps[k]->items[0], "containerID"), where);
        uint64_t host_id = want_u64(jget(maps[k]->items[0], "hostID"), where);
        if (want_u64(jget(maps[k]->items[0], "size"), where) != 1)
            fail("config.json: %s size must be 1", where);
        uint64_t own = k ? (uint64_t)getegid() : (uint64_t)geteuid();
        if (host_id != own)
            fail("config.json: %s maps host id %llu, which is not the caller's own (%llu)", where,
                 (unsigned long long)host_id, (unsigned long long)own);
        if (k) {
            cfg->container_gid = (unsigned)container_id;
            cfg->host_gid = (unsigned)host_id;
        } else {
            cfg->container_uid = (unsigned)container_id;
            cfg->host_uid = (unsigned)host_id;
        }
    }
    struct jval *namespaces = want_array(jget(lx, "namespaces"), "linux.namespaces");
    for (size_t i = 0; i < namespaces->count; i++) {
        only_keys(namespaces->items[i], "linux.namespaces[]", ns_keys);
        const char *type = want_string(jget(namespaces->items[i], "type"), "linux.namespaces[].type");
        int flag = strcmp(type, "user") == 0      ? CLONE_NEWUSER
                   : strcmp(type, "mount") == 0   ? CLONE_NEWNS
                   : strcmp(type, "pid") == 0     ? CLONE_NEWPID
                   : strcmp(type, "ipc") == 0     ? CLONE_NEWIPC
                   : strcmp(type, "uts") == 0     ? CLONE_NEWUTS
                   : strcmp(type, "network") == 0 ? CLONE_NEWNET
                   : strcmp(type, "cgroup") == 0  ? CLONE_NEWCGROUP
                                                  : 0;
        if (!flag)
            fail("config.json: namespace type '%s' is not supported by berth-launcher", type);
        if (cfg->clone_flags & flag)
            fail("config.json: namespace type '%s' given twice", type);
        cfg->clone_flags |= flag;
    }
    if (!(cfg->clone_flags & CLONE_NEWUSER) || !(cfg->clone_flags & CLONE_NEWNS))
        fail("config.json: berth-launcher needs new user and mount namespaces");
    cfg->masked = jget(lx, "maskedPaths") ? string_list(jget(lx, "maskedPaths"), "linux.maskedPaths")
                                          : xalloc(sizeof(char *));
    cfg->readonly = jget(lx, "readonlyPaths") ? string_list(jget(lx, "readonlyPaths"), "linux.readonlyPaths")
                                              : xalloc(sizeof(char *));
    if (jget(lx, "seccomp"))
        cfg->deny_keyring = keyring_rule(jget(lx, "seccomp"));
    if (cfg->deny_keyring && !cfg->no_new_privileges)  /* an unprivileged filter needs it */
        fail("config.json: linux.seccomp without process.noNewPrivileges is not supported by berth-launcher");
    if (jget(c, "hostname")) {
        cfg->hostname = want_string(jget(c, "hostname"), "hostname");
        if (!(cfg->clone_flags & CLONE_NEWUTS))
            fail("config.json: hostname is set but there is no new uts namespace");
    }
}

/* ------------------------------------------------------------------ inside the new namespaces */

static int openat2_in_root(int root_fd, const char *path, int flags)
{
    struct open_how how = {.flags = (uint64_t)(flags | O_CLOEXEC),
                           .resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS};
    return (int)syscall(SYS_openat2, root_fd, path, &how, sizeof how);
}

/* An O_PATH descriptor of ``path`` inside the root (links resolved in it), created when missing
 * (``kind``: 'd' a directory, 'f' an empty file, 0 do not create).  The missing components are
 * made from the top down, one at a time, in a heap copy of the path: a recursion with a PATH_MAX
 * buffer per level overflowed the container child's 256 KiB stack (static memory, no guard page)
 * at about 60 missing components. */
static int open_in_root(int root_fd, const char *path, char kind)
{
    int fd = openat2_in_root(root_fd, path, O_PATH);
    if (fd >= 0 || errno != ENOENT || !kind)
        return fd;
    size_t length = strlen(path);
    if (length >= PATH_MAX) {
        errno = ENAMETOOLONG;
        return -1;
    }
    char *walk = xalloc(length + 1);
    memcpy(walk, path, length + 1);
    while (length > 1 && walk[length - 1] == '/') /* trailing slashes */
        walk[--length] = 0;
    int parent_fd = openat2_in_root(root_fd, "/", O_PATH), saved_errno;
    char *end = walk;
    while (parent_fd >= 0) {
        while (*end == '/')
            end++;
        if (!*end)
            break;
        char *name = end;
        while (*end && *end != '/')
            end++;
        char separator = *end;
        *end = 0; /* walk is now the path down to and including name */
        fd = openat2_in_root(root_fd, walk, O_PATH);
        if (fd < 0 && errno == ENOENT) {
            if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0) {
                errno = EINVAL;
            } else {
                /* O_PATH descriptors work with *at: the new entry lands in the directory
                 * already resolved. */
                int made;
                if (separator || kind == 'd') {
                    made = mkdirat(parent_fd, name, 0755);
                } else {
                    made = openat(parent_fd, name, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0644);
                    if (made >= 0)
                        close(made), made = 0;
                }
                if (made == 0 || errno == EEXIST)
                    fd = openat2_in_root(root_fd, walk, O_PATH);
            }
        }
        saved_errno = errno;
        close(parent_fd);
        errno = saved_errno;
        parent_fd = fd;
        *end = separator;
    }
    free(walk);
    return parent_fd;
}

static void fd_path(char *out, size_t size, int fd)
{
    snprintf(out, size, "/proc/self/fd/%d", fd);
}

/* Mount flags the kernel locks on a mount that came from a more privileged namespace: a
 * remount must keep them (runc does the same, from statfs). */
static unsigned long locked_flags(const char *path)
{
    struct statvfs info;
    unsigned long flags = 0;
    if (statvfs(path, &info) != 0)
        return 0;
    if (info.f_flag & ST_RDONLY)
        flags |= MS_RDONLY;
    if (info.f_flag & ST_NOSUID)
        flags |= MS_NOSUID;
    if (info.f_flag & ST_NODEV)
        flags |= MS_NODEV;
    if (info.f_flag & ST_NOEXEC)
        flags |= MS_NOEXEC;
    return flags;
}

static void remount(const char *target, unsigned long flags, const char *destination)
{
    unsigned long all = MS_BIND | MS_REMOUNT | flags;
    if (mount(NULL, target, NULL, all, NULL) == 0)
        return;
    if (mount(NULL, target, NULL, all | locked_flags(target), NULL) != 0)
        fail("cannot remount %s: %s", destination, error_text(errno));
}

#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442 /* the same on every architecture */
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif

/* "rbind" with "ro", "nosuid", "nodev" or "noexec" (and a read-only path): the remount changes
 * the top of the bound tree only, and what the host has mounted below the source kept its own
 * flags -- writable under a read-only bind (runc 1.1 does the same unless given "rro").
 * mount_setattr(AT_RECURSIVE) (Linux 5.12) sets them on the whole tree; a kernel without it
 * (ENOSYS) leaves the mounts below as the host has them, as runc does. */
static void restrict_tree(int fd, unsigned long flags, const char *destination)
{
    struct {
        uint64_t attr_set, attr_clr, propagation, userns_fd;
    } attr = {0, 0, 0, 0};
    if (flags & MS_RDONLY)
        attr.attr_set |= 0x1; /* MOUNT_ATTR_RDONLY */
    if (flags & MS_NOSUID)
        attr.attr_set |= 0x2; /* MOUNT_ATTR_NOSUID */
    if (flags & MS_NODEV)
        attr.attr_set |= 0x4; /* MOUNT_ATTR_NODEV */
    if (flags & MS_NOEXEC)
        attr.attr_set |= 0x8; /* MOUNT_ATTR_NOEXEC */
    if (!attr.attr_set)
        return;
    if (syscall(SYS_mount_setattr, fd, "", AT_EMPTY_PATH | AT_RECURSIVE, &attr, sizeof attr) != 0 && errno != ENOSYS)
        fail("cannot apply the flags of %s to the mounts below it: %s", destination, error_text(errno));
}

static void mount_one(int root_fd, const struct mount_entry *m)
{
    char kind = 'd';
    if (m->bind) {
        struct stat info;
        if (stat(m->source, &info) != 0)
            fail("cannot mount %s at %s: %s", m->source, m->destination, error_text(errno));
        if (!S_ISDIR(info.st_mode))
            kind = 'f';
    }
    int fd = open_in_root(root_fd, m->destination, kind);
    if (fd < 0)
        fail("cannot create the mount point %s in the container: %s", m->destination, error_text(errno));
    char target[64];
    fd_path(target, sizeof target, fd);
    const unsigned long per_mount = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME |
                                    MS_RELATIME | MS_STRICTATIME;
    if (m->bind) {
        if (mount(m->source, target, NULL, m->flags & (MS_BIND | MS_REC), NULL) != 0)
            fail("cannot bind-mount %s at %s: %s", m->source, m->destination, error_text(errno));
        /* The flags apply at a remount of the new bind mount (a bind ignores them). Reopen the
         * destination: the descriptor names the covered directory, not the new mount. */
        close(fd);
        fd = open_in_root(root_fd, m->destination, 0);
        if (fd < 0)
            fail("cannot find the mount at %s: %s", m->destination, error_text(errno));
        fd_path(target, sizeof target, fd);
        if (m->flags & per_mount)
            remount(target, m->flags & per_mount, m->destination);
        if (m->flags & MS_REC)
            restrict_tree(fd, m->flags, m->destination);
    } else {
        if (mount(m->source[0] ? m->source : m->type, target, m->type, m->flags, m->data[0] ? m->data : NULL) != 0)
            fail("cannot mount %s at %s: %s", m->type, m->destination, error_text(errno));
    }
    if (m->propagation && mount(NULL, target, NULL, m->propagation, NULL) != 0)
        fail("cannot set the propagation of %s: %s", m->destination, error_text(errno));
    close(fd);
}

/* runc's rootless /dev: device nodes cannot be made without privilege, so the host's are
 * bind-mounted; then the ptmx and the /dev/fd, stdin, stdout, stderr, core links. */
static void populate_dev(int root_fd)
{
    static const char *const devices[] = {"null", "zero", "full", "random", "urandom", "tty"};
    for (size_t i = 0; i < sizeof devices / sizeof *devices; i++) {
        char host[64], inside[64], target[64];
        snprintf(host, sizeof host, "/dev/%s", devices[i]);
        snprintf(inside, sizeof inside, "/dev/%s", devices[i]);
        struct stat info;
        if (stat(host, &info) != 0)
            continue;
        int fd = open_in_root(root_fd, inside, 'f');
        if (fd < 0)
            fail("cannot create %s in the container: %s", inside, error_text(errno));
        fd_path(target, sizeof target, fd);
        if (mount(host, target, NULL, MS_BIND, NULL) != 0)
            fail("cannot bind-mount %s: %s", host, error_text(errno));
        close(fd);
    }
    int dev_fd = openat2_in_root(root_fd, "/dev", O_DIRECTORY | O_RDONLY);
    if (dev_fd < 0)
        fail("cannot open /dev in the container: %s", error_text(errno));
    static const char *const links[][2] = {
        {"pts/ptmx", "ptmx"}, {"/proc/self/fd", "fd"}, {"/proc/self/fd/0", "stdin"},
        {"/proc/self/fd/1", "stdout"}, {"/proc/self/fd/2", "stderr"},
    };
    unlinkat(dev_fd, "ptmx", 0);
    for (size_t i = 0; i < sizeof links / sizeof *links; i++)
        if (symlinkat(links[i][0], dev_fd, links[i][1]) != 0 && errno != EEXIST)
            fail("cannot create /dev/%s: %s", links[i][1], error_text(errno));
    if (access("/proc/kcore", F_OK) == 0)
        if (symlinkat("/proc/kcore", dev_fd, "core") != 0 && errno != EEXIST)
            fail("cannot create /dev/core: %s", error_text(errno));
    close(dev_fd);
}

static void pivot(const char *root)
{
    int old_root = open("/", O_DIRECTORY | O_RDONLY | O_CLOEXEC);
    int new_root = open(root, O_DIRECTORY | O_RDONLY | O_CLOEXEC);
    if (old_root < 0 || new_root < 0)
        fail("cannot open the root %s: %s", root, error_text(errno));
    if (fchdir(new_root) != 0)
        fail("cannot enter the root %s: %s", root, error_text(errno));
    if (syscall(SYS_pivot_root, ".", ".") != 0)
        fail("pivot_root into %s: %s", root, error_text(errno));
    if (fchdir(old_root) != 0)
        fail("cannot enter the old root: %s", error_text(errno));
    /* The old root must not propagate the unmount to the host (it is a slave already; this is
     * what runc does), then it goes. */
    if (mount(NULL, ".", NULL, MS_SLAVE | MS_REC, NULL) != 0)
        fail("cannot make the old root a slave: %s", error_text(errno));
    if (umount2(".", MNT_DETACH) != 0)
        fail("cannot detach the old root: %s", error_text(errno));
    if (chdir("/") != 0)
        fail("chdir /: %s", error_text(errno));
    close(old_root);
    close(new_root);
}

static void readonly_path(const char *path)
{
    if (mount(path, path, NULL, MS_BIND | MS_REC, NULL) != 0) {
        if (errno == ENOENT)
            return;
        fail("cannot make %s read-only: %s", path, error_text(errno));
    }
    /* The mount's own flags kept (runc: statfs flags), read-only added. */
    remount(path, MS_RDONLY | locked_flags(path), path);
    int fd = open(path, O_PATH | O_CLOEXEC);
    if (fd < 0)
        fail("cannot make %s read-only: %s", path, error_text(errno));
    restrict_tree(fd, MS_RDONLY, path);
    close(fd);
}

static void mask_path(const char *path)
{
    struct stat info;
    if (lstat(path, &info) != 0) {
        if (errno == ENOENT)
            return;
        fail("cannot mask %s: %s", path, error_text(errno));
    }
    int result = S_ISDIR(info.st_mode) ? mount("tmpfs", path, "tmpfs", MS_RDONLY, NULL)
                                       : mount("/dev/null", path, NULL, MS_BIND, NULL);
    if (result != 0 && errno != ENOENT)
        fail("cannot mask %s: %s", path, error_text(errno));
}

static void set_capabilities(const struct config *cfg)
{
    int last = (int)CAPABILITY_COUNT - 1;
    for (int cap = 0; cap <= 63; cap++) {
        if (cap <= last && (cfg->bounding >> cap) & 1)
            continue;
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EINVAL)
            fail("cannot drop capability %d from the bounding set: %s", cap, error_text(errno));
    }
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    for (int i = 0; i < 2; i++) {
        data[i].effective = (uint32_t)(cfg->effective >> (32 * i));
        data[i].permitted = (uint32_t)(cfg->permitted >> (32 * i));
        data[i].inheritable = (uint32_t)(cfg->inheritable >> (32 * i));
    }
    if (syscall(SYS_capset, &header, data) != 0)
        fail("cannot set the capabilities: %s", error_text(errno));
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    for (int cap = 0; cap <= last; cap++)
        if ((cfg->ambient >> cap) & 1 && prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0) != 0)
            fail("cannot raise ambient capability %s: %s", CAPABILITIES[cap], error_text(errno));
}

/* Every descriptor from ``first`` on close-on-exec.  close_range(CLOSE_RANGE_CLOEXEC) needs Linux
 * 5.11; where it fails (5.10 refuses the flag with EINVAL) the descriptors are marked one by one
 * from /proc/self/fd, and if that cannot be read either the container does not start: an
 * unchecked failure let every descriptor the launcher inherited reach the container. */
static void cloexec_from(int first)
{
    if (syscall(SYS_close_range, (unsigned)first, ~0U, CLOSE_RANGE_CLOEXEC) == 0)
        return;
    int dir_fd = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *dir = dir_fd < 0 ? NULL : fdopendir(dir_fd);
    if (!dir)
        fail("cannot mark descriptors close-on-exec: close_range and /proc/self/fd: %s", error_text(errno));
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        char *end;
        long fd = strtol(entry->d_name, &end, 10);
        if (*end || end == entry->d_name || fd < first || fd == dir_fd)
            continue;
        int flags = fcntl((int)fd, F_GETFD);
        if (flags >= 0 && fcntl((int)fd, F_SETFD, flags | FD_CLOEXEC) != 0)
            fail("cannot mark descriptor %ld close-on-exec: %s", fd, error_text(errno));
    }
    closedir(dir);
}

/* The process's user and capabilities, no_new_privs, descriptors: the last steps before exec,
 * shared by run and exec. */
static void become_process(const struct config *cfg)
{
    if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0)
        fail("prctl(PR_SET_KEEPCAPS): %s", error_text(errno));
    if (setresgid(cfg->gid, cfg->gid, cfg->gid) != 0)
        fail("cannot set gid %u: %s", cfg->gid, error_text(errno));
    if (setresuid(cfg->uid, cfg->uid, cfg->uid) != 0)
        fail("cannot set uid %u: %s", cfg->uid, error_text(errno));
    prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0);
    set_capabilities(cfg);
    if (cfg->no_new_privileges && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        fail("prctl(PR_SET_NO_NEW_PRIVS): %s", error_text(errno));
    if (cfg->deny_keyring)
        deny_keyring();
    /* Only stdio, the --preserve-fds ones (and the error pipe, close-on-exec) reach the
     * container, as with runc. */
    cloexec_from(3 + (int)preserve_fds);
}

static void enter_cwd(const char *cwd)
{
    if (chdir(cwd) == 0)
        return;
    fail("chdir to cwd (\"%s\") set in config.json failed: %s", cwd, error_text(errno));
}

static const char *env_value(char **env, const char *name)
{
    size_t len = strlen(name);
    for (char **e = env; *e; e++)
        if (strncmp(*e, name, len) == 0 && (*e)[len] == '=')
            return *e + len + 1;
    return NULL;
}

/* execve with args[0] looked up in the container's PATH when it has no slash (as runc does). */
static void exec_process(char **args, char **env, const sigset_t *mask)
{
    char found[PATH_MAX];
    const char *program = args[0];
    if (!strchr(program, '/')) {
        const char *path = env_value(env, "PATH");
        program = NULL;
        for (const char *dir = path; dir && *dir && !program;) {
            const char *colon = strchr(dir, ':');
            size_t len = colon ? (size_t)(colon - dir) : strlen(dir);
            snprintf(found, sizeof found, "%.*s/%s", (int)len, len ? dir : ".", args[0]);
            struct stat info; /* a directory is passed over, as Go's exec.LookPath (runc) does */
            if (access(found, X_OK) == 0 && stat(found, &info) == 0 && !S_ISDIR(info.st_mode))
                program = found;
            dir = colon ? colon + 1 : NULL;
        }
        if (!program)
            fail("exec: \"%s\": executable file not found in $PATH", args[0]);
    }
    sigprocmask(SIG_SETMASK, mask, NULL);
    execve(program, args, env);
    fail("exec %s: %s", program, error_text(errno));
}

/* The process's rlimits, for run and exec alike (runc applies config.json's to both).
 * runc (Go >= 1.19) raises its RLIMIT_NOFILE soft limit to the hard one, and its container's
 * and exec'd processes inherit that: the same here, so that both runtimes give every process of
 * a container the same limits (OpenMPI ranks joining a node's container had 1024 descriptors
 * under berth-launcher's exec, 20000 under runc's). */
static void apply_limits(const struct config *cfg)
{
    struct rlimit files;
    if (getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
        files.rlim_cur = files.rlim_max;
        setrlimit(RLIMIT_NOFILE, &files);
    }
    for (size_t i = 0; i < cfg->rlimit_count; i++)
        if (setrlimit(cfg->rlimits[i].resource, &cfg->rlimits[i].limit) != 0)
            fail("cannot set rlimit %d: %s", cfg->rlimits[i].resource, error_text(errno));
}

/* A new network namespace starts with its loopback down: bring it up, as runc does for a new
 * network namespace (its "loopback" network), so that 127.0.0.1 works in --network none. */
static void loopback_up(void)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq request;
    memset(&request, 0, sizeof request);
    strcpy(request.ifr_name, "lo");
    if (fd < 0 || ioctl(fd, SIOCGIFFLAGS, &request) != 0)
        fail("cannot find the loopback interface: %s", error_text(errno));
    request.ifr_flags |= IFF_UP;
    if (ioctl(fd, SIOCSIFFLAGS, &request) != 0)
        fail("cannot bring the loopback interface up: %s", error_text(errno));
    close(fd);
}

struct child_arguments {
    const struct config *cfg;
    int sync_read, sync_write, error_write;
    sigset_t mask;
};

static int container_main(void *raw)
{
    struct child_arguments *a = raw;
    const struct config *cfg = a->cfg;
    error_pipe = a->error_write;
    /* A launcher that dies before the command runs takes its container with it.  A death
     * before this prctl is seen on the sync pipe: the child closes its own copy of the write
     * end (clone copied it), so only the launcher holds one, and it keeps it open until the
     * container runs -- no "go" and EOF, or a hang-up after the "go", mean it is gone.  (The
     * copy held here made that read wait forever, in the container's namespaces.) */
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    close(a->sync_write);
    char go;
    if (read(a->sync_read, &go, 1) != 1)
        _exit(1); /* the launcher failed to write our id maps, or died: it reports */
    struct pollfd launcher = {a->sync_read, 0, 0};
    if (poll(&launcher, 1, 0) != 0 && (launcher.revents & POLLHUP))
        _exit(1); /* it wrote "go" and died before the prctl took effect */
    close(a->sync_read);

    /* Its own session, as runc's init (nsexec) makes it: the container does not share the
     * launcher's session, and its process group and session are 1 inside. */
    if (setsid() < 0)
        fail("setsid: %s", error_text(errno));
    if (cfg->clone_flags & CLONE_NEWNET)
        loopback_up();
    if (cfg->hostname && sethostname(cfg->hostname, strlen(cfg->hostname)) != 0)
        fail("sethostname: %s", error_text(errno));
    /* runc's default root propagation: host mounts keep propagating in, nothing goes out. */
    if (mount(NULL, "/", NULL, MS_SLAVE | MS_REC, NULL) != 0)
        fail("cannot make / a slave mount: %s", error_text(errno));
    if (mount(cfg->root, cfg->root, NULL, MS_BIND | MS_REC, NULL) != 0)
        fail("cannot bind-mount the root %s: %s", cfg->root, error_text(errno));
    int root_fd = open(cfg->root, O_DIRECTORY | O_PATH | O_CLOEXEC);
    if (root_fd < 0)
        fail("cannot open the root %s: %s", cfg->root, error_text(errno));
    int dev_tmpfs = 0;
    for (size_t i = 0; i < cfg->mount_count; i++) {
        mount_one(root_fd, &cfg->mounts[i]);
        if (strcmp(cfg->mounts[i].destination, "/dev") == 0)
            dev_tmpfs = !cfg->mounts[i].bind;
        if (strcmp(cfg->mounts[i].destination, "/") == 0) {
            /* A mount on the root itself (berth's kernel overlay of an unpacked image): the later
             * destinations are looked up in it, not in the directory it covers. */
            close(root_fd);
            root_fd = open(cfg->root, O_DIRECTORY | O_PATH | O_CLOEXEC);
            if (root_fd < 0)
                fail("cannot open the root %s: %s", cfg->root, error_text(errno));
        }
    }
    if (dev_tmpfs) /* a /dev of the container's own: runc's default devices in it */
        populate_dev(root_fd);
    close(root_fd);
    pivot(cfg->root);
    for (char **p = cfg->readonly; *p; p++)
        readonly_path(*p);
    for (char **p = cfg->masked; *p; p++)
        mask_path(*p);
    if (cfg->readonly_root)
        remount("/", MS_RDONLY, "the root");
    umask(022);
    apply_limits(cfg);
    enter_cwd(cfg->cwd);
    become_process(cfg);
    exec_process(cfg->args, cfg->env, &a->mask);
    return 1;
}

/* ------------------------------------------------------------------ the container's state */

struct state {
    long pid;
    unsigned long long start_time;
    char bundle[PATH_MAX];
};

static const char *root_dir = "/run/user/berth-launcher";

static void state_path(char *out, size_t size, const char *id, const char *file)
{
    snprintf(out, size, "%s/%s%s%s", root_dir, id, file ? "/" : "", file ? file : "");
}

/* runc's rule (letters, digits, _ + - .): the id is written into state.json unescaped, and a
 * quote or backslash there made a state file that no later kill, state or delete could read. */
static void check_id(const char *id)
{
    int valid = *id && strlen(id) <= 128 && strcmp(id, ".") != 0 && strcmp(id, "..") != 0;
    for (const char *c = id; valid && *c; c++)
        valid = isalnum((unsigned char)*c) || strchr("_+-.", *c) != NULL;
    if (!valid)
        fail("invalid container id '%s': letters, digits, '_', '+', '-' and '.' only", id);
}

/* Field 22 of /proc/PID/stat: tells a live process from a later one with the same pid.  0 when
 * there is no such process, or (``live``) when it is a zombie: dead, not yet reaped, which runc
 * calls "stopped" too. */
static unsigned long long process_start_time(long pid, int live)
{
    char path[64], text[1024];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0)
        return 0;
    text[n] = 0;
    char *p = strrchr(text, ')');
    if (!p)
        return 0;
    /* after ")": field 3 (state) onwards; start time is field 22 */
    if (p[1] != ' ' || (live && strchr("ZXx", p[2])))
        return 0;
    int field = 2;
    for (; *p && field < 22; p++)
        if (*p == ' ')
            field++;
    return strtoull(p, NULL, 10);
}

/* A number of a state file: decimal digits only, from 1 to ``max``.  Read with strtol, a pid of
 * 2^32 + N became N when cast to pid_t (and 2^32 - 1 became -1: kill(-1) signals every process
 * of the user), and a start time of 0 matched the 0 that process_start_time gives for a pid
 * that does not exist: "kill" signalled a process that was never the container's. */
static int state_number(struct jval *v, unsigned long long max, unsigned long long *out)
{
    if (!v || v->type != J_NUM || !isdigit((unsigned char)v->text[0]))
        return -1;
    char *end;
    errno = 0;
    *out = strtoull(v->text, &end, 10);
    return errno || *end || *out < 1 || *out > max ? -1 : 0;
}

static int read_state(const char *id, struct state *st)
{
    char path[PATH_MAX];
    state_path(path, sizeof path, id, "state.json");
    if (access(path, F_OK) != 0)
        return -1;
    struct jval *v = parse_json_file(path, path);
    struct jval *bundle = jget(v, "bundle");
    unsigned long long pid, start_time;
    if (state_number(jget(v, "pid"), INT_MAX, &pid) != 0
        || state_number(jget(v, "start_time"), ULLONG_MAX, &start_time) != 0 || !bundle || bundle->type != J_STR)
        fail("%s is not a berth-launcher state file", path);
    st->pid = (long)pid;
    st->start_time = start_time;
    snprintf(st->bundle, sizeof st->bundle, "%s", bundle->text);
    return 0;
}

static int state_running(const struct state *st)
{
    unsigned long long now = process_start_time(st->pid, 1);
    return now != 0 && now == st->start_time;
}

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434 /* the same number on every architecture but alpha (Linux 5.3) */
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424 /* Linux 5.1 */
#endif

/* Send ``sig`` to the container's init when it is still the process the state file names.
 * The start time is checked through a pidfd opened first: kill() by pid after the check could
 * reach another process that took the pid in between (the init died and was reaped, and the
 * pid came round again); a pidfd keeps naming the process it was opened on, and signalling
 * one that died fails with ESRCH.  Kernels before 5.3 (no pidfd_open) keep the check + kill().
 * 0 when sent; -1 when the container is not running. */
static int signal_container(const struct state *st, int sig)
{
    int pidfd = (int)syscall(SYS_pidfd_open, (pid_t)st->pid, 0);
    if (pidfd < 0 && errno != ENOSYS)
        return -1; /* ESRCH: no such process */
    int sent = -1;
    if (state_running(st))
        sent = pidfd >= 0 ? (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0) : kill((pid_t)st->pid, sig);
    if (pidfd >= 0)
        close(pidfd);
    return sent;
}

static void write_state(const char *id, long pid, const char *bundle)
{
    char path[PATH_MAX], temporary[PATH_MAX];
    state_path(path, sizeof path, id, "state.json");
    state_path(temporary, sizeof temporary, id, "state.json.tmp");
    /* Created here, never opened: ROOT/ID is new (run made it), so anything already at that
     * name was planted, by a container that reaches berth's state directory, say -- a link
     * there had the state written into the file it names. */
    int fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    FILE *f = fd < 0 ? NULL : fdopen(fd, "w");
    if (!f)
        fail("cannot write %s: %s", temporary, error_text(errno));
    fprintf(f, "{\"ociVersion\":\"1.0.2\",\"id\":\"%s\",\"pid\":%ld,\"start_time\":%llu,\"bundle\":\"", id, pid,
            process_start_time(pid, 0)); /* our child: a zombie at worst, never gone */
    for (const char *c = bundle; *c; c++) {
        if (*c == '"' || *c == '\\')
            fputc('\\', f);
        if ((unsigned char)*c < 0x20)
            fprintf(f, "\\u%04x", *c);
        else
            fputc(*c, f);
    }
    fputs("\"}\n", f);
    if (fclose(f) != 0 || rename(temporary, path) != 0)
        fail("cannot write %s: %s", path, error_text(errno));
}

static void remove_state(const char *id)
{
    char path[PATH_MAX];
    state_path(path, sizeof path, id, "state.json");
    unlink(path);
    state_path(path, sizeof path, id, "state.json.tmp");
    unlink(path);
    state_path(path, sizeof path, id, NULL);
    rmdir(path);
}

/* ------------------------------------------------------------------ commands */

static int status_of(int wait_status)
{
    if (WIFSIGNALED(wait_status))
        return 128 + WTERMSIG(wait_status);
    return WEXITSTATUS(wait_status);
}

/* /proc/PID/status into ``text`` (NUL-terminated): 0, or -1 when it cannot be read (gone). */
static int read_status(long pid, char *text, size_t size)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%ld/status", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, text, size - 1);
    close(fd);
    if (n <= 0)
        return -1;
    text[n] = 0;
    return 0;
}

/* The number of the line "NAME:\tVALUE" of a /proc/PID/status text, in ``base``: 0, or -1 when
 * there is no such line. */
static int status_number(const char *text, const char *name, int base, unsigned long long *value)
{
    char key[32];
    snprintf(key, sizeof key, "\n%s:", name);
    const char *line = strstr(text, key);
    if (!line)
        return -1;
    *value = strtoull(line + strlen(key), NULL, base);
    return 0;
}

/* Whether ``pid`` blocks or catches ``sig`` (/proc/PID/status SigBlk, SigCgt); also 1 when it
 * cannot be told (gone, or no such lines): then there is nothing to wait for.  (A process in
 * sigtimedwait shows its waited-for signals unblocked: berth-init catches them too.) */
static int takes_signal(pid_t pid, int sig)
{
    char text[4096];
    unsigned long long blocked, caught;
    if (read_status(pid, text, sizeof text) != 0 || status_number(text, "SigBlk", 16, &blocked) != 0
        || status_number(text, "SigCgt", 16, &caught) != 0)
        return 1;
    return ((blocked | caught) >> (sig - 1)) & 1;
}

/* A pid namespace's init gets no signal that it leaves at SIG_DFL: the kernel drops it, even
 * from the launcher.  berth-init catches and blocks every signal as soon as it runs, but a
 * signal forwarded in the moment between its execve and that was lost -- and a SIGTERM that
 * reached the launcher while it set the container up is forwarded exactly then: the container
 * ran on until berth's stop timeout killed it.  So the first signal waits (at most 2 s, once)
 * until the init blocks or catches it; one it never takes would have been dropped all the same. */
static void wait_until_init_takes(pid_t child, int sig)
{
    static int waited;
    if (waited || sig == SIGKILL || sig == SIGSTOP)
        return;
    waited = 1;
    for (int i = 0; i < 2000 && !takes_signal(child, sig) && process_start_time(child, 1); i++)
        nanosleep(&(struct timespec){0, 1000000}, NULL);
}

/* Forward every signal to ``child`` until it ends (runc run's behaviour); its status.
 * ``namespace_init``: the child is the init of a pid namespace of its own. */
static int forward_until_exit(pid_t child, const sigset_t *all, int namespace_init)
{
    for (;;) {
        siginfo_t info;
        int sig = sigwaitinfo(all, &info);
        if (sig < 0)
            continue;
        if (sig != SIGCHLD) {
            if (sig != SIGURG && sig != SIGWINCH) {
                if (namespace_init)
                    wait_until_init_takes(child, sig);
                kill(child, sig);
            }
            continue;
        }
        int st;
        pid_t pid;
        while ((pid = waitpid(-1, &st, WNOHANG)) > 0)
            if (pid == child)
                return status_of(st);
    }
}

static void write_id_map(pid_t pid, const char *file, const char *text)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/%s", (int)pid, file);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
        fail("cannot write %s: %s", path, error_text(errno));
    close(fd);
}

static char child_stack[256 * 1024] __attribute__((aligned(16)));

static int command_run(const char *bundle, const char *id)
{
    check_id(id);
    char config_path[PATH_MAX];
    snprintf(config_path, sizeof config_path, "%s/config.json", bundle);
    struct config cfg;
    memset(&cfg, 0, sizeof cfg);
    parse_config(parse_json_file(config_path, "config.json"), &cfg, bundle);

    if (mkdir(root_dir, 0700) != 0 && errno != EEXIST)
        fail("cannot create %s: %s", root_dir, error_text(errno));
    char dir[PATH_MAX];
    state_path(dir, sizeof dir, id, NULL);
    if (mkdir(dir, 0700) != 0) {
        if (errno == EEXIST)
            fail("container with id exists: %s", id);
        fail("cannot create the state of %s: %s", id, error_text(errno));
    }
    cleanup_id = id;

    int sync_pipe[2], err_pipe[2];
    if (pipe2(sync_pipe, O_CLOEXEC) != 0 || pipe2(err_pipe, O_CLOEXEC) != 0)
        fail("pipe: %s", error_text(errno));
    struct child_arguments a = {&cfg, sync_pipe[0], sync_pipe[1], err_pipe[1], {{0}}};
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &a.mask);
    pid_t child = clone(container_main, child_stack + sizeof child_stack, cfg.clone_flags | SIGCHLD, &a);
    if (child < 0)
        fail("cannot create the container's namespaces (clone): %s", error_text(errno));
    cleanup_child = child;
    close(sync_pipe[0]);
    close(err_pipe[1]);
    char map[64];
    write_id_map(child, "setgroups", "deny");
    snprintf(map, sizeof map, "%u %u 1\n", cfg.container_uid, cfg.host_uid);
    write_id_map(child, "uid_map", map);
    snprintf(map, sizeof map, "%u %u 1\n", cfg.container_gid, cfg.host_gid);
    write_id_map(child, "gid_map", map);
    if (write(sync_pipe[1], "g", 1) != 1)
        fail("cannot start the container: %s", error_text(errno));
    /* sync_pipe[1] stays open until the container runs: the child's sign that we live. */

    char message[4096];
    size_t got = 0;
    for (;;) {
        ssize_t n = read(err_pipe[0], message + got, sizeof message - 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0 || (got += (size_t)n) >= sizeof message - 1)
            break;
    }
    close(err_pipe[0]);
    close(sync_pipe[1]);
    if (got) { /* the container failed before its process started */
        message[got] = 0;
        fail("%s", message);
    }
    /* Only now does the container count as running (runc's "running" comes after its start,
     * too): `berth exec` and a node's tasks (berth.runtime.nodescope) join it from this moment,
     * when its mounts are all made. */
    write_state(id, child, bundle);
    cleanup_child = -1; /* from now on its status is the launcher's */
    int status = forward_until_exit(child, &all, (cfg.clone_flags & CLONE_NEWPID) != 0);
    remove_state(id);
    return status;
}

static int signal_number(const char *name)
{
    static const struct {
        const char *name;
        int number;
    } names[] = {{"HUP", SIGHUP}, {"INT", SIGINT}, {"QUIT", SIGQUIT}, {"KILL", SIGKILL}, {"USR1", SIGUSR1},
                 {"USR2", SIGUSR2}, {"TERM", SIGTERM}, {"CONT", SIGCONT}, {"STOP", SIGSTOP}, {"ALRM", SIGALRM}};
    if (strncmp(name, "SIG", 3) == 0)
        name += 3;
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (strcmp(names[i].name, name) == 0)
            return names[i].number;
    char *end;
    long number = strtol(name, &end, 10);
    if (*name && !*end && number > 0 && number < NSIG)
        return (int)number;
    fail("unknown signal '%s'", name);
}

static int command_kill(const char *id, const char *sig_name)
{
    check_id(id);
    int sig = signal_number(sig_name);
    struct state st;
    if (read_state(id, &st) != 0)
        fail("container does not exist: %s", id);
    if (signal_container(&st, sig) != 0)
        fail("container not running: %s", id);
    return 0;
}

static int command_delete(const char *id, int force)
{
    check_id(id);
    struct state st;
    if (read_state(id, &st) != 0)
        fail("container does not exist: %s", id);
    if (state_running(&st)) {
        if (!force)
            fail("cannot delete container %s that is not stopped: running", id);
        signal_container(&st, SIGKILL);
        /* It is not our child: wait until its pid is gone (a pid namespace's init takes all
         * of the namespace with it). */
        for (int i = 0; i < 1000 && state_running(&st); i++)
            usleep(2000);
    }
    remove_state(id);
    return 0;
}

static int command_state(const char *id)
{
    check_id(id);
    struct state st;
    if (read_state(id, &st) != 0)
        fail("container does not exist: %s", id);
    int running = state_running(&st);
    printf("{\"ociVersion\":\"1.0.2\",\"id\":\"%s\",\"pid\":%ld,\"status\":\"%s\"}\n", id, running ? st.pid : 0,
           running ? "running" : "stopped");
    return 0;
}

/* Join the container's namespaces (user first: it grants the rights for the others) and run
 * ``args`` there as the container's process user, with its capabilities and environment. */
/* exec --tty: a new terminal from the container's own devpts instance for the process, and the
 * launcher copying between it and its stdin/stdout (the caller's terminal, put in raw mode)
 * until the process ends, the window size following SIGWINCH: what runc exec --tty does. */
static struct termios saved_terminal;
static int terminal_saved;

static void restore_terminal(void)
{
    if (terminal_saved)
        tcsetattr(STDIN_FILENO, TCSANOW, &saved_terminal);
}

static int open_terminal(int *peer)
{
    int master = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
    int unlock = 0;
    if (master < 0 || ioctl(master, TIOCSPTLCK, &unlock) != 0)
        fail("cannot open a terminal in the container (/dev/ptmx): %s", error_text(errno));
    *peer = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY);
    if (*peer < 0)
        fail("cannot open the terminal's peer: %s", error_text(errno));
    struct winsize size;
    if (ioctl(STDIN_FILENO, TIOCGWINSZ, &size) == 0)
        ioctl(master, TIOCSWINSZ, &size);
    return master;
}

static int copy_terminal(int master, pid_t child, const sigset_t *all)
{
    int signals = signalfd(-1, all, SFD_CLOEXEC);
    if (signals < 0)
        fail("signalfd: %s", error_text(errno));
    if (isatty(STDIN_FILENO) && tcgetattr(STDIN_FILENO, &saved_terminal) == 0) {
        struct termios raw = saved_terminal;
        cfmakeraw(&raw);
        terminal_saved = tcsetattr(STDIN_FILENO, TCSANOW, &raw) == 0;
    }
    int status = -1, input_open = 1, output_open = 1;
    char buffer[16384];
    while (status < 0 || output_open) {
        struct pollfd fds[3] = {{signals, POLLIN, 0}, {master, POLLIN, 0}, {STDIN_FILENO, POLLIN, 0}};
        if (!output_open)
            fds[1].fd = -1;
        if (!input_open)
            fds[2].fd = -1;
        /* Once the process has ended, drain what it wrote, without waiting for more. */
        if (poll(fds, 3, status >= 0 ? 0 : -1) <= 0) {
            if (status >= 0)
                break;
            continue;
        }
        if (fds[0].revents & POLLIN) {
            struct signalfd_siginfo info;
            if (read(signals, &info, sizeof info) == sizeof info) {
                int sig = (int)info.ssi_signo;
                struct winsize size;
                if (sig == SIGWINCH) {
                    if (ioctl(STDIN_FILENO, TIOCGWINSZ, &size) == 0)
                        ioctl(master, TIOCSWINSZ, &size);
                } else if (sig != SIGCHLD && sig != SIGURG) {
                    kill(child, sig);
                }
            }
            int st;
            if (status < 0 && waitpid(child, &st, WNOHANG) == child)
                status = status_of(st);
        }
        if (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = read(master, buffer, sizeof buffer);
            if (n <= 0)
                output_open = 0;
            else if (write(STDOUT_FILENO, buffer, (size_t)n) < 0)
                output_open = 0;
        }
        if (fds[2].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = read(STDIN_FILENO, buffer, sizeof buffer);
            if (n <= 0)
                input_open = 0;
            else if (write(master, buffer, (size_t)n) < 0)
                input_open = 0;
        }
    }
    if (status < 0) {
        int st;
        waitpid(child, &st, 0);
        status = status_of(st);
    }
    restore_terminal();
    return status;
}

static int command_exec(const char *id, const char *cwd, char **extra_env, size_t extra_count, char **args,
                        int terminal)
{
    check_id(id);
    struct state st;
    if (read_state(id, &st) != 0 || !state_running(&st))
        fail("container not running: %s", id);
    char config_path[PATH_MAX + 16];
    snprintf(config_path, sizeof config_path, "%s/config.json", st.bundle);
    struct config cfg;
    memset(&cfg, 0, sizeof cfg);
    parse_config(parse_json_file(config_path, "config.json"), &cfg, st.bundle);
    static const struct {
        const char *name;
        int flag;
    } kinds[] = {{"user", CLONE_NEWUSER}, {"ipc", CLONE_NEWIPC}, {"uts", CLONE_NEWUTS}, {"net", CLONE_NEWNET},
                 {"cgroup", CLONE_NEWCGROUP}, {"pid", CLONE_NEWPID}, {"mnt", CLONE_NEWNS}};
    /* The bundle lies outside --root, where a container that can reach berth's state directory
     * (a -v of a directory above it) can rewrite its config.json: one without the network
     * namespace or the keyring rule put the exec'd process on the host's network, or let it
     * read the host user's keys.  So the exec'd process also joins every other namespace in
     * which the container's init is not where the launcher is and that it may enter (the
     * container's own are its user namespace's; one the init got from where its launcher ran,
     * a node's network namespace say, is left as before), and gets no_new_privs and the keyring
     * rule when the init has them (the launcher gives no other seccomp profile). */
    int fds[7];
    char path[64], own[64];
    for (int i = 0; i < 7; i++) {
        snprintf(path, sizeof path, "/proc/%ld/ns/%s", st.pid, kinds[i].name);
        fds[i] = open(path, O_RDONLY | O_CLOEXEC);
        if (fds[i] < 0) {
            if (errno == ENOENT && !(cfg.clone_flags & kinds[i].flag)) /* a kernel without that kind */
                continue;
            fail("cannot open %s: %s", path, error_text(errno));
        }
        snprintf(own, sizeof own, "/proc/self/ns/%s", kinds[i].name);
        struct stat theirs, ours;
        if (fstat(fds[i], &theirs) != 0 || stat(own, &ours) != 0)
            fail("cannot compare the container's %s namespace with the launcher's: %s", kinds[i].name,
                 error_text(errno));
        if (theirs.st_dev == ours.st_dev && theirs.st_ino == ours.st_ino) {
            close(fds[i]);
            fds[i] = -1;
        }
    }
    char status[4096];
    unsigned long long init_seccomp = 0, init_no_new_privileges = 0;
    if (read_status(st.pid, status, sizeof status) != 0)
        fail("container not running: %s", id);
    status_number(status, "Seccomp", 10, &init_seccomp);
    status_number(status, "NoNewPrivs", 10, &init_no_new_privileges);
    snprintf(path, sizeof path, "/proc/%ld/root", st.pid);
    int root_fd = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root_fd < 0 || !state_running(&st)) /* the pid still the container's after the opens */
        fail("container not running: %s", id);
    if (init_seccomp)
        cfg.deny_keyring = 1;
    if (init_seccomp || init_no_new_privileges)
        cfg.no_new_privileges = 1;
    for (int i = 0; i < 7; i++)
        if (fds[i] >= 0 && setns(fds[i], kinds[i].flag) != 0 && (cfg.clone_flags & kinds[i].flag))
            fail("cannot join the container's %s namespace: %s", kinds[i].name, error_text(errno));
    if (fchdir(root_fd) != 0 || chroot(".") != 0)
        fail("cannot enter the container's root: %s", error_text(errno));

    /* The environment: the container's, then --env entries replacing those of the same name. */
    size_t n = 0;
    while (cfg.env[n])
        n++;
    char **env = xalloc((n + extra_count + 1) * sizeof *env);
    size_t count = 0;
    for (size_t i = 0; i < n; i++) {
        int replaced = 0;
        for (size_t j = 0; j < extra_count; j++) {
            size_t len = strcspn(extra_env[j], "=");
            replaced |= strncmp(cfg.env[i], extra_env[j], len) == 0 && cfg.env[i][len] == '=';
        }
        if (!replaced)
            env[count++] = cfg.env[i];
    }
    for (size_t j = 0; j < extra_count; j++)
        env[count++] = extra_env[j];

    sigset_t all, old;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &old);
    int err_pipe[2];
    if (pipe2(err_pipe, O_CLOEXEC) != 0)
        fail("pipe: %s", error_text(errno));
    int master = -1, peer = -1;
    if (terminal)
        master = open_terminal(&peer);
    pid_t child = fork(); /* after setns(pid): the child is in the container's pid namespace */
    if (child < 0)
        fail("fork: %s", error_text(errno));
    if (child == 0) {
        close(err_pipe[0]);
        error_pipe = err_pipe[1];
        prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
        if (setsid() < 0) /* as runc exec's process: a session of its own */
            fail("setsid: %s", error_text(errno));
        if (terminal) {
            if (ioctl(peer, TIOCSCTTY, 0) != 0)
                fail("cannot make the terminal the process's own: %s", error_text(errno));
            for (int fd = 0; fd < 3; fd++)
                if (dup2(peer, fd) < 0)
                    fail("dup2: %s", error_text(errno));
        }
        apply_limits(&cfg);
        enter_cwd(cwd ? cwd : cfg.cwd);
        become_process(&cfg);
        exec_process(args, env, &old);
    }
    close(err_pipe[1]);
    char message[4096];
    ssize_t got = read(err_pipe[0], message, sizeof message - 1);
    close(err_pipe[0]);
    if (got > 0) {
        message[got] = 0;
        waitpid(child, NULL, 0);
        fail("%s", message);
    }
    if (terminal) {
        close(peer);
        return copy_terminal(master, child, &all);
    }
    return forward_until_exit(child, &all, 0);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: berth-launcher [--parent-death PID] [--root DIR] [--log FILE] [--log-format text] COMMAND\n"
            "  run (-b|--bundle) DIR ID | check (-b|--bundle) DIR | kill ID SIGNAL | delete [--force] ID | state ID |\n"
            "  exec [--tty] [--cwd DIR] [--env K=V]... ID COMMAND [ARG...]\n");
    exit(1);
}

/* Descriptors 3 to 66 that were open when the launcher started (bit fd - 3): what the caller
 * passed.  Looked at later, a closed descriptor 3 the caller meant to pass was the launcher's
 * own --log by then (the lowest free number), so the check passed and the container got nothing
 * there (the log is close-on-exec). */
static uint64_t inherited_fds;

static void note_inherited_fds(void)
{
    for (int fd = 3; fd < 3 + 64; fd++)
        if (fcntl(fd, F_GETFD) >= 0)
            inherited_fds |= 1ULL << (fd - 3);
}

static unsigned parse_preserve_fds(const char *text)
{
    char *end = NULL;
    errno = 0;
    unsigned long count = strtoul(text, &end, 10);
    if (errno || !*text || *end || count > 64)
        fail("--preserve-fds %s: wants a number of descriptors from 0 to 64", text);
    /* Open as the caller passed them: a descriptor the container is to get must exist. */
    for (unsigned long fd = 3; fd < 3 + count; fd++)
        if (!(inherited_fds >> (fd - 3) & 1))
            fail("--preserve-fds %s: descriptor %lu is not open", text, fd);
    return (unsigned)count;
}

/* "--parent-death PID": SIGTERM when the parent dies, as ``setpriv --pdeathsig TERM`` gave it
 * (the signal's default action: nothing is started yet, so nothing is left behind). */
static void die_with_parent(const char *text)
{
    char *end = NULL;
    errno = 0;
    long parent = strtol(text, &end, 10);
    if (errno || !*text || *end || parent <= 0)
        fail("--parent-death %s: wants the parent's process id", text);
    if (prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0) != 0)
        fail("prctl(PR_SET_PDEATHSIG): %s", error_text(errno));
    if (getppid() != (pid_t)parent)
        kill(getpid(), SIGTERM); /* gone before the prctl: no death signal will come */
}

int main(int argc, char **argv)
{
    note_inherited_fds(); /* before the launcher opens anything of its own */
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (strcmp(argv[i], "--parent-death") == 0 && i + 1 < argc) {
            die_with_parent(argv[++i]);
        } else if (strcmp(argv[i], "--version") == 0 || strcmp(argv[i], "-v") == 0) {
            puts(LAUNCHER_VERSION);
            return 0;
        } else if (strcmp(argv[i], "--root") == 0 && i + 1 < argc) {
            root_dir = argv[++i];
        } else if (strcmp(argv[i], "--log") == 0 && i + 1 < argc) {
            /* berth reads the errors from it: without it, refuse to start (as runc does). */
            /* Not through a link: the log lies in the container's directory of berth's state,
             * where a link was planted, not made by berth (errors were appended to its target). */
            log_fd = open(argv[++i], O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
            if (log_fd < 0)
                fail("cannot open the log %s: %s", argv[i], error_text(errno));
        } else if (strcmp(argv[i], "--log-format") == 0 && i + 1 < argc) {
            if (strcmp(argv[++i], "text") != 0)
                fail("--log-format %s: only text is supported", argv[i]);
        } else {
            fail("unknown option %s", argv[i]);
        }
    }
    if (i >= argc)
        usage();
    const char *command = argv[i++];
    if (strcmp(command, "run") == 0) {
        const char *bundle = ".";
        for (; i < argc && argv[i][0] == '-'; i++) {
            if ((strcmp(argv[i], "-b") == 0 || strcmp(argv[i], "--bundle") == 0) && i + 1 < argc)
                bundle = argv[++i];
            else if (strcmp(argv[i], "--preserve-fds") == 0 && i + 1 < argc)
                preserve_fds = parse_preserve_fds(argv[++i]);
            else
                fail("run: unknown option %s (berth-launcher runs a subset of runc's options)", argv[i]);
        }
        if (i + 1 != argc)
            usage();
        return command_run(bundle, argv[i]);
    }
    if (strcmp(command, "check") == 0) {
        const char *bundle = ".";
        if (i + 2 == argc && (strcmp(argv[i], "-b") == 0 || strcmp(argv[i], "--bundle") == 0))
            bundle = argv[i + 1];
        else if (i != argc)
            usage();
        char config_path[PATH_MAX + 16];
        snprintf(config_path, sizeof config_path, "%s/config.json", bundle);
        struct config cfg;
        memset(&cfg, 0, sizeof cfg);
        parse_config(parse_json_file(config_path, "config.json"), &cfg, bundle);
        return 0;
    }
    if (strcmp(command, "kill") == 0) {
        if (i + 1 > argc || i + 2 < argc)
            usage();
        return command_kill(argv[i], i + 1 < argc ? argv[i + 1] : "TERM");
    }
    if (strcmp(command, "delete") == 0) {
        int force = 0;
        if (i < argc && (strcmp(argv[i], "--force") == 0 || strcmp(argv[i], "-f") == 0))
            force = 1, i++;
        if (i + 1 != argc)
            usage();
        return command_delete(argv[i], force);
    }
    if (strcmp(command, "state") == 0) {
        if (i + 1 != argc)
            usage();
        return command_state(argv[i]);
    }
    if (strcmp(command, "exec") == 0) {
        const char *cwd = NULL;
        int terminal = 0;
        char **extra = xalloc((size_t)argc * sizeof *extra);
        size_t extra_count = 0;
        for (; i < argc && argv[i][0] == '-'; i++) {
            if (strcmp(argv[i], "--cwd") == 0 && i + 1 < argc) {
                cwd = argv[++i];
            } else if ((strcmp(argv[i], "--env") == 0 || strcmp(argv[i], "-e") == 0) && i + 1 < argc) {
                if (!strchr(argv[i + 1], '='))
                    fail("--env %s: wants NAME=VALUE", argv[i + 1]);
                extra[extra_count++] = argv[++i];
            } else if (strcmp(argv[i], "--tty") == 0 || strcmp(argv[i], "-t") == 0) {
                terminal = 1;
            } else if (strcmp(argv[i], "--preserve-fds") == 0 && i + 1 < argc) {
                preserve_fds = parse_preserve_fds(argv[++i]);
            } else {
                fail("exec: unknown option %s", argv[i]);
            }
        }
        if (i + 2 > argc)
            usage();
        return command_exec(argv[i], cwd, extra, extra_count, &argv[i + 1], terminal);
    }
    fail("unknown command '%s'", command);
}
