"""Request and response rules that hold for every page: session, CSRF, headers, errors.

- Each request loads its session from the cookie (renewing the idle timer); Flask's own
  signed-cookie session is never opened (nothing uses it).
- Every POST must carry a CSRF token in its body: the session's token, or on
  the login form the signed pre-login token.  Query strings are never read
  for POST parameters.
- App pages get a fresh CSP nonce, `X-Frame-Options: DENY`,
  `Referrer-Policy: no-referrer`, `nosniff` and `no-store`.  Only the
  message frame (views marked with `frameable`) may be framed, by this
  origin, and it gets its own much stricter CSP.
- No traceback reaches a user: errors render a plain page, Redis trouble a
  "try again" page with 503.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any

import redis
from flask import Flask, Request, Response, g, jsonify, render_template, request
from flask.sessions import SessionInterface, SessionMixin
from flask_babel import LazyString, gettext, lazy_gettext
from werkzeug.exceptions import HTTPException

from web.context import state
from web.sessions import COOKIE, PRE_COOKIE, check_csrf, check_login_token

log = logging.getLogger(__name__)

CSRF_FIELD = "csrf_token"
LOGIN_ENDPOINT = "auth.login"
ADMIN_API = "/admin/api/"
CONSOLE = "console"  # the admin console's blueprint: its own session cookie and CSRF check (web/console)


def app_csp(nonce: str) -> str:
    return (
        "default-src 'none'; "
        f"script-src 'nonce-{nonce}'; "
        f"style-src 'self' 'nonce-{nonce}'; "
        "img-src 'self'; "
        "connect-src 'self'; "  # issue 15: suggest.js and the drafts' autosave fetch from here only
        "frame-src 'self'; "
        "form-action 'self'; "
        "base-uri 'none'; "
        "frame-ancestors 'none'"
    )


def frame_csp(remote: bool) -> str:
    """The message frame: no script at all, images only from the message unless asked."""
    images = "data: http: https:" if remote else "data:"
    return (
        "default-src 'none'; "
        f"img-src {images}; "
        "style-src 'unsafe-inline'; "
        "font-src 'none'; "
        "form-action 'none'; "
        "base-uri 'none'; "
        "frame-ancestors 'self'; "
        "sandbox allow-popups allow-popups-to-escape-sandbox"
    )


def frameable(view: Callable[..., Any]) -> Callable[..., Any]:
    view.frameable = True  # type: ignore[attr-defined]
    return view


def _load_session() -> None:
    g.nonce = secrets.token_urlsafe(16)
    # The stylesheet needs no session (nor a Redis round trip); the admin API uses a
    # bearer token and must never act on a browser's cookie.
    if request.endpoint == "static" or request.path.startswith(ADMIN_API) or request.blueprint == CONSOLE:
        g.session = g.user = None
        return
    g.session = state().sessions.load(request.cookies.get(COOKIE))
    g.user = g.session.user if g.session else None


def _check_csrf() -> Response | None:
    if request.method != "POST" or request.path.startswith(ADMIN_API):  # token auth, no cookies
        return None
    if request.blueprint == CONSOLE:
        return None  # checked by the console's own guard against its own session (web/console)
    token = request.form.get(CSRF_FIELD)
    if request.endpoint == LOGIN_ENDPOINT:
        ok = check_login_token(state().secret, request.cookies.get(PRE_COOKIE), token)
    else:
        ok = check_csrf(g.session, token)
    if ok:
        return None
    if request.endpoint == "auth.logout" and g.session is None:
        return None  # already logged out (expired): nothing to protect, just go to the login page
    if request.endpoint == LOGIN_ENDPOINT:
        return None  # the login view re-renders its form with the error (keeps the address typed)
    return error_page(400, gettext("This form has expired or did not come from this site, so nothing was "
                                   "done. Use your browser's Back button to get back to what you typed, "
                                   "and log in again if you are asked to."))


def _headers(response: Response) -> Response:
    view = current_view()
    h = response.headers
    h["X-Content-Type-Options"] = "nosniff"
    h["Referrer-Policy"] = "no-referrer"
    if request.endpoint != "static":  # mail must not linger in caches; the stylesheet may
        h["Cache-Control"] = "no-store"
    if getattr(view, "frameable", False):
        h["X-Frame-Options"] = "SAMEORIGIN"
        h.setdefault("Content-Security-Policy", frame_csp(False))
    else:
        h["X-Frame-Options"] = "DENY"
        h.setdefault("Content-Security-Policy", app_csp(getattr(g, "nonce", "none")))
    return response


def current_view() -> Any:
    from flask import current_app

    if request.endpoint is None:
        return None
    return current_app.view_functions.get(request.endpoint)


# The texts of the error pages (the admin API answers in English: it is for operators).
NOT_FOUND = lazy_gettext("There is nothing here (or it is not yours).")
NOT_ALLOWED = lazy_gettext("That action is not available here.")
DID_NOT_WORK = lazy_gettext("That did not work.")
STORE_DOWN = lazy_gettext("The mail store is not answering right now. Nothing was lost; "
                          "please try again in a minute.")
OUR_FAULT = lazy_gettext("Something went wrong on our side. Please try again.")


def error_page(code: int, text: str | LazyString) -> Response:
    response = Response(render_template("error.html", code=code, text=str(text)), status=code)
    return response


def _json_error(code: int, text: str) -> Response:
    response = jsonify({"error": text})
    response.status_code = code
    return response


class _NoFlaskSession(SessionInterface):
    """The webmail's sessions are its own (web/sessions.py) and nothing reads Flask's signed
    cookie session, so none is opened: Flask's default builds its signing serializer on
    every request (issue 17).  The null session refuses any write, so a use shows at once."""

    def open_session(self, app: Flask, request: Request) -> None:
        return None  # Flask then makes its null session

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        return None


def install(app: Flask) -> None:
    app.session_interface = _NoFlaskSession()
    app.before_request(_load_session)
    app.before_request(_check_csrf)
    app.after_request(_headers)

    from web.auth import mailbox_restored
    from web.i18n import incident_text
    from web.pages import live_incident

    @app.context_processor
    def _inject() -> dict[str, Any]:
        session = getattr(g, "session", None)
        return {"csrf_token": session.csrf if session else "", "csp_nonce": getattr(g, "nonce", ""),
                "user": getattr(g, "user", None),
                "incident_message": incident_text(live_incident() or state().settings.incident_message),
                "incident_live": live_incident(),
                "mailbox_restored": mailbox_restored}

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        if exc.code is not None and exc.code < 400:
            return exc.get_response()  # routing redirects (a missing trailing slash)
        code = exc.code or 500
        if request.path.startswith(ADMIN_API):
            return _json_error(code, exc.description or "That did not work.")
        texts = {404: NOT_FOUND, 405: NOT_ALLOWED}
        if code == 413:
            return error_page(code, gettext(
                "That is too big to send: attachments may be %(mib)s MiB in total. Nothing was sent; "
                "go back to keep your text and attach smaller files.",
                mib=state().settings.max_upload_size // (1024 * 1024)))
        # Our own 4xx carry their text, translated when raised; werkzeug's defaults are English.
        own = exc.description if exc.description != type(exc).description else None
        return error_page(code, texts.get(code) or own or DID_NOT_WORK)

    @app.errorhandler(redis.RedisError)
    def _storage_error(exc: redis.RedisError) -> Response:
        log.error("webmail: Redis error on %s: %s", request.path, exc)
        if request.path.startswith(ADMIN_API):
            return _json_error(503, "Redis is not answering")
        return error_page(503, STORE_DOWN)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("webmail: unexpected error on %s", request.path)
        if request.path.startswith(ADMIN_API):
            return _json_error(500, "internal error (see the server log)")
        return error_page(500, OUR_FAULT)
