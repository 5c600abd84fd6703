"""What the admin console shows, as plain data: the dashboard's figures and the affected-users search.

Every figure here is read from something kept up to date as mail flows
(the failover scope, the directory's per-mailstore counts, the per-minute
mail-log counts of intakerate, the queues' stream heads, the reconcile
counters, INFO memory): no scan of the mailboxes, so the dashboard costs the
same with a million users as with ten.

The search pages through the directory the way the reseller API does
(reseller.affected_page: a cursor, a bounded number of entries read per
page).  "name@domain.example" with at least dirindex.PREFIX characters of
the name is looked up in the directory's name index instead: a few small
hashes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from fallback.addresses import normalize_address
from fallback.errors import InputError
from fallback.mailbox import dirindex
from fallback.mailbox.directory import Directory, Mailbox
from fallback.mailbox.store import mailstore_stats
from fallback.ops import failover, health, incident, intakerate, metrics, reseller

MAX_QUERY = 320
# Directory buckets one page of the console reads at most (the reseller API's entry budget
# bounds a full directory; this bounds a sparse one: 65,536 buckets of a few users each).
BUCKET_BUDGET = 2048


@dataclass(frozen=True)
class Store:
    """One mailstore as the dashboard shows it."""

    name: str
    provisioned: int
    failed_over: bool
    since: float | None
    messages: int
    reconcile: dict[str, int]

    @property
    def reconciled_percent(self) -> float:
        total = sum(self.reconcile.values())
        return 100.0 * self.reconcile.get("done", 0) / total if total else 100.0


@dataclass(frozen=True)
class Dashboard:
    scope: failover.Scope
    affected: int
    stores: list[Store]
    hour: intakerate.Hour
    queues: list[health.Backlog]
    now_ms: int
    memory: health.Memory
    reserve_at: int | None
    incident: incident.Incident | None


def dashboard(r: redis.Redis, directory: Directory, memory_reserve: str) -> Dashboard:
    scope = failover.read(r)
    provisioned = directory.mailstores()
    stored = mailstore_stats(r)
    table = metrics.reconcile_table(stored, metrics.reconcile_counts(r))
    names = sorted(set(provisioned) | set(stored) | set(scope.mailstores) | set(table))
    stores = [Store(n, provisioned.get(n, 0), scope.covers(n), scope.mailstores.get(n, scope.since),
                    stored.get(n, {}).get("messages", 0),
                    table.get(n, dict.fromkeys(metrics.RECONCILE_STATES, 0))) for n in names]
    mem, reserve_at = health.memory_reserve(r, memory_reserve)
    return Dashboard(scope, failover.affected_count(scope, provisioned), stores, intakerate.last_hour(r),
                     health.backlogs(r), health.redis_now_ms(r), mem, reserve_at, incident.read(r))


def check_query(text: str) -> str:
    """The search text as addresses are kept (lower case); InputError with what the operator reads."""
    q = text.strip().lower()
    if len(q) > MAX_QUERY:
        raise InputError(f"the search may be at most {MAX_QUERY} characters")
    if any(c.isspace() or c in "\"<>,;" for c in q):
        raise InputError("search for the start of an address: no spaces, quotes, <, >, commas or semicolons")
    return q


def _indexed(q: str) -> tuple[str, str] | None:
    """(local part, domain) when the name index can answer the search."""
    local, at, domain = q.partition("@")
    if not at or len(local) < dirindex.PREFIX or "." not in domain:
        return None
    try:
        domain = normalize_address(f"x@{domain}").partition("@")[2]
    except InputError:
        return None
    return local, domain


def search_page(directory: Directory, scope: failover.Scope, q: str, limit: int,
                cursor: str | None) -> reseller.Page:
    """Affected mailboxes whose address starts with `q` (empty: all), from the cursor on.

    An indexed search pages by address (the cursor is "@" + the last address shown); any
    other pages through the directory's buckets (reseller.parse_paging's cursor)."""
    found = _indexed(q)
    if found is not None:
        local, domain = found
        after = cursor[1:] if cursor and cursor.startswith("@") else ""
        names = [a for a in dirindex.lookup(directory.r, domain, local, 1_000_000) if a > after]
        listed = list(names)
        rows: list[Mailbox] = []
        while names and len(rows) < limit:
            chunk, names = names[:limit], names[limit:]
            for address, raw in zip(chunk, directory.get_many(chunk), strict=True):
                if raw is None:
                    continue
                m = Mailbox.decode(address, raw)
                if scope.covers(m.mailstore) and len(rows) < limit:
                    rows.append(m)
        more = len(rows) == limit and listed[-1] > rows[-1].address
        return reseller.Page(rows, "@" + rows[-1].address if rows and more else None)
    if cursor and cursor.startswith("@"):
        cursor = None
    limit, bucket, offset = reseller.parse_paging(str(limit), cursor, directory.buckets)

    def match(address: str) -> bool:
        return address.startswith(q)

    return reseller.affected_page(directory, scope, None, None, limit, bucket, offset,
                                  match=match if q else None, bucket_budget=BUCKET_BUDGET)


def queue_ages(queues: list[health.Backlog], now_ms: int) -> dict[str, Any]:
    return {b.name: {"depth": b.depth, "oldest": b.age(now_ms), "dead": b.dead} for b in queues}
