"""`fallback export` (mboxrd and Maildir, exact bytes) and `fallback status`."""

from __future__ import annotations

import json
import mailbox
from pathlib import Path
from typing import Any

import pytest
import redis

from fallback.cli import main
from fallback.ids import new_id
from fallback.mailbox import delivery, fields, store
from fallback.ops.export import iter_mbox, mboxrd_quote, mboxrd_unquote
from tests.conftest import add_mailbox

TRICKY = [
    b"Received: x\r\nSubject: plain\r\n\r\nbody\r\n",
    b"Subject: from lines\r\n\r\nFrom the start of a line\r\n>From quoted once\r\n>>From twice\r\nFrom\r\n",
    b"From nobody Mon Jan  1 00:00:00 2024\r\nSubject: starts like a separator\r\n\r\nx\r\n",
    b"Subject: no final newline\r\n\r\nends here",
    b"Subject: binary\r\n\r\n\x00\xff\xfe\r\n\r\n\r\n",
    b"Subject: only head\r\n",
]


def deliver_all(r: redis.Redis, address: str, messages: list[bytes],
                folder: str = fields.INBOX) -> list[str]:
    ids = []
    for raw in messages:
        msg_id = new_id()
        delivery.deliver(r, [delivery.Delivery(address, "default", folder=folder)], msg_id, raw)
        ids.append(msg_id)
    return ids


def run(argv: list[str], url: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main([*argv, "--redis-url", url])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("raw", TRICKY)
def test_mboxrd_quoting_round_trips(raw: bytes) -> None:
    quoted = mboxrd_quote(raw)
    assert not any(line.startswith(b"From ") for line in quoted.split(b"\n"))
    assert mboxrd_unquote(quoted) == raw


def test_export_mbox_exact(r: redis.Redis, settings: Any, redis_url: str, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    add_mailbox(r, settings, "alice@example.com")
    deliver_all(r, "alice@example.com", TRICKY)
    out = tmp_path / "alice.mbox"
    rc, stdout, err = run(["export", "alice@example.com", "--format", "mbox", "--output", str(out)],
                          redis_url, capsys)
    assert rc == 0, err
    assert f"exported {len(TRICKY)} message(s)" in stdout
    # Same-millisecond deliveries have no defined order among themselves: compare as multisets.
    assert sorted(iter_mbox(out)) == sorted(TRICKY)
    data = out.read_bytes()
    assert b"\n>From the start of a line" in data and b"\n>>From quoted once" in data
    assert b"\n>>>From twice" in data
    # A standard mbox reader sees the same number of messages.
    assert len(mailbox.mbox(str(out))) == len(TRICKY)


def test_export_maildir_one_file_per_message_exact(r: redis.Redis, settings: Any, redis_url: str,
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    add_mailbox(r, settings, "bob@example.com")
    inbox = deliver_all(r, "bob@example.com", TRICKY)
    sent = deliver_all(r, "bob@example.com", [b"Subject: sent one\r\n\r\nx\r\n"], folder=fields.SENT)
    store.set_flags(r, "bob@example.com", inbox[0], add=(fields.SEEN, fields.FLAGGED))
    store.move(r, "bob@example.com", inbox[1], fields.TRASH)
    out = tmp_path / "bob"
    rc, _, err = run(["export", "bob@example.com", "--format", "maildir", "--output", str(out)],
                     redis_url, capsys)
    assert rc == 0, err
    files = {p.name.split(".")[1]: p for p in out.rglob("cur/*")}
    assert len(files) == len(TRICKY) + 1
    for msg_id, raw in zip(inbox, TRICKY, strict=True):
        assert files[msg_id].read_bytes() == raw
    assert files[inbox[0]].name.endswith(":2,FS") and files[inbox[0]].parent.parent == out
    assert files[inbox[1]].parent.parent == out / ".Trash" and files[inbox[1]].name.endswith("T")
    assert files[sent[0]].parent.parent == out / ".Sent"
    assert not any((out / "tmp").iterdir())
    # Standard Maildir readers agree.
    assert len(mailbox.Maildir(str(out), create=False)) == len(TRICKY) - 1


def test_export_errors_are_one_line(r: redis.Redis, settings: Any, redis_url: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(["export", "ghost@example.com"], redis_url, capsys)
    assert rc == 1
    assert err.strip() == "fallback export: ghost@example.com is not provisioned and has no messages"
    add_mailbox(r, settings, "alice@example.com")
    rc, _, err = run(["export", "alice@example.com", "--format", "mbox", "--output", str(tmp_path)],
                     redis_url, capsys)
    assert rc == 1 and "is a directory" in err
    rc, _, err = run(["export", "not an address"], redis_url, capsys)
    assert rc == 1 and "not an email address" in err and len(err.strip().splitlines()) == 1


def test_status_per_mailstore_and_json(r: redis.Redis, settings: Any, redis_url: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    add_mailbox(r, settings, "a@example.com", mailstore="east")
    add_mailbox(r, settings, "b@example.com", mailstore="east")
    add_mailbox(r, settings, "c@example.org", mailstore="west")
    for addr, store_name, raw in (("a@example.com", "east", b"x" * 100), ("b@example.com", "east", b"y" * 50),
                                  ("c@example.org", "west", b"z" * 10)):
        delivery.deliver(r, [delivery.Delivery(addr, store_name)], new_id(), raw)
    rc, out, _ = run(["status", "--format", "json"], redis_url, capsys)
    assert rc == 0
    data = json.loads(out)
    assert data["mailstores"] == {"east": {"mailboxes": 2, "messages": 2, "bytes": 150},
                                  "west": {"mailboxes": 1, "messages": 1, "bytes": 10}}
    assert data["domains"] == 2
    assert data["redis"]["used_memory"] > 0 and data["redis"]["ping_ms"] >= 0
    assert data["redis"]["aof_enabled"] is True and data["redis"]["maxmemory_policy"] == "noeviction"
    rc, out, _ = run(["status"], redis_url, capsys)
    assert rc == 0
    assert "east" in out and "west" in out and "150" in out and "Redis: up" in out
