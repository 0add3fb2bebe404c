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

/* The Service port a pod dialed at vip:port: a clusterIP's (or an external
 * address's), or else, when vip is a node's address, a node port's, whose
 * entries are under WEFT_NODE_PORT_VIP whatever node was dialed. *lookup_vip
 * is the vip its slots are keyed by. One more lookup, only on a miss. */
static __always_inline struct weft_service_value *
service_lookup_dialed(__be32 vip, __be16 port, __u8 proto, __be32 *lookup_vip)
{
	struct weft_service_value *svc = service_lookup(vip, port, proto);

	*lookup_vip = vip;
	if (svc || !bpf_map_lookup_elem(&weft_node_addrs, &vip))
		return svc;
	*lookup_vip = WEFT_NODE_PORT_VIP;
	return service_lookup(WEFT_NODE_PORT_VIP, port, proto);
}

#define NSEC_PER_SEC 1000000000ULL

/* sessionAffinity: ClientIP (weft_abi.h): the backend `client` was given for
 * this Service port, if it came back within the timeout and the slot it was
 * drawn from still holds it. */
static __always_inline struct weft_backend *
affinity_kept(const struct weft_service_value *svc, struct weft_service_key *key,
	      struct weft_affinity_key *akey, __u64 now, __u32 *backend_id)
{
	struct weft_service_value *slot;
	struct weft_backend *backend;
	struct weft_affinity *kept;

	kept = bpf_map_lookup_elem(&weft_affinity, akey);
	if (!kept || kept->slot == 0 || kept->slot > svc->count ||
	    now >= kept->last_ns + (__u64)svc->backend_id * NSEC_PER_SEC)
		return NULL;
	key->slot = kept->slot;
	slot = bpf_map_lookup_elem(&weft_services, key);
	if (!slot || slot->backend_id != kept->backend_id)
		return NULL;
	backend = bpf_map_lookup_elem(&weft_backends, &kept->backend_id);
	if (!backend)
		return NULL;
	*backend_id = kept->backend_id;
	/* The timeout runs from the last use; a second's precision is enough,
	 * and spares a write per connection. */
	if (now > kept->last_ns + NSEC_PER_SEC)
		kept->last_ns = now;
	return backend;
}

/* Draws a backend for a service's master entry. Returns the backend, or NULL
 * with *event set to the reason. `client` (a network namespace cookie) keeps
 * a Service port with sessionAffinity on the backend it gave that client
 * last; 0 for none. */
static __always_inline struct weft_backend *
service_pick_backend(const struct weft_service_value *svc, __be32 vip,
		     __be16 port, __u8 proto, __u64 client, __u32 *backend_id,
		     enum weft_lb_event *event)
{
	struct weft_service_key key = {
		.vip = vip,
		.port = port,
		.proto = proto,
	};
	struct weft_affinity_key akey = {};
	struct weft_affinity given = {};
	struct weft_service_value *slot;
	struct weft_backend *backend;
	__u64 now = 0;

	if (svc->count == 0) {
		*event = WEFT_LB_NO_BACKEND;
		return NULL;
	}
	if (client && (svc->flags & WEFT_SVC_F_AFFINITY)) {
		akey.client = client;
		akey.service_id = svc->service_id;
		now = bpf_ktime_get_ns();
		backend = affinity_kept(svc, &key, &akey, now, backend_id);
		if (backend) {
			lb_count(WEFT_LB_AFFINITY_KEPT);
			return backend;
		}
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
	if (!backend) {
		*event = WEFT_LB_BACKEND_MISSING;
		return NULL;
	}
	if (now) {
		given.backend_id = *backend_id;
		given.slot = key.slot;
		given.last_ns = now;
		bpf_map_update_elem(&weft_affinity, &akey, &given, BPF_ANY);
		lb_count(WEFT_LB_AFFINITY_NEW);
	}
	return backend;
}

#endif
