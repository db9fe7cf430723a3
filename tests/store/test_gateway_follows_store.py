"""Real gateway processes following their config store live: the YAML file (edits apply
without SIGHUP) and etcd (`--store etcd://…`), with one or several workers and gateways,
and etcd going away and coming back."""

from __future__ import annotations

import http.client
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from harness import Gateway, free_port
from servers.etcd_server import Etcd

# How long a test waits for the gateway to pick a change up before failing. A guard only:
# the gateway applies a change well within a second.
WAIT = 20.0

BASE = {"plugins": [{"name": "prometheus"}]}  # /metrics, for the config gauges


def status(gateway: Gateway, path: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def eventually(check: Callable[[], bool], what: str, gateway: Gateway | None = None) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if check():
            return
        if gateway is not None and gateway.process.poll() is not None:
            raise AssertionError(f"gateway exited while waiting for {what}:\n{gateway.log()}")
        time.sleep(0.05)
    raise AssertionError(f"not within {WAIT}s: {what}" +
                         (f"\n{gateway.log()}" if gateway is not None else ""))


def serves(gateway: Gateway, path: str, code: int) -> Callable[[], bool]:
    return lambda: status(gateway, path) == code


def gauges(gateway: Gateway) -> dict[str, float]:
    """The config gauges from /metrics; {} while /metrics is not up yet."""
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return {}
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith("sluicegate_config_")}


def echo_route(echo: Any, route_id: str, uri: str) -> dict[str, Any]:
    return {"id": route_id, "uri": uri, "upstream": {"nodes": {echo.address: 1}}}


def start_on_etcd(start_gateway: Any, etcd: Etcd, prefix: str, **options: Any) -> Gateway:
    return start_gateway(BASE, extra_args=["--store", etcd.url(prefix)], **options)


def test_editing_the_config_file_changes_routing_without_sighup(echo, start_gateway):
    gateway = start_gateway({"routes": [echo_route(echo, "a", "/a")]})
    assert status(gateway, "/b") == 404
    gateway.write_config({**gateway.config, "routes": [echo_route(echo, "b", "/b")]})
    eventually(serves(gateway, "/b", 200), "the new route served", gateway)
    assert status(gateway, "/a") == 404
    assert "config reloaded" in gateway.log()


def test_bad_edit_of_the_config_file_keeps_the_running_config(echo, start_gateway):
    gateway = start_gateway({"routes": [echo_route(echo, "a", "/a")]})
    gateway.write_config({**gateway.config, "routes": [
        echo_route(echo, "a", "/a2"), {"id": "bad", "uri": "no-slash"}]})
    eventually(lambda: "config reload rejected" in gateway.log(), "the rejection logged",
               gateway)
    assert status(gateway, "/a") == 200
    assert status(gateway, "/a2") == 404  # never half-applied
    assert "routes[1].uri" in gateway.log()


def test_sighup_still_reloads_the_file(echo, start_gateway):
    gateway = start_gateway({"routes": [echo_route(echo, "a", "/a")]})
    gateway.write_config({**gateway.config, "routes": [echo_route(echo, "b", "/b")]})
    gateway.reload()
    eventually(serves(gateway, "/b", 200), "the new route served", gateway)


def test_route_put_into_etcd_is_served_and_deleting_it_gives_404(echo, etcd, prefix,
                                                                 start_gateway):
    gateway = start_on_etcd(start_gateway, etcd, prefix)
    assert status(gateway, "/hello") == 404
    etcd.put(f"{prefix}/routes/hello", echo_route(echo, "hello", "/hello"))
    eventually(serves(gateway, "/hello", 200), "the route put into etcd served", gateway)
    etcd.delete(f"{prefix}/routes/hello")
    eventually(serves(gateway, "/hello", 404), "the deleted route gone", gateway)


def test_gateway_starts_with_what_etcd_holds(echo, etcd, prefix, start_gateway):
    etcd.put(f"{prefix}/upstreams/echo", {"nodes": {echo.address: 1}})
    etcd.put(f"{prefix}/routes/r1", {"uri": "/there", "upstream_id": "echo"})
    gateway = start_on_etcd(start_gateway, etcd, prefix)
    assert status(gateway, "/there") == 200


def response_headers(gateway: Gateway, path: str) -> dict[str, str]:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return {name.lower(): value for name, value in response.getheaders()}
    finally:
        connection.close()


def test_sighup_with_etcd_rereads_the_gateway_settings_from_the_file(echo, etcd, prefix,
                                                                      start_gateway):
    etcd.put(f"{prefix}/routes/r1", echo_route(echo, "r1", "/r1"))
    gateway = start_on_etcd(start_gateway, etcd, prefix)
    assert "x-request-id" not in response_headers(gateway, "/r1")
    gateway.write_config({**gateway.config, "plugins": [*BASE["plugins"],
                                                        {"name": "request-id"}]})
    gateway.reload()
    eventually(lambda: "x-request-id" in response_headers(gateway, "/r1"),
               "the file's new global plugin applied", gateway)
    assert status(gateway, "/r1") == 200  # the routes from etcd stay


def test_two_gateways_on_one_etcd_both_serve_a_new_route(echo, etcd, prefix, start_gateway):
    first = start_on_etcd(start_gateway, etcd, prefix)
    second = start_on_etcd(start_gateway, etcd, prefix)
    etcd.put(f"{prefix}/routes/shared", echo_route(echo, "shared", "/shared"))
    eventually(serves(first, "/shared", 200), "the first gateway serving", first)
    eventually(serves(second, "/shared", 200), "the second gateway serving", second)


def test_malformed_value_in_etcd_is_skipped_and_the_rest_is_served(echo, etcd, prefix,
                                                                   start_gateway):
    gateway = start_on_etcd(start_gateway, etcd, prefix)
    etcd.put(f"{prefix}/routes/broken", "{this is not json")
    etcd.put(f"{prefix}/routes/typo", {"uri": "/typo", "upstreem": {}})
    etcd.put(f"{prefix}/routes/fine", echo_route(echo, "fine", "/fine"))
    eventually(serves(gateway, "/fine", 200), "the good route served", gateway)
    assert status(gateway, "/typo") == 404
    eventually(lambda: f"etcd key {prefix}/routes/broken" in gateway.log(),
               "the bad key named in the log", gateway)
    assert f"etcd key {prefix}/routes/typo" in gateway.log()
    assert gateway.process.poll() is None


def test_gateway_keeps_serving_while_etcd_is_down_and_catches_up(echo, own_etcd,
                                                                 start_gateway):
    own_etcd.put("/sluicegate/routes/before", echo_route(echo, "before", "/before"))
    gateway = start_on_etcd(start_gateway, own_etcd, "")
    eventually(lambda: gauges(gateway).get("sluicegate_config_stale") == 0, "metrics up",
               gateway)
    own_etcd.stop()
    eventually(lambda: gauges(gateway).get("sluicegate_config_stale") == 1, "stale reported",
               gateway)
    assert status(gateway, "/before") == 200  # the last good config keeps serving
    age = gauges(gateway)["sluicegate_config_age_seconds"]
    eventually(lambda: gauges(gateway)["sluicegate_config_age_seconds"] > age,
               "config age growing", gateway)
    own_etcd.start()
    revision = own_etcd.put("/sluicegate/routes/after", echo_route(echo, "after", "/after"))
    eventually(serves(gateway, "/after", 200), "the route added after the restart", gateway)
    eventually(lambda: gauges(gateway).get("sluicegate_config_stale") == 0, "stale cleared",
               gateway)
    assert gauges(gateway)["sluicegate_config_revision"] >= revision
    assert status(gateway, "/before") == 200


def test_every_worker_follows_etcd(echo, etcd, prefix, start_gateway):
    gateway = start_on_etcd(start_gateway, etcd, prefix, workers=2)
    eventually(lambda: "sluicegate_config_revision" in gauges(gateway), "workers reporting",
               gateway)
    revision = etcd.put(f"{prefix}/routes/new", echo_route(echo, "new", "/new"))
    # The supervisor reports the oldest revision any worker serves.
    eventually(lambda: gauges(gateway).get("sluicegate_config_revision", 0) >= revision,
               "both workers at the new revision", gateway)
    assert all(status(gateway, "/new") == 200 for _ in range(20))  # new connections


def test_every_worker_follows_the_config_file(echo, start_gateway):
    gateway = start_gateway({**BASE, "routes": [echo_route(echo, "a", "/a")]}, workers=2)
    eventually(lambda: "sluicegate_config_revision" in gauges(gateway), "workers reporting",
               gateway)
    before = gauges(gateway)["sluicegate_config_revision"]
    gateway.write_config({**gateway.config, "routes": [echo_route(echo, "b", "/b")]})
    eventually(lambda: gauges(gateway).get("sluicegate_config_revision", 0) > before,
               "both workers at the new revision", gateway)
    assert all(status(gateway, "/b") == 200 for _ in range(20))


def test_run_with_unreachable_etcd_exits_naming_the_store(tmp_path: Path):
    config = tmp_path / "gw.yaml"
    config.write_text("gateway: {listen: ['127.0.0.1:0']}\n")
    url = f"etcd://127.0.0.1:{free_port()}"
    result = subprocess.run([sys.executable, "-m", "sluicegate", "run", "-c", str(config),
                             "--store", url], capture_output=True, text=True, timeout=60)
    assert result.returncode == 4
    assert f"cannot load the config from {url}" in result.stderr


def test_run_with_an_unknown_store_url_is_a_usage_error(tmp_path: Path):
    config = tmp_path / "gw.yaml"
    config.write_text("gateway: {listen: ['127.0.0.1:0']}\n")
    result = subprocess.run([sys.executable, "-m", "sluicegate", "run", "-c", str(config),
                             "--store", "zookeeper://x"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "--store" in result.stderr
