"""The webmail: a Flask app built by `create_app(settings)`, served by gunicorn.

Blueprints by concern: `auth` (log in/out), `mailbox` (folders, messages,
flags), `compose` (new mail, reply, forward), `pages` (/status, /healthz),
`monitoring` (/readyz, /metrics), `admin` (the token-protected admin API);
`security` wires sessions, CSRF and response headers around all of them.
Everything a request needs lives in one `WebState` on the app, made here
from the settings: no module globals.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import redis
from flask import Flask, current_app

from fallback.config import Settings, admin_token, cookie_secure, webmail_secret
from fallback.mailbox import directory, passwords
from fallback.ops import failover, metrics
from fallback.redisconn import resolve_url, sync_client
from web.sessions import SessionStore
from web.throttle import LoginThrottle

# Room for the form fields around the attachments; bigger requests get 413.
FORM_OVERHEAD = 2 * 1024 * 1024


@dataclass
class WebState:
    settings: Settings
    r: redis.Redis
    secret: str
    sessions: SessionStore
    throttle: LoginThrottle
    # Password hashing is slow on purpose: a small pool bounds how much CPU a
    # burst of log-ins can take from people reading their mail.
    hasher: ThreadPoolExecutor
    # The failover scope, re-read at most every failover_cache_ttl seconds.
    scope: failover.ScopeCache = field(default_factory=lambda: failover.ScopeCache(2.0))
    # Log-in counts, added to the shared ones in Redis now and then (web.monitoring).
    counters: metrics.Counters = field(default_factory=metrics.Counters)
    # The admin API's bearer token; None: the API is off.
    admin_token: str | None = None
    _buckets: int | None = None
    _dummy: dict[str, str] = field(default_factory=dict)
    # The stored hash of the last real account checked: unknown addresses are checked
    # against it (result ignored), so they cost exactly what real ones cost, scheme
    # and rounds included (Dovecot's SHA512-CRYPT uses 5,000 rounds, passlib's 656,000).
    timing_hash: str | None = None

    def directory(self) -> directory.Directory:
        if self._buckets is None:
            self._buckets = directory.ensure_buckets(self.r, self.settings.directory_buckets)
        return directory.Directory(self.r, self._buckets)

    def hash_for_unknown(self) -> str:
        return self.timing_hash or self.dummy_hash()

    def dummy_hash(self) -> str:
        scheme = self.settings.password_scheme
        if scheme not in self._dummy:
            self._dummy[scheme] = passwords.dummy_hash(scheme)
        return self._dummy[scheme]


def state() -> WebState:
    st: WebState = current_app.extensions["fallback"]
    return st


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
        sessions=SessionStore(r, settings.session_idle_timeout),
        throttle=LoginThrottle(r),
        hasher=ThreadPoolExecutor(max_workers=2, thread_name_prefix="password"),
        scope=failover.ScopeCache(settings.failover_cache_ttl),
        counters=metrics.Counters(settings.metrics_flush_interval),
        admin_token=admin_token(settings),
    )
    from web import admin, auth, compose, filters, mailbox, monitoring, pages, security

    security.install(app)
    filters.install(app)
    monitoring.install(app)
    for bp in (auth.bp, mailbox.bp, compose.bp, pages.bp, monitoring.bp, admin.bp):
        app.register_blueprint(bp)
    return app
