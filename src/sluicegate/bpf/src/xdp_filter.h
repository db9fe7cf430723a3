/* Layouts shared by xdp_filter.bpf.c and its Python side (sluicegate/bpf/xdp.py, which packs
 * the same structs with `struct`). Change both together. Values are host byte order unless
 * a field says otherwise. */
#ifndef SLUICEGATE_XDP_FILTER_H
#define SLUICEGATE_XDP_FILTER_H

/* Interfaces one filter runs on; each gets a slot for its counters. */
#define SG_XDP_MAX_IFACES 64
/* Deny prefixes (v4 and v6 together). Each has its own drop counter, and per-CPU counters
 * cost 8 bytes per rule per possible CPU (64 KiB per CPU at this size). Also the size of
 * the exempt tries. */
#define SG_XDP_MAX_RULES 8192
/* Sources with rate-limit state; the least recently seen is forgotten when full. */
#define SG_XDP_MAX_SOURCES 65536

/* Why a packet was passed or dropped: sg_xdp_stats holds SG_XDP_REASONS slots per
 * interface slot (index: slot * SG_XDP_REASONS + reason). */
#define SG_XDP_PASSED 0
#define SG_XDP_DENIED 1       /* source in a deny prefix */
#define SG_XDP_RATE_LIMITED 2 /* over the per-source packet rate */
#define SG_XDP_SYN_LIMITED 3  /* a TCP SYN over the per-source new-connection rate */
#define SG_XDP_REASONS 4

/* The rate limits as GCRA, the token bucket kept as one timestamp per source: a limit of
 * `rate` packets/s with `burst` is interval = 1e9 / rate ns and tolerance = burst *
 * interval. interval 0: that limit is off. */
struct sg_xdp_config {
	__u64 rate_interval_ns;
	__u64 rate_tolerance_ns;
	__u64 syn_interval_ns;
	__u64 syn_tolerance_ns;
};

/* Value of sg_xdp_stats. */
struct sg_xdp_count {
	__u64 packets;
	__u64 bytes;
};

/* LPM trie keys: prefix length, then the address in network byte order. The value is the
 * rule's index (its counter in sg_xdp_rules). */
struct sg_xdp_lpm4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct sg_xdp_lpm6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/* Key of sg_xdp_sources: the source address, IPv4 as ::ffff:a.b.c.d (network order). */
struct sg_xdp_source {
	__u8 addr[16];
};

/* Value of sg_xdp_sources: the GCRA timestamps (bpf_ktime_get_ns) after which the source's
 * packet and SYN buckets are full again, and how many of its packets were dropped. */
struct sg_xdp_bucket {
	__u64 rate_tat;
	__u64 syn_tat;
	__u64 dropped;
};

#endif
