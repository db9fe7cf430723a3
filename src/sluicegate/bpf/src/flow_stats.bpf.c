// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/* Kernel flow metrics (docs/ebpf.md, "Kernel metrics"):
 *
 * - `sg_flow_in` / `sg_flow_out` (tcx ingress / egress of each configured interface) count
 *   packets, bytes and connection-opening TCP SYNs per interface and direction (exact), per
 *   (interface, direction, protocol, port) (bounded: the first SG_FLOW_MAX_PORTS keys, the
 *   rest as port 0) and per remote prefix (an LRU of SG_FLOW_MAX_REMOTES, of which the
 *   Python side exports the top N);
 * - `sg_flow_retx` (tp_btf/tcp_retransmit_skb) counts TCP retransmits of this network
 *   namespace's sockets per port. The tracepoint fires for every namespace on the host, so
 *   it compares the socket's namespace cookie with the configured one.
 *
 * Every map is per-CPU: no atomics on the packet path; Python sums at scrape time.
 */
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "flow_stats.h"

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IP_OFFSET_MASK 0x1fff
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10
#define TCX_NEXT (-1)

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sg_flow_config);
} sg_flow_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SG_FLOW_MAX_IFACES);
	__type(key, __u32);
	__type(value, struct sg_flow_iface);
} sg_flow_ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SG_FLOW_MAX_IFACES * 2);
	__type(key, __u32);
	__type(value, struct sg_flow_count);
} sg_flow_totals SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, SG_FLOW_MAX_PORTS);
	__type(key, struct sg_flow_port);
	__type(value, struct sg_flow_count);
} sg_flow_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, SG_FLOW_MAX_REMOTES);
	__type(key, struct sg_flow_remote);
	__type(value, struct sg_flow_remote_count);
} sg_flow_remotes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, SG_FLOW_MAX_RETRANS_PORTS);
	__type(key, struct sg_flow_retrans_key);
	__type(value, __u64);
} sg_flow_retrans SEC(".maps");

static __always_inline void add(struct sg_flow_count *count, __u64 bytes, int syn)
{
	count->packets += 1;
	count->bytes += bytes;
	count->syns += syn;
}

/* A per-CPU hash entry for `key`, created on first use; NULL when the map is full. */
static __always_inline void *entry(void *map, void *key, void *fresh)
{
	void *value = bpf_map_lookup_elem(map, key);

	if (value)
		return value;
	/* EEXIST (another CPU created it) is fine: the second lookup finds it. */
	bpf_map_update_elem(map, key, fresh, BPF_NOEXIST);
	return bpf_map_lookup_elem(map, key);
}

static __always_inline void count_port(__u32 ifindex, __u32 direction, __u32 protocol,
				       __u16 port, __u64 bytes, int syn)
{
	struct sg_flow_port key = {.ifindex = ifindex, .port = port,
				   .protocol = protocol, .direction = direction};
	struct sg_flow_count fresh = {}, *count;

	count = entry(&sg_flow_ports, &key, &fresh);
	if (!count) {
		/* Full: add to this interface's "other" entry (Python creates it at start). */
		key.port = 0;
		count = bpf_map_lookup_elem(&sg_flow_ports, &key);
	}
	if (count)
		add(count, bytes, syn);
}

static __always_inline void count_remote(struct sg_flow_remote *remote, __u32 direction,
					 __u64 bytes)
{
	struct sg_flow_remote_count fresh = {}, *count;

	count = entry(&sg_flow_remotes, remote, &fresh);
	if (!count)
		return;
	/* Constant indexes: the verifier wants bounded offsets into the value. */
	if (direction == SG_FLOW_INGRESS) {
		count->packets[0] += 1;
		count->bytes[0] += bytes;
	} else {
		count->packets[1] += 1;
		count->bytes[1] += bytes;
	}
}

static __always_inline int flow(struct __sk_buff *skb, __u32 direction)
{
	__u32 zero = 0, ifindex = skb->ifindex, index, protocol = 0, l4_offset = 0, i;
	struct sg_flow_remote remote = {};
	struct sg_flow_config *config;
	struct sg_flow_iface *iface;
	struct sg_flow_count *total;
	__u64 bytes = skb->len;
	__be16 ports[2] = {};
	int syn = 0, has_ports = 0;
	__u8 flags;

	iface = bpf_map_lookup_elem(&sg_flow_ifaces, &ifindex);
	config = bpf_map_lookup_elem(&sg_flow_config, &zero);
	if (!iface || !config || iface->slot >= SG_FLOW_MAX_IFACES)
		return TCX_NEXT;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, iface->l2_len, &ip, sizeof(ip)))
			goto totals;
		remote.addr[10] = 0xff;
		remote.addr[11] = 0xff;
		__builtin_memcpy(&remote.addr[12],
				 direction == SG_FLOW_INGRESS ? &ip.saddr : &ip.daddr, 4);
#pragma unroll
		for (i = 0; i < 4; i++)
			remote.addr[12 + i] &= config->mask4[i];
		protocol = ip.protocol;
		l4_offset = iface->l2_len + ip.ihl * 4;
		/* Later fragments carry no ports. */
		has_ports = !(ip.frag_off & bpf_htons(IP_OFFSET_MASK));
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, iface->l2_len, &ip6, sizeof(ip6)))
			goto totals;
		if (direction == SG_FLOW_INGRESS)
			__builtin_memcpy(remote.addr, &ip6.saddr, 16);
		else
			__builtin_memcpy(remote.addr, &ip6.daddr, 16);
#pragma unroll
		for (i = 0; i < 16; i++)
			remote.addr[i] &= config->mask6[i];
		/* Extension headers before TCP/UDP are not followed (docs/ebpf.md). */
		protocol = ip6.nexthdr;
		l4_offset = iface->l2_len + sizeof(ip6);
		has_ports = 1;
	} else {
		goto totals;
	}
	count_remote(&remote, direction, bytes);
	if (has_ports && (protocol == IPPROTO_TCP || protocol == IPPROTO_UDP) &&
	    !bpf_skb_load_bytes(skb, l4_offset, ports, sizeof(ports))) {
		__u16 source = bpf_ntohs(ports[0]), destination = bpf_ntohs(ports[1]);

		if (protocol == IPPROTO_TCP &&
		    !bpf_skb_load_bytes(skb, l4_offset + 13, &flags, sizeof(flags)))
			syn = (flags & TCP_FLAG_SYN) && !(flags & TCP_FLAG_ACK);
		count_port(ifindex, direction, protocol,
			   source < destination ? source : destination, bytes, syn);
	}
totals:
	index = iface->slot * 2 + direction;
	total = bpf_map_lookup_elem(&sg_flow_totals, &index);
	if (total)
		add(total, bytes, syn);
	return TCX_NEXT;
}

SEC("tc")
int sg_flow_in(struct __sk_buff *skb)
{
	return flow(skb, SG_FLOW_INGRESS);
}

SEC("tc")
int sg_flow_out(struct __sk_buff *skb)
{
	return flow(skb, SG_FLOW_EGRESS);
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(sg_flow_retx, const struct sock *sk, const struct sk_buff *skb)
{
	struct sg_flow_retrans_key key = {};
	__u32 zero = 0;
	struct sg_flow_config *config = bpf_map_lookup_elem(&sg_flow_config, &zero);
	__u64 fresh = 0, *count;
	__u16 local, remote;

	if (!config || !sk)
		return 0;
	if (BPF_CORE_READ(sk, __sk_common.skc_net.net, net_cookie) != config->netns_cookie)
		return 0;
	local = BPF_CORE_READ(sk, __sk_common.skc_num);
	remote = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	key.port = local < remote ? local : remote;
	count = entry(&sg_flow_retrans, &key, &fresh);
	if (!count) {
		key.port = 0; /* full: "other" (Python creates it at start) */
		count = bpf_map_lookup_elem(&sg_flow_retrans, &key);
	}
	if (count)
		*count += 1;
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
