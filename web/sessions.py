"""Server-side webmail sessions in Redis, and the CSRF tokens that go with them.

The cookie holds only a random token; Redis holds the session under a hash of
it (`websess:{sha256}`), so a copy of Redis does not hand out live cookies.
The key's TTL is the idle timeout and every request renews it: an idle
session simply disappears.  Logging in always makes a new session (the old
one, if any, is deleted), logging out deletes it, so a replayed cookie finds
nothing.

Before login there is no session, so the login form's CSRF token is a signed
double submit: a random pre-login cookie, and in the form an HMAC of it under
the secret key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import redis

from fallback import keys

COOKIE = "fallback_session"
PRE_COOKIE = "fallback_login"
RENEW_MS = 30_000


@dataclass(frozen=True)
class Session:
    token: str
    user: str
    csrf: str


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    def __init__(self, r: redis.Redis, idle_timeout: float) -> None:
        self.r = r
        self.idle_ms = max(1, int(idle_timeout * 1000))

    def create(self, user: str, replaces: str | None = None) -> Session:
        if replaces:
            self.revoke(replaces)
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        key = keys.web_session(_digest(token))
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"user": user, "csrf": csrf, "created": int(time.time())})
            pipe.pexpire(key, self.idle_ms)
            pipe.execute()
        return Session(token, user, csrf)

    def load(self, token: str | None) -> Session | None:
        """The live session of a cookie, its idle timer renewed; None when expired or revoked."""
        if not token or len(token) > 100:
            return None
        key = keys.web_session(_digest(token))
        with self.r.pipeline(transaction=False) as pipe:
            pipe.hmget(key, ("user", "csrf"))
            pipe.pttl(key)
            (user, csrf), left = pipe.execute()
        if user is None or csrf is None:
            return None
        # Renewing is a write, and with appendfsync always every write costs an fsync:
        # renew only once the timer has run down a little (at most every RENEW_MS).
        if left < self.idle_ms - min(RENEW_MS, self.idle_ms // 10):
            self.r.pexpire(key, self.idle_ms)
        return Session(token, user.decode(), csrf.decode())

    def revoke(self, token: str) -> None:
        self.r.delete(keys.web_session(_digest(token)))


def login_token(secret: str, pre_cookie: str) -> str:
    """The login form's CSRF token: bound to this browser's pre-login cookie."""
    return hmac.new(secret.encode(), b"login\0" + pre_cookie.encode(), hashlib.sha256).hexdigest()


def check_login_token(secret: str, pre_cookie: str | None, token: str | None) -> bool:
    if not pre_cookie or not token:
        return False
    return hmac.compare_digest(login_token(secret, pre_cookie), token)


def check_csrf(session: Session | None, token: str | None) -> bool:
    if session is None or not token:
        return False
    return hmac.compare_digest(session.csrf, token)


def sign(secret: str, *parts: str) -> str:
    """A short MAC over parts (the compose form's message id)."""
    return hmac.new(secret.encode(), "\0".join(parts).encode(), hashlib.sha256).hexdigest()[:32]
