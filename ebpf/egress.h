/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The map ABI between the Ewii Client (userspace) and its cgroup egress programs.
 *
 * The Rust side of every struct lives in ewii-common (src/egress.rs); a test there reads the
 * _Static_assert lines below and checks the same sizes and offsets. Change both together.
 *
 * Addresses and ports are in network byte order, exactly as the kernel hands them to
 * cgroup/connect* and cgroup/sendmsg* programs (bpf_sock_addr.user_ip4/user_ip6/user_port).
 */
#ifndef EWII_EGRESS_H
#define EWII_EGRESS_H

#include <linux/types.h>

#define EWII_PROTO_TCP 6
#define EWII_PROTO_UDP 17

/* Index of the per-CPU deny counter, and `hook` in events. */
#define EWII_HOOK_CONNECT4 0
#define EWII_HOOK_CONNECT6 1
#define EWII_HOOK_SENDMSG4 2
#define EWII_HOOK_SENDMSG6 3
#define EWII_HOOK_SKB_EGRESS 4
#define EWII_HOOKS 5

/* Key of ALLOW4: one allowed IPv4 destination. Value: __u8, always 1. */
struct ewii_key4 {
	__u32 addr;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

/* Key of ALLOW6: one allowed IPv6 destination (never v4-mapped: those go to ALLOW4). */
struct ewii_key6 {
	__u32 addr[4];
	__u16 port;
	__u8 proto;
	__u8 pad;
};

/* One refused attempt, sent through the EVENTS ring buffer. */
struct ewii_event {
	__u64 ts_ns;
	__u32 pid;
	__u8 hook;
	__u8 family; /* 4 or 6 */
	__u8 proto;
	__u8 pad;
	__u8 addr[16]; /* IPv4 in the first 4 bytes */
	__u16 port;
	__u16 pad2;
	/* Refusals not reported since attach: the ring buffer was full (cumulative, wraps). */
	__u32 lost;
};

_Static_assert(sizeof(struct ewii_key4) == 8, "ewii_key4 size");
_Static_assert(__builtin_offsetof(struct ewii_key4, port) == 4, "ewii_key4.port offset");
_Static_assert(__builtin_offsetof(struct ewii_key4, proto) == 6, "ewii_key4.proto offset");
_Static_assert(sizeof(struct ewii_key6) == 20, "ewii_key6 size");
_Static_assert(__builtin_offsetof(struct ewii_key6, port) == 16, "ewii_key6.port offset");
_Static_assert(__builtin_offsetof(struct ewii_key6, proto) == 18, "ewii_key6.proto offset");
_Static_assert(sizeof(struct ewii_event) == 40, "ewii_event size");
_Static_assert(__builtin_offsetof(struct ewii_event, pid) == 8, "ewii_event.pid offset");
_Static_assert(__builtin_offsetof(struct ewii_event, hook) == 12, "ewii_event.hook offset");
_Static_assert(__builtin_offsetof(struct ewii_event, family) == 13, "ewii_event.family offset");
_Static_assert(__builtin_offsetof(struct ewii_event, proto) == 14, "ewii_event.proto offset");
_Static_assert(__builtin_offsetof(struct ewii_event, addr) == 16, "ewii_event.addr offset");
_Static_assert(__builtin_offsetof(struct ewii_event, port) == 32, "ewii_event.port offset");
_Static_assert(__builtin_offsetof(struct ewii_event, lost) == 36, "ewii_event.lost offset");

#endif
