/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Giving a translated socket back the address its application dialed. */
#ifndef WEFT_BPF_ORIGIN_H
#define WEFT_BPF_ORIGIN_H

#include "counters.h"

/* Returns whether the socket had an origin (it was connected to a clusterIP). */
static __always_inline int origin_restore(struct bpf_sock_addr *ctx)
{
	struct weft_sock_origin *origin;

	if (!ctx->sk)
		return 0;
	origin = bpf_sk_storage_get(&weft_sock_origin, ctx->sk, 0, 0);
	if (!origin)
		return 0;
	ctx->user_ip4 = origin->vip;
	ctx->user_port = (__u32)origin->port;
	lb_count(WEFT_LB_PEER_RESTORED);
	return 1;
}

#endif
