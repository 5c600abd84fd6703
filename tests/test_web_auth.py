"""Webmail log-in, sessions, CSRF, throttling, headers and start-up refusal (Flask test client)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from fallback import keys
from fallback.config import load_settings, webmail_secret
from fallback.errors import ConfigError
from fallback.mailbox import passwords
from tests.webutil import SECRET, csrf, log_in_as, make_app, put_message, simple
from web import create_app
from web.sessions import COOKIE, PRE_COOKIE


def login(client, username="alice@example.com", password="secret", ip="10.0.0.1"):
    page = client.get("/login", environ_base={"REMOTE_ADDR": ip})
    return client.post("/login", data={"username": username, "password": password,
                                       "csrf_token": csrf(page.text)},
                       environ_base={"REMOTE_ADDR": ip})


def session_keys(r: redis.Redis) -> list[bytes]:
    return list(r.scan_iter("websess:*"))


def test_login_logout_and_replayed_cookie_refused(client, r) -> None:
    assert client.get("/").headers["Location"].endswith("/login")
    resp = login(client)
    assert resp.status_code == 302 and resp.headers["Location"] == "/"
    cookie = client.get_cookie(COOKIE)
    assert cookie is not None and cookie.http_only and cookie.secure and cookie.same_site == "Lax"
    page = client.get("/")
    assert page.status_code == 200 and "alice@example.com" in page.text
    assert len(session_keys(r)) == 1
    old = cookie.value

    out = client.post("/logout", data={"csrf_token": csrf(page.text)})
    assert out.status_code == 302 and "/login" in out.headers["Location"]
    assert session_keys(r) == []
    assert "You have logged out." in client.get(out.headers["Location"]).text
    # The old cookie replayed after log-out is refused.
    client.set_cookie(COOKIE, old)
    assert client.get("/").headers["Location"].endswith("/login")


def test_new_session_id_at_login_and_old_one_revoked(client, r) -> None:
    login(client)
    first = client.get_cookie(COOKIE).value
    # Log in again from a browser that still carries the first session's cookie.
    other = client.application.test_client()
    page = other.get("/login")
    other.set_cookie(COOKIE, first)
    other.post("/login", data={"username": "alice@example.com", "password": "secret",
                               "csrf_token": csrf(page.text)})
    second = other.get_cookie(COOKIE).value
    assert first != second
    assert len(session_keys(r)) == 1
    client.set_cookie(COOKIE, first)
    assert client.get("/").status_code == 302


def test_session_cookie_holds_no_redis_key(client, r) -> None:
    login(client)
    token = client.get_cookie(COOKIE).value
    assert not r.exists(f"websess:{{{token}}}")
    assert all(token.encode() not in k for k in session_keys(r))


def test_idle_timeout_ends_session_and_requests_renew_it(settings, r, mailboxes) -> None:
    app = make_app(settings, r, session_idle_timeout=120.0)
    client = app.test_client()
    log_in_as(client, "alice@example.com")
    (key,) = session_keys(r)
    assert 0 < r.pttl(key) <= 120_000
    r.pexpire(key, 5000)
    assert client.get("/").status_code == 200
    assert r.pttl(key) > 100_000  # the request renewed the idle timer
    r.pexpire(key, 1)  # now let it run out, as an idle session would
    while r.exists(key):
        r.ping()  # bounded: the key's 1 ms TTL passes within a few round trips
    assert client.get("/").headers["Location"].endswith("/login")


def test_wrong_password_and_unknown_user_same_answer(client, monkeypatch) -> None:
    used: list[str] = []
    real = passwords.verify_password

    def spy(plain: str, stored: str) -> bool:
        used.append(stored)
        return real(plain, stored)

    monkeypatch.setattr(passwords, "verify_password", spy)
    first_unknown = login(client, username="nobody@example.com", ip="10.0.0.1")
    wrong = login(client, password="nope", ip="10.0.0.2")
    unknown = login(client, username="nobody@example.com", ip="10.0.0.3")
    foreign = login(client, username="not an address", ip="10.0.0.4")
    for resp in (first_unknown, wrong, unknown, foreign):
        assert resp.status_code == 401
        assert "Wrong address or password." in resp.text
    # Every attempt ran one real hash check: before any real account, against a dummy
    # hash; after, against the real account's hash (same scheme and rounds), result ignored.
    alice_hash = client.application.extensions["fallback"].directory().get("alice@example.com").password_hash
    assert len(used) == 4
    assert used[0].startswith("{ARGON2ID}") and used[0] != alice_hash
    assert used[1] == used[2] == used[3] == alice_hash
    assert client.get_cookie(COOKIE) is None


def test_unknown_user_with_a_real_users_password_does_not_log_in(client) -> None:
    login(client, password="nope", ip="10.0.0.5")  # the timing hash is now alice's
    resp = login(client, username="nobody@example.com", password="secret", ip="10.0.0.6")
    assert resp.status_code == 401 and client.get_cookie(COOKIE) is None


def test_login_form_keeps_address_and_requires_fields(client) -> None:
    resp = login(client, password="")
    assert resp.status_code == 400 and "Enter your email address and your password." in resp.text
    assert 'value="alice@example.com"' in resp.text


def test_login_without_csrf_token_refused(client, r) -> None:
    client.get("/login")
    resp = client.post("/login", data={"username": "alice@example.com", "password": "secret"})
    assert resp.status_code == 400 and "expired" in resp.text
    assert 'value="alice@example.com"' in resp.text
    forged = client.post("/login", data={"username": "alice@example.com", "password": "secret",
                                         "csrf_token": "0" * 64})
    assert forged.status_code == 400
    # A token for another browser's pre-login cookie does not work with ours.
    page = client.get("/login")
    token = csrf(page.text)
    other = client.application.test_client()
    other.get("/login")
    assert other.post("/login", data={"username": "alice@example.com", "password": "secret",
                                      "csrf_token": token}).status_code == 400
    assert session_keys(r) == []


def test_login_csrf_in_query_string_is_ignored(client) -> None:
    page = client.get("/login")
    token = csrf(page.text)
    resp = client.post(f"/login?csrf_token={token}&username=alice@example.com&password=secret")
    assert resp.status_code == 400


def test_every_state_changing_post_needs_csrf(client, r) -> None:
    log_in_as(client, "alice@example.com")
    msg_id = put_message(r, "alice@example.com", simple())
    posts = [
        ("/logout", {}),
        (f"/message/{msg_id}/flags", {"action": "flag"}),
        (f"/message/{msg_id}/delete", {}),
        (f"/message/{msg_id}/restore", {}),
        ("/compose", {"to": "bob@example.com", "subject": "x", "body": "y"}),
    ]
    for path, data in posts:
        resp = client.post(path, data=data)
        assert resp.status_code == 400, path
        assert "did not come from this site" in resp.text
        resp = client.post(path, data={**data, "csrf_token": "wrong"})
        assert resp.status_code == 400, path
    # Nothing happened: still logged in, message untouched, nothing sent.
    assert client.get("/").status_code == 200
    assert (r.hget(keys.message("alice@example.com", msg_id), "flags") or b"") == b""  # none: no field
    assert r.zcard(keys.folder("alice@example.com", "Sent")) == 0


def test_post_parameters_only_from_body(client, r) -> None:
    token = log_in_as(client, "alice@example.com")
    msg_id = put_message(r, "alice@example.com", simple())
    resp = client.post(f"/message/{msg_id}/flags?csrf_token={token}&action=flag")
    assert resp.status_code == 400
    resp = client.post(f"/message/{msg_id}/flags?action=flag", data={"csrf_token": token})
    assert resp.status_code == 400  # the action in the query string is not read
    assert (r.hget(keys.message("alice@example.com", msg_id), "flags") or b"") == b""  # none: no field


def test_security_headers_on_app_pages(client) -> None:
    nonces = set()
    for path in ("/login", "/status"):
        resp = client.get(path)
        csp = resp.headers["Content-Security-Policy"]
        nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
        nonces.add(nonce)
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert len(nonces) == 2  # a fresh nonce per response


def test_status_page_is_public_and_shows_incident_message(settings, r, mailboxes) -> None:
    app = make_app(settings, r, incident_message="Main store down since 9:00; ETA 14:00")
    resp = app.test_client().get("/status")
    assert resp.status_code == 200 and "Main store down since 9:00; ETA 14:00" in resp.text
    assert "Emergency mailbox" in resp.text


def test_banner_on_every_page(client, r) -> None:
    log_in_as(client, "alice@example.com")
    msg_id = put_message(r, "alice@example.com", simple())
    for path in ("/login", "/status", "/", "/folder/sent", f"/message/{msg_id}", "/compose"):
        text = client.get(path, follow_redirects=True).text
        assert "Emergency mailbox." in text and "older mail will come back" in text, path
        assert "merged into your normal mailbox" in text


def test_healthz(client, settings, mailboxes, r) -> None:
    assert client.get("/healthz").status_code == 200
    dead = redis.Redis(port=1, socket_connect_timeout=0.5)
    app = make_app(settings, dead)
    resp = app.test_client().get("/healthz")
    assert resp.status_code == 503


def test_redis_down_gives_friendly_page(settings, r, mailboxes) -> None:
    app = make_app(settings, redis.Redis(port=1, socket_connect_timeout=0.5))
    resp = app.test_client().get("/login")
    assert resp.status_code == 200  # the login form itself needs no Redis
    c = app.test_client()
    c.set_cookie(COOKIE, "some-session")
    resp = c.get("/")
    assert resp.status_code == 503 and "not answering" in resp.text and "Traceback" not in resp.text


@pytest.mark.parametrize("secret", [None, "change-me", "short"])
def test_missing_or_default_secret_refuses_to_start(settings, r, secret) -> None:
    with pytest.raises(ConfigError, match="secret_key"):
        create_app(replace(settings, secret_key=secret), r)


def test_secret_from_file_and_demo_mode(settings, r, tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_text(SECRET + "\n")
    assert webmail_secret(replace(settings, secret_key_file=f)) == SECRET
    with pytest.raises(ConfigError, match="cannot read"):
        webmail_secret(replace(settings, secret_key_file=tmp_path / "missing"))
    # Demo mode: cookies are not Secure (plain local HTTP) unless asked for.
    demo = make_app(settings, r, demo=True)
    assert demo.config["SESSION_COOKIE_SECURE"] is False
    assert make_app(settings, r, demo=True, cookie_secure=True).config["SESSION_COOKIE_SECURE"]


def test_settings_from_environment(tmp_path: Path) -> None:
    s = load_settings({}, env={"FALLBACK_SESSION_IDLE_TIMEOUT": "10m", "FALLBACK_COOKIE_SECURE": "false",
                               "FALLBACK_MAX_UPLOAD_SIZE": "5MiB", "FALLBACK_WEB_WORKERS": "3"})
    assert s.session_idle_timeout == 600 and s.cookie_secure is False
    assert s.max_upload_size == 5 * 1024 * 1024 and s.web_workers == 3
    with pytest.raises(ConfigError, match="web_workers"):
        load_settings({}, env={"FALLBACK_WEB_WORKERS": "0"})


def test_pre_login_cookie_flags(client) -> None:
    client.get("/login")
    pre = client.get_cookie(PRE_COOKIE)
    assert pre is not None and pre.http_only and pre.same_site == "Lax"


def test_stylesheet_is_cacheable_and_pages_are_not(client) -> None:
    css = client.get("/static/app.css")
    assert css.status_code == 200 and css.mimetype == "text/css"
    assert "max-age=3600" in css.headers["Cache-Control"]
    assert client.get("/login").headers["Cache-Control"] == "no-store"
