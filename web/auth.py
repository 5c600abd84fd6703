"""Logging in and out, and the `login_required` guard of every mailbox page.

The password is checked against the provisioned Dovecot-style hash on a
small thread pool (see WebState.hasher).  Unknown addresses are checked
against the hash of the last real account tried (or, before any, a dummy hash
of the configured scheme), with the result ignored, and both failures answer
with the same words, so neither the text nor the time says which one it was.

Only users whose mailstore is failed over (fallback.ops.failover) get a session;
the others, after a correct password, see "your mailbox is working normally".
Every attempt is counted for /metrics (ok, failed, throttled, not_affected).
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from flask import Blueprint, Response, g, make_response, redirect, render_template, request, url_for

from fallback.addresses import normalize_address
from fallback.errors import InputError
from fallback.mailbox import passwords
from fallback.maillog import MailLog
from fallback.ops import failover
from fallback.ops.metrics import WEBMAIL_LOGINS
from web.context import state
from web.sessions import COOKIE, PRE_COOKIE, check_login_token, login_token

bp = Blueprint("auth", __name__)

WRONG = "Wrong address or password."
MAX_PASSWORD = 1024  # longer input is not a password, and would only cost hashing time
VERIFY_TIMEOUT = 30.0


def login_required(view: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(view)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if g.user is None:
            return redirect(url_for("auth.login"))
        return view(*args, **kwargs)

    return guarded


def _set_cookie(response: Any, name: str, value: str) -> None:
    response.set_cookie(name, value, httponly=True, samesite="Lax", path="/", secure=_secure())


def _secure() -> bool:
    from flask import current_app

    return bool(current_app.config["SESSION_COOKIE_SECURE"])


def _form(username: str = "", error: str | None = None, status: int = 200,
          notice: str | None = None) -> Response:
    pre = request.cookies.get(PRE_COOKIE)
    if not pre or len(pre) > 100:
        pre = secrets.token_urlsafe(32)
    html = render_template("login.html", username=username, error=error, notice=notice,
                           login_token=login_token(state().secret, pre))
    response = make_response(html, status)
    _set_cookie(response, PRE_COOKIE, pre)
    return response


@bp.get("/login")
def login_form() -> Any:
    if g.user is not None:
        return redirect(url_for("mailbox.inbox"))
    notice = "You have logged out." if request.args.get("out") else None
    return _form(notice=notice)


@bp.post("/login")
def login() -> Any:
    st = state()
    username = request.form.get("username", "").strip()[:320]
    password = request.form.get("password", "")
    if not check_login_token(st.secret, request.cookies.get(PRE_COOKIE), request.form.get("csrf_token")):
        return _form(username, "This log-in form has expired. Please log in again.", 400)
    if not username or not password:
        return _form(username, "Enter your email address and your password.", 400)
    ip = request.remote_addr or "unknown"
    account = username.lower()
    wait = st.throttle.wait(ip, account)
    if wait:
        st.counters.add(WEBMAIL_LOGINS, result="throttled")
        return _form(username, f"Too many failed log-ins. Wait {wait} seconds, then try again.", 429)

    try:
        address: str | None = normalize_address(username)
    except InputError:
        address = None
    mailbox = st.directory().get(address) if address else None
    if mailbox is not None:
        stored = st.timing_hash = mailbox.password_hash
    else:
        stored = st.hash_for_unknown()
    try:
        ok = st.hasher.submit(passwords.verify_password, password[:MAX_PASSWORD], stored) \
            .result(timeout=VERIFY_TIMEOUT)
    except FutureTimeout:
        return _form(username, "The server is very busy. Please try again in a minute.", 503)
    ok = ok and mailbox is not None and len(password) <= MAX_PASSWORD
    if not ok or address is None or mailbox is None:
        st.throttle.failed(ip, account)
        st.counters.add(WEBMAIL_LOGINS, result="failed")
        MailLog().login(account, ip, outcome="failed")
        return _form(username, WRONG, 401)

    st.throttle.succeeded(account)
    if not failover.is_affected(st.r, mailbox.mailstore, st.scope):
        # Right password, but this mailbox is not failed over: its mail goes to the main
        # system, so a session here would only show an empty mailbox.  Say so; no session.
        st.counters.add(WEBMAIL_LOGINS, result="not_affected")
        MailLog().login(address, ip, outcome="refused", reason="mailstore not failed over")
        return make_response(render_template("working.html", address=address), 200)
    st.counters.add(WEBMAIL_LOGINS, result="ok")
    session = st.sessions.create(address, replaces=request.cookies.get(COOKIE))
    response = redirect(url_for("mailbox.inbox"))
    _set_cookie(response, COOKIE, session.token)
    response.delete_cookie(PRE_COOKIE, path="/")
    MailLog().login(address, ip)
    return response


def mailbox_restored() -> bool:
    """Logged in, but the user's mailstore is no longer failed over (see docs/webmail.md).

    The session goes on (what the fallback holds is not reconciled yet); base.html
    shows a banner saying that new mail goes to the normal mailbox again.
    """
    if g.get("user") is None:
        return False
    if "restored" not in g:
        st = state()
        mailbox = st.directory().get(g.user)
        g.restored = mailbox is not None and not failover.is_affected(st.r, mailbox.mailstore, st.scope)
    return bool(g.restored)


@bp.post("/logout")
def logout() -> Any:
    if g.session is not None:
        state().sessions.revoke(g.session.token)
    response = redirect(url_for("auth.login_form", out=1))
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="Lax", secure=_secure())
    return response
