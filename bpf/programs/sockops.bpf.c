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
	__u32 v4, v6;

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	sk = skops->sk;
	if (!sk)
		return 1;
	origin = bpf_sk_storage_get(&weft_sock_origin, sk, 0, 0);
	if (!origin || !(origin->flags & WEFT_ORIGIN_F_PROXY))
		return 1;
	/* A dual-stack socket (connect6 captured it) carries its IPv4
	 * address v4-mapped in local_ip6. Both fields are read first: the
	 * verifier refuses a ctx load at a computed offset, which is what
	 * clang makes of a branch between two loads. */
	v4 = skops->local_ip4;
	v6 = skops->local_ip6[3];
	asm volatile("" : "+r"(v4), "+r"(v6));  /* keep both loads as they are */
	key.client_addr = skops->family == 10 /* AF_INET6 */ ? v6 : v4;
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
