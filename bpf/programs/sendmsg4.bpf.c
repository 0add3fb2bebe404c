// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/sendmsg4: unconnected UDP. sendto()/sendmsg() with a destination
 * address never pass through connect4, so each such datagram gets here what
 * connect4 gives a connection: a clusterIP:port is rewritten to a backend
 * pod drawn for this datagram, then L4 policy is judged on the pod, and a
 * denied send fails with EPERM (connect.h, datagram_send). Connected UDP
 * sockets were translated and judged at connect() and send without an
 * address, so this hook does not run for them. A dual-stack AF_INET6
 * socket's sendto() to ::ffff:a.b.c.d comes here too: the kernel sends it
 * through the IPv4 path.
 */
#include "connect.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup/sendmsg4")
int weft_sendmsg4(struct bpf_sock_addr *ctx)
{
	return datagram_send(ctx);
}
