/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Connection counters per (client pod, destination, dialed port): see
 * weft_flow_key in weft_abi.h. */
#ifndef WEFT_BPF_FLOWS_H
#define WEFT_BPF_FLOWS_H

#include "maps.h"

/* Connection counting is on unless MeshConfig turned it off. */
static __always_inline int flows_enabled(void)
{
	__u32 zero = 0;
	__u32 *flags = bpf_map_lookup_elem(&weft_telemetry_config, &zero);

	return !flags || !(*flags & WEFT_TELEMETRY_F_NO_FLOWS);
}

/* This CPU's counters of a flow, created on first use. */
static __always_inline struct weft_flow_stats *flow_stats(const struct weft_flow_key *key)
{
	struct weft_flow_stats zero = {};
	struct weft_flow_stats *stats = bpf_map_lookup_elem(&weft_flows, key);

	if (stats)
		return stats;
	bpf_map_update_elem(&weft_flows, key, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&weft_flows, key);
}

/* A mesh pod's connect, or UDP exchange, that the sock_addr hooks decide:
 * failed (a Service with no backend: dst 0), or, for UDP, begun: a UDP
 * socket's connect(), or the first datagram an unconnected socket sends to
 * a peer (again once the exchange went idle: weft_udp_flow_key). A TCP
 * connection's opening is sockops' to count, when its handshake completes.
 * `vip` 0 for a direct address; `port` the port dialed. */
static __always_inline void flow_count_dialed(__be32 dst, __be32 vip, __be16 port, __u8 proto)
{
	__u64 cgroup = bpf_get_current_cgroup_id();
	struct weft_cgroup_endpoint *local = bpf_map_lookup_elem(&weft_cgroups, &cgroup);
	struct weft_flow_key key = {};
	struct weft_flow_stats *stats;

	if (!local || !flows_enabled())
		return;
	key.src_addr = local->addr;
	key.dst_addr = dst;
	key.vip = vip;
	key.port = port;
	key.proto = proto;
	stats = flow_stats(&key);
	if (!stats)
		return;
	if (dst)
		stats->opened += 1;
	else
		stats->failed += 1;
}

#endif
