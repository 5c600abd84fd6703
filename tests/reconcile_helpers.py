"""Helpers shared by the reconcile tests and the benchmark: stored messages and runs."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis

from fallback import keys
from fallback.config import Settings
from fallback.ids import new_id
from fallback.mailbox import delivery, directory, fields, received
from fallback.reconcile.reconciler import Reconciler
from fallback.reconcile.report import Report
from fallback.redisconn import async_client
from tests.dovecot import MASTER_PASSWORD, MASTER_USER, DovecotServer

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
    fields = r.hgetall(keys.message(address, msg_id))
    return {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items() if k != b"raw"}


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
