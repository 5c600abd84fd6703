"""Message records stored by an older release (layout 1) read like new ones (layout 2).

Layout 1 is written here by hand, field for field as the code before issue 17
wrote it (delivery.queue_delivery then): `v`="1", `raw` as received, one field
per display and threading value, `rstate`="pending", `flags` always.  Every
reader must give the same answers for it as for a layout-2 record of the same
message: the store's reads (webmail list and message pages, search,
conversations), export, reconcile into a real Dovecot (byte for byte), the
outbound worker sending a Sent copy to a real smarthost.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from fallback import ids, keys
from fallback.mailbox import compression, delivery, fields, headers, record, store, threads
from fallback.ops import export
from fallback.queues import outbound
from tests.dovecot import DovecotServer
from tests.reconcile_helpers import message, reconcile_settings, run_engine
from tests.servers import sink_payload, wait_for
from tests.test_outbound import (  # noqa: F401 - fixtures
    SENDER,
    out_settings,
    sinks,
    smarthost,
    states,
    workers,
)
from tests.test_reconcile_binary import stored_files
from tests.webutil import log_in_as

ALICE = "alice@example.com"


def write_layout1(r: redis.Redis, address: str, msg_id: str, raw: bytes, folder: str = fields.INBOX,
                  flags: tuple[str, ...] = (), kind: str = "received") -> None:
    """A record exactly as the code before issue 17 stored it, with its index entries."""
    now_ms = int(time.time() * 1000)
    with r.pipeline(transaction=True) as pipe:
        old: dict[Any, Any] = {"v": "1", "raw": raw, "folder": folder, "flags": " ".join(flags), "ts": now_ms,
                               "size": len(raw), "kind": kind, "rstate": "pending", **headers.summarize(raw)}
        pipe.hset(keys.message(address, msg_id), mapping=old)
        pipe.zadd(keys.folder(address, folder), {msg_id: now_ms})
        if fields.SEEN not in flags:
            pipe.sadd(keys.unseen(address), msg_id)
        pipe.sadd(keys.pending(address), msg_id)
        pipe.hincrby(keys.info(address), "messages", 1)
        pipe.hincrby(keys.info(address), "bytes", len(raw))
        pipe.hset(keys.info(address), "mailstore", "default")
        pipe.execute()


def body(words: int) -> bytes:
    return b"".join(b"Line %d of a message that says much the same thing again.\r\n" % n
                    for n in range(words))


def test_old_and_new_records_read_alike_everywhere(r: redis.Redis, mailboxes: list[str], client: Any,
                                                  tmp_path: Path) -> None:
    old_id, old_raw = message(ALICE, "Budget from the old release", body=body(200),
                              extra=b"In-Reply-To: <root@remote.test>\r\n")
    new_id, new_raw = message(ALICE, "Re: Budget from the old release", body=body(200),
                              extra=b"In-Reply-To: <root@remote.test>\r\n")
    write_layout1(r, ALICE, old_id, old_raw)
    delivery.deliver(r, [delivery.Delivery(ALICE, "default")], new_id, new_raw)
    new_fields = r.hgetall(keys.message(ALICE, new_id))
    assert b"v" in r.hgetall(keys.message(ALICE, old_id)) and b"v" not in new_fields
    assert record.raw_of(new_fields[b"raw"]) != new_fields[b"raw"]  # the new one is compressed
    assert b"flags" not in new_fields and b"rstate" not in new_fields  # defaults not stored

    reader = store.MailboxReader(r, ALICE)
    old_meta, new_meta = reader.meta(old_id), reader.meta(new_id)
    assert old_meta is not None and new_meta is not None
    assert (old_meta[fields.VERSION], new_meta[fields.VERSION]) == ("1", fields.RECORD_VERSION)
    for name in (fields.FROM, fields.TO, fields.ATTACH, fields.INREPLYTO, fields.KIND, fields.FOLDER,
                 fields.FLAGS, fields.RSTATE):
        assert old_meta[name] == new_meta[name], name
    assert new_meta[fields.SUBJECT] == "Re: " + old_meta[fields.SUBJECT]
    assert (reader.raw(old_id), reader.raw(new_id)) == (old_raw, new_raw)
    for msg_id, raw, meta in ((old_id, old_raw, old_meta), (new_id, new_raw, new_meta)):
        found = reader.message(msg_id)
        assert found is not None and found[1] == raw
        assert {k: found[0][k] for k in meta} == meta  # the page's read: the same values
    assert {i: raw for i, _, raw in reader.iter_messages()} == {old_id: old_raw, new_id: new_raw}

    total, rows, _ = store.list_page(r, ALICE, fields.INBOX, 0, 50)
    assert total == 2
    assert {row["id"]: row[fields.SUBJECT] for row in rows} == {
        old_id: "Budget from the old release", new_id: "Re: Budget from the old release"}
    assert store.search(r, ALICE, fields.INBOX, "budget", 0, 10)[0] == 2
    threads.catch_up(r, ALICE)
    assert set(threads.conversation(r, ALICE, new_id)[0]) == {old_id, new_id}

    export.write_maildir(reader, tmp_path / "out")
    files = sorted(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == sorted([old_raw, new_raw])

    log_in_as(client, ALICE)
    inbox = client.get("/folder/inbox").text
    assert "Budget from the old release" in inbox and "Re: Budget from the old release" in inbox
    page = client.get(f"/message/{old_id}").text
    assert "Budget from the old release" in page and "Conversation" in page
    assert client.get(f"/message/{old_id}/source").data == old_raw
    assert client.get(f"/message/{new_id}/source").data == new_raw
    # Flag changes work on both (the new record has no flags field until now).
    assert store.set_flags(r, ALICE, old_id, add=(fields.SEEN,))
    assert store.set_flags(r, ALICE, new_id, add=(fields.FLAGGED,))
    assert (reader.meta(new_id) or {})[fields.FLAGS] == fields.FLAGGED
    assert (reader.meta(old_id) or {})[fields.FLAGS] == fields.SEEN


def test_old_and_compressed_records_reconcile_byte_for_byte(
        r: redis.Redis, settings: Any, dovecot_factory: Callable[..., DovecotServer],
        tmp_path: Path) -> None:
    server = dovecot_factory([ALICE])
    wanted: dict[str, bytes] = {}
    for n, text in enumerate((body(3), body(400), "Grüße \r\n".encode() * 300 + b"\xff\xfe\r\n",
                              b"")):
        msg_id, raw = message(ALICE, f"reconcile {n}", body=text)
        if n % 2:
            write_layout1(r, ALICE, msg_id, raw)
        else:
            delivery.deliver(r, [delivery.Delivery(ALICE, "default")], msg_id, raw)
        wanted[msg_id] = raw
    stored = [bytes(r.hget(keys.message(ALICE, i), fields.RAW) or b"")  # type: ignore[arg-type]
              for i in wanted]
    # The new-layout ones (0 and 2) are compressed, the old ones stay as they were.
    assert [v.startswith(compression.MAGIC) for v in stored] == [True, False, True, False]
    report = run_engine(reconcile_settings(settings, server, tmp_path), [ALICE])
    assert report.ok, report.as_json()
    assert report.mailboxes[ALICE].appended == len(wanted)
    files = stored_files(server, ALICE)
    assert {i: files.get(i) for i in wanted} == wanted
    states_after = {i: (store.MailboxReader(r, ALICE).meta(i) or {}).get(fields.RSTATE) for i in wanted}
    assert states_after == dict.fromkeys(wanted, fields.DONE)


def test_outbound_sends_old_and_compressed_sent_copies_as_stored(
        r: redis.Redis, sinks: Any, workers: Any) -> None:  # noqa: F811 - the fixtures imported above
    sink = sinks()
    sent: dict[str, bytes] = {}
    for n in range(2):
        msg_id = ids.new_id()
        raw = (f"From: Alice <{SENDER}>\r\nTo: bob@remote.test\r\nSubject: out {n}\r\n\r\n".encode()
               + body(300))
        outbound.submit(r, sender=SENDER, mailstore="default", recipients=["bob@remote.test"], raw=raw,
                        msg_id=msg_id)
        copy = store.MailboxReader(r, SENDER).raw(msg_id)
        assert copy is not None
        if n == 0:  # rewrite the Sent copy as the old release stored it
            meta = store.MailboxReader(r, SENDER).meta(msg_id) or {}
            r.delete(keys.message(SENDER, msg_id))
            old: dict[Any, Any] = {
                "v": "1", "raw": copy, "folder": fields.SENT, "flags": fields.SEEN, "ts": meta[fields.TS],
                "size": len(copy), "kind": "sent", "rstate": "pending", **headers.summarize(copy)}
            r.hset(keys.message(SENDER, msg_id), mapping=old)
        else:
            value = r.hget(keys.message(SENDER, msg_id), fields.RAW)
            assert isinstance(value, bytes) and value.startswith(compression.MAGIC)
        sent[msg_id] = copy
    workers(smarthost=smarthost(sink.port))
    wait_for(lambda: all(set(states(r, i).values()) == {"delivered"} for i in sent), what="delivery")
    bodies = sorted(sink_payload(d)[1] for d in sink.messages())
    assert bodies == sorted(raw.replace(b"\r\n", b"\n") for raw in sent.values())
    assert record.raw_of(None) is None
