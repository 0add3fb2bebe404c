/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * L7 capture: a pod's connect() to a Service port that needs HTTP-level work
 * goes to the node proxy instead of a backend. The proxy chooses the backend
 * itself (per request, not per connection), so nothing here picks one.
 */
#ifndef WEFT_BPF_CAPTURE_H
#define WEFT_BPF_CAPTURE_H

#include "counters.h"

/* Records what was dialed for the proxy and returns where the proxy
 * listens, for the caller to rewrite the destination; NULL if the
 * connection keeps the kernel-only path: no proxy on this node, or the
 * caller is no local pod (the node itself, and the proxy, whose upstream
 * connections must never come back to it). */
static __always_inline struct weft_proxy_config *
capture_to_proxy_as(struct bpf_sock_addr *ctx, __be32 vip, __be16 port, __u32 service_id, __u32 backend_id, __u16 flags)
{
	__u32 zero = 0;
	__u64 cgroup = bpf_get_current_cgroup_id();
	struct weft_proxy_config *proxy = bpf_map_lookup_elem(&weft_proxy_config, &zero);
	struct weft_cgroup_endpoint *pod;
	struct weft_sock_origin *origin;

	if (!proxy || !proxy->addr || !ctx->sk)
		return NULL;
	pod = bpf_map_lookup_elem(&weft_cgroups, &cgroup);
	if (!pod)
		return NULL;
	origin = bpf_sk_storage_get(&weft_sock_origin, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!origin)
		return NULL;  /* no memory for the record: better unproxied than unknown */
	origin->vip = vip;
	origin->port = port;
	origin->flags = flags;
	origin->service_id = service_id;
	origin->backend_id = backend_id;
	origin->source = pod->addr;
	origin->pad0 = 0;
	lb_count(WEFT_LB_PROXY_CAPTURED);
	return proxy;
}

static __always_inline struct weft_proxy_config *
capture_to_proxy(struct bpf_sock_addr *ctx, __be32 vip, __be16 port, const struct weft_service_value *svc)
{
	return capture_to_proxy_as(ctx, vip, port, svc->service_id, 0, WEFT_ORIGIN_F_PROXY);
}

/* mTLS between nodes: a TCP connection from a local pod to a pod on another
 * node that takes tunnels (WEFT_EP_F_TUNNEL) goes to the node proxy, which
 * carries it there. The kernel has already chosen the backend (L4 load
 * balancing stays at the source); `vip`/`port` are what the application
 * dialed, for getpeername(), and `backend_id` (0: dialed directly) names
 * the pod. */
static __always_inline int tunnel_wanted(__be32 addr)
{
	struct weft_endpoint *ep = endpoint_lookup(addr);

	return ep && (ep->flags & WEFT_EP_F_TUNNEL);
}

static __always_inline struct weft_proxy_config *
capture_to_tunnel(struct bpf_sock_addr *ctx, __be32 vip, __be16 port, __u32 service_id, __u32 backend_id)
{
	return capture_to_proxy_as(ctx, vip, port, service_id, backend_id, WEFT_ORIGIN_F_PROXY | WEFT_ORIGIN_F_TUNNEL);
}

#endif
