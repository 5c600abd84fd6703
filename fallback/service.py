"""`fallback up`: every component on one machine, started in order and stopped in reverse.

The embedded Redis (when no URL is configured) starts first and stops last,
so no component ever loses its store while it still holds a transaction.
Components are small objects with async `start` (returning a line for the
banner) and `stop`; the webmail and the outbound worker plug in the same way
as the SMTP receiver.

The demo mailbox (demo@example.com / demo) lives here too, with the rules
that keep it off real systems: `--demo` runs only with a Redis and listen
addresses on this machine, and a real start refuses while the demo mailbox
exists in its Redis (`demo_refusal`, `demo_mailbox_refusal`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import redis.asyncio as aioredis

from fallback import keys
from fallback.config import Settings, redact_url, settings_env
from fallback.config.redisurl import parse_topology
from fallback.embedded import EmbeddedRedis
from fallback.errors import ConfigError
from fallback.intake.receiver import ReceiverServer
from fallback.mailbox import directory, passwords
from fallback.maillog import MailLog
from fallback.ops import metrics
from fallback.ops.trace import TraceBuffer
from fallback.queues.forward import ForwardComponent
from fallback.redisconn import async_client, sync_client
from fallback.webserver import WebComponent

log = logging.getLogger(__name__)

DEMO_ADDRESS = "demo@example.com"
DEMO_PASSWORD = "demo"  # noqa: S105 - the demo mailbox's documented password
PARENT_ENV = "FALLBACK_INTERNAL_PARENT_PID"  # set for the receivers a receiver starts (smtp_workers)


def _loopback(host: str) -> bool:
    """Literal loopback addresses and localhost only: no DNS lookup (it can hang in an outage)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def redis_is_local(url: str) -> bool:
    """A unix socket, or every host the URL names is a loopback address."""
    if url.partition("://")[0] == "unix":
        return True
    topology = parse_topology(url)
    if topology is not None:
        return all(_loopback(host) for host, _ in topology.nodes)
    host = urllib.parse.urlsplit(url).hostname
    return host is None or _loopback(host)  # no host: redis-py connects to localhost


def demo_refusal(s: Settings) -> str | None:
    """Why --demo must not run with these settings (one line), or None.  The demo mailbox has a
    published password: it must neither land in a real Redis nor be reachable from elsewhere."""
    if s.redis_url and not redis_is_local(s.redis_url):
        return (f"--demo: redis_url {redact_url(s.redis_url)} is not on this machine; the demo mailbox "
                f"({DEMO_ADDRESS} / {DEMO_PASSWORD}) must never exist on a real Redis")
    for name in ("smtp_host", "http_host"):
        host = str(getattr(s, name))
        if not _loopback(host):
            every = host.strip() in ("", "0.0.0.0", "::", "[::]")  # noqa: S104 - named, not bound
            why = "listens on every interface" if every else "is not a loopback address"
            return (f"--demo: {name} {host or repr(host)} {why}; the demo mailbox ({DEMO_ADDRESS} / "
                    f"{DEMO_PASSWORD}) must only be reachable from this machine: use 127.0.0.1")
    return None


def demo_mailbox_refusal(url: str) -> str | None:
    """Why a real (non-demo) start must not run on this Redis: the demo mailbox is in it."""
    r = sync_client(url)
    try:
        buckets = int(r.hget(keys.DIR_META, "buckets") or 0)
        found = bool(buckets) and directory.Directory(r, buckets).get(DEMO_ADDRESS) is not None
    finally:
        r.close()
    if not found:
        return None
    return (f"the demo mailbox {DEMO_ADDRESS} (password {DEMO_PASSWORD}) exists in this Redis; "
            f"remove it before a real start: fallback mailbox remove {DEMO_ADDRESS} --force "
            "(or run with --demo, on this machine only)")


def check_demo_settings(s: Settings) -> None:
    """Refuse (ConfigError, one line) to run --demo off this machine."""
    if s.demo and (why := demo_refusal(s)):
        raise ConfigError(why)


def check_no_demo_mailbox(s: Settings, url: str) -> None:
    """Refuse (ConfigError, one line) a real start on a Redis that holds the demo mailbox."""
    if not s.demo and (why := demo_mailbox_refusal(url)):
        raise ConfigError(why)


class Component(Protocol):
    name: str

    async def start(self) -> str: ...

    async def stop(self) -> None: ...


@dataclass
class SmtpComponent:
    settings: Settings
    r: aioredis.Redis
    buckets: int
    url: str = ""
    name: str = "smtp"
    server: ReceiverServer | None = None
    # What the receiver logs is counted for /metrics, and added to Redis every few seconds.
    counters: metrics.Counters | None = None
    flusher: asyncio.Task[None] | None = None
    # More receiver processes on the same port (SO_REUSEPORT): one process is one core.
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    async def start(self) -> str:
        self.counters = metrics.Counters(self.settings.metrics_flush_interval,
                                         trace=TraceBuffer.for_settings(self.settings, "intake"))
        maillog = MailLog(counters=metrics.MailCounters(self.counters))
        processes = self.settings.smtp_workers or os.cpu_count() or 1
        reuse = processes > 1 or self.settings.smtp_reuse_port
        self.server = ReceiverServer(self.settings, self.r, self.buckets, maillog, reuse_port=reuse)
        port = await self.server.start()
        self.flusher = asyncio.create_task(self.counters.run_async(self.r))
        if processes > 1:
            # The children bind the port this process got (even when it asked for port 0).
            child = replace(self.settings, smtp_port=port, smtp_workers=1, smtp_reuse_port=True,
                            redis_url=self.url or self.settings.redis_url)
            env = {**os.environ, **settings_env(child), PARENT_ENV: str(os.getpid())}
            for _ in range(processes - 1):
                self.children.append(subprocess.Popen(
                    [sys.executable, "-m", "fallback", "smtp"], env=env, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL))
            pids = ", ".join(str(p) for p in [os.getpid(), *(c.pid for c in self.children)])
            return f"SMTP receiver on {self.settings.smtp_host}:{port} ({processes} processes: {pids})"
        return f"SMTP receiver on {self.settings.smtp_host}:{port}"

    async def stop(self) -> None:
        for child in self.children:  # they finish their own transactions on SIGTERM
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        if self.server is not None:
            await self.server.stop()
        for child in self.children:
            try:
                await asyncio.to_thread(child.wait, 40)
            except subprocess.TimeoutExpired:
                child.kill()
                await asyncio.to_thread(child.wait)
        if self.flusher is not None:  # after the server: the last messages' counts go too
            self.flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.flusher


@dataclass
class WorkerComponent:
    """The outbound worker; without a smarthost it stays idle and sent mail waits in the queue."""

    settings: Settings
    r: aioredis.Redis
    name: str = "worker"
    worker: Any = None

    async def start(self) -> str:
        if not self.settings.smarthost:
            return "outbound worker: off (no --smarthost); sent mail waits in the queue"
        from fallback.queues.worker import Worker

        mail, counters = metrics.mail_counting(self.settings.metrics_flush_interval,  # for /metrics
                                               TraceBuffer.for_settings(self.settings, "outbound"))
        self.worker = Worker(self.settings, self.r, mail=mail, counters=counters)
        return str(await self.worker.start())

    async def stop(self) -> None:
        if self.worker is not None:
            await self.worker.stop()


@dataclass
class Service:
    settings: Settings
    extra: list[Component] = field(default_factory=list)
    embedded: EmbeddedRedis | None = None
    components: list[Component] = field(default_factory=list)
    # Which built-in components run: all for `fallback up`, one for `fallback smtp` (scaled out).
    roles: tuple[str, ...] = ("smtp", "worker", "forward", "web")

    def _redis_url(self) -> str:
        if self.settings.redis_url:
            return self.settings.redis_url
        self.embedded = EmbeddedRedis(self.settings.data_dir, self.settings.redis_server,
                                      self.settings.redis_maxmemory)
        return self.embedded.start()

    def provision_demo(self, url: str) -> None:
        r = sync_client(url)
        try:
            d = directory.Directory(r, directory.ensure_buckets(r, self.settings.directory_buckets))
            found = d.get(DEMO_ADDRESS) is not None
            others = d.count() - (1 if found else 0)
            if others > 0:  # real users: a real Redis, even on this machine
                raise ConfigError(
                    f"--demo: this Redis already holds {others} other provisioned mailbox(es), so it is "
                    f"a real one; the demo mailbox ({DEMO_ADDRESS} / {DEMO_PASSWORD}) must never exist "
                    "on a real Redis: use another --data-dir")
            if not found:
                stored = passwords.hash_password(DEMO_PASSWORD, self.settings.password_scheme)
                d.put(directory.Mailbox(DEMO_ADDRESS, directory.DEFAULT_MAILSTORE, stored))
        finally:
            r.close()

    def _forward(self, r: aioredis.Redis) -> ForwardComponent:
        mail, counters = metrics.mail_counting(self.settings.metrics_flush_interval,  # for /metrics
                                               TraceBuffer.for_settings(self.settings, "forward"))
        return ForwardComponent(self.settings, r, mail=mail, counters=counters)

    async def run(self, stop_event: asyncio.Event | None = None) -> None:
        if self.settings.hostname is None:
            # gethostname, not getfqdn: a DNS lookup can hang during the very outage we serve.
            self.settings = replace(self.settings, hostname=socket.gethostname())
        check_demo_settings(self.settings)
        url = self._redis_url()
        try:
            if self.embedded is not None:
                print(f"fallback: {self.embedded.summary()}", flush=True)
            if self.settings.demo:
                self.provision_demo(url)
            elif {"smtp", "web"} & set(self.roles):  # they take mail and logins; a worker does not
                check_no_demo_mailbox(self.settings, url)
            r = async_client(url)
            buckets = await directory.ensure_buckets_async(r, self.settings.directory_buckets)
            makers: dict[str, Callable[[], Component]] = {
                "smtp": lambda: SmtpComponent(self.settings, r, buckets, url),
                "worker": lambda: WorkerComponent(self.settings, r),
                "forward": lambda: self._forward(r),
                "web": lambda: WebComponent(self.settings, url)}
            self.components = [makers[role]() for role in self.roles] + self.extra
            await self._serve(stop_event or asyncio.Event())
            await r.aclose()
        finally:
            if self.embedded is not None:
                self.embedded.stop()

    async def _serve(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        started: list[Component] = []
        try:
            for component in self.components:
                line = await component.start()
                started.append(component)
                print(f"fallback: {line}", flush=True)
            if self.settings.demo:
                print(f"fallback: demo mailbox {DEMO_ADDRESS} password {DEMO_PASSWORD}", flush=True)
            print("fallback: ready (Ctrl-C or SIGTERM to stop)", flush=True)
            await stop.wait()
            print("fallback: stopping", flush=True)
        finally:
            for component in reversed(started):
                try:
                    await component.stop()
                except Exception:
                    log.exception("stopping %s", component.name)
