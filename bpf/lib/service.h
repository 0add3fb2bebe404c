/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Service lookup, staged frontend -> slot -> backend. All of the work happens
 * once per connect(); established traffic never passes through here, so there
 * is nothing to do per packet.
 */
#ifndef WEFT_BPF_SERVICE_H
#define WEFT_BPF_SERVICE_H

#include "counters.h"

static __always_inline struct weft_service_value *
service_lookup(__be32 vip, __be16 port, __u8 proto)
{
	struct weft_service_key key = {
		.vip = vip,
		.port = port,
		.proto = proto,
		.slot = 0,
	};

	return bpf_map_lookup_elem(&weft_services, &key);
}

/* Draws a backend for a service's master entry. Returns the backend, or NULL
 * with *event set to the reason. */
static __always_inline struct weft_backend *
service_pick_backend(const struct weft_service_value *svc, __be32 vip,
		     __be16 port, __u8 proto, __u32 *backend_id,
		     enum weft_lb_event *event)
{
	struct weft_service_key key = {
		.vip = vip,
		.port = port,
		.proto = proto,
	};
	struct weft_service_value *slot;
	struct weft_backend *backend;

	if (svc->count == 0) {
		*event = WEFT_LB_NO_BACKEND;
		return NULL;
	}
	/* Uniform draw over the slots. Connections are long-lived relative to
	 * this choice, so a random pick spreads them as evenly as round-robin
	 * without shared state between CPUs. */
	key.slot = (bpf_get_prandom_u32() % svc->count) + 1;
	slot = bpf_map_lookup_elem(&weft_services, &key);
	if (!slot) {
		/* The count was read before a shrink deleted this slot; slot 1
		 * exists whenever count > 0 under the agent's write order. */
		lb_count(WEFT_LB_SLOT_MISSING);
		key.slot = 1;
		slot = bpf_map_lookup_elem(&weft_services, &key);
		if (!slot) {
			*event = WEFT_LB_NO_BACKEND;
			return NULL;
		}
	}
	*backend_id = slot->backend_id;
	backend = bpf_map_lookup_elem(&weft_backends, backend_id);
	if (!backend)
		*event = WEFT_LB_BACKEND_MISSING;
	return backend;
}

#endif
