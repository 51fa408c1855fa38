/* Run as the builder: forks children that sleep until fork fails, then
 * reports how many it made and why it stopped. Gives up (and says so) after
 * MAX_FORKS, so that without a process limit it stops short of hurting the
 * host. Built with gcc -static by tests/it/sandbox.rs. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define MAX_FORKS 1000

int main(void) {
    int n = 0;
    for (;;) {
        pid_t p = fork();
        if (p < 0) {
            printf("stopped after %d forks: %s\n", n, strerror(errno));
            return 0;
        }
        if (p == 0) {
            pause();
            _exit(0);
        }
        if (++n >= MAX_FORKS) {
            printf("NOT STOPPED after %d forks\n", n);
            return 1;
        }
    }
}
