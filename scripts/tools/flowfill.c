// Fills a pinned weft_flows map with synthetic connection counters, for the
// scrape-at-scale benchmark (scripts/bench_observability.py). Never used on a
// real node: the kernel fills that map by itself.
//   flowfill MAP_PIN < lines of "SRC DST VIP PORT OPENED FAILED CLOSED SENT RECEIVED"
#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../bpf/include/weft_abi.h"

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: flowfill MAP_PIN < lines\n");
		return 2;
	}
	int fd = bpf_obj_get(argv[1]);
	if (fd < 0) {
		perror(argv[1]);
		return 1;
	}
	int cpus = libbpf_num_possible_cpus();
	struct weft_flow_stats *values = calloc(cpus, sizeof(*values));
	char src[32], dst[32], vip[32];
	unsigned port;
	unsigned long long opened, failed, closed, sent, received;
	int n = 0;
	while (scanf("%31s %31s %31s %u %llu %llu %llu %llu %llu", src, dst, vip, &port, &opened, &failed, &closed, &sent,
		     &received) == 9) {
		struct weft_flow_key key = {.port = htons(port), .proto = 6};
		inet_pton(AF_INET, src, &key.src_addr);
		inet_pton(AF_INET, dst, &key.dst_addr);
		inet_pton(AF_INET, vip, &key.vip);
		memset(values, 0, cpus * sizeof(*values));
		values[0] = (struct weft_flow_stats){opened, failed, closed, sent, received};
		if (bpf_map_update_elem(fd, &key, values, BPF_ANY) != 0) {
			perror("update");
			return 1;
		}
		n++;
	}
	printf("%d\n", n);
	return 0;
}
