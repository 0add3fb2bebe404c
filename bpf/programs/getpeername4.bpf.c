// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/getpeername4: an application that connected to a clusterIP sees the
 * clusterIP as its peer, not the pod connect4 chose. Clients that check the
 * peer (TLS SNI fallbacks, logging, some RPC stacks) keep working.
 */
#include "origin.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup/getpeername4")
int weft_getpeername4(struct bpf_sock_addr *ctx)
{
	origin_restore(ctx, 0);
	return SYS_PROCEED;
}
