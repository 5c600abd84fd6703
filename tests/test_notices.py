"""User notices of `failover start|stop --notify`, and the audit entries of `fallback queue`."""

from __future__ import annotations

import email
import email.policy
from dataclasses import replace
from typing import Any

import pytest
import redis

from fallback import ids, keys
from fallback.cli import main
from fallback.config import Settings
from fallback.mailbox.directory import Directory, Mailbox, ensure_buckets
from fallback.mailbox.store import MailboxReader, mailstore_stats
from fallback.ops import audit, failover, notices
from fallback.queues import outbound

URL = "https://webmail.example.net/"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return replace(settings, directory_buckets=64)


@pytest.fixture
def users(r: redis.Redis, settings: Settings) -> Directory:
    """store1: ann (alternate), bea (none); store2: cid (alternate)."""
    d = Directory(r, ensure_buckets(r, settings.directory_buckets))
    d.put(Mailbox("ann@example.com", "store1", "{PLAIN}x", "ann@home.example"))
    d.put(Mailbox("bea@example.com", "store1", "{PLAIN}x"))
    d.put(Mailbox("cid@example.org", "store2", "{PLAIN}x", "cid@home.example"))
    return d


def queued(r: redis.Redis) -> dict[str, email.message.EmailMessage]:
    """Recipient -> the parsed notice, for every message on the outbound queue."""
    out = {}
    for item in outbound.scan(r):
        assert item.record is not None
        (rcpt,) = item.record.rcpts
        raw = MailboxReader(r, item.sender).raw(item.msg_id)
        assert raw is not None
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        out[rcpt] = msg
    return out


def cli(capsys: pytest.CaptureFixture[str], redis_url: str, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--redis-url", redis_url])
    out, err = capsys.readouterr()
    return code, out, err


def test_start_and_stop_notices(r: redis.Redis, users: Directory, redis_url: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, redis_url, "failover", "start", "--mailstore", "store1", "--notify",
                       "--webmail-url", URL, "--actor", "ops")
    assert code == 0
    assert "1 outage notice(s) queued; 1 user(s) without an alternate address skipped; 0 already told" in out
    sent = queued(r)
    assert list(sent) == ["ann@home.example"]  # cid is on store2, not failed over; bea has no alternate
    msg = sent["ann@home.example"]
    assert msg["From"] == "postmaster@example.com" and msg["To"] == "ann@home.example"
    assert msg["Subject"] == "Your mailbox ann@example.com: use the emergency webmail for now"
    assert msg["Auto-Submitted"] == "auto-generated" and msg["Message-ID"] and msg["Date"]
    body = msg.get_content()
    assert URL in body and "ann@example.com" in body and "usual email address and password" in body
    entry = audit.recent(r, 1)[0]
    assert entry.action == "failover start" and entry.args == {"mailstores": ["store1"], "notify": True}
    assert entry.outcome.endswith("1 outage notice(s) queued; 1 user(s) without an alternate address "
                                  "skipped; 0 already told")

    # Re-running for the same outage tells nobody twice.
    code, out, _ = cli(capsys, redis_url, "failover", "start", "--mailstore", "store1", "--notify",
                       "--webmail-url", URL)
    assert code == 0 and "0 outage notice(s) queued" in out and "1 already told" in out
    assert len(outbound.scan(r)) == 1

    # The Sent copies sit under the unprovisioned sender, shown as mailstore "notices".
    assert mailstore_stats(r)["notices"]["messages"] == 1

    code, out, _ = cli(capsys, redis_url, "failover", "stop", "--mailstore", "store1", "--notify")
    assert code == 0 and "1 service restored notice(s) queued" in out
    restored = [m for m in queued(r).values() if "works normally again" in m["Subject"]]
    assert len(restored) == 1 and restored[0]["To"] == "ann@home.example"
    assert restored[0]["Subject"] == "Your mailbox ann@example.com works normally again"
    assert URL not in restored[0].get_content()


def test_a_new_outage_notifies_again_and_stop_notices_once(r: redis.Redis, users: Directory,
                                                          settings: Settings) -> None:
    users.put(Mailbox("help@example.org", "store2", "{PLAIN}x"))  # the support desk's mailbox
    s = replace(settings, webmail_url=URL, notice_sender="help@example.org")
    scope = failover.start(r, None, now=1000.0)
    first = notices.notify(r, s, users, notices.START, scope, failover.iter_affected(users, scope))
    assert (first.queued, first.no_alternate, first.already) == (2, 2, 0)
    assert {m["From"] for m in queued(r).values()} == {"help@example.org"}
    # The sender is provisioned: its Sent copies are ordinary sent mail of its own mailstore.
    assert mailstore_stats(r)["store2"]["messages"] == 2 and "notices" not in mailstore_stats(r)

    before = failover.read(r)
    failover.stop(r, None, now=2000.0)
    for expected in (2, 0):  # the second run finds everyone told
        told = notices.notify(r, s, users, notices.STOP, before, failover.iter_affected(users, before))
        assert told.queued == expected
    assert r.hget(keys.notice_marker("ann@example.com"), "stop") == b"1000.000"

    scope = failover.start(r, ["store2"], now=3000.0)
    store2 = failover.iter_affected(users, scope, ["store2"])
    again = notices.notify(r, s, users, notices.START, scope, store2)
    assert (again.queued, again.already) == (1, 0)
    assert len(outbound.scan(r)) == 5


def test_notify_without_webmail_url_changes_nothing(r: redis.Redis, users: Directory, redis_url: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, redis_url, "failover", "start", "--mailstore", "store1", "--notify")
    assert code == 1
    assert err == ("fallback failover: --notify needs the webmail URL users should open: --webmail-url URL "
                   "(or FALLBACK_WEBMAIL_URL); nothing changed\n")
    assert failover.read(r).mode == failover.DEFAULT and outbound.scan(r) == []


def test_notify_without_any_domain_names_the_setting(r: redis.Redis, settings: Settings) -> None:
    d = Directory(r, ensure_buckets(r, settings.directory_buckets))
    with pytest.raises(Exception, match="no notice sender: set notice_sender"):
        notices.notify(r, replace(settings, webmail_url=URL), d, notices.START, failover.read(r), [])


def test_a_failed_submit_leaves_the_user_to_be_told(r: redis.Redis, users: Directory,
                                                   settings: Settings) -> None:
    s = replace(settings, webmail_url=URL)
    scope = failover.start(r, ["store1"], now=1000.0)
    r.set(keys.outbound_stream("postmaster@example.com"), "not a stream")  # the XADD fails
    with pytest.raises(redis.ResponseError):
        notices.notify(r, s, users, notices.START, scope, failover.iter_affected(users, scope))
    assert not r.hexists(keys.notice_marker("ann@example.com"), "start")
    r.delete(keys.outbound_stream("postmaster@example.com"))
    assert notices.notify(r, s, users, notices.START, scope, failover.iter_affected(users, scope)).queued == 1


@pytest.mark.parametrize("flags, error", [
    ({"webmail_url": "webmail.example.net"}, "webmail_url: 'webmail.example.net' must look like https://HOST/..."),
    ({"notice_sender": "not an address"}, "notice_sender: not an email address: 'not an address'"),
    ({"metrics_flush_interval": "0"}, "metrics_flush_interval: must be greater than 0"),
])
def test_bad_settings(flags: dict[str, str], error: str) -> None:
    from fallback.config import load_settings
    from fallback.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        load_settings(flags, env={})
    assert exc.value.reason == error


# --- audit entries of `fallback queue` ----------------------------------------------------


def test_queue_retry_and_delete_are_audited(r: redis.Redis, redis_url: str, settings: Settings,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    msg_id = "01TESTMSGID00000000000000B"
    outbound.submit(r, sender="alice@example.com", mailstore="default", recipients=["x@remote.test"],
                    raw=b"Subject: hi\r\n\r\nhi\r\n", msg_id=msg_id)
    assert cli(capsys, redis_url, "queue", "retry", msg_id, "--actor", "ops")[0] == 0
    assert cli(capsys, redis_url, "queue", "delete", msg_id, "--yes", "--actor", "ops")[0] == 0
    entries = [(e.action, e.actor, e.args, e.outcome) for e in audit.recent(r)]
    assert entries == [
        ("queue delete", "ops", {"id": msg_id, "sender": "alice@example.com"},
         "ok: 1 recipient(s) marked failed"),
        ("queue retry", "ops", {"id": msg_id, "sender": "alice@example.com"}, "ok: queued for delivery now"),
    ]
    # A refused action writes nothing.
    code, _, err = cli(capsys, redis_url, "queue", "retry", ids.new_id())
    assert code == 1 and "not in the outbound queue" in err
    assert len(audit.recent(r)) == 2


def test_notice_text_is_plain_utf8(settings: Settings) -> None:
    s = replace(settings, webmail_url=URL, incident_message="Störung im Rechenzentrum")
    raw = notices.compose(notices.START, Mailbox("ann@example.com", "s", "", "ann@home.example"),
                          "postmaster@example.com", s)
    msg: Any = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "text/plain" and "Störung im Rechenzentrum" in msg.get_content()
    assert b"\r\n" in raw


def test_purge_is_audited_and_a_refused_purge_is_not(r: redis.Redis, redis_url: str, mailboxes: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from tests.reconcile_helpers import message, put

    msg_id, raw = message("alice@example.com", "done")
    put(r, "alice@example.com", raw, msg_id)
    r.hset(keys.message("alice@example.com", msg_id), mapping={"rstate": "done", "rts": 0})
    r.srem(keys.pending("alice@example.com"), msg_id)
    assert cli(capsys, redis_url, "purge", "--reconciled")[0] == 1  # no --yes, no terminal
    assert audit.recent(r) == []
    assert cli(capsys, redis_url, "purge", "--reconciled", "--yes", "--actor", "ops")[0] == 0
    (entry,) = audit.recent(r)
    assert (entry.action, entry.actor, entry.args) == (
        "purge", "ops", {"reconciled": True, "older_than_days": 0.0})
    assert entry.outcome == f"ok: deleted 1 message(s), {len(raw)} bytes"
