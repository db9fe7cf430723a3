"""Test harness: real servers (nginx, a Python echo upstream) and the gateway itself, each
started as its own process on free loopback ports. Fixtures in conftest.py wrap these."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
ECHO_UPSTREAM = ROOT / "tests" / "servers" / "echo_upstream.py"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0,
                  process: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def stop(process: subprocess.Popen[Any], timeout: float = 15.0) -> int | None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


class Nginx:
    """nginx as a test backend. Locations:
    /                -> 200, fixed 100-byte JSON body
    /headers         -> 200, text echo of what nginx received (host, xff, real ip, ...)
    /status/NNN      -> that status (for NNN in STATUSES)
    /files/NAME      -> static files from `root` (see `files`)
    /slow/NAME       -> static files sent at 64 KiB/s
    """

    BODY = ('{"ok":true,"service":"test-backend",'
            '"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}')
    STATUSES = (200, 201, 204, 301, 304, 400, 401, 403, 404, 500, 502, 503)

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.files = workdir / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        (workdir / "tmp").mkdir(exist_ok=True)
        headers_body = ("method=$request_method uri=$request_uri host=$http_host "
                        "xff=$http_x_forwarded_for xrealip=$http_x_real_ip "
                        "xproto=$http_x_forwarded_proto xhost=$http_x_forwarded_host "
                        "connection=$http_connection te=$http_te keepalive=$http_keep_alive "
                        "upgrade=$http_upgrade custom=$http_x_custom apikey=$http_apikey "
                        "requestid=$http_x_request_id remote=$remote_addr")
        status_locations = " ".join(f"location = /status/{code} {{ return {code}; }}"
                                    for code in self.STATUSES)
        config = textwrap.dedent(f"""
            user root;
            worker_processes 1;
            daemon off;
            master_process on;
            pid {workdir}/nginx.pid;
            error_log {workdir}/error.log warn;
            events {{ worker_connections 4096; }}
            http {{
                access_log {workdir}/access.log;
                client_body_temp_path {workdir}/tmp/client_body;
                proxy_temp_path {workdir}/tmp/proxy;
                fastcgi_temp_path {workdir}/tmp/fastcgi;
                uwsgi_temp_path {workdir}/tmp/uwsgi;
                scgi_temp_path {workdir}/tmp/scgi;
                keepalive_requests 100000;
                client_max_body_size 0;
                server {{
                    listen 127.0.0.1:{self.port};
                    location = / {{ default_type application/json; return 200 '{self.BODY}'; }}
                    location = /headers {{ default_type text/plain;
                                           return 200 "{headers_body}"; }}
                    {status_locations}
                    location /files/ {{ alias {self.files}/; }}
                    location /slow/ {{ alias {self.files}/; limit_rate 65536; }}
                }}
            }}
        """)
        self.config = workdir / "nginx.conf"
        self.config.write_text(config)
        self.process = subprocess.Popen([NGINX, "-c", str(self.config), "-p", str(workdir)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_port(self.port, process=self.process)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def access_log(self) -> str:
        return (self.workdir / "access.log").read_text()

    def stop(self) -> None:
        stop(self.process)


class EchoUpstream:
    """tests/servers/echo_upstream.py: answers with JSON describing the request it got
    (method, target, headers as a list, body length and sha256). See that file for knobs."""

    def __init__(self, port: int | None = None, name: str = "echo",
                 ws_port: int | None = None) -> None:
        self.port = port or free_port()
        self.name = name
        self.ws_port = ws_port  # a WebSocket echo server listens there too when set
        command = [sys.executable, str(ECHO_UPSTREAM), "--port", str(self.port), "--name", name]
        if ws_port is not None:
            command += ["--ws-port", str(ws_port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_for_port(self.port, process=self.process)
        if ws_port is not None:
            wait_for_port(ws_port, process=self.process)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop(self.process)


class Gateway:
    """sluicegate started from a config dict (listen/metrics ports filled in)."""

    def __init__(self, workdir: Path, config: dict[str, Any], workers: int = 1,
                 extra_args: list[str] | None = None, wait: bool = True) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.metrics_port = free_port()
        config = dict(config)
        gateway = dict(config.get("gateway") or {})
        gateway.setdefault("listen", [f"127.0.0.1:{self.port}"])
        gateway.setdefault("metrics_listen", f"127.0.0.1:{self.metrics_port}")
        config["gateway"] = gateway
        # The Admin API is on by default: port 0 lets the kernel pick a free one (no race
        # with parallel runs, not 9180); the gateway logs it (tests/admin reads it there).
        admin = dict(config.get("admin") or {})
        admin.setdefault("listen", "127.0.0.1:0")
        config["admin"] = admin
        # The dashboard too (its default, 127.0.0.1:9000, would be shared by every gateway).
        dashboard = dict(config.get("dashboard") or {})
        dashboard.setdefault("listen", "127.0.0.1:0")
        config["dashboard"] = dashboard
        self.config_path = workdir / f"gateway-{self.port}.yaml"
        self.write_config(config)
        self.log_path = workdir / f"gateway-{self.port}.log"
        self.log_file = self.log_path.open("wb")
        command = [sys.executable, "-m", "sluicegate", "run", "-c", str(self.config_path),
                   "--workers", str(workers), *(extra_args or [])]
        self.process = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if wait:
            wait_for_port(self.port, process=self.process)

    def write_config(self, config: dict[str, Any]) -> None:
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def reload(self) -> None:
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> int | None:
        code = stop(self.process)
        self.log_file.close()
        return code


def route_to(address: str, uri: str = "/*", **route: Any) -> dict[str, Any]:
    """A one-route config to one upstream node."""
    return {"routes": [{"id": "r1", "uri": uri, "upstream": {"nodes": {address: 1}}, **route}]}


class TlsNginx:
    """nginx as an HTTPS test backend: one TLS server per (cert, key) pair, on `ports[i]`.
    /         -> 200, Nginx.BODY
    /headers  -> 200, text: sni=$ssl_server_name client=$ssl_client_s_dn conn=$connection
                 host=$http_host xproto=$http_x_forwarded_proto
    With `client_ca`, every server asks for a client certificate signed by it (optional:
    without one, client= is empty)."""

    def __init__(self, workdir: Path, certificates: list[tuple[Path, Path]],
                 client_ca: Path | None = None) -> None:
        self.workdir = workdir
        (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.ports = [free_port() for _ in certificates]
        client = (f"ssl_client_certificate {client_ca}; ssl_verify_client optional;"
                  if client_ca else "")
        servers = "\n".join(f"""
            server {{
                listen 127.0.0.1:{port} ssl;
                ssl_certificate {cert};
                ssl_certificate_key {key};
                {client}
                location = / {{ default_type application/json; return 200 '{Nginx.BODY}'; }}
                location = /headers {{ default_type text/plain; return 200 "sni=$ssl_server_name
                    client=$ssl_client_s_dn conn=$connection host=$http_host
                    xproto=$http_x_forwarded_proto"; }}
            }}""" for port, (cert, key) in zip(self.ports, certificates, strict=True))
        config = textwrap.dedent(f"""
            user root;
            worker_processes 1;
            daemon off;
            pid {workdir}/nginx.pid;
            error_log {workdir}/error.log warn;
            events {{ worker_connections 1024; }}
            http {{
                access_log off;
                client_body_temp_path {workdir}/tmp/client_body;
                proxy_temp_path {workdir}/tmp/proxy;
                fastcgi_temp_path {workdir}/tmp/fastcgi;
                uwsgi_temp_path {workdir}/tmp/uwsgi;
                scgi_temp_path {workdir}/tmp/scgi;
                keepalive_requests 100000;
                {servers}
            }}
        """)
        self.config = workdir / "nginx.conf"
        self.config.write_text(config)
        self.process = subprocess.Popen([NGINX, "-c", str(self.config), "-p", str(workdir)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for port in self.ports:
            wait_for_port(port, process=self.process)

    def address(self, index: int = 0) -> str:
        return f"127.0.0.1:{self.ports[index]}"

    def stop(self) -> None:
        stop(self.process)
