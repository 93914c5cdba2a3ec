/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Ewii egress lock: cgroup programs that let the Client's cgroup reach only the Hub (UDP) and
 * the allow-list (TCP). Every decision is a map lookup; the entries are computed on the host
 * (ewii-common, egress.rs) and tested there. Return 1 lets the call through, 0 refuses it
 * (EPERM for connect/sendmsg, a dropped packet for cgroup_skb).
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "egress.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct ewii_key4);
	__type(value, __u8);
} ALLOW4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct ewii_key6);
	__type(value, __u8);
} ALLOW6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, EWII_HOOKS);
	__type(key, __u32);
	__type(value, __u64);
} DENIES SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} EVENTS SEC(".maps");

/* Refusals the ring buffer had no room for. Each event carries the count so far, so the
 * Client places a gap before the next event it reads; and the Client maps this array into its
 * memory, read-only, before it loses bpf(2), so that it sees a gap no event follows. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} LOST SEC(".maps");

static __always_inline void count_and_report(__u8 hook, __u8 family, __u8 proto,
					     const __u32 *addr, __u16 port)
{
	__u32 idx = hook;
	__u64 *n = bpf_map_lookup_elem(&DENIES, &idx);
	if (n)
		*n += 1;
	__u32 zero = 0;
	__u64 *lost = bpf_map_lookup_elem(&LOST, &zero);
	struct ewii_event *e = bpf_ringbuf_reserve(&EVENTS, sizeof(*e), 0);
	if (!e) {
		/* The counters still count it; the next event says it was lost. */
		if (lost)
			__sync_fetch_and_add(lost, 1);
		return;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->hook = hook;
	e->family = family;
	e->proto = proto;
	e->pad = 0;
	__builtin_memset(e->addr, 0, sizeof(e->addr));
	if (family == 4) {
		__builtin_memcpy(e->addr, addr, 4);
	} else {
		__builtin_memcpy(e->addr, addr, 16);
	}
	e->port = port;
	e->pad2 = 0;
	e->lost = lost ? (__u32)*lost : 0;
	bpf_ringbuf_submit(e, 0);
}

static __always_inline int allowed4(__u32 addr, __u16 port, __u8 proto)
{
	struct ewii_key4 k = { .addr = addr, .port = port, .proto = proto, .pad = 0 };
	return bpf_map_lookup_elem(&ALLOW4, &k) != 0;
}

static __always_inline int allowed6(const __u32 *addr, __u16 port, __u8 proto)
{
	struct ewii_key6 k = {};
	k.addr[0] = addr[0];
	k.addr[1] = addr[1];
	k.addr[2] = addr[2];
	k.addr[3] = addr[3];
	k.port = port;
	k.proto = proto;
	return bpf_map_lookup_elem(&ALLOW6, &k) != 0;
}

/* ::ffff:a.b.c.d — a TCP socket connecting to an IPv4 peer through an AF_INET6 socket. */
static __always_inline int v4_mapped(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff);
}

static __always_inline __u8 proto_of(struct bpf_sock_addr *ctx)
{
	/* MPTCP and anything else never matches a TCP or UDP entry. */
	if (ctx->type == 1 /* SOCK_STREAM */ && ctx->protocol == IPPROTO_TCP)
		return EWII_PROTO_TCP;
	if (ctx->type == 2 /* SOCK_DGRAM */ && ctx->protocol == IPPROTO_UDP)
		return EWII_PROTO_UDP;
	return 255;
}

static __always_inline int decide4(struct bpf_sock_addr *ctx, __u8 hook)
{
	__u8 proto = proto_of(ctx);
	__u32 addr = ctx->user_ip4;
	__u16 port = (__u16)ctx->user_port;
	if (allowed4(addr, port, proto))
		return 1;
	count_and_report(hook, 4, proto, &addr, port);
	return 0;
}

static __always_inline int decide6(struct bpf_sock_addr *ctx, __u8 hook)
{
	__u8 proto = proto_of(ctx);
	__u32 a[4];
	a[0] = ctx->user_ip6[0];
	a[1] = ctx->user_ip6[1];
	a[2] = ctx->user_ip6[2];
	a[3] = ctx->user_ip6[3];
	__u16 port = (__u16)ctx->user_port;
	if (v4_mapped(a)) {
		if (allowed4(a[3], port, proto))
			return 1;
		count_and_report(hook, 4, proto, &a[3], port);
		return 0;
	}
	if (allowed6(a, port, proto))
		return 1;
	count_and_report(hook, 6, proto, a, port);
	return 0;
}

SEC("cgroup/connect4")
int ewii_connect4(struct bpf_sock_addr *ctx) { return decide4(ctx, EWII_HOOK_CONNECT4); }

SEC("cgroup/connect6")
int ewii_connect6(struct bpf_sock_addr *ctx) { return decide6(ctx, EWII_HOOK_CONNECT6); }

SEC("cgroup/sendmsg4")
int ewii_sendmsg4(struct bpf_sock_addr *ctx) { return decide4(ctx, EWII_HOOK_SENDMSG4); }

SEC("cgroup/sendmsg6")
int ewii_sendmsg6(struct bpf_sock_addr *ctx) { return decide6(ctx, EWII_HOOK_SENDMSG6); }

/*
 * Backstop for what the socket hooks do not see (raw and packet sockets, connected UDP
 * sends): every egress IP packet must go to an allowed (address, port, protocol).
 */
SEC("cgroup_skb/egress")
int ewii_skb_egress(struct __sk_buff *skb)
{
	__u16 ports[2];
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
			return 0;
		__u8 proto = ip.protocol;
		__u16 dport = 0;
		if ((proto == IPPROTO_TCP || proto == IPPROTO_UDP) &&
		    bpf_skb_load_bytes(skb, ip.ihl * 4, ports, sizeof(ports)) == 0)
			dport = ports[1];
		if ((proto == IPPROTO_TCP || proto == IPPROTO_UDP) && allowed4(ip.daddr, dport, proto))
			return 1;
		count_and_report(EWII_HOOK_SKB_EGRESS, 4, proto, &ip.daddr, dport);
		return 0;
	}
	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)) < 0)
			return 0;
		__u8 proto = ip6.nexthdr; /* extension headers are refused */
		__u16 dport = 0;
		__u32 a[4];
		__builtin_memcpy(a, &ip6.daddr, 16);
		if ((proto == IPPROTO_TCP || proto == IPPROTO_UDP) &&
		    bpf_skb_load_bytes(skb, sizeof(ip6), ports, sizeof(ports)) == 0)
			dport = ports[1];
		if ((proto == IPPROTO_TCP || proto == IPPROTO_UDP)) {
			if (v4_mapped(a) ? allowed4(a[3], dport, proto) : allowed6(a, dport, proto))
				return 1;
		}
		count_and_report(EWII_HOOK_SKB_EGRESS, 6, proto, a, dport);
		return 0;
	}
	/* Neither IPv4 nor IPv6 leaves this cgroup. */
	return 0;
}
