#!/usr/bin/env python3
"""Helpers of bench/ai.sh: a raw-socket OpenAI client and the result table.

    ai_load.py check URL KEY MODEL [--stream]
        One chat completion through URL (…/chat/completions); exit 1 unless the answer is
        an OpenAI chat completion whose text contains "echo:" and that carries `usage`
        (with --stream: an SSE stream of chunks, a usage chunk and `data: [DONE]`).
    ai_load.py ttft URL KEY MODEL N OUT.json [--warmup W]
        N streamed chat completions, one at a time on one keep-alive connection (a new one
        when the server closes it); per request the time from the request's last byte sent
        to the first content token ("echo:") and to the end of the stream. Samples to OUT.
    ai_load.py table OUT
        The Markdown table of a bench/ai.sh run directory (medians over runs, ratios,
        targets).

The client is plain blocking sockets, so its own cost per request is a few µs and the same
for every target: it cancels out of the "added" figures.
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from summarize import parse_wrk  # bench/summarize.py

TOKEN = b"echo:"  # the first content token of the fake providers' answers
LABELS = {"direct": "direct (fake provider)", "sluicegate": "sluicegate ai-proxy",
          "litellm": "LiteLLM proxy"}
RPS_TARGET = 10.0     # sluicegate req/s ≥ 10x LiteLLM's
ADDED_P50_TARGET = 1.0  # ms: sluicegate's added p50 latency


class HttpError(Exception):
    pass


# ------------------------------------------------------------------ raw HTTP/1.1 client
class Client:
    """One keep-alive connection to the host of `url`; POSTs JSON, reads the answer with
    chunked or Content-Length framing, and notes when TOKEN first arrives."""

    def __init__(self, url: str, key: str) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.path = parts.path or "/"
        self.host = parts.netloc
        self.key = key
        self.sock: socket.socket | None = None
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buf = b""

    def _recv(self) -> bytes:
        assert self.sock is not None
        data = self.sock.recv(65536)
        if not data:
            raise HttpError("connection closed by the server mid-answer")
        return data

    def post(self, body: dict) -> tuple[int, bytes, float | None, float]:
        """(status, body, seconds to TOKEN or None, seconds to the end of the answer)."""
        payload = json.dumps(body, separators=(",", ":")).encode()
        head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Authorization: Bearer {self.key}\r\nContent-Type: application/json\r\n"
                f"Accept: */*\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=30)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(head + payload)
        started = time.perf_counter()
        first: float | None = None
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        raw_head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        seen = rest  # the body bytes as they arrived (framing included), to spot TOKEN
        if TOKEN in seen:
            first = time.perf_counter() - started
        body_out = b""
        if headers.get("transfer-encoding") == "chunked":
            pos = 0
            while True:
                end = rest.find(b"\r\n", pos)
                while end < 0:
                    data = self._recv()
                    rest += data
                    if first is None and TOKEN in rest:
                        first = time.perf_counter() - started
                    end = rest.find(b"\r\n", pos)
                size = int(rest[pos:end].split(b";")[0], 16)
                pos = end + 2
                if size == 0:
                    while rest.find(b"\r\n\r\n", pos - 2) < 0:   # trailers, then CRLF
                        rest += self._recv()
                    pos = rest.find(b"\r\n\r\n", pos - 2) + 4
                    break
                while len(rest) < pos + size + 2:
                    rest += self._recv()
                    if first is None and TOKEN in rest:
                        first = time.perf_counter() - started
                body_out += rest[pos:pos + size]
                pos += size + 2
            self.buf = rest[pos:]
        elif "content-length" in headers:
            length = int(headers["content-length"])
            while len(rest) < length:
                rest += self._recv()
                if first is None and TOKEN in rest:
                    first = time.perf_counter() - started
            body_out, self.buf = rest[:length], rest[length:]
        else:   # read to the end of the connection
            with_close = rest
            while True:
                assert self.sock is not None
                data = self.sock.recv(65536)
                if not data:
                    break
                with_close += data
                if first is None and TOKEN in with_close:
                    first = time.perf_counter() - started
            body_out = with_close
            headers["connection"] = "close"
        total = time.perf_counter() - started
        if first is None and TOKEN in body_out:
            first = total
        if headers.get("connection") == "close":
            self.close()
        return status, body_out, first, total


def chat_body(model: str, stream: bool) -> dict:
    body: dict = {"model": model, "messages": [{"role": "user", "content": "hello benchmark"}]}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def sse_events(body: bytes) -> list[str]:
    return [line[5:].strip() for line in body.decode().splitlines() if line.startswith("data:")]


def check(url: str, key: str, model: str, stream: bool) -> int:
    client = Client(url, key)
    try:
        status, body, first, total = client.post(chat_body(model, stream))
    except (OSError, HttpError, ValueError) as exc:
        print(f"check {url}: {exc}")
        return 1
    finally:
        client.close()
    problem = ""
    if status != 200:
        problem = f"status {status}: {body[:300]!r}"
    elif not stream:
        try:
            answer = json.loads(body)
            text = answer["choices"][0]["message"]["content"]
            usage = answer["usage"]["total_tokens"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            problem = f"not an OpenAI chat completion ({exc!r}): {body[:300]!r}"
        else:
            if "echo:" not in (text or "") or not usage:
                problem = f"no answer text or usage: {body[:300]!r}"
    else:
        events = sse_events(body)
        if not events or events[-1] != "[DONE]":
            problem = f"stream does not end with data: [DONE]: {body[-300:]!r}"
        else:
            chunks = [json.loads(e) for e in events[:-1]]
            if not any(c.get("usage") for c in chunks):
                problem = "no usage chunk in the stream"
            elif first is None:
                problem = "no 'echo:' content token in the stream"
    if problem:
        print(f"check {url} ({'stream' if stream else 'json'}): {problem}")
        return 1
    print(f"check {url} ({'stream' if stream else 'json'}): ok, {total * 1000:.2f} ms")
    return 0


def ttft(url: str, key: str, model: str, count: int, out: Path, warmup: int) -> int:
    client = Client(url, key)
    body = chat_body(model, True)
    firsts: list[float] = []
    totals: list[float] = []
    errors: list[str] = []
    try:
        for i in range(warmup + count):
            try:
                status, _, first, total = client.post(body)
            except (OSError, HttpError, ValueError) as exc:
                errors.append(repr(exc))
                client.close()
                if len(errors) > 10:
                    break
                continue
            if status != 200 or first is None:
                errors.append(f"status {status}, token {'seen' if first else 'missing'}")
                continue
            if i >= warmup:
                firsts.append(first * 1000)
                totals.append(total * 1000)
    finally:
        client.close()
    result = {"url": url, "model": model, "requests": count, "warmup": warmup,
              "ttft_ms": firsts, "total_ms": totals, "errors": errors[:20],
              "error_count": len(errors)}
    out.write_text(json.dumps(result))
    if firsts:
        print(f"    TTFT p50 {percentile(firsts, 50):.3f} ms  p99 {percentile(firsts, 99):.3f} ms"
              f"  (whole stream p50 {percentile(totals, 50):.3f} ms; {len(firsts)} requests,"
              f" {len(errors)} errors)", file=sys.stderr)
    return 0 if firsts and not errors else 1


# ------------------------------------------------------------------ table
def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))   # ceil(n * pct / 100)
    return ordered[int(rank) - 1]


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def collect(out: Path, case: str) -> dict:
    """Per case: medians over runs, and the per-run values."""
    runs = sorted({p.name.split("_", 1)[0] for p in (out / "runs").glob(f"r*_{case}.txt")},
                  key=lambda r: int(r[1:]))
    rps, us, usr, sys_, busy, p50, p99, t50, t99, non2xx, errors, notes = ([] for _ in range(12))
    for run in runs:
        base = out / "runs" / f"{run}_{case}"
        w = parse_wrk(Path(f"{base}.txt"))
        cpu = _load(Path(f"{base}.cpu.json"))
        lat = parse_wrk(Path(f"{base}.lat.txt"))
        stream = _load(Path(f"{base}.ttft.json"))
        rps.append(w["rps"])
        if w.get("requests") and cpu.get("proxy_cpu_s") is not None:
            us.append(cpu["proxy_cpu_s"] * 1e6 / w["requests"])
            usr.append(cpu["proxy_user_s"] * 1e6 / w["requests"])
            sys_.append(cpu["proxy_sys_s"] * 1e6 / w["requests"])
        busy.append(f"{cpu.get('load_busy', '-'):.0f}/{cpu.get('proxy_busy', 0):.0f}"
                    if cpu.get("load_busy") is not None else "-")
        p50.append(lat["p50"])
        p99.append(lat["p99"])
        if stream.get("ttft_ms"):
            t50.append(percentile(stream["ttft_ms"], 50))
            t99.append(percentile(stream["ttft_ms"], 99))
        non2xx.append(w["non2xx"] + lat["non2xx"])
        errors.append(sum(w["sock_errors"].values()) + sum(lat["sock_errors"].values())
                      + stream.get("error_count", 0))
        notes += w["notes"] + lat["notes"]
        if cpu.get("attempts", 1) > 1:
            notes.append(f"{run}: re-measured (noise), kept attempt {cpu.get('kept')}")
    return {"runs": runs, "rps_runs": rps, "rps": _median(rps), "us": _median(us),
            "usr": _median(usr), "sys": _median(sys_), "busy": busy,
            "p50": _median(p50), "p99": _median(p99), "ttft50": _median(t50),
            "ttft99": _median(t99), "non2xx": sum(non2xx), "errors": sum(errors),
            "notes": notes}


def table(out: Path) -> str:
    meta = dict(line.split(": ", 1) for line in (out / "meta.txt").read_text().splitlines()
                if ": " in line) if (out / "meta.txt").exists() else {}
    cases = meta.get("cases", "direct sluicegate litellm").split()
    skipped = {}
    if (out / "skipped.tsv").exists():
        for line in (out / "skipped.tsv").read_text().splitlines():
            name, _, reason = line.partition("\t")
            skipped.setdefault(name, reason)
    rows = {case: collect(out, case) for case in cases}
    direct = rows.get("direct", {})

    def added(case: str, key: str) -> float | None:
        a, b = rows[case].get(key), direct.get(key)
        return a - b if a is not None and b is not None and case != "direct" else None

    lines = [f"## AI gateway vs LiteLLM ({meta.get('date', '?')}, {meta.get('settings', '')})",
             "",
             "| target | req/s (c=" + meta.get("conns", "50") + ") | runs (req/s) | proxy µs/req "
             "(usr+sys) | CPU% load/proxy | p50 ms (c=1) | p99 ms (c=1) | added p50 ms | "
             "added p99 ms | TTFT p50 ms | TTFT p99 ms | added TTFT p50 ms | "
             "added TTFT p99 ms | non-2xx / errors |",
             "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for case in cases:
        r = rows[case]
        if not r["runs"]:
            lines.append(f"| {LABELS.get(case, case)} | skipped: {skipped.get(case, 'no result')}"
                         " |" + " |" * 12)
            continue
        cpu = "-" if r["us"] is None else f"{r['us']:.0f} ({r['usr']:.0f}+{r['sys']:.0f})"
        lines.append(
            f"| {LABELS.get(case, case)} | {_f(r['rps'], 0)} | "
            f"{' / '.join(_f(v, 0) for v in r['rps_runs'])} | {cpu} | {' '.join(r['busy'])} | "
            f"{_f(r['p50'], 3)} | {_f(r['p99'], 3)} | {_f(added(case, 'p50'), 3)} | "
            f"{_f(added(case, 'p99'), 3)} | {_f(r['ttft50'], 3)} | {_f(r['ttft99'], 3)} | "
            f"{_f(added(case, 'ttft50'), 3)} | {_f(added(case, 'ttft99'), 3)} | "
            f"{r['non2xx']} / {r['errors']} |")
    lines.append("")
    sg, ll = rows.get("sluicegate"), rows.get("litellm")
    if sg and ll and sg["runs"] and ll["runs"]:
        rps_x = _ratio(sg["rps"], ll["rps"])
        cpu_x = _ratio(ll["us"], sg["us"])
        lines += [
            "| sluicegate / LiteLLM | value |", "|---|---:|",
            f"| req/s (higher is better) | {_f(rps_x)}x |",
            f"| CPU per request (LiteLLM µs ÷ sluicegate µs) | {_f(cpu_x)}x |",
            f"| added p50 latency (LiteLLM ÷ sluicegate) | "
            f"{_f(_ratio(added('litellm', 'p50'), added('sluicegate', 'p50')))}x |",
            f"| added TTFT p50 (LiteLLM ÷ sluicegate) | "
            f"{_f(_ratio(added('litellm', 'ttft50'), added('sluicegate', 'ttft50')))}x |",
            ""]
    if sg and sg["runs"]:
        lines.append("| target | measured | result |")
        lines.append("|---|---|---|")
        if ll and ll["runs"]:
            rps_x = _ratio(sg["rps"], ll["rps"])
            lines.append(f"| sluicegate req/s ≥ {RPS_TARGET:g}x LiteLLM | {_f(rps_x)}x "
                         f"(by CPU/request {_f(_ratio(ll['us'], sg['us']))}x) | "
                         f"{'met' if rps_x and rps_x >= RPS_TARGET else 'NOT met'} |")
        a50 = added("sluicegate", "p50")
        if a50 is not None:
            lines.append(f"| sluicegate added p50 latency ≤ {ADDED_P50_TARGET:g} ms | "
                         f"{a50:.3f} ms | {'met' if a50 <= ADDED_P50_TARGET else 'NOT met'} |")
        lines.append("")
    # The provider must not be what limits the proxies' req/s.
    if direct.get("rps"):
        best = max((rows[c]["rps"] or 0 for c in cases if c != "direct"), default=0)
        if best:
            head = direct["rps"] / best
            verdict = "ok" if head >= 2 else "WARNING: the provider may limit the proxies"
            lines.append(f"Provider headroom: direct {direct['rps']:,.0f} req/s = {head:.1f}x "
                         f"the fastest proxy ({verdict}).")
    for case in cases:
        for note in sorted(set(rows[case]["notes"])):
            lines.append(f"- {case}: {note}")
    for case, reason in skipped.items():
        if case not in cases:
            lines.append(f"- skipped {case}: {reason}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) >= 4 and argv[0] == "check":
        return check(argv[1], argv[2], argv[3], "--stream" in argv[4:])
    if len(argv) >= 6 and argv[0] == "ttft":
        warmup = int(argv[argv.index("--warmup") + 1]) if "--warmup" in argv else 20
        return ttft(argv[1], argv[2], argv[3], int(argv[4]), Path(argv[5]), warmup)
    if len(argv) == 2 and argv[0] == "table":
        sys.stdout.write(table(Path(argv[1])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
