/*
 * Debian's libbpf, as Swift sees it. libbpf's option structs are built with
 * macros and its logging goes through a va_list callback; neither imports into
 * Swift, so the few spots that need them are wrapped here, once.
 */
#ifndef WEFT_CLIBBPF_SHIM_H
#define WEFT_CLIBBPF_SHIM_H

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <linux/bpf.h>

/* errno of the calling thread, read right after the failing call. */
static inline int weft_errno(void) { return errno; }

/* Opens an in-memory object whose maps pinned "by name" live in pin_root. */
static inline struct bpf_object *
weft_object_open_mem(const void *buf, size_t size, const char *name, const char *pin_root)
{
	LIBBPF_OPTS(bpf_object_open_opts, opts, .object_name = name, .pin_root_path = pin_root);
	return bpf_object__open_mem(buf, size, &opts);
}

/* libbpf's warnings go to stderr with a prefix; debug chatter is dropped. */
static int weft_libbpf_print(enum libbpf_print_level level, const char *fmt, va_list args)
{
	if (level == LIBBPF_DEBUG)
		return 0;
	fputs("libbpf: ", stderr);
	return vfprintf(stderr, fmt, args);
}

static inline void weft_libbpf_quiet_debug(void) { libbpf_set_print(weft_libbpf_print); }

/* Program tag and id of the program behind an fd (link or program). */
static inline int weft_prog_info(int prog_fd, __u32 *id, unsigned char tag[8])
{
	struct bpf_prog_info info;
	__u32 len = sizeof(info);
	int err;

	memset(&info, 0, sizeof(info));
	err = bpf_obj_get_info_by_fd(prog_fd, &info, &len);
	if (err)
		return err;
	*id = info.id;
	memcpy(tag, info.tag, 8);
	return 0;
}

/* The program id a link points at, and the cgroup it is attached to. */
static inline int weft_link_info(int link_fd, __u32 *prog_id, __u64 *cgroup_id, __u32 *attach_type)
{
	struct bpf_link_info info;
	__u32 len = sizeof(info);
	int err;

	memset(&info, 0, sizeof(info));
	err = bpf_obj_get_info_by_fd(link_fd, &info, &len);
	if (err)
		return err;
	*prog_id = info.prog_id;
	*cgroup_id = info.cgroup.cgroup_id;
	*attach_type = info.cgroup.attach_type;
	return 0;
}

/* Atomically swaps the program behind a link (no detach window). */
static inline int weft_link_update(int link_fd, int new_prog_fd)
{
	return bpf_link_update(link_fd, new_prog_fd, NULL);
}

/* Capacity and shape of a map behind an fd. */
static inline int weft_map_info(int map_fd, __u32 *max_entries, __u32 *key_size, __u32 *value_size)
{
	struct bpf_map_info info;
	__u32 len = sizeof(info);
	int err;

	memset(&info, 0, sizeof(info));
	err = bpf_obj_get_info_by_fd(map_fd, &info, &len);
	if (err)
		return err;
	*max_entries = info.max_entries;
	*key_size = info.key_size;
	*value_size = info.value_size;
	return 0;
}

#endif
