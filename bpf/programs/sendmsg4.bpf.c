// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/sendmsg4: L4 policy for unconnected UDP. sendto()/sendmsg() with a
 * destination address never pass through connect4, so each such datagram is
 * judged here on its destination, the way connect4 judges a connection: a
 * denied send fails with EPERM. (Connected UDP sockets were judged at
 * connect() and send without an address, so this hook does not run for them.)
 */
#include "policy.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup/sendmsg4")
int weft_sendmsg4(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_UDP)
		return SYS_PROCEED;
	if (policy_connect_verdict(ctx->user_ip4, (__be16)ctx->user_port, IPPROTO_UDP)) {
		bpf_set_retval(-EPERM);
		return SYS_REJECT;
	}
	return SYS_PROCEED;
}
