// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sockops on the pods' cgroups, for the TCP connections pods open:
 *
 * - When a connection connect4 sent to the node proxy completes its
 *   handshake, publish what it dialed under the client's (address, port),
 *   the key the proxy sees on accept(). ACTIVE_ESTABLISHED runs on the
 *   client as the SYN-ACK arrives, before its final ACK leaves, so the entry
 *   is there before the proxy's accept() can return the connection.
 * - Count every connection in weft_flows (see weft_flow_key). TCP_CONNECT_CB
 *   marks a socket to count (a callback flag of its own, FLOW_MARK, and the
 *   state callbacks): the handshake counts it opened, TCP_CLOSE counts it
 *   failed (from SYN_SENT) or closed with its bytes, and clears the mark so
 *   nothing counts it twice. The key is made from the socket's ends and its
 *   weft_sock_origin (what connect4 translated) when counted; no storage of
 *   its own, whose allocation at every connect was most of what counting
 *   cost (about 1.3 µs of a connection's 2.9 µs in the kernel).
 *
 * The bytes are the socket's own sequence-space counters (bytes_acked,
 * bytes_received) less what is not data: the SYN (always acknowledged on an
 * established connection), our FIN if the peer acknowledged it, the peer's
 * FIN if it arrived (SOCK_DONE, which only tcp_fin sets). The few kernel
 * fields read are relocated against the running kernel's BTF (CO-RE).
 */
#include "counters.h"
#include "flows.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* sk_flags is __sk_common.skc_flags; a tcp_sock starts with its sock_common. */
struct sock_common {
	unsigned long skc_flags;
} __attribute__((preserve_access_index));

struct tcp_sock {
	__u32 write_seq;
} __attribute__((preserve_access_index));

#define SOCK_DONE_BIT 1        /* enum sock_flags: SOCK_DEAD, SOCK_DONE, ... */
/* The socket is counted: a callback flag nothing else here sets, whose only
 * effect is a call on a retransmission timeout (ignored), and which stays
 * with the socket for free. (The state callbacks cannot say it: the
 * shortcut's program asks for them too.) */
#define FLOW_MARK     BPF_SOCK_OPS_RTO_CB_FLAG

#define AF_INET_      2
#define AF_INET6_     10
#define TCP_SYN_SENT_  2
#define TCP_FIN_WAIT1_ 4
#define TCP_FIN_WAIT2_ 5
#define TCP_TIME_WAIT_ 6
#define TCP_CLOSE_     7
#define TCP_LAST_ACK_  9
#define TCP_CLOSING_   11

/* The socket's IPv4 ends (a dual-stack socket carries them v4-mapped in the
 * ip6 fields); 0 if it is not IPv4. Every field is loaded first: the
 * verifier refuses a ctx load at a computed offset, which is what clang
 * makes of a branch between two loads. */
static __always_inline int ipv4_ends(struct bpf_sock_ops *skops, __be32 *local, __be32 *remote)
{
	__u32 family = skops->family;
	__be32 l4 = skops->local_ip4, r4 = skops->remote_ip4;
	__be32 l6 = skops->local_ip6[3], r6 = skops->remote_ip6[3];
	__be32 r0 = skops->remote_ip6[0], r1 = skops->remote_ip6[1], r2 = skops->remote_ip6[2];

	asm volatile("" : "+r"(l4), "+r"(r4), "+r"(l6), "+r"(r6));
	asm volatile("" : "+r"(r0), "+r"(r1), "+r"(r2));
	if (family == AF_INET_) {
		*local = l4;
		*remote = r4;
		return 1;
	}
	if (family == AF_INET6_ && r0 == 0 && r1 == 0 && r2 == bpf_htonl(0x0000ffff)) {
		*local = l6;
		*remote = r6;
		return 1;
	}
	return 0;
}

static __always_inline void publish_proxy_origin(struct bpf_sock_ops *skops, struct weft_sock_origin *origin,
						 __be32 local)
{
	struct weft_proxy_origin_key key = {};
	struct weft_proxy_origin value = {};

	key.client_addr = local;
	/* local_port is in host order, unlike remote_port. */
	key.client_port = bpf_htons((__u16)skops->local_port);
	value.vip = origin->vip;
	value.port = origin->port;
	value.flags = origin->flags;
	value.service_id = origin->service_id;
	value.source = origin->source;
	if ((origin->flags & WEFT_ORIGIN_F_TUNNEL) && origin->backend_id) {
		/* Through a Service: the proxy is told the pod the kernel chose. */
		struct weft_backend *b = bpf_map_lookup_elem(&weft_backends, &origin->backend_id);

		if (!b)
			return;
		/* (and what was dialed, for the Service its metrics name) */
		value.dialed = origin->vip;
		value.dialed_port = origin->port;
		value.vip = b->addr;
		value.port = b->port;
	}
	bpf_map_update_elem(&weft_proxy_origins, &key, &value, BPF_ANY);
	lb_count(WEFT_LB_PROXY_ORIGIN);
}

/* The flow key of a counted socket: its ends, and what the application
 * dialed when connect4 translated it (its weft_sock_origin), as at connect. */
static __always_inline int flow_key(struct bpf_sock_ops *skops, struct bpf_sock *sk, struct weft_flow_key *key)
{
	struct weft_sock_origin *origin = bpf_sk_storage_get(&weft_sock_origin, sk, 0, 0);
	__u32 rport = skops->remote_port;
	__be32 local, remote;

	if (!ipv4_ends(skops, &local, &remote))
		return 0;
	key->src_addr = local;
	key->dst_addr = remote;
	key->vip = origin ? origin->vip : 0;
	/* remote_port: network order in the upper half of the field. */
	key->port = origin ? origin->port : bpf_htons((__u16)bpf_ntohl(rport));
	key->proto = IPPROTO_TCP;
	key->pad0 = 0;
	return 1;
}

/* TCP_CONNECT_CB: mark the socket counted and ask for the state changes. */
static __always_inline void flow_connect(struct bpf_sock_ops *skops)
{
	__be32 local, remote;

	if (!flows_enabled() || !ipv4_ends(skops, &local, &remote))
		return;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG | FLOW_MARK);
}

static __always_inline void flow_state(struct bpf_sock_ops *skops, struct bpf_sock *sk)
{
	__u32 old_state = skops->args[0], new_state = skops->args[1];
	__u64 acked = skops->bytes_acked, received = skops->bytes_received;
	__u32 snd_una = skops->snd_una;
	__u32 cb_flags = skops->bpf_sock_ops_cb_flags;
	struct weft_flow_stats *stats;
	struct weft_flow_key key;
	struct tcp_sock *tp;
	__u64 fin_in = 0, fin_out, fin_acked = 0;

	if (!(cb_flags & FLOW_MARK) || new_state != TCP_CLOSE_ || old_state == TCP_CLOSE_)
		return;
	/* Counted once, whatever callbacks follow (a reconnect marks the
	 * socket again at TCP_CONNECT_CB). */
	bpf_sock_ops_cb_flags_set(skops, cb_flags & ~FLOW_MARK);
	if (!flow_key(skops, sk, &key))
		return;
	stats = flow_stats(&key);
	if (!stats)
		return;
	if (old_state == TCP_SYN_SENT_) {
		stats->failed += 1;
		return;
	}
	/* Our FIN was queued exactly when the socket left through one of the
	 * states that follow it. */
	fin_out = old_state == TCP_FIN_WAIT1_ || old_state == TCP_FIN_WAIT2_ || old_state == TCP_TIME_WAIT_
		  || old_state == TCP_LAST_ACK_ || old_state == TCP_CLOSING_;
	tp = bpf_skc_to_tcp_sock(sk);
	if (tp) {
		fin_in = (((struct sock_common *)tp)->skc_flags >> SOCK_DONE_BIT) & 1;
		fin_acked = fin_out && snd_una == tp->write_seq;
	}
	stats->closed += 1;
	stats->bytes_sent += acked > 1 + fin_acked ? acked - 1 - fin_acked : 0;
	stats->bytes_received += received > fin_in ? received - fin_in : 0;
}

SEC("sockops")
int weft_sockops(struct bpf_sock_ops *skops)
{
	struct weft_sock_origin *origin;
	struct weft_flow_key key;
	struct weft_flow_stats *stats;
	struct bpf_sock *sk = skops->sk;
	__u32 op = skops->op;
	__be32 local, remote;

	if (!sk)
		return 1;
	switch (op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		flow_connect(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		if ((skops->bpf_sock_ops_cb_flags & FLOW_MARK) && flow_key(skops, sk, &key)) {
			stats = flow_stats(&key);
			if (stats)
				stats->opened += 1;
		}
		origin = bpf_sk_storage_get(&weft_sock_origin, sk, 0, 0);
		if (origin && (origin->flags & WEFT_ORIGIN_F_PROXY) && ipv4_ends(skops, &local, &remote))
			publish_proxy_origin(skops, origin, local);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		flow_state(skops, sk);
		break;
	}
	return 1;
}
