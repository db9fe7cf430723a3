"""The flood's packet sources, each bounded by a packet count and a time, run in the rig's
source namespace pinned to the load CPU, each printing one JSON report:

  xdp-live  the kernel (live_frames.py: BPF_PROG_TEST_RUN with XDP live frames), the
            default where it runs (Linux 5.18+, and a gateway veth with NAPI)
  packet    flood_gen.c (compiled with gcc at bench time): AF_PACKET frames, spoofable
  udp       flood_gen.c: sendmmsg on a UDP socket through the sender's stack
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from sluicegate.benchrig.flood_rig import (
    GATEWAY_IP,
    LOAD_CPU,
    PORT,
    SOURCE_IP,
    SRC_IF,
    Rig,
    log,
    nft_drop,
    nft_remove,
    run,
)

# 18 bytes of payload: a 60-byte Ethernet frame, the smallest there is (the packet-rate case).
PAYLOAD = 18
# 200 M packets a window: above what one core offers here (live frames: ~10 M/s for 10 s,
# the default duration of `sluicegate bench interception`), still bounded.
MAX_PACKETS = 200_000_000
MAX_SOURCES = 100
GENERATOR_SOURCE = Path(__file__).with_name("flood_gen.c")


LIVE_FRAMES = "xdp-live"


def build_generator(out: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc not found (apt-get install -y gcc): the flood generator is "
                           "compiled at bench time")
    binary = out / "flood_gen"
    run([gcc, "-O2", "-Wall", "-o", str(binary), str(GENERATOR_SOURCE)], timeout=60)
    return binary


class Generator:
    def __init__(self, binary: Path, rig: Rig, mode: str, sources: int) -> None:
        self.binary = binary
        self.rig = rig
        self.mode = mode
        self.sources = sources
        self.mac = rig.gateway_mac()

    def argv(self, count: int, seconds: float) -> list[str]:
        if self.mode == LIVE_FRAMES:
            return [sys.executable, "-m", "sluicegate.benchrig.live_frames", SRC_IF, self.mac,
                    SOURCE_IP, GATEWAY_IP, str(PORT), str(count), f"{seconds:g}",
                    str(PAYLOAD), str(self.sources)]
        argv = [str(self.binary), self.mode, GATEWAY_IP, str(PORT), str(count), f"{seconds:g}",
                str(PAYLOAD), SOURCE_IP]
        if self.mode == "packet":
            argv += [SRC_IF, self.mac, str(self.sources)]
        return argv

    def flood(self, count: int, seconds: float) -> dict[str, Any]:
        """One bounded flood from the source ns on LOAD_CPU; the generator's own report."""
        result = run(["taskset", "-c", LOAD_CPU, "ip", "netns", "exec", self.rig.source,
                      *self.argv(count, seconds)], timeout=seconds + 30)
        return json.loads(result.stdout)


def live_frames_work(rig: Rig, sources: int) -> bool:
    """Whether the kernel can be the packet source here (a short live-frames flood)."""
    try:
        sent = Generator(Path(), rig, LIVE_FRAMES, sources).flood(1 << 16, 0.2)["sent"]
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError) as error:
        log(f"generator probe: {LIVE_FRAMES} does not run here ({str(error).strip()[:200]})")
        return False
    return sent > 0


def choose_generator(out: Path, rig: Rig, wanted: str, sources: int,
                     rx: str) -> tuple[str, dict, Path]:
    """`auto`: the kernel's live frames when they run (rx gateway only: the gateway veth
    needs NAPI for them); otherwise 1 s of each socket mode into an nftables drop (so the
    receiving side costs little), twice, interleaved (a busy second on a shared machine
    must not decide it), and the faster wins. Returns (mode, {mode: best pps}, binary)."""
    if wanted == LIVE_FRAMES or (wanted == "auto" and rx == "gateway"
                                 and live_frames_work(rig, sources)):
        return LIVE_FRAMES, {}, Path()
    binary = build_generator(out)
    if wanted != "auto":
        return wanted, {}, binary
    nft_drop(rig)
    probes: dict[str, float] = {}
    # A UDP socket cannot spoof: with several sources only the packet mode can run.
    modes = ("packet", "udp") if sources == 1 else ("packet",)
    try:
        for mode in modes * 2:
            pps = Generator(binary, rig, mode, sources).flood(MAX_PACKETS, 1.0)["pps"]
            probes[mode] = max(probes.get(mode, 0.0), pps)
    finally:
        nft_remove(rig)
    best = max(probes, key=lambda mode: probes[mode])
    log("generator probe: " + ", ".join(f"{m} {p / 1e6:.2f} Mpps" for m, p in probes.items())
        + f" -> {best}")
    return best, probes, binary
