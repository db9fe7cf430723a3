/* Layouts shared by sockmap_splice.bpf.c and its Python side (sluicegate/bpf/sockmap.py,
 * which packs the same structs with `struct`). Change both together. Host byte order. */
#ifndef SLUICEGATE_SOCKMAP_SPLICE_H
#define SLUICEGATE_SOCKMAP_SPLICE_H

/* Sockets spliced at once (two per relayed connection). */
#define SG_SM_MAX_SOCKETS 65536
/* sg_sm_ctl.resume_at while user space is still copying a direction itself. */
#define SG_SM_NO_RESUME 0xffffffffffffffffULL

/* Redirected bytes allowed to wait for the peer socket (on its psock queue, not yet in its
 * send buffer) before the program passes to user space instead: the bound that gives the
 * kernel path backpressure (sockmap_splice.bpf.c, sg_sm_backlog_full), when
 * sg_sm_ctl.backlog_max does not set another (gateway.stream_proxy.sockmap_backlog). */
#define SG_SM_BACKLOG_MAX (16ULL << 20)

/* Per socket (key: its socket cookie), written only by user space. */
struct sg_sm_ctl {
	__u64 peer;      /* socket cookie of the other socket of the pair: where bytes go */
	__u64 resume_at; /* redirect in the kernel only while sg_sm_count.passed == this */
	/* The peer's bytes written (tcpi_bytes_acked + unacked/unsent) that did not come from
	 * this socket's redirects, as of the last resume: written - written_base is what the
	 * redirects put into the peer so far. */
	__u64 written_base;
	__u64 backlog_max; /* the bound for this direction; 0: SG_SM_BACKLOG_MAX */
};

/* Per socket (key: its socket cookie), written only by the program (atomic adds). */
struct sg_sm_count {
	__u64 redirected; /* bytes moved to the peer in the kernel */
	__u64 passed;     /* bytes left to user space (until it caught up) */
	__u64 trimmed;    /* bytes TCP handed to the program a second time, cut off (.bpf.c) */
	__u32 next_seq;   /* TCP sequence number after the last byte seen (SG_SM_SEQ_KNOWN) */
	__u32 flags;      /* SG_SM_SEQ_KNOWN, SG_SM_BROKEN */
};

/* sg_sm_count.flags */
#define SG_SM_SEQ_KNOWN 1U
/* Bytes seen before could not be cut off (no memory): the skb was dropped and the stream
 * has a gap, so user space resets the pair. */
#define SG_SM_BROKEN 2U

#endif
