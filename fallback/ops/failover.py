"""The failover scope: which mailstores are failed over, shared by every process through Redis.

The whole scope is one small hash, `failover:scope` (keys.FAILOVER_SCOPE), so
one read answers "is this mailbox affected?" and every receiver, webmail and
CLI sees a change at once:

- no key: no failover declared yet, every provisioned mailbox is affected
  (so `fallback up` works on its own);
- `mode=all`: declared for everyone (`failover start --all`);
- `mode=listed` plus `ms:<mailstore>` fields: only those mailstores.  The
  first `start --mailstore` narrows "everyone" to the named mailstores, later
  ones add, `stop --mailstore` removes, `stop --all` leaves nobody affected.

Changes run as Lua scripts on that one key, so two operators acting at once
cannot interleave into a scope neither asked for.  Readers that ask per
recipient pass a `ScopeCache` (an object, not a global) to reuse one read
for a short time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

from fallback import keys
from fallback.mailbox.directory import Directory, Mailbox

DEFAULT, ALL, LISTED = "default", "all", "listed"
_PREFIX = "ms:"

# Narrow (or keep narrowing) to the named mailstores; ARGV: now, name...
_START_LISTED = """
if redis.call('HGET', KEYS[1], 'mode') ~= 'listed' then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'mode', 'listed', 'since', ARGV[1])
end
for i = 2, #ARGV do redis.call('HSETNX', KEYS[1], 'ms:' .. ARGV[i], ARGV[1]) end
return redis.call('HGETALL', KEYS[1])
"""

# Remove mailstores; ARGV: now, number of names, name..., then every known mailstore.
# When the scope was everyone, "everyone but these" is spelled out from the known list.
_STOP_LISTED = """
local n = tonumber(ARGV[2])
if redis.call('HGET', KEYS[1], 'mode') ~= 'listed' then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'mode', 'listed', 'since', ARGV[1])
  for i = 3 + n, #ARGV do redis.call('HSET', KEYS[1], 'ms:' .. ARGV[i], ARGV[1]) end
end
for i = 3, 2 + n do redis.call('HDEL', KEYS[1], 'ms:' .. ARGV[i]) end
return redis.call('HGETALL', KEYS[1])
"""


@dataclass(frozen=True)
class Scope:
    """One read of the scope: mode, when it was set, and mailstore -> declared at (epoch seconds)."""

    mode: str = DEFAULT
    since: float | None = None
    mailstores: dict[str, float] = field(default_factory=dict)

    def covers(self, mailstore: str) -> bool:
        return self.mode != LISTED or mailstore in self.mailstores

    def describe(self) -> str:
        if self.mode == DEFAULT:
            return "no failover declared: every mailbox is served here"
        if self.mode == ALL:
            return "failover declared for every mailstore"
        if not self.mailstores:
            return "no mailstore is failed over: mail goes on to the main system"
        return "failed over: " + ", ".join(sorted(self.mailstores))

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "since": self.since, "mailstores": dict(sorted(self.mailstores.items())),
                "description": self.describe()}

    @classmethod
    def parse(cls, raw: dict[Any, Any] | list[Any]) -> Scope:
        """From HGETALL (a dict) or a Lua reply (a flat list)."""
        if isinstance(raw, list):
            raw = dict(zip(raw[::2], raw[1::2], strict=True))
        f = {_text(k): _text(v) for k, v in raw.items()}
        if not f:
            return cls()
        stores = {k[len(_PREFIX):]: float(v) for k, v in f.items() if k.startswith(_PREFIX)}
        since = float(f["since"]) if f.get("since") else None
        return cls(mode=f.get("mode", ALL), since=since, mailstores=stores)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read(r: redis.Redis) -> Scope:
    return Scope.parse(r.hgetall(keys.FAILOVER_SCOPE))


async def read_async(r: aioredis.Redis) -> Scope:
    return Scope.parse(await r.hgetall(keys.FAILOVER_SCOPE))


def _covered(reply: list[Any]) -> bool:
    mode, declared = (None if v is None else _text(v) for v in reply)
    return mode != LISTED or declared is not None


@dataclass
class ScopeCache:
    """Reuse one read of the scope for `ttl` seconds; one per process, passed in by its owner."""

    ttl: float
    clock: Callable[[], float] = time.monotonic
    _scope: Scope | None = None
    _read_at: float = 0.0

    def _fresh(self) -> Scope | None:
        if self._scope is not None and self.clock() - self._read_at < self.ttl:
            return self._scope
        return None

    def _keep(self, scope: Scope) -> Scope:
        self._scope, self._read_at = scope, self.clock()
        return scope

    def get(self, r: redis.Redis) -> Scope:
        return self._fresh() or self._keep(read(r))

    async def get_async(self, r: aioredis.Redis) -> Scope:
        return self._fresh() or self._keep(await read_async(r))

    def clear(self) -> None:
        self._scope = None


def is_affected(r: redis.Redis, mailstore: str, cache: ScopeCache | None = None) -> bool:
    """Does a provisioned mailbox on this mailstore get its mail and webmail here?"""
    if cache is not None:
        return cache.get(r).covers(mailstore)
    return _covered(r.hmget(keys.FAILOVER_SCOPE, ["mode", _PREFIX + mailstore]))


async def is_affected_async(r: aioredis.Redis, mailstore: str, cache: ScopeCache | None = None) -> bool:
    if cache is not None:
        return (await cache.get_async(r)).covers(mailstore)
    return _covered(await r.hmget(keys.FAILOVER_SCOPE, ["mode", _PREFIX + mailstore]))


def _reset(r: redis.Redis, mode: str, now: float) -> Scope:
    """The whole scope replaced at once: everyone failed over (ALL), or no one (LISTED, empty)."""
    with r.pipeline(transaction=True) as pipe:
        pipe.delete(keys.FAILOVER_SCOPE)
        pipe.hset(keys.FAILOVER_SCOPE, mapping={"mode": mode, "since": now})
        pipe.execute()
    return read(r)


def start(r: redis.Redis, mailstores: Iterable[str] | None, now: float | None = None) -> Scope:
    """Fail over these mailstores (added to the scope), or everyone when `mailstores` is None."""
    now = time.time() if now is None else now
    if mailstores is None:
        return _reset(r, ALL, now)
    reply: Any = r.eval(_START_LISTED, 1, keys.FAILOVER_SCOPE, now, *mailstores)
    return Scope.parse(reply)


def stop(r: redis.Redis, mailstores: Iterable[str] | None, known: Iterable[str] = (),
         now: float | None = None) -> Scope:
    """End failover for these mailstores, or for everyone when `mailstores` is None.

    `known` (every provisioned mailstore) is what "everyone" meant when the
    scope was all: stopping one mailstore then leaves all the others.
    """
    now = time.time() if now is None else now
    if mailstores is None:
        return _reset(r, LISTED, now)
    names = list(mailstores)
    reply: Any = r.eval(_STOP_LISTED, 1, keys.FAILOVER_SCOPE, now, len(names), *names, *known)
    return Scope.parse(reply)


def iter_affected(directory: Directory, scope: Scope, only: Iterable[str] | None = None) -> Iterator[Mailbox]:
    """Provisioned mailboxes the scope covers, optionally only on some mailstores; streamed."""
    wanted = set(only) if only else None
    for mailbox in directory.iter_mailboxes():
        if scope.covers(mailbox.mailstore) and (wanted is None or mailbox.mailstore in wanted):
            yield mailbox


def affected_count(scope: Scope, provisioned: dict[str, int]) -> int:
    """How many mailboxes the scope covers, from the per-mailstore counts (no scan)."""
    return sum(n for name, n in provisioned.items() if scope.covers(name))
