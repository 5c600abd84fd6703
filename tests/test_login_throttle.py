"""The log-in throttle against a real Redis: one account whatever its spelling, client
networks, atomic counting under concurrent guesses, the owner not locked out, the
bounded hashing queue, long passwords, and `fallback mailbox unthrottle`."""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from passlib.hash import argon2

from fallback import keys
from fallback.cli import main
from fallback.config import Settings
from fallback.mailbox import directory
from fallback.maillog import LOGGER_NAME
from tests.conftest import add_mailbox
from tests.webutil import csrf, make_app
from web.sessions import COOKIE
from web.throttle import ACCOUNT_MAX_DELAY, SOURCE_MAX_DELAY, LoginThrottle, client_prefixes

TOO_MANY = re.compile(r"Too many attempts\. Try again in (\d+) seconds?\.")


def form(client: FlaskClient, ip: str) -> str:
    return csrf(client.get("/login", environ_base={"REMOTE_ADDR": ip}).text)


def post(client: FlaskClient, token: str, username: str, password: str, ip: str) -> Any:
    return client.post("/login", data={"username": username, "password": password, "csrf_token": token},
                       environ_base={"REMOTE_ADDR": ip})


def login(client: FlaskClient, username: str = "alice@example.com", password: str = "secret",
          ip: str = "127.0.0.2") -> Any:
    return post(client, form(client, ip), username, password, ip)


def mail_log(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [rec.getMessage() for rec in caplog.records
            if rec.name == LOGGER_NAME and rec.getMessage().startswith(f"event={event} ")]


def frozen(app: Any) -> Any:
    """The app with its throttle's clock stopped: a delay cannot run out while a test
    looks at it, so what is asserted does not depend on how fast the machine is."""
    t = time.time()
    app.extensions["fallback"].throttle.clock = lambda: t
    return app


def throttle_keys(r: redis.Redis, kind: str) -> list[bytes]:
    return sorted(r.scan_iter(f"throttle:{{{kind}:*"))


def test_client_prefixes() -> None:
    assert client_prefixes("192.0.2.7") == ("192.0.2.7/32", "192.0.2.0/24")
    assert client_prefixes("::ffff:192.0.2.7") == ("192.0.2.7/32", "192.0.2.0/24")
    assert client_prefixes("2001:db8:1:2:3:4:5:6") == ("2001:db8:1:2::/64", "2001:db8:1:2::/64")
    assert client_prefixes("2001:db8:1:2::9") == client_prefixes("2001:db8:1:2:ffff::1")
    assert client_prefixes("unknown") == ("unknown", "unknown")


def test_spellings_of_one_address_are_one_account(settings: Settings, r: redis.Redis,
                                                  mailboxes: list[str]) -> None:
    add_mailbox(r, settings, "hans@xn--bcher-kva.example")
    app = frozen(make_app(settings, r, login_source_failures=2, login_account_failures=4))
    client = app.test_client()
    spellings = ["<Hans@BÜCHER.example>", " hans@bücher.example ", "hans@ｂücher.example",
                 "HANS@xn--bcher-kva.EXAMPLE"]
    for n, spelling in enumerate(spellings):  # each from its own network: only the account counts
        resp = login(client, spelling, "wrong", ip=f"10.{n}.0.1")
        assert resp.status_code == 401 and "Wrong address or password." in resp.text
    assert throttle_keys(r, "acct") == [keys.login_throttle("acct", "hans@xn--bcher-kva.example").encode()]
    # The fourth failure reached the account-wide threshold: even the right password waits.
    blocked = login(client, "hans@bücher.example", "secret", ip="10.9.0.1")
    assert blocked.status_code == 429 and TOO_MANY.search(blocked.text)
    assert 'value="hans@bücher.example"' in blocked.text  # the form keeps what was typed
    assert client.get_cookie(COOKIE) is None


def test_not_an_address_is_throttled_by_client(settings: Settings, r: redis.Redis, mailboxes: list[str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    app = frozen(make_app(settings, r, login_source_failures=3))
    client = app.test_client()
    for junk in ("not an address", "@@", "a\u2028b@x"):  # up to its threshold: each is checked
        resp = login(client, junk, "guess", ip="127.0.0.3")
        assert resp.status_code == 401 and "Wrong address or password." in resp.text
    past = login(client, "x" * 400, "guess", ip="127.0.0.3")
    assert past.status_code == 429 and TOO_MANY.search(past.text) and "Traceback" not in past.text
    assert int(past.headers["Retry-After"]) >= 1
    assert len(mail_log(caplog, "login-failed")) == 3
    (refused,) = mail_log(caplog, "login-refused")
    assert "outcome" not in refused and "ip=127.0.0.3" in refused and "client waits" in refused
    assert throttle_keys(r, "acct") == []  # nothing to key an account on
    # The neighbour in the same /24 (allowed 4 x 3) and the owner elsewhere are not held.
    assert login(client, ip="127.0.0.4").status_code == 302
    assert login(client.application.test_client(), ip="127.0.1.5").status_code == 302


def test_guessing_client_is_slowed_and_owner_elsewhere_logs_in(web_app: Any, r: redis.Redis) -> None:
    client = frozen(web_app).test_client()
    source = web_app.extensions["fallback"].settings.login_source_failures
    assert source == 5  # the default
    for n in range(source):  # up to the threshold every guess is checked
        resp = login(client, password=f"guess{n}", ip="127.0.0.2")
        assert resp.status_code == 401, n
    past = login(client, password="secret", ip="127.0.0.2")  # one past: even the right one waits
    assert past.status_code == 429 and "Too many attempts. Try again in 1 second." in past.text
    assert past.headers["Retry-After"] == "1"
    owner = web_app.test_client()
    assert login(owner, ip="127.0.1.5").status_code == 302 and owner.get_cookie(COOKIE) is not None
    # The guessing client stays slowed down whatever account it tries next.
    assert login(client, username="bob@example.com", ip="127.0.0.2").status_code == 429


def test_network_allows_four_times_the_client_threshold(settings: Settings, r: redis.Redis,
                                                        mailboxes: list[str]) -> None:
    client = frozen(make_app(settings, r, login_source_failures=2)).test_client()
    for n in range(8):  # 8 = 4 x 2 failures from one /24, one per address and account
        assert login(client, f"user{n}@example.com", "x", ip=f"127.0.0.{10 + n}").status_code == 401
    assert login(client, ip="127.0.0.30").status_code == 429  # the ninth from that /24 waits
    assert login(client, ip="127.0.1.30").status_code == 302  # the next /24 does not


def test_account_wide_delay_spares_known_networks(settings: Settings, r: redis.Redis,
                                                  mailboxes: list[str],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    app = frozen(make_app(settings, r, login_source_failures=2, login_account_failures=6,
                          **BURST))
    owner = app.test_client()
    assert login(owner, ip="10.99.0.1").status_code == 302  # the owner's usual network
    attacker = app.test_client()
    for n in range(6):  # six networks, one guess each: no client reaches its threshold
        assert login(attacker, password="guess", ip=f"10.{n}.0.1").status_code == 401, n
    fresh = login(app.test_client(), password="secret", ip="10.50.0.1")
    assert fresh.status_code == 429 and TOO_MANY.search(fresh.text)
    assert "account waits" in mail_log(caplog, "login-refused")[-1]
    # The owner, from the network it logged in from before, is not held.
    assert login(app.test_client(), ip="10.99.0.7").status_code == 302
    # ... and that success did not lift the delay for everyone else.
    assert login(app.test_client(), ip="10.51.0.1").status_code == 429


def test_delays_grow_and_are_capped_never_a_lockout(r: redis.Redis) -> None:
    t = LoginThrottle(r, source_failures=2, account_failures=6)
    now = 1_000_000.0
    waits = []
    for _ in range(30):  # one guessing client, waiting out every delay
        att = t.attempt("192.0.2.1", None, now=now)
        if att.wait:
            waits.append(att.wait)
            now += att.wait
    assert waits[:5] == [1, 2, 4, 8, 16] and max(waits) == SOURCE_MAX_DELAY
    now = 2_000_000.0
    waits = []
    for n in range(200):  # many networks on one account, each once: the account-wide delay
        att = t.attempt(f"10.{n // 250}.{n % 250}.1", "alice@example.com", now=now)
        if att.wait:
            assert att.account_wide
            waits.append(att.wait)
            now += att.wait
    assert waits[:4] == [1, 2, 4, 8] and max(waits) == ACCOUNT_MAX_DELAY
    # Once the longest delay has passed, a new attempt goes ahead: a delay, not a lockout.
    assert t.attempt("203.0.113.9", "alice@example.com", now=now + ACCOUNT_MAX_DELAY).wait == 0


def concurrent_logins(app: Any, attempts: list[tuple[str, str, str]]) -> list[int]:
    """POST the log-ins all at once (each from its own browser, form fetched first)."""
    clients = [app.test_client() for _ in attempts]
    tokens = [form(c, ip) for c, (_, _, ip) in zip(clients, attempts, strict=True)]
    start = threading.Barrier(len(attempts))
    codes = [0] * len(attempts)

    def one(i: int) -> None:
        user, password, ip = attempts[i]
        start.wait(timeout=30)
        codes[i] = post(clients[i], tokens[i], user, password, ip).status_code

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(attempts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    return codes


# A hashing queue as long as the burst and a patient timeout: on a loaded machine a full
# queue or a slow check would answer 503 (both tested on their own below), and these tests
# are about the throttle's count.
BURST = {"password_check_queue": 32, "password_check_timeout": 120}


def test_concurrent_guesses_from_one_client_are_not_all_checked(
        settings: Settings, r: redis.Redis, mailboxes: list[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    guesses = [("alice@example.com", f"guess{n}", "127.0.0.2") for n in range(20)]
    codes = concurrent_logins(frozen(make_app(settings, r, **BURST)), guesses)
    checked = mail_log(caplog, "login-failed")  # written once per password really checked
    assert len(checked) == codes.count(401) and codes.count(401) + codes.count(429) == 20
    assert len(checked) == 5  # login_source_failures: the rest never reached the hash
    assert len(mail_log(caplog, "login-refused")) == codes.count(429)


def test_concurrent_guesses_from_many_networks_hit_the_account_limit(
        settings: Settings, r: redis.Redis, mailboxes: list[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    app = frozen(make_app(settings, r, login_source_failures=2, login_account_failures=6,
                          **BURST))
    codes = concurrent_logins(app, [("alice@example.com", "guess", f"10.{n}.0.1") for n in range(20)])
    assert codes.count(401) + codes.count(429) == 20, codes
    assert len(mail_log(caplog, "login-failed")) == codes.count(401) == 6


def test_password_length_limit(settings: Settings, r: redis.Redis, mailboxes: list[str],
                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    longest = "p" * 1024  # max_password_length, the default
    # argon2 costs the same for any length (SHA-crypt's cost grows with it).
    add_mailbox(r, settings, "dora@example.com", password=longest, scheme="ARGON2ID")
    app = frozen(make_app(settings, r, login_source_failures=2))
    assert app.extensions["fallback"].settings.max_password_length == 1024
    assert login(app.test_client(), "dora@example.com", longest, ip="127.0.0.2").status_code == 302
    client = app.test_client()
    for _ in range(2):
        resp = login(client, "dora@example.com", longest + "p", ip="127.0.0.3")
        assert resp.status_code == 400
        assert ("That password is longer than 1024 characters; no password here is that long. "
                "Check what was pasted and try again.") in resp.text
        assert 'value="dora@example.com"' in resp.text and longest not in resp.text
        assert client.get_cookie(COOKIE) is None
    # Refused before hashing, and each counted as a failure: the client is now slowed down.
    assert [line for line in mail_log(caplog, "login-failed") if "password too long" in line] != []
    assert len(mail_log(caplog, "login-failed")) == 2
    assert login(client, "dora@example.com", longest, ip="127.0.0.3").status_code == 429


def slow_hash(password: str) -> str:
    # A real argon2id hash whose check takes a second or more on this machine.
    return "{ARGON2ID}" + argon2.using(type="ID", parallelism=1, rounds=100, memory_cost=16384).hash(password)


def test_full_hashing_queue_answers_busy_and_a_timeout_is_a_failure(
        settings: Settings, r: redis.Redis, mailboxes: list[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    d = directory.Directory(r, directory.ensure_buckets(r, settings.directory_buckets))
    d.put(directory.Mailbox("slow@example.com", "default", slow_hash("secret")))
    app = frozen(make_app(settings, r, password_check_queue=1, password_check_timeout=0.2,
                          login_source_failures=3))
    checks = app.extensions["fallback"].password_checks
    assert checks.capacity == 3  # two hashing threads and one waiting check
    codes: list[Any] = []
    clients = [app.test_client() for _ in range(3)]
    tokens = [form(c, f"127.0.0.{2 + i}") for i, c in enumerate(clients)]

    def one(i: int) -> None:
        codes.append(post(clients[i], tokens[i], "slow@example.com", "secret", f"127.0.0.{2 + i}"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    try:
        for th in threads:
            th.start()
        deadline = time.monotonic() + 20
        while checks.in_use() < 3 and time.monotonic() < deadline:  # bounded in time
            time.sleep(0.01)
        assert checks.in_use() == 3
        busy = login(app.test_client(), "slow@example.com", "secret", ip="127.0.1.9")
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "5"
        assert "The webmail is busy, try again in a moment." in busy.text
        for th in threads:
            th.join(30)
    finally:
        checks.shutdown()
    for resp in codes:
        assert resp.status_code == 503 and int(resp.headers["Retry-After"]) == 60
        assert "Checking your password took too long. Please try again in a minute." in resp.text
    assert len([x for x in mail_log(caplog, "login-failed") if "timed out" in x]) == 3
    assert any("password checks queue full" in x for x in mail_log(caplog, "login-refused"))
    # The busy attempt was given back (never checked); the three timeouts count as failures:
    # the network they came from has reached login_source_failures on this account.
    raw: Any = r.hgetall(keys.login_throttle("acct", "slow@example.com"))
    acct = {k.decode(): v.decode() for k, v in raw.items()}
    assert acct["fails"] == "3" and acct["f:127.0.0.0/24"] == "3" and "f:127.0.1.0/24" not in acct
    assert login(app.test_client(), "slow@example.com", "secret", ip="127.0.0.9").status_code == 429


def test_unthrottle_command(settings: Settings, r: redis.Redis, redis_url: str, mailboxes: list[str],
                            capsys: pytest.CaptureFixture[str]) -> None:
    app = frozen(make_app(settings, r, login_source_failures=2, login_account_failures=3))
    for n in range(3):
        assert login(app.test_client(), password="guess", ip=f"10.{n}.0.1").status_code == 401
    assert login(app.test_client(), ip="10.40.0.1").status_code == 429
    assert main(["mailbox", "unthrottle", "<Alice@Example.COM>", "--redis-url", redis_url]) == 0
    assert capsys.readouterr().out == "lifted the log-in delays of alice@example.com\n"
    assert login(app.test_client(), ip="10.40.0.1").status_code == 302
    assert main(["mailbox", "unthrottle", "alice@example.com", "--redis-url", redis_url]) == 0
    assert capsys.readouterr().out == "alice@example.com had no failed log-ins to forget\n"
    assert main(["mailbox", "unthrottle", "nobody@example.com", "--redis-url", redis_url]) == 1
    assert capsys.readouterr().err == "fallback mailbox: nobody@example.com is not provisioned\n"
