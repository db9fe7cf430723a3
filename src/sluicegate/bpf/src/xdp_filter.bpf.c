// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/* Kernel-side traffic control (docs/ebpf.md, "XDP filter"): `sg_xdp_filter` runs at XDP on
 * each configured interface, before the kernel allocates anything for a packet, and drops
 *
 * - packets whose source is in a deny prefix (LPM tries, v4 and v6),
 * - packets over a per-source rate (GCRA token bucket in an LRU hash),
 * - TCP SYNs over a per-source new-connection rate,
 *
 * sources in an exempt prefix skipping the rate limits (not the deny list),
 *
 * counting every verdict per interface and reason, and every deny drop per rule (per-CPU
 * arrays the Python side sums). Dropped packets never reach the stack, nftables or the
 * gateway. The rules live in maps the Python side fills before attaching
 * (sluicegate/bpf/xdp.py).
 */
#include "vmlinux.h"
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "xdp_filter.h"

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8
#define IPPROTO_TCP 6
#define IP_OFFSET_MASK 0x1fff
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10
/* 802.1Q / 802.1ad tags followed before the IP header (QinQ). */
#define SG_VLAN_DEPTH 2
/* Compare-and-swap attempts on a contended bucket before letting the packet pass. */
#define SG_CAS_ATTEMPTS 4

struct sg_vlan {
	__be16 tci;
	__be16 proto;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sg_xdp_config);
} sg_xdp_config SEC(".maps");

/* ifindex → counter slot; an interface not in it is not filtered. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SG_XDP_MAX_IFACES);
	__type(key, __u32);
	__type(value, __u32);
} sg_xdp_ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SG_XDP_MAX_RULES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sg_xdp_lpm4);
	__type(value, __u32);
} sg_xdp_deny4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SG_XDP_MAX_RULES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sg_xdp_lpm6);
	__type(value, __u32);
} sg_xdp_deny6 SEC(".maps");

/* Sources the rate limits never apply to (value unused). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SG_XDP_MAX_RULES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sg_xdp_lpm4);
	__type(value, __u8);
} sg_xdp_exempt4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SG_XDP_MAX_RULES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sg_xdp_lpm6);
	__type(value, __u8);
} sg_xdp_exempt6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SG_XDP_MAX_SOURCES);
	__type(key, struct sg_xdp_source);
	__type(value, struct sg_xdp_bucket);
} sg_xdp_sources SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SG_XDP_MAX_IFACES * SG_XDP_REASONS);
	__type(key, __u32);
	__type(value, struct sg_xdp_count);
} sg_xdp_stats SEC(".maps");

/* Packets dropped per deny rule (index = the trie value). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SG_XDP_MAX_RULES);
	__type(key, __u32);
	__type(value, __u64);
} sg_xdp_rules SEC(".maps");

static __always_inline int verdict(__u32 slot, __u32 reason, __u64 bytes)
{
	__u32 index = slot * SG_XDP_REASONS + reason;
	struct sg_xdp_count *count = bpf_map_lookup_elem(&sg_xdp_stats, &index);

	if (count) {
		count->packets += 1;
		count->bytes += bytes;
	}
	return reason == SG_XDP_PASSED ? XDP_PASS : XDP_DROP;
}

/* True when one more packet would put the source more than `tolerance` ns ahead of now
 * (the bucket is empty); otherwise takes the packet's cost. `tat` is shared by every CPU
 * seeing this source, hence the compare-and-swap. */
static __always_inline int over_limit(__u64 *tat, __u64 now, __u64 interval,
				      __u64 tolerance)
{
	__u64 seen, next;
	int attempt;

#pragma unroll
	for (attempt = 0; attempt < SG_CAS_ATTEMPTS; attempt++) {
		seen = *(volatile __u64 *)tat;
		next = (seen > now ? seen : now) + interval;
		if (next - now > tolerance)
			return 1;
		if (__sync_val_compare_and_swap(tat, seen, next) == seen)
			return 0;
	}
	/* Still contended: pass rather than spin (costs at most a few packets of accuracy). */
	return 0;
}

static __always_inline struct sg_xdp_bucket *bucket_of(struct sg_xdp_source *source)
{
	struct sg_xdp_bucket *bucket = bpf_map_lookup_elem(&sg_xdp_sources, source);
	struct sg_xdp_bucket fresh = {};

	if (bucket)
		return bucket;
	/* Another CPU may insert it meanwhile (EEXIST): the second lookup finds either. */
	bpf_map_update_elem(&sg_xdp_sources, source, &fresh, BPF_NOEXIST);
	return bpf_map_lookup_elem(&sg_xdp_sources, source);
}

/* The rate limits for a source that no deny rule matched. */
static __always_inline int limit(struct sg_xdp_config *config, struct sg_xdp_source *source,
				 int syn, __u32 slot, __u64 bytes)
{
	struct sg_xdp_bucket *bucket;
	__u64 now;

	if (!config->rate_interval_ns && !(syn && config->syn_interval_ns))
		return verdict(slot, SG_XDP_PASSED, bytes);
	bucket = bucket_of(source);
	if (!bucket)
		return verdict(slot, SG_XDP_PASSED, bytes);
	now = bpf_ktime_get_ns();
	if (config->rate_interval_ns &&
	    over_limit(&bucket->rate_tat, now, config->rate_interval_ns,
		       config->rate_tolerance_ns)) {
		__sync_fetch_and_add(&bucket->dropped, 1);
		return verdict(slot, SG_XDP_RATE_LIMITED, bytes);
	}
	if (syn && config->syn_interval_ns &&
	    over_limit(&bucket->syn_tat, now, config->syn_interval_ns,
		       config->syn_tolerance_ns)) {
		__sync_fetch_and_add(&bucket->dropped, 1);
		return verdict(slot, SG_XDP_SYN_LIMITED, bytes);
	}
	return verdict(slot, SG_XDP_PASSED, bytes);
}

static __always_inline int denied(__u32 *rule, __u32 slot, __u64 bytes)
{
	__u32 index = *rule;
	__u64 *drops = bpf_map_lookup_elem(&sg_xdp_rules, &index);

	if (drops)
		*drops += 1;
	return verdict(slot, SG_XDP_DENIED, bytes);
}

/* A TCP SYN opening a connection (not the SYN-ACK answering one). `tcp` has been checked
 * to hold at least the 20-byte header. */
static __always_inline int opening_syn(__u8 *tcp)
{
	__u8 flags = tcp[13];

	return (flags & TCP_FLAG_SYN) && !(flags & TCP_FLAG_ACK);
}

SEC("xdp")
int sg_xdp_filter(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 zero = 0, ifindex = ctx->ingress_ifindex, slot, *found, *rule;
	__u64 bytes = (__u64)(end - data);
	struct sg_xdp_source source = {};
	struct sg_xdp_config *config;
	struct ethhdr *eth = data;
	__u16 proto;
	__u64 offset;
	int depth, syn = 0;

	found = bpf_map_lookup_elem(&sg_xdp_ifaces, &ifindex);
	if (!found)
		return XDP_PASS;
	slot = *found;
	if (slot >= SG_XDP_MAX_IFACES)
		return XDP_PASS;
	config = bpf_map_lookup_elem(&sg_xdp_config, &zero);
	if (!config)
		return XDP_PASS;
	if ((void *)(eth + 1) > end)
		return verdict(slot, SG_XDP_PASSED, bytes);
	proto = eth->h_proto;
	offset = sizeof(*eth);
#pragma unroll
	for (depth = 0; depth < SG_VLAN_DEPTH; depth++) {
		struct sg_vlan *vlan = data + offset;

		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		if ((void *)(vlan + 1) > end)
			return verdict(slot, SG_XDP_PASSED, bytes);
		proto = vlan->proto;
		offset += sizeof(*vlan);
	}
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + offset;
		struct sg_xdp_lpm4 key = {.prefixlen = 32};
		__u8 *tcp;

		if ((void *)(ip + 1) > end)
			return verdict(slot, SG_XDP_PASSED, bytes);
		__builtin_memcpy(key.addr, &ip->saddr, 4);
		rule = bpf_map_lookup_elem(&sg_xdp_deny4, &key);
		if (rule)
			return denied(rule, slot, bytes);
		if (bpf_map_lookup_elem(&sg_xdp_exempt4, &key))
			return verdict(slot, SG_XDP_PASSED, bytes);
		source.addr[10] = 0xff;
		source.addr[11] = 0xff;
		__builtin_memcpy(&source.addr[12], &ip->saddr, 4);
		/* Later fragments carry no TCP header: only the packet rate applies to them. */
		if (ip->protocol == IPPROTO_TCP && !(ip->frag_off & bpf_htons(IP_OFFSET_MASK)) &&
		    ip->ihl >= 5) {
			tcp = (__u8 *)ip + ip->ihl * 4;
			if ((void *)(tcp + 20) <= end)
				syn = opening_syn(tcp);
		}
		return limit(config, &source, syn, slot, bytes);
	}
	if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + offset;
		struct sg_xdp_lpm6 key = {.prefixlen = 128};
		__u8 *tcp;

		if ((void *)(ip6 + 1) > end)
			return verdict(slot, SG_XDP_PASSED, bytes);
		__builtin_memcpy(key.addr, &ip6->saddr, 16);
		rule = bpf_map_lookup_elem(&sg_xdp_deny6, &key);
		if (rule)
			return denied(rule, slot, bytes);
		if (bpf_map_lookup_elem(&sg_xdp_exempt6, &key))
			return verdict(slot, SG_XDP_PASSED, bytes);
		__builtin_memcpy(source.addr, &ip6->saddr, 16);
		/* Extension headers before TCP are not followed (docs/ebpf.md): such SYNs count
		 * against the packet rate only. */
		if (ip6->nexthdr == IPPROTO_TCP) {
			tcp = (__u8 *)(ip6 + 1);
			if ((void *)(tcp + 20) <= end)
				syn = opening_syn(tcp);
		}
		return limit(config, &source, syn, slot, bytes);
	}
	/* ARP, LLDP...: not filtered (a deny list names IP sources). */
	return verdict(slot, SG_XDP_PASSED, bytes);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
