"""Login throttling: increasing delays per client IP and per account, kept in Redis.

A few failures are free (people mistype); after that each failure doubles the
time before the next attempt is even looked at, up to a cap.  The account
counter is kept for addresses that do not exist too, so the answers for a
known and an unknown account look alike.  A success clears the account's
counter but not the IP's: otherwise one valid account would reset the
throttle for guessing others.
"""

from __future__ import annotations

import math
import time

import redis

from fallback import keys

FREE = {"acct": 3, "ip": 20}   # failures before delays start
MAX_DELAY = 300.0              # seconds
WINDOW = 3600                  # a counter is forgotten after this long without failures


def delay_after(kind: str, fails: int) -> float:
    extra = fails - FREE[kind]
    return 0.0 if extra < 0 else min(MAX_DELAY, float(2 ** extra))


class LoginThrottle:
    def __init__(self, r: redis.Redis) -> None:
        self.r = r

    def _keys(self, ip: str, account: str) -> list[tuple[str, str]]:
        return [("ip", keys.login_throttle("ip", ip)), ("acct", keys.login_throttle("acct", account))]

    def wait(self, ip: str, account: str, now: float | None = None) -> int:
        """Seconds before this IP may try this account again (0: go ahead)."""
        now = time.time() if now is None else now
        with self.r.pipeline(transaction=False) as pipe:
            for _, key in self._keys(ip, account):
                pipe.hget(key, "until")
            untils = [float(v) for v in pipe.execute() if v is not None]
        left = max([u - now for u in untils], default=0.0)
        return math.ceil(left) if left > 0 else 0

    def failed(self, ip: str, account: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for kind, key in self._keys(ip, account):
            fails = int(self.r.hincrby(key, "fails", 1))
            with self.r.pipeline(transaction=False) as pipe:
                pipe.hset(key, "until", now + delay_after(kind, fails))
                pipe.expire(key, WINDOW)
                pipe.execute()

    def succeeded(self, account: str) -> None:
        self.r.delete(keys.login_throttle("acct", account))
