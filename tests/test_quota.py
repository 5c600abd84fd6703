"""The per-mailbox quota against the real receiver and redis-server: 452 4.2.2 at RCPT when a
mailbox is full, at the end of DATA when the message would take it over, nothing stored
then, the check atomic with the write, usage kept right through purge."""

from __future__ import annotations

import smtplib
import threading
import time
from typing import Any

import redis

from fallback import keys
from fallback.cli import main
from fallback.mailbox import delivery, fields, purge, quota
from fallback.mailbox.store import MailboxReader
from fallback.ops import failover
from tests.conftest import add_mailbox

ALICE, BOB = "alice@example.com", "bob@example.com"
FULL = "452 4.2.2 Mailbox full, try again later"


def body(n: int, size: int = 2000) -> bytes:
    return (f"From: s@remote.test\r\nSubject: quota {n}\r\n\r\n".encode()
            + (b"q" * 70 + b"\r\n") * (size // 72))


def reply(exc: smtplib.SMTPResponseException | tuple[int, bytes]) -> str:
    code, text = (exc.smtp_code, exc.smtp_error) if isinstance(exc, smtplib.SMTPResponseException) else exc
    return f"{code} {text.decode()}"


def send_plain(port: int, rcpts: list[str], raw: bytes, source: str = "127.0.0.1",
               size: bool = False) -> tuple[dict[str, str], str]:
    """MAIL (SIZE= only when `size`), RCPT each, DATA: (refused recipients -> reply, DATA reply)."""
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=30) as s:
        s.ehlo("client.remote.test")
        code, text = s.mail("s@remote.test", [f"SIZE={len(raw)}"] if size else [])
        assert code == 250, text
        refused = {}
        for rcpt in rcpts:
            got = s.rcpt(rcpt)
            if got[0] != 250:
                refused[rcpt] = reply(got)
        if len(refused) == len(rcpts):
            return refused, ""
        return refused, reply(s.data(raw))


def stored(r: redis.Redis, address: str) -> list[bytes]:
    reader = MailboxReader(r, address)
    return [reader.raw(i) or b"" for i in reader.ids(fields.INBOX, newest_first=False)]


def usage(r: redis.Redis, address: str) -> int:
    return quota.usage(r, address)


def calibrate(r: redis.Redis, receiver_factory: Any, address: str, raw: bytes) -> int:
    """What one such message costs `address` (its bytes and our Received: line), measured
    with a receiver without quota."""
    rt = receiver_factory(mailbox_quota=0)
    before = usage(r, address)
    refused, data = send_plain(rt.port, [address], raw)
    assert not refused and data.startswith("250"), data
    return usage(r, address) - before


def test_exactly_at_the_quota_is_accepted_the_next_refused_at_rcpt(r, settings, mailboxes,
                                                                   receiver_factory) -> None:
    cost = calibrate(r, receiver_factory, ALICE, body(0))
    rt = receiver_factory(mailbox_quota=3 * cost)
    for n in (1, 2):
        refused, data = send_plain(rt.port, [ALICE], body(n))
        assert not refused and data.startswith("250 2.0.0"), data
    assert usage(r, ALICE) == 3 * cost  # exactly at the quota: the last one was accepted

    refused, _ = send_plain(rt.port, [ALICE], body(3))
    assert refused == {ALICE: FULL}
    # Other mailboxes are unaffected.
    refused, data = send_plain(rt.port, [BOB], body(4))
    assert not refused and data.startswith("250")
    # Nothing accepted was lost: the three messages are stored intact, none of the refused one.
    kept = stored(r, ALICE)
    assert len(kept) == 3 and all(k.endswith(body(n)) for k, n in zip(kept, (0, 1, 2), strict=True))
    assert usage(r, ALICE) == sum(len(k) for k in kept)


def test_one_past_the_quota_is_refused_at_the_end_of_data(r, settings, mailboxes,
                                                          receiver_factory) -> None:
    cost = calibrate(r, receiver_factory, ALICE, body(0))
    rt = receiver_factory(mailbox_quota=2 * cost - 1)  # room for one byte less than the next
    refused, data = send_plain(rt.port, [ALICE], body(1))  # no SIZE: only DATA can tell
    assert not refused and data == FULL
    assert len(stored(r, ALICE)) == 1 and usage(r, ALICE) == cost
    # Declared with SIZE (the bytes the sender sends, without our Received: line), a message
    # that cannot fit is refused at RCPT already.
    rt_size = receiver_factory(mailbox_quota=cost + len(body(1)) - 1)
    refused, _ = send_plain(rt_size.port, [ALICE], body(1), size=True)
    assert refused == {ALICE: FULL}
    # One byte more of quota and it fits exactly.
    rt2 = receiver_factory(mailbox_quota=2 * cost)
    refused, data = send_plain(rt2.port, [ALICE], body(1), size=True)
    assert not refused and data.startswith("250")
    assert usage(r, ALICE) == 2 * cost and stored(r, ALICE)[1].endswith(body(1))


def test_several_recipients_one_full(r, settings, mailboxes, receiver_factory) -> None:
    cost = calibrate(r, receiver_factory, ALICE, body(0))
    rt = receiver_factory(mailbox_quota=cost)  # alice is now exactly at her quota
    # Already full: refused at RCPT for alice only, bob gets the message.
    refused, data = send_plain(rt.port, [ALICE, BOB], body(1))
    assert refused == {ALICE: FULL} and data.startswith("250")
    assert [k.endswith(body(1)) for k in stored(r, BOB)] == [True]

    # Alice with room for less than the message (a webmail Sent copy fills her up to 10 bytes
    # short) and no SIZE: the whole message waits (452), nothing is stored for anyone, so the
    # retry cannot double it.
    rt2 = receiver_factory(mailbox_quota=4 * cost)
    delivery.deliver(r, [delivery.Delivery(ALICE, "default", fields.SENT, (fields.SEEN,), "sent")],
                     "01SENT", b"s" * (3 * cost - 10))
    refused, data = send_plain(rt2.port, [ALICE, BOB], body(2))
    assert not refused and data == FULL
    assert len(stored(r, ALICE)) == 1 and len(stored(r, BOB)) == 1
    # The sender's retry with SIZE (as MTAs send it): alice refused at RCPT, bob gets it once.
    refused, data = send_plain(rt2.port, [ALICE, BOB], body(2, 3000), size=True)
    assert refused == {ALICE: FULL} and data.startswith("250")
    bobs = stored(r, BOB)
    assert len(bobs) == 2 and bobs[0].endswith(body(1)) and bobs[1].endswith(body(2, 3000))


def test_mixed_mailbox_and_forward_over_quota_writes_nothing(r, settings, receiver_factory) -> None:
    """A message for a fallback mailbox and a forwarded user: refused for quota as a whole,
    no forward record written (the one MULTI/EXEC is guarded by WATCH on the usage)."""
    add_mailbox(r, settings, ALICE, mailstore="store1")
    add_mailbox(r, settings, BOB, mailstore="store2")
    failover.start(r, ["store1"])
    cost = calibrate(r, receiver_factory, ALICE, body(0))
    rt = receiver_factory(mailbox_quota=cost + 10)
    refused, data = send_plain(rt.port, [ALICE, BOB], body(1))
    assert not refused and data == FULL
    assert len(stored(r, ALICE)) == 1 and not list(r.scan_iter("fwdq:*:r:*"))
    rt2 = receiver_factory(mailbox_quota=3 * cost)
    refused, data = send_plain(rt2.port, [ALICE, BOB], body(1))
    assert not refused and data.startswith("250")
    assert len(stored(r, ALICE)) == 2 and len(list(r.scan_iter("fwdq:*:r:*"))) == 1


def test_concurrent_deliveries_cannot_overshoot(r, settings, mailboxes, receiver_factory) -> None:
    cost = calibrate(r, receiver_factory, ALICE, body(0))
    rt = receiver_factory(mailbox_quota=6 * cost, max_connections_per_ip=50)
    results: list[str] = []
    start = threading.Barrier(20)

    def one(i: int) -> None:
        # 127.0.0.2 and .3: the same length as .1, so every copy costs the same.
        source = ("127.0.0.2", "127.0.0.3")[i % 2]
        with smtplib.SMTP("127.0.0.1", rt.port, source_address=(source, 0), timeout=60) as s:
            s.ehlo("client.remote.test")
            s.mail("s@remote.test")
            s.rcpt(ALICE)  # all pass RCPT: the mailbox has room for five more
            start.wait(timeout=30)
            results.append(reply(s.data(body(0))))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 20
    assert sum(x.startswith("250") for x in results) == 5
    assert sum(x == FULL for x in results) == 15
    assert usage(r, ALICE) == 6 * cost and len(stored(r, ALICE)) == 6


def test_usage_matches_the_stored_messages_and_purge_makes_room(r, settings, mailboxes,
                                                                receiver_factory) -> None:
    cost = calibrate(r, receiver_factory, ALICE, body(0, 5000))
    rt = receiver_factory(mailbox_quota=3 * cost)
    send_plain(rt.port, [ALICE], body(1, 5000))
    # The webmail's own writes (a Sent copy) count, but are never refused, even over quota.
    sent = b"From: alice@example.com\r\nSubject: sent\r\n\r\n" + b"s" * (2 * cost)
    delivery.deliver(r, [delivery.Delivery(ALICE, "default", fields.SENT, (fields.SEEN,), "sent")],
                     "01SENTCOPY", sent)
    reader = MailboxReader(r, ALICE)
    every = [m for f in fields.FOLDERS for m in reader.ids(f)]
    assert len(every) == 3
    assert usage(r, ALICE) == sum(len(reader.raw(i) or b"") for i in every) > 3 * cost
    # Refused at RCPT, or, while the receiver still reuses the usage it read before the Sent
    # copy (UsageCache), at the end of DATA: either way nothing is stored.
    refused, data = send_plain(rt.port, [ALICE], body(2, 5000))
    assert refused == {ALICE: FULL} or data == FULL
    assert len([m for f in fields.FOLDERS for m in reader.ids(f)]) == 3

    # Reconcile finished with the Sent copy and one received message: purge frees their bytes.
    gone = ["01SENTCOPY", reader.ids(fields.INBOX, newest_first=False)[0]]
    for msg_id in gone:
        r.hset(keys.message(ALICE, msg_id), mapping={fields.RSTATE: fields.DONE, fields.RTS: 1})
        r.srem(keys.pending(ALICE), msg_id)
    assert purge.delete_reconciled(r, ALICE, gone, int(time.time() * 1000))[0] == 2
    left = [m for f in fields.FOLDERS for m in reader.ids(f)]
    assert usage(r, ALICE) == sum(len(reader.raw(i) or b"") for i in left) == cost
    # The receiver may refuse at RCPT for the seconds it reuses the usage it read (UsageCache);
    # a refused attempt stores nothing.
    deadline = time.monotonic() + 15
    while True:
        refused, data = send_plain(rt.port, [ALICE], body(2, 5000))
        if not refused or time.monotonic() > deadline:
            break
        assert refused == {ALICE: FULL}
        time.sleep(0.2)
    assert not refused and data.startswith("250")
    assert usage(r, ALICE) == 2 * cost


def test_mailbox_show_and_status_show_usage_against_the_quota(r, settings, mailboxes, receiver_factory,
                                                              monkeypatch, capsys) -> None:
    cost = calibrate(r, receiver_factory, ALICE, body(0))
    rt = receiver_factory(mailbox_quota=cost)
    refused, _ = send_plain(rt.port, [ALICE], body(1))
    assert refused == {ALICE: FULL}
    monkeypatch.setenv("FALLBACK_MAILBOX_QUOTA", str(4 * cost))
    capsys.readouterr()
    assert main(["mailbox", "show", ALICE, "--redis-url", settings.redis_url]) == 0
    out = capsys.readouterr().out
    assert f"quota:      {quota.human(cost)} of {quota.human(4 * cost)} (25 %)" in out
    assert main(["status", "--redis-url", settings.redis_url]) == 0
    out = capsys.readouterr().out
    assert "1 mailbox(es) refused mail at the quota in the last day:" in out
    assert f"  {ALICE}: {quota.human(cost)} of {quota.human(4 * cost)} (25 %)" in out
    monkeypatch.setenv("FALLBACK_MAILBOX_QUOTA", "0")
    assert main(["mailbox", "show", BOB, "--redis-url", settings.redis_url]) == 0
    assert "quota:      0 bytes (no quota)" in capsys.readouterr().out


def test_sizes_read_as_people_write_them() -> None:
    assert quota.describe(6 * 1024**3 // 5 + 1, 2 * 1024**3) == "1.2 GiB of 2 GiB (60 %)"
    assert quota.describe(2 * 1024**3 - 1, 2 * 1024**3) == "2.0 GiB of 2 GiB (99 %)"  # never 100 % too soon
    assert quota.describe(0, 2 * 1024**3) == "0 bytes of 2 GiB (0 %)"
    assert quota.describe(3 * 1024**2, 0) == "3 MiB (no quota)"
    assert quota.refused_at_rcpt(10, 10, None) and not quota.refused_at_rcpt(9, 10, None)
    assert quota.refused_at_rcpt(5, 10, 6) and not quota.refused_at_rcpt(5, 10, 5)
    assert not quota.refused_at_rcpt(10**12, 0, None)
