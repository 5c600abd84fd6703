"""Real servers for tests: started on free loopback ports, stopped by PID.

Each helper owns one kind of server process.  Fixtures in conftest.py use
them; so do the benchmarks in bench/.
"""

from __future__ import annotations

import os
import random
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


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback port nobody listens on, chosen below the kernel's ephemeral range: a port
    the kernel itself hands out (a server bound to port 0, a client's source port) cannot
    take it between this check and the fixture's own bind."""
    low, _ = _ephemeral_range()
    for _ in range(200):
        port = random.randrange(10000, max(10001, low))
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded range: fall back to the kernel's choice
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
        # No delay before a replica's first sync (default 5 s): a primary killed early in a
        # test must have a replica that already holds its data.
        extra = ["--cluster-enabled", "yes", "--cluster-node-timeout", str(self.node_timeout_ms),
                 "--cluster-config-file", "nodes.conf", "--repl-diskless-sync-delay", "0"]
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
                    if c.cluster("info").get("cluster_state") != "ok":
                        return False
                    info = c.info("replication")
                    if info["role"] == "master" and int(info["connected_slaves"]) < self.replicas:
                        return False
                    if info["role"] == "slave" and info.get("master_link_status") != "up":
                        return False  # still waiting for its first sync
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


class RedisSentinelServers:
    """A primary, `replicas` replicas (`--replicaof`) and `sentinels` Sentinel processes.

    Each node is a durable RedisServer of its own; each Sentinel is
    `redis-server sentinel.conf --sentinel` with a config file it may rewrite.
    A short down-after and failover timeout let a test see a replica promoted
    within a few seconds of its primary being killed.
    """

    def __init__(self, workdir: Path, service: str = "fallback", replicas: int = 1,
                 sentinels: int = 1, down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> None:
        self.workdir = Path(workdir)
        self.service = service
        self.replica_count = replicas
        self.sentinel_count = sentinels
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.nodes: list[RedisServer] = []          # nodes[0] is the first primary
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.sentinel_ports: list[int] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}"

    def start(self) -> RedisSentinelServers:
        # Any node may become the primary; none should wait 5 s before feeding a new replica.
        extra = ["--repl-diskless-sync-delay", "0"]
        primary = RedisServer(self.workdir / "node0", extra=extra).start()
        self.nodes.append(primary)
        for i in range(1, 1 + self.replica_count):
            self.nodes.append(RedisServer(
                self.workdir / f"node{i}",
                extra=[*extra, "--replicaof", "127.0.0.1", str(primary.port)]).start())
        wait_for(lambda: all(self.link_up(n) for n in self.nodes[1:]), 30,
                 "every replica's link to the primary")
        binary = shutil.which("redis-server")
        assert binary is not None  # RedisServer.start has checked
        quorum = self.sentinel_count // 2 + 1
        for i in range(self.sentinel_count):
            port = free_port()
            workdir = self.workdir / f"sentinel{i}"
            workdir.mkdir(parents=True, exist_ok=True)
            conf = workdir / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {workdir}\nlogfile {workdir / 'sentinel.log'}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {primary.port} {quorum}\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.service} {self.replica_count}\n")
            self.sentinels.append(subprocess.Popen([binary, str(conf), "--sentinel"],
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            self.sentinel_ports.append(port)
        wait_for(self.watching, 30, "the Sentinels to know the primary, its replicas and each other")
        return self

    def client(self, node: RedisServer) -> redis.Redis:
        return redis.Redis(port=node.port, socket_connect_timeout=1, socket_timeout=5)

    def link_up(self, node: RedisServer) -> bool:
        c = self.client(node)
        try:
            return bool(c.info("replication").get("master_link_status") == "up")
        except redis.RedisError:
            return False
        finally:
            c.close()

    def ask(self, index: int, *command: str) -> Any:
        """One Sentinel command to the `index`th Sentinel (decoded replies)."""
        c = redis.Redis(port=self.sentinel_ports[index], socket_connect_timeout=1, socket_timeout=5,
                        decode_responses=True)
        try:
            return c.execute_command(*command)
        finally:
            c.close()

    def watching(self) -> bool:
        try:
            for i, proc in enumerate(self.sentinels):
                if proc.poll() is not None:
                    raise RuntimeError(f"Sentinel exited; see {self.workdir}/sentinel{i}/sentinel.log")
                replicas = self.ask(i, "SENTINEL", "REPLICAS", self.service)
                others = self.ask(i, "SENTINEL", "SENTINELS", self.service)
                if len(others) < self.sentinel_count - 1:
                    return False
                up = [r for r in replicas if _flags(r) == {"slave"}]
                if len(up) < self.replica_count:
                    return False
        except redis.RedisError:
            return False
        return True

    def primary_port(self, index: int = 0) -> int:
        """The primary's port as a Sentinel reports it right now."""
        _, port = self.ask(index, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(port)

    def primary(self) -> RedisServer:
        port = self.primary_port()
        return next(n for n in self.nodes if n.port == port)

    def replicas(self) -> list[RedisServer]:
        """Live nodes that are not the current primary."""
        port = self.primary_port()
        return [n for n in self.nodes if n.port != port and n.proc is not None and n.proc.poll() is None]

    def stop(self) -> None:
        for proc in self.sentinels:
            stop_pid(proc)
        for node in self.nodes:
            node.stop()


def _flags(reply: Any) -> set[str]:
    """The flags of one SENTINEL REPLICAS entry (a flat list or a dict, by protocol version)."""
    fields = reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))
    return set(str(fields.get("flags", "")).split(","))
