/* The keyring calls through every system call entry an x86_64 machine has: the native one, the
   x32 one (number | 0x40000000, same entry) and the i386 one (int $0x80, its own numbers). A
   seccomp filter that knows only the native numbers lets the others through. Prints the raw
   result of each (a negative errno on failure: -1 is EPERM). */
#include <stdio.h>
static long native(long nr, long a, long b, long c) {
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(nr), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return ret;
}
static long i386(long nr, long a, long b, long c) {
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    return ret;
}
int main(void) {
    /* keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0): 250 native, 288 on i386;
       add_key(NULL, ...): 248 native, 286 on i386; request_key: 249, 287. */
    printf("native-keyctl %ld\n", native(250, 0, -3, 0));
    printf("x32-keyctl %ld\n", native(0x40000000L | 250, 0, -3, 0));
    printf("i386-keyctl %ld\n", i386(288, 0, -3, 0));
    printf("i386-add_key %ld\n", i386(286, 0, 0, 0));
    printf("i386-request_key %ld\n", i386(287, 0, 0, 0));
    printf("i386-getpid %ld\n", i386(20, 0, 0, 0));
    return 0;
}
