/* Keyring escape probe (issue 8, scenario 9). host mode: new named session keyring with a
   secret key, a secret key in the user keyring, then run argv (berth run ... probe), then check
   that nothing the container added shows up in the host's keyrings. probe mode (in the
   container): try to reach the host's keys and keyrings by serial, by name, by description. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#define KEY_SPEC_SESSION_KEYRING -3
#define KEY_SPEC_USER_KEYRING -4
#define KEYCTL_GET_KEYRING_ID 0
#define KEYCTL_JOIN_SESSION_KEYRING 1
#define KEYCTL_READ 11
#define KEYCTL_SEARCH 10
#define KEYCTL_LINK 8
static long add_key(const char *t, const char *d, const void *p, size_t n, long ring) {
    return syscall(SYS_add_key, t, d, p, n, ring);
}
static long keyctl(int op, long a, long b, long c, long d) { return syscall(SYS_keyctl, op, a, b, c, d); }
static long request_key(const char *t, const char *d, long ring) {
    return syscall(SYS_request_key, t, d, NULL, ring);
}
static const char SECRET[] = "berth-host-secret";
int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "host")) {
        long ses = keyctl(KEYCTL_JOIN_SESSION_KEYRING, (long)"berth-host-session", 0, 0, 0);
        long k1 = add_key("user", "berth-session-secret", SECRET, sizeof SECRET, KEY_SPEC_SESSION_KEYRING);
        long k2 = add_key("user", "berth-user-secret", SECRET, sizeof SECRET, KEY_SPEC_USER_KEYRING);
        long ur = keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 1, 0, 0);
        if (ses < 0 || k1 < 0 || k2 < 0 || ur < 0) { perror("host set-up"); return 2; }
        char env[256];
        snprintf(env, sizeof env, "%ld %ld %ld %ld", ses, ur, k1, k2);
        setenv("BERTH_HOST_KEYS", env, 1);
        printf("host session=%ld user=%ld keys=%ld,%ld\n", ses, ur, k1, k2);
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) { execvp(argv[2], argv + 2); perror("exec"); _exit(127); }
        int status;
        waitpid(pid, &status, 0);
        /* Did the container's add_key land in the host's keyrings? */
        long found = keyctl(KEYCTL_SEARCH, KEY_SPEC_SESSION_KEYRING, (long)"user", (long)"berth-from-container", 0);
        long found_u = keyctl(KEYCTL_SEARCH, KEY_SPEC_USER_KEYRING, (long)"user", (long)"berth-from-container", 0);
        printf("host after: container key in session %s, in user keyring %s\n",
               found >= 0 ? "ESCAPED" : "absent", found_u >= 0 ? "ESCAPED" : "absent");
        return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
    }
    /* probe mode, argv[1..4] = host session, user keyring, session key, user key */
    if (argc < 5) { fprintf(stderr, "usage\n"); return 2; }
    long host[4];
    for (int i = 0; i < 4; i++) host[i] = atol(argv[i + 1]);
    char buf[256];
    long ses = keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0, 0, 0);
    long ur = keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0, 0, 0);
    printf("session keyring %ld: %s\n", ses, ses == host[0] ? "ESCAPED (the host's)" : "own");
    printf("user keyring %ld: %s\n", ur, ur == host[1] ? "ESCAPED (the host's)" : "own");
    for (int i = 0; i < 2; i++) {
        long n = keyctl(KEYCTL_LINK, host[i], KEY_SPEC_SESSION_KEYRING, 0, 0);
        printf("link host keyring %ld: %s\n", host[i], n == 0 ? "ESCAPED" : strerror(errno));
    }
    for (int i = 2; i < 4; i++) {
        memset(buf, 0, sizeof buf);
        long n = keyctl(KEYCTL_READ, host[i], (long)buf, sizeof buf, 0);
        printf("read host key %ld: %s\n", host[i], n > 0 && strstr(buf, "berth-host-secret") ? "ESCAPED" : strerror(errno));
        long l = keyctl(KEYCTL_LINK, host[i], KEY_SPEC_SESSION_KEYRING, 0, 0);
        printf("link host key %ld: %s\n", host[i], l == 0 ? "ESCAPED" : strerror(errno));
    }
    const char *descs[] = {"berth-session-secret", "berth-user-secret"};
    for (int i = 0; i < 2; i++) {
        errno = 0;
        long r = request_key("user", descs[i], 0);
        printf("request_key %s: %s\n", descs[i], r >= 0 ? "ESCAPED" : strerror(errno));
    }
    long j = keyctl(KEYCTL_JOIN_SESSION_KEYRING, (long)"berth-host-session", 0, 0, 0);
    printf("join the host's named session keyring: %s\n", j == host[0] ? "ESCAPED" : (j < 0 ? strerror(errno) : "a new one of its own"));
    long a = add_key("user", "berth-from-container", "x", 1, KEY_SPEC_USER_KEYRING);
    long b = add_key("user", "berth-from-container", "x", 1, KEY_SPEC_SESSION_KEYRING);
    printf("add_key in the container: %s\n", a >= 0 && b >= 0 ? "allowed (its own keyrings)" : strerror(errno));
    return 0;
}
