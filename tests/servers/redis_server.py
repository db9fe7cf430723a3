"""A real redis-server for tests: its own loopback port and temp dir, no persistence.

    server = RedisServerProcess(workdir, password="s3cret")
    server.client().keys("*")   # a redis-py client to look inside
    server.kill()               # Redis gone mid-run (SIGKILL: no goodbye to clients)
    server.start()              # back on the same port, empty
    server.stop()
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import IO, Any

import redis

from harness import free_port, stop, wait_for_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServerProcess:
    """redis-server started on a free loopback port; `kill`/`start` take it away and bring
    it back on the same port (empty: nothing is saved)."""

    def __init__(self, workdir: Path, password: str | None = None,
                 users: list[str] | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        # ACL lines as in redis.conf, e.g. "alice on >pw ~* +@all".
        self.users = users or []
        self.process: subprocess.Popen[Any] | None = None
        self.log_file: IO[bytes] | None = None
        self.start()

    def start(self) -> None:
        config = [f"port {self.port}", "bind 127.0.0.1", "save ''", "appendonly no",
                  f"dir {self.workdir}", "daemonize no", "protected-mode no",
                  *(f"user {line}" for line in self.users)]
        if self.password is not None:
            config.append(f"requirepass {self.password}")
        # A config file rather than arguments: ACL `user` lines only parse from a file.
        config_path = self.workdir / "redis.conf"
        config_path.write_text("\n".join(config) + "\n")
        self.log_file = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen([REDIS_SERVER, str(config_path)],
                                        stdout=self.log_file, stderr=subprocess.STDOUT)
        wait_for_port(self.port, process=self.process)

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password,
                           decode_responses=True, socket_timeout=5)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self._close_log()

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
        self._close_log()

    def _close_log(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
