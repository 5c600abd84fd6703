"""The embedded redis-server that `fallback up` runs when no Redis URL is given.

It is configured for the 250-means-durable rule (AOF, fsync on every write,
no eviction), listens on loopback only with a random password, and keeps its
data under the data dir.  A small state file in the data dir lets the other
subcommands (`status`, `export`, ...) find it.

Its maxmemory defaults to half of the machine's memory: MemTotal, or the
cgroup's memory limit when that is lower (a container), so that the
receiver's memory reserve (452 4.3.1 before Redis is full) has something to
be a share of, and Redis refuses writes with an error rather than being
killed by the kernel.  The other half is for the webmail, the receivers and
the page cache.
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
MEMORY_SHARE = 0.5  # of the machine's (or the cgroup's) memory, when redis_maxmemory is unset
NO_CGROUP_LIMIT = 1 << 60  # cgroup v1 spells "no limit" as a huge number


def _cgroup_limits(cgroup_root: Path, self_cgroup: Path) -> list[int]:
    """Memory limits of this process's cgroup (v2 memory.max, v1 memory.limit_in_bytes), at the
    mount root (what a container sees as its own) and at the path /proc/self/cgroup names."""
    paths = [cgroup_root / "memory.max", cgroup_root / "memory" / "memory.limit_in_bytes"]
    try:
        for line in self_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            rel = path.lstrip("/")
            if controllers == "":
                paths.append(cgroup_root / rel / "memory.max")
            elif "memory" in controllers.split(","):
                paths.append(cgroup_root / "memory" / rel / "memory.limit_in_bytes")
    except (OSError, ValueError):
        pass
    limits = []
    for candidate in paths:
        try:
            value = candidate.read_text().strip()
        except OSError:
            continue
        if value.isdigit() and 0 < int(value) < NO_CGROUP_LIMIT:
            limits.append(int(value))
    return limits


def machine_memory(meminfo: Path = Path("/proc/meminfo"), cgroup_root: Path = Path("/sys/fs/cgroup"),
                   self_cgroup: Path = Path("/proc/self/cgroup")) -> tuple[int, str] | None:
    """(bytes, "RAM" or "the cgroup memory limit") this process may use; None when unknown."""
    total = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        total = None
    limits = _cgroup_limits(cgroup_root, self_cgroup)
    if limits and (total is None or min(limits) < total):
        return min(limits), "the cgroup memory limit"
    return (total, "RAM") if total else None


def human_bytes(n: int) -> str:
    """1.5 GiB, 300.0 MiB, 12.0 KiB, 100 bytes: how the banner and `fallback check` show sizes."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def choose_maxmemory(configured: str | None, memory: tuple[int, str] | None) -> tuple[str, str]:
    """(maxmemory for redis.conf, the words the banner says about it)."""
    if configured is not None and configured.strip():
        value = configured.strip()
        if value == "0":
            return "0", "0 (no limit, redis_maxmemory 0)"
        return value, f"{value} (redis_maxmemory)"
    if memory is None:
        return "0", "0 (no limit: the machine's memory is unknown; set --redis-maxmemory)"
    total, source = memory
    share = int(total * MEMORY_SHARE)
    return str(share), f"{human_bytes(share)} ({MEMORY_SHARE * 100:.0f} % of {source})"


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
        self.maxmemory, self.maxmemory_text = choose_maxmemory(maxmemory, machine_memory())
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

    def summary(self) -> str:
        """The banner line: what protects accepted mail in this Redis."""
        return (f"embedded Redis: maxmemory {self.maxmemory_text}, noeviction, appendfsync always, "
                f"data in {self.data_dir / 'redis'}")

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
