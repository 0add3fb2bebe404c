// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/recvmsg6: recvmsg4's twin for dual-stack sockets: a datagram from a
 * backend reached as ::ffff:<pod> is reported as from ::ffff:<clusterIP>.
 * (There is no sendmsg6: the kernel sends a dual-stack socket's datagram to
 * ::ffff:a.b.c.d through the IPv4 path, which runs sendmsg4 on a.b.c.d. The
 * receive side converts before its hook, so recvmsg4 never sees it.)
 */
#include "connect.h"
#include "origin.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup/recvmsg6")
int weft_recvmsg6(struct bpf_sock_addr *ctx)
{
	if (is_v4_mapped(ctx))
		origin_restore_datagram(ctx, ctx->user_ip6[3], 1);
	return SYS_PROCEED;
}
