"""Reseller tokens: `fallback token create|list|revoke`, and what such a token sees of the admin API.

Two resellers on one service: A holds example.com, B holds example.net and
other.test.  Each sees only its own users, counts and queue figures; the
admin token sees everything; a wrong, expired or revoked token is 401 and
counted in /metrics; one client past the brute-force guard gets 429.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from typing import Any

import pytest
import redis

from fallback import ids, keys
from fallback.cli import main
from fallback.config import Settings
from fallback.mailbox.directory import Directory, Mailbox, ensure_buckets
from fallback.ops import audit, failover, reseller, tokens
from fallback.queues import forward, outbound
from tests.conftest import add_mailbox, cached_hash
from tests.webutil import make_app
from web import admin

ADMIN = "admin-token-0123456789abcdef"
BODY = b"From: someone@example.com\r\nTo: x@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return replace(settings, directory_buckets=64)


def cli(capsys: pytest.CaptureFixture[str], redis_url: str, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--redis-url", redis_url])
    got = capsys.readouterr()
    return code, got.out, got.err


def new_token(capsys: pytest.CaptureFixture[str], redis_url: str, *argv: str) -> str:
    code, out, err = cli(capsys, redis_url, "token", "create", *argv)
    assert code == 0, err
    return out.strip().splitlines()[-1]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def failures(client: Any) -> dict[str, float]:
    """fallback_admin_auth_failures_total by reason, as /metrics shows it (from loopback)."""
    text = client.get("/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^fallback_admin_auth_failures_total\{reason="([a-z]+)"\} (\S+)$', text, re.M)}


# --- the CLI ---------------------------------------------------------------------------

def test_create_list_revoke(r: redis.Redis, redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    token = new_token(capsys, redis_url, "--domain", "Example.COM", "--domain", "bücher.example",
                      "--name", "acme", "--expires", "30d", "--actor", "ops-anna")
    assert token.startswith(tokens.PREFIX) and len(token) > 40
    # Only the hash is kept: the token itself is in no Redis value.
    for key in r.scan_iter("admin:*"):
        values = r.hvals(key) if r.type(key) == b"hash" else []
        assert all(token.encode() not in v for v in values) and token.encode() not in key
    assert r.hget(keys.RESELLER_DIGESTS, tokens.digest(token)) == b"acme"

    code, out, _ = cli(capsys, redis_url, "token", "list")
    assert code == 0 and token not in out
    assert "acme" in out and "ops-anna" in out and re.search(r"\d{4}-\d\d-\d\d", out)
    code, out, _ = cli(capsys, redis_url, "token", "list", "--format", "json")
    [listed] = json.loads(out)
    assert token not in out and listed["name"] == "acme" and listed["creator"] == "ops-anna"
    assert listed["domains"] == ["example.com", "xn--bcher-kva.example"]
    assert 29.9 * 86400 < listed["expires"] - listed["created"] <= 30 * 86400
    assert listed["last_used"] is None and listed["expired"] is False

    # A duplicate name is refused with one line, and the first token still works.
    code, out, err = cli(capsys, redis_url, "token", "create", "--domain", "example.org", "--name", "acme")
    assert code == 1 and out == ""
    assert err == "fallback token: a token named 'acme' exists already (fallback token list)\n"
    assert isinstance(tokens.authenticate(r, token, None), tokens.Principal)

    code, out, err = cli(capsys, redis_url, "token", "revoke", "acme", "--actor", "ops-anna")
    assert code == 0 and "revoked token acme" in out
    assert tokens.authenticate(r, token, None) == tokens.Refused("revoked", "token revoked")
    code, out, err = cli(capsys, redis_url, "token", "revoke", "acme")
    assert code == 1 and err == "fallback token: no token named 'acme' (fallback token list)\n"
    code, out, _ = cli(capsys, redis_url, "token", "list")
    assert "acme" not in out and "reseller tokens: 0" in out
    # The name is free again after the revocation.
    assert new_token(capsys, redis_url, "--domain", "example.org", "--name", "acme") != token

    done = [(e.action, e.actor, e.args.get("name")) for e in audit.since(r, 3600)]
    assert ("token create", "ops-anna", "acme") in done and ("token revoke", "ops-anna", "acme") in done


@pytest.mark.parametrize("argv, message", [
    (["--domain", "not a domain"], "--domain: not a domain name: 'not a domain'"),
    (["--domain", "a@example.com"], "--domain: not a domain name: 'a@example.com'"),
    (["--domain", "localhost"], "--domain: not a domain name: 'localhost'"),
    (["--domain", "example.com", "--name", "bad name"],
     "--name: 'bad name' is not a token name (letters, digits, . _ -; at most 64)"),
    (["--domain", "example.com", "--expires", "soon"],
     "--expires: not a duration: 'soon' (use e.g. 60, 90s, 10m, 5d)"),
    (["--domain", "example.com", "--expires", "0"], "--expires must be greater than 0"),
])
def test_create_bad_input(r: redis.Redis, redis_url: str, capsys: pytest.CaptureFixture[str],
                          argv: list[str], message: str) -> None:
    code, out, err = cli(capsys, redis_url, "token", "create", *argv)
    assert code == 1 and out == "" and err == f"fallback token: {message}\n"
    assert not r.hlen(keys.RESELLERS) and not r.hlen(keys.RESELLER_DIGESTS)


# --- the admin API ---------------------------------------------------------------------

@pytest.fixture
def world(r: redis.Redis, settings: Settings, redis_url: str,
          capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """Users of three domains, store1 failed over, mail of each in the queues, two resellers."""
    for address, store in (("alice@example.com", "store1"), ("bob@example.com", "store2"),
                           ("carol@example.net", "store1"), ("dave@other.test", "store1"),
                           ("erin@other.test", "store2")):
        add_mailbox(r, settings, address, mailstore=store)
    failover.start(r, ["store1"])
    outbound.submit(r, sender="alice@example.com", mailstore="store1", recipients=["x@example.org"],
                    raw=BODY, msg_id=ids.new_id())
    outbound.submit(r, sender="carol@example.net", mailstore="store1", recipients=["x@example.org"],
                    raw=BODY, msg_id=ids.new_id())
    forward.enqueue(r, ["bob@example.com"], ids.new_id(), BODY, "someone@example.org")
    forward.enqueue(r, ["bob@example.com"], ids.new_id(), BODY, "someone@example.org")
    return {"a": new_token(capsys, redis_url, "--domain", "example.com", "--name", "reseller-a"),
            "b": new_token(capsys, redis_url, "--domain", "example.net", "--domain", "other.test",
                           "--name", "reseller-b")}


@pytest.fixture
def app(settings: Settings, r: redis.Redis) -> Any:
    return make_app(settings, r, failover_cache_ttl=0.001, admin_token=ADMIN)


def addresses(response: Any) -> list[str]:
    assert response.status_code == 200, response.text
    return sorted(m["address"] for m in response.json["mailboxes"])


def test_each_reseller_sees_only_its_domains(app: Any, world: dict[str, str]) -> None:
    client = app.test_client()
    a = client.get("/admin/api/affected", headers=bearer(world["a"]))
    assert addresses(a) == ["alice@example.com"] and a.json["next_cursor"] is None
    assert "X-Failover-Scope" not in a.headers  # it names every customer's mailstores
    b = client.get("/admin/api/affected", headers=bearer(world["b"]))
    assert addresses(b) == ["carol@example.net", "dave@other.test"]
    # Asking for a mailstore narrows further; it never widens past the token's domains.
    b1 = client.get("/admin/api/affected?mailstore=store1", headers=bearer(world["b"]))
    assert addresses(b1) == ["carol@example.net", "dave@other.test"]

    sa = client.get("/admin/api/status", headers=bearer(world["a"])).json
    assert sa["token"] == {"name": "reseller-a", "domains": ["example.com"]}
    assert set(sa) == {"token", "domains"}  # no Redis, mailstore or scope figures of everyone
    assert sa["domains"]["example.com"]["mailboxes"] == 2
    assert sa["domains"]["example.com"]["queues"]["outbound"]["depth"] == 1
    assert sa["domains"]["example.com"]["queues"]["forward"]["depth"] == 2
    sb = client.get("/admin/api/status", headers=bearer(world["b"])).json
    assert set(sb["domains"]) == {"example.net", "other.test"}
    assert sb["domains"]["example.net"]["mailboxes"] == 1 and sb["domains"]["other.test"]["mailboxes"] == 2
    assert sb["domains"]["example.net"]["queues"]["outbound"]["depth"] == 1
    assert sb["domains"]["other.test"]["queues"] == {
        "outbound": {"depth": 0, "oldest_age_seconds": 0.0, "dead": 0},
        "forward": {"depth": 0, "oldest_age_seconds": 0.0, "dead": 0}}

    # The admin token still sees everything, in the old shapes.
    everyone = client.get("/admin/api/affected", headers=bearer(ADMIN))
    assert sorted(m["address"] for m in json.loads(everyone.text)) == [
        "alice@example.com", "carol@example.net", "dave@other.test"]
    assert everyone.headers["X-Failover-Scope"]
    full = client.get("/admin/api/status", headers=bearer(ADMIN)).json
    assert full["affected"] == 3 and full["queues"]["forward"]["depth"] == 2 and "redis" in full


def test_reseller_tokens_work_without_an_admin_token(settings: Settings, r: redis.Redis,
                                                     world: dict[str, str]) -> None:
    client = make_app(settings, r).test_client()
    assert addresses(client.get("/admin/api/affected", headers=bearer(world["a"]))) == ["alice@example.com"]
    response = client.get("/admin/api/status", headers=bearer(ADMIN))  # no admin token: still off
    assert response.status_code == 403 and response.json == {"error": admin.MESSAGES["off"]}


def test_reseller_gets_403_elsewhere(settings: Settings, r: redis.Redis, world: dict[str, str]) -> None:
    app = make_app(settings, r, admin_token=ADMIN)
    # Any other endpoint of the admin blueprint (the console adds more later) is refused.
    app.add_url_rule("/admin/api/queue", endpoint="admin.queue", view_func=lambda: {"queue": []})
    client = app.test_client()
    response = client.get("/admin/api/queue", headers=bearer(world["a"]))
    assert response.status_code == 403
    assert response.json == {"error": admin.MESSAGES["reseller"]}
    assert response.json["error"] == ("a reseller token may only read /admin/api/status and "
                                      "/admin/api/affected")
    assert client.get("/admin/api/queue", headers=bearer(ADMIN)).json == {"queue": []}


def test_wrong_expired_revoked_are_401_and_counted(app: Any, r: redis.Redis, world: dict[str, str],
                                                  redis_url: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    client = app.test_client()
    expired, _ = tokens.create(r, ["example.com"], "old", 60, "test", now=time.time() - 120)
    code, _, _ = cli(capsys, redis_url, "token", "revoke", "reseller-b")
    assert code == 0
    # The same length and prefix as a real token, one character off: still only "wrong".
    near = world["a"][:-1] + ("A" if world["a"][-1] != "A" else "B")
    before = failures(client)
    for token, text in ((near, "wrong token"), (expired, "token expired"),
                        (world["b"], "token revoked"), ("x" * 43, "wrong token")):
        for path in ("/admin/api/status", "/admin/api/affected"):
            response = client.get(path, headers=bearer(token))
            assert response.status_code == 401 and response.json == {"error": text}
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/admin/api/status", headers={}).status_code == 401
    after = failures(client)
    assert after.get("wrong", 0) - before.get("wrong", 0) == 4
    assert after.get("expired", 0) - before.get("expired", 0) == 2
    assert after.get("revoked", 0) - before.get("revoked", 0) == 2
    assert after.get("missing", 0) - before.get("missing", 0) == 1
    # The good token still works, and its use is listed.
    assert client.get("/admin/api/status", headers=bearer(world["a"])).status_code == 200
    code, out, _ = cli(capsys, redis_url, "token", "list", "--format", "json")
    used = {t["name"]: t["last_used"] for t in json.loads(out)}
    assert used["reseller-a"] is not None and used["old"] is None


def test_brute_force_guard(app: Any, world: dict[str, str]) -> None:
    client = app.test_client()
    env = {"REMOTE_ADDR": "127.0.0.2"}
    for n in range(admin.GUARD_FAILURES):  # up to the limit: each one is an ordinary 401
        response = client.get("/admin/api/status", headers=bearer(f"guess-{n}"), environ_base=env)
        assert response.status_code == 401, n
    before = failures(client).get("throttled", 0)
    # Past it: refused before the token is looked at, even the right one.
    for token in ("guess-again", world["a"], ADMIN):
        response = client.get("/admin/api/status", headers=bearer(token), environ_base=env)
        assert response.status_code == 429
        wait = int(response.headers["Retry-After"])
        assert 0 < wait <= admin.GUARD_WINDOW
        assert response.json == {"error": f"too many wrong tokens from your address: try again in "
                                          f"{wait} seconds"}
    assert failures(client).get("throttled", 0) - before == 3
    # Another client is not affected.
    other = client.get("/admin/api/status", headers=bearer(world["a"]),
                       environ_base={"REMOTE_ADDR": "127.0.0.3"})
    assert other.status_code == 200


# --- paging ----------------------------------------------------------------------------

@pytest.fixture
def many(r: redis.Redis, settings: Settings) -> list[str]:
    d = Directory(r, ensure_buckets(r, settings.directory_buckets))
    pw = cached_hash("x", "SHA512-CRYPT")
    mine = [f"user{i:03d}@example.com" for i in range(250)]
    d.put_many((Mailbox(a, "store1", pw), None) for a in mine)
    d.put_many((Mailbox(f"user{i:03d}@example.net", "store1", pw), None) for i in range(250))
    d.put_many((Mailbox(f"gone{i:03d}@example.com", "store2", pw), None) for i in range(30))
    failover.start(r, ["store1"])
    return mine


def test_affected_pages(app: Any, many: list[str], redis_url: str,
                        capsys: pytest.CaptureFixture[str]) -> None:
    client = app.test_client()
    token = new_token(capsys, redis_url, "--domain", "example.com")
    seen: list[str] = []
    cursor, pages = "", 0
    while pages < 20:
        response = client.get(f"/admin/api/affected?limit=100&cursor={cursor}", headers=bearer(token))
        rows = addresses(response)
        assert len(rows) <= 100
        seen += rows
        pages += 1
        cursor = response.json["next_cursor"]
        if cursor is None:
            break
    assert cursor is None and pages >= 3
    assert sorted(seen) == many and len(set(seen)) == len(seen)  # every one, once

    # The limit: 1000 is taken, 1001 and nonsense are refused with the reason.
    assert client.get("/admin/api/affected?limit=1000", headers=bearer(token)).status_code == 200
    for query, text in (("limit=1001", "limit must be a whole number from 1 to 1000"),
                        ("limit=0", "limit must be a whole number from 1 to 1000"),
                        ("limit=ten", "limit must be a whole number from 1 to 1000"),
                        ("cursor=abc", "cursor is not one this API gave out (use next_cursor of "
                                       "the previous page)"),
                        ("cursor=99999.0", "cursor is not one this API gave out (use next_cursor "
                                           "of the previous page)")):
        response = client.get(f"/admin/api/affected?{query}", headers=bearer(token))
        assert response.status_code == 400 and response.json == {"error": text}
    # The admin token pages too when asked, over every domain.
    admin_rows = client.get("/admin/api/affected?limit=1000", headers=bearer(ADMIN))
    assert len(addresses(admin_rows)) == 500


def test_a_page_reads_a_bounded_part_of_the_directory(r: redis.Redis, settings: Settings,
                                                      many: list[str]) -> None:
    d = Directory(r, ensure_buckets(r, settings.directory_buckets))
    scope = failover.read(r)
    seen: list[str] = []
    bucket = offset = 0
    for _ in range(200):  # 530 entries, at most ~one bucket past 50 read per page
        page = reseller.affected_page(d, scope, {"example.com"}, None, 1000, bucket, offset, scan_budget=50,
                                      batch=4)
        seen += [m.address for m in page.rows]
        assert len(page.rows) < 100  # the budget, not the limit, ended the page
        if page.next_cursor is None:
            break
        _, bucket, offset = reseller.parse_paging(None, page.next_cursor, d.buckets)
    assert page.next_cursor is None and sorted(seen) == many
