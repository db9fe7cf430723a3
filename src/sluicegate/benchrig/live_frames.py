"""The kernel as the flood's packet source: BPF_PROG_TEST_RUN in XDP live-frames mode.

    python -m sluicegate.benchrig.live_frames IFNAME DST_MAC SRC DST PORT COUNT SECONDS SIZE
                                              [SOURCES]

Run inside the source namespace, pinned to the load CPU. A four-instruction XDP program
(`return bpf_redirect(IFNAME's index, 0)`) is run by the kernel on a prebuilt Ethernet +
IPv4 + UDP frame `repeat` times per call with BPF_F_TEST_XDP_LIVE_FRAMES (Linux 5.18+): each
run's XDP_REDIRECT really transmits the frame out of IFNAME. On a veth that is
`ndo_xdp_xmit`: the frame lands in the peer's receive ring as an xdp_frame, with no socket,
no qdisc and no skb on the sending side. It is what pktgen was for, and it is in every
kernel with BPF (pktgen is a module this kernel lacks); the receiving side is unchanged:
the peer's XDP program sees the frame first, and without XDP (or with XDP_PASS) the veth
builds the skb the stack gets, as for any received packet.

The peer must have NAPI on (an XDP program, or GRO: the flood rig turns GRO on); without
it the veth refuses frames sent this way. Frames the peer's ring had no room for are
dropped by the sending veth and counted in its tx_dropped.

Stops at COUNT frames or SECONDS, whichever comes first (checked between calls, each
sized from the rate so far to last about CALL_SECONDS, the last one to what is left);
prints the flood_gen JSON line: {"mode", "sent", "seconds", "pps", "errors", "sources"}.
"sent" counts frames the program redirected, so, unlike the socket generators, it
includes the frames the veth then dropped.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import sys
import time

from sluicegate.bpf import libbpf

BPF_PROG_TYPE_XDP = 6
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
BPF_FUNC_REDIRECT = 23
# Each BPF_PROG_TEST_RUN call sets up and tears down a page pool and its memory model,
# which waits (an RCU grace period): with calls of 65,536 frames (~30 ms) the generator
# slept 40 % of the time. So the first call is that small, to learn the rate, and later
# ones last about CALL_SECONDS each.
FIRST_CALL = 1 << 16
CALL_SECONDS = 0.5
MAX_CALL = 1 << 30
# Frames per batch inside one call: the kernel's default (64) flushes the redirect every
# 64 frames; the veth's ring is 256, so larger batches only overflow it sooner.
BATCH = 64
UDP_SOURCE_PORT = 40000


def redirect_program(ifindex: int) -> bytes:
    """`r1 = ifindex; r2 = 0; r0 = bpf_redirect(r1, r2); exit` as struct bpf_insn bytes."""
    def insn(code: int, dst: int, imm: int) -> bytes:
        return struct.pack("<BBhi", code, dst & 0xF, 0, imm)
    mov64_imm, call, exit_ = 0xB7, 0x85, 0x95  # BPF_ALU64|BPF_MOV|BPF_K, BPF_JMP|BPF_CALL…
    return (insn(mov64_imm, 1, ifindex) + insn(mov64_imm, 2, 0)
            + insn(call, 0, BPF_FUNC_REDIRECT) + insn(exit_, 0, 0))


def ipv4_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(dst_mac: bytes, src_mac: bytes, source: str, destination: str, port: int,
              payload: int) -> bytes:
    """Ethernet + IPv4 + UDP with `payload` zero bytes (UDP checksum 0: allowed for IPv4)."""
    udp_length = 8 + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_length, 0, 0x4000, 64,
                         socket.IPPROTO_UDP, 0, socket.inet_aton(source),
                         socket.inet_aton(destination))
    header = header[:10] + struct.pack("!H", ipv4_checksum(header)) + header[12:]
    udp = struct.pack("!HHHH", UDP_SOURCE_PORT, port, udp_length, 0)
    return dst_mac + src_mac + b"\x08\x00" + header + udp + bytes(payload)


def mac_bytes(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"MAC like 02:00:00:00:00:01 expected, not {text!r}")
    return bytes(int(part, 16) for part in parts)


def flood(ifname: str, dst_mac: str, source: str, destination: str, port: int, count: int,
          seconds: float, payload: int, sources: int = 1) -> dict[str, object]:
    ifindex = socket.if_nametoindex(ifname)
    with open(f"/sys/class/net/{ifname}/address") as address:
        src_mac = mac_bytes(address.read().strip())
    first = ipaddress.IPv4Address(source)
    frames = [udp_frame(mac_bytes(dst_mac), src_mac, str(first + i), destination, port,
                        payload) for i in range(sources)]
    fd = libbpf.load_instructions(BPF_PROG_TYPE_XDP, "sg_flood_src", redirect_program(ifindex))
    sent = errors = 0
    started = time.perf_counter()
    deadline = started + seconds
    try:
        call = 0
        repeat = FIRST_CALL
        while sent < count and (now := time.perf_counter()) < deadline:
            if sent:
                rate = sent / (now - started)
                repeat = int(rate * min(CALL_SECONDS, deadline - now))
            repeat = max(1, min(repeat, MAX_CALL, count - sent))
            try:
                # In live mode the kernel reports no verdict (retval stays 0).
                libbpf.test_run(fd, frames[call % sources], repeat,
                                BPF_F_TEST_XDP_LIVE_FRAMES, BATCH)
            except libbpf.BpfError:
                errors += 1
                if errors > 3:
                    raise
                continue
            sent += repeat
            call += 1
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - started
    return {"mode": "xdp-live", "sent": sent, "seconds": round(elapsed, 6),
            "pps": round(sent / elapsed, 1) if elapsed > 0 else 0.0, "errors": errors,
            "sources": sources}


def main(argv: list[str]) -> int:
    if len(argv) not in (8, 9):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    ifname, dst_mac, source, destination = argv[:4]
    port, count, seconds, payload = int(argv[4]), int(argv[5]), float(argv[6]), int(argv[7])
    sources = int(argv[8]) if len(argv) == 9 else 1
    print(json.dumps(flood(ifname, dst_mac, source, destination, port, count, seconds,
                           payload, sources)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
