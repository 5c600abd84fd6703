"""The webmail: a Flask app built by `create_app(settings)`, served by gunicorn.

Blueprints by concern: `auth` (log in/out), `mailbox` (folders, messages,
flags), `compose` (new mail, reply, forward), `pages` (/status, /healthz),
`monitoring` (/readyz, /metrics), `admin` (the token-protected admin API);
`security` wires sessions, CSRF and response headers around all of them;
`templating` is the environment their templates are drawn with (each
language's constant texts compiled in, issue 17).
Everything a request needs lives in one `WebState` (context.py) on the app,
made here from the settings: no module globals.
"""

from __future__ import annotations

import redis
from flask import Flask

from fallback.config import Settings, admin_token, cookie_secure, webmail_secret
from fallback.mailbox.ttlcache import TtlCache
from fallback.ops import failover, metrics
from fallback.ops.trace import TraceBuffer
from fallback.redisconn import resolve_url, sync_client
from web import admin, auth, compose, filters, mailbox, monitoring, pages, prefs, security, templating
from web import console as admin_console  # issue 16: the admin console
from web import contacts as suggestions  # issue 15: address suggestions
from web import conversations as conversation_views  # issue 15: conversations
from web import drafts as draft_saving  # issue 15: drafts
from web import i18n as languages  # issue 15: languages
from web import undo as undo_send  # issue 15: undo send
from web.context import WebState, state
from web.pagecache import Kept, PageCache
from web.passwordcheck import PasswordChecks
from web.render import rendered_size
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
    app.jinja_environment = templating.PageEnvironment  # before anything makes app.jinja_env
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
        counters=metrics.Counters(settings.metrics_flush_interval,
                                  trace=TraceBuffer.for_settings(settings, "webmail")),
        admin_token=admin_token(settings),
        pages=PageCache(settings.web_page_cache),
        renders=Kept(settings.web_page_cache // 4, rendered_size),
        mailstores=TtlCache(settings.failover_cache_ttl, 10_000),
    )
    languages.install(app)  # issue 15: languages (before the pages: their context needs the locale)
    security.install(app)
    prefs.install(app)
    filters.install(app)
    monitoring.install(app)
    for bp in (auth.bp, mailbox.bp, compose.bp, pages.bp, monitoring.bp, admin.bp):
        app.register_blueprint(bp)
    app.register_blueprint(draft_saving.bp)  # issue 15: drafts
    app.register_blueprint(undo_send.bp)  # issue 15: undo send
    app.register_blueprint(suggestions.bp)
    app.register_blueprint(conversation_views.bp)
    app.register_blueprint(admin_console.bp)  # issue 16: the admin console at /admin/
    templating.install(app)  # after the blueprints: it checks their url_defaults
    return app
