"""Control-plane benchmark: traffic under config churn, etcd propagation, Redis limits.

Three measurements, each side by side with its reference in one run:

1. churn:  wrk on one route through sluicegate, with and without 100 Admin API changes per
           second (routes and upstreams PUT alternately, none touching the measured route):
           req/s, p99, non-2xx and socket errors; ratio churn / no churn; changes done per
           second while wrk ran. Interleaved RUNS. `--store etcd`: the gateway keeps its
           resources in etcd (started as in part 2) instead of its config file.
2. etcd:   two gateways on one etcd; CHANGES routes PUT through gateway A's Admin API, each
           timed until gateway B serves it (B polled over one keep-alive connection):
           p50/p99/max propagation.
3. redis:  limit-count (a limit never reached) with policy local vs policy redis: req/s ratio.

Method as bench/http_proxy.sh: the backend (nginx), wrk and this driver on LOAD_CPU, the
gateway under test alone on PROXY_CPU. Results are printed as Markdown; raw wrk output goes
to OUT.

Usage: .venv/bin/python bench/reload.py [--duration 10] [--runs 3] [--changes 1000]
       [--only churn,etcd,redis] [--store file|etcd]
Needs: nginx, wrk, etcd (Debian etcd-server), redis-server, the venv with sluicegate.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import Gateway, Nginx, free_port, stop, wait_for_port  # noqa: E402
from servers.redis_server import RedisServerProcess  # noqa: E402

LOAD_CPU = os.environ.get("LOAD_CPU", "0")
PROXY_CPU = os.environ.get("PROXY_CPU", "1")
ADMIN_KEY = "bench-admin-key-0123456789"
CHURN_PER_SECOND = 100


def pin(pid: int, cpu: str) -> None:
    subprocess.run(["taskset", "-a", "-p", "-c", cpu, str(pid)], capture_output=True,
                   check=False)


def wrk(url: str, duration: int, out: Path, connections: int = 50) -> dict[str, float]:
    result = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}",
                             f"-d{duration}s", "--latency", url],
                            capture_output=True, text=True, check=True)
    out.write_text(result.stdout)
    return parse_wrk(result.stdout)


def parse_wrk(text: str) -> dict[str, float]:
    def ms(value: str, unit: str) -> float:
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       text)
    total = re.search(r"(\d+) requests in", text)
    return {"rps": rps, "p99_ms": ms(p99.group(1), p99.group(2)) if p99 else float("nan"),
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(int(x) for x in socket.groups()) if socket else 0,
            "requests": int(total.group(1)) if total else 0}


def gateway_config(backend: str, **extra: Any) -> dict[str, Any]:
    return {"admin": {"key": ADMIN_KEY, "listen": f"127.0.0.1:{free_port()}"},
            "upstreams": [{"id": f"u{k}", "nodes": {backend: 1}} for k in range(5)],
            "routes": [{"id": "main", "uri": "/", "upstream": {"nodes": {backend: 1}}}],
            **extra}


def start_gateway(workdir: Path, config: dict[str, Any], extra_args: list[str] | None = None
                  ) -> Gateway:
    config = {**config, "admin": {"key": ADMIN_KEY, "listen": f"127.0.0.1:{free_port()}"}}
    gateway = Gateway(workdir, config, extra_args=extra_args)
    gateway.admin_port = int(config["admin"]["listen"].rsplit(":", 1)[1])  # type: ignore[attr-defined]
    try:
        pin(gateway.process.pid, PROXY_CPU)
        wait_for_port(gateway.admin_port, process=gateway.process)  # type: ignore[attr-defined]
    except BaseException:
        gateway.stop()  # no gateway left running when the bench stops here
        raise
    return gateway


async def churn(admin_port: int, backend: str, stop_at: float,
                rate: int = CHURN_PER_SECOND) -> tuple[int, int, float]:
    """PUT a route or an upstream `rate` times a second until stop_at, without
    waiting for one change to finish before the next starts (up to 32 in flight): changes
    done, failed, and the seconds that took."""
    base = f"http://127.0.0.1:{admin_port}/apisix/admin"
    host, port = backend.rsplit(":", 1)
    counts = [0, 0]  # done, failed
    in_flight = asyncio.Semaphore(32)

    async def change(session: aiohttp.ClientSession, n: int) -> None:
        k = n % 50
        if n % 2:
            url, body = f"{base}/upstreams/u{k % 5}", {
                "nodes": [{"host": host, "port": int(port), "weight": 1 + n % 7}]}
        else:
            url, body = f"{base}/routes/churn-{k}", {
                "uri": f"/churn/{k}/{n}", "upstream_id": f"u{k % 5}"}
        try:
            async with session.put(url, json=body) as response:
                await response.read()
                counts[1] += response.status >= 300
        except aiohttp.ClientError:
            counts[1] += 1
        finally:
            counts[0] += 1
            in_flight.release()

    tasks = set()
    async with aiohttp.ClientSession(headers={"X-API-KEY": ADMIN_KEY}) as session:
        start = time.monotonic()
        n = 0
        while time.monotonic() < stop_at:
            await in_flight.acquire()
            task = asyncio.ensure_future(change(session, n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.gather(*tasks)
    return counts[0], counts[1], time.monotonic() - start


def measure_churn(workdir: Path, args: argparse.Namespace, out: Path) -> list[str]:
    nginx = Nginx(workdir / "nginx")
    pin(nginx.process.pid, LOAD_CPU)
    etcd = None
    try:
        config, extra_args = gateway_config(nginx.address), None
        if args.store == "etcd":
            etcd, port = start_etcd(workdir)
            config, extra_args = {}, ["--store", f"etcd://127.0.0.1:{port}/churn"]
        gateway = start_gateway(workdir, config, extra_args)
    except BaseException:
        nginx.stop()
        if etcd is not None:
            stop(etcd)
        raise
    rows: dict[str, list[dict[str, float]]] = {"no churn": [], f"{args.rate} changes/s": []}
    try:
        if args.store == "etcd":  # the file's resources are ignored: the same ones, in etcd
            asyncio.run(put_resources(gateway.admin_port, gateway_config(nginx.address)))
        wrk(gateway.url + "/", 2, out / "warmup.txt")
        for run in range(args.runs):
            for case in rows:
                path = out / f"churn-{run}-{case.replace(' ', '_').replace('/', '')}.txt"
                if case == "no churn":
                    rows[case].append(wrk(gateway.url + "/", args.duration, path))
                    continue
                stop_at = time.monotonic() + args.duration + 1
                # The changes come from a thread with its own event loop: wrk below blocks
                # this one, and changes queued behind it would all be sent after wrk ended.
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    changes = pool.submit(asyncio.run, churn(gateway.admin_port, nginx.address,
                                                             stop_at, args.rate))
                    time.sleep(0.5)
                    result = wrk(gateway.url + "/", args.duration, path)
                    done, failed, took = changes.result()
                result["changes"], result["change_failures"] = done, failed
                result["changes_per_s"] = done / took
                rows[case].append(result)
    finally:
        gateway.stop()
        nginx.stop()
        if etcd is not None:
            stop(etcd)
    base = statistics.median(r["rps"] for r in rows["no churn"])
    base_p99 = statistics.median(r["p99_ms"] for r in rows["no churn"])
    lines = [f"store: {args.store}", "",
             "| case | req/s (median) | ratio | p99 ms | p99 ratio | non-2xx | socket errors "
             "| changes applied (failed) | changes/s (median) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for case, results in rows.items():
        rps = statistics.median(r["rps"] for r in results)
        p99 = statistics.median(r["p99_ms"] for r in results)
        changes, per_second = "-", "-"
        if "changes" in results[0]:
            changes = (f"{sum(int(r['changes']) for r in results)} "
                       f"({sum(int(r['change_failures']) for r in results)})")
            per_second = f"{statistics.median(r['changes_per_s'] for r in results):.0f}"
        lines.append(f"| {case} | {rps:,.0f} | {rps / base:.2f} | {p99:.2f} | "
                     f"{p99 / base_p99:.2f} | {sum(int(r['non2xx']) for r in results)} | "
                     f"{sum(int(r['socket_errors']) for r in results)} | {changes} | "
                     f"{per_second} |")
    return lines


async def put_resources(admin_port: int, config: dict[str, Any]) -> None:
    """The resources of a config document, PUT through the Admin API (upstreams first)."""
    base = f"http://127.0.0.1:{admin_port}/apisix/admin"
    async with aiohttp.ClientSession(headers={"X-API-KEY": ADMIN_KEY}) as session:
        for kind in ("upstreams", "routes"):
            for item in config.get(kind, []):
                async with session.put(f"{base}/{kind}/{item['id']}", json=item) as response:
                    assert response.status < 300, await response.text()


def start_etcd(workdir: Path) -> tuple[subprocess.Popen[Any], int]:
    client, peer = free_port(), free_port()
    etcd = shutil.which("etcd") or "/usr/bin/etcd"
    process = subprocess.Popen(
        ["taskset", "-c", LOAD_CPU, etcd, "--data-dir", str(workdir / "etcd"),
         "--listen-client-urls", f"http://127.0.0.1:{client}",
         "--advertise-client-urls", f"http://127.0.0.1:{client}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
        stdout=(workdir / "etcd.log").open("wb"), stderr=subprocess.STDOUT)
    wait_for_port(client, process=process)
    return process, client


async def propagation(admin_a: int, url_b: str, backend: str, changes: int) -> list[float]:
    times = []
    async with aiohttp.ClientSession(headers={"X-API-KEY": ADMIN_KEY}) as admin, \
            aiohttp.ClientSession() as client:
        for i in range(changes):
            route = {"uri": f"/prop/{i}", "upstream_id": "u0",  # 50 ids: constant size
                     "plugins": {"proxy-rewrite": {"uri": "/"}}}  # nginx answers 200 on /
            started = time.perf_counter()
            async with admin.put(f"http://127.0.0.1:{admin_a}/apisix/admin/routes/p{i % 50}",
                                 json=route) as response:
                await response.read()
                assert response.status < 300, response.status
            while True:
                async with client.get(f"{url_b}/prop/{i}") as response:
                    await response.read()
                    if response.status == 200:
                        break
                if time.perf_counter() - started > 5:
                    raise TimeoutError(f"route p{i} never reached gateway B")
                await asyncio.sleep(0.0005)
            times.append((time.perf_counter() - started) * 1000)
    return times


def measure_etcd(workdir: Path, args: argparse.Namespace) -> list[str]:
    etcd, port = start_etcd(workdir)
    nginx = Nginx(workdir / "nginx-etcd")
    pin(nginx.process.pid, LOAD_CPU)
    store = ["--store", f"etcd://127.0.0.1:{port}/bench"]
    gateways = []
    try:
        for name in ("a", "b"):
            (workdir / name).mkdir()
            gateways.append(start_gateway(workdir / name, {"admin": {"key": ADMIN_KEY}},
                                          store))
        a, b = gateways
        asyncio.run(put_upstream(a.admin_port, nginx.address))
        try:
            times = asyncio.run(propagation(a.admin_port, b.url, nginx.address, args.changes))
        except (TimeoutError, AssertionError):
            print("gateway A log:\n" + a.log()[-3000:] + "\ngateway B log:\n" + b.log()[-3000:],
                  file=sys.stderr)
            raise
    finally:
        for gateway in gateways:
            gateway.stop()
        nginx.stop()
        stop(etcd)
    times.sort()
    pct = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return ["| changes | p50 ms | p90 ms | p99 ms | max ms |", "|---|---|---|---|---|",
            f"| {len(times)} | {pct(0.5):.1f} | {pct(0.9):.1f} | {pct(0.99):.1f} | "
            f"{times[-1]:.1f} |"]


async def put_upstream(admin_port: int, backend: str) -> None:
    url = f"http://127.0.0.1:{admin_port}/apisix/admin/upstreams/u0"
    async with aiohttp.ClientSession(headers={"X-API-KEY": ADMIN_KEY}) as session, \
            session.put(url, json={"nodes": {backend: 1}}) as response:
        assert response.status < 300, await response.text()


def measure_redis(workdir: Path, args: argparse.Namespace, out: Path) -> list[str]:
    redis = RedisServerProcess(workdir / "redis")
    pin(redis.process.pid, LOAD_CPU)  # type: ignore[union-attr]
    nginx = Nginx(workdir / "nginx-redis")
    pin(nginx.process.pid, LOAD_CPU)
    limit = {"count": 1_000_000_000, "time_window": 60, "key_type": "constant",
             "key": "bench"}
    cases = {"local": limit, "redis": {**limit, "policy": "redis", "redis_host": "127.0.0.1",
                                       "redis_port": redis.port}}
    results: dict[str, list[dict[str, float]]] = {case: [] for case in cases}
    try:
        for case, conf in cases.items():
            (workdir / f"gw-{case}").mkdir()
            config = {"routes": [{"id": "main", "uri": "/",
                                  "upstream": {"nodes": {nginx.address: 1}},
                                  "plugins": {"limit-count": conf}}]}
            gateway = start_gateway(workdir / f"gw-{case}", config)
            try:
                wrk(gateway.url + "/", 2, out / f"redis-warmup-{case}.txt")
                for run in range(args.runs):
                    results[case].append(wrk(gateway.url + "/", args.duration,
                                             out / f"redis-{run}-{case}.txt"))
            finally:
                gateway.stop()
    finally:
        nginx.stop()
        redis.stop()
    base = statistics.median(r["rps"] for r in results["local"])
    lines = ["| limit-count policy | req/s (median) | ratio to local | p99 ms | non-2xx |",
             "|---|---|---|---|---|"]
    for case, rows in results.items():
        rps = statistics.median(r["rps"] for r in rows)
        lines.append(f"| {case} | {rps:,.0f} | {rps / base:.2f} | "
                     f"{statistics.median(r['p99_ms'] for r in rows):.2f} | "
                     f"{sum(int(r['non2xx']) for r in rows)} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--only", default="churn,etcd,redis")
    parser.add_argument("--rate", type=int, default=CHURN_PER_SECOND,
                        help="changes per second the churn part aims at (the issue: 100)")
    parser.add_argument("--store", choices=("file", "etcd"), default="file",
                        help="where the churn part's gateway keeps its resources")
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(os.environ.get("OUT") or f"/tmp/sluicegate-bench/reload-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    sections = []
    with tempfile.TemporaryDirectory(prefix="sluicegate-reload-") as tmp:
        workdir = Path(tmp)
        only = set(args.only.split(","))
        if "churn" in only:
            sections += ["### Traffic under config churn", "",
                         *measure_churn(workdir, args, out), ""]
        if "etcd" in only:
            sections += ["### etcd propagation between two gateways", "",
                         *measure_etcd(workdir, args), ""]
        if "redis" in only:
            sections += ["### limit-count: redis vs local policy", "",
                         *measure_redis(workdir, args, out), ""]
    text = "\n".join(sections)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
