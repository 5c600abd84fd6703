"""The admin console's own sessions: a cookie of its own, kept apart from the webmail's.

Like the webmail's (web/sessions.py), the cookie holds only a random token
and Redis holds the session under its SHA-256 (keys.console_session), with
the idle timeout as TTL and the session max age as a hard end.  The cookie
is `fallback_console` on path /admin only, HttpOnly, SameSite=Strict (a link
from another site arrives without it) and Secure per cookie_secure, so a
webmail session can never act on the console nor the other way round.
Before log-in the form's CSRF token is a signed double submit of a pre-login
cookie (`fallback_console_login`), signed for the console only.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis

from fallback import keys
from web.sessions import sign, token_digest

COOKIE = "fallback_console"
PRE_COOKIE = "fallback_console_login"
PATH = "/admin"


@dataclass(frozen=True)
class ConsoleSession:
    token: str
    who: str
    csrf: str


class ConsoleSessions:
    def __init__(self, r: redis.Redis, idle_timeout: float, max_age: float) -> None:
        self.r = r
        self.idle_ms = max(1, int(idle_timeout * 1000))
        self.max_age = max_age

    def create(self, who: str) -> ConsoleSession:
        token, csrf, created = secrets.token_urlsafe(32), secrets.token_urlsafe(32), time.time()
        key = keys.console_session(token_digest(token))
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"who": who, "csrf": csrf, "created": repr(created)})
            pipe.pexpire(key, min(self.idle_ms, int(self.max_age * 1000)))
            pipe.execute()
        return ConsoleSession(token, who, csrf)

    def load(self, token: str | None, now: float | None = None) -> ConsoleSession | None:
        """The live session of a cookie, its idle timer renewed; None when gone or too old."""
        if not token or len(token) > 100:
            return None
        now = time.time() if now is None else now
        key = keys.console_session(token_digest(token))
        found: Any = self.r.hmget(key, ("who", "csrf", "created"))
        who, csrf, created = found
        if who is None or csrf is None:
            return None
        left_ms = int((float(created or 0) + self.max_age - now) * 1000)
        if left_ms <= 0:
            self.r.delete(key)
            return None
        self.r.pexpire(key, min(self.idle_ms, left_ms))
        return ConsoleSession(token, who.decode(), csrf.decode())

    def revoke(self, token: str) -> None:
        self.r.delete(keys.console_session(token_digest(token)))


def login_token(secret: str, pre_cookie: str) -> str:
    return sign(secret, "console-login", pre_cookie)


def check_login_token(secret: str, pre_cookie: str | None, token: str | None) -> bool:
    if not pre_cookie or not token or len(pre_cookie) > 100:
        return False
    return hmac.compare_digest(login_token(secret, pre_cookie), token)


def check_csrf(session: ConsoleSession | None, token: str | None) -> bool:
    return session is not None and bool(token) and hmac.compare_digest(session.csrf, token or "")
