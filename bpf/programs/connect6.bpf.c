// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/connect6: the same verdict as connect4 for IPv4 destinations dialed
 * through a dual-stack AF_INET6 socket (::ffff:a.b.c.d). gRPC's C core, Java
 * and Go open such sockets by default; without this hook their connect() to
 * a clusterIP would bypass translation, capture and policy. Native IPv6
 * destinations are not handled by Weft yet and pass untouched.
 */
#include "connect.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup/connect6")
int weft_connect6(struct bpf_sock_addr *ctx)
{
	if (!is_v4_mapped(ctx))
		return SYS_PROCEED;
	return connect_verdict(ctx, ctx->user_ip6[3], 1);
}
