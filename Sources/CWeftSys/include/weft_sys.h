/* Linux calls that Swift's Glibc module hides behind _GNU_SOURCE. */
#ifndef WEFT_SYS_H
#define WEFT_SYS_H

/* Joins the network namespace behind fd (CLONE_NEWNET); 0 or -1 with errno. */
int weft_setns_net(int fd);

/* pidfd_open(2): an fd that polls readable when the process exits; -1 with errno. */
int weft_pidfd_open(int pid);

/* The CPUs the calling thread may run on, ascending, into cpus (at most
   max); their count, or -1 with errno. */
int weft_thread_cpus(int *cpus, int max);

/* Binds the calling thread to one CPU; 0 or -1 with errno. */
int weft_pin_thread(int cpu);

#endif
