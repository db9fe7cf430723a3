"""A three-host network built from network namespaces, for tests that need a real kernel path:

    client ──veth── gateway (router) ──veth── server
    10.200.A.2      10.200.A.1 | 10.200.B.1   10.200.B.2
    fd00:200:A::2   fd00:200:A::1 | fd00:200:B::1   fd00:200:B::2

Each rig gets unique namespace names (`sg-<pid>-<n>-client|gateway|server`, pid = the test
process) and its own subnets; the veths are created directly inside the namespaces (nothing
appears in the root namespace), and `close()` stops every process the rig started and
deletes the namespaces, which takes their veths with them. Only addresses inside these
namespaces are ever used.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import select
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

PREFIX = "sg-"
ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
# The gateway-side programs (install/remove/status, transparent relays).
GATEWAY_PROGRAM = Path(__file__).resolve().parent / "gateway.py"
_serial = itertools.count()

UDP_ECHO = textwrap.dedent("""
    import socket, sys
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", int(sys.argv[1])))
    while True:
        data, peer = sock.recvfrom(65535)
        host = peer[0].removeprefix("::ffff:")
        sock.sendto(b"echo " + data + b" seen-from=" + host.encode(), peer)
""")


class Namespace:
    """One network namespace; commands run in it with `ip netns exec`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], check: bool = True, timeout: float = 20.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.command(argv), capture_output=True, text=True,
                                timeout=timeout, input=input, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"in {self.name}: {' '.join(argv)} exited "
                                 f"{result.returncode}: {result.stderr.strip()}")
        return result

    def popen(self, argv: list[str], **options: Any) -> subprocess.Popen[str]:
        options.setdefault("stdout", subprocess.PIPE)
        options.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(self.command(argv), text=True, **options)

    def python(self, code: str, *args: str, check: bool = True, timeout: float = 20.0
               ) -> subprocess.CompletedProcess[str]:
        return self.run([PYTHON, "-c", code, *args], check=check, timeout=timeout)

    def sysctl(self, key: str, value: str | int) -> None:
        # /proc/sys inside the namespace is the namespace's own (KERNEL.md).
        self.run(["sh", "-c", f"echo {value} > /proc/sys/{key.replace('.', '/')}"])

    def wait_listening(self, port: int, proto: str = "tcp", timeout: float = 10.0,
                       process: subprocess.Popen[str] | None = None) -> None:
        flag = "-Hltn" if proto == "tcp" else "-Hlun"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise AssertionError(f"process exited with {process.returncode} before "
                                     f"listening on {proto}/{port} in {self.name}: "
                                     f"{process.stderr.read() if process.stderr else ''}")
            if self.run(["ss", flag, f"sport = :{port}"], check=False).stdout.strip():
                return
            time.sleep(0.02)
        raise AssertionError(f"nothing listening on {proto}/{port} in {self.name}")


def stop(process: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdout, process.stderr, process.stdin):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def read_line(process: subprocess.Popen[str], timeout: float = 10.0) -> str:
    """The next stdout line of a process started with `Namespace.popen` (text mode)."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output within {timeout}s")
    line = process.stdout.readline()
    if not line:
        err = process.stderr.read() if process.stderr else ""
        raise AssertionError(f"process ended (code {process.wait()}): {err.strip()}")
    return line.rstrip("\n")


class Rig:
    """client — gateway — server, v4 and v6, default routes via the gateway, forwarding on
    in the gateway. Build with `Rig(workdir)`; always `close()` (the fixture does)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        serial = next(_serial)
        tag = f"{PREFIX}{os.getpid()}-{serial}"
        self.client = Namespace(f"{tag}-client")
        self.gateway = Namespace(f"{tag}-gateway")
        self.server = Namespace(f"{tag}-server")
        self.namespaces = (self.client, self.gateway, self.server)
        # Two /24s per rig, unique within this test process. Never 0: `fd00:200:0::2` is
        # not the canonical form tools print back (`fd00:200::2`).
        a = 2 + (os.getpid() * 2 + serial * 2) % 248
        b = a + 1
        self.client_v4, self.gateway_client_v4 = f"10.200.{a}.2", f"10.200.{a}.1"
        self.server_v4, self.gateway_server_v4 = f"10.200.{b}.2", f"10.200.{b}.1"
        self.client_v6, self.gateway_client_v6 = f"fd00:200:{a}::2", f"fd00:200:{a}::1"
        self.server_v6, self.gateway_server_v6 = f"fd00:200:{b}::2", f"fd00:200:{b}::1"
        # Interface names live inside the namespaces only.
        self.client_if, self.gateway_client_if = "eth0", "to-client"
        self.server_if, self.gateway_server_if = "eth0", "to-server"
        self.processes: list[subprocess.Popen[Any]] = []
        self.created: list[Namespace] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "add", ns.name], check=True, capture_output=True)
            self.created.append(ns)
            ns.run(["ip", "link", "set", "lo", "up"])
        self._link(self.client, self.client_if, self.gateway, self.gateway_client_if)
        self._link(self.server, self.server_if, self.gateway, self.gateway_server_if)
        gw = self.gateway
        for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
            gw.sysctl(key, 1)
        self._address(self.client, self.client_if, self.client_v4, self.client_v6)
        self._address(gw, self.gateway_client_if, self.gateway_client_v4,
                      self.gateway_client_v6)
        self._address(gw, self.gateway_server_if, self.gateway_server_v4,
                      self.gateway_server_v6)
        self._address(self.server, self.server_if, self.server_v4, self.server_v6)
        for ns, via4, via6 in ((self.client, self.gateway_client_v4, self.gateway_client_v6),
                               (self.server, self.gateway_server_v4, self.gateway_server_v6)):
            ns.run(["ip", "route", "add", "default", "via", via4])
            ns.run(["ip", "-6", "route", "add", "default", "via", via6])

    @staticmethod
    def _link(left: Namespace, left_if: str, right: Namespace, right_if: str) -> None:
        # Created inside both namespaces at once: no veth name ever exists in the root ns.
        subprocess.run(["ip", "link", "add", "name", left_if, "netns", left.name, "type",
                        "veth", "peer", "name", right_if, "netns", right.name],
                       check=True, capture_output=True)

    @staticmethod
    def _address(ns: Namespace, ifname: str, v4: str, v6: str) -> None:
        ns.run(["ip", "addr", "add", f"{v4}/24", "dev", ifname])
        ns.run(["ip", "-6", "addr", "add", f"{v6}/64", "dev", ifname, "nodad"])
        ns.run(["ip", "link", "set", ifname, "up"])

    # -- servers ----------------------------------------------------------------------

    def start_nginx(self, port: int = 80) -> subprocess.Popen[str]:
        """nginx in the server namespace on `port` (v4 and v6); every answer's body is
        `server=<address it was reached at> remote=<address it saw the client at>`."""
        workdir = self.workdir / f"nginx-{self.server.name}"
        (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        config = workdir / "nginx.conf"
        config.write_text(textwrap.dedent(f"""
            user root;
            worker_processes 1;
            daemon off;
            master_process on;
            pid {workdir}/nginx.pid;
            error_log {workdir}/error.log warn;
            events {{ worker_connections 1024; }}
            http {{
                access_log {workdir}/access.log;
                client_body_temp_path {workdir}/tmp/client_body;
                proxy_temp_path {workdir}/tmp/proxy;
                fastcgi_temp_path {workdir}/tmp/fastcgi;
                uwsgi_temp_path {workdir}/tmp/uwsgi;
                scgi_temp_path {workdir}/tmp/scgi;
                server {{
                    listen {port};
                    listen [::]:{port} ipv6only=on;
                    location / {{ default_type text/plain;
                                 return 200 "server=$server_addr remote=$remote_addr\\n"; }}
                }}
            }}
        """))
        process = self.server.popen([NGINX, "-c", str(config), "-p", str(workdir)],
                                    stdout=subprocess.DEVNULL)
        self.processes.append(process)
        self.server.wait_listening(port, process=process)
        return process

    def start_udp_echo(self, port: int) -> subprocess.Popen[str]:
        """A UDP echo server in the server namespace (v4 and v6): answers
        `echo <data> seen-from=<client address as the server saw it>`."""
        process = self.server.popen([PYTHON, "-c", UDP_ECHO, str(port)],
                                    stdout=subprocess.DEVNULL)
        self.processes.append(process)
        self.server.wait_listening(port, "udp", process=process)
        return process

    def start_in(self, ns: Namespace, argv: list[str]) -> subprocess.Popen[str]:
        """A long-running process in `ns`, stopped by `close()`."""
        process = ns.popen(argv)
        self.processes.append(process)
        return process

    # -- teardown ---------------------------------------------------------------------

    def close(self) -> None:
        for process in reversed(self.processes):
            stop(process)
        self.processes.clear()
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
        self.created.clear()

    def leftovers(self) -> list[str]:
        """Namespaces or links of this rig still present (should be none after close)."""
        names = {ns.name for ns in self.namespaces}
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True,
                                text=True).stdout.split()
        left = [name for name in listed if name in names]
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True,
                               text=True).stdout
        for ifname in {self.gateway_client_if, self.gateway_server_if}:
            if f": {ifname}@" in links or f": {ifname}:" in links:
                left.append(f"link {ifname} in the root namespace")
        return left


def sweep_stale() -> list[str]:
    """Delete rig namespaces whose creating test process is gone (it was killed before its
    fixtures could clean up). Names carry that process's pid: `sg-<pid>-<n>-<host>`."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    swept = []
    for line in listed.splitlines():
        found = re.fullmatch(rf"{PREFIX}(\d+)-(\d+-(client|gateway|server)|probe)",
                             line.split(" ", 1)[0])
        if found and not Path(f"/proc/{found.group(1)}").exists():
            subprocess.run(["ip", "netns", "del", found.group(0)], capture_output=True)
            swept.append(found.group(0))
    return swept


def missing_support() -> str | None:
    """Why namespace tests cannot run here (the exact reason), or None when they can: root,
    the tools, and nftables TPROXY in a throwaway namespace."""
    if os.geteuid() != 0:
        return "network-namespace tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    for tool in ("ip", "nft", "curl", "ss"):
        if shutil.which(tool) is None:
            return f"the {tool} command is not installed"
    if not Path(NGINX).exists():
        return "nginx is not installed (make test installs it)"
    probe = Namespace(f"{PREFIX}{os.getpid()}-probe")
    created = subprocess.run(["ip", "netns", "add", probe.name], capture_output=True,
                             text=True)
    if created.returncode != 0:
        return f"cannot create a network namespace: {created.stderr.strip()}"
    try:
        result = probe.run(["nft", "-f", "-"], check=False, input=(
            "table inet probe {\n chain p {\n type filter hook prerouting priority mangle\n"
            " meta l4proto tcp meta nfproto ipv4 socket transparent 1"
            " tproxy ip to :1 meta mark set 1 accept\n }\n}\n"))
        if result.returncode != 0:
            error = next((line for line in result.stderr.splitlines() if "Error" in line),
                         result.stderr.strip())
            return f"this kernel refuses an nftables TPROXY rule: {error}"
    finally:
        subprocess.run(["ip", "netns", "del", probe.name], capture_output=True)
    return None
