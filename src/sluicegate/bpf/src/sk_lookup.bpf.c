// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/* eBPF interception without firewall rules (docs/ebpf.md).
 *
 * Two programs share the maps below:
 *
 * - `sg_tc_mark` (tcx ingress on the capturing interfaces) marks packets the spec captures
 *   with the fwmark; the policy rule `fwmark MARK lookup TABLE` and the route `local
 *   0.0.0.0/0 dev lo table TABLE` then deliver them locally although they are addressed to
 *   another host. With preserve_source it also marks the server's replies to the gateway's
 *   transparent upstream sockets (bound to the client's address), which would otherwise be
 *   forwarded to the client.
 * - `sg_sk_lookup` (sk_lookup, attached to the network namespace) runs when the kernel looks
 *   for the socket of a locally delivered TCP SYN or UDP datagram, and assigns the gateway's
 *   transparent listener from `sg_sockets` when the spec captures the packet.
 *
 * Both are attached with BPF links the gateway holds: when it dies (even kill -9) the links
 * go, nothing is marked or steered, and traffic is forwarded to its destination (fail-open).
 * The spec lives in maps the Python side fills before attaching (sluicegate/intercept/ebpf.py).
 */
#include "vmlinux.h"
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "sk_lookup.h"

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define AF_INET 2
#define AF_INET6 10
#define IP_OFFSET_MASK 0x1fff
#define TCX_NEXT (-1)
#define SK_PASS_VERDICT 1
#define TCP_LISTEN_STATE 10
/* Per family and trie: 100k+ captured prefixes (bench scaling) plus the host's addresses.
 * BPF_F_NO_PREALLOC: memory is taken per inserted prefix, not for max_entries. Mirrored by
 * MAX_PREFIXES in intercept/ebpf.py. */
#define SG_MAX_PREFIXES 262144
#define SG_MAX_IFACES 256

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sg_config);
} sg_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sg_ports);
} sg_ports SEC(".maps");

/* Captured destinations, and the destinations never captured (the `exclude` option, the
 * gateway's own addresses and loopback): an excluded match wins. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SG_MAX_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sg_lpm_v4);
	__type(value, __u8);
} sg_dst4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SG_MAX_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sg_lpm_v4);
	__type(value, __u8);
} sg_excl4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SG_MAX_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sg_lpm_v6);
	__type(value, __u8);
} sg_dst6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SG_MAX_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sg_lpm_v6);
	__type(value, __u8);
} sg_excl6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SG_MAX_IFACES);
	__type(key, __u32);
	__type(value, struct sg_iface);
} sg_ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, SG_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} sg_sockets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SG_STATS);
	__type(key, __u32);
	__type(value, __u64);
} sg_stats SEC(".maps");

static __always_inline void count(__u32 slot)
{
	__u64 *value = bpf_map_lookup_elem(&sg_stats, &slot);

	if (value)
		*value += 1;
}

static __always_inline int port_captured(__u32 port)
{
	__u32 zero = 0;
	struct sg_ports *ports = bpf_map_lookup_elem(&sg_ports, &zero);

	if (!ports)
		return 0;
	port &= 0xffff;
	return (ports->bits[port >> 6] >> (port & 63)) & 1;
}

static __always_inline __u32 proto_flag(__u32 protocol)
{
	if (protocol == IPPROTO_TCP)
		return SG_F_TCP;
	if (protocol == IPPROTO_UDP)
		return SG_F_UDP;
	return 0;
}

/* daddr: network byte order. */
static __always_inline int captures_v4(__u32 daddr)
{
	struct sg_lpm_v4 key = {.prefixlen = 32};

	__builtin_memcpy(key.addr, &daddr, 4);
	if (bpf_map_lookup_elem(&sg_excl4, &key))
		return 0;
	return bpf_map_lookup_elem(&sg_dst4, &key) != NULL;
}

/* daddr: four 32-bit words in network byte order. */
static __always_inline int captures_v6(const __u32 *daddr)
{
	struct sg_lpm_v6 key = {.prefixlen = 128};

	__builtin_memcpy(key.addr, daddr, 16);
	if (bpf_map_lookup_elem(&sg_excl6, &key))
		return 0;
	return bpf_map_lookup_elem(&sg_dst6, &key) != NULL;
}

/* The captured test both programs apply: protocol, destination port, family, prefixes. */
static __always_inline int captures(const struct sg_config *config, __u32 protocol,
				    __u32 dport, int v6, const __u32 *daddr)
{
	__u32 flag = proto_flag(protocol);

	if (!flag || !(config->flags & flag))
		return 0;
	if (!(config->flags & (v6 ? SG_F_V6 : SG_F_V4)))
		return 0;
	if (!port_captured(dport))
		return 0;
	return v6 ? captures_v6(daddr) : captures_v4(daddr[0]);
}

SEC("sk_lookup")
int sg_sk_lookup(struct bpf_sk_lookup *ctx)
{
	__u32 zero = 0, slot, ifindex;
	struct sg_config *config = bpf_map_lookup_elem(&sg_config, &zero);
	struct bpf_sock *sk;
	__u32 daddr[4] = {};
	int v6, err;

	if (!config)
		return SK_PASS_VERDICT;
	v6 = ctx->family == AF_INET6;
	if (!v6 && ctx->family != AF_INET)
		return SK_PASS_VERDICT;
	if (config->flags & SG_F_IFACES) {
		ifindex = ctx->ingress_ifindex;
		if (!bpf_map_lookup_elem(&sg_ifaces, &ifindex))
			return SK_PASS_VERDICT;
	}
	/* Volatile reads: the verifier only accepts ctx loads at constant offsets from ctx
	 * itself, and clang would otherwise compute &ctx->local_ip6 once and index from it. */
	if (v6) {
		daddr[0] = *(volatile __u32 *)&ctx->local_ip6[0];
		daddr[1] = *(volatile __u32 *)&ctx->local_ip6[1];
		daddr[2] = *(volatile __u32 *)&ctx->local_ip6[2];
		daddr[3] = *(volatile __u32 *)&ctx->local_ip6[3];
	} else {
		daddr[0] = ctx->local_ip4;
	}
	if (!captures(config, ctx->protocol, ctx->local_port, v6, daddr))
		return SK_PASS_VERDICT;
	slot = (ctx->protocol == IPPROTO_UDP ? SG_SLOT_UDP4 : SG_SLOT_TCP4) + (v6 ? 1 : 0);
	sk = bpf_map_lookup_elem(&sg_sockets, &slot);
	if (!sk) {
		/* No listener (the gateway is starting or stopping): the regular lookup runs. */
		count(SG_STAT_NO_LISTENER);
		return SK_PASS_VERDICT;
	}
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	count(err ? SG_STAT_ASSIGN_FAILED : SG_STAT_ASSIGNED);
	return SK_PASS_VERDICT;
}

/* True when a local socket owns the reply 4-tuple and is bound to the packet's (foreign)
 * destination: the gateway's transparent upstream socket speaking as the client. Listeners
 * and wildcard-bound sockets are not: their traffic is not ours to divert. */
static __always_inline int to_transparent_socket(struct __sk_buff *skb, __u32 protocol,
						 struct bpf_sock_tuple *tuple, __u32 size,
						 int v6)
{
	struct bpf_sock *sk;
	int ours;

	if (protocol == IPPROTO_TCP)
		sk = bpf_sk_lookup_tcp(skb, tuple, size, BPF_F_CURRENT_NETNS, 0);
	else
		sk = bpf_sk_lookup_udp(skb, tuple, size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	/* Volatile reads: the verifier refuses arithmetic on a sock pointer, which clang
	 * would otherwise use to walk src_ip6. */
	if (v6)
		ours = *(volatile __u32 *)&sk->src_ip6[0] == tuple->ipv6.daddr[0] &&
		       *(volatile __u32 *)&sk->src_ip6[1] == tuple->ipv6.daddr[1] &&
		       *(volatile __u32 *)&sk->src_ip6[2] == tuple->ipv6.daddr[2] &&
		       *(volatile __u32 *)&sk->src_ip6[3] == tuple->ipv6.daddr[3];
	else
		ours = sk->src_ip4 == tuple->ipv4.daddr;
	if (protocol == IPPROTO_TCP && sk->state == TCP_LISTEN_STATE)
		ours = 0;
	bpf_sk_release(sk);
	return ours;
}

SEC("tc")
int sg_tc_mark(struct __sk_buff *skb)
{
	__u32 zero = 0, ifindex = skb->ifindex, l2_len = 14, l4_offset, protocol;
	struct sg_config *config = bpf_map_lookup_elem(&sg_config, &zero);
	struct bpf_sock_tuple tuple = {};
	struct sg_iface *iface;
	__u32 size = 0, daddr[4] = {};
	__be16 ports[2];
	int v6;

	if (!config)
		return TCX_NEXT;
	iface = bpf_map_lookup_elem(&sg_ifaces, &ifindex);
	if (iface)
		l2_len = iface->l2_len;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, l2_len, &ip, sizeof(ip)))
			return TCX_NEXT;
		/* Later fragments carry no ports; they are reassembled only if delivered locally,
		 * so fragmented captured datagrams are not supported (docs/ebpf.md). */
		if (ip.frag_off & bpf_htons(IP_OFFSET_MASK))
			return TCX_NEXT;
		v6 = 0;
		protocol = ip.protocol;
		l4_offset = l2_len + ip.ihl * 4;
		daddr[0] = ip.daddr;
		tuple.ipv4.saddr = ip.saddr;
		tuple.ipv4.daddr = ip.daddr;
		size = sizeof(tuple.ipv4);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, l2_len, &ip6, sizeof(ip6)))
			return TCX_NEXT;
		/* Extension headers before TCP/UDP are not followed (docs/ebpf.md). */
		v6 = 1;
		protocol = ip6.nexthdr;
		l4_offset = l2_len + sizeof(ip6);
		__builtin_memcpy(daddr, &ip6.daddr, 16);
		__builtin_memcpy(tuple.ipv6.saddr, &ip6.saddr, 16);
		__builtin_memcpy(tuple.ipv6.daddr, &ip6.daddr, 16);
		size = sizeof(tuple.ipv6);
	} else {
		return TCX_NEXT;
	}
	if (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP)
		return TCX_NEXT;
	if (bpf_skb_load_bytes(skb, l4_offset, ports, sizeof(ports)))
		return TCX_NEXT;
	if (captures(config, protocol, bpf_ntohs(ports[1]), v6, daddr)) {
		skb->mark = config->mark;
		count(SG_STAT_MARKED);
		return TCX_NEXT;
	}
	if (config->flags & SG_F_PRESERVE_SOURCE) {
		if (v6) {
			tuple.ipv6.sport = ports[0];
			tuple.ipv6.dport = ports[1];
		} else {
			tuple.ipv4.sport = ports[0];
			tuple.ipv4.dport = ports[1];
		}
		if (to_transparent_socket(skb, protocol, &tuple, size, v6)) {
			skb->mark = config->mark;
			count(SG_STAT_REPLY_MARKED);
		}
	}
	return TCX_NEXT;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
