/* berth-front: the `berth` command (issue 10, target 3; DESIGN.md direction 13).
 *
 * Runs exactly one narrow case itself: `berth run ...` whose compiled plan Python kept
 * (berth.runtime.compiledplan: the format, the key and the rules are defined there) and whose
 * every dependency is unchanged, with nothing stale in the state directory and the image's shared
 * mount alive to join. Then it does what berth.runtime.container's lifecycle does for that plan:
 * a locked container directory (berth.runtime.state.create), info.json, the holder of the shared
 * image mount (berth.runtime.imagemount.acquire's protocol), the identity files and config.json,
 * berth-launcher in the foreground with signals forwarded and the stop timeout, and the same
 * teardown. Anything else, and any doubt, execs `berth-py` (the Python console script beside this
 * program) with argv and environment untouched, before anything was changed, or after what was
 * changed is undone.
 *
 * Everything read from the state directory is hostile: bounded reads, O_NOFOLLOW, owner and mode
 * checked as Python checks them. It runs with the user's privileges only.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define MAX_ENTRY (1 << 20)
#define MAX_SMALL 65536

static char **g_argv;
static int g_argc;
static int g_debug;
static char g_self[PATH_MAX];
/* The signal mask berth was started with (restored for every program it runs or execs). */
static sigset_t g_mask;

/* ------------------------------------------------------------------------- sha256 */
typedef struct { uint32_t h[8]; uint64_t len; unsigned char buf[64]; size_t n; } sha256_t;
static const uint32_t K[64] = {
    0x428a2f98,0x71374491,0xb5c0fbcf,0xe9b5dba5,0x3956c25b,0x59f111f1,0x923f82a4,0xab1c5ed5,
    0xd807aa98,0x12835b01,0x243185be,0x550c7dc3,0x72be5d74,0x80deb1fe,0x9bdc06a7,0xc19bf174,
    0xe49b69c1,0xefbe4786,0x0fc19dc6,0x240ca1cc,0x2de92c6f,0x4a7484aa,0x5cb0a9dc,0x76f988da,
    0x983e5152,0xa831c66d,0xb00327c8,0xbf597fc7,0xc6e00bf3,0xd5a79147,0x06ca6351,0x14292967,
    0x27b70a85,0x2e1b2138,0x4d2c6dfc,0x53380d13,0x650a7354,0x766a0abb,0x81c2c92e,0x92722c85,
    0xa2bfe8a1,0xa81a664b,0xc24b8b70,0xc76c51a3,0xd192e819,0xd6990624,0xf40e3585,0x106aa070,
    0x19a4c116,0x1e376c08,0x2748774c,0x34b0bcb5,0x391c0cb3,0x4ed8aa4a,0x5b9cca4f,0x682e6ff3,
    0x748f82ee,0x78a5636f,0x84c87814,0x8cc70208,0x90befffa,0xa4506ceb,0xbef9a3f7,0xc67178f2};
#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
static void sha_block(sha256_t *s, const unsigned char *p) {
    uint32_t w[64], a, b, c, d, e, f, g, h;
    for (int i = 0; i < 16; i++) w[i] = (uint32_t)p[4*i] << 24 | (uint32_t)p[4*i+1] << 16 | (uint32_t)p[4*i+2] << 8 | p[4*i+3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i-15], 7) ^ ROR(w[i-15], 18) ^ (w[i-15] >> 3);
        uint32_t s1 = ROR(w[i-2], 17) ^ ROR(w[i-2], 19) ^ (w[i-2] >> 10);
        w[i] = w[i-16] + s0 + w[i-7] + s1;
    }
    a = s->h[0]; b = s->h[1]; c = s->h[2]; d = s->h[3]; e = s->h[4]; f = s->h[5]; g = s->h[6]; h = s->h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    s->h[0] += a; s->h[1] += b; s->h[2] += c; s->h[3] += d; s->h[4] += e; s->h[5] += f; s->h[6] += g; s->h[7] += h;
}
static void sha_init(sha256_t *s) {
    static const uint32_t iv[8] = {0x6a09e667,0xbb67ae85,0x3c6ef372,0xa54ff53a,0x510e527f,0x9b05688c,0x1f83d9ab,0x5be0cd19};
    memcpy(s->h, iv, sizeof iv); s->len = 0; s->n = 0;
}
static void sha_update(sha256_t *s, const void *data, size_t len) {
    const unsigned char *p = data;
    s->len += len;
    while (len) {
        size_t take = 64 - s->n < len ? 64 - s->n : len;
        memcpy(s->buf + s->n, p, take); s->n += take; p += take; len -= take;
        if (s->n == 64) { sha_block(s, s->buf); s->n = 0; }
    }
}
static void sha_hex(sha256_t *s, char out[65]) {
    uint64_t bits = s->len * 8;
    unsigned char pad = 0x80, zero = 0, lenb[8];
    sha_update(s, &pad, 1);
    while (s->n != 56) sha_update(s, &zero, 1);
    for (int i = 0; i < 8; i++) lenb[i] = (unsigned char)(bits >> (56 - 8 * i));
    sha_update(s, lenb, 8);
    for (int i = 0; i < 8; i++) sprintf(out + 8 * i, "%08x", s->h[i]);
    out[64] = 0;
}

/* ------------------------------------------------------------------ small helpers */
/* `in` as berth.cli.output.printable writes it (Python's repr of each character that is not
 * printable), on bytes of UTF-8: \t \n \r, \xNN for the other C0 controls, DEL, the C1
 * controls and U+00A0/U+00AD, and a byte that is not UTF-8 as Python decoded it: \udcNN (the
 * surrogate os.fsdecode makes of a path's), or with `replace` U+FFFD (a file read with
 * errors="replace"), and above U+00FF every assigned character Python does not call printable
 * (NOT_PRINTABLE: format, separator and private-use characters, among them the bidirectional
 * overrides that make a name read as another, "Trojan Source") as \uNNNN or \UNNNNNNNN.
 * Code points Unicode has not assigned yet pass (Python escapes them: a table that depends on
 * the Unicode version of each Python). Cut to `size`. */
static const unsigned NOT_PRINTABLE[][2] = {
    /* Python 3.11's str.isprintable() (Unicode 14) false, category not Cn, above U+00FF; its
     * test (tests/unit/test_front_printable.py) derives the table again. */
    {0x600, 0x605}, {0x61c, 0x61c}, {0x6dd, 0x6dd}, {0x70f, 0x70f}, {0x890, 0x891}, {0x8e2, 0x8e2},
    {0x1680, 0x1680}, {0x180e, 0x180e}, {0x2000, 0x200f}, {0x2028, 0x202f}, {0x205f, 0x2064},
    {0x2066, 0x206f}, {0x3000, 0x3000}, {0xd800, 0xf8ff}, {0xfeff, 0xfeff}, {0xfff9, 0xfffb},
    {0x110bd, 0x110bd}, {0x110cd, 0x110cd}, {0x13430, 0x13438}, {0x1bca0, 0x1bca3}, {0x1d173, 0x1d17a},
    {0xe0001, 0xe0001}, {0xe0020, 0xe007f}, {0xf0000, 0xffffd}, {0x100000, 0x10fffd},
};

static int not_printable(unsigned point) {
    for (size_t i = 0; i < sizeof NOT_PRINTABLE / sizeof NOT_PRINTABLE[0]; i++)
        if (point >= NOT_PRINTABLE[i][0] && point <= NOT_PRINTABLE[i][1]) return 1;
    return 0;
}

static void printable(const char *in, char *out, size_t size, int replace) {
    size_t used = 0;
    const unsigned char *c = (const unsigned char *)in;
    while (*c && used + 7 < size) {
        unsigned byte = *c, length = byte < 0x80 ? 1 : byte >= 0xc2 && byte <= 0xdf ? 2
                                  : byte >= 0xe0 && byte <= 0xef ? 3 : byte >= 0xf0 && byte <= 0xf4 ? 4 : 0;
        int valid = length > 0;
        for (unsigned i = 1; valid && i < length; i++) valid = (c[i] & 0xc0) == 0x80;
        if (valid && length == 3 && ((byte == 0xe0 && c[1] < 0xa0) || (byte == 0xed && c[1] >= 0xa0))) valid = 0;
        if (valid && length == 4 && ((byte == 0xf0 && c[1] < 0x90) || (byte == 0xf4 && c[1] >= 0x90))) valid = 0;
        if (!valid) {
            used += (size_t)snprintf(out + used, size - used, replace ? "\xef\xbf\xbd" : "\\udc%02x", byte);
            c++;
            continue;
        }
        unsigned point = length == 1 ? byte : length == 2 ? (byte & 0x1fu) << 6 : length == 3 ? (byte & 0x0fu) << 12
                                                                                    : (byte & 0x07u) << 18;
        for (unsigned i = 1; i < length; i++) point |= (c[i] & 0x3fu) << (6 * (length - 1 - i));
        if (length == 1 && (byte == '\t' || byte == '\n' || byte == '\r')) {
            out[used++] = '\\';
            out[used++] = byte == '\t' ? 't' : byte == '\n' ? 'n' : 'r';
        } else if ((length == 1 && (byte < 0x20 || byte == 0x7f))
                   || (length == 2 && (point <= 0xa0 || point == 0xad))) {
            used += (size_t)snprintf(out + used, size - used, "\\x%02x", point);
        } else if (length >= 2 && not_printable(point)) {
            if (used + 11 >= size) break;
            used += (size_t)snprintf(out + used, size - used, point > 0xffff ? "\\U%08x" : "\\u%04x", point);
        } else {
            if (used + length >= size) break;
            memcpy(out + used, c, length);
            used += length;
        }
        c += length;
    }
    out[used] = 0;
}

/* A --debug line, printable (paths and values come from the environment and the entry). */
static void debug(const char *fmt, ...) {
    if (!g_debug) return;
    char text[2 * PATH_MAX], shown[8 * PATH_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    printable(text, shown, sizeof shown, 0);
    fprintf(stderr, "berth: %s\n", shown);
}

/* Drop a SIGUSR1 or SIGUSR2 that came while execute() blocked the forwarded signals, before the
 * command runs: Python's handler of proc.HELD_SIGNALS drops them; their default action would end
 * berth as the mask is restored for berth-py (exec_python), or the command as it starts (the hit
 * path), which has not set itself up to take them (Slurm's --signal=USR1@T). One that was pending
 * and blocked by the caller already is dropped too: pending signals are not inherited by the
 * programs berth starts, and Python never unblocks it. */
static void drop_held_signals(void) {
    sigset_t held;
    sigemptyset(&held);
    sigaddset(&held, SIGUSR1);
    sigaddset(&held, SIGUSR2);
    struct timespec now_only = {0, 0};
    while (sigtimedwait(&held, NULL, &now_only) > 0) {}
}

/* The Python entry beside this program: argv and environment untouched. */
static void exec_python(const char *why) {
    char path[PATH_MAX];
    const char *slash = strrchr(g_self, '/');
    if (why) debug("front end: %s: running berth-py", why);
    /* Signals blocked while a container was being made (execute) must not stay blocked for
     * Python; one that came meanwhile stopped the run before its command, as Python's would, or,
     * a SIGUSR1 or SIGUSR2, is dropped (it ended berth as the mask was restored: review 10). */
    sigset_t pending;
    sigpending(&pending);
    static const int stops[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT};
    for (int i = 0; i < 4; i++)
        if (sigismember(&pending, stops[i]) && !sigismember(&g_mask, stops[i])) {
            fprintf(stderr, "berth: stopped by signal SIG%s before the command started\n", sigabbrev_np(stops[i]));
            _exit(128 + stops[i]);
        }
    drop_held_signals();
    sigprocmask(SIG_SETMASK, &g_mask, NULL);
    if (!slash || (size_t)(slash - g_self) + sizeof "/berth-py" > sizeof path) {
        fprintf(stderr, "berth: error: cannot find berth-py beside this program\nberth: hint: reinstall berth (pip install berth)\n");
        _exit(125);
    }
    memcpy(path, g_self, (size_t)(slash - g_self));
    strcpy(path + (slash - g_self), "/berth-py");
    char *saved = g_argv[0];
    g_argv[0] = path;
    execve(path, g_argv, environ);
    g_argv[0] = saved;
    fprintf(stderr, "berth: error: cannot run %s: %s\nberth: hint: reinstall berth (pip install berth)\n", path, strerror(errno));
    _exit(125);
}

static void field(sha256_t *s, const void *data, size_t len) {
    char head[32];
    int n = snprintf(head, sizeof head, "%zu:", len);
    sha_update(s, head, (size_t)n);
    sha_update(s, data, len);
}
static void field_str(sha256_t *s, const char *text) { field(s, text, strlen(text)); }
static void field_num(sha256_t *s, long long value) {
    char text[32];
    int n = snprintf(text, sizeof text, "%lld", value);
    field(s, text, (size_t)n);
}
static void field_unum(sha256_t *s, unsigned long long value) {
    char text[32];
    int n = snprintf(text, sizeof text, "%llu", value);
    field(s, text, (size_t)n);
}
static int compare_strings(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* berth.runtime.compiledplan.key_material, hashed. 0, or -1 (a reason in *why). */
static int run_key(char out[65], const char **why) {
    sha256_t s;
    struct stat where;
    char cwd[PATH_MAX];
    struct utsname names;
    gid_t groups[NGROUPS_MAX];
    int ngroups = getgroups(NGROUPS_MAX, groups);
    size_t count = 0;
    if (ngroups < 0 || !getcwd(cwd, sizeof cwd) || stat(cwd, &where) != 0 || uname(&names) != 0) {
        *why = "the working directory or the groups cannot be read";
        return -1;
    }
    for (char **e = environ; *e; e++) count++;
    char **env = malloc((count + 2) * sizeof *env);
    if (!env) { *why = "out of memory"; return -1; }
    memcpy(env, environ, count * sizeof *env);
    /* Python coerces the C locale (PEP 538): started with none of LC_ALL, LC_CTYPE, LANG (or
     * LANG C or POSIX), it puts LC_CTYPE=C.UTF-8 into its own environment, which is what its key
     * hashes; so the key does here too. */
    const char *all = getenv("LC_ALL"), *ctype = getenv("LC_CTYPE"), *lang = getenv("LANG"),
               *coerce = getenv("PYTHONCOERCECLOCALE");
    if ((!all || !*all) && (!ctype || !*ctype) && (!lang || !*lang || !strcmp(lang, "C") || !strcmp(lang, "POSIX"))
        && !(coerce && !strcmp(coerce, "0"))) {
        if (ctype) { free(env); *why = "an empty LC_CTYPE"; return -1; }
        env[count++] = "LC_CTYPE=C.UTF-8";
    }
    qsort(env, count, sizeof *env, compare_strings);
    for (size_t i = 0; i < count; i++) {  /* each NAME=VALUE once: a duplicate is Python's to judge */
        const char *eq = strchr(env[i], '=');
        if (!eq || eq == env[i]) { free(env); *why = "an environment entry without a name"; return -1; }
        if (i + 1 < count && strncmp(env[i], env[i + 1], (size_t)(eq - env[i]) + 1) == 0) {
            free(env); *why = "a variable twice in the environment"; return -1;
        }
    }
    mode_t mask = umask(077);
    umask(mask);
    sha_init(&s);
    field_str(&s, "berth-front-key 1");
    field_str(&s, g_self);
    field_num(&s, getuid()); field_num(&s, geteuid()); field_num(&s, getgid()); field_num(&s, getegid());
    field_num(&s, ngroups);
    for (int i = 0; i < ngroups; i++) field_num(&s, groups[i]);
    field_num(&s, mask);
    field_num(&s, g_argc - 1);
    for (int i = 1; i < g_argc; i++) field_str(&s, g_argv[i]);
    field_num(&s, (long long)count);
    for (size_t i = 0; i < count; i++) field_str(&s, env[i]);
    free(env);
    field_str(&s, cwd);
    field_unum(&s, (unsigned long long)where.st_dev);
    field_unum(&s, (unsigned long long)where.st_ino);
    field_str(&s, names.sysname); field_str(&s, names.nodename); field_str(&s, names.release);
    field_str(&s, names.version); field_str(&s, names.machine);
    sha_hex(&s, out);
    return 0;
}

static int is_private_dir(const char *path) {
    struct stat st;
    return lstat(path, &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == getuid() && !(st.st_mode & 077);
}

/* A regular file of the caller's that nobody else may write, read whole (at most max bytes),
 * never through a link. Returns a NUL-terminated buffer (length in *len) or NULL. */
static char *read_own_file(int dirfd, const char *path, size_t max, size_t *len, int need_own) {
    int fd = openat(dirfd, path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return NULL;
    struct stat st;
    char *buf = NULL;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || (size_t)st.st_size > max) goto out;
    if (need_own && (st.st_uid != getuid() || (st.st_mode & 022))) goto out;
    buf = malloc(max + 1);
    if (!buf) goto out;
    size_t got = 0;
    for (;;) {
        ssize_t n = read(fd, buf + got, max + 1 - got);
        if (n < 0) { if (errno == EINTR) continue; free(buf); buf = NULL; goto out; }
        if (n == 0) break;
        got += (size_t)n;
        if (got > max) { free(buf); buf = NULL; goto out; }
    }
    buf[got] = 0;
    *len = got;
out:
    close(fd);
    return buf;
}

/* berth.runtime.compiledplan.fingerprint_text of lstat(path). */
static void fingerprint(const char *path, int contents, char *out, size_t size) {
    struct stat st;
    if (lstat(path, &st) != 0) {
        if (errno == ENOENT || errno == ENOTDIR) snprintf(out, size, "-");
        else snprintf(out, size, "e %d", errno);
        return;
    }
    int n = snprintf(out, size, "%llu %llu %u %u %u", (unsigned long long)st.st_dev, (unsigned long long)st.st_ino,
                     (unsigned)st.st_mode, (unsigned)st.st_uid, (unsigned)st.st_gid);
    if (contents)
        snprintf(out + n, size - (size_t)n, " %lld %lld %lld", (long long)st.st_size,
                 (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec,
                 (long long)st.st_ctim.tv_sec * 1000000000LL + st.st_ctim.tv_nsec);
}

/* ------------------------------------------------------------------ the entry */
#define MAX_IDENTITY 8
struct entry {
    const char *key, *front, *state_dir, *image_key, *launcher, *info, *config;
    size_t info_len, config_len;
    long uid, linger_s, lock_timeout_s, stop_timeout_ms;
    int debug, identities, dependencies;
    const char *identity_name[MAX_IDENTITY], *identity_text[MAX_IDENTITY];
    size_t identity_len[MAX_IDENTITY];
    int seen_end;
};

static int parse_long(const char *text, long *out) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || end == text || *end || value < 0) return -1;
    *out = value;
    return 0;
}

/* Parse (and check the dependencies of) the compiled entry in buf; NULL or a reason. Values
 * point into buf (each record's bytes NUL-terminated in place). */
static const char *parse_entry(char *buf, size_t len, struct entry *e) {
    char *p = buf, *end = buf + len;
    const char *head = "berth-compiled 1\n";
    memset(e, 0, sizeof *e);
    e->uid = -1;
    if (len < strlen(head) || memcmp(p, head, strlen(head)) != 0) return "the entry is of another berth";
    p += strlen(head);
    while (p < end) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) return "the entry is corrupt";
        *nl = 0;
        char *space = strchr(p, ' ');
        if (!space) return "the entry is corrupt";
        *space = 0;
        const char *tag = p;
        long size;
        if (parse_long(space + 1, &size) != 0 || size > end - (nl + 1) - 1) return "the entry is corrupt";
        char *value = nl + 1;
        if (value[size] != '\n') return "the entry is corrupt";
        value[size] = 0;
        p = value + size + 1;
        if (!strcmp(tag, "end")) { e->seen_end = 1; break; }
        if (memchr(value, 0, (size_t)size) && strcmp(tag, "D") && strcmp(tag, "identity"))
            return "the entry is corrupt";
        if (!strcmp(tag, "key")) e->key = value;
        else if (!strcmp(tag, "front")) e->front = value;
        else if (!strcmp(tag, "state_dir")) e->state_dir = value;
        else if (!strcmp(tag, "image_key")) e->image_key = value;
        else if (!strcmp(tag, "launcher")) e->launcher = value;
        else if (!strcmp(tag, "info")) { e->info = value; e->info_len = (size_t)size; }
        else if (!strcmp(tag, "config")) { e->config = value; e->config_len = (size_t)size; }
        else if (!strcmp(tag, "uid")) { if (parse_long(value, &e->uid)) return "the entry is corrupt"; }
        else if (!strcmp(tag, "linger_s")) { if (parse_long(value, &e->linger_s)) return "the entry is corrupt"; }
        else if (!strcmp(tag, "lock_timeout_s")) { if (parse_long(value, &e->lock_timeout_s)) return "the entry is corrupt"; }
        else if (!strcmp(tag, "stop_timeout_ms")) { if (parse_long(value, &e->stop_timeout_ms)) return "the entry is corrupt"; }
        else if (!strcmp(tag, "debug")) { long d; if (parse_long(value, &d)) return "the entry is corrupt"; e->debug = d != 0; }
        else if (!strcmp(tag, "identity")) {
            char *nul = memchr(value, 0, (size_t)size);
            if (!nul || e->identities == MAX_IDENTITY) return "the entry's identity files are malformed";
            const char *name = value;
            if (strcmp(name, "passwd") && strcmp(name, "group")) return "the entry's identity files are malformed";
            e->identity_name[e->identities] = name;
            e->identity_text[e->identities] = nul + 1;
            e->identity_len[e->identities] = (size_t)(value + size - (nul + 1));
            e->identities++;
        } else if (!strcmp(tag, "D")) {
            char *nul = memchr(value, 0, (size_t)size), now[160];
            if (!nul || size < 3 || (value[0] != 'c' && value[0] != 'i') || value[1] != ' ' || value[2] != '/')
                return "the entry's dependencies are malformed";
            fingerprint(value + 2, value[0] == 'c', now, sizeof now);
            if (strcmp(now, nul + 1) != 0) {
                static char why[PATH_MAX + 16];
                snprintf(why, sizeof why, "%s changed", value + 2);
                return why;
            }
            e->dependencies++;
        } else return "the entry is of another berth";
    }
    if (!e->seen_end || !e->key || !e->front || !e->state_dir || !e->image_key || !e->launcher || !e->info
        || !e->config || e->uid < 0)
        return "the entry is incomplete";
    /* A kept plan always depends on files (passwd, the image, berth itself): one naming none was
     * not written by Python's Keeper, and nothing about it could be re-checked (plancache._malformed). */
    if (!e->dependencies) return "the entry lists no dependencies";
    if (strchr(e->image_key, '/') || !strcmp(e->image_key, ".") || !strcmp(e->image_key, "..") || !*e->image_key)
        return "the entry's image is malformed";
    if (e->state_dir[0] != '/' || e->launcher[0] != '/') return "the entry's paths are malformed";
    /* The one program an entry names: berth-launcher, as Python ran it (ocirt.launcher_path),
     * a file nobody but root or the caller may change (never a program a record picks). */
    const char *base = strrchr(e->launcher, '/') + 1;
    struct stat st;
    if (strcmp(base, "berth-launcher") || stat(e->launcher, &st) != 0 || !S_ISREG(st.st_mode)
        || (st.st_uid != 0 && st.st_uid != getuid()) || (st.st_mode & 022))
        return "the entry's runtime is not berth-launcher";
    return NULL;
}

/* ------------------------------------------------------------ the plan_cache setting */
/* With plan_cache off no kept plan runs, whoever wrote it (plancache.py): the settings files are
 * dependencies of every entry, and, against an entry nobody but a container could have written,
 * the setting is read here too, from the same files and variable as berth.config.load reads, in
 * the same order. Only the plain forms are understood (`plan_cache = true|false` on a line of its
 * own, outside any table; BERTH_PLAN_CACHE=1/0/true/false/yes/no): any other mention of the key
 * (a pin, a table, a multi-line string) is Python's to judge, and so is any file with a backslash
 * in it, and a HOME or BERTH_CONFIG_DIR with a ".." in it. */

/* The value a file gives plan_cache: 1, 0, -1 (none); -2: Python's to judge. */
static int setting_in_file(const char *path) {
    size_t len;
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT ? -1 : -2;
    close(fd);
    char real[PATH_MAX];  /* a site's settings may be links to where it keeps them */
    char *text = realpath(path, real) ? read_own_file(AT_FDCWD, real, MAX_ENTRY, &len, 0) : NULL;
    if (!text) return -2;
    /* A backslash: an escape or a line continuation in a basic string can spell plan_cache, as a
     * key or a pinned name, without these letters in a row ("plan\u005fcache"). */
    if (memchr(text, 0, len) || strchr(text, '\\')) { free(text); return -2; }
    int value = -1, table = 0;
    if (strstr(text, "plan_cache") && (strstr(text, "\"\"\"") || strstr(text, "'''"))) { free(text); return -2; }
    for (char *line = text, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next) *next++ = 0;
        while (*line == ' ' || *line == '\t') line++;
        if (*line == '[') table = 1;
        if (!strstr(line, "plan_cache")) continue;
        if (table || strncmp(line, "plan_cache", 10) || value != -1) { value = -2; break; }  /* twice: no TOML */
        char *p = line + 10;
        while (*p == ' ' || *p == '\t') p++;
        if (*p++ != '=') { value = -2; break; }
        while (*p == ' ' || *p == '\t') p++;
        int found;
        if (!strncmp(p, "true", 4)) { found = 1; p += 4; }
        else if (!strncmp(p, "false", 5)) { found = 0; p += 5; }
        else { value = -2; break; }
        while (*p == ' ' || *p == '\t' || *p == '\r') p++;
        if (*p && *p != '#') { value = -2; break; }
        value = found;
    }
    free(text);
    return value;
}

/* Whether a path has a ".." component: Python normalizes such a HOME by its text (and refuses
 * such a BERTH_CONFIG_DIR), where the kernel goes up from where a link leads. */
static int goes_up(const char *path) {
    for (const char *p = strstr(path, ".."); p; p = strstr(p + 1, ".."))
        if ((p == path || p[-1] == '/') && (p[2] == 0 || p[2] == '/')) return 1;
    return 0;
}

/* Whether plan_cache is on now: 1; 0 off; -1 Python's to judge. */
static int plan_cache_on(void) {
    const char *config = getenv("BERTH_CONFIG_DIR"), *xdg = getenv("XDG_CONFIG_HOME"), *home = getenv("HOME");
    const char *variable = getenv("BERTH_PLAN_CACHE");
    char dir[PATH_MAX], path[PATH_MAX * 2];
    int value = 1;  /* the default: berth.config.settings.Settings.plan_cache */
    if (config && *config && (config[0] != '/' || goes_up(config))) return -1;
    snprintf(dir, sizeof dir, "%s", config && *config ? config : "/etc/berth");
    snprintf(path, sizeof path, "%s/berth.toml", dir);
    int found = setting_in_file(path);
    if (found == -2) return -1;
    if (found >= 0) value = found;
    snprintf(path, sizeof path, "%s/conf.d", dir);
    int dirfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0 && errno != ENOENT) return -1;
    if (dirfd >= 0) {
        DIR *d = fdopendir(dirfd);
        if (!d) { close(dirfd); return -1; }
        char *names[256];
        size_t count = 0;
        struct dirent *entry;
        int doubt = 0;
        while ((entry = readdir(d))) {
            size_t n = strlen(entry->d_name);
            if (entry->d_name[0] == '.' || n < 5 || strcmp(entry->d_name + n - 5, ".toml")) continue;
            if (count == 256 || !(names[count] = strdup(entry->d_name))) { doubt = 1; break; }
            count++;
        }
        closedir(d);
        qsort(names, count, sizeof *names, compare_strings);
        for (size_t i = 0; i < count; i++) {
            snprintf(path, sizeof path, "%s/conf.d/%s", dir, names[i]);
            found = doubt ? -2 : setting_in_file(path);
            if (found == -2) doubt = 1;
            else if (found >= 0) value = found;
            free(names[i]);
        }
        if (doubt) return -1;
    }
    if (xdg && xdg[0] == '/') snprintf(path, sizeof path, "%s/berth/berth.toml", xdg);
    else if (home && home[0] == '/' && !goes_up(home)) snprintf(path, sizeof path, "%s/.config/berth/berth.toml", home);
    else return -1;
    found = setting_in_file(path);
    if (found == -2) return -1;
    if (found >= 0) value = found;
    if (variable && *variable) {
        char lower[8];
        size_t n = strlen(variable);
        if (n >= sizeof lower) return -1;
        for (size_t i = 0; i <= n; i++) lower[i] = (char)(variable[i] >= 'A' && variable[i] <= 'Z' ? variable[i] + 32 : variable[i]);
        if (!strcmp(lower, "1") || !strcmp(lower, "true") || !strcmp(lower, "yes")) value = 1;
        else if (!strcmp(lower, "0") || !strcmp(lower, "false") || !strcmp(lower, "no")) value = 0;
        else return -1;
    }
    return value;
}

/* ------------------------------------------------------------- locks and /proc */
/* Whether a lock file is flock()ed now, found as berth.locks.is_locked finds it (its twin:
 * berth.locks._ProcLocks and _is_locked; ONE rule, keep the two alike): the FLOCK lines of
 * /proc/locks naming the file's superblock device, which is the device /proc/self/mountinfo gives
 * the mount id that /proc/self/fdinfo shows for a descriptor of it, and the inode fdinfo shows.
 * Never fstat's st_dev: btrfs reports another device there (per subvolume, 00:29, where
 * /proc/locks says 00:28), and every live holder looked dead (review 10). Where /proc cannot tell
 * (/proc/locks, mountinfo or fdinfo unreadable, a /proc of another PID namespace than the first,
 * which leaves out holders it cannot see, or a file system whose locks other nodes may hold) one
 * try of the lock, as there. What /proc shows is read at the first look that needs it, once
 * (lazily: a read of /proc/locks takes the kernel's file-lock rwsem for writing, which waits for
 * an RCU grace period, ~10 ms when nothing read it moments before; a run with nothing to look at
 * reads none). */
struct lockset {
    int loaded, mounts_read, namespace_read, first_namespace;
    size_t n, mounts;
    struct { unsigned maj, min; unsigned long long ino; long pid; } *items;
    struct { long id; unsigned maj, min; int repeats; } *local;  /* mount id -> device, local file systems only */
};

static void free_lockset(struct lockset *set) {
    free(set->items);
    free(set->local);
}

/* A /proc file (no size: read with a plain loop), NUL-terminated, or NULL. */
static char *read_proc_file(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NULL;
    size_t cap = 1 << 16, got = 0;
    char *buf = malloc(cap + 1);
    if (!buf) { close(fd); return NULL; }
    for (;;) {
        if (got == cap) {
            char *bigger = cap < (64u << 20) ? realloc(buf, cap * 2 + 1) : NULL;
            if (!bigger) { free(buf); close(fd); return NULL; }
            buf = bigger; cap *= 2;
        }
        ssize_t n = read(fd, buf + got, cap - got);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) { free(buf); close(fd); return NULL; }
        if (n == 0) break;
        got += (size_t)n;
    }
    close(fd);
    buf[got] = 0;
    return buf;
}

static void read_proc_locks(struct lockset *set) {
    set->loaded = 1;
    set->n = 0; set->items = NULL;
    char *buf = read_proc_file("/proc/locks");
    if (!buf) return;
    size_t lines = 1;
    for (char *c = buf; *c; c++) lines += *c == '\n';
    set->items = calloc(lines, sizeof *set->items);
    if (!set->items) { free(buf); return; }
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        char kind[16];
        unsigned maj, min;
        unsigned long long ino;
        long pid;
        /* "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" ("->" lines are waiters) */
        if (strstr(line, "->")) continue;
        if (sscanf(line, "%*d: %15s %*s %*s %ld %x:%x:%llu", kind, &pid, &maj, &min, &ino) == 5 && !strcmp(kind, "FLOCK")) {
            set->items[set->n].maj = maj; set->items[set->n].min = min; set->items[set->n].ino = ino;
            set->items[set->n].pid = pid; set->n++;
        }
    }
    free(buf);
}

/* locks._LOCAL_FILE_SYSTEMS: those whose flocks are all in this node's /proc/locks; of them,
 * locks._REPEATED_INODES: btrfs, whose subvolumes share the device /proc/locks names and number
 * their inodes alike, so that a FLOCK seen there may be another subvolume's file's (held_here). */
static int local_file_system(const char *type) {
    static const char *const local[] = {"tmpfs", "ramfs", "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "overlay"};
    for (size_t i = 0; i < sizeof local / sizeof *local; i++) if (!strcmp(type, local[i])) return 1;
    return 0;
}

/* /proc/self/mountinfo: "36 35 0:40 / /mnt rw,relatime shared:1 - btrfs /dev/loop0 rw" */
static void read_mountinfo(struct lockset *set) {
    set->mounts_read = 1;
    char *buf = read_proc_file("/proc/self/mountinfo");
    if (!buf) return;
    size_t lines = 1;
    for (char *c = buf; *c; c++) lines += *c == '\n';
    set->local = calloc(lines, sizeof *set->local);
    if (!set->local) { free(buf); return; }
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        long id;
        unsigned maj, min;
        char type[32];
        const char *dash = strstr(line, " - ");
        if (!dash || sscanf(line, "%ld %*d %u:%u", &id, &maj, &min) != 3 || sscanf(dash + 3, "%31s", type) != 1
            || !local_file_system(type))
            continue;
        set->local[set->mounts].id = id; set->local[set->mounts].maj = maj; set->local[set->mounts].min = min;
        set->local[set->mounts].repeats = !strcmp(type, "btrfs");
        set->mounts++;
    }
    free(buf);
}

/* Whether this /proc is of the first PID namespace: pid 2 is kthreadd (PF_KTHREAD) there only. */
static int first_namespace(struct lockset *set) {
    if (set->namespace_read) return set->first_namespace;
    set->namespace_read = 1;
    char buf[1024];
    int fd = open("/proc/2/stat", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
    if (fd >= 0) close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    unsigned long flags;
    /* after the name: state, ppid, pgrp, session, tty_nr, tpgid, flags */
    if (p && sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %lu", &flags) == 1) set->first_namespace = (flags & 0x00200000) != 0;
    return set->first_namespace;
}

/* On btrfs, whether a FLOCK /proc/locks names maj:min:ino is on the file open as fd
 * (locks._ProcLocks._held_here): 1 when a holder holds it on this file, or one this process can
 * look at holds it still though not found (released and taken again meanwhile: counted held,
 * never tried); 0 when every holder holds it on other subvolumes' files or it is no longer
 * shown; -1 when a holder it cannot look at (another user's, gone) still holds one. Each
 * holder's /proc/PID/fdinfo shows the locks held through each descriptor, and /proc/PID/fd/N's
 * stat has the subvolume's own device, as fstat has. */
static int held_here(struct lockset *set, int fd, unsigned maj, unsigned min, unsigned long long ino) {
    struct stat own;
    if (fstat(fd, &own) != 0) return -1;
    char name[64];
    snprintf(name, sizeof name, " %02x:%02x:%llu ", maj, min, ino);
    long unplaced[16], hidden[16];
    size_t unplaceds = 0, hiddens = 0;
    for (size_t i = 0; i < set->n; i++) {
        if (set->items[i].ino != ino || set->items[i].maj != maj || set->items[i].min != min) continue;
        long pid = set->items[i].pid;
        int located = 0;
        char dir[64];
        snprintf(dir, sizeof dir, "/proc/%ld/fdinfo", pid);
        DIR *d = pid > 0 ? opendir(dir) : NULL;
        if (!d) {
            if (hiddens == sizeof hidden / sizeof *hidden) return -1;
            hidden[hiddens++] = pid;
            continue;
        }
        struct dirent *e;
        while ((e = readdir(d))) {
            if (e->d_name[0] == '.') continue;
            char path[128];
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            char *text = read_proc_file(path);
            if (!text) continue;
            int has = 0;
            for (char *line = text; line && *line && !has;) {
                char *end = strchr(line, '\n');
                if (end) *end = 0;
                has = !strncmp(line, "lock:", 5) && strstr(line, name) != NULL;
                line = end ? end + 1 : NULL;
            }
            free(text);
            if (!has) continue;
            snprintf(path, sizeof path, "/proc/%ld/fd/%s", pid, e->d_name);
            struct stat other;
            if (stat(path, &other) != 0) continue;
            if (other.st_dev == own.st_dev && other.st_ino == own.st_ino) { closedir(d); return 1; }
            located = 1;
        }
        closedir(d);
        if (!located) {
            if (unplaceds == sizeof unplaced / sizeof *unplaced) return -1;
            unplaced[unplaceds++] = pid;
        }
    }
    if (!unplaceds && !hiddens) return 0;
    /* A holder that shows no such lock may have released it since /proc/locks was read: read
     * it again (rarely: only here). */
    struct lockset fresh = {0};
    read_proc_locks(&fresh);
    if (!fresh.items) { free_lockset(&fresh); return -1; }
    int result = 0;
    for (size_t i = 0; i < fresh.n && result != 1; i++) {
        if (fresh.items[i].ino != ino || fresh.items[i].maj != maj || fresh.items[i].min != min) continue;
        for (size_t u = 0; u < unplaceds; u++) if (fresh.items[i].pid == unplaced[u]) result = 1;
        for (size_t h = 0; h < hiddens && result == 0; h++) if (fresh.items[i].pid == hidden[h]) result = -1;
    }
    free_lockset(&fresh);
    return result;
}

/* Whether /proc/locks shows a FLOCK on the file open as fd: 1, 0, or -1 when /proc cannot tell
 * (locks._ProcLocks.seen); on btrfs what held_here cannot tell is -1 where the caller can_try
 * the lock, else held. */
static int proc_seen(struct lockset *set, int fd, int can_try) {
    if (!first_namespace(set)) return -1;
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", fd);
    int info = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t n = info < 0 ? -1 : read(info, buf, sizeof buf - 1);
    if (info >= 0) close(info);
    if (n <= 0) return -1;
    buf[n] = 0;
    const char *mnt = strstr(buf, "\nmnt_id:"), *ino_line = strstr(buf, "\nino:");
    long mount_id;
    unsigned long long ino;
    if (!mnt || !ino_line || sscanf(mnt + 8, "%ld", &mount_id) != 1 || sscanf(ino_line + 5, "%llu", &ino) != 1) return -1;
    if (!set->mounts_read) read_mountinfo(set);
    size_t m = 0;
    while (m < set->mounts && set->local[m].id != mount_id) m++;
    if (m == set->mounts) return -1;  /* not a local file system's (or mountinfo unreadable) */
    if (!set->loaded) read_proc_locks(set);
    if (!set->items) return -1;
    for (size_t i = 0; i < set->n; i++)
        if (set->items[i].ino == ino && set->items[i].maj == set->local[m].maj && set->items[i].min == set->local[m].min) {
            if (!set->local[m].repeats) return 1;
            int here = held_here(set, fd, set->local[m].maj, set->local[m].min, ino);
            return here >= 0 ? here : can_try ? -1 : 1;
        }
    return 0;
}

/* Whether the entry name in dirfd is flock()ed by someone now (locks._is_locked): 1 held, 0 not
 * (also for a link, a non-regular file or nothing there: no lock of berth's), -1 when it cannot
 * be told. A look through /proc, never a take, except where /proc cannot tell. */
static int lock_state(int dirfd, const char *name, struct lockset *set) {
    const int flags = O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC;
    int can_try = 1, fd = openat(dirfd, name, O_RDWR | flags);
    if (fd < 0 && (errno == EACCES || errno == EPERM || errno == EROFS || errno == ETXTBSY || errno == EISDIR))
        fd = openat(dirfd, name, O_RDONLY | flags);
    if (fd < 0 && (errno == EACCES || errno == EPERM)) {
        fd = openat(dirfd, name, O_PATH | flags);
        can_try = 0;
    }
    if (fd < 0) return errno == ENOENT || errno == ENOTDIR || errno == ELOOP || errno == ENXIO ? 0 : -1;
    struct stat st;
    int state = -1;
    if (fstat(fd, &st) == 0) {
        if (!S_ISREG(st.st_mode)) state = 0;
        else if ((state = proc_seen(set, fd, can_try)) < 0 && can_try) {
            if (flock(fd, LOCK_EX | LOCK_NB) == 0) state = 0;  /* released by the close below */
            else if (errno == EWOULDBLOCK) state = 1;
        }
    }
    close(fd);
    return state;
}

/* flock with a deadline (0 s: one try). 0, or -1. */
static int flock_within(int fd, int operation, long timeout_s) {
    struct timespec start, now, pause = {0, 2000000};
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        if (flock(fd, operation | LOCK_NB) == 0) return 0;
        if (errno != EWOULDBLOCK && errno != EINTR) return -1;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - start.tv_sec >= timeout_s) return -1;
        nanosleep(&pause, NULL);
    }
}

static int open_lock_file(int dirfd, const char *name, int create) {
    int fd = openat(dirfd, name, O_RDWR | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | (create ? O_CREAT : 0), 0600);
    if (fd < 0) return -1;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != getuid()) { close(fd); return -1; }
    return fd;
}

/* /proc/PID/stat: state (out) and start time (field 22); -1 when gone. */
static long long process_start(long pid, char *state) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p) return -1;
    p += 2;
    if (state) *state = *p;
    /* fields from 3 (state) on: start time is field 22, the 20th after the state */
    for (int i = 0; i < 19; i++) { p = strchr(p, ' '); if (!p) return -1; p++; }
    return strtoll(p, NULL, 10);
}

/* berth.runtime.fuse.daemon_mountpoint(pid) == root, and not a zombie. */
static int our_daemon(long pid, const char *root) {
    char path[64], buf[8192];
    if (pid <= 1) return 0;
    snprintf(path, sizeof path, "/proc/%ld/cmdline", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0 || (size_t)n >= sizeof buf - 1) return 0;
    buf[n] = 0;
    if (buf[n - 1] != 0) return 0;
    const char *base = strrchr(buf, '/');
    base = base ? base + 1 : buf;
    if (strcmp(base, "squashfuse") && strcmp(base, "squashfuse_ll")) return 0;
    const char *last = buf, *p = buf;
    int args = 0;
    while (p < buf + n) { last = p; args++; p += strlen(p) + 1; }
    if (args < 2 || strcmp(last, root)) return 0;
    char state = 0;
    return process_start(pid, &state) >= 0 && state != 'Z';
}

/* ------------------------------------------------------------ mount.json (flat JSON) */
#define MAX_FIELDS 16
struct record { int n; char *key[MAX_FIELDS], *value[MAX_FIELDS]; };

/* A flat JSON object whose values are numbers, strings, null, true/false or arrays of numbers
 * (what berth.runtime.imagemount writes); keys and values kept as raw text. 0, or -1. */
static int parse_record(char *text, struct record *r) {
    char *p = text;
    r->n = 0;
#define SKIP while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') p++
    SKIP;
    if (*p++ != '{') return -1;
    SKIP;
    if (*p == '}') return 0;
    for (;;) {
        SKIP;
        if (*p != '"' || r->n == MAX_FIELDS) return -1;
        char *key = ++p;
        while (*p && *p != '"') { if (*p == '\\' || (unsigned char)*p < 0x20) return -1; p++; }
        if (!*p) return -1;
        *p++ = 0;
        SKIP;
        if (*p++ != ':') return -1;
        SKIP;
        char *value = p;
        if (*p == '"') {
            p++;
            while (*p && *p != '"') { if (*p == '\\') { p++; if (!*p) return -1; } p++; }
            if (!*p) return -1;
            p++;
        } else if (*p == '[') {
            while (*p && *p != ']') { if (!strchr("0123456789-, ", *p) && *p != '[') return -1; p++; }
            if (!*p) return -1;
            p++;
        } else {
            while (*p && strchr("0123456789-+.eEnulltrfas", *p)) p++;
            if (p == value) return -1;
        }
        char *stop = p;
        SKIP;
        char next = *p;
        *stop = 0;
        r->key[r->n] = key; r->value[r->n] = value; r->n++;
        if (next == '}') return 0;
        if (next != ',') return -1;
        p++;
    }
#undef SKIP
}

static const char *record_get(const struct record *r, const char *key) {
    for (int i = 0; i < r->n; i++) if (!strcmp(r->key[i], key)) return r->value[i];
    return NULL;
}

static int whole(const char *text, long long *out) {
    if (!text || !*text) return -1;
    char *end;
    errno = 0;
    long long value = strtoll(text, &end, 10);
    if (errno || *end) return -1;
    *out = value;
    return 0;
}

/* Write the record (keys in order, skipping skip; extra appended) atomically as mount.json. */
static int write_record(int dirfd, const struct record *r, const char *skip, const char *extra) {
    char tmp[64], buf[MAX_SMALL];
    size_t used = 0;
    int first = 1;
    buf[used++] = '{';
    for (int i = 0; i < r->n; i++) {
        if (skip && (!strcmp(r->key[i], skip) || strstr(skip, r->key[i]))) continue;
        int n = snprintf(buf + used, sizeof buf - used, "%s\"%s\": %s", first ? "" : ", ", r->key[i], r->value[i]);
        if (n < 0 || (size_t)n >= sizeof buf - used) return -1;
        used += (size_t)n; first = 0;
    }
    if (extra) {
        int n = snprintf(buf + used, sizeof buf - used, "%s%s", first ? "" : ", ", extra);
        if (n < 0 || (size_t)n >= sizeof buf - used) return -1;
        used += (size_t)n;
    }
    if (used + 2 > sizeof buf) return -1;
    buf[used++] = '}';
    snprintf(tmp, sizeof tmp, ".mount.json.front-%d", (int)getpid());
    int fd = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) return -1;
    if (write(fd, buf, used) != (ssize_t)used) { close(fd); unlinkat(dirfd, tmp, 0); return -1; }
    close(fd);
    if (renameat(dirfd, tmp, dirfd, "mount.json") != 0) { unlinkat(dirfd, tmp, 0); return -1; }
    return 0;
}

static char *read_record(int dirfd, struct record *r) {
    size_t len;
    char *text = read_own_file(dirfd, "mount.json", MAX_SMALL - 1, &len, 1);
    if (!text) return NULL;
    if (parse_record(text, r) != 0) { free(text); return NULL; }
    return text;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (double)t.tv_sec + t.tv_nsec / 1e9;
}

/* Whether the mount of images/KEY (open as dirfd, at path) serves: root a mount point whose
 * recorded daemon runs (imagemount._serving). */
static int serving(const char *path, const struct record *r) {
    char root[PATH_MAX];
    struct stat a, b;
    long long pid;
    if (snprintf(root, sizeof root, "%s/root", path) >= (int)sizeof root) return 0;
    if (stat(root, &a) != 0 || stat(path, &b) != 0 || a.st_dev == b.st_dev) return 0;
    if (whole(record_get(r, "pid"), &pid) != 0) return 0;
    return our_daemon((long)pid, root);
}

/* imagemount.lingering_until > now (a number, within the longest linger). */
static int lingering(const struct record *r) {
    const char *since = record_get(r, "idle_since"), *linger = record_get(r, "linger_s");
    long long seconds;
    if (!since || whole(linger, &seconds) != 0) return 0;
    char *end;
    double start = strtod(since, &end);
    if (*end || end == since) return 0;
    double until = start + (double)seconds, now = now_s();
    return until > now && until <= now + 86400;
}

static int reaper_alive(const struct record *r) {
    const char *text = record_get(r, "reaper");
    long long pid, start;
    if (!text || sscanf(text, "[%lld, %lld]", &pid, &start) != 2 || pid <= 1) return 0;
    char state = 0;
    long long real = process_start((long)pid, &state);
    return real >= 0 && state != 'Z' && real == start;
}

/* ------------------------------------------------------------ the state directory */
static char g_state[PATH_MAX];

/* Whether anything in the state directory is for Python's stale clean-up (state.cleanup_stale):
 * NULL when nothing is, else a reason. */
static const char *stale(struct lockset *locks) {
    char path[PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/containers", g_state);
    int dirfd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dirfd < 0) return errno == ENOENT ? NULL : "the containers directory cannot be read";
    DIR *dir = fdopendir(dirfd);
    if (!dir) { close(dirfd); return "the containers directory cannot be read"; }
    struct dirent *d;
    const char *why = NULL;
    while (!why && (d = readdir(dir))) {
        if (!strcmp(d->d_name, ".") || !strcmp(d->d_name, "..")) continue;
        int sub = openat(dirfd, d->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (sub < 0) { why = "something stale in the containers directory"; break; }
        int state = lock_state(sub, "lock", locks);
        if (state == 0) why = "a container left by a berth that died";
        else if (state < 0) why = "whether a container's berth lives cannot be told";
        close(sub);
    }
    closedir(dir);
    if (why) return why;
    snprintf(path, sizeof path, "%s/images", g_state);
    dirfd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dirfd < 0) return errno == ENOENT ? NULL : "the images directory cannot be read";
    dir = fdopendir(dirfd);
    if (!dir) { close(dirfd); return "the images directory cannot be read"; }
    while (!why && (d = readdir(dir))) {
        struct stat st;
        if (!strcmp(d->d_name, ".") || !strcmp(d->d_name, "..")) continue;
        if (fstatat(dirfd, d->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
        if (!S_ISDIR(st.st_mode)) continue;  /* KEY.sqfs: a node-local copy */
        int sub = openat(dirfd, d->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (sub < 0) continue;
        int live = 0, holders = openat(sub, "holders", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (holders >= 0) {
            DIR *hd = fdopendir(holders);
            struct dirent *h;
            while (hd && (h = readdir(hd)))
                if (strcmp(h->d_name, ".") && strcmp(h->d_name, "..") && lock_state(holders, h->d_name, locks) == 1)
                    live = 1;
            if (hd) closedir(hd); else close(holders);
        }
        if (!live) {
            struct record r;
            char mount[PATH_MAX + 300];
            char *text = read_record(sub, &r);
            snprintf(mount, sizeof mount, "%s/images/%s", g_state, d->d_name);
            if (!text || !lingering(&r) || !serving(mount, &r)) why = "an image mount for the clean-up";
            free(text);
        }
        close(sub);
    }
    closedir(dir);
    return why;
}

static int mkdir_private(int dirfd, const char *name) {
    if (mkdirat(dirfd, name, 0700) != 0 && errno != EEXIST) return -1;
    struct stat st;
    if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != getuid()
        || (st.st_mode & 077))
        return -1;
    return 0;
}

/* The directory name in dirfd, opened without following a link, when it is the caller's and
 * nobody else may enter it; else -1. */
static int open_private_dir(int dirfd, const char *name) {
    int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    struct stat st;
    if (fd >= 0 && (fstat(fd, &st) != 0 || st.st_uid != getuid() || (st.st_mode & 077))) { close(fd); return -1; }
    return fd;
}

/* rm -rf of the directory open as dirfd's entries (never following a link), but keep. */
static int empty_dir(int dirfd, const char *keep, int depth) {
    DIR *dir = fdopendir(dup(dirfd));
    if (!dir) return -1;
    int failed = 0;
    struct dirent *d;
    while ((d = readdir(dir))) {
        if (!strcmp(d->d_name, ".") || !strcmp(d->d_name, "..") || (keep && !strcmp(d->d_name, keep))) continue;
        if (unlinkat(dirfd, d->d_name, 0) == 0) continue;
        if (errno != EISDIR && errno != EPERM) { failed = 1; continue; }
        if (depth > 64) { failed = 1; continue; }
        int sub = openat(dirfd, d->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (sub < 0) { failed = 1; continue; }
        fchmod(sub, 0700);
        if (empty_dir(sub, NULL, depth + 1) != 0) failed = 1;
        close(sub);
        if (unlinkat(dirfd, d->d_name, AT_REMOVEDIR) != 0) failed = 1;
    }
    closedir(dir);
    return failed ? -1 : 0;
}

/* state._remove_lock_last: everything but lock, then lock, then the directory; what cannot go
 * keeps its lock file, for the next berth's stale clean-up. */
static void remove_container(const char *path) {
    int dirfd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dirfd < 0) return;
    if (empty_dir(dirfd, "lock", 0) == 0) {
        unlinkat(dirfd, "lock", 0);
        close(dirfd);
        rmdir(path);
        return;
    }
    close(dirfd);
}

static int write_file(int dirfd, const char *name, const char *data, size_t len, mode_t mode) {
    int fd = openat(dirfd, name, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, mode);
    if (fd < 0) return -1;
    size_t done = 0;
    while (done < len) {
        ssize_t n = write(fd, data + done, len - done);
        if (n < 0) { if (errno == EINTR) continue; close(fd); return -1; }
        done += (size_t)n;
    }
    if (fchmod(fd, mode) != 0) { close(fd); return -1; }
    return close(fd);
}

/* Replace each of the n placeholders by its value in text; malloc'ed result. */
static char *fill(const char *text, size_t len, int n, const char *const *from, const char *const *to, size_t *out_len) {
    size_t cap = len + 1, used = 0;
    for (const char *p = text; p < text + len; p++) if (*p == '\\' || *p == '"') cap += PATH_MAX + 64;
    char *out = malloc(cap);
    if (!out) return NULL;
    for (size_t i = 0; i < len;) {
        int matched = 0;
        for (int k = 0; k < n; k++) {
            size_t flen = strlen(from[k]);
            if (len - i >= flen && !memcmp(text + i, from[k], flen)) {
                size_t tlen = strlen(to[k]);
                if (used + tlen + (len - i) + 1 > cap) { free(out); return NULL; }
                memcpy(out + used, to[k], tlen); used += tlen; i += flen; matched = 1; break;
            }
        }
        if (!matched) out[used++] = text[i++];
    }
    out[used] = 0;
    *out_len = used;
    return out;
}

static int json_plain(const char *text) {
    for (const unsigned char *p = (const unsigned char *)text; *p; p++)
        if (*p < 0x20 || *p >= 0x7f || *p == '"' || *p == '\\') return 0;
    return 1;
}

/* ------------------------------------------------------------------- the run */
/* In a child, before it execs a program: the signal mask berth was started with, and SIGPIPE and
 * SIGXFSZ at their default actions, as berth.proc starts every program (posix_spawn's
 * setsigdef): a caller's `trap '' PIPE` must not reach the container's command. */
static void child_signals(void) {
    signal(SIGPIPE, SIG_DFL);
    signal(SIGXFSZ, SIG_DFL);
    sigprocmask(SIG_SETMASK, &g_mask, NULL);
}

static const int FORWARDED[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGCONT, SIGWINCH};

struct run {
    struct entry *e;
    char id[16], path[PATH_MAX], image_dir[PATH_MAX];
    int lock_fd, image_fd, holder_fd;
};

static int run_wait(const char *const *argv) {
    pid_t pid = fork();
    if (pid == 0) {
        child_signals();
        int null = open("/dev/null", O_RDONLY);
        if (null >= 0) { dup2(null, 0); close(null); }
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    int status = 0;
    if (pid < 0) return -1;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    return status;
}

/* Leave the shared mount (imagemount.ImageMount.release): under the mount lock, the holder
 * goes; with another holder seen live, that is all. The front end never judges a holder dead:
 * removing one, or leaving a mount whose holders it took for dead, is imagemount._leave's, with
 * Python's look at their locks (a holder of a live container removed here left the next leaver
 * to unmount the image under it: review 10, btrfs). So only where holders/ is empty, nothing to
 * judge, the last one out refreshes a lingering mount whose reaper lives itself; any other
 * leaving (holders it does not see live, a reaper to start, an unmount) is
 * imagemount.leave_main's. */
static void release_image(struct run *r, const char *python) {
    if (r->holder_fd < 0) return;
    int lock = open_lock_file(r->image_fd, "lock", 0);
    if (lock < 0 || flock_within(lock, LOCK_EX, r->e->lock_timeout_s > 0 ? r->e->lock_timeout_s : 30) != 0) {
        if (lock >= 0) close(lock);
        close(r->holder_fd);  /* the stale clean-up of the next berth finishes it */
        r->holder_fd = -1;
        return;
    }
    char holder[64];
    snprintf(holder, sizeof holder, "holders/%s", r->id);
    unlinkat(r->image_fd, holder, 0);
    close(r->holder_fd);
    r->holder_fd = -1;
    struct lockset locks = {0};
    int live = 0, others = 0, holders = openat(r->image_fd, "holders", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (holders >= 0) {
        DIR *hd = fdopendir(holders);
        struct dirent *h;
        if (!hd) { close(holders); others = 1; }
        while (hd && !live && (h = readdir(hd))) {
            if (!strcmp(h->d_name, ".") || !strcmp(h->d_name, "..")) continue;
            others = 1;  /* a holder, or something Python's look must judge */
            if (lock_state(holders, h->d_name, &locks) == 1) live = 1;
        }
        if (hd) closedir(hd);
    } else if (errno != ENOENT) others = 1;
    free_lockset(&locks);
    if (live) { close(lock); return; }
    struct record rec;
    char *text = read_record(r->image_fd, &rec);
    long long earlier = -1;
    int done = 0;
    if (!others && text && r->e->linger_s > 0 && serving(r->image_dir, &rec) && reaper_alive(&rec)
        && (whole(record_get(&rec, "linger_s"), &earlier) != 0 || earlier <= r->e->linger_s)) {
        char extra[96];
        snprintf(extra, sizeof extra, "\"idle_since\": %.6f, \"linger_s\": %ld", now_s(), r->e->linger_s);
        done = write_record(r->image_fd, &rec, "idle_since linger_s", extra) == 0;
        if (done) debug("front end: the image mount lingers (%ld s)", r->e->linger_s);
    }
    free(text);
    close(lock);
    if (done || !python) return;
    /* The rest of leaving is Python's (imagemount.leave_main). */
    char linger[32], timeout[32];
    snprintf(linger, sizeof linger, "%ld", r->e->linger_s);
    snprintf(timeout, sizeof timeout, "%ld", r->e->lock_timeout_s);
    const char *argv[] = {python, "-c", "import sys; from berth.runtime.imagemount import leave_main; "
                          "sys.exit(leave_main(sys.argv[1:]))", r->image_dir, linger, timeout, NULL};
    debug("front end: leaving the image mount through Python");
    run_wait(argv);
}

/* The interpreter berth-py names on its first line. */
static int python_of_entry(char *out, size_t size) {
    char path[PATH_MAX], line[PATH_MAX];
    const char *slash = strrchr(g_self, '/');
    if (!slash) return -1;
    snprintf(path, sizeof path, "%.*s/berth-py", (int)(slash - g_self), g_self);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, line, sizeof line - 1);
    close(fd);
    if (n < 3 || line[0] != '#' || line[1] != '!') return -1;
    line[n] = 0;
    char *nl = strchr(line, '\n');
    if (!nl) return -1;
    *nl = 0;
    char *start = line + 2;
    while (*start == ' ') start++;
    if (*start != '/' || strchr(start, ' ')) return -1;  /* a plain interpreter path only */
    snprintf(out, size, "%s", start);
    return 0;
}

static void teardown(struct run *r, int runtime_started) {
    char python[PATH_MAX], *py = python_of_entry(python, sizeof python) == 0 ? python : NULL;
    if (runtime_started) {
        char state[PATH_MAX + 64], root[PATH_MAX + 16];
        struct stat st;
        snprintf(root, sizeof root, "%s/runc", r->path);
        snprintf(state, sizeof state, "%s/%s", root, r->id);
        if (lstat(state, &st) == 0) {
            const char *argv[] = {r->e->launcher, "--root", root, "delete", "--force", r->id, NULL};
            run_wait(argv);
        }
    }
    release_image(r, py);
    if (r->image_fd >= 0) close(r->image_fd);
    remove_container(r->path);
    close(r->lock_fd);
}

/* Undo what was done and let Python run it. */
static void undo_and_exec(struct run *r, const char *why) {
    teardown(r, 0);
    exec_python(why);
}

static int stop_pending(void) {
    sigset_t pending;
    sigpending(&pending);
    for (int i = 0; i < 4; i++) if (sigismember(&pending, FORWARDED[i])) return FORWARDED[i];
    return 0;
}

static int execute(struct entry *e) {
    struct run r = {.e = e, .lock_fd = -1, .image_fd = -1, .holder_fd = -1};
    unsigned char raw[6];
    struct timespec started_at;
    clock_gettime(CLOCK_REALTIME, &started_at);
    if (getrandom(raw, sizeof raw, 0) != (ssize_t)sizeof raw) exec_python("no random id");
    snprintf(r.id, sizeof r.id, "b%02x%02x%02x%02x%02x%02x", raw[0], raw[1], raw[2], raw[3], raw[4], raw[5]);
    if (snprintf(r.path, sizeof r.path, "%s/containers/%s", g_state, r.id) >= (int)sizeof r.path
        || snprintf(r.image_dir, sizeof r.image_dir, "%s/images/%s", g_state, e->image_key) >= (int)sizeof r.image_dir - 16)
        exec_python("the state directory's path is too long");
    if (!json_plain(r.path) || !json_plain(r.image_dir)) exec_python("the state directory's path needs escaping");

    /* Stop signals wait until the launcher runs (then they are forwarded), as Python's
     * raise_on_stop makes them undo what was done. A forwarded signal the caller ignores (nohup's
     * SIGHUP, SIGINT and SIGQUIT of a background job of a non-interactive shell) stays ignored,
     * as proc.wait_forwarding leaves it: not blocked (a blocked signal is queued even when it is
     * ignored, and was forwarded, starting the stop timer: `nohup berth run` killed its
     * container), so never taken or forwarded (runtime README, "Lifecycle"). */
    sigset_t forwarded;
    sigemptyset(&forwarded);
    for (size_t i = 0; i < sizeof FORWARDED / sizeof *FORWARDED; i++) {
        struct sigaction now;
        if (sigaction(FORWARDED[i], NULL, &now) == 0 && now.sa_handler == SIG_IGN) continue;
        sigaddset(&forwarded, FORWARDED[i]);
    }
    sigaddset(&forwarded, SIGCHLD);
    sigprocmask(SIG_BLOCK, &forwarded, NULL);

    /* The image's shared mount must be there to join (nothing is created for it here). */
    int state_fd = open(g_state, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    int images = state_fd < 0 ? -1 : open_private_dir(state_fd, "images");
    r.image_fd = images < 0 ? -1 : open_private_dir(images, e->image_key);
    if (images >= 0) close(images);
    struct stat lock_st;
    if (r.image_fd < 0 || fstatat(r.image_fd, "lock", &lock_st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(lock_st.st_mode))
        exec_python("the image is not mounted here (mounting it is Python's)");

    /* state.create */
    if (mkdir_private(state_fd, "containers") != 0) exec_python("the state directory cannot be used");
    int creation = open_lock_file(state_fd, "containers.lock", 1);
    if (creation < 0 || flock_within(creation, LOCK_SH, e->lock_timeout_s) != 0) exec_python("containers.lock is busy");
    if (mkdir(r.path, 0700) != 0) exec_python("cannot create the container directory");
    int cfd = open(r.path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    r.lock_fd = cfd < 0 ? -1 : openat(cfd, ".lock.new", O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
    if (r.lock_fd < 0 || flock(r.lock_fd, LOCK_EX | LOCK_NB) != 0 || renameat(cfd, ".lock.new", cfd, "lock") != 0) {
        if (cfd >= 0) { empty_dir(cfd, NULL, 0); close(cfd); }
        rmdir(r.path);
        exec_python("cannot lock the container directory");
    }
    close(creation);

    /* materialise.make_directories */
    static const char *dirs[] = {"lower", "rootfs", "tmp", "etc", "bundle"};
    for (size_t i = 0; i < 5; i++)
        if (mkdirat(cfd, dirs[i], 0700) != 0) { close(cfd); undo_and_exec(&r, "cannot create the container's directories"); }
    int tmpfd = openat(cfd, "tmp", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (tmpfd < 0 || fchmod(tmpfd, 01777) != 0) { close(cfd); undo_and_exec(&r, "cannot create the container's /tmp"); }
    close(tmpfd);

    /* imagemount.acquire, joining a mount that serves (mounting is Python's) */
    close(state_fd);
    int lock = open_lock_file(r.image_fd, "lock", 0);
    struct stat held, named;
    if (lock < 0 || flock_within(lock, LOCK_EX, e->lock_timeout_s) != 0 || fstat(lock, &held) != 0
        || fstatat(r.image_fd, "lock", &named, AT_SYMLINK_NOFOLLOW) != 0 || held.st_ino != named.st_ino
        || held.st_dev != named.st_dev) {
        if (lock >= 0) close(lock);
        close(cfd);
        undo_and_exec(&r, "the image mount's lock is not there to take");
    }
    char holder[64];
    snprintf(holder, sizeof holder, "holders/%s", r.id);
    struct record rec;
    char *text = NULL;
    if (mkdir_private(r.image_fd, "holders") != 0
        || (r.holder_fd = openat(r.image_fd, holder, O_CREAT | O_EXCL | O_RDWR | O_NOFOLLOW | O_CLOEXEC, 0600)) < 0
        || flock_within(r.holder_fd, LOCK_EX, e->lock_timeout_s) != 0
        || !(text = read_record(r.image_fd, &rec)) || !serving(r.image_dir, &rec)) {
        if (r.holder_fd >= 0) { unlinkat(r.image_fd, holder, 0); close(r.holder_fd); r.holder_fd = -1; }
        free(text);
        close(lock);
        close(cfd);
        undo_and_exec(&r, "the image mount does not serve (mounting it is Python's)");
    }
    if (record_get(&rec, "idle_since") && write_record(r.image_fd, &rec, "idle_since", NULL) != 0) {
        unlinkat(r.image_fd, holder, 0); close(r.holder_fd); r.holder_fd = -1;
        free(text); close(lock); close(cfd);
        undo_and_exec(&r, "cannot write the image mount's record");
    }
    debug("sharing the image mount %s/root%s", r.image_dir,  /* imagemount.acquire's words */
          record_get(&rec, "linger_s") ? " (it was lingering)" : "");
    free(text);
    close(lock);

    /* info.json, the identity files, config.json (materialise.write_bundle) */
    char root[PATH_MAX + 8], pid_text[32], started_text[64], id_json[32];
    snprintf(root, sizeof root, "%s/root", r.image_dir);
    snprintf(pid_text, sizeof pid_text, "%d", (int)getpid());
    snprintf(started_text, sizeof started_text, "%.6f", started_at.tv_sec + started_at.tv_nsec / 1e9);
    snprintf(id_json, sizeof id_json, "\"%s\"", r.id);
    const char *ifrom[] = {"\"\\u0001I\"", "\"\\u0001S\"", "\"\\u0001P\""};
    const char *ito[] = {id_json, started_text, pid_text};
    size_t info_len, config_len;
    char *info = fill(e->info, e->info_len, 3, ifrom, ito, &info_len);
    const char *cfrom[] = {"\\u0000C", "\\u0000I"};
    const char *cto[] = {r.path, root};
    char *config = fill(e->config, e->config_len, 2, cfrom, cto, &config_len);
    int ok = info && config && write_file(cfd, "info.json.tmp", info, info_len, 0600) == 0
             && renameat(cfd, "info.json.tmp", cfd, "info.json") == 0;
    int etc = ok ? openat(cfd, "etc", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) : -1;
    for (int i = 0; ok && i < e->identities; i++)
        ok = write_file(etc, e->identity_name[i], e->identity_text[i], e->identity_len[i], 0644) == 0;
    ok = ok && fchmod(etc, 0755) == 0;
    if (etc >= 0) close(etc);
    int bundle = ok ? openat(cfd, "bundle", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) : -1;
    ok = ok && bundle >= 0 && write_file(bundle, "config.json", config, config_len, 0644) == 0;
    if (bundle >= 0) close(bundle);
    free(info);
    free(config);
    close(cfd);
    if (!ok) undo_and_exec(&r, "cannot write the bundle");
    int stop = stop_pending();
    if (stop) {
        teardown(&r, 0);
        fprintf(stderr, "berth: stopped by signal SIG%s before the command started\n", sigabbrev_np(stop));
        return 128 + stop;
    }
    drop_held_signals();  /* not passed to the command as it starts */

    /* supervise.start_runtime + wait */
    char parent[32], runtime_root[PATH_MAX + 8], log[PATH_MAX + 16], bundle_path[PATH_MAX + 8];
    snprintf(parent, sizeof parent, "%d", (int)getpid());
    snprintf(runtime_root, sizeof runtime_root, "%s/runc", r.path);
    snprintf(log, sizeof log, "%s/runtime.log", r.path);
    snprintf(bundle_path, sizeof bundle_path, "%s/bundle", r.path);
    debug("runtime %s", e->launcher);
    pid_t child = fork();
    if (child < 0) { teardown(&r, 0); fprintf(stderr, "berth: error: cannot start berth-launcher: %s\n", strerror(errno)); return 125; }
    if (child == 0) {
        setsid();
        syscall(SYS_close_range, 3, ~0U, 0);
        child_signals();
        const char *argv[] = {e->launcher, "--parent-death", parent, "--root", runtime_root, "--log", log,
                              "--log-format", "text", "run", "--bundle", bundle_path, r.id, NULL};
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    int status = 0, killed = 0;
    struct timespec deadline = {0, 0}, now;
    for (;;) {
        pid_t done = waitpid(child, &status, WNOHANG);
        if (done == child) break;
        struct timespec wait_for = {1, 0};
        if (deadline.tv_sec) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            long long left = (deadline.tv_sec - now.tv_sec) * 1000000000LL + (deadline.tv_nsec - now.tv_nsec);
            if (left <= 0 && !killed) {
                killed = 1;
                fprintf(stderr, "berth: container did not stop within --stop-timeout %g s: killing it\n",
                        e->stop_timeout_ms / 1000.0);
                const char *argv[] = {e->launcher, "--root", runtime_root, "kill", r.id, "KILL", NULL};
                run_wait(argv);
                continue;
            }
            if (!killed && left < 1000000000LL) { wait_for.tv_sec = 0; wait_for.tv_nsec = left; }
        }
        siginfo_t info_s;
        int sig = sigtimedwait(&forwarded, &info_s, &wait_for);
        if (sig <= 0 || sig == SIGCHLD) continue;
        kill(child, sig);
        if (!deadline.tv_sec && (sig == SIGTERM || sig == SIGINT || sig == SIGHUP || sig == SIGQUIT)) {
            clock_gettime(CLOCK_MONOTONIC, &deadline);
            deadline.tv_sec += e->stop_timeout_ms / 1000;
            deadline.tv_nsec += (e->stop_timeout_ms % 1000) * 1000000L;
            if (deadline.tv_nsec >= 1000000000L) { deadline.tv_sec++; deadline.tv_nsec -= 1000000000L; }
            if (!deadline.tv_sec) deadline.tv_sec = 1;
        }
    }
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : WIFSIGNALED(status) ? 128 + WTERMSIG(status) : 125;
    char message[1024] = "";
    if (code != 0 && code < 128) {  /* supervise.runtime_error: the launcher's own level=error line */
        size_t len;
        int cfd2 = open(r.path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        char *logtext = cfd2 >= 0 ? read_own_file(cfd2, "runtime.log", MAX_ENTRY, &len, 1) : NULL;
        if (cfd2 >= 0) close(cfd2);
        for (char *line = logtext ? strtok(logtext, "\n") : NULL; line; line = strtok(NULL, "\n")) {
            if (!strstr(line, "level=error")) continue;
            char *msg = strstr(line, "msg=\"");
            if (msg) {
                msg += 5;
                char *q = strrchr(msg, '"');
                if (q) *q = 0;
            } else msg = line;
            /* As supervise.runtime_error and cli.output.printable write it: \" unescaped, and no
             * terminal escapes from a log (control characters as Python's repr writes them). */
            char *to = msg;
            for (const char *c = msg; *c; c++)
                if (!(*c == '\\' && c[1] == '"')) *to++ = *c;
            *to = 0;
            printable(msg, message, sizeof message, 1);  /* read_text(errors="replace") */
        }
        free(logtext);
    }
    teardown(&r, 1);
    if (message[0]) {
        fprintf(stderr, "berth: error: berth-launcher could not start the container: %s\n"
                "berth: hint: run with --debug, and 'berth doctor' to check this node\n", message);
        return 125;
    }
    return code;
}

int main(int argc, char **argv) {
    g_argc = argc;
    g_argv = argv;
    sigprocmask(SIG_SETMASK, NULL, &g_mask);
    ssize_t n = readlink("/proc/self/exe", g_self, sizeof g_self - 1);
    if (n <= 0) { fprintf(stderr, "berth: error: /proc/self/exe cannot be read\n"); return 125; }
    g_self[n] = 0;
    if (argc == 2 && !strcmp(argv[1], "--print-key")) {  /* for tests/unit/test_compiledplan.py */
        char key[65];
        const char *why;
        if (run_key(key, &why) != 0) { fprintf(stderr, "%s\n", why); return 1; }
        puts(key);
        return 0;
    }
    int run = argc > 1 && !strcmp(argv[1], "run");
    if (argc > 2 && !strcmp(argv[1], "--debug") && !strcmp(argv[2], "run")) run = g_debug = 1;
    if (argc > 2 && run && !strcmp(argv[2], "--debug")) g_debug = 1;
    if (!run) exec_python(NULL);
    if (getuid() == 0 || geteuid() != getuid() || getegid() != getgid()) exec_python("run as root");

    /* Where Python keeps plans (plancache.cache_directory). */
    const char *base = getenv("BERTH_STATE_DIR"), *xdg = getenv("XDG_RUNTIME_DIR");
    char candidate[PATH_MAX];
    if (base && *base) {
        if (base[0] != '/') exec_python("BERTH_STATE_DIR is relative");
        snprintf(candidate, sizeof candidate, "%s", base);
    } else if (xdg && xdg[0] == '/' && is_private_dir(xdg)) {
        snprintf(candidate, sizeof candidate, "%s/berth", xdg);
    } else {
        snprintf(candidate, sizeof candidate, "/tmp/berth-%d", (int)getuid());
    }
    if (!is_private_dir(candidate)) exec_python("no private state directory");
    char plans[PATH_MAX + 8], key[65], name[70];
    snprintf(plans, sizeof plans, "%s/plans", candidate);
    if (!is_private_dir(plans)) exec_python("no plans");
    const char *why;
    if (run_key(key, &why) != 0) exec_python(why);
    int dirfd = open(plans, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    size_t len;
    snprintf(name, sizeof name, "c-%s", key);
    char *buf = dirfd >= 0 ? read_own_file(dirfd, name, MAX_ENTRY, &len, 1) : NULL;
    if (dirfd >= 0) close(dirfd);
    if (!buf) exec_python("no compiled entry");
    struct entry e;
    why = parse_entry(buf, len, &e);
    if (why) exec_python(why);
    if (strcmp(e.key, key) || e.uid != (long)getuid() || strcmp(e.front, g_self))
        exec_python("the entry is for another run");
    if (!realpath(candidate, g_state) || strcmp(g_state, e.state_dir) || !is_private_dir(g_state))
        exec_python("the entry's state directory is not this one");
    g_debug = g_debug || e.debug;
    int on = plan_cache_on();
    if (on != 1) exec_python(on == 0 ? "the setting plan_cache is off" : "the settings are Python's to read");
    struct lockset locks = {0};
    why = stale(&locks);
    free_lockset(&locks);
    if (why) exec_python(why);
    char python[PATH_MAX];
    if (python_of_entry(python, sizeof python) != 0)  /* a mount's leaving may need it (release_image) */
        exec_python("berth-py names no plain interpreter on its first line");
    debug("front end: hit (%.12s): running the compiled plan", key);
    int code = execute(&e);
    fflush(stdout);
    return code;
}
