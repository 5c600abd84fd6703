"""The audit log of admin actions: who did what, when, with which arguments, and how it ended.

Every entry goes to the Redis stream `audit` (keys.AUDIT_STREAM): all
processes on all hosts write to the same place, stream ids keep the order,
and the admin API and `fallback failover status` can read it back.  When the
`audit_log` setting names a file, the same entry is also appended there as one
JSON line: a copy that outlives a Redis flush and that a syslog or SIEM
shipper can tail.  The stream is capped at MAX_ENTRIES (exact MAXLEN trimming on
each write: one entry out per entry in, so Redis memory stays bounded; the
file keeps all).
It is one key, so it lives in one slot of a Redis Cluster.

Who: `actor_name` (--actor, SUDO_USER, the login user) for the CLI, the
token name for the admin API and console (`token:NAME`, or `admin`).
The actions written (the vocabulary `fallback audit` shows): failover
start/stop, dns, purge, queue retry/delete/hold/release and their
forward-* twins, provision (counts), provision-sync, mailbox add/remove/
logout, export, reconcile, alias add/remove, token create/revoke; the
incident text (`incident set`/`incident clear`) and console log-ins
(`console_login`) use `write` like any other action.

An action that has to work while Redis is down (the DNS switch) still gets
its file line; when no copy could be written at all, the caller is told so
it can warn the operator rather than lose the record silently.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from fallback import keys


@dataclass(frozen=True)
class Entry:
    action: str
    actor: str
    args: dict[str, Any] = field(default_factory=dict)
    outcome: str = "ok"
    time: float = field(default_factory=time.time)

    def fields(self) -> dict[str, str]:
        return {"time": f"{self.time:.3f}", "actor": self.actor, "action": self.action,
                "args": json.dumps(self.args, sort_keys=True), "outcome": self.outcome}

    @classmethod
    def from_fields(cls, raw: Mapping[Any, Any]) -> Entry:
        f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in raw.items()}
        return cls(action=f.get("action", ""), actor=f.get("actor", ""),
                   args=json.loads(f.get("args") or "{}"), outcome=f.get("outcome", ""),
                   time=float(f.get("time") or 0))


def actor_name(explicit: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """--actor, else the person behind sudo, else the login user: who to blame, not who ran it."""
    env = os.environ if env is None else env
    for candidate in (explicit, env.get("SUDO_USER"), env.get("USER"), env.get("LOGNAME")):
        if candidate and candidate.strip():
            return candidate.strip()
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


MAX_ENTRIES = 100_000  # a long outage's worth of admin actions; the audit_log file keeps them all


def record(r: redis.Redis | None, entry: Entry, audit_file: Path | None = None) -> list[str]:
    """Write the entry everywhere it should go; return what could not be written (empty: all went)."""
    problems: list[str] = []
    written = 0
    if r is not None:
        try:
            r.xadd(keys.AUDIT_STREAM, entry.fields(),  # type: ignore[arg-type]
                   maxlen=MAX_ENTRIES, approximate=False)
            written += 1
        except (redis.RedisError, OSError) as exc:
            problems.append(f"audit entry not written to Redis: {exc}")
    if audit_file is not None:
        try:
            with open(audit_file, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(asdict(entry), sort_keys=True) + "\n")
            written += 1
        except OSError as exc:
            problems.append(f"audit entry not written to {audit_file}: {exc}")
    if written == 0 and not problems:
        problems.append("audit entry not written: no Redis and no audit_log file")
    return problems


def recent(r: redis.Redis, count: int = 20) -> list[Entry]:
    """The newest entries, newest first."""
    entries: Any = r.xrevrange(keys.AUDIT_STREAM, count=count)
    return [Entry.from_fields(fields) for _id, fields in entries or []]


def write(r: redis.Redis | None, audit_file: Path | None, action: str, actor: str,
          args: dict[str, Any] | None = None, outcome: str = "ok", warn_as: str = "fallback") -> bool:
    """Record one action; a copy that could not be written is a warning on stderr, never an
    exception (the action itself happened).  True when every copy went."""
    problems = record(r, Entry(action=action, actor=actor, args=args or {}, outcome=outcome), audit_file)
    for problem in problems:
        print(f"{warn_as}: warning: {problem}", file=sys.stderr)
    return not problems


def console_login(r: redis.Redis, audit_file: Path | None, who: str, client: str, outcome: str) -> bool:
    """A log-in to the admin console (`who`: the token's name, or "admin"), ok or refused."""
    return write(r, audit_file, "console login", who, {"client": client}, outcome, "fallback web")


def since(r: redis.Redis, seconds: float | None, count: int = 10_000,
          now: float | None = None) -> list[Entry]:
    """Entries of the last `seconds` (None: all kept), oldest first, at most the newest `count`."""
    now = time.time() if now is None else now
    low = "-" if seconds is None else str(max(int((now - seconds) * 1000), 0))
    entries: Any = r.xrevrange(keys.AUDIT_STREAM, max="+", min=low, count=count)
    return [Entry.from_fields(fields) for _id, fields in reversed(entries or [])]


def page(r: redis.Redis, before: str | None = None, count: int = 50) -> tuple[list[Entry], str | None]:
    """One page of the log, newest first: at most `count` entries older than the stream id
    `before` (None: from the newest), and the id to ask for the next page (None: no more)."""
    high = "+" if not before else f"({before}"
    entries: Any = r.xrevrange(keys.AUDIT_STREAM, max=high, min="-", count=count + 1)
    entries = list(entries or [])
    more = len(entries) > count
    rows = [Entry.from_fields(f) for _id, f in entries[:count]]
    last = entries[count - 1][0] if more else None
    return rows, (last.decode() if isinstance(last, bytes) else last)
