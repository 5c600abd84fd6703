"""Server-side webmail sessions in Redis, and the CSRF tokens that go with them.

The cookie holds only a random token; Redis holds the session under a hash of
it (`websess:{sha256}`), so a copy of Redis does not hand out live cookies.
The key's TTL is the idle timeout and every request renews it: an idle
session simply disappears.  However active, a session ends `session_max_age`
after its log-in (a stolen cookie does not live for ever).  Logging in always
makes a new session (the old one, if any, is deleted), logging out deletes
it, so a replayed cookie finds nothing.  Each user's sessions are also listed
in an index (fallback.mailbox.logins), so the CLI can end them all at once.

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
from fallback.mailbox import logins

COOKIE = "fallback_session"
PRE_COOKIE = "fallback_login"
RENEW_MS = 30_000


@dataclass(frozen=True)
class Session:
    token: str
    user: str
    csrf: str


def token_digest(token: str) -> str:
    """What a session is stored under: a digest of its cookie, never the cookie itself."""
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    def __init__(self, r: redis.Redis, idle_timeout: float, max_age: float = 12 * 3600.0) -> None:
        self.r = r
        self.idle_ms = max(1, int(idle_timeout * 1000))
        self.max_age = max_age

    def create(self, user: str, replaces: str | None = None) -> Session:
        if replaces:
            self.revoke(replaces)
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        digest = token_digest(token)
        key = keys.web_session(digest)
        created = time.time()
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"user": user, "csrf": csrf, "created": repr(created)})
            pipe.pexpire(key, min(self.idle_ms, self._left_ms(created, created)))
            pipe.execute()
        logins.remember_session(self.r, user, digest, created, self.max_age)
        return Session(token, user, csrf)

    def _left_ms(self, created: float, now: float) -> int:
        return int((created + self.max_age - now) * 1000)

    def load(self, token: str | None, now: float | None = None) -> Session | None:
        """The live session of a cookie, its idle timer renewed; None when expired, past its
        max age, or revoked."""
        if not token or len(token) > 100:
            return None
        now = time.time() if now is None else now
        digest = token_digest(token)
        key = keys.web_session(digest)
        with self.r.pipeline(transaction=False) as pipe:
            pipe.hmget(key, ("user", "csrf", "created"))
            pipe.pttl(key)
            (user, csrf, created), left = pipe.execute()
        if user is None or csrf is None:
            return None
        # A session without a creation time (none are written so) is treated as just past
        # its max age: ending it is safe, keeping it for ever is not.
        age_left = self._left_ms(float(created or 0), now)
        if age_left <= 0:
            self.r.delete(key)
            logins.forget_session(self.r, user.decode(), digest)
            return None
        # Renewing is a write, and with appendfsync always every write costs an fsync:
        # renew only once the timer has run down a little (at most every RENEW_MS), and
        # never past the max age.
        renew_to = min(self.idle_ms, age_left)
        if left < renew_to - min(RENEW_MS, self.idle_ms // 10):
            self.r.pexpire(key, renew_to)
        return Session(token, user.decode(), csrf.decode())

    def revoke(self, token: str) -> None:
        digest = token_digest(token)
        key = keys.web_session(digest)
        user: bytes | None = self.r.hget(key, "user")  # type: ignore[assignment]
        self.r.delete(key)
        if user is not None:
            logins.forget_session(self.r, user.decode(), digest)


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
