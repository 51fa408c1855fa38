/* Run as the builder: tries to reach the kernel keyrings and prints one line
 * per attempt, "refused: <what>: <errno>" or "ALLOWED: <what>: <result>".
 * argv[1]: the serial of the caller's session keyring; argv[2]: the
 * description of a "user" key the caller added to it.
 * Raw syscalls, no libkeyutils: the probe must not depend on a library the
 * sandbox does not have. Built with gcc -static by tests/it/sandbox.rs. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define KEY_SPEC_SESSION_KEYRING -3
#define KEY_SPEC_USER_KEYRING -4
#define KEYCTL_GET_KEYRING_ID 0
#define KEYCTL_DESCRIBE 6
#define KEYCTL_CLEAR 7
#define KEYCTL_SEARCH 10
#define KEYCTL_READ 11

static void report(const char *what, long ret) {
    if (ret < 0)
        printf("refused: %s: %s\n", what, strerror(errno));
    else
        printf("ALLOWED: %s: %ld\n", what, ret);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: keyring CALLER-SESSION-SERIAL KEY-DESCRIPTION\n");
        return 2;
    }
    long caller = strtol(argv[1], NULL, 10);
    const char *desc = argv[2];
    char buf[256];
    report("add a key to the session keyring",
           syscall(SYS_add_key, "user", "sandoff-probe", "x", 1, KEY_SPEC_SESSION_KEYRING));
    report("add a key to the user keyring",
           syscall(SYS_add_key, "user", "sandoff-probe", "x", 1, KEY_SPEC_USER_KEYRING));
    report("describe the caller's session keyring",
           syscall(SYS_keyctl, KEYCTL_DESCRIBE, caller, buf, sizeof buf));
    report("read the caller's session keyring",
           syscall(SYS_keyctl, KEYCTL_READ, caller, buf, sizeof buf));
    report("clear the caller's session keyring", syscall(SYS_keyctl, KEYCTL_CLEAR, caller));
    report("search the session keyring for the caller's key",
           syscall(SYS_keyctl, KEYCTL_SEARCH, KEY_SPEC_SESSION_KEYRING, "user", desc, 0));
    report("request the caller's key", syscall(SYS_request_key, "user", desc, NULL, 0));
    report("find the session keyring",
           syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0));
    report("find the user keyring",
           syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0));
    return 0;
}
