// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sockops: when a connection connect4 sent to the node proxy completes its
 * handshake, publish what it dialed under the client's (address, port), the
 * key the proxy sees on accept(). ACTIVE_ESTABLISHED runs on the client as
 * the SYN-ACK arrives, before its final ACK leaves, so the entry is there
 * before the proxy's accept() can return the connection.
 */
#include "counters.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("sockops")
int weft_sockops(struct bpf_sock_ops *skops)
{
	struct weft_proxy_origin_key key = {};
	struct weft_proxy_origin value = {};
	struct weft_sock_origin *origin;
	struct bpf_sock *sk;

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || skops->family != 2 /* AF_INET */)
		return 1;
	sk = skops->sk;
	if (!sk)
		return 1;
	origin = bpf_sk_storage_get(&weft_sock_origin, sk, 0, 0);
	if (!origin || !(origin->flags & WEFT_ORIGIN_F_PROXY))
		return 1;
	key.client_addr = skops->local_ip4;
	/* local_port is in host order, unlike remote_port. */
	key.client_port = bpf_htons((__u16)skops->local_port);
	value.vip = origin->vip;
	value.port = origin->port;
	value.service_id = origin->service_id;
	value.source = origin->source;
	bpf_map_update_elem(&weft_proxy_origins, &key, &value, BPF_ANY);
	lb_count(WEFT_LB_PROXY_ORIGIN);
	return 1;
}
