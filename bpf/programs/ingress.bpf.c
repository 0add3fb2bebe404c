// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup_skb/ingress: a pod's ingress policy, at the pod. connect4 already
 * stops mesh clients on their own node; this hook holds everyone else to the
 * policy too — clients on nodes without Weft, processes outside every pod
 * cgroup, addresses outside the cluster.
 *
 * It judges new flows only: a TCP segment that opens a connection (SYN
 * without ACK), and a UDP datagram to an unconnected socket from a peer it
 * has not exchanged allowed datagrams with lately (weft_udp_flows). A
 * connected UDP socket only receives from the peer its connect() chose, and
 * connect4 judged that.
 * Other TCP segments pass after a header read, so an established connection
 * costs two bounds-checked loads per packet and no map lookup; a UDP
 * datagram to a mesh pod costs two hash lookups. Kubernetes
 * leaves open whether a policy change cuts established connections; here it
 * does not.
 */
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#include "policy.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define SKB_PASS 1
#define SKB_DROP 0

SEC("cgroup_skb/ingress")
int weft_ingress(struct __sk_buff *skb)
{
	struct iphdr ip;
	struct weft_endpoint *dst, *src;
	struct policy_peer peer;
	struct bpf_sock *sk;
	__be16 ports[2];
	__u64 cookie = 0;
	__u32 l4;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return SKB_PASS;
	/* cgroup_skb sees the packet from its network header. */
	if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)))
		return SKB_PASS;
	if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP)
		return SKB_PASS;
	l4 = (__u32)ip.ihl * 4;
	if (ip.protocol == IPPROTO_TCP) {
		__u8 flags;

		/* Byte 13 of the TCP header holds the flags. */
		if (bpf_skb_load_bytes(skb, l4 + 13, &flags, 1))
			return SKB_PASS;
		if ((flags & (0x02 | 0x10)) != 0x02)  /* not SYN-without-ACK */
			return SKB_PASS;
	}
	/* A pod's traffic to itself is never subject to policy. */
	if (ip.saddr == ip.daddr || is_loopback(ip.saddr))
		return SKB_PASS;
	dst = endpoint_lookup(ip.daddr);
	if (!dst)
		return SKB_PASS;
	/* PeerAuthentication STRICT: a new TCP flow must come from this node,
	 * that is from its proxy (which delivers what arrived through an mTLS
	 * tunnel) or from one of its pods. Plaintext from another node is
	 * dropped here, before any policy. */
	if (ip.protocol == IPPROTO_TCP && (dst->flags & WEFT_EP_F_MTLS_STRICT)) {
		src = endpoint_lookup(ip.saddr);
		if (!src || (src->identity != WEFT_ID_HOST && !(src->flags & WEFT_EP_F_LOCAL))) {
			if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)))
				ports[1] = 0;
			policy_count_drop(src ? src->identity : WEFT_ID_WORLD, dst->identity, ports[1], ip.protocol,
					  WEFT_DROP_PLAINTEXT);
			return SKB_DROP;
		}
	}
	if (ip.protocol == IPPROTO_UDP) {
		/* Every mesh pod's UDP exchanges are remembered, isolated or
		 * not, so that its replies (judged at sendmsg) are known. */
		if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)))
			return SKB_PASS;
		sk = skb->sk;
		if (sk)
			sk = bpf_sk_fullsock(sk);
		if (sk && sk->dst_ip4 && sk->dst_ip4 == ip.saddr && sk->dst_port == ports[0])
			return SKB_PASS;
		cookie = bpf_get_socket_cookie(skb);
		if (udp_flow_known(cookie, ip.saddr, ports[0]))
			return SKB_PASS;
		if (!(dst->flags & WEFT_EP_F_INGRESS_ISOLATED)) {
			udp_flow_remember(cookie, ip.saddr, ports[0]);
			return SKB_PASS;
		}
	} else {
		if (!(dst->flags & (WEFT_EP_F_INGRESS_ISOLATED | WEFT_EP_F_AUTHZ)))
			return SKB_PASS;
		if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)))
			return SKB_DROP;  /* truncated header for a pod under policy */
		if (dst->flags & WEFT_EP_F_AUTHZ) {
			src = endpoint_lookup(ip.saddr);
			if (authz_verdict(dst, src, ip.saddr, ports[1])) {
				policy_count_drop(src ? src->identity : WEFT_ID_WORLD, dst->identity, ports[1], ip.protocol,
						  WEFT_DROP_AUTHZ);
				return SKB_DROP;
			}
			if (!(dst->flags & WEFT_EP_F_INGRESS_ISOLATED))
				return SKB_PASS;
		}
	}
	src = endpoint_lookup(ip.saddr);
	peer = policy_peer_of(ip.saddr, src);
	if (policy_allows(dst, WEFT_DIR_INGRESS, peer, ip.protocol, ports[1])) {
		if (ip.protocol == IPPROTO_UDP)
			udp_flow_remember(cookie, ip.saddr, ports[0]);
		return SKB_PASS;
	}
	policy_count_drop(peer.identity, dst->identity, ports[1], ip.protocol, WEFT_DROP_INGRESS);
	return SKB_DROP;
}
