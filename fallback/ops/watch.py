"""The mailstore watcher: probe every target each interval, decide, alert, and (when allowed)
fail a sick mailstore over; and the probe results it publishes in Redis for /metrics and
`fallback check`.

Decisions, per target:

- `fail_after` failed probes in a row (error, timeout, slower than
  slow_after) start an episode: one alert, and with auto-failover one
  `failover start` of that mailstore only.  Several watchers (one per site)
  agree through Redis: the scope already covering the mailstore, or another
  watcher's claim (`watch:claim:<name>`, SET NX with an expiry, deleted when
  the mailstore answers again: one claim per episode), means this one does
  nothing, so a mailstore is failed over once.
- The watcher never ends a failover.  A failed-over mailstore that answers
  every probe for `healthy_after` seconds raises "mailstore NAME looks
  healthy again" once; one failed probe starts that period again, so a
  flapping mailstore stays failed over until an operator decides.  One
  episode gets one start: a mailstore an operator stopped while it still
  fails is left alone until it has answered again.
- A probe that cannot tell anything about the mailstore is an alert about
  the watcher, never a failover: every target refusing the master login at
  once (a wrong --master-password-file; a login that then times out still
  counts as refused, since Dovecot slows down a client whose logins keep
  failing), or a host name that does not resolve.  Those probes do not
  count as failures.

Published: one small hash per mailstore (`watch:probe:<name>`) and the set
of their names (`watch:probes`), both expiring a few intervals after the
last write, so a stopped watcher's figures vanish rather than linger.  Any
webmail instance reads them (`records`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

from fallback.errors import FallbackError
from fallback.maillog import MailLog
from fallback.ops import failover, probe

log = logging.getLogger(__name__)

RECORD_PREFIX = "watch:probe:"   # + mailstore: the latest probe result and the watcher's verdict
RECORDS = "watch:probes"         # the names of the published records
CLAIM_PREFIX = "watch:claim:"    # + mailstore: the watcher that starts this episode's failover

Declare = Callable[[str, str], None]  # (mailstore, reason): `failover start`, run in a thread


@dataclass(frozen=True)
class Policy:
    interval: float = 30.0
    fail_after: int = 3
    slow_after: float = 5.0
    healthy_after: float = 600.0
    auto_failover: bool = False

    @property
    def record_ttl(self) -> int:
        """Published results outlive a few missed rounds, not a stopped watcher."""
        return int(max(60.0, 5 * (self.interval + self.slow_after)))

    @property
    def claim_ttl(self) -> int:
        """Long enough for every other watcher to see the scope changed."""
        return int(max(300.0, 4 * self.fail_after * (self.interval + self.slow_after)))


def is_failed_over(scope: failover.Scope, mailstore: str) -> bool:
    """Declared for it (explicitly or for all); the no-failover-yet default does not count."""
    return scope.mode == failover.ALL or (scope.mode == failover.LISTED and mailstore in scope.mailstores)


@dataclass
class TargetState:
    failures: int = 0
    recent: deque[probe.Result] = field(default_factory=lambda: deque(maxlen=10))
    last_success: float | None = None
    answering_since: float | None = None  # start of the current run of good probes
    episode: bool = False        # past fail_after, alerted
    acted: bool = False          # this episode's failover is done (or was already declared)
    healthy_alerted: bool = False
    config_problem: str = ""
    auth_refused: bool = False   # the last probes' master login was refused (see Watcher._refused)


class Watcher:
    """One watcher process's loop; `declare` is `failover start` (the CLI's own code)."""

    def __init__(self, r: aioredis.Redis, targets: Iterable[probe.Target], policy: Policy, *,
                 master_user: str, master_password: str, declare: Declare, maillog: MailLog,
                 watcher_id: str, ssl_context: ssl.SSLContext | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.r, self.policy, self.declare, self.maillog = r, policy, declare, maillog
        self.targets = list(targets)
        self.master_user, self.master_password = master_user, master_password
        self.watcher_id, self.clock, self.ssl_context = watcher_id, clock, ssl_context
        self.states = {t.name: TargetState() for t in self.targets}
        self._all_auth_alerted = False

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds every interval until `stop` is set; a round in progress is finished first."""
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.round()
            except (redis.RedisError, OSError) as exc:  # Redis away: probe again next round
                log.warning("watch: Redis error, results not published: %s", exc)
            left = self.policy.interval - (time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, left))

    async def round(self) -> list[probe.Result]:
        results = list(await asyncio.gather(*(
            probe.probe(t, self.master_user, self.master_password, slow_after=self.policy.slow_after,
                        ssl_context=self.ssl_context)
            for t in self.targets)))
        scope = await failover.read_async(self.r)
        await self.assess(results, scope)
        await self.publish(results, scope)
        return results

    def _refused(self, res: probe.Result) -> bool:
        """The master login refused, or timed out after a refusal: Dovecot delays the answers to
        a client whose logins keep failing (its auth penalty), so a wrong password soon looks like
        a slow login.  Cleared by any other outcome."""
        state = self.states[res.target]
        if res.kind == probe.AUTH or (state.auth_refused and res.kind == probe.TIMEOUT
                                      and list(res.steps)[-1:] == ["login"]):
            state.auth_refused = True
        else:
            state.auth_refused = False
        return state.auth_refused

    async def assess(self, results: list[probe.Result], scope: failover.Scope) -> None:
        refused = [self._refused(res) for res in results]
        if results and all(refused):
            refusal = next((res for res in results if res.kind == probe.AUTH), results[0])
            reason = ("watcher cannot probe any mailstore: every target refuses the master login "
                      f"({refusal.reason}); check --master-user and --master-password-file; "
                      "nothing is failed over")
            for res in results:
                self.states[res.target].config_problem = reason
            if not self._all_auth_alerted:
                self.maillog.alert(None, None, reason=reason)
                self._all_auth_alerted = True
            return
        self._all_auth_alerted = False
        for res in results:
            state = self.states[res.target]
            if res.kind == probe.DNS:
                if not state.config_problem:
                    self.maillog.alert(None, None, reason=f"watcher cannot probe mailstore {res.target}: "
                                       f"{res.reason}; check its --target; it is not failed over")
                state.config_problem = f"watcher cannot probe mailstore {res.target}: {res.reason}"
                continue
            state.config_problem = ""
            state.recent.append(res)
            if res.ok:
                if state.episode:  # the episode is over: a later one may be failed over again
                    await self.r.delete(CLAIM_PREFIX + res.target)
                self._answered(res, state, scope)
            else:
                await self._failed(res, state, scope)

    def _answered(self, res: probe.Result, state: TargetState, scope: failover.Scope) -> None:
        now = res.at
        if state.episode:
            log.info("watch: mailstore %s answers again after %d failed probes", res.target, state.failures)
        state.failures, state.episode, state.acted = 0, False, False
        state.last_success = now
        if state.answering_since is None:
            state.answering_since = now
        if not is_failed_over(scope, res.target):
            state.healthy_alerted = False
            return
        if not state.healthy_alerted and now - state.answering_since >= self.policy.healthy_after:
            state.healthy_alerted = True
            self.maillog.alert(None, None, reason=(
                f"mailstore {res.target} looks healthy again: every probe answered for "
                f"{now - state.answering_since:.0f}s; the watcher does not end the failover: decide, "
                f"run fallback reconcile, then fallback failover stop --mailstore {res.target}"))

    async def _failed(self, res: probe.Result, state: TargetState, scope: failover.Scope) -> None:
        state.failures += 1
        state.answering_since, state.healthy_alerted = None, False
        if state.failures < self.policy.fail_after:
            return
        if not state.episode:
            state.episode = True
            what = ("failing it over" if self.policy.auto_failover and not is_failed_over(scope, res.target)
                    else "already failed over" if is_failed_over(scope, res.target)
                    else "alert only: --auto-failover is off")
            self.maillog.alert(None, None, reason=f"mailstore {res.target} failed {state.failures} probes "
                               f"in a row ({res.kind}: {res.reason}); {what}")
        if self.policy.auto_failover and not state.acted:
            await self._fail_over(res.target, state, scope)

    async def _fail_over(self, name: str, state: TargetState, scope: failover.Scope) -> None:
        if is_failed_over(scope, name):
            state.acted = True
            return
        claim = CLAIM_PREFIX + name
        won = await self.r.set(claim, self.watcher_id, nx=True, ex=self.policy.claim_ttl)
        if not won:
            holder = await self.r.get(claim)
            log.info("watch: mailstore %s is being failed over by watcher %s", name, _text(holder))
            state.acted = True
            return
        if is_failed_over(await failover.read_async(self.r), name):  # another watcher's, just done
            state.acted = True
            return
        reason = "; ".join(r.describe() for r in list(state.recent)[-self.policy.fail_after:])
        try:
            await asyncio.to_thread(self.declare, name, reason)
        except (FallbackError, redis.RedisError, OSError) as exc:
            text = exc.reason if isinstance(exc, FallbackError) else str(exc)
            self.maillog.alert(None, None, reason=f"watcher could not fail over mailstore {name}: {text}; "
                               "will try again next round")
            with contextlib.suppress(redis.RedisError, OSError):
                await self.r.delete(claim)
            return
        state.acted = True
        log.info("watch: failed over mailstore %s (%s)", name, reason)

    async def publish(self, results: list[probe.Result], scope: failover.Scope) -> None:
        ttl = self.policy.record_ttl
        async with self.r.pipeline(transaction=False) as pipe:
            for res in results:
                state = self.states[res.target]
                fields: dict[str, Any] = {
                    "up": 1 if res.ok else 0, "kind": res.kind, "reason": res.reason[:300],
                    "at": f"{res.at:.3f}", "failures": state.failures,
                    "fail_after": self.policy.fail_after,
                    "failing": 1 if state.failures >= self.policy.fail_after else 0,
                    "failed_over": 1 if is_failed_over(scope, res.target) else 0,
                    "healthy_again": 1 if state.healthy_alerted else 0,
                    "config_problem": state.config_problem[:300], "watcher": self.watcher_id,
                    "total": f"{res.total:.6f}"}
                for step in probe.STEPS:
                    fields[step] = f"{res.steps[step]:.6f}" if step in res.steps else ""
                if state.last_success is not None:
                    fields["last_success"] = f"{state.last_success:.3f}"
                key = RECORD_PREFIX + res.target
                pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
                pipe.expire(key, ttl)
                pipe.sadd(RECORDS, res.target)
            pipe.expire(RECORDS, ttl)
            await pipe.execute()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Record:
    """A mailstore's latest published probe, as /metrics and `fallback check` read it."""

    mailstore: str
    up: bool
    kind: str
    reason: str
    at: float
    steps: dict[str, float]
    total: float
    failures: int
    fail_after: int
    failing: bool
    failed_over: bool
    healthy_again: bool
    config_problem: str
    last_success: float | None
    watcher: str


def records(r: redis.Redis) -> list[Record]:
    """Every published record (a few hashes: one per watched mailstore), by name."""
    names = sorted(_text(n) for n in r.smembers(RECORDS))
    if not names:
        return []
    with r.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(RECORD_PREFIX + name)
        rows = pipe.execute()
    out = []
    for name, raw in zip(names, rows, strict=True):
        f = {_text(k): _text(v) for k, v in raw.items()}
        if not f:
            continue  # expired since the set was refreshed
        out.append(Record(
            mailstore=name, up=f.get("up") == "1", kind=f.get("kind", ""), reason=f.get("reason", ""),
            at=float(f.get("at") or 0), steps={s: float(f[s]) for s in probe.STEPS if f.get(s)},
            total=float(f.get("total") or 0), failures=int(f.get("failures") or 0),
            fail_after=int(f.get("fail_after") or 0), failing=f.get("failing") == "1",
            failed_over=f.get("failed_over") == "1", healthy_again=f.get("healthy_again") == "1",
            config_problem=f.get("config_problem", ""),
            last_success=float(f["last_success"]) if f.get("last_success") else None,
            watcher=f.get("watcher", "")))
    return out
