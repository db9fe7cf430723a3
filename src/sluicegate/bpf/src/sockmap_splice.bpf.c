// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/* Sockmap splicing for the L4 relay (docs/ebpf.md, "Sockmap splicing").
 *
 * The relay puts both sockets of a client/upstream pair in the SOCKHASH `sg_sm_socks`
 * (key: socket cookie) with a `sg_sm_ctl` entry naming the peer. For every skb a socket
 * receives, `sg_sm_verdict` either redirects it to the peer's send side in the kernel
 * (bpf_sk_redirect_hash: the bytes never reach user space) or passes it to user space,
 * which then copies it itself.
 *
 * It passes while user space has not caught up yet: `ctl.resume_at != count.passed`. A pair
 * starts passing (resume_at = SG_SM_NO_RESUME); user space forwards what arrived before the
 * sockets were in the map, drains the socket, reads `passed` and, if it has read every byte
 * that counts, sets resume_at to it. Any byte passed after that read makes the two differ,
 * so the program keeps passing until user space has forwarded it too: no byte overtakes
 * another.
 *
 * Only a stream_verdict program, no stream_parser. Measured on kernel 6.18: with a parser
 * (strparser), bytes passed to user space advance the socket's copied_seq twice (when
 * strparser reads them and when user space does), after which TCP no longer wakes the
 * parser for new bytes and the pair stalls. Without one, each skb goes from the receive
 * queue to the verdict (tcp_read_skb).
 *
 * Backpressure: a redirected skb waits on the peer's psock queue until a work queue sends
 * it, and the kernel bounds that queue nowhere. With a receiver that stopped reading the
 * sender stopped after ~19 MiB anyway, but a receiver that reads, only slower, let iperf3
 * over veths queue 1.5 GB in 4 s. So past SG_SM_BACKLOG_MAX bytes waiting for the peer the
 * program passes instead (sg_sm_backlog_full): passing is sticky (resume_at no longer
 * matches), user space forwards those bytes once the queue drained into the peer and then
 * resumes, and bytes passed but unread close this socket's receive window meanwhile.
 *
 * Bytes TCP hands the program twice (a retransmission overlapping what it had) are cut off
 * by their sequence number before the verdict; see the comment in sg_sm_verdict.
 *
 * Counters per socket (`sg_sm_count`) give the relay its byte counts and tell it when
 * everything redirected has reached the peer (end of stream).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#include "sockmap_splice.h"

#define SK_DROP_VERDICT 0
#define SK_PASS_VERDICT 1
/* bpf_skb_adjust_room on an sk_skb removes at most this many bytes per call. */
#define SG_SM_TRIM_STEP 0xfff
/* Steps enough for 192 KiB of old bytes (seen: 64 KiB); more: SG_SM_BROKEN. */
#define SG_SM_TRIM_STEPS 48

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, SG_SM_MAX_SOCKETS);
	__type(key, __u64);
	__type(value, __u64);
} sg_sm_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SG_SM_MAX_SOCKETS);
	__type(key, __u64);
	__type(value, struct sg_sm_ctl);
} sg_sm_ctl SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SG_SM_MAX_SOCKETS);
	__type(key, __u64);
	__type(value, struct sg_sm_count);
} sg_sm_count SEC(".maps");

/* More than SG_SM_BACKLOG_MAX redirected bytes wait for the peer: the kernel sends them from
 * the peer's psock queue in a work queue, which it does not bound, and tcp_read_skb gave the
 * receive buffer back already, so nothing would slow the sender (measured: 1.5 GB queued in
 * 4 s of iperf3). Passing the skb instead makes the direction pass until user space caught
 * up (count.passed moved past resume_at), and bytes passed but not yet read are charged to
 * this socket's receive buffer: its window closes and the sender waits. Bytes in the peer
 * are counted as TCP_INFO's bytes_acked + what waits in its send queue, as user space does. */
static __always_inline bool sg_sm_backlog_full(struct sg_sm_ctl *ctl, struct sg_sm_count *count,
					       __u64 *peer)
{
	struct bpf_sock *sk = bpf_map_lookup_elem(&sg_sm_socks, peer);
	struct tcp_sock *tp;
	bool full = false;

	if (!sk)
		return false;
	tp = bpf_skc_to_tcp_sock(sk);
	if (tp) {
		__u64 written = tp->bytes_acked + (__u32)(tp->write_seq - tp->snd_una);
		__u64 reached = written - ctl->written_base;
		__u64 bound = ctl->backlog_max ? ctl->backlog_max : SG_SM_BACKLOG_MAX;

		full = count->redirected > reached && count->redirected - reached > bound;
	}
	bpf_sk_release(sk);
	return full;
}

SEC("sk_skb/stream_verdict")
int sg_sm_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct sg_sm_ctl *ctl = bpf_map_lookup_elem(&sg_sm_ctl, &cookie);
	struct sg_sm_count *count = bpf_map_lookup_elem(&sg_sm_count, &cookie);
	__u64 peer;

	if (!ctl || !count)
		return SK_PASS_VERDICT; /* not ours (or being torn down): user space reads it */
	/* A bare FIN comes as an empty skb: redirected, it would be "sent" on the peer after
	 * user space shut the peer's write side, and fail there with EPIPE. The FIN is already
	 * in this socket's state, where the relay reads it. */
	if (!skb->len)
		return SK_DROP_VERDICT;
	/* Bytes already seen: on kernel 6.18, tcp_read_skb hands the program whole skbs from
	 * the receive queue, also one that begins with bytes it handed over before. TCP queues
	 * a segment whose start it already has (a retransmission overlapping new data) whole,
	 * leaving recvmsg to skip the old part by copied_seq; read_skb does not. Measured here
	 * under CPU load on loopback: a 131814-byte skb whose first 65483 bytes had come in the
	 * skb before, so one 64 KiB block reached the peer twice. Cut the old bytes off by their
	 * TCP sequence number (the kernel then also advances copied_seq by what remains). */
	struct sk_buff *kskb = bpf_cast_to_kern_ctx(skb);
	__u32 seq = 0, end;
	__s32 stale = 0;
	int i;

	if (bpf_probe_read_kernel(&seq, sizeof(seq), kskb->cb)) /* TCP_SKB_CB(skb)->seq */
		return SK_DROP_VERDICT; /* can't happen; never forward bytes unchecked */
	end = seq + skb->len;
	if (count->flags & SG_SM_SEQ_KNOWN)
		stale = (__s32)(count->next_seq - seq);
	if (stale >= (__s32)skb->len)
		return SK_DROP_VERDICT; /* nothing new in it (TCP does not queue those: defensive) */
	for (i = 0; i < SG_SM_TRIM_STEPS && stale > 0; i++) {
		__s32 step = stale > SG_SM_TRIM_STEP ? SG_SM_TRIM_STEP : stale;

		if (bpf_skb_adjust_room(skb, -step, 0, 0))
			break;
		__sync_fetch_and_add(&count->trimmed, step);
		stale -= step;
	}
	if (stale > 0) {
		count->flags |= SG_SM_BROKEN;
		return SK_DROP_VERDICT;
	}
	count->next_seq = end;
	count->flags |= SG_SM_SEQ_KNOWN;

	peer = ctl->peer;
	if (ctl->resume_at != count->passed || sg_sm_backlog_full(ctl, count, &peer)) {
		__sync_fetch_and_add(&count->passed, skb->len);
		return SK_PASS_VERDICT;
	}
	__sync_fetch_and_add(&count->redirected, skb->len);
	return bpf_sk_redirect_hash(skb, &sg_sm_socks, &peer, 0);
}

char LICENSE[] SEC("license") = "GPL";
