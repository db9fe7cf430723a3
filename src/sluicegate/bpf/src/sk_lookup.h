/* Layouts shared by sk_lookup.bpf.c and its Python side (sluicegate/intercept/ebpf.py, which
 * packs the same structs with `struct`). Change both together. All values are host byte
 * order unless a field says otherwise. */
#ifndef SLUICEGATE_SK_LOOKUP_H
#define SLUICEGATE_SK_LOOKUP_H

/* Slots of the SOCKMAP `sg_sockets`: the gateway's transparent listener per protocol and
 * family (bpf_sk_assign needs a socket of the packet's family and protocol). */
#define SG_SLOT_TCP4 0
#define SG_SLOT_TCP6 1
#define SG_SLOT_UDP4 2
#define SG_SLOT_UDP6 3
#define SG_SLOTS 4

/* sg_config.flags */
#define SG_F_TCP (1u << 0)
#define SG_F_UDP (1u << 1)
#define SG_F_V4 (1u << 2)
#define SG_F_V6 (1u << 3)
#define SG_F_IFACES (1u << 4)          /* capture only on interfaces in sg_ifaces */
#define SG_F_PRESERVE_SOURCE (1u << 5) /* mark replies to local transparent sockets */

/* Captured destination ports as a bitmap: 65536 bits (8 KiB), one lookup per packet
 * whatever the number of ranges. */
#define SG_PORT_WORDS 1024

/* sg_stats slots (per-CPU counters, summed by Python) */
#define SG_STAT_MARKED 0        /* tc: captured packets marked for local delivery */
#define SG_STAT_REPLY_MARKED 1  /* tc: replies to a transparent upstream socket marked */
#define SG_STAT_ASSIGNED 2      /* sk_lookup: lookups steered to a listener */
#define SG_STAT_NO_LISTENER 3   /* sk_lookup: matched, but the SOCKMAP slot was empty */
#define SG_STAT_ASSIGN_FAILED 4 /* sk_lookup: bpf_sk_assign refused the socket */
#define SG_STATS 5

struct sg_config {
	__u32 flags; /* SG_F_* */
	__u32 mark;  /* the fwmark that routes captured packets to the local table */
};

struct sg_ports {
	__u64 bits[SG_PORT_WORDS]; /* bit p: destination port p is captured */
};

/* LPM trie keys: prefix length, then the address in network byte order. */
struct sg_lpm_v4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct sg_lpm_v6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/* Value of sg_ifaces (key: ifindex): where the IP header starts in a frame seen by tc. */
struct sg_iface {
	__u32 l2_len; /* 14 on Ethernet-like devices, 0 on L3 devices (tun, wireguard) */
};

#endif
