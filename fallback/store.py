"""Mailboxes in Redis: the atomic delivery of a message, and reading it back.

A message is one hash (`mbx:{addr}:m:<id>`) holding the exact bytes in `raw`
plus small display metadata, indexed in one sorted set per folder.  Delivery
to every recipient is one MULTI/EXEC: it either all happened or none did,
which is what lets the receiver answer 250.  Metadata is parsed from the
headers only for display; the raw bytes are never rewritten.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from typing import Any

import redis
import redis.asyncio as aioredis

from fallback import keys

INBOX, SENT, TRASH = "INBOX", "Sent", "Trash"
FOLDERS = (INBOX, SENT, TRASH)
SEEN, FLAGGED, ANSWERED, FORWARDED = "\\Seen", "\\Flagged", "\\Answered", "$Forwarded"
SUMMARY_FIELDS = ("folder", "flags", "ts", "size", "from", "to", "subject", "date", "attach", "kind")
_HEADER_LIMIT = 512  # display metadata is truncated: the raw bytes keep everything


@dataclass(frozen=True)
class Delivery:
    """One message for one mailbox."""

    address: str
    mailstore: str
    folder: str = INBOX
    flags: tuple[str, ...] = ()
    kind: str = "received"


def _header(msg: Message, name: str) -> str:
    try:
        value = msg.get(name)
        text = "" if value is None else str(value)
    except Exception:  # malformed header: display falls back to the raw text
        raw = msg.get_all(name, failobj=[])
        text = str(raw[0]) if raw else ""
    return " ".join(text.split())[:_HEADER_LIMIT]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def summarize(raw: bytes) -> dict[str, str]:
    """Display metadata parsed from the headers; never raises on malformed input."""
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[: end + 4]
    msg = BytesHeaderParser(policy=default_policy).parsebytes(head)
    ctype = _header(msg, "Content-Type").lower()
    has_attach = ctype.startswith("multipart/mixed") or b"attachment;" in raw[:1_000_000].lower()
    return {
        "from": _header(msg, "From"),
        "to": _header(msg, "To"),
        "cc": _header(msg, "Cc"),
        "subject": _header(msg, "Subject"),
        "date": _header(msg, "Date"),
        "msgid": _header(msg, "Message-ID"),
        "attach": "1" if has_attach else "0",
    }


def queue_delivery(pipe: Any, d: Delivery, msg_id: str, raw: bytes, meta: dict[str, str],
                   now_ms: int) -> None:
    """Queue one mailbox's writes on a (sync or async) MULTI pipeline."""
    fields: dict[str, Any] = {
        "v": keys.SCHEMA_VERSION, "raw": raw, "folder": d.folder, "flags": " ".join(d.flags),
        "ts": now_ms, "size": len(raw), "kind": d.kind, "rstate": "pending", **meta,
    }
    pipe.hset(keys.message(d.address, msg_id), mapping=fields)
    pipe.zadd(keys.folder(d.address, d.folder), {msg_id: now_ms})
    if SEEN not in d.flags:
        pipe.sadd(keys.unseen(d.address), msg_id)
    pipe.sadd(keys.pending(d.address), msg_id)
    pipe.hincrby(keys.info(d.address), "messages", 1)
    pipe.hincrby(keys.info(d.address), "bytes", len(raw))
    pipe.hset(keys.info(d.address), "mailstore", d.mailstore)
    pipe.hincrby(keys.stats_shard(d.address), f"{d.mailstore}\tmessages", 1)
    pipe.hincrby(keys.stats_shard(d.address), f"{d.mailstore}\tbytes", len(raw))


async def deliver_async(r: aioredis.Redis, deliveries: list[Delivery], msg_id: str, raw: bytes,
                        meta: dict[str, str] | None = None) -> None:
    """Write the message to every recipient in one MULTI/EXEC; raises on any failure."""
    meta = summarize(raw) if meta is None else meta
    now_ms = int(time.time() * 1000)
    async with r.pipeline(transaction=True) as pipe:
        for d in deliveries:
            queue_delivery(pipe, d, msg_id, raw, meta, now_ms)
        await pipe.execute()


def deliver(r: redis.Redis, deliveries: list[Delivery], msg_id: str, raw: bytes,
            meta: dict[str, str] | None = None) -> None:
    """The same atomic write from sync code (the webmail's local delivery and Sent copy)."""
    meta = summarize(raw) if meta is None else meta
    now_ms = int(time.time() * 1000)
    with r.pipeline(transaction=True) as pipe:
        for d in deliveries:
            queue_delivery(pipe, d, msg_id, raw, meta, now_ms)
        pipe.execute()


def received_header(msg_id: str, hostname: str, helo: str, peer_ip: str, rdns: str | None,
                    protocol: str, recipient: str | None) -> bytes:
    """Our trace line; carries the unique id that reconcile searches for after a crash."""
    helo = _sanitize(helo) or "unknown"
    client = f"{helo} ({_sanitize(rdns) + ' ' if rdns else ''}[{_sanitize(peer_ip)}])"
    line = f"Received: from {client}\r\n\tby {_sanitize(hostname)} (fallback) with {protocol} id {msg_id}"
    if recipient:
        line += f"\r\n\tfor <{_sanitize(recipient)}>"
    line += f"; {email.utils.formatdate(localtime=False)}\r\n"
    return line.encode("ascii")


def _sanitize(text: str | None) -> str:
    """Client-supplied names go into a header: printable ASCII only, no CR/LF, bounded."""
    if not text:
        return ""
    return "".join(ch if 33 <= ord(ch) < 127 and ch not in "()<>;" else "?" for ch in text)[:200]


class MailboxReader:
    """Sync reads of one mailbox (export, webmail, status)."""

    def __init__(self, r: redis.Redis, address: str) -> None:
        self.r = r
        self.address = address

    def count(self, folder: str) -> int:
        return int(self.r.zcard(keys.folder(self.address, folder)))

    def ids(self, folder: str, start: int = 0, stop: int = -1, newest_first: bool = True) -> list[str]:
        key = keys.folder(self.address, folder)
        raw = (self.r.zrevrange(key, start, stop) if newest_first
               else self.r.zrange(key, start, stop))
        return [i.decode() for i in raw]  # type: ignore[union-attr]

    def raw(self, msg_id: str) -> bytes | None:
        return self.r.hget(keys.message(self.address, msg_id), "raw")  # type: ignore[return-value]

    def meta(self, msg_id: str) -> dict[str, str] | None:
        fields = self.r.hgetall(keys.message(self.address, msg_id))
        if not fields:
            return None
        return {k.decode(): v.decode("utf-8", "replace")  # type: ignore[union-attr]
                for k, v in fields.items() if k != b"raw"}

    def iter_messages(self, folders: tuple[str, ...] = FOLDERS,
                      batch: int = 100) -> Iterator[tuple[str, dict[str, str], bytes]]:
        """(id, metadata, raw) in receive order, folder by folder, pipelined in batches."""
        for name in folders:
            ids = self.ids(name, newest_first=False)
            for start in range(0, len(ids), batch):
                chunk = ids[start : start + batch]
                pipe = self.r.pipeline(transaction=False)
                for msg_id in chunk:
                    pipe.hgetall(keys.message(self.address, msg_id))
                for msg_id, fields in zip(chunk, pipe.execute(), strict=True):
                    if not fields:
                        continue  # deleted between the index read and now
                    raw = fields.pop(b"raw", b"")
                    meta = {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()}
                    yield msg_id, meta, raw

    def info(self) -> dict[str, int]:
        fields = self.r.hgetall(keys.info(self.address))
        return {k.decode(): int(v) for k, v in fields.items()
                if k in (b"messages", b"bytes")}


def mailstore_stats(r: redis.Redis) -> dict[str, dict[str, int]]:
    """messages and bytes per mailstore, summed over the stats shards."""
    pipe = r.pipeline(transaction=False)
    for n in range(keys.STATS_SHARDS):
        pipe.hgetall(keys.stats_shard_n(n))
    out: dict[str, dict[str, int]] = {}
    for shard in pipe.execute():
        for field, value in shard.items():
            mailstore, _, what = field.decode().partition("\t")
            bucket = out.setdefault(mailstore, {"messages": 0, "bytes": 0})
            bucket[what] = bucket.get(what, 0) + int(value)
    return out


def set_flags(r: redis.Redis, address: str, msg_id: str, add: tuple[str, ...] = (),
              remove: tuple[str, ...] = ()) -> bool:
    """Change a message's flags; marks it for reconcile.  False when the message is gone."""
    key = keys.message(address, msg_id)
    with r.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(key)
                current = pipe.hget(key, "flags")
                if current is None:
                    pipe.reset()
                    return False
                flags = [f for f in _text(current).split() if f not in remove]
                flags += [f for f in add if f not in flags]
                pipe.multi()
                pipe.hset(key, "flags", " ".join(flags))
                if SEEN in flags:
                    pipe.srem(keys.unseen(address), msg_id)
                else:
                    pipe.sadd(keys.unseen(address), msg_id)
                # Reconcile carries flag changes made after a message was appended.
                pipe.sadd(keys.pending(address), msg_id)
                pipe.execute()
                return True
            except redis.WatchError:
                continue


def move(r: redis.Redis, address: str, msg_id: str, folder: str) -> bool:
    """Move a message between folders (delete = move to Trash); marks it for reconcile."""
    if folder not in FOLDERS:
        raise ValueError(f"unknown folder {folder!r}")
    key = keys.message(address, msg_id)
    with r.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(key)
                current = pipe.hget(key, "folder")
                if current is None:
                    pipe.reset()
                    return False
                old = _text(current)
                ts = pipe.hget(key, "ts") or b"0"
                pipe.multi()
                pipe.hset(key, "folder", folder)
                pipe.zrem(keys.folder(address, old), msg_id)
                pipe.zadd(keys.folder(address, folder), {msg_id: int(ts)})
                pipe.sadd(keys.pending(address), msg_id)
                pipe.execute()
                return True
            except redis.WatchError:
                continue
