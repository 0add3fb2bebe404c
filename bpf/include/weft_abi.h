/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * weft_abi.h: every struct, enum and constant that crosses the kernel/user
 * boundary, defined once. The eBPF programs in bpf/programs include it, and the
 * Swift side imports the very same file through the WeftABI C target, so the
 * two can never disagree on a layout. Fields are fixed width; addresses and
 * ports that the kernel hands us in network order stay in network order
 * (__be*) and say so. Padding is explicit and must be zero, because hash maps
 * compare keys byte for byte.
 */
#ifndef WEFT_ABI_H
#define WEFT_ABI_H

#include <linux/types.h>

/* Map names, as pinned under /sys/fs/bpf/weft/<node>/maps/. */
#define WEFT_MAP_SERVICES     "weft_services"
#define WEFT_MAP_BACKENDS     "weft_backends"
#define WEFT_MAP_SOCK_ORIGIN  "weft_sock_origin"
#define WEFT_MAP_LB_STATS     "weft_lb_stats"
#define WEFT_MAP_ENDPOINTS    "weft_endpoints"
#define WEFT_MAP_CGROUPS      "weft_cgroups"
#define WEFT_MAP_CIDR_CLASSES "weft_cidr_classes"
#define WEFT_MAP_POLICY       "weft_policy"
#define WEFT_MAP_POLICY_RANGES "weft_policy_ranges"
#define WEFT_MAP_POLICY_DROPS "weft_policy_drops"
#define WEFT_MAP_UDP_FLOWS    "weft_udp_flows"
#define WEFT_MAP_POLICY_CONFIG "weft_policy_config"
#define WEFT_MAP_UDP_REVNAT   "weft_udp_revnat"
#define WEFT_MAP_PROXY_CONFIG "weft_proxy_config"
#define WEFT_MAP_PROXY_ORIGINS "weft_proxy_origins"
#define WEFT_MAP_ACCEL_SOCKS  "weft_accel_socks"
#define WEFT_MAP_ACCEL_RX     "weft_accel_rx"
#define WEFT_MAP_ACCEL_PEERS  "weft_accel_peers"
#define WEFT_MAP_ACCEL_LOCAL  "weft_accel_local"
#define WEFT_MAP_ACCEL_CONFIG "weft_accel_config"
#define WEFT_MAP_ACCEL_STATE  "weft_accel_state"
#define WEFT_MAP_ACCEL_STATS  "weft_accel_stats"
#define WEFT_MAP_ACCEL_SPLICE "weft_accel_splice"
#define WEFT_MAP_ACCEL_SPLICED "weft_accel_spliced"
#define WEFT_MAP_FLOWS        "weft_flows"
#define WEFT_MAP_TELEMETRY_CONFIG "weft_telemetry_config"
#define WEFT_MAP_AFFINITY     "weft_affinity"
#define WEFT_MAP_NODE_ADDRS   "weft_node_addrs"
/* The node proxy's own (not pinned; they live as long as its listeners). */
#define WEFT_MAP_LISTEN_SOCKS "weft_listen_socks"
#define WEFT_MAP_LISTEN_TURN  "weft_listen_turn"

/* Capacities. Changing one changes the map definition, which an agent cannot
 * adopt over an existing pin set: bump WEFT_ABI_VERSION with it. */
#define WEFT_MAX_SERVICE_SLOTS  524288  /* one per Service port + one per backend slot */
#define WEFT_MAX_BACKENDS       262144
#define WEFT_MAX_BACKENDS_PER_SERVICE 65535
#define WEFT_MAX_ENDPOINTS      262144  /* pods in the cluster (every node's) */
#define WEFT_MAX_LOCAL_CGROUPS  65536   /* pods on this node */
#define WEFT_MAX_CIDR_CLASSES   262144  /* distinct ipBlock prefixes */
#define WEFT_MAX_POLICY_ENTRIES 1048576 /* compiled (identity, peer, port) allows */
#define WEFT_MAX_POLICY_RANGES  262144  /* allows for port ranges (endPort) */
#define WEFT_MAX_DROP_KEYS      65536   /* drop counter tuples (LRU) */
#define WEFT_MAX_UDP_FLOWS      131072  /* UDP (socket, peer) pairs already allowed (LRU); also
                                         * (socket, backend) pairs sent to through a clusterIP */
#define WEFT_MAX_PROXY_ORIGINS  65536   /* captured connections not yet accepted by the proxy (LRU) */
#define WEFT_MAX_ACCEL_SOCKETS  65536   /* same-node mesh sockets on the shortcut */
#define WEFT_MAX_ACCEL_LOCAL    65536   /* this node's pod and proxy addresses */
#define WEFT_MAX_FLOWS          16384   /* connection counters per (client pod, destination, port) (LRU) */
#define WEFT_MAX_AFFINITY       65536   /* sessionAffinity ClientIP: (client, Service port) -> backend (LRU) */
#define WEFT_MAX_NODE_ADDRS     16384   /* the cluster's nodes' addresses, where node ports are dialed */
#define WEFT_ABI_VERSION        10

/*
 * Node ports: a NodePort Service's port is one entry in weft_services under
 * vip 0 (WEFT_NODE_PORT_VIP), whichever node's address a pod dials it on;
 * weft_node_addrs holds the nodes' addresses (key: address, network order;
 * value: 1), looked up only when a dialed address:port is no Service's.
 */
#define WEFT_NODE_PORT_VIP      0

/*
 * Service table, keyed like Cilium's lb4_service: slot 0 of a (vip, port,
 * proto) is the service's master entry and carries the backend count; slots
 * 1..count each name one backend. connect() draws a slot in [1, count].
 * Userspace grows a service by writing new slots before raising the count, and
 * shrinks it by lowering the count before deleting slots, so a reader never
 * draws a slot that is not there.
 */
struct weft_service_key {
	__be32 vip;        /* Service clusterIP, network order */
	__be16 port;       /* Service port, network order */
	__u8   proto;      /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   pad0;       /* zero */
	__u16  slot;       /* 0 = master entry, 1..count = backend slots */
	__u16  pad1;       /* zero */
};

struct weft_service_value {
	__u32 backend_id;  /* slot > 0: key into weft_backends; master: the sessionAffinity
	                    * timeout in seconds with WEFT_SVC_F_AFFINITY, else 0 */
	__u32 service_id;  /* stable id of this Service port, same in every slot */
	__u16 count;       /* master: number of backend slots; slot > 0: 0 */
	__u8  flags;       /* WEFT_SVC_F_* */
	__u8  pad0;        /* zero */
};

/* Master-entry flags. */
#define WEFT_SVC_F_L7   0x01  /* needs the node proxy (used by the L7 issue) */
#define WEFT_SVC_F_AFFINITY 0x02  /* sessionAffinity: ClientIP (timeout in backend_id) */

/*
 * sessionAffinity: ClientIP. A client keeps the backend it was given for a
 * Service port while it comes back within the timeout (each new connection,
 * or datagram sent with sendto(), counts as coming back). At connect() the
 * source address is not chosen yet, so a client is its network namespace:
 * one per pod (one pod, one address), one for every process of the host.
 * The entry names the slot the backend was drawn from: it is used again
 * only while that slot still holds that backend, so a backend that left the
 * Service (or an id given to another address since) is never reached
 * through it. LRU: a client that stops coming ages out.
 */
struct weft_affinity_key {
	__u64 client;      /* bpf_get_netns_cookie() of the connecting socket */
	__u32 service_id;  /* the Service port's master service_id */
	__u32 pad0;        /* zero */
};

struct weft_affinity {
	__u32 backend_id;  /* the backend given */
	__u16 slot;        /* the slot it was drawn from */
	__u16 pad0;        /* zero */
	__u64 last_ns;     /* last use, bpf_ktime_get_ns() */
};

struct weft_backend {
	__be32 addr;       /* backend (pod) address, network order */
	__be16 port;       /* targetPort resolved for this pod, network order */
	__u8   proto;      /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   flags;      /* reserved, zero */
};

/*
 * Per-socket record of what the application dialed, kept in socket-local
 * storage so it lives and dies with the socket: getpeername() and recvmsg()
 * hand it back, and nothing needs cleaning when the socket closes.
 */
struct weft_sock_origin {
	__be32 vip;        /* the clusterIP the application connected to */
	__be16 port;       /* the Service port it connected to */
	__u16  flags;      /* WEFT_ORIGIN_F_* */
	__u32  service_id; /* which Service port translated it */
	__u32  backend_id; /* which backend it was given (0 when sent to the proxy) */
	__be32 source;     /* the client pod's address, from its cgroup (proxied only) */
	__u32  pad0;       /* zero */
};

/*
 * An unconnected UDP socket has no single peer to keep in socket storage:
 * sendmsg4 draws a backend for each datagram sent to a clusterIP (as connect4
 * does for each connection) and rewrites its destination, and
 * weft_udp_revnat remembers, per (socket, backend address and port) — the
 * key of weft_udp_flows — which clusterIP and port the application sent to,
 * so that recvmsg4 reports the backend's replies as coming from there. LRU:
 * an entry of a closed socket is never looked up again and ages out.
 */
struct weft_udp_revnat {
	__be32 vip;        /* the clusterIP the application sent to */
	__be16 port;       /* the Service port */
	__u16  pad0;       /* zero */
};

/* weft_sock_origin.flags, weft_proxy_origin.flags */
#define WEFT_ORIGIN_F_PROXY  0x0001  /* sent to the node proxy, not to a backend */
#define WEFT_ORIGIN_F_TUNNEL 0x0002  /* to a pod on another node, through the mTLS tunnel:
                                      * the proxy origin names that pod (address and port),
                                      * the socket origin still the clusterIP dialed */
#define WEFT_ORIGIN_F_DATAGRAMS 0x0004  /* sendto() a clusterIP (weft_sock_origin only): the
                                         * replies' origins are in weft_udp_revnat; vip is 0
                                         * unless the socket is also connected to one */

/*
 * ----- L7 capture: connect() to an L7 Service port goes to the node proxy -----
 *
 * weft_proxy_config (array, one entry) says where this node's proxy listens;
 * addr 0 means no proxy, and L7 Services then keep the kernel-only path.
 * connect4 captures only sockets whose cgroup is a local pod's: the proxy and
 * every other process on the node are never captured, so the proxy's own
 * upstream connections cannot loop back into it.
 *
 * The proxy finds out what a captured connection dialed from
 * weft_proxy_origins, keyed by the client's address and port as the proxy
 * sees them on accept(). sockops writes the entry when the client's
 * handshake completes (ACTIVE_ESTABLISHED, before the client's final ACK, so
 * before accept() can return it); the proxy deletes it once read. Pod
 * addresses are unique in the cluster, so the key cannot collide across
 * network namespaces; the map is LRU so that entries the proxy never reads
 * (it was down) cannot fill it.
 */
struct weft_proxy_config {
	__be32 addr;       /* the proxy's outbound listener, network order; 0: none */
	__be16 port;       /* its port (15001), network order */
	__u16  pad0;       /* zero */
};

struct weft_proxy_origin_key {
	__be32 client_addr; /* the client's source address, network order */
	__be16 client_port; /* its source port, network order */
	__u16  pad0;        /* zero */
};

struct weft_proxy_origin {
	__be32 vip;        /* the clusterIP the client dialed; with F_TUNNEL, the pod to reach */
	__be16 port;       /* the Service port it dialed, network order; with F_TUNNEL, the pod's port */
	__u16  flags;      /* WEFT_ORIGIN_F_* */
	__u32  service_id; /* the Service port's stable id */
	__be32 source;     /* the client pod's address (from its cgroup) */
	__be32 dialed;     /* with F_TUNNEL through a Service: the clusterIP dialed (0: the pod was dialed) */
	__be16 dialed_port; /* with it, the Service port dialed, network order */
	__u16  pad0;
};

/* Indices into the per-CPU weft_lb_stats array: every outcome of the
 * connect-time load balancer, including every rejection, has a counter. */
enum weft_lb_event {
	WEFT_LB_TRANSLATED      = 0, /* connect(), or a sendto() datagram, to a VIP rewritten to a backend */
	WEFT_LB_NO_BACKEND      = 1, /* VIP has no ready backend: ECONNREFUSED */
	WEFT_LB_SLOT_MISSING    = 2, /* drawn slot absent (update in flight); fell back to slot 1 */
	WEFT_LB_BACKEND_MISSING = 3, /* backend id without backend entry: ECONNREFUSED */
	WEFT_LB_PEER_RESTORED   = 4, /* getpeername()/recvmsg()/recvfrom() given back the VIP */
	WEFT_LB_PROXY_CAPTURED  = 5, /* connect() to an L7 Service port sent to the node proxy */
	WEFT_LB_PROXY_ORIGIN    = 6, /* sockops recorded a captured connection for the proxy */
	WEFT_LB_AFFINITY_KEPT   = 7, /* sessionAffinity: the client's backend given again */
	WEFT_LB_AFFINITY_NEW    = 8, /* sessionAffinity: a backend drawn and remembered (new,
	                              * expired, or its backend left the Service) */
	WEFT_LB_EVENT_MAX       = 9,
};

/*
 * ----- Same-node socket shortcut (sockops + sk_msg) -----
 *
 * When both ends of a TCP connection are sockets of this node's mesh (local
 * pods, the node proxy), sockops puts each end into weft_accel_socks (a
 * SOCKHASH keyed by its own 4-tuple) as the handshake completes, and the
 * sk_msg program attached to that map moves each message a socket sends
 * straight into its peer's receive queue, skipping TCP/IP. Entries leave the
 * SOCKHASH when the socket closes (the kernel does that).
 * A socket whose own messages can never be redirected (its peer's address
 * is neither the proxy's nor a receiver's) but that may be given some (it
 * is a receiver) goes into weft_accel_rx instead: a SOCKHASH with no
 * program, so its sendmsg() stays TCP's own, without the sk_msg layer's
 * copy and verdict on every message; a socket that is neither is left out.
 *
 * Correctness rules, enforced per direction of each connection by the
 * sender's weft_accel_sock.mode (socket-local storage):
 *  - a direction is decided on its first message: redirected only if the
 *    peer is in the map then and its address is a receiver (below) (else the bytes already went by TCP, and
 *    redirecting later ones would overtake them); one whose peer's address
 *    cannot be a receiver is decided for TCP as the handshake completes
 *    (weft_accel_rx above);
 *  - a redirected direction may fall back to TCP (switched off, or the
 *    receiver's queue is over its limit: TCP's flow control takes over),
 *    because a receiver reads its redirected queue before its TCP queue;
 *  - a direction on TCP goes back to redirecting only when TCP holds none
 *    of its bytes: all acknowledged (sender snd_una == write_seq) and all
 *    read (receiver copied_seq == rcv_nxt); only after a queue fallback.
 *  - a direction the node proxy relays byte for byte (opaque TCP) between
 *    two sockets of the shortcut may skip the proxy ("splice", below).
 * Addresses are kept IPv6-sized: IPv4 as ::ffff:a.b.c.d, so an AF_INET
 * socket and a dual-stack peer key alike. Loopback is never accelerated
 * (127.0.0.1 pairs collide across network namespaces); pod addresses are
 * unique on a node, so the 4-tuples of accelerated sockets are too.
 */
struct weft_accel_addr {
	__be32 addr[4];    /* IPv6, or IPv4-mapped; network order */
};

struct weft_accel_key {
	__be32 local[4];   /* this socket's address (IPv4-mapped for IPv4) */
	__be32 remote[4];  /* its peer's */
	__u16  local_port; /* host order */
	__u16  remote_port;/* host order */
};

/* weft_accel_local values: why an address counts as this node's mesh, and
 * whether its sockets may be given redirected bytes. A socket that reads
 * with splice() or sendfile() never sees them (those read only the TCP
 * queue) and would wait forever, so only readers known to use read()/recv()
 * are receivers: the node proxy, and pods the operator marks so. Every
 * local mesh socket may still *send* by the shortcut to a receiver. */
#define WEFT_ACCEL_LOCAL_POD     0x1
#define WEFT_ACCEL_LOCAL_PROXY   0x2
#define WEFT_ACCEL_LOCAL_RECEIVE 0x4
/* weft_accel_peer.flags only: the socket is in weft_accel_rx, not in
 * weft_accel_socks (a redirect into it names that map). */
#define WEFT_ACCEL_PEER_RX_ONLY  0x100

/* weft_accel_config.flags */
#define WEFT_ACCEL_F_ENABLED   0x01  /* new sockets enter the map; flows may redirect */
#define WEFT_ACCEL_F_SPLICE    0x02  /* directions the proxy relays may skip it (below) */

struct weft_accel_config {
	__u32 flags;       /* WEFT_ACCEL_F_* */
	__u32 queue_floor; /* a receiver may hold max(its rcvbuf, this) redirected bytes */
};

/* The node proxy's listeners, one per event loop, share its port through
 * SO_REUSEPORT; weft_listen_pick (bpf/programs/listen.bpf.c) hands each new
 * connection to the next of them in turn. */
#define WEFT_MAX_LISTENERS 64

struct weft_listen_turn {
	__u32 listeners; /* slots 0..listeners-1 of weft_listen_socks are in use */
	__u32 next;      /* connections handed out so far (wraps) */
};

/* What sockops learned about a socket it put in the map, for its peer's
 * sk_msg program: where to read the receive queue's length. Kernel
 * addresses, read back only through bpf_rdonly_cast (fault-safe loads). */
struct weft_accel_peer {
	__u64 sock;        /* struct sock * */
	__u64 psock;       /* struct sk_psock * (sk_user_data) */
	__u32 flags;       /* WEFT_ACCEL_LOCAL_* of this socket's end: RECEIVE set
	                    * for the proxy's sockets and for receiver pods';
	                    * and WEFT_ACCEL_PEER_RX_ONLY */
	__u32 pad0;        /* zero */
	__u64 cookie;      /* the socket's cookie: unique, never reused, unlike a
	                    * 4-tuple */
};

/* weft_accel_sock.mode: one direction of a connection (the sender's). */
#define WEFT_ACCEL_UNDECIDED 0
#define WEFT_ACCEL_REDIRECT  1
#define WEFT_ACCEL_PASS      2
#define WEFT_ACCEL_PROBE     3  /* set by the agent's start-up probe only */
#define WEFT_ACCEL_PASS_FULL 4  /* on TCP because the receiver's queue was full;
                                 * back to REDIRECT once TCP has nothing of this
                                 * direction in flight or unread */

struct weft_accel_sock {
	__u32 mode;        /* WEFT_ACCEL_* */
	__u32 write_seq;   /* the socket's TCP write_seq when `sent` last took
	                    * in its TCP bytes */
	__u64 sent;        /* bytes this socket sent to its own peer, spliced
	                    * ones excepted: those it redirected (counted as the
	                    * program redirects them) plus those TCP took
	                    * (write_seq's advance: the kernel may pass a
	                    * message to TCP without running the program, after
	                    * a failed push). Made by sockops (for sockets in
	                    * weft_accel_socks only) before the first
	                    * byte. May count a byte twice (a redirect the
	                    * receiver took only in part), never miss one. */
	__u32 peer_rx_only;/* the peer is in weft_accel_rx: set with the decision
	                    * to redirect, from its weft_accel_peer */
	__u32 pad0;        /* zero */
};

/*
 * Splice: when the node proxy joins two sockets of the shortcut byte for
 * byte (client C -- D proxy U -- S server, opaque TCP to a pod of this
 * node, or an HTTP/1.1 connection once its Upgrade is answered 101), it
 * writes one weft_accel_splice per direction, keyed by its own
 * socket that the sender talks to (D for C's bytes, U for S's). The
 * sender's sk_msg program then moves a message past the proxy, but only
 * while that cannot reorder a byte:
 *  - forwarded == the sender's weft_accel_sock.sent: the proxy has read
 *    every byte the sender ever gave it and written all of them on, or,
 *    for an upgraded connection's HTTP bytes, handled them as HTTP (the
 *    proxy raises `forwarded` only once a write has completed, so it lags,
 *    never leads; a count that could be off stops splicing, never starts it);
 *  - `target` and `via` are the very sockets the proxy joined (cookies).
 * A target that is a receiver is given the message in its receive queue
 * (C -> S, no TCP at all) when also
 *  - nothing of the proxy's writes is still in TCP between `via` and
 *    `target` (via snd_una == write_seq, target copied_seq == rcv_nxt);
 *  - the target has room in its queue.
 * Any other target gets it by TCP, sent out of `via` (C -> U -> S, as the
 * proxy's own write would go, behind the proxy's writes already queued
 * there), when `via` is receive-only (weft_accel_rx: no sk_msg program, so
 * every byte it sends is TCP's) and has room in its send buffer.
 * Otherwise the message goes to the proxy as before, which forwards it in
 * order behind the spliced bytes already queued. FIN and RST still travel
 * through the proxy, after every byte. sockops deletes an entry when its
 * key's socket closes; the proxy deletes its own at close and all at start.
 * Spliced bytes are counted per key in weft_accel_spliced (LRU), so the
 * proxy's per-connection byte counts stay whole.
 */
struct weft_accel_splice {
	struct weft_accel_key target;  /* the far end (S for C's bytes) */
	struct weft_accel_key via;     /* the proxy's socket joined to it (U) */
	__u64 forwarded;               /* bytes of this direction the proxy has
	                                * written to `via` (written by the proxy) */
	__u64 target_cookie;           /* the cookies of those two sockets when the */
	__u64 via_cookie;              /* proxy armed the entry: a 4-tuple reused by
	                                * another connection never matches */
};

enum weft_accel_event {
	WEFT_ACCEL_SOCK_ADDED      = 0,  /* sockops put a socket in the map */
	WEFT_ACCEL_SOCK_ADD_FAILED = 1,  /* map full or 4-tuple already there */
	WEFT_ACCEL_SOCK_REMOVED    = 2,  /* a socket in the map closed */
	WEFT_ACCEL_FLOW_REDIRECT   = 3,  /* a direction decided for the shortcut */
	WEFT_ACCEL_FLOW_NO_PEER    = 4,  /* decided for TCP: peer not in the map */
	WEFT_ACCEL_FLOW_DISABLED   = 5,  /* decided for TCP: shortcut switched off */
	WEFT_ACCEL_FALLBACK_OFF    = 6,  /* redirected direction moved to TCP: switched off */
	WEFT_ACCEL_FALLBACK_QUEUE  = 7,  /* ... moved to TCP: receiver's queue over its limit */
	WEFT_ACCEL_MSG_REDIRECTED  = 8,
	WEFT_ACCEL_BYTES_REDIRECTED = 9,
	WEFT_ACCEL_MSG_PASSED      = 10, /* messages of map sockets sent by TCP */
	WEFT_ACCEL_BYTES_PASSED    = 11,
	WEFT_ACCEL_FLOW_NOT_RECEIVER = 12, /* decided for TCP: peer not marked as a receiver */
	WEFT_ACCEL_PROBE_REDIRECTED = 13,
	WEFT_ACCEL_RESUMED         = 14, /* a queue fallback went back to redirecting */
	WEFT_ACCEL_MSG_SPLICED     = 15, /* redirected past the node proxy (also in MSG_REDIRECTED) */
	WEFT_ACCEL_BYTES_SPLICED   = 16, /* (also in BYTES_REDIRECTED) */
	WEFT_ACCEL_SPLICE_WAIT     = 17, /* a spliced direction's message sent to the proxy:
	                                  * it still held bytes, or the far end could not take it */
	WEFT_ACCEL_SOCK_RECEIVE_ONLY = 18, /* sockops put a socket in weft_accel_rx (also in SOCK_ADDED) */
	WEFT_ACCEL_EVENT_MAX       = 19,
};

/*
 * ----- Connection counters -----
 * TCP connections of local pods, counted on the client's side only (each
 * connection once), per (client pod, pod reached, address and port dialed):
 * sockops counts the handshake and, at TCP_CLOSE, the bytes each way (from
 * the socket's own bytes_acked / bytes_received); connect4 counts the
 * connects it refuses for want of a backend. Per-CPU values in an LRU map:
 * a scan of many ports or addresses evicts old keys instead of growing.
 * Bytes the same-node shortcut redirects bypass TCP and are not in
 * bytes_sent/bytes_received (weft_accel_stats counts them).
 * UDP exchanges of local pods go in the same map under proto IPPROTO_UDP,
 * counted by the sock_addr hooks: opened is each connect() of a UDP socket
 * and each exchange an unconnected socket begins (its first datagram to a
 * peer, or the first after the exchange went idle: weft_udp_flow_key, so a
 * DNS lookup from a fresh socket is one); failed, each connect() or
 * sendto() refused for want of a backend. No bytes or closes for UDP.
 */
struct weft_flow_key {
	__be32 src_addr;   /* the client pod */
	__be32 dst_addr;   /* the address it reached (a backend, the node proxy, a pod), 0: none */
	__be32 vip;        /* the clusterIP it dialed; 0 for a direct connection */
	__be16 port;       /* the port it dialed */
	__u8   proto;      /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   pad0;       /* zero */
};

/* weft_telemetry_config[0]: zero (a fresh map) means everything counts. */
#define WEFT_TELEMETRY_F_NO_FLOWS 0x1  /* MeshConfig telemetry.connectionCounters: false */

struct weft_flow_stats {
	__u64 opened;          /* handshakes completed (UDP: exchanges begun) */
	__u64 failed;          /* connects that never completed: refused, reset, timed out, no backend (UDP: no backend) */
	__u64 closed;          /* established connections that ended */
	__u64 bytes_sent;      /* at close: bytes the peer acknowledged */
	__u64 bytes_received;  /* at close: bytes received */
};

/*
 * ----- L4 policy (Kubernetes NetworkPolicy) -----
 *
 * Every pod has a numeric identity: one per distinct (namespace, label set),
 * the same on every node. weft_endpoints maps each pod address in the
 * cluster to its identity and whether policies isolate it; this node's own
 * addresses are in it too, as WEFT_ID_HOST, because Kubernetes always allows
 * traffic between a pod and the node it runs on (and a pod's traffic to
 * itself, loopback included, is never judged). weft_cgroups maps this
 * node's pod cgroups to their address, which is how connect() knows the
 * client before the socket has a source address. Peers that are not pods get
 * WEFT_ID_WORLD. Each distinct ipBlock region (a cidr minus its excepts, with
 * overlapping blocks split apart) is a "CIDR class", found by longest-prefix
 * match in weft_cidr_classes; an address can match both a pod identity and a
 * class, and either may allow it.
 *
 * weft_policy is a hash of allows: per peer (identity, CIDR class, then
 * WEFT_ID_ANY) a decision probes the exact (protocol, port), then "any port of
 * the protocol" (port 0), then "any protocol" (protocol 0): a few O(1)
 * lookups whatever the number of rules. A hash, not a trie, because a trie's
 * lookup chases one pointer per level, and at 100,000 entries those levels
 * are cache misses. endPort ranges (split into aligned port prefixes) live
 * apart in the LPM trie weft_policy_ranges, consulted only for identities
 * whose endpoint flags say they have ranges in that direction.
 */
#define WEFT_ID_ANY         0u        /* in weft_policy keys: any peer at all */
#define WEFT_ID_WORLD       1u        /* an address that is no known pod */
#define WEFT_ID_HOST        2u        /* an address of this node: always allowed */
#define WEFT_ID_FIRST_POD   256u      /* pod identities start here */
#define WEFT_ID_CIDR_BASE   0x01000000u /* CIDR class n is WEFT_ID_CIDR_BASE + n */

enum weft_direction {
	WEFT_DIR_INGRESS = 0,
	WEFT_DIR_EGRESS  = 1,
	/* AuthorizationPolicy, the parts that need only identities and ports:
	 * for pods flagged WEFT_EP_F_AUTHZ, a new TCP flow must hit no DENY
	 * entry and some ALLOW entry (a pod with only DENY policies holds one
	 * ALLOW entry for any peer). Peers are pod identities only for pods of
	 * this node, whose identity the node attests; any other address is its
	 * CIDR class, or WEFT_ID_WORLD. */
	WEFT_DIR_AUTHZ_ALLOW = 2,
	WEFT_DIR_AUTHZ_DENY  = 3,
};

/* weft_endpoint.flags: which directions some policy selects this pod for. A
 * pod isolated in a direction passes only what an allow entry names. */
#define WEFT_EP_F_INGRESS_ISOLATED 0x01
#define WEFT_EP_F_EGRESS_ISOLATED  0x02
#define WEFT_EP_F_INGRESS_RANGES   0x04  /* has allows in weft_policy_ranges */
#define WEFT_EP_F_EGRESS_RANGES    0x08
#define WEFT_EP_F_TUNNEL           0x10  /* a pod on another node that takes mTLS tunnels:
                                          * this node's pods reach it through the proxy */
#define WEFT_EP_F_MTLS_STRICT      0x20  /* a pod of this node under PeerAuthentication STRICT:
                                          * new TCP flows only from this node (its proxy, its pods) */
#define WEFT_EP_F_LOCAL            0x40  /* a pod of this node */
#define WEFT_EP_F_AUTHZ            0x80  /* AuthorizationPolicy applies (WEFT_DIR_AUTHZ_*) */

struct weft_endpoint {
	__u32 identity;    /* WEFT_ID_FIRST_POD and up */
	__u32 cidr_class;  /* the CIDR class of this address (0: none), computed by
	                    * the agent so that pod peers need no LPM lookup */
	__u8  flags;       /* WEFT_EP_F_* */
	__u8  pad0[3];     /* zero */
};

struct weft_cgroup_endpoint {
	__be32 addr;       /* the pod's address: key into weft_endpoints */
	__u32  pad0;       /* zero */
};

struct weft_cidr_key {
	__u32  prefixlen;  /* LPM trie: bits of addr that matter */
	__be32 addr;       /* network order */
};

struct weft_cidr_class {
	__u32 id;          /* WEFT_ID_CIDR_BASE + n */
};

struct weft_policy_key {
	__u32  identity;   /* the pod the policy selects */
	__u32  peer;       /* peer identity, CIDR class, or WEFT_ID_ANY */
	__u8   direction;  /* enum weft_direction */
	__u8   proto;      /* IPPROTO_*, or 0: any protocol (then port is 0) */
	__be16 port;       /* destination port, network order, or 0: any port */
};

/* Bits of weft_policy_range_key after prefixlen, for its prefixlen: a range
 * entry matches identity, direction, peer and protocol exactly (112 bits)
 * and the leading bits of the port; a lookup gives all 128. */
#define WEFT_POLICY_PREFIX_ANY_PORT   112
#define WEFT_POLICY_PREFIX_FULL       128

struct weft_policy_range_key {
	__u32  prefixlen;  /* LPM trie: WEFT_POLICY_PREFIX_ANY_PORT + port prefix bits */
	__be32 identity;   /* the pod the policy selects, network order (trie order) */
	__u8   direction;  /* enum weft_direction */
	__u8   pad0[3];    /* zero */
	__be32 peer;       /* peer identity, CIDR class, or WEFT_ID_ANY; network order */
	__u8   proto;      /* IPPROTO_TCP / UDP / SCTP */
	__u8   pad1;       /* zero */
	__be16 port;       /* destination port, network order (prefix-matched) */
};

struct weft_policy_value {
	__u32 rule_id;     /* which compiled rule allowed it (for `weft policy check`) */
};

/* Why a connection or packet was dropped. */
enum weft_drop_reason {
	WEFT_DROP_EGRESS           = 1, /* source pod's egress policy: EPERM at connect()/sendmsg() */
	WEFT_DROP_INGRESS_AT_SOURCE = 2, /* destination's ingress policy, checked by the source node: EPERM */
	WEFT_DROP_INGRESS          = 3, /* destination pod's ingress policy at the destination: packet dropped */
	WEFT_DROP_PLAINTEXT        = 4, /* plaintext from another node to a STRICT pod: packet dropped */
	WEFT_DROP_AUTHZ            = 5, /* AuthorizationPolicy: EPERM at connect() on the same node, else dropped */
};

struct weft_drop_key {
	__u32  src_identity;
	__u32  dst_identity;
	__be16 port;       /* destination port, network order */
	__u8   proto;
	__u8   reason;     /* enum weft_drop_reason */
};

/*
 * UDP has no handshake to judge once, so policy remembers each (local
 * socket, peer) it has allowed, in either direction: the reply to an allowed
 * datagram, and later datagrams of the same exchange, pass without a second
 * verdict — the stateful "replies are allowed" reading of NetworkPolicy that
 * conntrack gives other implementations. Keyed by socket cookie, so sockets
 * in different network namespaces never share an entry. The value is when
 * the exchange was last seen (bpf_ktime_get_ns); an exchange idle longer
 * than weft_policy_config's udp_idle_ns is forgotten, and its next datagram
 * is judged as a new one under the policy then in force. A connected UDP
 * socket needs no entry: connect() was judged, and the datagrams it
 * receives come from the peer it connected to, as a TCP connection's do.
 */
struct weft_udp_flow_key {
	__u64  cookie;     /* bpf_get_socket_cookie() of the local socket */
	__be32 peer;       /* remote address, network order */
	__be16 port;       /* remote port, network order */
	__u16  pad0;       /* zero */
};

/* weft_policy_config[0], written by the agent from MeshConfig spec.policy.
 * Zero (a fresh map) means the defaults. */
struct weft_policy_config {
	__u64 udp_idle_ns;  /* MeshConfig policy.udpIdleTimeout; 0: WEFT_UDP_IDLE_DEFAULT_NS */
};
#define WEFT_UDP_IDLE_DEFAULT_NS (60ULL * 1000000000ULL)  /* Cilium's non-TCP flow lifetime */

#ifndef __cplusplus
_Static_assert(sizeof(struct weft_udp_flow_key) == 16, "weft_udp_flow_key layout");
_Static_assert(sizeof(struct weft_policy_config) == 8, "weft_policy_config layout");
_Static_assert(sizeof(struct weft_udp_revnat) == 8, "weft_udp_revnat layout");
_Static_assert(sizeof(struct weft_endpoint) == 12, "weft_endpoint layout");
_Static_assert(sizeof(struct weft_cgroup_endpoint) == 8, "weft_cgroup_endpoint layout");
_Static_assert(sizeof(struct weft_cidr_key) == 8, "weft_cidr_key layout");
_Static_assert(sizeof(struct weft_policy_key) == 12, "weft_policy_key layout");
_Static_assert(sizeof(struct weft_policy_range_key) == 20, "weft_policy_range_key layout");
_Static_assert(sizeof(struct weft_drop_key) == 12, "weft_drop_key layout");
_Static_assert(sizeof(struct weft_service_key) == 12, "weft_service_key layout");
_Static_assert(sizeof(struct weft_service_value) == 12, "weft_service_value layout");
_Static_assert(sizeof(struct weft_backend) == 8, "weft_backend layout");
_Static_assert(sizeof(struct weft_affinity_key) == 16, "weft_affinity_key layout");
_Static_assert(sizeof(struct weft_affinity) == 16, "weft_affinity layout");
_Static_assert(sizeof(struct weft_sock_origin) == 24, "weft_sock_origin layout");
_Static_assert(sizeof(struct weft_flow_key) == 16, "weft_flow_key layout");
_Static_assert(sizeof(struct weft_flow_stats) == 40, "weft_flow_stats layout");
_Static_assert(sizeof(struct weft_proxy_config) == 8, "weft_proxy_config layout");
_Static_assert(sizeof(struct weft_proxy_origin_key) == 8, "weft_proxy_origin_key layout");
_Static_assert(sizeof(struct weft_proxy_origin) == 24, "weft_proxy_origin layout");
_Static_assert(sizeof(struct weft_accel_key) == 36, "weft_accel_key layout");
_Static_assert(sizeof(struct weft_accel_addr) == 16, "weft_accel_addr layout");
_Static_assert(sizeof(struct weft_accel_config) == 8, "weft_accel_config layout");
_Static_assert(sizeof(struct weft_listen_turn) == 8, "weft_listen_turn layout");
_Static_assert(sizeof(struct weft_accel_peer) == 32, "weft_accel_peer layout");
_Static_assert(sizeof(struct weft_accel_sock) == 24, "weft_accel_sock layout");
_Static_assert(sizeof(struct weft_accel_splice) == 96, "weft_accel_splice layout");
#endif

#endif /* WEFT_ABI_H */
