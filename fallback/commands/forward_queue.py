"""`fallback queue forward-dead` and `fallback queue forward-retry ID|--all`: the operator's view
of the forward queue's dead letters (mail the main system's next hop kept refusing with 5xx).

Shaped like the outbound queue's `list` and `retry` (same columns where they
mean the same, `--format json`, `--limit`, `--actor` for the audit log), so
an operator learns one thing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from rich.table import Table

from fallback.commands.context import Context
from fallback.commands.queue import _span
from fallback.errors import InputError
from fallback.ops import audit
from fallback.queues import forward_dead
from fallback.queues.forward_dead import DeadLetter


def register_actions(actions: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    ls = actions.add_parser("forward-dead", parents=[parents["common"]],
                            help="forwarded mail parked after the next hop kept refusing it (5xx)")
    ls.add_argument("--format", choices=("table", "json"), default="table")
    ls.add_argument("--limit", type=int, default=500, metavar="N", help="show at most N (default 500)")
    ls.set_defaults(handler=list_dead)
    retry = actions.add_parser("forward-retry", parents=[parents["common"]],
                               help="put forward dead letters back in the forward queue")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", metavar="ID", nargs="?", help="queue id (every recipient parked for it)")
    which.add_argument("--all", action="store_true", help="every forward dead letter")
    retry.add_argument("--actor", metavar="NAME", help="who to name in the audit log")
    retry.set_defaults(handler=retry_dead)


def _row(d: DeadLetter, now: float) -> dict[str, Any]:
    return {"id": d.msg_id, "sender": d.sender or "<>", "recipient": d.recipient,
            "first_refused": f"{_span(now - d.refused_since)} ago" if d.refused_since else "-",
            "parked": f"{_span(now - d.parked)} ago", "attempts": d.attempts, "size": d.size,
            "last_reply": d.reply}


def list_dead(ctx: Context, args: argparse.Namespace) -> int:
    if args.limit <= 0:
        raise InputError("--limit must be greater than 0")
    now = time.time()
    letters = forward_dead.scan(ctx.redis())
    rows = [_row(d, now) for d in letters[: args.limit]]
    if args.format == "json":
        print(json.dumps({"total": len(letters), "dead_letters": rows}, indent=1))
        return 0
    table = Table(title=f"forward dead letters: {len(letters)}")
    for col, just in (("id", "left"), ("from", "left"), ("to", "left"), ("first refused", "right"),
                      ("parked", "right"), ("attempts", "right"), ("last reply", "left")):
        table.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
    for row in rows:
        table.add_row(row["id"], row["sender"], row["recipient"], row["first_refused"], row["parked"],
                      str(row["attempts"]), row["last_reply"])
    ctx.console.print(table)
    if len(letters) > args.limit:
        ctx.console.print(f"... and {len(letters) - args.limit} more (use --limit)")
    return 0


def retry_dead(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.redis()
    letters = forward_dead.scan(r) if args.all else forward_dead.find(r, args.id)
    if not letters:
        ctx.console.print("no forward dead letters")
        return 0
    back = [d for d in letters if forward_dead.requeue(r, d)]
    for d in back:
        ctx.console.print(f"{d.msg_id} to {d.recipient}: back in the forward queue", markup=False)
    entry = audit.Entry(action="queue forward-retry", actor=audit.actor_name(args.actor),
                        args={"id": "--all" if args.all else args.id},
                        outcome=f"ok: {len(back)} of {len(letters)} put back")
    for problem in audit.record(r, entry, ctx.settings.audit_log):
        print(f"fallback queue: warning: {problem}", file=sys.stderr)
    if len(back) < len(letters):
        # Another operator put them back meanwhile: nothing is lost, but the count differs.
        ctx.console.print(f"{len(letters) - len(back)} were no longer parked", markup=False)
    return 0
