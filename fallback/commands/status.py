"""`fallback status`: mailboxes, messages and bytes per mailstore; Redis health."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fallback.commands.context import Context, columns_table
from fallback.mailbox import quota, removed
from fallback.mailbox.store import mailstore_stats
from fallback.ops.health import redis_health

SHOW_REMOVED = 20


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", parents=[parents["common"]],
                       help="what is stored, per mailstore, and how Redis is")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(handler=run)


def collect(ctx: Context) -> dict[str, Any]:
    r = ctx.redis()
    directory = ctx.directory()
    provisioned = directory.mailstores()
    stored = mailstore_stats(r)
    rows = {}
    for name in sorted(set(provisioned) | set(stored)):
        rows[name] = {"mailboxes": provisioned.get(name, 0),
                      "messages": stored.get(name, {}).get("messages", 0),
                      "bytes": stored.get(name, {}).get("bytes", 0)}
    s = ctx.settings
    full = [{"address": f.address, "bytes": f.used, "refused_at": f.refused_at}
            for f in quota.recently_refused(r)]
    # Removed by a directory sync while holding mail: kept until reconcile --all and purge.
    kept = [{"address": h.address, "mailstore": h.mailstore, "messages": h.messages, "bytes": h.bytes}
            for h in removed.held(r, directory)]
    return {"mailstores": rows, "domains": len(directory.domains()),
            "removed_with_mail": kept,
            "quota": {"bytes": s.mailbox_quota, "refused_last_day": full},
            "redis": redis_health(r, s.memory_reserve, s.replica_acks)}


def run(ctx: Context, args: argparse.Namespace) -> int:
    data = collect(ctx)
    if args.format == "json":
        ctx.console.print_json(json.dumps(data))
        return 0
    table = columns_table("fallback status", (
        ("mailstore", "left"), ("mailboxes", "right"), ("messages", "right"), ("bytes", "right")), fold=False)
    totals = [0, 0, 0]
    for name, row in data["mailstores"].items():
        table.add_row(name, str(row["mailboxes"]), str(row["messages"]), str(row["bytes"]))
        totals = [totals[0] + row["mailboxes"], totals[1] + row["messages"], totals[2] + row["bytes"]]
    table.add_row("[b]total[/b]", *(str(t) for t in totals))
    ctx.console.print(table)
    q = data["quota"]
    refused = q["refused_last_day"]
    ctx.console.print(f"Mailbox quota: {quota.human(q['bytes']) if q['bytes'] else 'none'}; "
                      f"{len(refused)} mailbox(es) refused mail at the quota in the last day"
                      + (":" if refused else ""), markup=False)
    for f in refused:
        ctx.console.print(f"  {f['address']}: {quota.describe(f['bytes'], q['bytes'])}", markup=False)
    kept = data["removed_with_mail"]
    if kept:
        ctx.console.print(f"{len(kept)} mailbox(es) removed from the directory still hold mail, kept "
                          "until reconcile --all and purge:", markup=False, soft_wrap=True)
        for k in kept[:SHOW_REMOVED]:
            ctx.console.print(f"  {k['address']} (mailstore {k['mailstore']}): {k['messages']} "
                              f"message(s), {quota.human(k['bytes'])}", markup=False, soft_wrap=True)
        if len(kept) > SHOW_REMOVED:
            ctx.console.print(f"  ... and {len(kept) - SHOW_REMOVED} more (all in --format json)")
    h = data["redis"]
    limit = "no limit" if not h["maxmemory"] else f"{h['maxmemory']} bytes"
    ctx.console.print(
        f"Redis: up, ping {h['ping_ms']} ms, memory {h['used_memory']} bytes of {limit} "
        f"(policy {h['maxmemory_policy']}), AOF {'on' if h['aof_enabled'] else 'OFF'} "
        f"(appendfsync {h['appendfsync']}, last write {h['aof_last_write_status']})",
        markup=False,
    )
    for problem in h["problems"]:  # how Redis keeps accepted mail (fallback.ops.health.policy_problems)
        if problem["severity"] != "note":
            ctx.console.print(f"{problem['severity'].upper()}: {problem['text']}", markup=False,
                              soft_wrap=True)
    return 0
