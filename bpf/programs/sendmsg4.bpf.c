// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/sendmsg4: L4 policy for unconnected UDP. sendto()/sendmsg() with a
 * destination address never pass through connect4, so each such datagram is
 * judged here on its destination, the way connect4 judges a connection: a
 * denied send fails with EPERM. (Connected UDP sockets were judged at
 * connect() and send without an address, so this hook does not run for them.)
 * Replies are not judged: see weft_udp_flow_key.
 */
#include "policy.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup/sendmsg4")
int weft_sendmsg4(struct bpf_sock_addr *ctx)
{
	__be32 peer = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;
	__u64 cookie;

	if (ctx->protocol != IPPROTO_UDP)
		return SYS_PROCEED;
	cookie = bpf_get_socket_cookie(ctx);
	/* A reply to a datagram policy let in, or more of an allowed exchange. */
	if (udp_flow_known(cookie, peer, port))
		return SYS_PROCEED;
	if (policy_connect_verdict(peer, port, IPPROTO_UDP)) {
		bpf_set_retval(-EPERM);
		return SYS_REJECT;
	}
	udp_flow_remember(cookie, peer, port);
	return SYS_PROCEED;
}
