"""A real etcd 3.4 (/usr/bin/etcd) for tests: one member, a temp data dir, free loopback
client and peer ports. `stop()` then `start()` restarts it on the same ports and data, as
an operator restarting etcd would. Helpers talk to its JSON gRPC gateway, like the store."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from harness import free_port, stop, wait_for_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Etcd:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "etcd-data"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def url(self, prefix: str = "") -> str:
        """The gateway's `--store` URL."""
        return f"etcd://{self.address}{prefix}"

    def start(self) -> None:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = (self.workdir / "etcd.log").open("ab")
        self.process = subprocess.Popen(
            [ETCD, "--name", "test", "--data-dir", str(self.data_dir),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"test={peer}", "--log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for_port(self.client_port, timeout=20, process=self.process)
        deadline = time.monotonic() + 20
        while True:  # the port opens before the member can serve: wait for a range
            try:
                self.call("/v3/kv/range", {"key": _b64("/")})
                return
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(f"http://{self.address}{path}",
                                         data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def put(self, key: str, value: Any) -> int:
        """Put a value (JSON-encoded unless it is already bytes/str); returns the revision."""
        raw = value if isinstance(value, str | bytes) else json.dumps(value)
        text = raw.decode() if isinstance(raw, bytes) else raw
        reply = self.call("/v3/kv/put", {"key": _b64(key), "value": _b64(text)})
        return int(reply["header"]["revision"])

    def get(self, key: str) -> Any:
        reply = self.call("/v3/kv/range", {"key": _b64(key)})
        kvs = reply.get("kvs") or []
        return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None

    def delete(self, key: str) -> int:
        reply = self.call("/v3/kv/deleterange", {"key": _b64(key)})
        return int(reply["header"]["revision"])

    def revision(self) -> int:
        return int(self.call("/v3/kv/range", {"key": _b64("/")})["header"]["revision"])

    def compact(self, revision: int | None = None) -> None:
        """Drop history up to `revision` (default: now): older watches are cancelled."""
        self.call("/v3/kv/compaction", {"revision": str(revision or self.revision()),
                                        "physical": True})
