// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/recvmsg4: for a UDP socket connected to a clusterIP, datagrams from
 * the backend are reported as coming from the clusterIP, as for getpeername.
 */
#include "origin.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup/recvmsg4")
int weft_recvmsg4(struct bpf_sock_addr *ctx)
{
	origin_restore(ctx);
	return SYS_PROCEED;
}
