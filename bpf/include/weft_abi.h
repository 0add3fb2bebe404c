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

/* Capacities. Changing one changes the map definition, which an agent cannot
 * adopt over an existing pin set: bump WEFT_ABI_VERSION with it. */
#define WEFT_MAX_SERVICE_SLOTS  524288  /* one per Service port + one per backend slot */
#define WEFT_MAX_BACKENDS       262144
#define WEFT_MAX_BACKENDS_PER_SERVICE 65535
#define WEFT_ABI_VERSION        1

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
	__u32 backend_id;  /* slot > 0: key into weft_backends; master: 0 */
	__u32 service_id;  /* stable id of this Service port, same in every slot */
	__u16 count;       /* master: number of backend slots; slot > 0: 0 */
	__u8  flags;       /* WEFT_SVC_F_* */
	__u8  pad0;        /* zero */
};

/* Master-entry flags. */
#define WEFT_SVC_F_L7   0x01  /* needs the node proxy (used by the L7 issue) */

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
	__u16  pad0;       /* zero */
	__u32  service_id; /* which Service port translated it */
	__u32  backend_id; /* which backend it was given */
};

/* Indices into the per-CPU weft_lb_stats array: every outcome of the
 * connect-time load balancer, including every rejection, has a counter. */
enum weft_lb_event {
	WEFT_LB_TRANSLATED      = 0, /* connect() to a VIP rewritten to a backend */
	WEFT_LB_NO_BACKEND      = 1, /* VIP has no ready backend: ECONNREFUSED */
	WEFT_LB_SLOT_MISSING    = 2, /* drawn slot absent (update in flight); fell back to slot 1 */
	WEFT_LB_BACKEND_MISSING = 3, /* backend id without backend entry: ECONNREFUSED */
	WEFT_LB_PEER_RESTORED   = 4, /* getpeername()/recvmsg() given back the VIP */
	WEFT_LB_EVENT_MAX       = 5,
};

#ifndef __cplusplus
_Static_assert(sizeof(struct weft_service_key) == 12, "weft_service_key layout");
_Static_assert(sizeof(struct weft_service_value) == 12, "weft_service_value layout");
_Static_assert(sizeof(struct weft_backend) == 8, "weft_backend layout");
_Static_assert(sizeof(struct weft_sock_origin) == 16, "weft_sock_origin layout");
#endif

#endif /* WEFT_ABI_H */
