#define _GNU_SOURCE
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "weft_sys.h"

int weft_setns_net(int fd) { return setns(fd, CLONE_NEWNET); }

int weft_pidfd_open(int pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }
