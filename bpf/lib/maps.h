/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Map definitions. Every program object includes this file; maps are pinned
 * by name, so the first object to load creates each map and every later load,
 * including the next agent's after a restart, reuses the same one. That is
 * what lets the service table and per-socket state outlive the agent.
 */
#ifndef WEFT_BPF_MAPS_H
#define WEFT_BPF_MAPS_H

#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEFT_MAX_SERVICE_SLOTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct weft_service_key);
	__type(value, struct weft_service_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEFT_MAX_NODE_ADDRS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __be32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_node_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEFT_MAX_BACKENDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct weft_backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct weft_sock_origin);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_sock_origin SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEFT_LB_EVENT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_lb_stats SEC(".maps");

/* ----- L4 policy: identities and compiled NetworkPolicy (see weft_abi.h) ----- */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEFT_MAX_ENDPOINTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __be32);
	__type(value, struct weft_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEFT_MAX_LOCAL_CGROUPS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct weft_cgroup_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_cgroups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, WEFT_MAX_CIDR_CLASSES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct weft_cidr_key);
	__type(value, struct weft_cidr_class);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_cidr_classes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEFT_MAX_POLICY_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct weft_policy_key);
	__type(value, struct weft_policy_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, WEFT_MAX_POLICY_RANGES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct weft_policy_range_key);
	__type(value, struct weft_policy_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_policy_ranges SEC(".maps");

/* LRU so that a scan of many ports cannot fill it and stop counting; the
 * metrics side caps label cardinality on top of this. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, WEFT_MAX_DROP_KEYS);
	__type(key, struct weft_drop_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_policy_drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, WEFT_MAX_FLOWS);
	__type(key, struct weft_flow_key);
	__type(value, struct weft_flow_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_telemetry_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WEFT_MAX_UDP_FLOWS);
	__type(key, struct weft_udp_flow_key);
	__type(value, __u64);  /* last seen, bpf_ktime_get_ns() */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_udp_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WEFT_MAX_UDP_FLOWS);
	__type(key, struct weft_udp_flow_key);
	__type(value, struct weft_udp_revnat);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_udp_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WEFT_MAX_AFFINITY);
	__type(key, struct weft_affinity_key);
	__type(value, struct weft_affinity);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct weft_policy_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_policy_config SEC(".maps");

/* ----- L7 capture (see weft_abi.h) ----- */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct weft_proxy_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_proxy_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WEFT_MAX_PROXY_ORIGINS);
	__type(key, struct weft_proxy_origin_key);
	__type(value, struct weft_proxy_origin);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_proxy_origins SEC(".maps");

#endif
