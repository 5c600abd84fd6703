"""Stored messages in zstd (issue 17): byte-exact through the real receiver and every reader.

Two real receivers on one redis-server, one storing with zstd (the default) and
one with `store_compression = off`, get the same messages from smtplib clients
on 127.0.0.2 and 127.0.0.3: tests/data/messages (malformed MIME, bare LF and
CR, 8-bit, header only), a binary attachment, an empty body, compressible text
around compression.MIN_SIZE, random bytes that do not compress.  What
each reader gives back (the store's reads, export, reconcile's read, the
webmail's pages) must be the bytes the uncompressed receiver kept, our own
Received: line aside.  Quotas and usage count the raw size, never the
compressed one.
"""

from __future__ import annotations

import asyncio
import os
import smtplib
from pathlib import Path
from typing import Any

import pytest
import redis

from fallback import keys
from fallback.config import Settings
from fallback.config.checks import validate
from fallback.errors import ConfigError
from fallback.mailbox import compression, delivery, fields, quota, record, store
from fallback.ops import export
from fallback.reconcile.state import Item, MessageStates
from fallback.redisconn import async_client
from tests.webutil import log_in_as

ALICE, BOB = "alice@example.com", "bob@example.com"
DATA = Path(__file__).parent / "data" / "messages"
FULL = "452 4.2.2 Mailbox full, try again later"


def text(n: int) -> bytes:
    """n bytes of compressible mail text (CRLF lines)."""
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    return (line * (n // len(line) + 1))[:n]


def head(subject: str) -> bytes:
    return f"From: Sender <s@remote.test>\r\nTo: {ALICE}\r\nSubject: {subject}\r\n\r\n".encode()


def sized(subject: str, total: int) -> bytes:
    """A compressible message of exactly `total` bytes as sent (before our Received: line)."""
    h = head(subject)
    return h + text(total - len(h) - 2) + b"\r\n"


def attachment() -> bytes:
    blob = os.urandom(3000)  # incompressible binary, sent 8-bit raw in a part
    return (b"From: s@remote.test\r\nTo: alice@example.com\r\nSubject: binary\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
            + text(4000) + b"\r\n--b\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: binary\r\n\r\n" + blob.replace(b"\r", b"").replace(b"\n", b"")
            + b"\r\n--b--\r\n")


def corpus() -> dict[str, bytes]:
    out = {p.name: p.read_bytes() for p in sorted(DATA.glob("*.eml"))}
    out["binary attachment"] = attachment()
    out["empty body"] = head("empty")
    noise = os.urandom(8000).replace(b"\r", b"").replace(b"\n", b"")
    out["random, incompressible"] = head("noise") + b"".join(
        noise[i : i + 76] + b"\r\n" for i in range(0, 6000, 76))
    return out


def send(port: int, source: str, raw: bytes, rcpt: str = ALICE) -> str:
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=30) as s:
        s.ehlo("client.remote.test")
        s.mail("s@remote.test")
        code, reply = s.rcpt(rcpt)
        assert code == 250, reply
        code, reply = s.data(raw)
        return f"{code} {reply.decode()}"


def without_received(raw: bytes) -> bytes:
    """The message after our own (folded, two-line) Received: line."""
    assert raw.startswith(b"Received: ")
    end = raw.index(b"\r\n")
    while raw[end + 2 : end + 3] in (b" ", b"\t"):
        end = raw.index(b"\r\n", end + 2)
    return raw[end + 2 :]


def stored_values(r: redis.Redis, address: str) -> list[bytes]:
    reader = store.MailboxReader(r, address)
    return [record.read_stored(r, keys.message(address, i)) or b""
            for i in reader.ids(fields.INBOX, newest_first=False)]


def reconcile_reads(settings: Settings, address: str, ids: list[str]) -> list[bytes | None]:
    async def go() -> list[bytes | None]:
        client = async_client(settings.redis_url or "")
        try:
            items = [Item(i, fields.INBOX, "", 0, 0, fields.PENDING, "", "", "", None, None) for i in ids]
            return await MessageStates(client).raws(address, items)
        finally:
            await client.aclose()
    return asyncio.run(go())


def test_receiver_stores_zstd_and_every_reader_gives_the_exact_bytes(
        r: redis.Redis, settings: Settings, mailboxes: list[str], receiver_factory: Any, client: Any,
        tmp_path: Path) -> None:
    zstd_rx = receiver_factory()
    plain_rx = receiver_factory(store_compression="off")
    messages = corpus()
    for n, raw in enumerate(messages.values()):
        source = "127.0.0.2" if n % 2 else "127.0.0.3"
        assert send(zstd_rx.port, source, raw).startswith("250 2.0.0")
        # The same message to Bob through the receiver that stores as it came: the reference.
        assert send(plain_rx.port, source, raw, BOB).startswith("250 2.0.0")
    zstd_values, reference = stored_values(r, ALICE), stored_values(r, BOB)
    assert not any(v.startswith(compression.MAGIC) for v in reference)  # off: as received
    reader = store.MailboxReader(r, ALICE)
    zstd_ids = reader.ids(fields.INBOX, newest_first=False)

    names = list(messages)
    compressed = {name for name, v in zip(names, zstd_values, strict=True) if v.startswith(compression.MAGIC)}
    # Compressible mail is compressed, incompressible and tiny mail is not, the magic one always.
    assert {"newsletter.eml", "binary attachment"} <= compressed
    assert "random, incompressible" not in compressed and "empty body" not in compressed

    exported = tmp_path / "maildir"
    export.write_maildir(reader, exported)
    files = {p.read_bytes() for p in exported.rglob("*") if p.is_file()}
    from_reconcile = reconcile_reads(settings, ALICE, zstd_ids)
    by_iter = {i: raw for i, _, raw in reader.iter_messages((fields.INBOX,))}
    log_in_as(client, ALICE)
    for n, (name, msg_id) in enumerate(zip(names, zstd_ids, strict=True)):
        exact = reader.raw(msg_id)
        assert exact is not None
        assert without_received(exact) == without_received(reference[n]), name
        sent = messages[name]
        if b"\n" not in sent.replace(b"\r\n", b"") and b"\r" not in sent.replace(b"\r\n", b""):
            # CRLF mail: what was sent, to the byte (DATA's end adds the last CRLF if missing).
            assert without_received(exact).rstrip(b"\r\n") == sent.rstrip(b"\r\n"), name
        found = reader.message(msg_id)
        assert found is not None and found[1] == exact, name
        assert by_iter[msg_id] == exact and from_reconcile[n] == exact, name
        assert exact in files, name  # export: one file per message, byte for byte
        assert int(reader.meta(msg_id)[fields.SIZE]) == len(exact), name  # type: ignore[index]
        page = client.get(f"/message/{msg_id}/source")
        assert page.status_code == 200
        assert page.data == exact.decode("utf-8", "replace").encode(), name
    # Usage counts the raw bytes of every message, compressed or not.
    assert quota.usage(r, ALICE) == sum(len(reader.raw(i) or b"") for i in zstd_ids)
    assert quota.usage(r, ALICE) > sum(map(len, zstd_values))


def test_compression_starts_exactly_at_min_size(r: redis.Redis, mailboxes: list[str]) -> None:
    under, at = sized("under", compression.MIN_SIZE - 1), sized("at", compression.MIN_SIZE)
    delivery.deliver(r, [delivery.Delivery(ALICE, "default")], "ID-UNDER", under)
    delivery.deliver(r, [delivery.Delivery(ALICE, "default")], "ID-AT", at)
    assert record.read_stored(r, keys.message(ALICE, "ID-UNDER")) == under  # stored as it came
    packed = record.read_stored(r, keys.message(ALICE, "ID-AT")) or b""
    assert packed.startswith(compression.MAGIC) and len(packed) < len(at) // 2
    reader = store.MailboxReader(r, ALICE)
    assert reader.raw("ID-UNDER") == under and reader.raw("ID-AT") == at
    assert quota.usage(r, ALICE) == len(under) + len(at)


def test_saving_under_the_margin_is_stored_as_it_came() -> None:
    noise = os.urandom(4096)
    how = compression.codec()
    assert how.pack(noise) == noise  # zstd would save nothing: no frame
    assert compression.unpack(how.pack(noise)) == noise
    odd = compression.MAGIC + noise  # looks like a frame: always compressed, so never misread
    assert how.pack(odd).startswith(compression.MAGIC) and compression.unpack(how.pack(odd)) == odd
    off = compression.codec(compression.OFF)
    assert off.pack(text(5000)) == text(5000) and compression.unpack(off.pack(odd)) == odd


def test_quota_counts_the_raw_size_not_the_compressed_one(
        r: redis.Redis, settings: Settings, mailboxes: list[str], receiver_factory: Any) -> None:
    raw = sized("quota", 20_000)  # compresses to a few hundred bytes
    rt = receiver_factory(mailbox_quota=0)
    assert send(rt.port, "127.0.0.2", raw).startswith("250")
    cost = quota.usage(r, ALICE)
    assert cost > len(raw)  # the raw size and our Received: line, though Redis holds far less
    assert len(stored_values(r, ALICE)[0]) < cost // 10
    full = receiver_factory(mailbox_quota=2 * cost - 1)  # one byte short of a second copy
    with smtplib.SMTP("127.0.0.1", full.port, source_address=("127.0.0.3", 0), timeout=30) as s:
        s.ehlo("client.remote.test")
        s.mail("s@remote.test")
        assert s.rcpt(ALICE)[0] == 250
        code, reply = s.data(raw)  # no SIZE declared: only the end of DATA can tell
    assert f"{code} {reply.decode()}" == FULL
    assert quota.usage(r, ALICE) == cost  # nothing of the refused message was stored
    reader = store.MailboxReader(r, ALICE)
    kept = [reader.raw(i) or b"" for i in reader.ids(fields.INBOX)]
    assert len(kept) == 1 and kept[0].endswith(raw)


def test_store_compression_setting_is_checked(settings: Settings) -> None:
    from dataclasses import replace
    with pytest.raises(ConfigError) as bad:
        validate(replace(settings, store_compression="lz4"))
    assert str(bad.value) == "store_compression: 'lz4' is not one of zstd, off"
    validate(replace(settings, store_compression="off"))
    assert record.raw_of(None) is None


def test_the_start_of_a_big_compressed_message_reads_from_its_first_block() -> None:
    """conversations' snippet reads only the first BLOCK_STORED stored bytes of a message."""
    big = head("big") + text(600_000) + os.urandom(300_000)
    packed = compression.codec().pack(big)
    assert packed.startswith(compression.MAGIC) and len(packed) > compression.BLOCK_STORED
    assert compression.unpack_prefix(packed[: compression.BLOCK_STORED], 8192) == big[:8192]
    assert compression.unpack_prefix(big, 100) == big[:100]  # stored as it came: a slice
