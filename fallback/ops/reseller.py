"""What the admin API shows a reseller token: its domains' users and figures, nothing else.

`affected_page` pages through the directory's buckets (never the whole
directory at once): a cursor names the next bucket and how many of its
addresses (sorted) were already read, and each page reads at most
`scan_budget` directory entries, so a request for a small domain among a
million users costs the same as any other page.  A page can hold fewer rows
than asked for (even none): the caller goes on while `next_cursor` is not
null.

`domain_status` gives the figures that can be told per domain: provisioned
mailboxes (the directory's per-domain counts) and the queues' messages of
those domains (outbound by sender, forward by recipient).  Figures that are
shared by every customer (Redis memory, the mailstores, the failover scope,
the affected count, which needs a full scan) are left out, not leaked.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis

from fallback import keys
from fallback.errors import InputError
from fallback.mailbox.directory import Directory, Mailbox
from fallback.ops import failover
from fallback.queues import forward_ops, outbound

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
SCAN_BUDGET = 20_000  # directory entries one page may read
_CURSOR = re.compile(r"(\d{1,9})\.(\d{1,9})")


@dataclass(frozen=True)
class Page:
    rows: list[Mailbox]
    next_cursor: str | None


def parse_paging(limit: str | None, cursor: str | None, buckets: int) -> tuple[int, int, int]:
    """(limit, bucket, offset) from the query; InputError with the text the caller reads."""
    n = DEFAULT_LIMIT
    if limit is not None:
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIMIT:
            raise InputError(f"limit must be a whole number from 1 to {MAX_LIMIT}")
        n = int(limit)
    if cursor is None or cursor == "":
        return n, 0, 0
    m = _CURSOR.fullmatch(cursor)
    if not m or int(m.group(1)) > buckets:
        raise InputError("cursor is not one this API gave out (use next_cursor of the previous page)")
    return n, int(m.group(1)), int(m.group(2))


def affected_page(directory: Directory, scope: failover.Scope, domains: Iterable[str] | None,
                  only: Iterable[str] | None, limit: int, bucket: int, offset: int,
                  scan_budget: int = SCAN_BUDGET, batch: int = 64,
                  match: Callable[[str], bool] | None = None, bucket_budget: int | None = None) -> Page:
    """Affected mailboxes of these domains (None: all) from the cursor on, at most `limit`;
    `match` (the console's search) also filters on the address, and `bucket_budget` bounds the
    buckets one page reads (a sparse directory has few entries per bucket)."""
    wanted_domains = set(domains) if domains is not None else None
    wanted_stores = set(only) if only else None
    rows: list[Mailbox] = []
    read = 0
    stop = directory.buckets if bucket_budget is None else min(directory.buckets, bucket + bucket_budget)
    while bucket < stop and read < scan_budget:
        last = min(bucket + batch, stop)
        with directory.r.pipeline(transaction=False) as pipe:
            for n in range(bucket, last):
                pipe.hgetall(keys.dir_bucket_n(n))
            replies = pipe.execute()
        for n, reply in zip(range(bucket, last), replies, strict=True):
            entries = sorted(reply.items())
            for i in range(offset, len(entries)):
                address, value = entries[i]
                read += 1
                m = Mailbox.decode(address.decode(), value)
                if ((wanted_domains is None or m.domain in wanted_domains) and scope.covers(m.mailstore)
                        and (wanted_stores is None or m.mailstore in wanted_stores)
                        and (match is None or match(m.address))):
                    rows.append(m)
                    if len(rows) == limit:
                        more = i + 1 < len(entries) or n + 1 < directory.buckets
                        cursor = f"{n}.{i + 1}" if i + 1 < len(entries) else f"{n + 1}.0"
                        return Page(rows, cursor if more else None)
            offset = 0
            if read >= scan_budget:
                return Page(rows, f"{n + 1}.0" if n + 1 < directory.buckets else None)
        bucket = last
    return Page(rows, None if bucket >= directory.buckets else f"{bucket}.0")


def _queue_figures(created: list[float], dead: int, now: float) -> dict[str, Any]:
    return {"depth": len(created), "oldest_age_seconds": round(now - min(created), 3) if created else 0.0,
            "dead": dead}


def domain_status(r: redis.Redis, domains: Iterable[str], now: float | None = None) -> dict[str, Any]:
    """Per domain: provisioned mailboxes and its mail in the outbound and forward queues."""
    now = time.time() if now is None else now
    names = sorted(set(domains))
    counts: Any = r.hmget(keys.DIR_DOMAINS, names) if names else []
    out: dict[str, Any] = {}
    items = outbound.scan(r)
    fwd = forward_ops.scan(r)
    for name, count in zip(names, counts, strict=True):
        mine = [i for i in items if i.sender.rpartition("@")[2] == name]
        waiting = [i.record.created for i in mine if i.record is not None and i.where != "dead"]
        mine_fwd = [i for i in fwd if i.recipient.rpartition("@")[2] == name]
        out[name] = {
            "mailboxes": int(count or 0),
            "queues": {
                "outbound": _queue_figures(waiting, sum(1 for i in mine if i.where == "dead"), now),
                "forward": _queue_figures([i.created for i in mine_fwd if i.where != "dead"],
                                          sum(1 for i in mine_fwd if i.where == "dead"), now)}}
    return out
