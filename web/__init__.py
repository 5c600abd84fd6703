"""The webmail: a Flask app built by `create_app(settings)`, served by gunicorn.

Blueprints by concern: `auth` (log in/out), `mailbox` (folders, messages,
flags), `compose` (new mail, reply, forward), `pages` (/status, /healthz),
`monitoring` (/readyz, /metrics), `admin` (the token-protected admin API);
`security` wires sessions, CSRF and response headers around all of them.
Everything a request needs lives in one `WebState` (context.py) on the app,
made here from the settings: no module globals.
"""

from __future__ import annotations

import redis
from flask import Flask

from fallback.config import Settings, admin_token, cookie_secure, webmail_secret
from fallback.ops import failover, metrics
from fallback.redisconn import resolve_url, sync_client
from web import admin, auth, compose, filters, mailbox, monitoring, pages, security
from web.context import WebState, state
from web.passwordcheck import PasswordChecks
from web.sessions import SessionStore
from web.throttle import LoginThrottle

__all__ = ["create_app", "state"]

# Room for the form fields around the attachments; bigger requests get 413.
FORM_OVERHEAD = 2 * 1024 * 1024


def create_app(settings: Settings, r: redis.Redis | None = None) -> Flask:
    """The webmail for these settings; refuses to start without a proper secret key."""
    secret = webmail_secret(settings)
    if r is None:
        r = sync_client(resolve_url(settings))
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=secret,
        MAX_CONTENT_LENGTH=2 * settings.max_upload_size + FORM_OVERHEAD,
        MAX_FORM_MEMORY_SIZE=2 * settings.max_upload_size + FORM_OVERHEAD,
        SESSION_COOKIE_SECURE=cookie_secure(settings),
        TEMPLATES_AUTO_RELOAD=False,
        SEND_FILE_MAX_AGE_DEFAULT=3600,  # the stylesheet: phones on slow links fetch it once an hour
    )
    app.extensions["fallback"] = WebState(
        settings=settings, r=r, secret=secret,
        sessions=SessionStore(r, settings.session_idle_timeout, settings.session_max_age),
        throttle=LoginThrottle(r, settings.login_source_failures, settings.login_account_failures),
        password_checks=PasswordChecks(settings.password_check_queue, settings.password_check_timeout),
        scope=failover.ScopeCache(settings.failover_cache_ttl),
        counters=metrics.Counters(settings.metrics_flush_interval),
        admin_token=admin_token(settings),
    )
    security.install(app)
    filters.install(app)
    monitoring.install(app)
    for bp in (auth.bp, mailbox.bp, compose.bp, pages.bp, monitoring.bp, admin.bp):
        app.register_blueprint(bp)
    return app
