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
	origin_restore_datagram(ctx, ctx->user_ip4, 0);
	return SYS_PROCEED;
}
