"""`fallback check`: a Nagios/Icinga plugin; one status line with perfdata, exit 0/1/2/3.

Exit codes follow the Monitoring Plugins guidelines: 0 OK, 1 WARNING,
2 CRITICAL, 3 UNKNOWN.  Redis unreachable is CRITICAL, not UNKNOWN: Redis is
the thing being checked, and without it no mail is accepted (check_tcp also
says CRITICAL for a refused connection).  UNKNOWN is for when the plugin
itself cannot judge: bad thresholds or configuration, or an unexpected error
(a flag the parser does not know at all still exits 2 with usage, from the
shared `fallback` parser).

Checked: Redis answers; memory used vs maxmemory (the machine's RAM when no
maxmemory is set), with CRITICAL never later than the receiver's memory
reserve (memory_reserve: from there on it answers 452 4.3.1 to new mail, so
a reserve below --crit-memory moves both thresholds down) and CRITICAL
"intake refusing new mail" once it is reached; how every primary keeps
accepted mail (maxmemory-policy other than noeviction CRITICAL, appendfsync
everysec WARNING unless replica_acks, maxmemory 0 with a percentage reserve
WARNING; see fallback.ops.health.policy_problems); AOF on, last write and last rewrite ok (250 means durable
only with a healthy AOF; `--allow-no-aof` for deployments that rely on
replication instead); the age of the oldest unfinished message of the outbound
queue and of the forward queue (stream, retry set; the forward queue warns
from forward_alert_age if that is lower), and their dead letters
(WARNING: parked, waiting for an operator); forwarded mail the next hop
refused with a 5xx (WARNING: kept and retried, never bounced).  Queued mail
is never dropped, so an old queue is an alert to act on, not a failure of
the queue.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any, NoReturn

import redis

from fallback.commands.context import Context
from fallback.config import redact_url
from fallback.embedded import human_bytes
from fallback.errors import ConfigError, FallbackError
from fallback.ops import health

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", parents=[parents["common"]],
                       help="Nagios plugin: Redis, memory, AOF and queue age (exit 0/1/2/3)")
    p.add_argument("--warn-queue-age", dest="check_warn_queue_age", metavar="AGE",
                   help="WARNING when the oldest queued message is this old (e.g. 3600, 1h; default 1h)")
    p.add_argument("--crit-queue-age", dest="check_crit_queue_age", metavar="AGE",
                   help="CRITICAL when the oldest queued message is this old (default 4h)")
    p.add_argument("--warn-memory", dest="check_warn_memory", metavar="PERCENT",
                   help="WARNING at this %% of Redis maxmemory (default 80)")
    p.add_argument("--crit-memory", dest="check_crit_memory", metavar="PERCENT",
                   help="CRITICAL at this %% of Redis maxmemory (default 90)")
    p.add_argument("--allow-no-aof", action="store_true",
                   help="AOF off is OK (durability comes from replication instead)")
    # A plugin must answer UNKNOWN, not argparse's 2 (= CRITICAL), for a bad value.
    p.error = _usage_unknown(p)
    p.set_defaults(handler=run, failure_exit=UNKNOWN)


def _usage_unknown(p: argparse.ArgumentParser) -> Any:
    def error(message: str) -> NoReturn:
        p.print_usage(sys.stderr)
        print(f"FALLBACK UNKNOWN - {message}", file=sys.stdout)
        sys.exit(UNKNOWN)
    return error


@dataclass
class Verdict:
    state: int = OK
    notes: list[tuple[int, str]] = field(default_factory=list)
    perf: list[str] = field(default_factory=list)

    def add(self, state: int, text: str) -> None:
        self.state = max(self.state, state)
        self.notes.append((state, text))

    def line(self) -> str:
        # Problems first, worst first, so a truncated notification still says what is wrong.
        notes = sorted(self.notes, key=lambda n: -n[0])
        text = ", ".join(t for _, t in notes) or "nothing checked"
        perf = (" | " + " ".join(self.perf)) if self.perf else ""
        return f"FALLBACK {STATE[self.state]} - {text}{perf}"


def _level(value: float, warn: float, crit: float) -> int:
    return CRITICAL if value >= crit else WARNING if value >= warn else OK


def _age_text(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def memory_thresholds(warn: float, crit: float, reserve_percent: float | None) -> tuple[float, float]:
    """CRITICAL at or below the receiver's reserve, WARNING the same distance before it."""
    if reserve_percent is None or reserve_percent >= crit:
        return warn, crit
    return max(0.0, min(warn, reserve_percent - (crit - warn))), reserve_percent


def _memory(v: Verdict, r: redis.Redis, ctx: Context) -> None:
    s = ctx.settings
    mem, reserve = health.memory_reserve(r, s.memory_reserve)
    if reserve is not None and mem.used >= reserve:
        v.add(CRITICAL, f"intake refusing new mail (452 4.3.1): used_memory {human_bytes(mem.used)} "
                        f"of reserve {human_bytes(reserve)}")
    if mem.limit:
        share = 100.0 * reserve / mem.limit if reserve is not None else None
        warn, crit = memory_thresholds(s.check_warn_memory, s.check_crit_memory, share)
        lowered = f" (reserve at {share:.1f}%)" if share is not None and crit == share else ""
        v.add(_level(mem.percent, warn, crit), f"memory {mem.percent:.1f}% of {mem.limit_source}{lowered}")
        v.perf.append(f"memory={mem.percent:.1f}%;{round(warn, 1):g};{round(crit, 1):g};0;100")
    else:
        v.add(OK, "memory limit unknown")
    v.perf.append(f"memory_used={mem.used}B;;;0;{mem.limit or ''}")
    levels = {"critical": CRITICAL, "warning": WARNING, "note": OK}
    for problem in health.policy_problems(health.policies(r), s.memory_reserve, s.replica_acks):
        v.add(levels[problem.severity], problem.text)


def evaluate(r: redis.Redis, ctx: Context, allow_no_aof: bool) -> Verdict:
    s = ctx.settings
    v = Verdict()
    _memory(v, r, ctx)
    a = health.aof(r)
    if not a.enabled:
        v.add(OK if allow_no_aof else CRITICAL, "AOF off" + (" (allowed)" if allow_no_aof else
                                                               ": accepted mail is not durable"))
    elif not a.last_write_ok:
        v.add(CRITICAL, "AOF last write failed")
    elif not a.last_rewrite_ok:
        v.add(WARNING, "AOF last rewrite failed")
    else:
        v.add(OK, "AOF ok")
    now = health.redis_now_ms(r)
    for b in health.backlogs(r):
        age = b.age(now)
        warn = s.check_warn_queue_age
        if b.name == "forward":  # forward_alert_age is the forward queue's own alert threshold
            warn = min(warn, s.forward_alert_age)
        level = _level(age, warn, s.check_crit_queue_age)
        v.add(level, f"{b.name} queue {b.depth} oldest {_age_text(age)}")
        v.perf.append(f"{b.name}_age={age:.0f}s;{warn:g};{s.check_crit_queue_age:g};0")
        v.perf.append(f"{b.name}_depth={b.depth};;;0")
        if b.dead:
            # Parked (outbound: crashing workers; forward: only 5xx for forward_dead_letter_after):
            # kept, never dropped, and nothing retries them, so someone must look.
            where = "fallback queue forward-dead" if b.name == "forward" else "fallback queue list"
            v.add(WARNING, f"{b.name} queue {b.dead} dead letter(s) ({where})")
        if b.refused:
            # Never bounced (forward queue): the main system refusing its own users needs a person.
            v.add(WARNING, f"{b.name} queue {b.refused} refused by the next hop (5xx), kept and retried")
        if b.held:
            # Not a fault, but mail that waits for a person: say so, or it is forgotten.
            v.add(OK, f"{b.name} queue {b.held} held by an operator (fallback queue retry ID --forward)")
        v.perf.append(f"{b.name}_dead={b.dead};1;;0")
    # Issue 18: the mailstore watcher's verdicts (fallback watch).
    levels = {"critical": CRITICAL, "warning": WARNING, "note": OK}
    for problem in health.mailstore_problems(r):
        v.add(levels[problem.severity], problem.text)
    return v


def run(ctx: Context, args: argparse.Namespace) -> int:
    try:
        r = ctx.redis()
    except ConfigError as exc:
        print(f"FALLBACK UNKNOWN - {exc.reason}")
        return UNKNOWN
    except FallbackError as exc:  # StorageError: Redis does not answer
        print(f"FALLBACK CRITICAL - {exc.reason}")
        return CRITICAL
    try:
        verdict = evaluate(r, ctx, args.allow_no_aof)
    except redis.BusyLoadingError:
        print("FALLBACK CRITICAL - Redis is loading its data set and refuses commands")
        return CRITICAL
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        print(f"FALLBACK CRITICAL - Redis stopped answering: {redact_url(str(exc))}")
        return CRITICAL
    except redis.RedisError as exc:
        print(f"FALLBACK UNKNOWN - Redis error: {redact_url(str(exc))}")
        return UNKNOWN
    print(verdict.line())
    return verdict.state
