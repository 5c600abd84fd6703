"""The audit log: each admin action, driven through its real command, is recorded with who, what
and when; `fallback audit` lists them; the stream stays bounded.

Failover, DNS and the incident text have their audit tests beside them
(test_failover, test_dns, test_incident); tokens in test_tokens; the forward
queue tools in test_forward_queue_tools.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from fallback import keys
from fallback.cli import main
from fallback.config import Settings
from fallback.ops import audit
from tests.reconcile_helpers import cli_args, put_new, reconcile_settings
from tests.test_outbound import SENDER, queue_message


def cli(redis_url: str, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--redis-url", redis_url])
    got = capsys.readouterr()
    return code, got.out, got.err


def last(r: redis.Redis, action: str) -> audit.Entry:
    found = [e for e in audit.since(r, 3600) if e.action == action]
    assert found, f"no audit entry {action!r}"
    return found[-1]


def test_mailbox_provision_export_are_audited(r: redis.Redis, settings: Settings, redis_url: str,
                                              tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_USER", "ops-ben")  # who ran sudo, not root, is named
    csv = tmp_path / "users.csv"
    csv.write_text("address,password,mailstore\nann@example.com,{PLAIN}pw,store1\n"
                   "ben@example.com,{PLAIN}pw,store1\nnot an address,{PLAIN}x,store1\n")
    code, _, _ = cli(redis_url, capsys, "provision", str(csv))
    assert code == 1  # one invalid line; the others are loaded
    entry = last(r, "provision")
    assert entry.actor == "ops-ben" and entry.args == {"source": str(csv)}
    assert entry.outcome == "ok: 2 added, 0 updated, 0 unchanged, 1 invalid"

    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-pw\n"))
    code, _, err = cli(redis_url, capsys, "mailbox", "add", "cat@example.com", "--mailstore", "store2",
                       "--password-stdin")
    assert code == 0, err
    entry = last(r, "mailbox add")
    assert entry.args == {"address": "cat@example.com", "mailstore": "store2"}
    assert entry.outcome == "ok: added"
    assert "s3cret" not in json.dumps(entry.args) + entry.outcome  # never a password or hash

    code, _, _ = cli(redis_url, capsys, "mailbox", "logout", "ann@example.com")
    assert code == 0 and last(r, "mailbox logout").outcome == "ok: ended 0 webmail sessions"

    code, _, _ = cli(redis_url, capsys, "export", "ann@example.com", "--output", str(tmp_path / "ann.mbox"))
    assert code == 0
    entry = last(r, "export")
    assert entry.actor == "ops-ben" and entry.args["address"] == "ann@example.com"
    assert entry.args["format"] == "mbox" and entry.outcome == "ok: 0 message(s)"

    code, _, _ = cli(redis_url, capsys, "mailbox", "remove", "ben@example.com")
    assert code == 0
    entry = last(r, "mailbox remove")
    assert entry.args == {"address": "ben@example.com", "mailstore": "store1", "force": False}
    assert entry.outcome.startswith("ok: removed")
    # A refused action is not written as done.
    code, _, _ = cli(redis_url, capsys, "mailbox", "remove", "ben@example.com")
    assert code == 1 and len([e for e in audit.since(r, 3600) if e.action == "mailbox remove"]) == 1


def test_queue_actions_and_failover_are_audited(r: redis.Redis, settings: Settings, redis_url: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    msg_id = queue_message(r, ["bob@remote.test"], "audited")
    for argv, action in ((["queue", "retry", msg_id], "queue retry"),
                         (["queue", "hold", "--user", SENDER], "queue hold"),
                         (["queue", "release", "--user", SENDER], "queue release"),
                         (["queue", "delete", msg_id, "--yes"], "queue delete"),
                         (["failover", "start", "--mailstore", "store1", "--force"], "failover start")):
        code, _, err = cli(redis_url, capsys, *argv, "--actor", "ops-cleo")
        assert code == 0, (argv, err)
        entry = last(r, action)
        assert entry.actor == "ops-cleo" and entry.outcome.startswith("ok"), (action, entry)
    assert last(r, "queue delete").args == {"id": msg_id, "sender": SENDER}


@pytest.mark.dovecot
def test_reconcile_and_purge_are_audited(r: redis.Redis, settings: Settings, dovecot: Any,
                                         mailboxes: list[str], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_USER", "ops-dan")
    s = reconcile_settings(settings, dovecot, tmp_path)
    put_new(r, "alice@example.com", "to the main store")
    assert main(cli_args(s, "--user", "alice@example.com")) == 0
    capsys.readouterr()
    entry = last(r, "reconcile")
    assert entry.actor == "ops-dan" and entry.args["target"] == s.imap_url
    assert entry.args["mailboxes"] == 1 and entry.args["dry_run"] is False
    assert entry.outcome.startswith("ok: appended 1")
    # What reconcile finished, purge deletes: audited with what it deleted.
    code, _, err = cli(s.redis_url or "", capsys, "purge", "--reconciled", "--yes", "--actor", "ops-dan")
    assert code == 0, err
    entry = last(r, "purge")
    assert entry.actor == "ops-dan" and entry.outcome.startswith("ok: deleted 1 message(s)")


def test_console_login_call(r: redis.Redis, tmp_path: Path) -> None:
    copy = tmp_path / "audit.jsonl"
    assert audit.console_login(r, copy, "token:reseller-a", "192.0.2.7", "refused: wrong token")
    entry = last(r, "console login")
    assert (entry.actor, entry.args, entry.outcome) == ("token:reseller-a", {"client": "192.0.2.7"},
                                                        "refused: wrong token")
    assert json.loads(copy.read_text())["action"] == "console login"


def test_fallback_audit_lists_json_and_table(r: redis.Redis, redis_url: str,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    old = audit.Entry(action="failover start", actor="ops-old", time=time.time() - 7200)
    # Two hours ago, by the stream's clock too (the id is what --since looks at).
    r.xadd(keys.AUDIT_STREAM, old.fields(), id=f"{int(old.time * 1000)}-0")  # type: ignore[arg-type]
    for n in range(3):
        audit.write(r, None, "mailbox logout", "ops-eve", {"address": f"u{n}@example.com"}, "ok: ended 0")
    code, out, _ = cli(redis_url, capsys, "audit", "--since", "1h", "--format", "json")
    assert code == 0
    entries = json.loads(out)
    assert [e["args"]["address"] for e in entries] == ["u0@example.com", "u1@example.com", "u2@example.com"]
    assert all(e["actor"] == "ops-eve" and e["action"] == "mailbox logout" and e["time"] > time.time() - 60
               for e in entries)
    code, out, _ = cli(redis_url, capsys, "audit", "--format", "json")
    assert json.loads(out)[0]["actor"] == "ops-old"  # all kept, oldest first
    code, out, _ = cli(redis_url, capsys, "audit", "--since", "1h")
    assert code == 0 and "audit log: 3 action(s) in the last 1h, newest last" in out
    assert out.index("u0@example.com") < out.index("u2@example.com") and "ops-old" not in out
    code, out, _ = cli(redis_url, capsys, "audit", "--limit", "1", "--format", "json")
    assert [e["args"].get("address") for e in json.loads(out)] == ["u2@example.com"]  # the newest one

    for argv, message in ((["--since", "yesterday"], "--since: not a duration: 'yesterday' (use e.g. "
                                                     "60, 90s, 10m, 5d)"),
                          (["--limit", "0"], "--limit must be greater than 0")):
        code, out, err = cli(redis_url, capsys, "audit", *argv)
        assert code == 1 and out == "" and err == f"fallback audit: {message}\n"


def test_stream_is_capped(r: redis.Redis) -> None:
    with r.pipeline(transaction=False) as pipe:
        for n in range(audit.MAX_ENTRIES - 1):
            pipe.xadd(keys.AUDIT_STREAM, {"time": "1", "actor": "bulk", "action": "x", "args": "{}",
                                          "outcome": str(n)})
        pipe.execute()
    audit.write(r, None, "at the limit", "ops-fay")
    assert r.xlen(keys.AUDIT_STREAM) == audit.MAX_ENTRIES
    first: Any = r.xrange(keys.AUDIT_STREAM, count=1)
    assert first[0][1][b"outcome"] == b"0"  # at the limit nothing is dropped
    audit.write(r, None, "past the limit", "ops-fay")
    assert r.xlen(keys.AUDIT_STREAM) == audit.MAX_ENTRIES  # one in, the oldest out
    first = r.xrange(keys.AUDIT_STREAM, count=1)
    assert first[0][1][b"outcome"] == b"1"
    assert [e.action for e in audit.recent(r, 2)] == ["past the limit", "at the limit"]
