// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/connect4: socket-level load balancing. A connect() to a Service
 * clusterIP:port is rewritten, before the kernel sends anything, to a backend
 * pod's address:targetPort. The socket then talks to the pod directly: no NAT
 * per packet, no conntrack entry, and the reply path needs no translation.
 * The dialed address is kept in socket storage for getpeername4/recvmsg4.
 *
 * Then L4 policy (NetworkPolicy) is judged on the final pod address, as
 * Kubernetes defines it: a denied connect() fails here with EPERM, before a
 * SYN is sent.
 *
 * A Service port flagged L7 is not balanced here when a local pod dials it:
 * the connection goes to the node proxy (capture.h).
 */
#include "connect.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup/connect4")
int weft_connect4(struct bpf_sock_addr *ctx)
{
	return connect_verdict(ctx, ctx->user_ip4, 0);
}
