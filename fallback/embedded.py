"""The embedded redis-server that `fallback up` runs when no Redis URL is given.

It is configured for the 250-means-durable rule (AOF, fsync on every write,
no eviction), listens on loopback only with a random password, and keeps its
data under the data dir.  A small state file in the data dir lets the other
subcommands (`status`, `export`, ...) find it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from fallback.errors import ConfigError, StorageError

STATE_FILE = "embedded-redis.json"


def _state_path(data_dir: Path) -> Path:
    return Path(data_dir) / STATE_FILE


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_url(data_dir: Path) -> str | None:
    """URL of the embedded Redis running for this data dir, if there is one."""
    try:
        state = json.loads(_state_path(data_dir).read_text())
    except (OSError, ValueError):
        return None
    if not _pid_alive(int(state.get("pid", 0))):
        return None
    return str(state["url"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    def __init__(self, data_dir: Path, binary: str = "redis-server",
                 maxmemory: str | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.binary = binary
        self.maxmemory = maxmemory
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 20.0) -> str:
        binary = shutil.which(self.binary)
        if binary is None:
            raise ConfigError(
                f"{self.binary} not found: install Redis (make run does: apt-get install "
                "redis-server) or give --redis-url"
            )
        running = find_url(self.data_dir)
        if running is not None:
            raise ConfigError(
                f"an embedded Redis is already running for {self.data_dir}; "
                "is another `fallback up` using this data dir?"
            )
        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        password = secrets.token_urlsafe(24)
        conf = redis_dir / "redis.conf"
        lines = [
            "bind 127.0.0.1",
            f"port {port}",
            f'dir "{redis_dir}"',
            f'logfile "{redis_dir / "redis.log"}"',
            "daemonize no",
            # 250 means durable: the AOF is fsynced before any write is acknowledged.
            "appendonly yes",
            "appendfsync always",
            "maxmemory-policy noeviction",
            # Directory buckets hold up to a few hundred records of ~100 bytes each;
            # these keep them listpack-encoded (see docs/architecture.md).
            "hash-max-listpack-entries 1024",
            "hash-max-listpack-value 256",
            f"requirepass {password}",
            'save ""',
        ]
        if self.maxmemory:
            lines.append(f"maxmemory {self.maxmemory}")
        conf.write_text("\n".join(lines) + "\n")
        conf.chmod(0o600)
        self.process = subprocess.Popen(
            [binary, str(conf)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True,
        )
        self.url = f"redis://:{password}@127.0.0.1:{port}/0"
        self._wait_ready(timeout)
        state = _state_path(self.data_dir)
        state.write_text(json.dumps({"url": self.url, "pid": self.process.pid}))
        state.chmod(0o600)
        return self.url

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                log = self.data_dir / "redis" / "redis.log"
                raise StorageError(
                    f"embedded redis-server exited with {self.process.returncode}: "
                    f"{err.strip() or 'see ' + str(log)}"
                )
            try:
                # LOADING means it is still replaying the AOF after a crash: wait.
                client.ping()
                return
            except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                time.sleep(0.05)
        self.stop()
        raise StorageError(f"embedded redis-server did not answer within {timeout:.0f}s")

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        with contextlib.suppress(OSError):
            _state_path(self.data_dir).unlink()
        if self.process.poll() is None:
            # SIGTERM makes redis-server fsync the AOF and exit cleanly.
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
