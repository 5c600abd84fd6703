"""Webmail sessions end when they should: at their max age however active, and at once on
`fallback mailbox remove`, `fallback mailbox logout` and a password-changing
re-provision (but not on one that keeps the password)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from fallback import keys
from fallback.cli import main
from fallback.config import Settings
from tests.conftest import cached_hash
from tests.webutil import log_in_as, make_app
from web.sessions import COOKIE

SESSION_KEYS = "websess:*"


def logged_in(client: FlaskClient) -> bool:
    resp = client.get("/")
    if resp.status_code == 302:
        assert resp.headers["Location"].endswith("/login")
        return False
    assert resp.status_code == 200
    return True


def run(capsys: pytest.CaptureFixture[str], redis_url: str, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--redis-url", redis_url])
    out, err = capsys.readouterr()
    return code, out, err


def only_session_key(r: redis.Redis) -> bytes:
    (key,) = r.scan_iter(SESSION_KEYS)
    return bytes(key)


def test_max_age_ends_an_active_session(settings: Settings, r: redis.Redis, mailboxes: list[str]) -> None:
    max_age = 3600.0
    app = make_app(settings, r, session_max_age=max_age, session_idle_timeout=1800.0)
    client = app.test_client()
    log_in_as(client, "alice@example.com")
    key = only_session_key(r)
    index = keys.web_sessions_of("alice@example.com")
    assert r.zcard(index) == 1 and 0 < r.ttl(index) <= max_age + 1
    # Just inside its max age: still served, and its TTL never reaches past the max age
    # even though the idle timeout (30 min) is longer than what is left (60 s).
    r.hset(key, "created", repr(time.time() - max_age + 60))
    r.pexpire(key, 1000)  # make the request renew the timer
    assert logged_in(client)
    assert 1000 < r.pttl(key) <= 60_000
    # Past it: the next request finds no session, however recently the last one came.
    r.hset(key, "created", repr(time.time() - max_age - 1))
    assert not logged_in(client)
    assert not r.exists(key) and r.zcard(index) == 0


def test_max_age_in_real_time(settings: Settings, r: redis.Redis, mailboxes: list[str]) -> None:
    client = make_app(settings, r, session_max_age=1.0).test_client()
    log_in_as(client, "alice@example.com")
    assert logged_in(client)
    for _ in range(200):  # bounded: a request every 50 ms keeps it active until the max age
        if not logged_in(client):
            break
        time.sleep(0.05)
    assert not logged_in(client) and list(r.scan_iter(SESSION_KEYS)) == []


def test_mailbox_logout_ends_every_session_of_that_user(
        web_app: Any, r: redis.Redis, redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    phone, laptop, bob = web_app.test_client(), web_app.test_client(), web_app.test_client()
    log_in_as(phone, "alice@example.com")
    log_in_as(laptop, "alice@example.com")
    log_in_as(bob, "bob@example.com")
    gone = web_app.test_client()
    log_in_as(gone, "alice@example.com")
    token = gone.get_cookie(COOKIE).value
    # An idle-expired session leaves its digest in the index: it is not counted as ended.
    r.delete(keys.web_session(hashlib.sha256(token.encode()).hexdigest()))
    assert r.zcard(keys.web_sessions_of("alice@example.com")) == 3
    live = [c for c in (phone, laptop, gone) if logged_in(c)]
    assert len(live) == 2

    code, out, _ = run(capsys, redis_url, "mailbox", "logout", "<Alice@Example.COM>")
    assert code == 0 and out == "ended 2 webmail sessions of alice@example.com\n"
    assert not logged_in(phone) and not logged_in(laptop)
    assert logged_in(bob)  # other users are untouched
    assert r.zcard(keys.web_sessions_of("alice@example.com")) == 0
    code, out, _ = run(capsys, redis_url, "mailbox", "logout", "alice@example.com")
    assert code == 0 and out == "ended 0 webmail sessions of alice@example.com\n"
    code, out, err = run(capsys, redis_url, "mailbox", "logout", "nobody@example.com")
    assert code == 1 and out == "" and err == "fallback mailbox: nobody@example.com is not provisioned\n"
    code, _, err = run(capsys, redis_url, "mailbox", "logout", "not an address")
    assert code == 1 and err.startswith("fallback mailbox: not an email address")


def test_logging_out_removes_the_session_from_the_index(web_app: Any, r: redis.Redis) -> None:
    from tests.test_web_auth import csrf, login

    client = web_app.test_client()
    assert login(client).status_code == 302
    index = keys.web_sessions_of("alice@example.com")
    assert r.zcard(index) == 1
    client.post("/logout", data={"csrf_token": csrf(client.get("/").text)})
    assert r.zcard(index) == 0 and list(r.scan_iter(SESSION_KEYS)) == []


def test_mailbox_remove_ends_sessions(web_app: Any, r: redis.Redis, redis_url: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    client, bob = web_app.test_client(), web_app.test_client()
    log_in_as(client, "alice@example.com")
    log_in_as(bob, "bob@example.com")
    code, out, _ = run(capsys, redis_url, "mailbox", "remove", "alice@example.com")
    assert code == 0 and out == "removed alice@example.com; ended 1 webmail session\n"
    assert not logged_in(client) and logged_in(bob)


def write_passwd(path: Path, password_hash: str) -> Path:
    path.write_text(f"alice@example.com:{password_hash}::::::\n")
    return path


def test_reprovision_ends_sessions_only_when_the_password_changes(
        web_app: Any, r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    old = cached_hash("secret", "SHA512-CRYPT")  # what the fixture provisioned
    client, bob = web_app.test_client(), web_app.test_client()
    log_in_as(client, "alice@example.com")
    log_in_as(bob, "bob@example.com")
    same = write_passwd(tmp_path / "same.passwd", old)
    assert run(capsys, redis_url, "provision", str(same))[0] == 0
    assert logged_in(client)  # the same hash again: nothing changed, the session goes on

    csv = tmp_path / "plain.csv"  # the same password as plain text keeps the hash too
    csv.write_text("address,password,mailstore\nalice@example.com,secret,default\n")
    assert run(capsys, redis_url, "provision", str(csv))[0] == 0
    assert logged_in(client)

    changed = write_passwd(tmp_path / "new.passwd", cached_hash("new-secret", "SHA512-CRYPT"))
    assert run(capsys, redis_url, "provision", str(changed))[0] == 0
    assert not logged_in(client)  # a new password: the old sessions end at once
    assert logged_in(bob)


def test_mailbox_add_with_a_new_password_ends_sessions(
        web_app: Any, r: redis.Redis, redis_url: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    client = web_app.test_client()
    log_in_as(client, "alice@example.com")
    monkeypatch.setattr("sys.stdin", io.StringIO("secret\n"))  # the same password again
    code, out, _ = run(capsys, redis_url, "mailbox", "add", "alice@example.com", "--password-stdin")
    assert code == 0 and out == "updated alice@example.com (mailstore default)\n"
    assert logged_in(client)
    code, out, _ = run(capsys, redis_url, "mailbox", "add", "alice@example.com", "--password-hash",
                       cached_hash("other", "SHA512-CRYPT"))
    assert code == 0 and out == ("updated alice@example.com (mailstore default)\n"
                                 "password changed: ended 1 webmail session of alice@example.com\n")
    assert not logged_in(client)
