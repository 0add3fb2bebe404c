// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/getpeername6: getpeername4's twin for dual-stack sockets that
 * connect6 translated: the application sees ::ffff:<clusterIP> it dialed.
 */
#include "counters.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup/getpeername6")
int weft_getpeername6(struct bpf_sock_addr *ctx)
{
	struct weft_sock_origin *origin;

	if (!ctx->sk)
		return SYS_PROCEED;
	origin = bpf_sk_storage_get(&weft_sock_origin, ctx->sk, 0, 0);
	if (!origin)
		return SYS_PROCEED;
	ctx->user_ip6[3] = origin->vip;
	ctx->user_port = (__u32)origin->port;
	lb_count(WEFT_LB_PEER_RESTORED);
	return SYS_PROCEED;
}
