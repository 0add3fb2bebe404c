#define _GNU_SOURCE
#include <sched.h>
#include "weft_sys.h"

int weft_setns_net(int fd) { return setns(fd, CLONE_NEWNET); }
