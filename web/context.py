"""What a request of the webmail needs: the one `WebState` of the app, and `state()` to get it.

Made by `create_app` from the settings and kept in the app's extensions, so
no module holds a global.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis
from flask import current_app

from fallback.config import Settings
from fallback.mailbox import directory, passwords
from fallback.mailbox.ttlcache import TtlCache
from fallback.ops import failover, incident, metrics
from web.pagecache import Kept, PageCache
from web.passwordcheck import PasswordChecks
from web.render import Rendered, rendered_size
from web.sessions import SessionStore
from web.throttle import LoginThrottle

# Host headers whose own_hosts() are kept (Kept never keeps a value over an eighth of its limit:
# each counts 1).
HOSTS_KEPT = 256


@dataclass
class WebState:
    settings: Settings
    r: redis.Redis
    secret: str
    sessions: SessionStore
    throttle: LoginThrottle
    # Password hashing is slow on purpose: a small pool with a bounded queue bounds how
    # much CPU and how many request threads a burst of log-ins can take.
    password_checks: PasswordChecks
    # The failover scope, re-read at most every failover_cache_ttl seconds.
    scope: failover.ScopeCache = field(default_factory=lambda: failover.ScopeCache(2.0))
    # The operator's live incident text, re-read at most every couple of seconds (web.pages).
    incident: incident.IncidentCache = field(default_factory=incident.IncidentCache)
    # Log-in counts, added to the shared ones in Redis now and then (web.monitoring).
    counters: metrics.Counters = field(default_factory=metrics.Counters)
    # Each logged-in user's mailstore, for the "restored" banner (web.auth.mailbox_restored).
    mailstores: TtlCache[str] = field(default_factory=lambda: TtlCache(2.0, 10_000))
    # Drawn folder and message pages, for an identical next request (web.pagecache).
    pages: PageCache = field(default_factory=lambda: PageCache(0))
    # Parsed and sanitised message bodies, by user, id, digest of the bytes and the inputs of
    # render.render (web.mailbox.rendered): a quarter of the page cache's size again.
    renders: Kept[Rendered] = field(default_factory=lambda: Kept(0, rendered_size))
    # own_hosts() of each Host header a request came with (web.mailbox), the most recent few:
    # the header is the client's to choose, so the bound matters.
    hosts: Kept[frozenset[str]] = field(default_factory=lambda: Kept(HOSTS_KEPT, lambda _: 1))
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
