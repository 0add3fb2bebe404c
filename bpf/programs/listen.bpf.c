// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Which of the node proxy's listeners takes a new connection. The proxy
 * binds one listening socket per event loop to the same port
 * (SO_REUSEPORT), so that each loop accepts its own connections and none
 * is handed from one thread to another. Left to itself the kernel would
 * pick a listener by a hash of the connection's addresses, which can put
 * a few long-lived connections (an HTTP/2 client's, say) on one loop;
 * this program deals them out in turn instead, as a single accepting
 * thread would.
 *
 *   sk_reuseport  weft_listen_pick  the next slot of weft_listen_socks
 *
 * The proxy loads this object itself and keeps its maps to itself (none is
 * pinned): the sockets in weft_listen_socks are its own, and the kernel
 * takes a socket out of the array when it closes. A slot with no socket,
 * or any failure here, leaves the choice to the kernel's hash, so a
 * connection is never refused for want of a pick. During a restart the
 * old and the new proxy's listeners share one group, and the program
 * attached last (the new proxy's) picks among the new proxy's only.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "weft_abi.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, WEFT_MAX_LISTENERS);
	__type(key, __u32);
	__type(value, __u64);
} weft_listen_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct weft_listen_turn);
} weft_listen_turn SEC(".maps");

SEC("sk_reuseport")
int weft_listen_pick(struct sk_reuseport_md *md)
{
	__u32 zero = 0;
	struct weft_listen_turn *turn = bpf_map_lookup_elem(&weft_listen_turn, &zero);
	if (!turn)
		return SK_PASS;
	__u32 listeners = turn->listeners;
	if (listeners == 0 || listeners > WEFT_MAX_LISTENERS)
		return SK_PASS;
	/* Atomic, so that SYNs on two CPUs at once take different turns. */
	__u32 slot = __sync_fetch_and_add(&turn->next, 1) % listeners;
	/* On failure (an empty slot: that listener closed) nothing is
	 * selected and the kernel's hash picks among the rest. */
	bpf_sk_select_reuseport(md, &weft_listen_socks, &slot, 0);
	return SK_PASS;
}
