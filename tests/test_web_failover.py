"""The webmail under a scoped failover: who may log in, the restored banner, and the admin API."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from fallback import keys
from fallback.cli import main
from fallback.config import Settings
from fallback.errors import ConfigError
from fallback.mailbox import fields, store
from fallback.mailbox.directory import Directory, Mailbox, ensure_buckets
from fallback.maillog import LOGGER_NAME
from fallback.ops import failover
from fallback.queues import outbound
from tests.conftest import add_mailbox, cached_hash
from tests.test_web_auth import login, session_keys
from tests.test_web_compose import send as compose
from tests.webutil import log_in_as, make_app

TOKEN = "admin-token-0123456789abcdef"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Few directory buckets: listing every mailbox (affected) stays quick."""
    return replace(settings, directory_buckets=64)


@pytest.fixture
def stores(r: redis.Redis, settings: Settings) -> None:
    """alice on store1, bob on store2 (password "secret"); store1 failed over."""
    add_mailbox(r, settings, "alice@example.com", mailstore="store1")
    add_mailbox(r, settings, "bob@example.com", mailstore="store2")
    failover.start(r, ["store1"])


@pytest.fixture
def app(settings: Settings, r: redis.Redis, stores: None) -> Any:
    # failover_cache_ttl tiny: a scope change made by the test is seen on the next request.
    return make_app(settings, r, failover_cache_ttl=0.001, admin_token=TOKEN)


def test_only_failed_over_users_get_a_session(app: Any, r: redis.Redis) -> None:
    client = app.test_client()
    response = login(client, "bob@example.com")
    assert response.status_code == 200
    assert "Your mailbox is working normally" in response.text and "bob@example.com" in response.text
    assert "fallback_session" not in response.headers.get("Set-Cookie", "")
    assert session_keys(r) == []
    assert client.get("/").headers["Location"].endswith("/login")

    # The scope is only told after a correct password: a wrong one gets the usual answer.
    wrong = login(client, "bob@example.com", password="nope")
    assert wrong.status_code == 401 and "Wrong address or password." in wrong.text
    assert "working normally" not in wrong.text

    ok = login(client, "alice@example.com")
    assert ok.status_code == 302 and len(session_keys(r)) == 1
    inbox = client.get("/")
    assert inbox.status_code == 200 and "Your normal mailbox works again" not in inbox.text


def test_session_outlives_failover_stop_with_a_banner(app: Any, r: redis.Redis) -> None:
    client = app.test_client()
    assert login(client, "alice@example.com").status_code == 302
    failover.stop(r, ["store1"])

    inbox = client.get("/")
    assert inbox.status_code == 200
    assert "Your normal mailbox works again" in inbox.text and "until you log out" in inbox.text
    assert client.get("/compose").status_code == 200

    # A new log-in is refused now, like for any user whose mailbox works normally.
    other = app.test_client()
    again = login(other, "alice@example.com")
    assert again.status_code == 200 and "working normally" in again.text


def test_everyone_logs_in_before_any_failover(settings: Settings, r: redis.Redis) -> None:
    add_mailbox(r, settings, "bob@example.com", mailstore="store2")
    client = make_app(settings, r).test_client()
    assert login(client, "bob@example.com").status_code == 302


# --- sending: the same routing as mail from SMTP ------------------------------------------

def test_webmail_mail_for_a_healthy_mailstore_goes_to_the_forward_queue(
        app: Any, r: redis.Redis, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """bob's mailstore is healthy: his copy goes to the main system like SMTP mail, not into a
    fallback mailbox nobody can log into; carol (store1, failed over) gets hers here."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    add_mailbox(r, settings, "carol@example.com", mailstore="store1")
    client = app.test_client()
    log_in_as(client, "alice@example.com")
    resp, msg_id = compose(client, to="bob@example.com, carol@example.com", cc="x@remote.test",
                           subject="routing", body="one decision")
    assert resp.status_code == 302 and resp.headers["Location"].endswith("sent=1")
    assert r.zrange(keys.folder("alice@example.com", fields.SENT), 0, -1) == [msg_id.encode()]
    sent = store.MailboxReader(r, "alice@example.com").raw(msg_id)
    assert sent is not None and sent.startswith(b"Received: from webmail")

    record: Any = r.hgetall(keys.forward_record("bob@example.com", msg_id))
    assert record[b"raw"] == sent and record[b"sender"] == b"alice@example.com"
    assert record[b"rcpt"] == b"bob@example.com"
    entries: Any = r.xrange(keys.forward_stream("bob@example.com"))
    assert [e for _, e in entries] == [{b"a": b"bob@example.com", b"id": msg_id.encode()}]
    assert r.zcard(keys.folder("bob@example.com", fields.INBOX)) == 0
    assert not r.exists(keys.message("bob@example.com", msg_id))

    assert store.MailboxReader(r, "carol@example.com").raw(msg_id) == sent
    assert not r.exists(keys.forward_record("carol@example.com", msg_id))
    assert sorted(outbound.recipient_status(r, "alice@example.com", msg_id)) == ["x@remote.test"]

    lines = [rec.getMessage() for rec in caplog.records if rec.name == LOGGER_NAME]
    assert any(ln.startswith("event=queued") and "to=bob@example.com" in ln and "route=forward" in ln
               and "via=webmail" in ln for ln in lines), lines
    assert any(ln.startswith("event=received") and "to=carol@example.com" in ln
               and "route=mailbox" in ln for ln in lines), lines


# --- the admin API ---------------------------------------------------------------------


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("headers, error", [
    ({}, "missing token: send Authorization: Bearer TOKEN"),
    ({"Authorization": "Basic YWRtaW46eA=="}, "missing token: send Authorization: Bearer TOKEN"),
    ({"Authorization": "Bearer "}, "missing token: send Authorization: Bearer TOKEN"),
    (bearer("admin-token-0123456789abcdeX"), "wrong token"),
    (bearer(TOKEN[:-1]), "wrong token"),
])
def test_admin_api_refuses_without_the_token(app: Any, headers: dict[str, str], error: str) -> None:
    for path in ("/admin/api/status", "/admin/api/affected"):
        response = app.test_client().get(path, headers=headers)
        assert response.status_code == 401
        assert response.json == {"error": error}
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_admin_api_off_without_a_configured_token(settings: Settings, r: redis.Redis, stores: None) -> None:
    client = make_app(settings, r).test_client()
    response = client.get("/admin/api/status", headers=bearer())
    assert response.status_code == 403
    assert response.json == {"error": "the admin API is off: set admin_token or admin_token_file"}


def test_short_admin_token_refuses_to_start(settings: Settings, r: redis.Redis) -> None:
    with pytest.raises(ConfigError, match="admin_token: too short"):
        make_app(settings, r, admin_token="short")


def test_admin_status(app: Any, r: redis.Redis) -> None:
    response = app.test_client().get("/admin/api/status", headers=bearer())
    assert response.status_code == 200 and response.mimetype == "application/json"
    data = response.json
    assert data["scope"]["mode"] == "listed" and list(data["scope"]["mailstores"]) == ["store1"]
    assert data["affected"] == 1
    assert data["mailstores"]["store1"] == {"mailboxes": 1, "messages": 0, "bytes": 0, "failed_over": True}
    assert data["mailstores"]["store2"]["failed_over"] is False
    assert set(data["queues"]) == {"outbound", "forward"}
    assert data["queues"]["outbound"] == {"depth": 0, "oldest_age_seconds": 0.0, "dead": 0}
    assert data["redis"]["aof_enabled"] is True and data["redis"]["used_memory"] > 0
    assert "Set-Cookie" not in response.headers


def test_admin_api_ignores_a_session_cookie_and_answers_json_errors(app: Any) -> None:
    client = app.test_client()
    log_in_as(client, "alice@example.com")
    response = client.get("/admin/api/status")  # a logged-in browser, no token: refused
    assert response.status_code == 401
    assert client.post("/admin/api/status", headers=bearer()).status_code == 405
    missing = client.get("/admin/api/nothing", headers=bearer())
    assert missing.status_code == 404 and "error" in missing.json


def test_admin_affected_matches_the_cli(app: Any, r: redis.Redis, settings: Settings, redis_url: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    d = Directory(r, ensure_buckets(r, settings.directory_buckets))
    for i in range(30):
        d.put(Mailbox(f"user{i}@example.net", "store1" if i % 2 else "store3",
                      cached_hash("x", "SHA512-CRYPT"), f"user{i}@home.example" if i % 3 == 0 else ""))
    failover.start(r, ["store3"])
    client = app.test_client()
    for query, argv in (("", []), ("?mailstore=store3", ["--mailstore", "store3"]),
                        ("?mailstore=store1&mailstore=store3", ["--mailstore", "store1", "store3"]),
                        ("?mailstore=store2", ["--mailstore", "store2"])):
        response = client.get("/admin/api/affected" + query, headers=bearer())
        assert response.status_code == 200 and response.mimetype == "application/json"
        assert main(["affected", "--format", "json", "--redis-url", redis_url, *argv]) == 0
        cli = capsys.readouterr().out
        assert json.loads(response.text) == json.loads(cli)
    everyone = json.loads(client.get("/admin/api/affected", headers=bearer()).text)
    assert len(everyone) == 31  # alice + 15 on store1 + 15 on store3; bob (store2) is not affected
    assert {"address": "user0@example.net", "domain": "example.net", "mailstore": "store3",
            "alternate": "user0@home.example"} in everyone


def test_admin_affected_bad_mailstore(app: Any) -> None:
    response = app.test_client().get("/admin/api/affected?mailstore=no%20such", headers=bearer())
    assert response.status_code == 400
    assert response.json == {"error": "not a mailstore name: 'no such' (letters, digits, . _ -)"}


def test_admin_api_redis_down_is_json_503(settings: Settings, stores: None) -> None:
    from tests.servers import free_port

    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    app = make_app(replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}"), dead, admin_token=TOKEN)
    response = app.test_client().get("/admin/api/status", headers=bearer())
    assert response.status_code == 503 and response.json == {"error": "Redis is not answering"}
