"""AI gateway benchmark: what ai-proxy adds in front of a local fake LLM provider.

Against the same fake provider (tests/servers/fake_llm.py, OpenAI wire format), one target
at a time, the others idle:
  direct      the client calls the fake provider itself
  sluicegate  the client calls the gateway (ai-proxy, provider openai-compatible)
  aiohttp     a pass-through aiohttp proxy (streams SSE through, no translation or
              accounting): what "a Python proxy" costs at the least
  litellm     the LiteLLM proxy, when `--litellm PATH` names its `litellm` command (install
              it in a separate venv: `pip install 'litellm[proxy]'`)

A smoke-level tool. The pinned, repeated comparison with LiteLLM (wrk load, a fast nginx fake
provider, medians, ratios and targets) is bench/ai.sh.

Measured per target:
  * non-streamed chat: req/s with `--concurrency` requests in flight for `--duration`
    seconds, and the proxy process's CPU per request (utime+stime from /proc);
  * latency, one request at a time (`--requests`): p50/p99 of whole non-streamed requests
    and of the time to first token of streamed ones; "added" is the target's p50/p99 minus
    the direct ones.
The proxies run on CPU 1, the fake provider and this client on CPU 0 (taskset).

    .venv/bin/python bench/ai_gateway.py [--duration 10] [--concurrency 32] [--requests 500]
    .venv/bin/python bench/ai_gateway.py --smoke        # 2 s, to see that it runs
Results: a table on stdout and OUT/results.json (OUT: --out, default /tmp/sg-ai-bench-*).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "servers" / "fake_llm.py"
KEY = "sk-bench"
BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hello benchmark"}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen[Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing on port {port}")


def pinned(cpu: int, command: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *command] if shutil.which("taskset") else command


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process and its children (workers), seconds."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for each in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


# -- the pass-through peer -------------------------------------------------------------------

def serve_peer(port: int, upstream: str) -> None:
    """An aiohttp proxy that forwards every request and streams the answer back as it
    arrives (one write per upstream read)."""
    from aiohttp import web

    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        session: aiohttp.ClientSession = request.app["session"]
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", "connection")}
        async with session.request(request.method, upstream + request.path_qs,
                                   headers=headers, data=body) as answer:
            response = web.StreamResponse(status=answer.status, headers={
                "Content-Type": answer.headers.get("Content-Type", "application/json")})
            await response.prepare(request)
            async for data in answer.content.iter_any():
                await response.write(data)
            await response.write_eof()
            return response

    async def start(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", proxy)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# -- the client ------------------------------------------------------------------------------

async def one(session: aiohttp.ClientSession, url: str, stream: bool) -> tuple[float, float]:
    """(seconds to the whole answer, seconds to the first token or 0)."""
    body = dict(BODY, stream=True) if stream else BODY
    started = time.perf_counter()
    first = 0.0
    async with session.post(url, json=body,
                            headers={"Authorization": f"Bearer {KEY}"}) as answer:
        if answer.status != 200:
            raise RuntimeError(f"{url}: status {answer.status}: {await answer.text()}")
        if not stream:
            await answer.read()
        else:
            seen = b""
            async for data in answer.content.iter_any():
                if not first:
                    seen += data
                    if b"echo:" in seen:  # the first content token
                        first = time.perf_counter() - started
    return time.perf_counter() - started, first


async def load(url: str, duration: float, concurrency: int) -> tuple[int, int]:
    """Closed loop: (completed, failed) in `duration` seconds."""
    done = failed = 0
    deadline = time.monotonic() + duration
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def worker() -> None:
            nonlocal done, failed
            while time.monotonic() < deadline:
                try:
                    await one(session, url, False)
                    done += 1
                except (aiohttp.ClientError, RuntimeError):
                    failed += 1
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, failed


async def latencies(url: str, count: int) -> dict[str, list[float]]:
    whole, ttft = [], []
    async with aiohttp.ClientSession() as session:
        for _ in range(min(20, count)):  # warm the pools
            await one(session, url, False)
        for _ in range(count):
            whole.append((await one(session, url, False))[0])
            ttft.append((await one(session, url, True))[1])
    return {"whole": whole, "ttft": ttft}


def measure(name: str, url: str, pid: int | None, args: argparse.Namespace) -> dict[str, Any]:
    lat = asyncio.run(latencies(url, args.requests))
    cpu_before = cpu_seconds(pid) if pid else 0.0
    started = time.monotonic()
    done, failed = asyncio.run(load(url, args.duration, args.concurrency))
    elapsed = time.monotonic() - started
    cpu = (cpu_seconds(pid) - cpu_before) if pid else 0.0
    result = {
        "target": name, "rps": done / elapsed, "completed": done, "failed": failed,
        "cpu_us_per_request": cpu / done * 1e6 if pid and done else None,
        "p50_ms": percentile(lat["whole"], 0.5) * 1000,
        "p99_ms": percentile(lat["whole"], 0.99) * 1000,
        "ttft_p50_ms": percentile(lat["ttft"], 0.5) * 1000,
        "ttft_p99_ms": percentile(lat["ttft"], 0.99) * 1000,
    }
    print(f"  {name}: {result['rps']:.0f} req/s, p50 {result['p50_ms']:.3f} ms, "
          f"ttft p50 {result['ttft_p50_ms']:.3f} ms", flush=True)
    return result


def stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--litellm", help="path of the `litellm` command (LiteLLM proxy)")
    parser.add_argument("--smoke", action="store_true", help="2 s, 50 requests")
    parser.add_argument("--out")
    parser.add_argument("--serve-peer", nargs=2, metavar=("PORT", "UPSTREAM"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_peer:
        serve_peer(int(args.serve_peer[0]), args.serve_peer[1])
        return 0
    if args.smoke:
        args.duration, args.requests, args.concurrency = 2.0, 50, 8
    out = Path(args.out or tempfile.mkdtemp(prefix="sg-ai-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen[Any]] = []
    logs = []

    def start(name: str, command: list[str], port: int, cpu: int,
              env: dict[str, str] | None = None) -> subprocess.Popen[Any]:
        log = (out / f"{name}.log").open("wb")
        logs.append(log)
        process = subprocess.Popen(pinned(cpu, command), stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
        processes.append(process)
        wait_for_port(port, process)
        return process

    results = []
    try:
        fake_port = free_port()
        start("fake", [sys.executable, str(FAKE), "--port", str(fake_port),
                       "--api-key", KEY], fake_port, 0)
        fake_url = f"http://127.0.0.1:{fake_port}"
        targets: list[tuple[str, str, int | None]] = [
            ("direct", f"{fake_url}/v1/chat/completions", None)]

        gateway_port, metrics_port = free_port(), free_port()
        config = {
            "gateway": {"listen": [f"127.0.0.1:{gateway_port}"],
                        "metrics_listen": f"127.0.0.1:{metrics_port}"},
            "admin": {"listen": "127.0.0.1:0"},
            "routes": [{"id": "llm", "uri": "/v1/*", "plugins": {"ai-proxy": {
                "provider": "openai-compatible",
                "auth": {"header": {"Authorization": "Bearer $env://BENCH_PROVIDER_KEY"}},
                "override": {"endpoint": f"{fake_url}/v1"}}}}],
            "global_rules": [{"id": "observe", "plugins": {"prometheus": {}}}],
        }
        import yaml

        (out / "gateway.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        gateway = start("sluicegate", [sys.executable, "-m", "sluicegate", "--log-level",
                                       "warning", "run", "-c", str(out / "gateway.yaml")],
                        gateway_port, 1, {"BENCH_PROVIDER_KEY": KEY})
        targets.append(("sluicegate", f"http://127.0.0.1:{gateway_port}/v1/chat/completions",
                        gateway.pid))

        peer_port = free_port()
        peer = start("aiohttp", [sys.executable, __file__, "--serve-peer", str(peer_port),
                                 fake_url], peer_port, 1)
        targets.append(("aiohttp", f"http://127.0.0.1:{peer_port}/v1/chat/completions",
                        peer.pid))

        if args.litellm:
            litellm_port = free_port()
            # LiteLLM refuses to start without a master key; the clients send KEY anyway.
            (out / "litellm.yaml").write_text(yaml.safe_dump({"model_list": [{
                "model_name": "fake-model", "litellm_params": {
                    "model": "openai/fake-model", "api_base": f"{fake_url}/v1",
                    "api_key": KEY}}], "general_settings": {"master_key": KEY}}))
            # LITELLM_LOCAL_MODEL_COST_MAP: else it fetches its cost map from the internet.
            litellm = start("litellm", [args.litellm, "--config", str(out / "litellm.yaml"),
                                        "--host", "127.0.0.1", "--port", str(litellm_port),
                                        "--num_workers", "1"],
                            litellm_port, 1, {"LITELLM_LOCAL_MODEL_COST_MAP": "True",
                                              "LITELLM_LOG": "ERROR"})
            targets.append(("litellm", f"http://127.0.0.1:{litellm_port}/v1/chat/completions",
                            litellm.pid))

        print(f"AI gateway benchmark: {args.duration:g} s load at concurrency "
              f"{args.concurrency}, {args.requests} sequential requests; out: {out}",
              flush=True)
        for name, url, pid in targets:
            results.append(measure(name, url, pid, args))
    finally:
        for process in reversed(processes):
            stop(process)
        for log in logs:
            log.close()
    direct = results[0]
    for result in results[1:]:
        for key in ("p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms"):
            result[f"added_{key}"] = result[key] - direct[key]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n| target | req/s | CPU µs/req | p50 ms | p99 ms | added p50 ms | TTFT p50 ms | "
          "added TTFT p50 ms | added TTFT p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for result in results:
        cpu = result["cpu_us_per_request"]
        print(f"| {result['target']} | {result['rps']:.0f} | "
              f"{'' if cpu is None else f'{cpu:.0f}'} | {result['p50_ms']:.3f} | "
              f"{result['p99_ms']:.3f} | {result.get('added_p50_ms', 0):.3f} | "
              f"{result['ttft_p50_ms']:.3f} | {result.get('added_ttft_p50_ms', 0):.3f} | "
              f"{result.get('added_ttft_p99_ms', 0):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
