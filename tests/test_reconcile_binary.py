"""Reconcile of messages IMAP finds hard to carry, and of a Redis connection that breaks under it.

Against the real Dovecot of tests/dovecot.py: a message with NUL bytes goes as a
literal8 (`~{N+}`, RFC 3516 BINARY) and is stored byte for byte; every other
message keeps the plain literal; a server that does not announce BINARY (Dovecot
with `imap_capability` cut down) gets the plain APPEND and the report lists the
messages it gives back changed.  The wire is read through a recording loopback
proxy.  The Redis fault (redis-py issue #4287, a connection closed under a
command) is the one fake: the real client's own send runs on a connection
closed just before it, as the race leaves it.
"""

from __future__ import annotations

import asyncio
import imaplib
import logging
import re
import smtplib
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio.connection

from fallback import keys
from fallback.cli import main
from fallback.mailbox import fields, record
from fallback.ops import metrics
from fallback.reconcile import reconciler
from fallback.reconcile.imap import byte_changes
from fallback.reconcile.state import MessageStates
from tests.dovecot import MASTER_PASSWORD, MASTER_USER, DovecotServer
from tests.reconcile_helpers import (
    cli_args,
    ids_on_disk,
    message,
    put,
    put_new,
    read_report,
    reconcile_settings,
    run_engine,
    state,
)
from tests.servers import free_port, wait_for

ALICE, BOB = "alice@example.com", "bob@example.com"
ID_RE = re.compile(rb"\(fallback\) with \S+ id ([0-9A-Z]{26})")
# Dovecot 2.3's own list after login, less what a test takes away.
FULL = ("IMAP4rev1 LITERAL+ BINARY UIDPLUS MOVE SPECIAL-USE NAMESPACE IDLE ENABLE UNSELECT CHILDREN "
        "LIST-EXTENDED ESEARCH QUOTA")


def without(*names: str) -> str:
    return " ".join(c for c in FULL.split() if c not in names)


# -- the messages -------------------------------------------------------------------------------

MULTIPART = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=BB\r\n",
             b"--BB\r\nContent-Type: text/plain\r\n\r\ntext \x00 with a NUL\r\n"
             b"--BB\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
             b"AAECAwQ=\r\n--BB--\r\n")


def odd_messages(address: str) -> dict[str, tuple[str, bytes]]:
    """name -> (id, raw).  No bare LF: Dovecot stores lines with LF and gives back CRLF."""
    out = {
        "nul body": message(address, "nul body", body=b"before \x00\x00 after\r\n\x00\r\n"),
        "nul header": message(address, "nul header", extra=b"X-Odd: a\x00b\r\n"),
        "nul+bare CR+8bit": message(address, "mixed", body=b"bare\rCR \x00 caf\xc3\xa9 \xff\xfe\r\n"),
        "multipart": message(address, "multipart", extra=MULTIPART[0], body=MULTIPART[1]),
        "bare CR only": message(address, "bare cr", body=b"one\rtwo\r\n"),
        "8bit only": message(address, "8bit", body="Grüße \r\n".encode() + b"\xff\r\n"),
    }
    return out


def stored_files(server: DovecotServer, address: str) -> dict[str, bytes]:
    """Our id -> the exact bytes of its Maildir file, line ends as on the wire (CRLF)."""
    out: dict[str, bytes] = {}
    for path in (server.maildirs / address / "Maildir").rglob("*"):
        if path.is_file() and path.parent.name in ("cur", "new"):
            data = path.read_bytes()
            m = ID_RE.search(data[:2000])
            if m:
                out[m.group(1).decode()] = data.replace(b"\n", b"\r\n")
    return out


def binary_fetch(server: DovecotServer, address: str) -> list[bytes]:
    """FETCH BINARY.PEEK[] of every INBOX message: the bytes, NULs included, for a single-part one."""
    imap = imaplib.IMAP4("127.0.0.1", server.port)
    try:
        imap.login(f"{address}*{MASTER_USER}", MASTER_PASSWORD)
        imap.select("INBOX", readonly=True)
        _, data = imap.uid("FETCH", "1:*", "(BINARY.PEEK[])")
        return [part[1] for part in data if isinstance(part, tuple)]
    finally:
        imap.logout()


class RecordingProxy:
    """Loopback TCP proxy in front of Dovecot that keeps every byte the client sent."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.sent = bytearray()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"imap://127.0.0.1:{self.port}"

    def start(self) -> RecordingProxy:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port), self.loop).result(10)
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def appends(self) -> list[bytes]:
        """The literal marker of each APPEND sent: b"{N+}", b"~{N+}", b"~{N}"..."""
        return re.findall(rb" APPEND \S+ \([^)]*\) \"[^\"]+\" (~?\{\d+\+?\})\r\n", bytes(self.sent))

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep: bool) -> None:
            while data := await src.read(65536):
                if keep:
                    self.sent.extend(data)
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pump(client_r, up_w, True), pump(up_r, client_w, False),
                             return_exceptions=True)


# -- BINARY APPEND -------------------------------------------------------------------------------

@pytest.mark.dovecot
@pytest.mark.parametrize("literal_plus", [True, False], ids=["literal8-plus", "literal8-sync"])
def test_nul_bytes_go_as_literal8_and_are_stored_byte_for_byte(
        r: redis.Redis, settings: Any, dovecot_factory: Callable[..., DovecotServer], tmp_path: Path,
        literal_plus: bool) -> None:
    server = dovecot_factory([ALICE], capabilities=FULL if literal_plus else without("LITERAL+"))
    proxy = RecordingProxy(server.port).start()
    try:
        msgs = odd_messages(ALICE)
        for msg_id, raw in msgs.values():
            put(r, ALICE, raw, msg_id)
        s = replace(reconcile_settings(settings, server, tmp_path), imap_url=proxy.url)
        report = run_engine(s, [ALICE])
    finally:
        proxy.stop()
    a = report.mailboxes[ALICE]
    assert report.ok, report.as_json()
    assert (a.appended, a.failed, a.changed) == (len(msgs), [], [])

    # On the wire: a literal8 for exactly the messages with NUL bytes, in id order.
    plus = "+" if literal_plus else ""
    expected = [(f"~{{{len(raw)}{plus}}}" if b"\0" in raw else f"{{{len(raw)}{plus}}}").encode()
                for _, raw in sorted(msgs.values())]
    assert proxy.appends() == expected
    # In the store: every file byte for byte; and BINARY[] gives the NULs back.
    files = stored_files(server, ALICE)
    assert {i: files.get(i) for i, _ in msgs.values()} == {i: raw for i, raw in msgs.values()}
    singles = {raw for name, (_, raw) in msgs.items() if name != "multipart"}
    assert singles <= set(binary_fetch(server, ALICE))
    assert {state(r, ALICE, i)["rstate"] for i, _ in msgs.values()} == {"done"}


@pytest.mark.dovecot
def test_a_part_the_server_re_encodes_on_binary_append_is_reported(
        r: redis.Redis, settings: Any, dovecot_factory: Callable[..., DovecotServer], tmp_path: Path) -> None:
    """Dovecot stores a `Content-Transfer-Encoding: binary` part sent as literal8 in base64."""
    server = dovecot_factory([ALICE])
    head = (b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: binary\r\n")
    msg_id, raw = message(ALICE, "binary part", extra=head, body=b"\x00\x01\x02 raw \xff\r\n")
    put(r, ALICE, raw, msg_id)
    kept_id = put_new(r, ALICE, "plain")
    report = run_engine(reconcile_settings(settings, server, tmp_path), [ALICE])
    a = report.mailboxes[ALICE]
    assert report.ok and a.appended == 2
    [changed] = a.changed
    stored = stored_files(server, ALICE)[msg_id]
    assert b"Content-Transfer-Encoding: base64" in stored
    assert (changed.id, changed.folder) == (msg_id, fields.INBOX)
    assert changed.reason == (f"NUL bytes: stored, but the main store gives back {len(stored)} bytes for "
                              f"the {len(raw)} sent (it re-encoded or altered the message)")
    assert Counter(ids_on_disk(server, ALICE)) == Counter([msg_id, kept_id])
    assert record.read_raw(r, keys.message(ALICE, msg_id))    # the fallback keeps what it received


# -- a server without BINARY -------------------------------------------------------------------

@pytest.mark.dovecot
def test_without_binary_the_report_lists_the_messages_the_server_changed(
        r: redis.Redis, settings: Any, dovecot_factory: Callable[..., DovecotServer], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    server = dovecot_factory([ALICE, BOB], capabilities=without("BINARY"))
    msgs = odd_messages(ALICE)
    for msg_id, raw in msgs.values():
        put(r, ALICE, raw, msg_id)
    bob = put_new(r, BOB, "for bob")
    s = reconcile_settings(settings, server, tmp_path)
    path = tmp_path / "report.json"
    monkeypatch.setenv("COLUMNS", "400")   # one table row per line
    with caplog.at_level(logging.INFO, logger="fallback.mail"):
        rc = main(cli_args(s, "--user", ALICE, "--user", BOB, "--report", str(path)))
    out = capsys.readouterr()
    assert rc == 0, out.err     # every message is in the main store: nothing is left to do

    with_nul = {name: v for name, v in msgs.items() if b"\0" in v[1]}
    nuls = {name: raw.count(b"\0") for name, (_, raw) in with_nul.items()}
    expected = {msg_id: (f"NUL bytes: stored, but {nuls[name]} NUL byte(s) come back as other bytes: the "
                         "main store does not announce BINARY (RFC 3516), and a plain IMAP literal "
                         "cannot carry NUL")
                for name, (msg_id, _) in with_nul.items()}
    report = read_report(path)
    mine = report["mailboxes"][ALICE]
    assert {c["id"]: c["reason"] for c in mine["changed"]} == expected
    assert {c["folder"] for c in mine["changed"]} == {"INBOX"}
    assert report["mailboxes"][BOB]["changed"] == []
    assert report["totals"]["changed"] == len(with_nul) and report["totals"]["appended"] == len(msgs) + 1
    # What the operator reads: the count, and one problem row per changed message.
    assert re.search(rf"stored changed by the server\s*│\s*{len(with_nul)}\b", out.out)
    for msg_id, reason in expected.items():
        assert re.search(rf"{ALICE}\s*│\s*{msg_id}\s*│\s*{re.escape(reason)}", out.out), out.out
    alerts = [rec.getMessage() for rec in caplog.records if "event=alert" in rec.getMessage()]
    assert len(alerts) == len(with_nul) and all(any(i in a for a in alerts) for i in expected)
    counted = metrics.totals(r)[metrics.MAIL_EVENTS]    # what /metrics shows
    assert counted[(("event", "alert"), ("outcome", ""))] == len(with_nul)

    # Nothing lost, nothing twice: each once in the main store, every copy still here, all done.
    assert Counter(ids_on_disk(server, ALICE)) == Counter(i for i, _ in msgs.values())
    assert Counter(ids_on_disk(server, BOB)) == Counter([bob])
    for msg_id, _ in msgs.values():
        assert record.read_raw(r, keys.message(ALICE, msg_id)) is not None
        assert state(r, ALICE, msg_id)["rstate"] == "done"
    assert main(cli_args(s, "--user", ALICE, "--user", BOB)) == 0
    assert "nothing to reconcile" in capsys.readouterr().out
    assert Counter(ids_on_disk(server, ALICE)) == Counter(i for i, _ in msgs.values())


@pytest.mark.dovecot
def test_a_nul_message_from_smtp_reaches_the_main_store_unchanged(
        r: redis.Redis, settings: Any, mailboxes: list[str], receiver_factory: Any,
        dovecot_factory: Callable[..., DovecotServer], tmp_path: Path) -> None:
    rt = receiver_factory()
    server = dovecot_factory(mailboxes)
    bodies = {ALICE: b"Subject: nul\r\n\r\nzero \x00 byte, caf\xc3\xa9\r\n",
              BOB: b"Subject: plain\r\n\r\nnothing odd\r\n"}
    for n, (rcpt, body) in enumerate(bodies.items()):
        with smtplib.SMTP("127.0.0.1", rt.port, source_address=(f"127.0.0.{n + 2}", 0)) as smtp:
            smtp.sendmail("someone@remote.test", [rcpt], body)
    wait_for(lambda: all(r.zcard(keys.folder(a, fields.INBOX)) for a in bodies), timeout=10)
    report = run_engine(reconcile_settings(settings, server, tmp_path), list(bodies))
    assert report.ok and report.totals()["appended"] == 2 and report.totals()["changed"] == 0
    for address, body in bodies.items():
        [msg_id] = [i.decode() for i in r.zrange(keys.folder(address, fields.INBOX), 0, -1)]
        raw = record.read_raw(r, keys.message(address, msg_id))
        assert isinstance(raw, bytes) and raw.endswith(body)
        assert stored_files(server, address) == {msg_id: raw}


@pytest.mark.parametrize(("sent", "stored", "binary", "expected"), [
    (b"a\0b\r\n", b"a\0b\r\n", False, None),
    (b"a\0b\r\n", b"a\x80b\r\n", True, None),     # BODY[] cannot carry the NUL it stored
    (b"a\0b\r\n", b"a\x80b\r\n", False, "1 NUL byte(s) come back as other bytes: the main store does not "
     "announce BINARY (RFC 3516), and a plain IMAP literal cannot carry NUL"),
    (b"a\0b\r\n", b"ab\r\n", True, "the main store gives back 4 bytes for the 5 sent (it re-encoded or "
     "altered the message)"),
    (b"a\0b\r\n", b"a\0c\r\n", True,
     "the main store changed the message's bytes (first difference at byte 2)"),
    (b"\0" + b"x" * 70000 + b"y", b"\x80" + b"x" * 70000 + b"z", True,
     "the main store changed the message's bytes (first difference at byte 70001)"),
])
def test_byte_changes_says_what_the_server_did(sent: bytes, stored: bytes, binary: bool,
                                               expected: str | None) -> None:
    assert byte_changes(sent, stored, binary) == expected


# -- a Redis connection closed under a call (redis-py issue #4287) --------------------------------

class ClosedUnderSend:
    """Closes the Redis connection just before the next `times` sends once armed, as the race does.

    redis-py's own send then runs on the closed connection and raises, from its own
    frame, `AttributeError: 'NoneType' object has no attribute 'writelines'`.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, times: int) -> None:
        self.left = times
        self.armed = False
        self.fired = 0
        real_send = redis.asyncio.connection.AbstractConnection._send_packed_command
        real_record = MessageStates.record

        async def send(conn: Any, command: Any) -> None:
            if self.armed and self.left > 0:
                self.left -= 1
                self.fired += 1
                conn._close()
            await real_send(conn, command)

        async def record(states: MessageStates, address: str, entries: Any) -> None:
            entries = list(entries)
            # The `done` records after the APPENDs: losing them would leave the messages `appending`.
            if any(e.fields.get(fields.RSTATE) == fields.DONE for e in entries):
                self.armed = True
            await real_record(states, address, entries)

        monkeypatch.setattr(redis.asyncio.connection.AbstractConnection, "_send_packed_command", send)
        monkeypatch.setattr(MessageStates, "record", record)


@pytest.mark.dovecot
@pytest.mark.parametrize("breaks", [1, reconciler.REDIS_TRIES - 1])
def test_a_redis_connection_closed_under_a_call_is_retried_and_the_mailbox_completes_once(
        r: redis.Redis, settings: Any, dovecot: DovecotServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, breaks: int) -> None:
    ids = [put_new(r, ALICE, f"m{n}") for n in range(5)]
    bob = [put_new(r, BOB, f"b{n}") for n in range(2)]
    fault = ClosedUnderSend(monkeypatch, times=breaks)
    with caplog.at_level(logging.WARNING, logger="fallback.reconcile.reconciler"):
        report = run_engine(reconcile_settings(settings, dovecot, tmp_path, reconcile_concurrency=1),
                            [ALICE, BOB])
    assert fault.fired == breaks
    assert report.ok, report.as_json()
    assert report.mailboxes[ALICE].appended == 5 and report.mailboxes[ALICE].already_present == 0
    assert report.mailboxes[BOB].appended == 2
    warnings = [rec.getMessage() for rec in caplog.records if rec.name == "fallback.reconcile.reconciler"]
    assert len(warnings) == breaks
    assert warnings[0] == ("reconcile of alice@example.com: Redis connection broke during recording states "
                           "(AttributeError: 'NoneType' object has no attribute 'writelines'); try 2 of 4")
    assert Counter(ids_on_disk(dovecot, ALICE)) == Counter(ids)
    assert Counter(ids_on_disk(dovecot, BOB)) == Counter(bob)
    assert {state(r, ALICE, i)["rstate"] for i in ids} == {"done"}
    assert r.scard(keys.pending(ALICE)) == 0


@pytest.mark.dovecot
def test_a_connection_that_keeps_breaking_fails_the_mailbox_and_the_next_run_completes_it_once(
        r: redis.Redis, settings: Any, dovecot: DovecotServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ids = [put_new(r, ALICE, f"m{n}") for n in range(3)]
    s = reconcile_settings(settings, dovecot, tmp_path)
    fault = ClosedUnderSend(monkeypatch, times=reconciler.REDIS_TRIES)
    report = run_engine(s, [ALICE])
    assert fault.fired == reconciler.REDIS_TRIES
    a = report.mailboxes[ALICE]
    assert not report.ok and a.left == 3
    assert a.error == ("Redis: recording states failed 4 times, the connection broke each time "
                       "(AttributeError: 'NoneType' object has no attribute 'writelines')")
    assert {state(r, ALICE, i)["rstate"] for i in ids} == {"appending"}   # stored, not yet recorded
    monkeypatch.undo()
    report = run_engine(s, [ALICE])
    assert report.ok and report.mailboxes[ALICE].already_present == 3
    assert Counter(ids_on_disk(dovecot, ALICE)) == Counter(ids)


@pytest.mark.dovecot
def test_another_attribute_error_is_not_taken_for_a_broken_connection(
        r: redis.Redis, settings: Any, dovecot: DovecotServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ids = [put_new(r, ALICE, f"m{n}") for n in range(2)]
    s = reconcile_settings(settings, dovecot, tmp_path)
    calls = []
    real_raws = MessageStates.raws

    async def raws(states: MessageStates, address: str, items: Any) -> Any:
        calls.append(address)
        return None.writelines   # type: ignore[attr-defined]  # the same words, outside redis-py: a bug

    monkeypatch.setattr(MessageStates, "raws", raws)
    report = run_engine(s, [ALICE])
    assert len(calls) == 1    # not retried
    assert report.mailboxes[ALICE].error == ("internal error: AttributeError: 'NoneType' object has no "
                                             "attribute 'writelines'")
    monkeypatch.setattr(MessageStates, "raws", real_raws)
    report = run_engine(s, [ALICE])
    assert report.ok and report.mailboxes[ALICE].appended == 2
    assert Counter(ids_on_disk(dovecot, ALICE)) == Counter(ids)


def test_only_the_broken_connection_signature_counts() -> None:
    def raised(fn: Callable[[], object]) -> BaseException:
        try:
            fn()
        except BaseException as exc:   # the exception is the point
            return exc
        raise AssertionError("did not raise")

    assert reconciler.broken_redis_connection(redis.exceptions.ConnectionError("reset"))
    assert reconciler.broken_redis_connection(redis.exceptions.TimeoutError("slow"))
    assert not reconciler.broken_redis_connection(redis.exceptions.AuthenticationError("bad password"))
    assert not reconciler.broken_redis_connection(redis.exceptions.ResponseError("WRONGTYPE"))
    # The signature, but raised here rather than inside redis-py; and another attribute.
    assert not reconciler.broken_redis_connection(raised(lambda: None.writelines))  # type: ignore[attr-defined]
    assert not reconciler.broken_redis_connection(raised(lambda: None.other))  # type: ignore[attr-defined]
    assert not reconciler.broken_redis_connection(ValueError("x"))
