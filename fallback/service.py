"""`fallback up`: every component on one machine, started in order and stopped in reverse.

The embedded Redis (when no URL is configured) starts first and stops last,
so no component ever loses its store while it still holds a transaction.
Components are small objects with async `start` (returning a line for the
banner) and `stop`; the webmail and the outbound worker plug in the same way
as the SMTP receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import redis.asyncio as aioredis

from fallback.config import Settings, settings_env
from fallback.embedded import EmbeddedRedis
from fallback.intake.receiver import ReceiverServer
from fallback.mailbox import directory, passwords
from fallback.maillog import MailLog
from fallback.ops import metrics
from fallback.queues.forward import ForwardComponent
from fallback.redisconn import async_client, sync_client
from fallback.webserver import WebComponent

log = logging.getLogger(__name__)

DEMO_ADDRESS = "demo@example.com"
DEMO_PASSWORD = "demo"  # noqa: S105 - the demo mailbox's documented password
PARENT_ENV = "FALLBACK_INTERNAL_PARENT_PID"  # set for the receivers a receiver starts (smtp_workers)


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
        self.counters = metrics.Counters(self.settings.metrics_flush_interval)
        maillog = MailLog(counters=metrics.MailCounters(self.counters))
        processes = self.settings.smtp_workers or os.cpu_count() or 1
        reuse = processes > 1 or self.settings.smtp_reuse_port
        self.server = ReceiverServer(self.settings, self.r, self.buckets, maillog, reuse_port=reuse)
        port = await self.server.start()
        self.flusher = asyncio.create_task(self.counters.run_async(self.r))
        if processes > 1:
            # The children bind the port this process got (even when it asked for port 0).
            child = replace(self.settings, smtp_port=port, smtp_workers=1, smtp_reuse_port=True,
                            redis_url=self.url or self.settings.redis_url, demo=False)
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

        self.worker = Worker(self.settings, self.r)
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
        d = directory.Directory(r, directory.ensure_buckets(r, self.settings.directory_buckets))
        if d.get(DEMO_ADDRESS) is None:
            stored = passwords.hash_password(DEMO_PASSWORD, self.settings.password_scheme)
            d.put(directory.Mailbox(DEMO_ADDRESS, directory.DEFAULT_MAILSTORE, stored))
        r.close()

    async def run(self, stop_event: asyncio.Event | None = None) -> None:
        if self.settings.hostname is None:
            # gethostname, not getfqdn: a DNS lookup can hang during the very outage we serve.
            self.settings = replace(self.settings, hostname=socket.gethostname())
        url = self._redis_url()
        try:
            if self.settings.demo:
                self.provision_demo(url)
            r = async_client(url)
            buckets = await directory.ensure_buckets_async(r, self.settings.directory_buckets)
            makers: dict[str, Callable[[], Component]] = {
                "smtp": lambda: SmtpComponent(self.settings, r, buckets, url),
                "worker": lambda: WorkerComponent(self.settings, r),
                "forward": lambda: ForwardComponent(self.settings, r),
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
