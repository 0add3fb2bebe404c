/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Giving a translated socket back the address its application dialed. */
#ifndef WEFT_BPF_ORIGIN_H
#define WEFT_BPF_ORIGIN_H

#include "counters.h"

/* Puts the clusterIP and port back where the socket family reads its peer. */
static __always_inline void origin_write(struct bpf_sock_addr *ctx, int v6, __be32 vip, __be16 port)
{
	set_destination(ctx, v6, vip, port);
	lb_count(WEFT_LB_PEER_RESTORED);
}

/* The socket's origin record, if it has one. */
static __always_inline struct weft_sock_origin *origin_of(struct bpf_sock_addr *ctx)
{
	if (!ctx->sk)
		return 0;
	return bpf_sk_storage_get(&weft_sock_origin, ctx->sk, 0, 0);
}

/* getpeername(): a socket connected to a clusterIP reports it. */
static __always_inline void origin_restore(struct bpf_sock_addr *ctx, int v6)
{
	struct weft_sock_origin *origin = origin_of(ctx);

	if (origin && origin->vip)
		origin_write(ctx, v6, origin->vip, origin->port);
}

/* recvmsg() on a UDP socket: a datagram from a backend is reported as from
 * the clusterIP the application addressed, connected (socket storage) or
 * not (weft_udp_revnat, written by datagram_send). A socket that never
 * sent to a clusterIP (no record: most servers' sockets) costs one socket
 * storage lookup, no hash lookup. */
static __always_inline void origin_restore_datagram(struct bpf_sock_addr *ctx, __be32 source, int v6)
{
	struct weft_sock_origin *origin = origin_of(ctx);
	struct weft_udp_flow_key key = {};
	struct weft_udp_revnat *nat;

	if (!origin)
		return;
	if (origin->vip) {
		origin_write(ctx, v6, origin->vip, origin->port);
		return;
	}
	if (!(origin->flags & WEFT_ORIGIN_F_DATAGRAMS))
		return;
	key.cookie = bpf_get_socket_cookie(ctx);
	key.peer = source;
	key.port = (__be16)ctx->user_port;
	nat = bpf_map_lookup_elem(&weft_udp_revnat, &key);
	if (nat)
		origin_write(ctx, v6, nat->vip, nat->port);
}

#endif
