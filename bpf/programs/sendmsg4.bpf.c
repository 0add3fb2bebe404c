// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/sendmsg4: unconnected UDP. sendto()/sendmsg() with a destination
 * address never pass through connect4, so each such datagram gets here what
 * connect4 gives a connection: a clusterIP:port is rewritten to a backend
 * pod drawn for this datagram (weft_udp_revnat lets recvmsg4 report the
 * reply as the clusterIP's), then L4 policy is judged on the pod, and a
 * denied send fails with EPERM. (Connected UDP sockets were translated and
 * judged at connect() and send without an address, so this hook does not
 * run for them.) Replies, and the rest of an allowed exchange, are not
 * judged again: see weft_udp_flow_key.
 */
#include "service.h"
#include "policy.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup/sendmsg4")
int weft_sendmsg4(struct bpf_sock_addr *ctx)
{
	__be32 vip = ctx->user_ip4, peer = vip;
	__be16 vport = (__be16)ctx->user_port, port = vport;
	enum weft_lb_event event = WEFT_LB_TRANSLATED;
	struct weft_service_value *svc;
	struct weft_backend *backend;
	struct weft_udp_revnat nat = { .vip = vip, .port = vport };
	struct weft_udp_flow_key key = {};
	struct weft_udp_revnat *known;
	__u32 backend_id = 0;
	__u64 cookie;

	if (ctx->protocol != IPPROTO_UDP)
		return SYS_PROCEED;
	cookie = bpf_get_socket_cookie(ctx);
	svc = service_lookup(vip, vport, IPPROTO_UDP);
	if (svc) {
		backend = service_pick_backend(svc, vip, vport, IPPROTO_UDP, &backend_id, &event);
		if (!backend) {
			/* As connect4: the error a closed port gives, at once. */
			lb_count(event);
			bpf_set_retval(-ECONNREFUSED);
			return SYS_REJECT;
		}
		peer = backend->addr;
		port = backend->port;
	}
	/* A reply to a datagram policy let in, or more of an allowed exchange. */
	if (!udp_flow_known(cookie, peer, port)) {
		if (policy_connect_verdict(peer, port, IPPROTO_UDP)) {
			bpf_set_retval(-EPERM);
			return SYS_REJECT;
		}
		udp_flow_remember(cookie, peer, port);
	}
	if (!svc)
		return SYS_PROCEED;
	key.cookie = cookie;
	key.peer = peer;
	key.port = port;
	known = bpf_map_lookup_elem(&weft_udp_revnat, &key);
	if (!known || known->vip != vip || known->port != vport)
		bpf_map_update_elem(&weft_udp_revnat, &key, &nat, BPF_ANY);
	ctx->user_ip4 = peer;
	ctx->user_port = (__u32)port;
	lb_count(WEFT_LB_TRANSLATED);
	return SYS_PROCEED;
}
