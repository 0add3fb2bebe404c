/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The connect() verdict shared by connect4 and connect6 (IPv4 reached through
 * a dual-stack AF_INET6 socket as ::ffff:a.b.c.d, which gRPC, Java and most
 * runtimes use): Service translation, L7 capture, then L4 policy.
 */
#ifndef WEFT_BPF_CONNECT_H
#define WEFT_BPF_CONNECT_H

#include "service.h"
#include "policy.h"
#include "capture.h"
#include "flows.h"

/* Policy said no: EPERM, the error a local firewall gives, at once. */
static __always_inline int deny(struct bpf_sock_addr *ctx)
{
	bpf_set_retval(-EPERM);
	return SYS_REJECT;
}

/* The client sessionAffinity keys on (weft_abi.h): the socket's network
 * namespace, read only for a Service port that has affinity. */
static __always_inline __u64 affinity_client(struct bpf_sock_addr *ctx, const struct weft_service_value *svc)
{
	return (svc->flags & WEFT_SVC_F_AFFINITY) ? bpf_get_netns_cookie(ctx) : 0;
}

/* An AF_INET6 socket's address that is IPv4 reached through it (::ffff:a.b.c.d). */
static __always_inline int is_v4_mapped(const struct bpf_sock_addr *ctx)
{
	return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
	       ctx->user_ip6[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int connect_verdict(struct bpf_sock_addr *ctx, __be32 vip, int v6)
{
	__u8 proto = ctx->protocol;
	/* user_port holds the port in network order in its low 16 bits. */
	__be16 port = (__be16)ctx->user_port;
	enum weft_lb_event event = WEFT_LB_TRANSLATED;
	struct weft_service_value *svc;
	struct weft_backend *backend;
	struct weft_sock_origin *origin;
	struct weft_proxy_config *proxy;
	__u32 backend_id = 0;
	__be32 lookup_vip;

	if (proto == IPPROTO_SCTP)
		return policy_connect_verdict(vip, port, proto) ? deny(ctx) : SYS_PROCEED;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return SYS_PROCEED;

	svc = service_lookup_dialed(vip, port, proto, &lookup_vip);
	if (!svc) {
		/* A UDP socket may be re-connected from a VIP to a plain
		 * address: forget the old origin so recvmsg stops rewriting. */
		if (proto == IPPROTO_UDP && ctx->sk)
			bpf_sk_storage_delete(&weft_sock_origin, ctx->sk);
		if (policy_connect_verdict(vip, port, proto))
			return deny(ctx);
		if (proto == IPPROTO_UDP)
			flow_count_dialed(vip, 0, port, proto);
		if (proto == IPPROTO_TCP && tunnel_wanted(vip)) {
			proxy = capture_to_tunnel(ctx, vip, port, 0, 0);
			if (proxy)
				set_destination(ctx, v6, proxy->addr, proxy->port);
		}
		return SYS_PROCEED;
	}

	/* HTTP-level work: the node proxy takes the connection and judges
	 * policy itself for each backend it connects to on the pod's behalf. */
	if ((svc->flags & WEFT_SVC_F_L7) && proto == IPPROTO_TCP) {
		proxy = capture_to_proxy(ctx, vip, port, svc);
		if (proxy) {
			set_destination(ctx, v6, proxy->addr, proxy->port);
			return SYS_PROCEED;
		}
	}

	backend = service_pick_backend(svc, lookup_vip, port, proto, affinity_client(ctx, svc), &backend_id, &event);
	if (!backend) {
		lb_count(event);
		flow_count_dialed(0, vip, port, proto);
		/* Fail at connect() with the error a closed port gives, so the
		 * client tries elsewhere at once instead of waiting for a SYN
		 * timeout (bpf_set_retval: cgroup hooks, Linux 5.18+). */
		bpf_set_retval(-ECONNREFUSED);
		return SYS_REJECT;
	}

	if (policy_connect_verdict(backend->addr, backend->port, proto))
		return deny(ctx);

	if (proto == IPPROTO_TCP && tunnel_wanted(backend->addr)) {
		proxy = capture_to_tunnel(ctx, vip, port, svc->service_id, backend_id);
		if (proxy) {
			set_destination(ctx, v6, proxy->addr, proxy->port);
			lb_count(WEFT_LB_TRANSLATED);
			return SYS_PROCEED;
		}
	}

	if (ctx->sk) {
		origin = bpf_sk_storage_get(&weft_sock_origin, ctx->sk, 0,
					    BPF_SK_STORAGE_GET_F_CREATE);
		if (origin) {
			origin->vip = vip;
			origin->port = port;
			origin->flags = 0;
			origin->service_id = svc->service_id;
			origin->backend_id = backend_id;
			origin->source = 0;
			origin->pad0 = 0;
		}
	}

	if (proto == IPPROTO_UDP)
		flow_count_dialed(backend->addr, vip, port, proto);
	set_destination(ctx, v6, backend->addr, backend->port);
	lb_count(WEFT_LB_TRANSLATED);
	return SYS_PROCEED;
}

/*
 * sendto()/sendmsg() with an address on a UDP socket (connected sockets send
 * without one and never get here; a dual-stack socket's datagram to
 * ::ffff:a.b.c.d arrives as to a.b.c.d): what connect_verdict gives a connection,
 * for one datagram. A clusterIP:port is rewritten to a backend drawn for
 * this datagram, and weft_udp_revnat remembers which clusterIP that backend
 * stands for on this socket, for recvmsg (origin.h); then L4 policy judges
 * the pod, unless the datagram belongs to an exchange already allowed (a
 * reply, or more of one: see weft_udp_flow_key).
 */
static __always_inline int datagram_send(struct bpf_sock_addr *ctx)
{
	__be32 vip = ctx->user_ip4, peer = vip;
	__be16 vport = (__be16)ctx->user_port, port = vport;
	enum weft_lb_event event = WEFT_LB_TRANSLATED;
	struct weft_udp_revnat nat = { .vip = vip, .port = vport };
	struct weft_udp_flow_key key = {};
	struct weft_service_value *svc;
	struct weft_backend *backend;
	struct weft_udp_revnat *known;
	struct weft_sock_origin *origin;
	__u32 backend_id = 0;
	__be32 lookup_vip;
	__u64 cookie;

	if (ctx->protocol != IPPROTO_UDP)
		return SYS_PROCEED;
	cookie = bpf_get_socket_cookie(ctx);
	svc = service_lookup_dialed(vip, vport, IPPROTO_UDP, &lookup_vip);
	if (svc) {
		backend = service_pick_backend(svc, lookup_vip, vport, IPPROTO_UDP, affinity_client(ctx, svc), &backend_id, &event);
		if (!backend) {
			/* As for connect(): the error a closed port gives, at once. */
			lb_count(event);
			flow_count_dialed(0, vip, vport, IPPROTO_UDP);
			bpf_set_retval(-ECONNREFUSED);
			return SYS_REJECT;
		}
		peer = backend->addr;
		port = backend->port;
	}
	if (!udp_flow_known(cookie, peer, port)) {
		if (policy_connect_verdict(peer, port, IPPROTO_UDP))
			return deny(ctx);
		udp_flow_remember(cookie, peer, port);
		flow_count_dialed(peer, svc ? vip : 0, vport, IPPROTO_UDP);
	}
	if (!svc)
		return SYS_PROCEED;
	key.cookie = cookie;
	key.peer = peer;
	key.port = port;
	known = bpf_map_lookup_elem(&weft_udp_revnat, &key);
	if (!known || known->vip != vip || known->port != vport)
		bpf_map_update_elem(&weft_udp_revnat, &key, &nat, BPF_ANY);
	/* recvmsg looks in weft_udp_revnat only for a socket marked so. */
	if (ctx->sk) {
		origin = bpf_sk_storage_get(&weft_sock_origin, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (origin && !(origin->flags & WEFT_ORIGIN_F_DATAGRAMS))
			origin->flags |= WEFT_ORIGIN_F_DATAGRAMS;
	}
	set_destination(ctx, 0, peer, port);
	lb_count(WEFT_LB_TRANSLATED);
	return SYS_PROCEED;
}

#endif
