"""What TLS costs the gateway: CPU per handshake, and per request on kept-alive connections.

    .venv/bin/python bench/tls_handshake.py                 # 1000 connections, wrk 5 s
    .venv/bin/python bench/tls_handshake.py --connections 300 --duration 2 --no-wrk

Cases, each against one gateway (1 worker) proxying to a plain nginx backend:

- ``plain connect``: a new TCP connection per request (GET, then close), the baseline;
- ``tls13 ecdsa`` / ``tls13 rsa2048`` / ``tls12 ecdsa``: the same with a full TLS handshake
  (ECDSA P-256 or RSA-2048 server certificate; TLS 1.3 or 1.2);
- ``tls13 ecdsa resumed``: TLS 1.3 resuming the previous connection's session (ticket);
- ``plain keep-alive`` / ``tls keep-alive``: wrk -t1 -c10 on kept-alive connections.

Reported: the gateway process's CPU (utime + stime from /proc/PID/stat) per connection or
per request, and connections or requests per second. The client runs in this process (not
pinned); only the gateway's own CPU is counted, so client cost does not pollute the figure,
but on a busy machine the rates are lower. Progress goes to stderr, a Markdown table to
stdout.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from harness import Gateway, Nginx, free_port, wait_for_port  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
REQUEST = b"GET / HTTP/1.1\r\nHost: bench.test\r\nConnection: close\r\n\r\n"


def write_pair(folder: Path, name: str, key: object, sni: str) -> tuple[str, str]:
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sni)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())  # type: ignore[attr-defined]
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(sni)]), False)
            .sign(key, hashes.SHA256()))  # type: ignore[arg-type]
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def connect_loop(port: int, count: int, context: ssl.SSLContext | None, sni: str | None,
                 resume: bool = False) -> None:
    session = None
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=sni, session=session)
        sock.sendall(REQUEST)
        while sock.recv(65536):
            pass
        if resume and context is not None:
            session = sock.session  # type: ignore[attr-defined]
        sock.close()


def client(version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = version
    return context


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--duration", type=int, default=5, help="wrk seconds")
    parser.add_argument("--no-wrk", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        (folder / "nginx").mkdir()
        backend = Nginx(folder / "nginx")
        ecdsa = write_pair(folder, "ecdsa", ec.generate_private_key(ec.SECP256R1()),
                           "ecdsa.test")
        rsa2048 = write_pair(folder, "rsa", rsa.generate_private_key(65537, 2048), "rsa.test")
        https_port = free_port()
        gateway = Gateway(folder, {
            "gateway": {"https_listen": [f"127.0.0.1:{https_port}"]},
            "ssls": [{"cert": ecdsa[0], "key": ecdsa[1], "snis": ["ecdsa.test"]},
                     {"cert": rsa2048[0], "key": rsa2048[1], "snis": ["rsa.test"]}],
            "routes": [{"uri": "/*", "upstream": {"nodes": {backend.address: 1}}}]})
        rows = []
        try:
            wait_for_port(https_port, process=gateway.process)
            pid = gateway.process.pid
            tls13, tls12 = client(ssl.TLSVersion.TLSv1_3), client(ssl.TLSVersion.TLSv1_2)
            cases = [("plain connect", gateway.port, None, None, False),
                     ("tls13 ecdsa", https_port, tls13, "ecdsa.test", False),
                     ("tls13 rsa2048", https_port, tls13, "rsa.test", False),
                     ("tls12 ecdsa", https_port, tls12, "ecdsa.test", False),
                     ("tls13 ecdsa resumed", https_port, tls13, "ecdsa.test", True)]
            for name, port, context, sni, resume in cases:
                connect_loop(port, 50, context, sni, resume)  # warm up
                print(f"{name}...", file=sys.stderr)
                cpu, start = cpu_seconds(pid), time.monotonic()
                connect_loop(port, args.connections, context, sni, resume)
                elapsed, used = time.monotonic() - start, cpu_seconds(pid) - cpu
                rows.append((name, "connection", args.connections / elapsed,
                             used / args.connections * 1e6))
            if not args.no_wrk:
                for name, url in (("plain keep-alive", f"http://127.0.0.1:{gateway.port}/"),
                                  ("tls keep-alive", f"https://127.0.0.1:{https_port}/")):
                    print(f"{name}...", file=sys.stderr)
                    cpu = cpu_seconds(pid)
                    output = subprocess.run(
                        ["wrk", "-t1", "-c10", f"-d{args.duration}s", url],
                        capture_output=True, text=True, check=True).stdout
                    used = cpu_seconds(pid) - cpu
                    total = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
                    rows.append((name, "request", total / args.duration, used / total * 1e6))
        finally:
            gateway.stop()
            backend.stop()
    print("| case | per | rate /s | gateway CPU µs per |")
    print("|---|---|---|---|")
    for name, per, rate, micros in rows:
        print(f"| {name} | {per} | {rate:,.0f} | {micros:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
