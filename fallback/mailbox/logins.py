"""A user's webmail log-in state as Redis holds it for every process: the per-user index
of sessions, ending them all, and lifting the log-in throttle of an account.

The webmail (web/sessions.py, web/throttle.py) writes this state; the CLI
(`fallback mailbox remove|logout|unthrottle`, a password-changing re-provision)
must end or lift it without importing the webmail, so the shared half lives
here.  A session key (`websess:{digest}`) and the user's index
(`mbx:{user}:websess`) are in different cluster slots: they are written one
after the other, never by a multi-key script.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis

from fallback import keys


def remember_session(r: redis.Redis, user: str, digest: str, created: float, max_age: float) -> None:
    """Add a new session to the user's index, pruning entries past the max age (those
    sessions are gone whatever their idle timer says)."""
    index = keys.web_sessions_of(user)
    with r.pipeline(transaction=True) as pipe:
        pipe.zremrangebyscore(index, "-inf", f"({created - max_age}")
        pipe.zadd(index, {digest: created})
        # Every session in it ends within max_age: so does the index.
        pipe.expire(index, max(1, int(max_age) + 1))
        pipe.execute()


def forget_session(r: redis.Redis, user: str, digest: str) -> None:
    r.zrem(keys.web_sessions_of(user), digest)


def end_sessions(r: redis.Redis, user: str) -> int:
    """Delete every session of the user; the number that were still alive."""
    return end_sessions_of(r, [user])[user]


def end_sessions_of(r: redis.Redis, users: Iterable[str]) -> dict[str, int]:
    """end_sessions for many users in two pipelined rounds (a re-provision of many)."""
    users = list(users)
    if not users:
        return {}
    with r.pipeline(transaction=False) as pipe:
        for user in users:
            pipe.zrange(keys.web_sessions_of(user), 0, -1)
        indexes: list[list[bytes]] = pipe.execute()
    with r.pipeline(transaction=False) as pipe:
        for digests in indexes:
            for digest in digests:
                pipe.delete(keys.web_session(digest.decode()))
        for user, digests in zip(users, indexes, strict=True):
            if digests:
                # Only what was read: a session created meanwhile is not lost from the index.
                pipe.zrem(keys.web_sessions_of(user), *digests)
        results = pipe.execute()
    ended: dict[str, int] = {}
    at = 0
    for user, digests in zip(users, indexes, strict=True):
        ended[user] = sum(int(n) for n in results[at:at + len(digests)])
        at += len(digests)
    return ended


def lift_throttle(r: redis.Redis, account: str) -> bool:
    """Forget the account's failed log-ins (account-wide and per client network); True
    when there were any.  Per-client counters across accounts (`throttle:{src:...}`) stay."""
    return bool(r.delete(keys.login_throttle("acct", account)))

