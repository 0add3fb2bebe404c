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

/* connect4 refused a mesh pod's connect (no backend). */
static __always_inline void flow_count_refused(__be32 vip, __be16 port, __u8 proto)
{
	__u64 cgroup = bpf_get_current_cgroup_id();
	struct weft_cgroup_endpoint *local = bpf_map_lookup_elem(&weft_cgroups, &cgroup);
	struct weft_flow_key key = {};
	struct weft_flow_stats *stats;

	if (!local || !flows_enabled())
		return;
	key.src_addr = local->addr;
	key.vip = vip;
	key.port = port;
	key.proto = proto;
	stats = flow_stats(&key);
	if (stats)
		stats->failed += 1;
}

#endif
