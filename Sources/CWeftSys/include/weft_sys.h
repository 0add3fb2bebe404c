/* Linux calls that Swift's Glibc module hides behind _GNU_SOURCE. */
#ifndef WEFT_SYS_H
#define WEFT_SYS_H

/* Joins the network namespace behind fd (CLONE_NEWNET); 0 or -1 with errno. */
int weft_setns_net(int fd);

/* pidfd_open(2): an fd that polls readable when the process exits; -1 with errno. */
int weft_pidfd_open(int pid);

#endif
