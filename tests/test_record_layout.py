"""Message records stored by older releases (layouts 1 and 2) read like new ones (layout 3).

Layout 1 is written here by hand, field for field as the code before issue 17
wrote it (delivery.queue_delivery then): `v`="1", `raw` as received, one field
per display and threading value, `rstate`="pending", `flags` always.  Layout 2
likewise (issue 17's first step): `raw` in the hash, maybe zstd, the display values
packed in `m` with "2" first, defaults left out.  Layout 3 keeps the bytes in a key
of their own (record.raw_key).  Every reader must give the same answers for the old
ones as for a layout-3 record of the same message, and every delete must leave no
bytes behind: the store's reads (webmail list and message pages, search,
conversations), export, reconcile into a real Dovecot (byte for byte), the
outbound worker sending a Sent copy to a real smarthost.
"""

from __future__ import annotations

import base64
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from fallback import ids, keys
from fallback.mailbox import (
    compression,
    delivery,
    drafts,
    expunge,
    fields,
    headers,
    purge,
    record,
    store,
    threads,
)
from fallback.ops import export
from fallback.queues import delayed, outbound
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


def _write_old(r: redis.Redis, address: str, msg_id: str, record: dict[Any, Any], size: int,
               folder: str, flags: tuple[str, ...], now_ms: int) -> None:
    """An old layout's record with its index entries, as the code of that layout wrote them."""
    with r.pipeline(transaction=True) as pipe:
        pipe.hset(keys.message(address, msg_id), mapping=record)
        pipe.zadd(keys.folder(address, folder), {msg_id: now_ms})
        if fields.SEEN not in flags:
            pipe.sadd(keys.unseen(address), msg_id)
        pipe.sadd(keys.pending(address), msg_id)
        pipe.hincrby(keys.info(address), "messages", 1)
        pipe.hincrby(keys.info(address), "bytes", size)
        pipe.hset(keys.info(address), "mailstore", "default")
        pipe.execute()


def write_layout1(r: redis.Redis, address: str, msg_id: str, raw: bytes, folder: str = fields.INBOX,
                  flags: tuple[str, ...] = (), kind: str = "received") -> None:
    """A record exactly as the code before issue 17 stored it, with its index entries."""
    now_ms = int(time.time() * 1000)
    old: dict[Any, Any] = {"v": "1", "raw": raw, "folder": folder, "flags": " ".join(flags), "ts": now_ms,
                           "size": len(raw), "kind": kind, "rstate": "pending", **headers.summarize(raw)}
    _write_old(r, address, msg_id, old, len(raw), folder, flags, now_ms)


def write_layout2(r: redis.Redis, address: str, msg_id: str, raw: bytes, folder: str = fields.INBOX,
                  flags: tuple[str, ...] = (), kind: str = "received") -> None:
    """A record exactly as issue 17's layout 2 stored it (the bytes inside the hash)."""
    now_ms = int(time.time() * 1000)
    meta = headers.summarize(raw)
    packed = "\0".join(["2", *(meta.get(name, "").replace("\0", "") for name in fields.PARSED)])
    two: dict[Any, Any] = {"raw": compression.codec().pack(raw), "size": len(raw), "m": packed,
                           "ts": now_ms, "folder": folder}
    if flags:
        two["flags"] = " ".join(flags)
    if kind != "received":
        two["kind"] = kind
    _write_old(r, address, msg_id, two, len(raw), folder, flags, now_ms)


def orphans(r: redis.Redis) -> list[bytes]:
    """Stored bytes (layout 3) whose record is gone, found by SCAN (bounded: a test's keys)."""
    found = list(r.scan_iter(match="mbx:*:r:*", count=1000))
    assert len(found) < 100_000
    return [k for k in found if not r.exists(k.replace(b":r:", b":m:"))]


def body(words: int) -> bytes:
    return b"".join(b"Line %d of a message that says much the same thing again.\r\n" % n
                    for n in range(words))


def test_old_and_new_records_read_alike_everywhere(r: redis.Redis, mailboxes: list[str], client: Any,
                                                  tmp_path: Path) -> None:
    old_id, old_raw = message(ALICE, "Budget from the old release", body=body(200),
                              extra=b"In-Reply-To: <root@remote.test>\r\n")
    new_id, new_raw = message(ALICE, "Re: Budget from the old release", body=body(200),
                              extra=b"In-Reply-To: <root@remote.test>\r\n")
    two_id, two_raw = message(ALICE, "Re: Re: Budget from the old release", body=body(200),
                              extra=b"In-Reply-To: <root@remote.test>\r\n")
    write_layout1(r, ALICE, old_id, old_raw)
    write_layout2(r, ALICE, two_id, two_raw)
    delivery.deliver(r, [delivery.Delivery(ALICE, "default")], new_id, new_raw)
    new_fields = r.hgetall(keys.message(ALICE, new_id))
    assert b"v" in r.hgetall(keys.message(ALICE, old_id)) and b"v" not in new_fields
    assert b"raw" not in new_fields and b"raw" in r.hgetall(keys.message(ALICE, two_id))
    own = r.get(record.raw_key(keys.message(ALICE, new_id)))
    assert isinstance(own, bytes) and own.startswith(compression.MAGIC)  # the new one is compressed
    assert b"flags" not in new_fields and b"rstate" not in new_fields  # defaults not stored
    assert r.object("encoding", keys.message(ALICE, new_id)) == b"listpack"  # what layout 3 is for

    reader = store.MailboxReader(r, ALICE)
    old_meta, two_meta, new_meta = reader.meta(old_id), reader.meta(two_id), reader.meta(new_id)
    assert old_meta is not None and two_meta is not None and new_meta is not None
    assert ((old_meta[fields.VERSION], two_meta[fields.VERSION], new_meta[fields.VERSION])
            == ("1", "2", fields.RECORD_VERSION) == ("1", "2", "3"))
    for name in (fields.FROM, fields.TO, fields.ATTACH, fields.INREPLYTO, fields.KIND, fields.FOLDER,
                 fields.FLAGS, fields.RSTATE):
        assert old_meta[name] == new_meta[name] == two_meta[name], name
    assert new_meta[fields.SUBJECT] == "Re: " + old_meta[fields.SUBJECT]
    assert two_meta[fields.SUBJECT] == "Re: Re: " + old_meta[fields.SUBJECT]
    assert (reader.raw(old_id), reader.raw(two_id), reader.raw(new_id)) == (old_raw, two_raw, new_raw)
    wanted = {old_id: old_raw, two_id: two_raw, new_id: new_raw}
    for msg_id, raw, meta in ((old_id, old_raw, old_meta), (two_id, two_raw, two_meta),
                              (new_id, new_raw, new_meta)):
        found = reader.message(msg_id)
        assert found is not None and found[1] == raw
        assert {k: found[0][k] for k in meta} == meta  # the page's read: the same values
    assert {i: raw for i, _, raw in reader.iter_messages()} == wanted
    assert reader.raw("NO-SUCH-ID") is None and reader.message("NO-SUCH-ID") is None

    total, rows, _ = store.list_page(r, ALICE, fields.INBOX, 0, 50)
    assert total == 3
    assert {row["id"]: row[fields.SUBJECT] for row in rows} == {
        old_id: "Budget from the old release", new_id: "Re: Budget from the old release",
        two_id: "Re: Re: Budget from the old release"}
    assert store.search(r, ALICE, fields.INBOX, "budget", 0, 10)[0] == 3
    threads.catch_up(r, ALICE)
    assert set(threads.conversation(r, ALICE, new_id)[0]) == {old_id, two_id, new_id}

    export.write_maildir(reader, tmp_path / "out")
    files = sorted(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == sorted(wanted.values())

    log_in_as(client, ALICE)
    inbox = client.get("/folder/inbox").text
    assert "Budget from the old release" in inbox and "Re: Budget from the old release" in inbox
    page = client.get(f"/message/{old_id}").text
    assert "Budget from the old release" in page and "Conversation" in page
    # The conversation's snippets come from every layout's bytes (record.LUA's raw_head).
    assert page.count('<span class="snippet">Line 0 of a message') == 3  # all three rows
    for msg_id, raw in wanted.items():
        assert client.get(f"/message/{msg_id}/source").data == raw
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
    big = base64.encodebytes(random.Random(9).randbytes(300_000)).replace(b"\n", b"\r\n")  # in pieces
    texts = (body(3), body(400), "Grüße \r\n".encode() * 300 + b"\xff\xfe\r\n", b"", body(50), body(900),
             big, big, big)
    for n, text in enumerate(texts):
        msg_id, raw = message(ALICE, f"reconcile {n}", body=text)
        if n % 3 == 1:
            write_layout1(r, ALICE, msg_id, raw)
        elif n % 3 == 2:
            write_layout2(r, ALICE, msg_id, raw)
        else:
            delivery.deliver(r, [delivery.Delivery(ALICE, "default")], msg_id, raw)
        wanted[msg_id] = raw
    stored = [record.read_stored(r, keys.message(ALICE, i)) or b"" for i in wanted]
    # Layouts 2 and 3 are compressed (not the short one: under MIN_SIZE), layout 1 is as it was;
    # only layout 3 has a key of its own.
    assert [v.startswith(compression.MAGIC) for v in stored] == [True, False, True, False, False, True,
                                                                 True, False, True]
    assert [r.exists(record.raw_key(keys.message(ALICE, i))) for i in wanted] == [1, 0, 0, 1, 0, 0, 1, 0, 0]
    assert r.type(record.raw_key(keys.message(ALICE, list(wanted)[6]))) == b"hash"  # pieces
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
    for n in range(3):
        msg_id = ids.new_id()
        raw = (f"From: Alice <{SENDER}>\r\nTo: bob@remote.test\r\nSubject: out {n}\r\n\r\n".encode()
               + body(300))
        outbound.submit(r, sender=SENDER, mailstore="default", recipients=["bob@remote.test"], raw=raw,
                        msg_id=msg_id)
        copy = store.MailboxReader(r, SENDER).raw(msg_id)
        assert copy is not None
        if n == 0:  # rewrite the Sent copy as the old release stored it
            meta = store.MailboxReader(r, SENDER).meta(msg_id) or {}
            r.delete(keys.message(SENDER, msg_id), record.raw_key(keys.message(SENDER, msg_id)))
            old: dict[Any, Any] = {
                "v": "1", "raw": copy, "folder": fields.SENT, "flags": fields.SEEN, "ts": meta[fields.TS],
                "size": len(copy), "kind": "sent", "rstate": "pending", **headers.summarize(copy)}
            r.hset(keys.message(SENDER, msg_id), mapping=old)
        elif n == 1:  # and as layout 2 stored it: the bytes (zstd) back inside the hash
            key = keys.message(SENDER, msg_id)
            r.hset(key, fields.RAW, r.get(record.raw_key(key)) or b"")
            r.delete(record.raw_key(key))
            assert (record.read_stored(r, key) or b"").startswith(compression.MAGIC)
        else:
            value = record.read_stored(r, keys.message(SENDER, msg_id))
            assert isinstance(value, bytes) and value.startswith(compression.MAGIC)
        sent[msg_id] = copy
    workers(smarthost=smarthost(sink.port))
    wait_for(lambda: all(set(states(r, i).values()) == {"delivered"} for i in sent), what="delivery")
    bodies = sorted(sink_payload(d)[1] for d in sink.messages())
    assert bodies == sorted(raw.replace(b"\r\n", b"\n") for raw in sent.values())
    assert record.raw_of(None) is None


def test_every_delete_takes_the_bytes_of_every_layout(r: redis.Redis, mailboxes: list[str]) -> None:
    """Expunge, purge, a sent draft's delete and undo send leave no stored bytes behind (SCAN),
    whichever layout the record has; what is not deleted keeps its bytes."""
    writers: tuple[Callable[..., None], ...] = (
        write_layout1, write_layout2,
        lambda r, a, i, raw: delivery.deliver(r, [delivery.Delivery(a, "default")], i, raw))
    made: dict[str, bytes] = {}
    for layout, write in enumerate(writers, start=1):
        for what in ("expunge", "purge", "keep"):
            msg_id, raw = message(ALICE, f"{what} layout {layout}", body=body(60))
            write(r, ALICE, msg_id, raw)
            made[f"{what}{layout}"] = raw
            made[msg_id] = raw
            if what == "expunge":
                assert store.move(r, ALICE, msg_id, fields.TRASH)
                assert expunge.expunge(r, ALICE, [msg_id]).deleted == 1
            elif what == "purge":  # as reconcile leaves it: done, off the work list
                r.hset(keys.message(ALICE, msg_id), mapping={fields.RSTATE: fields.DONE, fields.RTS: 1})
                r.srem(keys.pending(ALICE), msg_id)
                assert purge.delete_reconciled(r, ALICE, [msg_id], int(time.time() * 1000)) == (1, len(raw))
            else:
                assert store.MailboxReader(r, ALICE).raw(msg_id) == raw
    draft_id = ids.new_id()
    drafts.save(r, ALICE, "default", draft_id, b"Subject: draft\r\n\r\n" + body(40), {"to": ""})
    assert r.exists(record.raw_key(keys.message(ALICE, draft_id)))
    assert drafts.delete(r, ALICE, draft_id)
    undo_id = ids.new_id()
    due = time.time() + 600
    outbound.submit(r, sender=ALICE, mailstore="default", recipients=["bob@remote.test"],
                    raw=b"From: <alice@example.com>\r\nSubject: undo\r\n\r\n" + body(40), msg_id=undo_id,
                    not_before=due, extra={delayed.UNDO: due,
                                           **delayed.later_fields([], [], b"", 0, {}, "", 0)})
    assert r.exists(record.raw_key(keys.message(ALICE, undo_id)))
    undone = delayed.undo(r, ALICE, undo_id)
    assert undone is not None and undone.body.endswith(body(40))
    assert orphans(r) == []
    gone = [k for k in r.scan_iter(match=keys.mbx(ALICE) + ":m:*", count=1000)]
    kept = {i: raw for i, _, raw in store.MailboxReader(r, ALICE).iter_messages()}
    assert sorted(kept.values()) == sorted(made[f"keep{n}"] for n in (1, 2, 3))  # nothing else lost
    assert len(gone) == 3  # the three kept records
    assert r.exists(keys.message_raw(ALICE, next(i for i, raw in kept.items() if raw == made["keep3"])))
    assert store.MailboxReader(r, ALICE).info()["messages"] == 3
