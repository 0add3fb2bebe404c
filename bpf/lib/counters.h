/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Per-CPU event counters: no atomics, userspace sums the CPUs at scrape time. */
#ifndef WEFT_BPF_COUNTERS_H
#define WEFT_BPF_COUNTERS_H

#include "maps.h"

static __always_inline void lb_count(enum weft_lb_event event)
{
	__u32 key = event;
	__u64 *value = bpf_map_lookup_elem(&weft_lb_stats, &key);

	if (value)
		*value += 1;
}

#endif
