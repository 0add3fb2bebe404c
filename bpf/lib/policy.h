/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * L4 policy decisions: a handful of hash and LPM lookups, whatever the number
 * of rules. The same walk is done in Swift by `weft policy check` over the
 * same pinned maps (Sources/WeftKernel/PolicyMaps.swift); keep them in step.
 */
#ifndef WEFT_BPF_POLICY_H
#define WEFT_BPF_POLICY_H

#include "maps.h"

/* An address as a policy peer: its pod identity (or WORLD) and the CIDR
 * class of the longest ipBlock prefix holding it (0 if none). */
struct policy_peer {
	__u32 identity;
	__u32 cidr_class;
};

/* 127.0.0.0/8: a pod talking to itself, which no policy may block. */
static __always_inline int is_loopback(__be32 addr)
{
	return (bpf_ntohl(addr) >> 24) == 127;
}

static __always_inline struct weft_endpoint *endpoint_lookup(__be32 addr)
{
	return bpf_map_lookup_elem(&weft_endpoints, &addr);
}

/* A pod's class is precomputed in its endpoint entry: only addresses that are
 * no pod pay for the longest-prefix match. */
static __always_inline struct policy_peer policy_peer_of(__be32 addr, const struct weft_endpoint *ep)
{
	struct weft_cidr_key key = { .prefixlen = 32, .addr = addr };
	struct weft_cidr_class *class;
	struct policy_peer peer = { .identity = WEFT_ID_WORLD, .cidr_class = 0 };

	if (ep) {
		peer.identity = ep->identity;
		peer.cidr_class = ep->cidr_class;
		return peer;
	}
	class = bpf_map_lookup_elem(&weft_cidr_classes, &key);
	if (class)
		peer.cidr_class = class->id;
	return peer;
}

static __always_inline int policy_hit(__u32 identity, __u32 peer, __u8 direction, __u8 proto, __be16 port)
{
	struct weft_policy_key key = {
		.identity = identity,
		.peer = peer,
		.direction = direction,
		.proto = proto,
		.port = port,
	};

	return bpf_map_lookup_elem(&weft_policy, &key) != NULL;
}

/* Exact port, any port of the protocol, any protocol; then port ranges if
 * this identity has any in this direction. */
static __always_inline int policy_allows_peer(__u32 identity, __u8 direction, __u32 peer,
					      __u8 proto, __be16 port, int ranges)
{
	struct weft_policy_range_key range = {
		.prefixlen = WEFT_POLICY_PREFIX_FULL,
		.identity = bpf_htonl(identity),
		.direction = direction,
		.peer = bpf_htonl(peer),
		.proto = proto,
		.port = port,
	};

	if (policy_hit(identity, peer, direction, proto, port) ||
	    policy_hit(identity, peer, direction, proto, 0) ||
	    policy_hit(identity, peer, direction, 0, 0))
		return 1;
	return ranges && bpf_map_lookup_elem(&weft_policy_ranges, &range) != NULL;
}

/* Does some policy allow `local` (isolated in `direction`) to talk to `peer`
 * on proto/port? Peer by identity, then by CIDR class, then "any peer":
 * policies are additive, so any one match allows. */
static __always_inline int policy_allows(const struct weft_endpoint *local, __u8 direction,
					 struct policy_peer peer, __u8 proto, __be16 port)
{
	__u8 flag = direction == WEFT_DIR_INGRESS ? WEFT_EP_F_INGRESS_RANGES : WEFT_EP_F_EGRESS_RANGES;
	int ranges = (local->flags & flag) != 0;
	__u32 identity = local->identity;

	/* The pod's own node is always allowed, whatever the policy says. */
	if (peer.identity == WEFT_ID_HOST)
		return 1;
	if (policy_allows_peer(identity, direction, peer.identity, proto, port, ranges))
		return 1;
	if (peer.cidr_class && policy_allows_peer(identity, direction, peer.cidr_class, proto, port, ranges))
		return 1;
	return policy_allows_peer(identity, direction, WEFT_ID_ANY, proto, port, ranges);
}

/* AuthorizationPolicy for a pod flagged WEFT_EP_F_AUTHZ, on a new TCP flow
 * from `saddr` to `port`: 0 to pass, or WEFT_DROP_AUTHZ. The node's own
 * addresses pass (its proxy delivers what it has already authorized). A
 * pod of this node is known by its identity; any other source only by its
 * address, since nothing proves who sent plaintext from elsewhere. */
static __always_inline int authz_verdict(const struct weft_endpoint *dst, const struct weft_endpoint *src,
					 __be32 saddr, __be16 port)
{
	struct weft_cidr_key key = { .prefixlen = 32, .addr = saddr };
	struct weft_cidr_class *class;
	__u32 peer = WEFT_ID_WORLD;

	if (!(dst->flags & WEFT_EP_F_AUTHZ))
		return 0;
	if (src && src->identity == WEFT_ID_HOST)
		return 0;
	if (src && (src->flags & WEFT_EP_F_LOCAL)) {
		peer = src->identity;
	} else if (src) {
		if (src->cidr_class)
			peer = src->cidr_class;
	} else {
		class = bpf_map_lookup_elem(&weft_cidr_classes, &key);
		if (class && class->id)
			peer = class->id;
	}
	if (policy_allows_peer(dst->identity, WEFT_DIR_AUTHZ_DENY, peer, IPPROTO_TCP, port, 1) ||
	    policy_allows_peer(dst->identity, WEFT_DIR_AUTHZ_DENY, WEFT_ID_ANY, IPPROTO_TCP, port, 1))
		return WEFT_DROP_AUTHZ;
	if (policy_allows_peer(dst->identity, WEFT_DIR_AUTHZ_ALLOW, peer, IPPROTO_TCP, port, 1) ||
	    policy_allows_peer(dst->identity, WEFT_DIR_AUTHZ_ALLOW, WEFT_ID_ANY, IPPROTO_TCP, port, 1))
		return 0;
	return WEFT_DROP_AUTHZ;
}

static __always_inline void policy_count_drop(__u32 src, __u32 dst, __be16 port, __u8 proto,
					      enum weft_drop_reason reason)
{
	struct weft_drop_key key = {
		.src_identity = src,
		.dst_identity = dst,
		.port = port,
		.proto = proto,
		.reason = reason,
	};
	__u64 one = 1, *value = bpf_map_lookup_elem(&weft_policy_drops, &key);

	if (value)
		*value += 1;  /* per-CPU slot: no atomics needed */
	else
		bpf_map_update_elem(&weft_policy_drops, &key, &one, BPF_NOEXIST);
}

/* How long an allowed UDP exchange may sit idle before it is forgotten. */
static __always_inline __u64 udp_idle_ns(void)
{
	__u32 zero = 0;
	struct weft_policy_config *config = bpf_map_lookup_elem(&weft_policy_config, &zero);

	return config && config->udp_idle_ns ? config->udp_idle_ns : WEFT_UDP_IDLE_DEFAULT_NS;
}

/* A UDP exchange already allowed and not idle too long (see
 * weft_udp_flow_key). Seeing it again moves its last-seen time, but only
 * once an eighth of the idle timeout has passed, so a busy exchange does not
 * write the shared entry on every datagram: an exchange is forgotten between
 * 7/8 of the timeout and the timeout after its last datagram. */
static __always_inline int udp_flow_known(__u64 cookie, __be32 peer, __be16 port)
{
	struct weft_udp_flow_key key = { .cookie = cookie, .peer = peer, .port = port };
	__u64 *seen = bpf_map_lookup_elem(&weft_udp_flows, &key);
	__u64 now, idle, age;

	if (!seen)
		return 0;
	now = bpf_ktime_get_ns();
	idle = udp_idle_ns();
	age = now > *seen ? now - *seen : 0;
	if (age >= idle)
		return 0;
	if (age >= idle / 8)
		*seen = now;  /* a racing CPU writes a time as recent: either is right */
	return 1;
}

static __always_inline void udp_flow_remember(__u64 cookie, __be32 peer, __be16 port)
{
	struct weft_udp_flow_key key = { .cookie = cookie, .peer = peer, .port = port };
	__u64 now = bpf_ktime_get_ns();

	bpf_map_update_elem(&weft_udp_flows, &key, &now, BPF_ANY);
}

/*
 * The connect()/sendmsg() verdict for a mesh client on this node: its own
 * egress policy, then — so a denied client fails at once with EPERM instead
 * of waiting out SYN retries against a drop — the destination's ingress
 * policy, which every node holds for every pod. Returns 0 to allow, or the
 * drop reason. A process outside every pod cgroup is not a mesh client: only
 * the destination's own ingress hook judges it.
 */
static __always_inline int policy_connect_verdict(__be32 daddr, __be16 dport, __u8 proto)
{
	__u64 cgroup = bpf_get_current_cgroup_id();
	struct weft_cgroup_endpoint *local = bpf_map_lookup_elem(&weft_cgroups, &cgroup);
	struct weft_endpoint *src, *dst;
	struct policy_peer peer;
	__u32 src_id;

	if (!local || is_loopback(daddr) || daddr == local->addr)
		return 0;
	src = endpoint_lookup(local->addr);
	if (!src)
		return 0;
	src_id = src->identity;
	dst = endpoint_lookup(daddr);
	if (src->flags & WEFT_EP_F_EGRESS_ISOLATED) {
		peer = policy_peer_of(daddr, dst);
		if (!policy_allows(src, WEFT_DIR_EGRESS, peer, proto, dport)) {
			policy_count_drop(src_id, peer.identity, dport, proto, WEFT_DROP_EGRESS);
			return WEFT_DROP_EGRESS;
		}
	}
	if (dst && (dst->flags & WEFT_EP_F_INGRESS_ISOLATED)) {
		peer = policy_peer_of(local->addr, src);
		if (!policy_allows(dst, WEFT_DIR_INGRESS, peer, proto, dport)) {
			policy_count_drop(src_id, dst->identity, dport, proto, WEFT_DROP_INGRESS_AT_SOURCE);
			return WEFT_DROP_INGRESS_AT_SOURCE;
		}
	}
	/* A pod of this node under AuthorizationPolicy: the connect fails at
	 * once. (Toward other nodes, their proxy or kernel decides.) */
	if (dst && proto == IPPROTO_TCP && (dst->flags & WEFT_EP_F_LOCAL) && authz_verdict(dst, src, local->addr, dport)) {
		policy_count_drop(src_id, dst->identity, dport, proto, WEFT_DROP_AUTHZ);
		return WEFT_DROP_AUTHZ;
	}
	return 0;
}

#endif
