/* Layouts shared by flow_stats.bpf.c and its Python side (sluicegate/bpf/flow_stats.py,
 * which packs the same structs with `struct`). Change both together. Values are host byte
 * order unless a field says otherwise. */
#ifndef SLUICEGATE_FLOW_STATS_H
#define SLUICEGATE_FLOW_STATS_H

#define SG_FLOW_MAX_IFACES 64
/* Distinct (interface, direction, protocol, port) keys counted one by one; later ones are
 * added to port 0 ("other") of their interface, direction and protocol. */
#define SG_FLOW_MAX_PORTS 1024
/* Remote prefixes remembered (LRU: the least recently seen is forgotten when full). */
#define SG_FLOW_MAX_REMOTES 4096
/* Ports with retransmits counted one by one; later ones go to port 0. */
#define SG_FLOW_MAX_RETRANS_PORTS 512

#define SG_FLOW_INGRESS 0
#define SG_FLOW_EGRESS 1

struct sg_flow_config {
	__u64 netns_cookie; /* only this network namespace's sockets count retransmits */
	__u8 mask4[4];      /* remote prefix masks (network order): /24 → ff ff ff 00 */
	__u8 mask6[16];
	__u32 pad;
};

/* Value of sg_flow_ifaces (key: ifindex). */
struct sg_flow_iface {
	__u32 slot;   /* counters: sg_flow_totals[slot * 2 + direction] */
	__u32 l2_len; /* where the IP header starts: 14 on Ethernet, 0 on L3 devices */
};

/* Value of sg_flow_totals and sg_flow_ports. */
struct sg_flow_count {
	__u64 packets;
	__u64 bytes;
	__u64 syns; /* TCP SYNs opening a connection (without ACK) */
};

/* Key of sg_flow_ports. The port is the lower of source and destination port: the
 * service's port for the usual ephemeral-port client (docs/ebpf.md). */
struct sg_flow_port {
	__u32 ifindex;
	__u16 port;
	__u8 protocol;  /* 6 tcp, 17 udp */
	__u8 direction; /* SG_FLOW_INGRESS or SG_FLOW_EGRESS */
};

/* Key of sg_flow_remotes: the far side's address (source on ingress, destination on
 * egress) masked to the configured prefix; IPv4 as ::ffff:a.b.c.d. */
struct sg_flow_remote {
	__u8 addr[16];
};

struct sg_flow_remote_count {
	__u64 packets[2]; /* by direction */
	__u64 bytes[2];
};

/* Key of sg_flow_retrans: the lower of the socket's local and remote port. */
struct sg_flow_retrans_key {
	__u32 port;
};

#endif
