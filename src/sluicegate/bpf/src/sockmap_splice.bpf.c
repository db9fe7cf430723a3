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
 * sockets were in the map, then sets resume_at to the `passed` count it read before it
 * drained the socket. Any byte passed after that read makes the two differ, so the program
 * keeps passing until user space has forwarded it too: no byte overtakes another.
 *
 * Only a stream_verdict program, no stream_parser. Measured on kernel 6.18: with a parser
 * (strparser), bytes passed to user space advance the socket's copied_seq twice (when
 * strparser reads them and when user space does), after which TCP no longer wakes the
 * parser for new bytes and the pair stalls. Without one, each skb goes from the receive
 * queue to the verdict (tcp_read_skb). Backpressure needs nothing here: with a receiver that
 * does not read, the sender stopped after ~19 MiB were queued (splice path: ~12 MiB).
 * Passing bytes to user space whenever the peer's send queue was full was tried and
 * dropped: it duplicated an skb now and then (verdict only) or stalled (strparser).
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
	if (ctl->resume_at != count->passed) {
		__sync_fetch_and_add(&count->passed, skb->len);
		return SK_PASS_VERDICT;
	}
	__sync_fetch_and_add(&count->redirected, skb->len);
	return bpf_sk_redirect_hash(skb, &sg_sm_socks, &peer, 0);
}

char LICENSE[] SEC("license") = "GPL";
