"""`fallback queue list|show ID|retry ID|delete ID [--yes]|hold --user A|release --user A`: the
operator's view of outbound mail; with `--forward`, list/show/retry/hold/delete work on the forward
queue instead (fallback.commands.forward_queue)."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from typing import Any

from rich.table import Table

from fallback import keys
from fallback.addresses import normalize_address
from fallback.commands.context import Context, check_limit, columns_table
from fallback.errors import InputError
from fallback.ops import audit
from fallback.queues import hold, outbound
from fallback.queues.outbound import QueueItem


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("queue", help="list, show, retry, delete or hold outbound (or --forward) messages")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser("list", parents=[parents["common"]],
                            help="every queued message: age, attempts, next try, last reply")
    ls.add_argument("--format", choices=("table", "json"), default="table")
    ls.add_argument("--limit", type=int, default=500, metavar="N", help="show at most N (default 500)")
    ls.set_defaults(handler=list_queue)
    forward = {"action": "store_true", "help": "the forward queue (mail on its way to the main system)"}
    ls.add_argument("--forward", **forward)
    show = actions.add_parser("show", parents=[parents["common"]], help="one message, per recipient")
    show.add_argument("id", metavar="ID")
    show.set_defaults(handler=show_item)
    show.add_argument("--forward", **forward)
    retry = actions.add_parser("retry", parents=[parents["common"]],
                               help="try a message again now (also brings back a dead letter)")
    retry.add_argument("id", metavar="ID")
    retry.add_argument("--actor", metavar="NAME", help="who to name in the audit log")
    retry.set_defaults(handler=retry_item)
    retry.add_argument("--forward", **forward)
    delete = actions.add_parser("delete", parents=[parents["common"]],
                                help="take a message off the queue (the sender gets a failure notice)")
    delete.add_argument("id", metavar="ID")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    delete.add_argument("--actor", metavar="NAME", help="who to name in the audit log")
    delete.set_defaults(handler=delete_item)
    delete.add_argument("--forward", **forward)
    _register_hold(actions, parents)
    from fallback.commands import forward_queue  # here: it uses this module's helpers

    forward_queue.register_actions(actions, parents)


def _ago(ts: float, now: float) -> str:
    return _span(now - ts)


def _span(seconds: float) -> str:
    s = int(abs(seconds))
    if s < 60:
        text = f"{s}s"
    elif s < 3600:
        text = f"{s // 60}m{s % 60:02d}s"
    elif s < 86400:
        text = f"{s // 3600}h{s % 3600 // 60:02d}m"
    else:
        text = f"{s // 86400}d{s % 86400 // 3600:02d}h"
    return text


def _next(item: QueueItem, now: float) -> str:
    rec = item.record
    if rec is None or item.where == "dead":
        return "-"
    if item.where == "in flight":
        return "now (in flight)"
    due = rec.next_due()
    if due is None:
        return "-"
    return "now" if due <= now else f"in {_span(due - now)}"


def _row(item: QueueItem, now: float) -> dict[str, Any]:
    rec = item.record
    if rec is None:
        return {"id": item.msg_id, "sender": item.sender, "state": item.where, "age": "",
                "recipients": "", "attempts": "", "next": "-", "last_reply": item.error}
    pending = rec.pending()
    return {"id": item.msg_id, "sender": item.sender, "state": item.where,
            "age": _ago(rec.created, now), "recipients": f"{len(pending)}/{len(rec.rcpts)}",
            "attempts": rec.attempts(), "next": _next(item, now),
            "last_reply": rec.dead if item.where == "dead" and rec.dead else rec.last_reply()}


def _forward(args: argparse.Namespace) -> Any:
    """The --forward variant of a handler (imported here: forward_queue uses this module)."""
    from fallback.commands import forward_queue

    return {"list": forward_queue.list_forward, "show": forward_queue.show_forward,
            "retry": forward_queue.retry_forward, "delete": forward_queue.delete_forward,
            "hold": forward_queue.hold_forward}[args.action] if getattr(args, "forward", False) else None


def list_queue(ctx: Context, args: argparse.Namespace) -> int:
    if (forward := _forward(args)) is not None:
        return int(forward(ctx, args))
    check_limit(args.limit)
    now = time.time()
    items = outbound.scan(ctx.redis())
    rows = [_row(i, now) for i in items[: args.limit]]
    held = hold.held_senders(ctx.redis())
    if args.format == "json":
        print(json.dumps({"total": len(items), "messages": rows,
                          "held": [{"user": h.user, "since": h.since, "actor": h.actor,
                                    "reason": h.reason} for h in held]}, indent=1))
        return 0
    table = columns_table(f"outbound queue: {len(items)} message(s)", (
        ("id", "left"), ("sender", "left"), ("state", "left"), ("age", "right"), ("pending", "right"),
        ("attempts", "right"), ("next try", "left"), ("last reply", "left")))
    for row in rows:
        table.add_row(row["id"], row["sender"], row["state"], row["age"], row["recipients"],
                      str(row["attempts"]), row["next"], row["last_reply"] or "-")
    ctx.console.print(table)
    if len(items) > args.limit:
        ctx.console.print(f"... and {len(items) - args.limit} more (use --limit)")
    for h in held:
        ctx.console.print(f"held: all outbound mail from {h.user} (since {_ago(h.since, now)} ago, "
                          f"by {h.actor or '?'}{': ' + h.reason if h.reason else ''}); "
                          f"`fallback queue release --user {h.user}` lets it go", markup=False)
    return 0


def show_item(ctx: Context, args: argparse.Namespace) -> int:
    if (forward := _forward(args)) is not None:
        return int(forward(ctx, args))
    item = outbound.find(ctx.redis(), args.id)
    now = time.time()
    out = ctx.console
    out.print(f"id:        {item.msg_id}", markup=False)
    out.print(f"sender:    {item.sender}", markup=False)
    out.print(f"state:     {item.where} (shard {item.shard})", markup=False)
    rec = item.record
    if rec is None:
        out.print(f"problem:   {item.error}", markup=False)
        return 0
    out.print(f"age:       {_ago(rec.created, now)}", markup=False)
    if rec.dead:
        out.print(f"parked:    {rec.dead}", markup=False)
    table = Table(title="recipients")
    for col in ("recipient", "state", "attempts", "next try", "last reply"):
        table.add_column(col, overflow="fold")
    for address, st in rec.rcpts.items():
        nxt = float(st.get("next") or 0)
        when = ("-" if st.get("state") in outbound.FINAL
                else "now" if nxt <= now else f"in {_span(nxt - now)}")
        table.add_row(address, str(st.get("state")), str(st.get("attempts", 0)), when,
                      str(st.get("reply") or "-"))
    out.print(table)
    return 0


def retry_item(ctx: Context, args: argparse.Namespace) -> int:
    if (forward := _forward(args)) is not None:
        return int(forward(ctx, args))
    item = outbound.retry_now(ctx.redis(), args.id)
    _audit(ctx, args, "queue retry", item, "ok: queued for delivery now")
    ctx.console.print(f"{item.msg_id} from {item.sender}: queued for delivery now", markup=False)
    return 0


def _audit(ctx: Context, args: argparse.Namespace, action: str, item: QueueItem, outcome: str) -> None:
    entry = audit.Entry(action=action, actor=audit.actor_name(args.actor),
                        args={"id": item.msg_id, "sender": item.sender}, outcome=outcome)
    for problem in audit.record(ctx.redis(), entry, ctx.settings.audit_log):
        print(f"fallback queue: warning: {problem}", file=sys.stderr)


def delete_item(ctx: Context, args: argparse.Namespace) -> int:
    if (forward := _forward(args)) is not None:
        return int(forward(ctx, args))
    r = ctx.redis()
    item = outbound.find(r, args.id)
    pending = len(item.record.pending()) if item.record else 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise InputError(f"not deleting {item.msg_id} without confirmation: give --yes")
        answer = input(f"Delete {item.msg_id} from {item.sender} ({pending} recipient(s) not yet "
                       "delivered; the sender gets a failure notice)? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            ctx.console.print("not deleted")
            return 1
    settings = ctx.settings
    outbound.delete(r, item.msg_id, settings.hostname or socket.gethostname(), settings.claim_timeout)
    _audit(ctx, args, "queue delete", item, f"ok: {pending} recipient(s) marked failed")
    ctx.console.print(f"deleted {item.msg_id} from {item.sender}: {pending} recipient(s) marked failed",
                      markup=False)
    return 0


# --- hold and release: one sender's outbound mail ----------------------------------------

def _register_hold(actions: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    hold_p = actions.add_parser("hold", parents=[parents["common"]],
                                help="stop a sender's outbound mail from leaving (it stays queued)")
    hold_p.add_argument("id", metavar="ID", nargs="?", help="with --forward: the message to hold")
    hold_p.add_argument("--user", metavar="ADDRESS", help="the webmail user (required without --forward)")
    hold_p.add_argument("--forward", action="store_true",
                        help="hold one message of the forward queue (ID) instead of a sender")
    hold_p.add_argument("--reason", default="", metavar="TEXT", help="why, for the listing and audit")
    hold_p.add_argument("--actor", metavar="NAME", help="who to name in the audit log")
    hold_p.set_defaults(handler=hold_user)
    release = actions.add_parser("release", parents=[parents["common"]],
                                 help="let a held sender's outbound mail leave again, at once")
    release.add_argument("--user", required=True, metavar="ADDRESS", help="the webmail user")
    release.add_argument("--actor", metavar="NAME", help="who to name in the audit log")
    release.set_defaults(handler=release_user)


def _user(text: str) -> str:
    try:
        return normalize_address(text)
    except InputError:
        raise InputError(f"--user: {text!r} is not an email address") from None


def _audit_user(ctx: Context, args: argparse.Namespace, action: str, user: str, outcome: str) -> None:
    entry = audit.Entry(action=action, actor=audit.actor_name(args.actor),
                        args={"user": user, "reason": getattr(args, "reason", "")}, outcome=outcome)
    for problem in audit.record(ctx.redis(), entry, ctx.settings.audit_log):
        print(f"fallback queue: warning: {problem}", file=sys.stderr)


def hold_user(ctx: Context, args: argparse.Namespace) -> int:
    if args.forward:
        if args.id is None or args.user is not None:
            raise InputError("hold --forward takes a message ID (fallback queue list --forward), not --user")
        return int(_forward(args)(ctx, args))
    if args.user is None or args.id is not None:
        raise InputError("hold takes --user ADDRESS (or --forward ID for the forward queue)")
    user = _user(args.user)
    r = ctx.redis()
    if ctx.directory().get(user) is None and not r.scard(keys.outbox(user)):
        raise InputError(f"no mailbox {user} is provisioned and it has no queued mail: nothing to hold")
    held = hold.hold(r, user, audit.actor_name(args.actor), args.reason)
    if not held.new:
        ctx.console.print(f"{user}: already held since {_ago(held.since, time.time())} ago "
                          f"({held.queued} message(s) queued)", markup=False)
        return 0
    _audit_user(ctx, args, "queue hold", user, f"ok: {held.queued} message(s) held")
    ctx.console.print(f"{user}: outbound mail held ({held.queued} message(s) queued); new mail "
                      f"from this user is queued and held too. `fallback queue release --user "
                      f"{user}` lets it go.", markup=False)
    return 0


def release_user(ctx: Context, args: argparse.Namespace) -> int:
    user = _user(args.user)
    released = hold.release(ctx.redis(), user)
    _audit_user(ctx, args, "queue release", user, f"ok: {released.queued} message(s) released")
    ctx.console.print(f"{user}: released; {released.queued} message(s) due for delivery now",
                      markup=False)
    return 0
