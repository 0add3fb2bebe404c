/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Includes and verdicts shared by every Weft program. */
#ifndef WEFT_BPF_COMMON_H
#define WEFT_BPF_COMMON_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "weft_abi.h"

/* cgroup sock_addr hooks: 1 lets the call proceed, 0 rejects it (EPERM unless
 * the program set another error with bpf_set_retval()). */
#define SYS_PROCEED 1
#define SYS_REJECT  0

/* Writes an address into whichever field the socket family uses (for
 * AF_INET6 the v4-mapped tail): connect's destination, a peer given back. */
static __always_inline void set_destination(struct bpf_sock_addr *ctx, int v6, __be32 addr, __be16 port)
{
	if (v6)
		ctx->user_ip6[3] = addr;
	else
		ctx->user_ip4 = addr;
	ctx->user_port = (__u32)port;
}

#endif
