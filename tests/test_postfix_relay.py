"""deploy/postfix/main.cf.snippet's claim, proved with a real Postfix: routing whole domains to
the fallback loses nothing.

A private Postfix (the Debian package's daemons, unpacked by deploy/install-deps.sh test into
.tools/postfix, never installed) runs from its own config and queue directories under the
test's tmp dir, on a free loopback port, with the snippet's `transport_maps` and the transport
table's entries pointed at the real receiver's loopback port.  Mail submitted to it with smtplib
for a mailbox, an alias, a subaddress, postmaster@, abuse@ and a catch-all domain ends up stored
here (or in the forward queue for the main system); the unknown user is refused by us at RCPT
and Postfix returns it to the sender (a bounce, caught by smtp-sink), and with the perimeter's
own recipient validation (`reject_unverified_recipient`) Postfix refuses it at its RCPT already.
"""

from __future__ import annotations

import shutil
import smtplib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fallback import keys
from fallback.config import Settings
from fallback.mailbox import store
from fallback.mailbox.aliases import Aliases, make_alias
from fallback.mailbox.directory import ensure_buckets
from fallback.ops import failover
from tests.conftest import add_mailbox
from tests.postfix import PrivatePostfix
from tests.postfix import available as postfix_available
from tests.servers import (
    ROOT,
    SmtpSink,
    sink_payload,
    wait_for,
)

pytestmark = pytest.mark.slow

ALICE, BOB, DAVE = "alice@example.com", "bob@example.com", "dave@example.com"
EXT = "boss@elsewhere.test"
SENDER = "sender@sink.test"  # its domain is routed to smtp-sink, where Postfix's bounces land
def transport_table(receiver_port: int, sink_port: int) -> str:
    """deploy/postfix/transport with its next hop made the test's receiver, plus the sink."""
    lines = []
    for line in (ROOT / "deploy" / "postfix" / "transport").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            domain, _ = line.split()
            lines.append(f"{domain} smtp:[127.0.0.1]:{receiver_port}")
    lines.append(f"catch.example smtp:[127.0.0.1]:{receiver_port}")
    lines.append(f"sink.test smtp:[127.0.0.1]:{sink_port}")
    return "\n".join(lines) + "\n"


def perimeter_postfix(base: Path, receiver_port: int, sink_port: int) -> PrivatePostfix:
    """The perimeter: the snippet as it is, its transport table pointed at the receiver."""
    conf = base / "etc"
    conf.mkdir(parents=True)
    (conf / "transport").write_text(transport_table(receiver_port, sink_port))
    # The snippet as it is, its hash: table (which needs postmap) read as text instead.
    snippet = (ROOT / "deploy" / "postfix" / "main.cf.snippet").read_text()
    assert "transport_maps = hash:/etc/postfix/transport" in snippet
    snippet = snippet.replace("hash:/etc/postfix/transport", f"texthash:{conf / 'transport'}")
    return PrivatePostfix(base, "perimeter.test", (
        "relay_domains = example.com, example.org, catch.example\nmynetworks = 127.0.0.0/8\n"
        "smtp_dns_support_level = disabled\nsmtp_tls_security_level = none\n"
        "queue_run_delay = 1s\nminimal_backoff_time = 1s\nmaximal_backoff_time = 2s\n"
        "address_verify_poll_delay = 1s\n"), before=f"{snippet}\n")


@pytest.fixture
def perimeter(r: redis.Redis, settings: Settings,
              receiver_factory: Any) -> Iterator[tuple[PrivatePostfix, SmtpSink]]:
    if not postfix_available():
        pytest.skip("needs Postfix unpacked by deploy/install-deps.sh test, run as root")
    add_mailbox(r, settings, ALICE, mailstore="store1")
    add_mailbox(r, settings, BOB, mailstore="store1")
    add_mailbox(r, settings, DAVE, mailstore="store2")  # healthy: forwarded to the main system
    failover.start(r, ["store1"])
    book = Aliases(r, ensure_buckets(r, settings.directory_buckets))
    book.put(make_alias("sales@example.com", [ALICE, EXT]))
    book.put(make_alias("abuse@example.com", [BOB]))
    book.put(make_alias("@catch.example", [BOB]))
    rt = receiver_factory()
    sink = SmtpSink().start()
    # Not under pytest's tmp_path: that is private to root, and Postfix's daemons run as `daemon`.
    base = Path(tempfile.mkdtemp(prefix="postfix-"))
    base.chmod(0o755)
    postfix = perimeter_postfix(base, rt.port, sink.port)
    try:
        yield postfix.start(), sink
    finally:
        postfix.stop()
        sink.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def submit(port: int, rcpts: list[str], subject: str) -> None:
    """One message to the perimeter Postfix, which takes every recipient (it relays our domains)."""
    body = f"From: {SENDER}\r\nSubject: {subject}\r\n\r\nfor {', '.join(rcpts)}\r\n".encode()
    with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.2", 0), timeout=30) as s:
        s.ehlo("client.test")
        s.mail(SENDER)
        for rcpt in rcpts:
            assert s.rcpt(rcpt)[0] == 250, rcpt
        assert s.data(body)[0] == 250


def subjects(r: redis.Redis, address: str) -> list[str]:
    reader = store.MailboxReader(r, address)
    out = []
    for msg_id in reader.ids("INBOX"):
        raw = reader.raw(msg_id) or b""
        out += [ln[9:].decode() for ln in raw.split(b"\r\n") if ln.startswith(b"Subject: ")]
    return sorted(out)


def forwarded(r: redis.Redis) -> dict[str, list[str]]:
    """Each forward record's recipient -> the subjects of its messages."""
    out: dict[str, list[str]] = {}
    for n in range(keys.FORWARD_SHARDS):
        entries: Any = r.xrange(keys.forward_stream_n(n))
        for _, entry in entries:
            rcpt, msg_id = entry[b"a"].decode(), entry[b"id"].decode()
            record: Any = r.hget(keys.forward_record(rcpt, msg_id), "raw")
            raw = bytes(record or b"")
            out.setdefault(rcpt, []).extend(
                ln[9:].decode() for ln in raw.split(b"\r\n") if ln.startswith(b"Subject: "))
    return {k: sorted(v) for k, v in out.items()}


def test_whole_domains_routed_here_lose_nothing(perimeter: tuple[PrivatePostfix, SmtpSink],
                                                r: redis.Redis) -> None:
    postfix, sink = perimeter
    for rcpt in (ALICE, "sales@example.com", "alice+news@example.com", "postmaster@example.com",
                 "abuse@example.com", "anyone@catch.example", DAVE):
        submit(postfix.port, [rcpt], f"to {rcpt}")
    submit(postfix.port, [BOB, "nobody@example.com"], "bob and an unknown")

    def settled() -> bool:
        return postfix.queued() == 0 and len(sink.messages()) >= 1 and len(subjects(r, BOB)) >= 3
    wait_for(settled, timeout=60, what=f"postfix to deliver everything: {postfix.log_text()[-3000:]}")

    assert subjects(r, ALICE) == sorted(["to alice@example.com", "to sales@example.com",
                                         "to alice+news@example.com"])
    assert subjects(r, BOB) == sorted(["to abuse@example.com", "to anyone@catch.example",
                                       "bob and an unknown"])
    # postmaster@ without an alias, the healthy user and the alias's outside target: each once,
    # queued for the main system.
    assert forwarded(r) == {"postmaster@example.com": ["to postmaster@example.com"],
                            DAVE: [f"to {DAVE}"], EXT: ["to sales@example.com"]}
    # The subaddress's copy still names the address it came for.
    reader = store.MailboxReader(r, ALICE)
    raws = [reader.raw(i) or b"" for i in reader.ids("INBOX")]
    assert sum(b"\r\nDelivered-To: alice+news@example.com\r\n" in raw for raw in raws) == 1
    # The unknown user: refused by us at RCPT (never after DATA), so Postfix returned it to the
    # sender with our reply; only that recipient.
    (bounce,) = sink.messages()
    assert [rcpt.strip("<>") for rcpt in sink_payload(bounce)[0]] == [SENDER]  # its ORCPT= too
    assert b"nobody@example.com" in bounce and b"550 5.1.1" in bounce
    assert b"bob@example.com" not in bounce.split(b"Content-Description: Undelivered Message")[0]
    assert "said: 550 5.1.1" in postfix.log_text()

    # With the perimeter's own recipient validation (the snippet's advice, here Postfix's
    # address verification against us), the unknown user is refused at Postfix's RCPT already.
    postfix.restart_with("smtpd_recipient_restrictions = reject_unverified_recipient\n"
                         "unverified_recipient_reject_code = 550")

    def rcpt_reply(rcpt: str) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", postfix.port, source_address=("127.0.0.3", 0), timeout=30) as s:
            s.ehlo("client.test")
            s.mail(SENDER)
            return s.rcpt(rcpt)
    # The first probe answers 450 (still verifying); the verdict comes within a few polls.
    def verdict(rcpt: str) -> tuple[int, bytes] | None:
        reply = rcpt_reply(rcpt)
        return None if reply[0] == 450 else reply
    code, text = wait_for(lambda: verdict("nobody@example.com"), timeout=60,
                          what="the address verification of nobody@")
    assert code == 550 and b"Recipient address rejected: undeliverable address" in text
    assert b"said: 550 5.1.1 No such user here" in text
    assert wait_for(lambda: rcpt_reply("alice+news@example.com")[0] == 250, timeout=60,
                    what="the address verification of alice+news@")
    assert wait_for(lambda: rcpt_reply("anyone@catch.example")[0] == 250, timeout=60,
                    what="the address verification of the catch-all")
    # Probes are never stored: the mailboxes hold what they held.
    assert len(subjects(r, ALICE)) == 3 and len(subjects(r, BOB)) == 3
