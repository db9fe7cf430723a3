import asyncio
import json
import os
import time
from types import SimpleNamespace

import pytest

from sluicegate.http.context import RequestContext
from sluicegate.observe import access_log
from sluicegate.plugins.base import PluginEnv, validate_plugin
from sluicegate.plugins.file_logger import FileLogger

FIELDS = {"time", "client_ip", "method", "uri", "host", "status", "upstream_status",
          "upstream_addr", "route_id", "consumer", "request_id", "latency_ms",
          "upstream_latency_ms", "bytes_sent", "bytes_received", "user_agent"}


@pytest.fixture(autouse=True)
def _forget_writers():
    yield
    access_log.close_all()


def make_ctx(query="", headers=()):
    raw = [(b"Host", b"shop.example"), (b"User-Agent", b"curl/8.5"),
           *[(k.encode(), v.encode()) for k, v in headers]]
    ctx = RequestContext("POST", "/cart", query, raw, "shop.example", ("198.51.100.4", 51000),
                         ("10.0.0.1", 9080), "1.1")
    ctx.route = SimpleNamespace(id="cart", service_id=None)
    ctx.upstream_addr = "10.1.0.5:8080"
    ctx.upstream_status = ctx.response_status = 201
    ctx.upstream_latency = 0.0125
    ctx.bytes_sent, ctx.bytes_received = 512, 128
    ctx.request_id = "req-1"
    ctx.consumer_name = "jack"
    return ctx


def plugin(path, **conf):
    model, _, errors = validate_plugin("file-logger", {"path": str(path), **conf},
                                       "routes[0].plugins.file-logger")
    assert errors == []
    return FileLogger(model, PluginEnv())


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_file_logger_writes_one_json_line_per_request(tmp_path):
    path = tmp_path / "access.log"
    logger = plugin(path)
    ctx = make_ctx()
    ctx.start_time -= 0.05
    logger.log(ctx)
    logger.log(make_ctx())
    first, second = lines(path)
    assert set(first) == FIELDS
    assert first["client_ip"] == "198.51.100.4"
    assert (first["method"], first["uri"], first["host"]) == ("POST", "/cart", "shop.example")
    assert (first["status"], first["upstream_status"]) == (201, 201)
    assert first["upstream_addr"] == "10.1.0.5:8080"
    assert (first["route_id"], first["consumer"], first["request_id"]) == ("cart", "jack", "req-1")
    assert first["latency_ms"] >= 50
    assert first["upstream_latency_ms"] == 12.5
    assert (first["bytes_sent"], first["bytes_received"]) == (512, 128)
    assert first["user_agent"] == "curl/8.5"
    assert time.strftime("%Y-%m-%dT", time.gmtime()) in first["time"]
    assert first["time"].endswith("Z") and len(first["time"]) == 24
    assert second["request_id"] == "req-1"


def test_file_logger_logs_null_upstream_when_gateway_answered(tmp_path):
    path = tmp_path / "access.log"
    ctx = make_ctx()
    ctx.upstream_status, ctx.upstream_addr, ctx.response_status = 0, None, 401
    ctx.route = None
    plugin(path).log(ctx)
    (line,) = lines(path)
    assert line["status"] == 401
    assert line["upstream_status"] is None and line["upstream_latency_ms"] is None
    assert line["route_id"] is None


def test_file_logger_never_logs_credentials(tmp_path):
    path = tmp_path / "access.log"
    ctx = make_ctx(query="apikey=qs-secret-1&page=2", headers=[
        ("Authorization", "Basic dXNlcjpwdy1zZWNyZXQtMg=="),
        ("apikey", "hdr-secret-3"),
        ("Cookie", "session=cookie-secret-4"),
        ("X-Api-Key", "hdr-secret-5")])
    plugin(path).log(ctx)
    text = path.read_text()
    for secret in ("qs-secret-1", "dXNlcjpw", "hdr-secret-3", "cookie-secret-4",
                   "hdr-secret-5", "apikey", "Authorization", "session="):
        assert secret not in text
    assert lines(path)[0]["uri"] == "/cart"


def test_file_logger_escapes_hostile_values_onto_one_line(tmp_path):
    path = tmp_path / "access.log"
    plugin(path).log(make_ctx(headers=[]))
    ctx = make_ctx()
    ctx.uri = '/a"b\n{"forged":true}'
    plugin(path).log(ctx)
    assert len(path.read_text().splitlines()) == 2
    assert lines(path)[1]["uri"] == '/a"b\n{"forged":true}'


def test_file_logger_shares_one_writer_per_path(tmp_path):
    path = tmp_path / "access.log"
    first, second = plugin(path), plugin(str(tmp_path / "." / "access.log"))
    assert first.writer is second.writer
    assert plugin(tmp_path / "other.log").writer is not first.writer


def test_file_logger_buffers_under_event_loop_until_timer(tmp_path):
    path = tmp_path / "access.log"
    logger = plugin(path)

    async def scenario():
        logger.log(make_ctx())
        logger.log(make_ctx())
        written_at_once = path.exists() and path.read_text()
        await asyncio.sleep(access_log.FLUSH_DELAY + 0.2)
        return written_at_once

    assert not asyncio.run(scenario())
    assert len(lines(path)) == 2


def test_file_logger_flushes_when_buffer_is_full(tmp_path, monkeypatch):
    monkeypatch.setattr(access_log, "FLUSH_BYTES", 1000)
    path = tmp_path / "access.log"
    logger = plugin(path)

    async def scenario():
        for _ in range(10):
            logger.log(make_ctx())
        return len(path.read_text().splitlines())

    written = asyncio.run(scenario())
    assert 0 < written < 10


def test_file_logger_flush_all_writes_buffered_lines(tmp_path):
    path = tmp_path / "access.log"
    logger = plugin(path)

    async def scenario():
        logger.log(make_ctx())
        access_log.flush_all()
        return len(lines(path))

    assert asyncio.run(scenario()) == 1


def test_file_logger_reopens_rotated_file(tmp_path):
    path = tmp_path / "access.log"
    logger = plugin(path)
    logger.log(make_ctx())
    os.rename(path, tmp_path / "access.log.1")
    logger.log(make_ctx())
    logger.log(make_ctx())
    assert len(lines(tmp_path / "access.log.1")) == 1
    assert len(lines(path)) == 2
    path.unlink()
    logger.log(make_ctx())
    assert len(lines(path)) == 1


def test_file_logger_survives_unwritable_path(tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    logger = plugin(folder / "access.log")
    folder.rmdir()
    logger.log(make_ctx())  # does not raise into the request
    assert logger.writer.dropped_lines == 1
    folder.mkdir()
    logger.log(make_ctx())
    assert len(lines(folder / "access.log")) == 1


def test_file_logger_config_errors_name_the_field(tmp_path):
    _, _, errors = validate_plugin("file-logger", {}, "routes[0].plugins.file-logger")
    assert errors == ["routes[0].plugins.file-logger.path: Field required"]
    _, _, errors = validate_plugin("file-logger", {"path": str(tmp_path / "a.log"),
                                                   "include_req_body": True}, "p")
    assert errors == ["p.include_req_body: not supported: sluicegate does not log request "
                      "bodies"]
    _, _, errors = validate_plugin("file-logger", {"path": str(tmp_path / "no" / "a.log")}, "p")
    assert errors == [f"p.path: folder {str(tmp_path / 'no')!r} does not exist"]
