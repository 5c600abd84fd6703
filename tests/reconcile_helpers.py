"""Helpers shared by the reconcile tests and the benchmark: stored messages, runs, and a proxy that cuts."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis

from fallback import keys
from fallback.config import Settings
from fallback.ids import new_id
from fallback.mailbox import delivery, directory, fields, received, record
from fallback.reconcile.reconciler import Reconciler
from fallback.reconcile.report import Report
from fallback.redisconn import async_client
from tests.dovecot import MASTER_PASSWORD, MASTER_USER, DovecotServer
from tests.servers import free_port

ID_RE = re.compile(rb"\(fallback\) with \S+ id ([0-9A-Z]{26})")


def message(address: str, subject: str, body: bytes = b"body\r\n", msgid: str | None = "auto",
            extra: bytes = b"") -> tuple[str, bytes]:
    """(id, raw) of a message as the receiver stores it: our Received: line first."""
    msg_id = new_id()
    head = received.received_header(msg_id, "fallback.test", "mx.remote.test", "192.0.2.7", None,
                                 "ESMTP", address)
    mid = f"<{msg_id.lower()}@remote.test>" if msgid == "auto" else msgid
    lines = [b"From: Someone <someone@remote.test>", f"To: {address}".encode(),
             f"Subject: {subject}".encode(), b"Date: Mon, 23 Nov 2026 10:00:00 +0000"]
    if mid:
        lines.append(f"Message-ID: {mid}".encode())
    raw = head + b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n" + body
    return msg_id, raw


def put(r: redis.Redis, address: str, raw: bytes, msg_id: str, folder: str = fields.INBOX,
        flags: tuple[str, ...] = (), kind: str = "received", mailstore: str = "default") -> str:
    delivery.deliver(r, [delivery.Delivery(address, mailstore, folder=folder, flags=flags, kind=kind)],
                  msg_id, raw)
    return msg_id


def reconcile_settings(settings: Settings, server: DovecotServer, tmp: Path, **over: Any) -> Settings:
    pw = tmp / "master-password"
    pw.write_text(MASTER_PASSWORD + "\n")
    return replace(settings, imap_url=server.url, master_user=MASTER_USER, master_password_file=pw,
                   **over)


def run_engine(settings: Settings, addresses: list[str], password: str = MASTER_PASSWORD,
               dry_run: bool = False) -> Report:
    async def go() -> Report:
        r = async_client(settings.redis_url or "")
        try:
            return await Reconciler(settings, r, password, dry_run=dry_run).run(addresses)
        finally:
            await r.aclose()

    return asyncio.run(go())


def cli_args(settings: Settings, *extra: str) -> list[str]:
    return ["reconcile", "--redis-url", settings.redis_url or "", "--imap-url", settings.imap_url or "",
            "--master-user", settings.master_user or "",
            "--master-password-file", str(settings.master_password_file), *extra]


def read_report(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def state(r: redis.Redis, address: str, msg_id: str) -> dict[str, str]:
    return record.decode_mapping(r.hgetall(keys.message(address, msg_id)))[0]  # either layout


def ids_on_disk(server: DovecotServer, address: str) -> list[str]:
    """Our ids in every message file of the user's Maildir (all folders): counts copies."""
    found = []
    root = server.maildirs / address / "Maildir"
    for path in root.rglob("*"):
        if path.is_file() and path.parent.name in ("cur", "new"):
            m = ID_RE.search(path.read_bytes()[:2000])
            if m:
                found.append(m.group(1).decode())
    return found


def provision(r: redis.Redis, settings: Settings, addresses: list[str], mailstore: str = "default") -> None:
    """Directory records without password hashing (reconcile never checks passwords)."""
    d = directory.Directory(r, directory.ensure_buckets(r, settings.directory_buckets))
    d.put_many((directory.Mailbox(a, mailstore, "{PLAIN}unused"), None) for a in addresses)


def put_new(r: redis.Redis, address: str, subject: str, folder: str = fields.INBOX,
            flags: tuple[str, ...] = (), kind: str = "received") -> str:
    """Store a fresh message (see `message`) and return its id."""
    msg_id, raw = message(address, subject)
    return put(r, address, raw, msg_id, folder=folder, flags=flags, kind=kind)


class CuttingProxy:
    """Loopback proxy to Dovecot that breaks the connection once, at the Nth APPEND.

    mode "literal": forwards only the first bytes of that APPEND's message, then closes
    (the server stores nothing).  mode "reply": forwards the whole APPEND but swallows the
    server's OK and closes (the server stored it; the client cannot know).
    """

    def __init__(self, upstream_port: int, nth: int, mode: str) -> None:
        self.upstream_port = upstream_port
        self.nth = nth
        self.mode = mode
        self.port = free_port()
        self.appends = 0
        self.fired = False
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"imap://127.0.0.1:{self.port}"

    def start(self) -> CuttingProxy:
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port), self.loop)
        self.server = fut.result(10)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        armed = asyncio.Event()
        cut = asyncio.Event()

        async def upstream() -> None:   # client -> Dovecot
            while not cut.is_set():
                data = await client_r.read(65536)
                if not data:
                    break
                if b" APPEND " in data and not self.fired:
                    self.appends += 1
                    if self.appends == self.nth:
                        self.fired = True
                        armed.set()
                        if self.mode == "literal":
                            # The command line and 100 bytes of the message, then nothing.
                            end = data.index(b"\r\n", data.index(b" APPEND ")) + 2
                            up_w.write(data[: end + 100])
                            await up_w.drain()
                            await asyncio.sleep(0.2)
                            cut.set()
                            break
                up_w.write(data)
                await up_w.drain()

        async def downstream() -> None:   # Dovecot -> client
            while not cut.is_set():
                data = await up_r.read(65536)
                if not data:
                    break
                if armed.is_set() and self.mode == "reply" and b"APPENDUID" in data:
                    cut.set()   # the OK is swallowed: the message is stored, the client never hears
                    break
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        for w in (client_w, up_w):
            w.close()
