// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The same-node socket shortcut (see weft_abi.h for the rules). Two
 * programs, loaded as one optional object: the agent runs without them when
 * the kernel refuses either, and says so.
 *
 *   sockops  weft_accel_sockops  puts established local mesh sockets of
 *                                pods in weft_accel_socks, or in
 *                                weft_accel_rx when they may only be
 *                                given bytes (pod cgroups)
 *   sockops  weft_accel_sockops_proxy  the same for the node proxy's
 *                                sockets (its own cgroup), marked as
 *                                receivers: the proxy reads with read()
 *   sk_msg   weft_accel_msg      redirects a message into the peer's
 *                                receive queue, or past the node proxy
 *                                into the far end's queue or out of the
 *                                proxy's socket to it (splice), or lets
 *                                TCP carry it
 *
 * The few kernel structs read below are declared with preserve_access_index
 * (CO-RE): libbpf relocates the field offsets against the running kernel's
 * BTF, so no vmlinux.h is needed.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#include "weft_abi.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct sk_psock {
	__u32 msg_tot_len;  /* bytes redirected into this socket, not yet read */
} __attribute__((preserve_access_index));

struct sock_common {
	unsigned char skc_state;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	int sk_rcvbuf;
	int sk_sndbuf;
	int sk_wmem_queued;
	void *sk_user_data;
} __attribute__((preserve_access_index));

/* A tcp_sock starts with its struct sock: the same address. */
struct tcp_sock {
	__u32 rcv_nxt;
	__u32 copied_seq;
	__u32 snd_una;
	__u32 write_seq;
} __attribute__((preserve_access_index));

extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;

/* sk_user_data carries flag bits below the pointer (include/net/sock.h). */
#define SK_USER_DATA_PTRMASK (~7UL)
#define AF_INET  2
#define AF_INET6 10
#define TCP_ESTABLISHED 1
#define TCP_CLOSE 7
#define TCP_CLOSE_WAIT 8

struct accel_sockhash {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, WEFT_MAX_ACCEL_SOCKETS);
	__type(key, struct weft_accel_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
};

/* The shortcut's sockets; weft_accel_msg is attached to it. */
struct accel_sockhash weft_accel_socks SEC(".maps");
/* Receivers whose own messages can never be redirected: no program is
 * attached to this map, so their sendmsg() is plain TCP's. */
struct accel_sockhash weft_accel_rx SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEFT_MAX_ACCEL_SOCKETS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct weft_accel_key);
	__type(value, struct weft_accel_peer);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_accel_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEFT_MAX_ACCEL_LOCAL);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct weft_accel_addr);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_accel_local SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct weft_accel_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_accel_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct weft_accel_sock);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_accel_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEFT_MAX_ACCEL_SOCKETS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct weft_accel_key);
	__type(value, struct weft_accel_splice);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_accel_splice SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WEFT_MAX_ACCEL_SOCKETS);
	__type(key, struct weft_accel_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_accel_spliced SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEFT_ACCEL_EVENT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_accel_stats SEC(".maps");

static __always_inline void accel_count(enum weft_accel_event event, __u64 n)
{
	__u32 key = event;
	__u64 *value = bpf_map_lookup_elem(&weft_accel_stats, &key);

	if (value)
		*value += n;
}

static __always_inline int accel_enabled(struct weft_accel_config **out)
{
	__u32 zero = 0;
	struct weft_accel_config *cfg = bpf_map_lookup_elem(&weft_accel_config, &zero);

	*out = cfg;
	return cfg && (cfg->flags & WEFT_ACCEL_F_ENABLED);
}

static __always_inline void set_v4(__be32 out[4], __be32 v4)
{
	out[0] = 0;
	out[1] = 0;
	out[2] = bpf_htonl(0x0000ffff);
	out[3] = v4;
}

static __always_inline int is_loopback(const __be32 a[4])
{
	if (a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff))
		return (a[3] & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000);
	return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == bpf_htonl(1);
}

/* The socket's own key. Every ctx field is loaded unconditionally, then
 * chosen: the verifier refuses ctx loads at offsets clang computes from a
 * branch (see sockops.bpf.c). */
static __always_inline int sockops_key(struct bpf_sock_ops *skops, struct weft_accel_key *key)
{
	__u32 family = skops->family;
	__be32 l4 = skops->local_ip4, r4 = skops->remote_ip4;
	__be32 l0 = skops->local_ip6[0], l1 = skops->local_ip6[1], l2 = skops->local_ip6[2], l3 = skops->local_ip6[3];
	__be32 r0 = skops->remote_ip6[0], r1 = skops->remote_ip6[1], r2 = skops->remote_ip6[2], r3 = skops->remote_ip6[3];
	__u32 lport = skops->local_port, rport = skops->remote_port;

	asm volatile("" : "+r"(l4), "+r"(r4), "+r"(l0), "+r"(l1));
	asm volatile("" : "+r"(l2), "+r"(l3), "+r"(r0), "+r"(r1));
	asm volatile("" : "+r"(r2), "+r"(r3));
	if (family == AF_INET) {
		set_v4(key->local, l4);
		set_v4(key->remote, r4);
	} else if (family == AF_INET6) {
		key->local[0] = l0; key->local[1] = l1; key->local[2] = l2; key->local[3] = l3;
		key->remote[0] = r0; key->remote[1] = r1; key->remote[2] = r2; key->remote[3] = r3;
	} else {
		return 0;
	}
	key->local_port = (__u16)lport;                /* host order already */
	key->remote_port = (__u16)bpf_ntohl(rport);    /* network order, upper half */
	return 1;
}

/* The WEFT_ACCEL_LOCAL_* flags of an address of this node's mesh, or 0. */
static __always_inline __u32 local_flags(const __be32 addr[4])
{
	struct weft_accel_addr a = {};
	__u32 *flags;

	a.addr[0] = addr[0]; a.addr[1] = addr[1]; a.addr[2] = addr[2]; a.addr[3] = addr[3];
	flags = bpf_map_lookup_elem(&weft_accel_local, &a);
	return flags ? *flags : 0;
}

static __always_inline int accel_sockops(struct bpf_sock_ops *skops, int proxy)
{
	struct weft_accel_config *cfg;
	struct weft_accel_key key = {};
	struct weft_accel_peer peer = {};
	struct weft_accel_sock *state;
	__u32 op = skops->op, flags, remote, mine;
	int sends;

	if (op == BPF_SOCK_OPS_STATE_CB) {
		/* args[1] is the new state; only sockets we added asked for it. */
		if (skops->args[1] != TCP_CLOSE || !sockops_key(skops, &key))
			return 1;
		if (bpf_map_delete_elem(&weft_accel_peers, &key) == 0)
			accel_count(WEFT_ACCEL_SOCK_REMOVED, 1);
		bpf_map_delete_elem(&weft_accel_splice, &key);
		return 1;
	}
	if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (!accel_enabled(&cfg) || !sockops_key(skops, &key))
		return 1;
	if (is_loopback(key.local) || is_loopback(key.remote))
		return 1;
	flags = local_flags(key.local);
	remote = local_flags(key.remote);
	if (!flags || !remote)
		return 1;
	/* A socket both programs see (pods and proxy in one cgroup tree) is
	 * added once, by the first. */
	if (bpf_map_lookup_elem(&weft_accel_peers, &key))
		return 1;
	mine = proxy ? (flags | WEFT_ACCEL_LOCAL_RECEIVE) : (flags & ~WEFT_ACCEL_LOCAL_PROXY);
	/* Its messages may only ever be redirected into a receiver: the
	 * proxy's sockets, or a receiver pod's (sk_msg checks the peer's own
	 * entry at the first message). A socket that can only be given bytes
	 * goes where no sk_msg program runs on its sends; one that can do
	 * neither stays out. */
	sends = (remote & (WEFT_ACCEL_LOCAL_RECEIVE | WEFT_ACCEL_LOCAL_PROXY)) != 0;
	if (!sends) {
		accel_count(WEFT_ACCEL_FLOW_NOT_RECEIVER, 1);
		if (!(mine & WEFT_ACCEL_LOCAL_RECEIVE))
			return 1;
	}
	/* Data that rode in the handshake (TCP Fast Open) is already in the
	 * TCP queue; redirected bytes would overtake it. */
	if (skops->data_segs_in != 0 || skops->data_segs_out != 0)
		return 1;
	if (!skops->sk)
		return 1;
	/* The sender's state exists before its first byte, so that its count
	 * of bytes sent (which splicing relies on) misses none. Only sk_msg
	 * reads it, so a receive-only socket has none. */
	if (sends) {
		state = bpf_sk_storage_get(&weft_accel_state, skops->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (!state) {
			accel_count(WEFT_ACCEL_SOCK_ADD_FAILED, 1);
			return 1;
		}
		/* No data has gone out (checked above): TCP's count starts here. */
		state->write_seq = skops->snd_nxt;
		state->sent = 0;
	}
	if ((sends ? bpf_sock_hash_update(skops, &weft_accel_socks, &key, BPF_NOEXIST)
		   : bpf_sock_hash_update(skops, &weft_accel_rx, &key, BPF_NOEXIST)) != 0) {
		accel_count(WEFT_ACCEL_SOCK_ADD_FAILED, 1);
		return 1;
	}
	if (skops->sk) {
		struct sock *sk = bpf_rdonly_cast(skops->sk, bpf_core_type_id_kernel(struct sock));

		peer.sock = (__u64)sk;
		peer.psock = (__u64)sk->sk_user_data & SK_USER_DATA_PTRMASK;
	}
	peer.flags = mine | (sends ? 0 : WEFT_ACCEL_PEER_RX_ONLY);
	peer.cookie = bpf_get_socket_cookie(skops);
	bpf_map_update_elem(&weft_accel_peers, &key, &peer, BPF_ANY);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	accel_count(WEFT_ACCEL_SOCK_ADDED, 1);
	if (!sends)
		accel_count(WEFT_ACCEL_SOCK_RECEIVE_ONLY, 1);
	return 1;
}

SEC("sockops")
int weft_accel_sockops(struct bpf_sock_ops *skops)
{
	return accel_sockops(skops, 0);
}

SEC("sockops")
int weft_accel_sockops_proxy(struct bpf_sock_ops *skops)
{
	return accel_sockops(skops, 1);
}

/* The peer's key: this socket's key with the ends swapped. */
static __always_inline int msg_peer_key(struct sk_msg_md *msg, struct weft_accel_key *peer)
{
	__u32 family = msg->family;
	__be32 l4 = msg->local_ip4, r4 = msg->remote_ip4;
	__be32 l0 = msg->local_ip6[0], l1 = msg->local_ip6[1], l2 = msg->local_ip6[2], l3 = msg->local_ip6[3];
	__be32 r0 = msg->remote_ip6[0], r1 = msg->remote_ip6[1], r2 = msg->remote_ip6[2], r3 = msg->remote_ip6[3];
	__u32 lport = msg->local_port, rport = msg->remote_port;

	asm volatile("" : "+r"(l4), "+r"(r4), "+r"(l0), "+r"(l1));
	asm volatile("" : "+r"(l2), "+r"(l3), "+r"(r0), "+r"(r1));
	asm volatile("" : "+r"(r2), "+r"(r3));
	if (family == AF_INET) {
		set_v4(peer->local, r4);
		set_v4(peer->remote, l4);
	} else if (family == AF_INET6) {
		peer->local[0] = r0; peer->local[1] = r1; peer->local[2] = r2; peer->local[3] = r3;
		peer->remote[0] = l0; peer->remote[1] = l1; peer->remote[2] = l2; peer->remote[3] = l3;
	} else {
		return 0;
	}
	peer->local_port = (__u16)bpf_ntohl(rport);
	peer->remote_port = (__u16)lport;
	return 1;
}

/* Into the receive queue of the socket at `key`, in whichever SOCKHASH it is. */
static __always_inline long redirect_into(struct sk_msg_md *msg, struct weft_accel_key *key, int rx_only)
{
	if (rx_only)
		return bpf_msg_redirect_hash(msg, &weft_accel_rx, key, BPF_F_INGRESS);
	return bpf_msg_redirect_hash(msg, &weft_accel_socks, key, BPF_F_INGRESS);
}

/* Would this message push the peer's redirected-but-unread bytes over its
 * limit? Then TCP, whose window makes a fast writer wait, takes over. */
static __always_inline int peer_queue_full(const struct weft_accel_key *peer_key, __u32 size,
					   const struct weft_accel_config *cfg)
{
	struct weft_accel_peer *peer = bpf_map_lookup_elem(&weft_accel_peers, peer_key);
	struct sk_psock *psock;
	struct sock *sk;
	__u64 queued, limit;

	if (!peer || !peer->psock || !peer->sock)
		return 0;
	psock = bpf_rdonly_cast((void *)peer->psock, bpf_core_type_id_kernel(struct sk_psock));
	sk = bpf_rdonly_cast((void *)peer->sock, bpf_core_type_id_kernel(struct sock));
	queued = psock->msg_tot_len;
	limit = sk->sk_rcvbuf > 0 ? (__u64)sk->sk_rcvbuf : 0;
	if (limit < cfg->queue_floor)
		limit = cfg->queue_floor;
	return queued + size > limit;
}

/* Can the socket at `sock` send `size` more bytes now, all of them? It is
 * connected with its sending side open (the proxy has not ended it, no
 * reset came: otherwise the proxy, not the sender's sendmsg(), hears of
 * it), and the bytes fit in its send buffer (TCP checks for room only as it
 * starts each new buffer, so a message that fits is taken whole). */
static __always_inline int can_send_out(__u64 sock, __u32 size)
{
	struct sock *sk;
	unsigned char state;

	if (!sock)
		return 0;
	sk = bpf_rdonly_cast((void *)sock, bpf_core_type_id_kernel(struct sock));
	state = sk->__sk_common.skc_state;
	if (state != TCP_ESTABLISHED && state != TCP_CLOSE_WAIT)
		return 0;
	return sk->sk_sndbuf > 0 && (__u64)(__u32)sk->sk_wmem_queued + size <= (__u64)sk->sk_sndbuf;
}

/* True when TCP holds none of the bytes `sender` sent to the socket at
 * `receiver`: all acknowledged and all read by the receiver's application.
 * Then a redirected byte cannot overtake one sent by TCP. */
static __always_inline int tcp_quiet(const void *sender, __u64 receiver)
{
	struct tcp_sock *me, *them;

	if (!sender || !receiver)
		return 0;
	me = bpf_rdonly_cast(sender, bpf_core_type_id_kernel(struct tcp_sock));
	them = bpf_rdonly_cast((void *)receiver, bpf_core_type_id_kernel(struct tcp_sock));
	return me->snd_una == me->write_seq && them->copied_seq == them->rcv_nxt;
}

/* This direction (the sender is locked by this sendmsg, so its fields hold
 * still). */
static __always_inline int tcp_drained(struct bpf_sock *self, const struct weft_accel_key *peer_key)
{
	struct weft_accel_peer *peer = bpf_map_lookup_elem(&weft_accel_peers, peer_key);

	return peer && tcp_quiet(self, peer->sock);
}

/* Splice (weft_abi.h): put this message straight into the far end's queue,
 * or out of the proxy's socket joined to it, past the node proxy, when the
 * rules there allow. 1 if it was redirected. */
static __always_inline int try_splice(struct sk_msg_md *msg, struct weft_accel_sock *state,
				      const struct weft_accel_key *peer, __u32 size,
				      const struct weft_accel_config *cfg)
{
	struct weft_accel_splice *sp;
	struct weft_accel_peer *target, *via;
	__u64 *spliced, first = size;

	if (!(cfg->flags & WEFT_ACCEL_F_SPLICE))
		return 0;
	sp = bpf_map_lookup_elem(&weft_accel_splice, peer);
	if (!sp)
		return 0;
	/* The proxy holds bytes of ours it has not passed on yet. */
	if (sp->forwarded != state->sent)
		goto wait;
	target = bpf_map_lookup_elem(&weft_accel_peers, &sp->target);
	via = bpf_map_lookup_elem(&weft_accel_peers, &sp->via);
	if (!target || !via)
		goto wait;
	/* The very sockets the proxy joined, not others on the same 4-tuples. */
	if (target->cookie != sp->target_cookie || via->cookie != sp->via_cookie)
		goto wait;
	if (target->flags & WEFT_ACCEL_LOCAL_RECEIVE) {
		/* Into the far end's receive queue. The proxy's last writes are
		 * out of TCP (the proxy writes no more of this direction until
		 * we send it more, so `via` holds still too). */
		if (!tcp_quiet((void *)via->sock, target->sock))
			goto wait;
		if (peer_queue_full(&sp->target, size, cfg))
			goto wait;
		if (redirect_into(msg, &sp->target, target->flags & WEFT_ACCEL_PEER_RX_ONLY) != SK_PASS)
			goto wait;
	} else {
		/* A far end that is no receiver: out of `via` by its TCP, as
		 * the proxy's own write would go, queued behind the proxy's
		 * writes already there. Only a `via` that no sk_msg program
		 * sends through (a receive-only socket: all its bytes are TCP's),
		 * and only while it can take the whole message: a push that
		 * finds no room fails the sender's sendmsg (EAGAIN) though its
		 * own socket is writable. */
		if (!(via->flags & WEFT_ACCEL_PEER_RX_ONLY) || !can_send_out(via->sock, size))
			goto wait;
		if (bpf_msg_redirect_hash(msg, &weft_accel_rx, &sp->via, 0) != SK_PASS)
			goto wait;
	}
	spliced = bpf_map_lookup_elem(&weft_accel_spliced, peer);
	if (spliced)
		__sync_fetch_and_add(spliced, size);
	else
		bpf_map_update_elem(&weft_accel_spliced, peer, &first, BPF_NOEXIST);
	accel_count(WEFT_ACCEL_MSG_SPLICED, 1);
	accel_count(WEFT_ACCEL_BYTES_SPLICED, size);
	accel_count(WEFT_ACCEL_MSG_REDIRECTED, 1);
	accel_count(WEFT_ACCEL_BYTES_REDIRECTED, size);
	return 1;
wait:
	accel_count(WEFT_ACCEL_SPLICE_WAIT, 1);
	return 0;
}

SEC("sk_msg")
int weft_accel_msg(struct sk_msg_md *msg)
{
	struct weft_accel_config *cfg;
	struct weft_accel_key peer = {};
	struct weft_accel_sock *state;
	__u32 size = msg->size;
	int enabled;

	if (!msg->sk)
		return SK_PASS;
	/* Made by sockops (or by the agent's probe): none means not ours. */
	state = bpf_sk_storage_get(&weft_accel_state, msg->sk, 0, 0);
	if (!state || !msg_peer_key(msg, &peer))
		goto pass;
	if (state->mode == WEFT_ACCEL_PROBE) {
		if (bpf_msg_redirect_hash(msg, &weft_accel_socks, &peer, BPF_F_INGRESS) == SK_PASS)
			accel_count(WEFT_ACCEL_PROBE_REDIRECTED, 1);
		return SK_PASS;
	}
	/* Take in what TCP carried since the last message (sender locked). */
	{
		struct tcp_sock *me = bpf_rdonly_cast(msg->sk, bpf_core_type_id_kernel(struct tcp_sock));
		__u32 seq = me->write_seq;

		state->sent += (__u32)(seq - state->write_seq);
		state->write_seq = seq;
	}
	enabled = accel_enabled(&cfg);
	if (enabled && cfg && try_splice(msg, state, &peer, size, cfg))
		return SK_PASS;
	if (state->mode == WEFT_ACCEL_PASS)
		goto pass;
	if (state->mode == WEFT_ACCEL_PASS_FULL && !tcp_drained(msg->sk, &peer))
		goto pass;
	if (!enabled || !cfg) {
		accel_count(state->mode == WEFT_ACCEL_REDIRECT ? WEFT_ACCEL_FALLBACK_OFF : WEFT_ACCEL_FLOW_DISABLED, 1);
		state->mode = WEFT_ACCEL_PASS;
		goto pass;
	}
	/* Only readers known to read with read()/recv() are given redirected
	 * bytes: splice() and sendfile() reading a socket see only its TCP
	 * queue, and would wait forever for bytes sitting in the other one. */
	if (state->mode == WEFT_ACCEL_UNDECIDED) {
		struct weft_accel_peer *p = bpf_map_lookup_elem(&weft_accel_peers, &peer);

		if (!p || !(p->flags & WEFT_ACCEL_LOCAL_RECEIVE)) {
			accel_count(p ? WEFT_ACCEL_FLOW_NOT_RECEIVER : WEFT_ACCEL_FLOW_NO_PEER, 1);
			state->mode = WEFT_ACCEL_PASS;
			goto pass;
		}
		state->peer_rx_only = (p->flags & WEFT_ACCEL_PEER_RX_ONLY) ? 1 : 0;
	}
	if (peer_queue_full(&peer, size, cfg)) {
		if (state->mode != WEFT_ACCEL_PASS_FULL)
			accel_count(WEFT_ACCEL_FALLBACK_QUEUE, 1);
		state->mode = WEFT_ACCEL_PASS_FULL;
		goto pass;
	}
	if (redirect_into(msg, &peer, state->peer_rx_only) != SK_PASS) {
		/* Peer not in the map (yet, or any more): TCP from now on. */
		if (state->mode == WEFT_ACCEL_UNDECIDED)
			accel_count(WEFT_ACCEL_FLOW_NO_PEER, 1);
		state->mode = WEFT_ACCEL_PASS;
		goto pass;
	}
	if (state->mode == WEFT_ACCEL_UNDECIDED)
		accel_count(WEFT_ACCEL_FLOW_REDIRECT, 1);
	else if (state->mode == WEFT_ACCEL_PASS_FULL)
		accel_count(WEFT_ACCEL_RESUMED, 1);
	state->mode = WEFT_ACCEL_REDIRECT;
	accel_count(WEFT_ACCEL_MSG_REDIRECTED, 1);
	accel_count(WEFT_ACCEL_BYTES_REDIRECTED, size);
	state->sent += size;
	return SK_PASS;
pass:
	/* (TCP's bytes count through write_seq, at the next message.) */
	accel_count(WEFT_ACCEL_MSG_PASSED, 1);
	accel_count(WEFT_ACCEL_BYTES_PASSED, size);
	return SK_PASS;
}
