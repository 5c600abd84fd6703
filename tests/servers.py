"""Real servers for tests: started on free loopback ports, stopped by PID.

Each helper owns one kind of server process.  Fixtures in conftest.py use
them; so do the benchmarks in bench/.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
POSTFIX_DIR = ROOT / ".tools" / "postfix"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def stop_pid(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


class RedisServer:
    """A durable redis-server (AOF, appendfsync always) in its own directory."""

    def __init__(self, workdir: Path, port: int | None = None, extra: list[str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make test`, which installs it")
        args = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
            "--maxmemory-policy", "noeviction", "--hash-max-listpack-entries", "1024",
            "--hash-max-listpack-value", "256", "--logfile", str(self.workdir / "redis.log"),
            *self.extra,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start; see {self.workdir}/redis.log") from None
                time.sleep(0.05)
        client.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything the AOF does not already hold."""
        if self.proc is not None:
            stop_pid(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)


def postfix_tool(name: str) -> list[str]:
    """Command prefix for Postfix's smtp-source / smtp-sink unpacked by deploy/install-deps.sh."""
    binary = POSTFIX_DIR / "usr" / "sbin" / name
    if not binary.exists():
        raise RuntimeError(f"{binary} missing: run `make test` (deploy/install-deps.sh test)")
    return [str(binary)]


def postfix_env() -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = str(POSTFIX_DIR / "usr" / "lib" / "postfix")
    return env
