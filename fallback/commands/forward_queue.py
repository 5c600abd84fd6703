"""`fallback queue list|show|retry|hold|delete --forward`, `fallback queue forward-dead` and
`fallback queue forward-retry ID|--all`: the operator's view of the forward queue (mail for users
whose mailstore is healthy, on its way to the main system) and of its dead letters (mail the
main system's next hop kept refusing with 5xx).

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

from fallback.commands.context import Context, check_limit, columns_table
from fallback.commands.queue import _span
from fallback.errors import InputError
from fallback.ops import audit
from fallback.queues import forward_dead, forward_ops
from fallback.queues.forward_dead import DeadLetter
from fallback.queues.forward_ops import ForwardItem


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
    check_limit(args.limit)
    now = time.time()
    letters = forward_dead.scan(ctx.redis())
    rows = [_row(d, now) for d in letters[: args.limit]]
    if args.format == "json":
        print(json.dumps({"total": len(letters), "dead_letters": rows}, indent=1))
        return 0
    table = columns_table(f"forward dead letters: {len(letters)}", (
        ("id", "left"), ("from", "left"), ("to", "left"), ("first refused", "right"),
        ("parked", "right"), ("attempts", "right"), ("last reply", "left")))
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


# --- `fallback queue list|show|retry|hold|delete --forward` ------------------------------

def _next(item: ForwardItem, now: float) -> str:
    if item.where == "retry":
        return "now" if item.due <= now else f"in {_span(item.due - now)}"
    return {"waiting": "now", "in flight": "now (in flight)"}.get(item.where, "-")


def _item_row(item: ForwardItem, now: float) -> dict[str, Any]:
    return {"id": item.msg_id, "sender": item.sender or "<>", "recipient": item.recipient,
            "state": item.where, "age": _span(now - item.created) if item.created else "",
            "attempts": item.attempts, "next": _next(item, now), "size": item.size,
            "last_reply": "no forward record (dropped when next taken)" if item.missing else item.reply}


def list_forward(ctx: Context, args: argparse.Namespace) -> int:
    check_limit(args.limit)
    now = time.time()
    items = forward_ops.scan(ctx.redis())
    rows = [_item_row(i, now) for i in items[: args.limit]]
    if args.format == "json":
        print(json.dumps({"total": len(items), "messages": rows}, indent=1))
        return 0
    table = columns_table(f"forward queue: {len(items)} message(s) (one row per recipient)", (
        ("id", "left"), ("sender", "left"), ("recipient", "left"), ("state", "left"), ("age", "right"),
        ("attempts", "right"), ("next try", "left"), ("last reply", "left")))
    for row in rows:
        table.add_row(row["id"], row["sender"], row["recipient"], row["state"], row["age"],
                      str(row["attempts"]), row["next"], row["last_reply"] or "-")
    ctx.console.print(table)
    if len(items) > args.limit:
        ctx.console.print(f"... and {len(items) - args.limit} more (use --limit)")
    return 0


def show_forward(ctx: Context, args: argparse.Namespace) -> int:
    items = forward_ops.find(ctx.redis(), args.id)
    now, first, out = time.time(), items[0], ctx.console
    out.print(f"id:        {first.msg_id}", markup=False)
    out.print(f"sender:    {first.sender or '<>'}", markup=False)
    out.print(f"queue:     forward (to the main system; shard {first.shard})", markup=False)
    out.print(f"age:       {_span(now - first.created) if first.created else '-'}", markup=False)
    out.print(f"size:      {first.size} bytes", markup=False)
    table = Table(title="recipients")
    for col in ("recipient", "state", "attempts", "next try", "last reply"):
        table.add_column(col, overflow="fold")
    for item in items:
        table.add_row(item.recipient, item.where, str(item.attempts), _next(item, now), item.reply or "-")
    out.print(table)
    return 0


def _audit_items(ctx: Context, args: argparse.Namespace, action: str, items: list[ForwardItem],
                 outcome: str) -> None:
    entry = audit.Entry(action=action, actor=audit.actor_name(args.actor),
                        args={"id": items[0].msg_id, "sender": items[0].sender,
                              "recipients": [i.recipient for i in items]}, outcome=outcome)
    for problem in audit.record(ctx.redis(), entry, ctx.settings.audit_log):
        print(f"fallback queue: warning: {problem}", file=sys.stderr)


def retry_forward(ctx: Context, args: argparse.Namespace) -> int:
    r, now = ctx.redis(), time.time()
    items = forward_ops.find(r, args.id)
    done = [i for i in items if forward_ops.retry(r, i, now)]
    _audit_items(ctx, args, "queue forward-retry", items,
                 f"ok: {len(done)} of {len(items)} recipient(s) due now")
    for i in done:
        ctx.console.print(f"{i.msg_id} to {i.recipient}: queued for forwarding now", markup=False)
    if len(done) < len(items):
        ctx.console.print(f"{len(items) - len(done)} recipient(s) were no longer queued", markup=False)
    return 0


def hold_forward(ctx: Context, args: argparse.Namespace) -> int:
    r, now = ctx.redis(), time.time()
    items = forward_ops.find(r, args.id)
    actor = audit.actor_name(args.actor)
    done = [i for i in items if i.where != "held" and
            forward_ops.hold(r, i, actor, now, ctx.settings.claim_timeout)]
    _audit_items(ctx, args, "queue forward-hold", items, f"ok: {len(done)} recipient(s) held")
    for i in items:
        ctx.console.print(f"{i.msg_id} to {i.recipient}: held (kept here, not forwarded); "
                          f"`fallback queue retry --forward {i.msg_id}` lets it go", markup=False)
    return 0


def delete_forward(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.redis()
    items = forward_ops.find(r, args.id)
    rcpts = ", ".join(i.recipient for i in items)
    if not args.yes:
        if not sys.stdin.isatty():
            raise InputError(f"not deleting {items[0].msg_id} without confirmation: give --yes")
        answer = input(f"Delete {items[0].msg_id} from {items[0].sender or '<>'} to {rcpts} from the "
                       "forward queue? Its bytes are removed and nobody is notified. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            ctx.console.print("not deleted")
            return 1
    done = [i for i in items if forward_ops.delete(r, i, ctx.settings.claim_timeout)]
    _audit_items(ctx, args, "queue forward-delete", items, f"ok: {len(done)} recipient(s) deleted")
    ctx.console.print(f"deleted {items[0].msg_id} from the forward queue: {len(done)} recipient(s) "
                      f"({rcpts})", markup=False)
    return 0
