"""Logging in and out, and the `login_required` guard of every mailbox page.

The password is checked against the provisioned Dovecot-style hash on a
small thread pool with a bounded queue (web/passwordcheck.py).  Unknown
addresses are checked against the hash of the last real account tried (or,
before any, a dummy hash of the configured scheme), with the result ignored,
and both failures answer with the same words, so neither the text nor the
time says which one it was.

Every attempt is counted by the throttle (web/throttle.py) before its check,
on the normalised address, and only a right password takes it back; a
password longer than `max_password_length`, and a check that times out,
count as failures.  Only users whose mailstore is failed over
(fallback.ops.failover) get a session; the others, after a correct password,
see "your mailbox is working normally".  Every attempt is counted for
/metrics (ok, failed, throttled, busy, not_affected) and written to the mail log.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, g, make_response, redirect, render_template, request, url_for
from flask_babel import LazyString, gettext, lazy_gettext, ngettext

from fallback.addresses import normalize_address
from fallback.errors import InputError
from fallback.maillog import MailLog
from fallback.ops import failover
from fallback.ops.metrics import WEBMAIL_LOGINS
from web.context import state
from web.passwordcheck import Outcome
from web.sessions import COOKIE, PRE_COOKIE, check_login_token, login_token

bp = Blueprint("auth", __name__)

WRONG = lazy_gettext("Wrong address or password.")
BUSY = lazy_gettext("The webmail is busy, try again in a moment.")
TIMED_OUT = lazy_gettext("Checking your password took too long. Please try again in a minute.")
EXPIRED = lazy_gettext("This log-in form has expired. Please log in again.")
EMPTY = lazy_gettext("Enter your email address and your password.")
LOGGED_OUT = lazy_gettext("You have logged out.")
BUSY_RETRY = 5       # seconds, for Retry-After: the queue empties within a few checks
TIMED_OUT_RETRY = 60


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


def _form(username: str = "", error: str | LazyString | None = None, status: int = 200,
          notice: str | LazyString | None = None, retry_after: int | None = None) -> Response:
    pre = request.cookies.get(PRE_COOKIE)
    if not pre or len(pre) > 100:
        pre = secrets.token_urlsafe(32)
    html = render_template("login.html", username=username, error=error and str(error),
                           notice=notice and str(notice),
                           login_token=login_token(state().secret, pre))
    response = make_response(html, status)
    _set_cookie(response, PRE_COOKIE, pre)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def wait_text(seconds: int) -> str:
    return ngettext("Too many attempts. Try again in %(num)s second.",
                    "Too many attempts. Try again in %(num)s seconds.", seconds)


@bp.get("/login")
def login_form() -> Any:
    if g.user is not None:
        return redirect(url_for("mailbox.inbox"))
    notice = LOGGED_OUT if request.args.get("out") else None
    return _form(notice=notice)


@bp.post("/login")
def login() -> Any:
    st = state()
    username = request.form.get("username", "").strip()[:320]
    password = request.form.get("password", "")
    if not check_login_token(st.secret, request.cookies.get(PRE_COOKIE), request.form.get("csrf_token")):
        return _form(username, EXPIRED, 400)
    if not username or not password:
        return _form(username, EMPTY, 400)
    ip = request.remote_addr or "unknown"
    try:
        address: str | None = normalize_address(username)
    except InputError:
        address = None  # not an address: throttled by client only, and answered like a wrong one
    who = address or username
    attempt = st.throttle.attempt(ip, address)
    if attempt.wait:
        st.counters.add(WEBMAIL_LOGINS, result="throttled")
        MailLog().login(who, ip, outcome="throttled",
                        reason=f"{'account' if attempt.account_wide else 'client'} waits {attempt.wait}s")
        return _form(username, wait_text(attempt.wait), 429, retry_after=attempt.wait)

    def failed(reason: str) -> None:
        # The attempt stays counted by the throttle: that is what makes it a failure.
        st.counters.add(WEBMAIL_LOGINS, result="failed")
        MailLog().login(who, ip, outcome="failed", reason=reason)

    limit = st.settings.max_password_length
    if len(password) > limit:
        # Not hashed (that is the point) and not truncated (that would test another password).
        failed("password too long")
        return _form(username, gettext("That password is longer than %(limit)s characters; no password "
                                       "here is that long. Check what was pasted and try again.",
                                       limit=limit), 400)
    mailbox = st.directory().get(address) if address else None
    if mailbox is not None:
        stored = st.timing_hash = mailbox.password_hash
    else:
        stored = st.hash_for_unknown()
    outcome = st.password_checks.check(password, stored)
    if outcome is Outcome.BUSY:
        st.throttle.not_checked(attempt)
        st.counters.add(WEBMAIL_LOGINS, result="busy")
        MailLog().login(who, ip, outcome="busy", reason="password checks queue full")
        return _form(username, BUSY, 503, retry_after=BUSY_RETRY)
    if outcome is Outcome.TIMED_OUT:
        failed("password check timed out")
        return _form(username, TIMED_OUT, 503, retry_after=TIMED_OUT_RETRY)
    if outcome is not Outcome.RIGHT or address is None or mailbox is None:
        failed("wrong address or password")
        return _form(username, WRONG, 401)

    st.throttle.succeeded(attempt)
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
        # The user's mailstore, re-read as often as the scope itself (failover_cache_ttl).
        now = time.monotonic()
        mailstore = st.mailstores.get(g.user, now)
        if mailstore is None:
            mailbox = st.directory().get(g.user)
            mailstore = mailbox.mailstore if mailbox is not None else None
            if mailstore is not None:
                st.mailstores.put(g.user, mailstore, now)
        g.restored = mailstore is not None and not failover.is_affected(st.r, mailstore, st.scope)
    return bool(g.restored)


@bp.post("/logout")
def logout() -> Any:
    if g.session is not None:
        state().sessions.revoke(g.session.token)
    response = redirect(url_for("auth.login_form", out=1))
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="Lax", secure=_secure())
    return response
