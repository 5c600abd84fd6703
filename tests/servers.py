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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
POSTFIX_DIR = ROOT / ".tools" / "postfix"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `pred` (bounded in time) until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


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
                # Another process's server may hold the port we probed as free: make sure
                # the one answering is ours, or suites running side by side share a Redis.
                if int(client.info("server")["process_id"]) != self.proc.pid:
                    raise redis.ConnectionError("another redis-server answers on this port")
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


class SmtpSink:
    """Postfix's smtp-sink on a loopback port; every accepted message dumped to its own file.

    `args` are smtp-sink's own options (e.g. ["-r", "RCPT"] to defer every RCPT,
    ["-f", "RCPT"] to reject it, ["-w", "2"] to wait before answering DATA).
    The dump directory lives under /tmp with mode 0777 because smtp-sink drops
    to `nobody` when started as root.
    """

    def __init__(self, args: list[str] | None = None, port: int | None = None, dump: bool = True) -> None:
        import tempfile

        self.args = args or []
        self.dump_files = dump  # off for benchmarks: writing each message to disk would dominate
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="smtp-sink-"))
        self.dump = self.dir / "dump"
        self.dump.mkdir()
        for d in (self.dir, self.dump):
            d.chmod(0o777)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SmtpSink:
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        dump = ["-d", f"{self.dump}/m."] if self.dump_files else []
        cmd = [*postfix_tool("smtp-sink"), *user, *dump, *self.args,
               f"127.0.0.1:{self.port}", "64"]
        with open(self.dir / "sink.log", "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, env=postfix_env())
        wait_port(self.port)
        time.sleep(0.05)
        if self.proc.poll() is not None:  # the port was taken meanwhile: someone else answered
            raise RuntimeError(f"smtp-sink exited at start; see {self.dir}/sink.log")
        return self

    def messages(self) -> list[bytes]:
        """Dumped messages as the sink saw them: its own X-* and Received: lines, then ours."""
        return [p.read_bytes() for p in sorted(self.dump.iterdir()) if p.is_file()]

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def sink_payload(dump: bytes) -> tuple[list[str], bytes]:
    """(envelope recipients, message as sent, LF line ends) from one smtp-sink dump file."""
    lines = dump.split(b"\n")
    rcpts = [ln.split(b":", 1)[1].strip().strip(b"<>").decode() for ln in lines
             if ln.startswith(b"X-Rcpt-Args:")]
    i = next(n for n, ln in enumerate(lines) if ln.startswith(b"Received: "))
    i += 1
    while i < len(lines) and lines[i].startswith(b"\t"):
        i += 1
    body = b"\n".join(lines[i:])
    # smtp-sink ends each dump with an empty line of its own.
    return [r.split()[0] for r in rcpts], body[:-1] if body.endswith(b"\n\n") else body


class RedisClusterServers:
    """A real Redis Cluster: `primaries` redis-server processes with one replica each.

    Nodes run with `--cluster-enabled yes` on free loopback ports and are joined
    with `redis-cli --cluster create`; a short node timeout lets a test see a
    replica promoted within seconds of its primary being killed.
    """

    def __init__(self, workdir: Path, primaries: int = 3, replicas: int = 1,
                 node_timeout_ms: int = 2000) -> None:
        self.workdir = Path(workdir)
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])

    def start(self) -> RedisClusterServers:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed: run `make test`, which installs it")
        extra = ["--cluster-enabled", "yes", "--cluster-node-timeout", str(self.node_timeout_ms),
                 "--cluster-config-file", "nodes.conf"]
        for i in range(self.primaries * (1 + self.replicas)):
            # The bus port is named: the default (port + 10000) may be taken or out of range.
            bus = ["--cluster-port", str(free_port())]
            self.nodes.append(RedisServer(self.workdir / f"node{i}", extra=extra + bus).start())
        create = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=60)
        if create.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout}{create.stderr}")
        wait_for(self.healthy, 60, "every cluster node to report cluster_state:ok and its replicas")
        return self

    def client(self, node: RedisServer) -> redis.Redis:
        return redis.Redis(port=node.port, socket_connect_timeout=1, socket_timeout=5)

    def healthy(self) -> bool:
        try:
            for node in self.alive():
                c = self.client(node)
                try:
                    if c.cluster("info").get("cluster_state") != "ok":  # type: ignore[union-attr]
                        return False
                    info = c.info("replication")
                    if info["role"] == "master" and int(info["connected_slaves"]) < self.replicas:
                        return False
                finally:
                    c.close()
        except redis.RedisError:
            return False
        return True

    def alive(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def primary_of(self, key: str) -> RedisServer:
        """The node serving `key`'s slot right now (read from CLUSTER NODES of a live node)."""
        c = self.client(self.alive()[0])
        try:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
            lines = c.execute_command("CLUSTER", "NODES")
        finally:
            c.close()
        text = lines.decode() if isinstance(lines, bytes) else str(lines)
        by_port = {n.port: n for n in self.alive()}
        for line in text.splitlines():
            parts = line.split()
            if "master" not in parts[2].split(",") or "fail" in parts[2]:
                continue
            port = int(parts[1].split("@")[0].rpartition(":")[2])
            for span in parts[8:]:
                lo, _, hi = span.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo) and port in by_port:
                    return by_port[port]
        raise AssertionError(f"no live primary serves {key!r} (slot {slot})")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
