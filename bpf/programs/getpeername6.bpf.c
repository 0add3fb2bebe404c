// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/getpeername6: getpeername4's twin for dual-stack sockets that
 * connect6 translated: the application sees ::ffff:<clusterIP> it dialed.
 */
#include "origin.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup/getpeername6")
int weft_getpeername6(struct bpf_sock_addr *ctx)
{
	origin_restore(ctx, 1);
	return SYS_PROCEED;
}
