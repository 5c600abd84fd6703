"""`fallback purge --reconciled`: only what reconcile finished, counters kept right."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fallback import keys
from fallback.cli import main
from fallback.mailbox import fields, store
from fallback.mailbox.store import MailboxReader, mailstore_stats
from tests.reconcile_helpers import (
    cli_args,
    ids_on_disk,
    message,
    put,
    put_new,
    reconcile_settings,
    state,
)

ALICE, BOB = "alice@example.com", "bob@example.com"
DAY_MS = 86_400_000


def _purge(settings, *extra: str) -> int:
    return main(["purge", "--reconciled", "--redis-url", settings.redis_url, *extra])


def test_purge_deletes_only_done_and_keeps_counters(r, settings, mailboxes, capsys) -> None:
    now = int(time.time() * 1000)
    made: dict[str, tuple[str, int]] = {}

    def make(name: str, rstate: str, age_days: float = 10, folder: str = fields.INBOX) -> str:
        msg_id, raw = message(ALICE, name)
        put(r, ALICE, raw, msg_id, folder=folder)
        r.hset(keys.message(ALICE, msg_id), mapping={"rstate": rstate, "rts": now - int(age_days * DAY_MS)})
        if rstate == "done":
            r.srem(keys.pending(ALICE), msg_id)
        made[name] = (msg_id, len(raw))
        return msg_id

    make("done old", "done")
    make("done old sent", "done", folder=fields.SENT)
    make("done recent", "done", age_days=1)
    make("pending", "pending")
    make("failed", "failed")
    make("appending", "appending")
    changed = make("done, flagged since", "done")
    assert store.set_flags(r, ALICE, changed, add=(fields.FLAGGED,))
    outbound = make("done, still being sent", "done", folder=fields.SENT)
    r.sadd(keys.outbox(ALICE), outbound)
    bob_id = put_new(r, BOB, "bob pending")
    before_stats = mailstore_stats(r)["default"]
    before_info = MailboxReader(r, ALICE).info()

    assert _purge(settings, "--older-than", "5", "--yes") == 0
    out = capsys.readouterr().out
    assert "2 reconciled message(s) reconciled over 5 day(s) ago" in out and "deleted 2 message(s)" in out
    gone = {"done old", "done old sent"}
    for name, (msg_id, _) in made.items():
        exists = r.exists(keys.message(ALICE, msg_id))
        assert bool(exists) == (name not in gone), name
    freed = sum(made[n][1] for n in gone)
    assert MailboxReader(r, ALICE).info() == {"messages": before_info["messages"] - 2,
                                              "bytes": before_info["bytes"] - freed}
    assert mailstore_stats(r)["default"] == {"messages": before_stats["messages"] - 2,
                                             "bytes": before_stats["bytes"] - freed}
    assert made["done old"][0] not in MailboxReader(r, ALICE).ids(fields.INBOX)
    assert made["done old sent"][0] not in MailboxReader(r, ALICE).ids(fields.SENT)
    assert r.exists(keys.message(BOB, bob_id))

    # Without an age limit the recent one goes too; the others still stay.
    assert _purge(settings, "--yes") == 0
    assert not r.exists(keys.message(ALICE, made["done recent"][0]))
    for name in ("pending", "failed", "appending", "done, flagged since", "done, still being sent"):
        assert r.exists(keys.message(ALICE, made[name][0])), name


def test_purge_asks_before_deleting(r, settings, mailboxes, capsys, monkeypatch) -> None:
    msg_id, raw = message(ALICE, "done")
    put(r, ALICE, raw, msg_id)
    r.hset(keys.message(ALICE, msg_id), mapping={"rstate": "done", "rts": 0})
    r.srem(keys.pending(ALICE), msg_id)
    # Not a terminal and no --yes: refuse, delete nothing.
    assert _purge(settings) == 1
    assert "refusing to delete without confirmation: give --yes" in capsys.readouterr().err
    assert r.exists(keys.message(ALICE, msg_id))
    # A terminal that answers anything but yes: nothing deleted either.
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    assert _purge(settings) == 1
    assert "nothing deleted" in capsys.readouterr().out
    assert r.exists(keys.message(ALICE, msg_id))
    monkeypatch.setattr("builtins.input", lambda prompt: "yes")
    assert _purge(settings) == 0
    assert not r.exists(keys.message(ALICE, msg_id))


@pytest.mark.parametrize(("args", "expected"), [
    (["--older-than", "-1"], "--older-than: -1 is negative"),
])
def test_purge_bad_input(r, settings, mailboxes, capsys, args, expected) -> None:
    assert _purge(settings, *args) == 1
    assert expected in capsys.readouterr().err


def test_purge_needs_reconciled_flag(settings, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["purge", "--redis-url", settings.redis_url, "--yes"])
    assert exc.value.code == 2
    assert "--reconciled" in capsys.readouterr().err


@pytest.mark.dovecot
def test_reconcile_then_purge(r, settings, dovecot, mailboxes, tmp_path: Path, capsys) -> None:
    s = reconcile_settings(settings, dovecot, tmp_path)
    ids = [put_new(r, ALICE, f"m{n}") for n in range(3)]
    assert main(cli_args(s, "--user", ALICE)) == 0
    keep = put_new(r, ALICE, "arrived after reconcile")
    assert _purge(settings, "--yes") == 0
    assert "deleted 3 message(s)" in capsys.readouterr().out
    assert [r.exists(keys.message(ALICE, i)) for i in ids] == [0, 0, 0]
    assert state(r, ALICE, keep)["rstate"] == "pending"
    assert sorted(ids_on_disk(dovecot, ALICE)) == sorted(ids)   # the main store keeps them
    assert MailboxReader(r, ALICE).info()["messages"] == 1
