"""The admin console at /admin/: its blueprint, its guard (session, CSRF, off without an admin
token), and logging in and out.

The pages live in the modules of this package (overview: dashboard and
affected users; queues: the outbound and forward queues; records: audit log,
incident text, message trace).  The console is off (404 for every page)
unless admin_token or admin_token_file is set.  Logging in takes the admin
token in a password field; it is checked by web.admin.check_token (constant
time; wrong tokens counted in /metrics and against the client prefix's
guard) after the webmail's log-in throttle (growing delays per client and
for the console as one account) has counted the attempt.  A reseller token
is a valid token but not the admin's: it gets a page saying so.  Every
log-in, right or wrong, is audited as "console login".  Every POST but the
log-in form must carry the session's CSRF token (the log-in form carries a
signed pre-login token): otherwise 400 and nothing done.
"""

from __future__ import annotations

import secrets
from typing import Any

from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from werkzeug.exceptions import HTTPException, NotFound

from fallback.maillog import MailLog
from fallback.ops import audit, metrics
from web.console.session import (
    COOKIE,
    PATH,
    PRE_COOKIE,
    ConsoleSession,
    ConsoleSessions,
    check_csrf,
    check_login_token,
    login_token,
)
from web.context import state
from web.security import CONSOLE

bp = Blueprint(CONSOLE, __name__, url_prefix="/admin")

OPEN_ENDPOINTS = frozenset({"console.login_form", "console.login"})
MAILLOG_USER = "admin-console"  # whom the mail log's login lines name (the webmail names the user)
THROTTLE_ACCOUNT = MAILLOG_USER  # the console is one account for the log-in throttle
MAX_TOKEN = 512
MESSAGES = {
    "empty": "Enter the admin token.",
    "expired": "This log-in form has expired. Please try again.",
    "too_long": f"That is longer than {MAX_TOKEN} characters; no admin token is that long.",
    "wrong": "Wrong token. Use the admin token (admin_token or admin_token_file of the settings).",
    "reseller": ("That is a reseller token. Reseller tokens cannot log in to the console: "
                 "only the admin token can (admin_token or admin_token_file of the settings)."),
    "csrf": ("This form has expired or did not come from this console, so nothing was done. "
             "Go back, reload the page and try again."),
    "out": "You have logged out of the console.",
}


def wait_text(seconds: int) -> str:
    return f"Too many attempts. Try again in {seconds} second{'' if seconds == 1 else 's'}."


def sessions() -> ConsoleSessions:
    s = state().settings
    return ConsoleSessions(state().r, s.session_idle_timeout, s.session_max_age)


def current() -> ConsoleSession:
    who: ConsoleSession = g.console
    return who


def actor() -> str:
    """Who the audit log names for a console action: the token's name (only the admin's logs in)."""
    return current().who


def record(action: str, args: dict[str, Any], outcome: str = "ok") -> None:
    audit.write(state().r, state().settings.audit_log, action, actor(),
                {**args, "via": "console", "client": request.remote_addr or "unknown"}, outcome,
                "fallback web")


def _secure() -> bool:
    return bool(current_app.config["SESSION_COOKIE_SECURE"])


def _cookie(response: Any, name: str, value: str) -> None:
    response.set_cookie(name, value, httponly=True, samesite="Strict", path=PATH, secure=_secure())


@bp.before_request
def _guard() -> Any:
    if state().admin_token is None:
        raise NotFound()
    g.console = sessions().load(request.cookies.get(COOKIE))
    if request.endpoint in OPEN_ENDPOINTS:
        return None
    if request.method == "POST" and not check_csrf(g.console, request.form.get("csrf_token")):
        if g.console is None and request.endpoint == "console.logout":
            return redirect(url_for("console.login_form"))
        return render_error(400, MESSAGES["csrf"])
    if g.console is None:
        return redirect(url_for("console.login_form"))
    return None


@bp.context_processor
def _inject() -> dict[str, Any]:
    session = getattr(g, "console", None)
    return {"console_csrf": session.csrf if session else "", "console_who": session.who if session else None}


def render_error(code: int, text: str) -> Response:
    return make_response(render_template("admin/error.html", code=code, text=text), code)


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Any:
    if exc.code is not None and exc.code < 400:
        return exc.get_response()
    texts = {404: "There is nothing here.", 405: "That action is not available here."}
    return render_error(exc.code or 500, texts.get(exc.code or 500, exc.description or "That did not work."))


def _form(error: str | None = None, status: int = 200, notice: str | None = None,
          retry_after: int | None = None) -> Response:
    pre = request.cookies.get(PRE_COOKIE)
    if not pre or len(pre) > 100:
        pre = secrets.token_urlsafe(32)
    html = render_template("admin/login.html", error=error, notice=notice,
                           login_token=login_token(state().secret, pre))
    response = make_response(html, status)
    _cookie(response, PRE_COOKIE, pre)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


@bp.get("/login")
def login_form() -> Any:
    if g.console is not None:
        return redirect(url_for("console.dashboard"))
    return _form(notice=MESSAGES["out"] if request.args.get("out") else None)


@bp.post("/login")
def login() -> Any:
    from web.admin import check_token  # the admin API's one decision of who a token is

    st = state()
    ip = request.remote_addr or "unknown"
    given = request.form.get("token", "").strip()
    if not check_login_token(st.secret, request.cookies.get(PRE_COOKIE), request.form.get("csrf_token")):
        return _form(MESSAGES["expired"], 400)
    if not given:
        return _form(MESSAGES["empty"], 400)

    def refused(outcome: str, text: str, code: int, retry_after: int | None = None) -> Response:
        audit.console_login(st.r, st.settings.audit_log, "unknown", ip, outcome)
        MailLog().login(MAILLOG_USER, ip, outcome="failed" if outcome.startswith("failed") else "refused",
                        reason=outcome)
        return _form(text, code, retry_after=retry_after)

    attempt = st.throttle.attempt(ip, THROTTLE_ACCOUNT)
    if attempt.wait:
        st.counters.add(metrics.ADMIN_AUTH_FAILURES, reason="throttled")
        return refused("throttled", wait_text(attempt.wait), 429, attempt.wait)
    if len(given) > MAX_TOKEN:
        st.counters.add(metrics.ADMIN_AUTH_FAILURES, reason="wrong")
        return refused("failed: too long", MESSAGES["too_long"], 400)
    found = check_token(given, ip)
    if isinstance(found, Response):
        if found.status_code == 429:
            wait = int(found.headers.get("Retry-After", "1"))
            return refused("throttled", wait_text(wait), 429, wait)
        return refused("failed: " + str((found.get_json() or {}).get("error", "wrong token")),
                       MESSAGES["wrong"], 401)
    if not found.is_admin:
        st.counters.add(metrics.ADMIN_AUTH_FAILURES, reason="reseller")
        return refused(f"refused: reseller token {found.name}", MESSAGES["reseller"], 403)
    st.throttle.succeeded(attempt)
    old = request.cookies.get(COOKIE)
    if old:
        sessions().revoke(old)
    session = sessions().create(found.name)
    audit.console_login(st.r, st.settings.audit_log, found.name, ip, "ok")
    MailLog().login(MAILLOG_USER, ip)
    response = redirect(url_for("console.dashboard"))
    _cookie(response, COOKIE, session.token)
    response.delete_cookie(PRE_COOKIE, path=PATH, httponly=True, samesite="Strict", secure=_secure())
    return response


@bp.post("/logout")
def logout() -> Any:
    sessions().revoke(current().token)
    response = redirect(url_for("console.login_form", out=1))
    response.delete_cookie(COOKIE, path=PATH, httponly=True, samesite="Strict", secure=_secure())
    return response


# The pages: each module adds its views to `bp`, so they are imported once it exists.
from web.console import overview, queues, records  # noqa: E402,F401
