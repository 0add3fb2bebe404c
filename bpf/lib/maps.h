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

#endif
