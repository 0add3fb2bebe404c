// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/recvmsg4: datagrams from a backend are reported as coming from the
 * clusterIP the application addressed, as for getpeername: for a UDP socket
 * connected to a clusterIP from its socket storage, for an unconnected one
 * from weft_udp_revnat (written by sendmsg4).
 */
#include "origin.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup/recvmsg4")
int weft_recvmsg4(struct bpf_sock_addr *ctx)
{
	struct weft_udp_flow_key key = {};
	struct weft_udp_revnat *nat;

	if (origin_restore(ctx))
		return SYS_PROCEED;
	key.cookie = bpf_get_socket_cookie(ctx);
	key.peer = ctx->user_ip4;
	key.port = (__be16)ctx->user_port;
	nat = bpf_map_lookup_elem(&weft_udp_revnat, &key);
	if (nat) {
		ctx->user_ip4 = nat->vip;
		ctx->user_port = (__u32)nat->port;
		lb_count(WEFT_LB_PEER_RESTORED);
	}
	return SYS_PROCEED;
}
