"""`fallback failover start|stop|status`: declare which mailstores are served here.

Every change is written to the audit log with the actor and the resulting
scope.  A mailstore name that provisioning never saw is refused (a typo would
quietly send the broken mailstore's mail on to the main system) unless
`--force` says the operator means it.  `--notify` tells the affected users
with an alternate address (fallback.ops.notices).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from rich.table import Table

from fallback.commands.context import Context
from fallback.errors import InputError
from fallback.mailbox.directory import check_mailstore
from fallback.ops import audit, failover, notices


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("failover", help="declare, end or show which mailstores are failed over")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (("start", "fail over mailstores (or --all): their users are served here"),
                       ("stop", "end failover for mailstores (or --all): their new mail is forwarded")):
        a = actions.add_parser(name, parents=[parents["common"]], help=text, description=text)
        which = a.add_mutually_exclusive_group(required=True)
        which.add_argument("--mailstore", action="extend", nargs="+", metavar="NAME",
                           help="mailstore name (repeatable, or several after one flag)")
        which.add_argument("--all", action="store_true", help="every mailstore")
        a.add_argument("--actor", metavar="NAME", help="who to name in the audit log "
                       "(default $SUDO_USER, else $USER)")
        if name == "start":
            a.add_argument("--force", action="store_true",
                           help="accept mailstore names that no provisioned mailbox has")
        a.add_argument("--notify", action="store_true",
                       help="send each affected user with an alternate address a notice (outbound "
                       "queue); once per user and outage")
        a.add_argument("--webmail-url", metavar="URL", help="the webmail URL the start notice gives "
                       "(FALLBACK_WEBMAIL_URL)")
        a.add_argument("--notice-sender", metavar="ADDR", help="From of the notices "
                       "(FALLBACK_NOTICE_SENDER; default postmaster@ the first provisioned domain)")
        a.set_defaults(handler=run_start if name == "start" else run_stop)
    s = actions.add_parser("status", parents=[parents["common"]], help="show the failover scope")
    s.add_argument("--format", choices=("table", "json"), default="table")
    s.set_defaults(handler=run_status)


def _names(args: argparse.Namespace) -> list[str] | None:
    if args.all:
        return None
    return list(dict.fromkeys(check_mailstore(n) for n in args.mailstore))


def _audit(ctx: Context, args: argparse.Namespace, action: str, names: list[str] | None,
           scope: failover.Scope, told: str | None = None) -> None:
    given: dict[str, object] = {"all": True} if names is None else {"mailstores": names}
    if args.notify:
        given["notify"] = True
    if getattr(args, "reason", None):  # the watcher's probe results (fallback watch)
        given["reason"] = args.reason
    outcome = "ok: " + scope.describe() + (f"; {told}" if told else "")
    entry = audit.Entry(action=action, actor=audit.actor_name(args.actor), args=given, outcome=outcome)
    for problem in audit.record(ctx.redis(), entry, ctx.settings.audit_log):
        print(f"fallback failover: warning: {problem}", file=sys.stderr)


def _report(ctx: Context, scope: failover.Scope) -> None:
    count = failover.affected_count(scope, ctx.directory().mailstores())
    ctx.console.print(f"{scope.describe()} ({count} mailbox(es) affected)", markup=False)


def run_start(ctx: Context, args: argparse.Namespace) -> int:
    names = _names(args)
    if names is not None and not args.force:
        known = ctx.directory().mailstores()
        unknown = [n for n in names if n not in known]
        if unknown:
            raise InputError(
                f"unknown mailstore(s): {', '.join(unknown)} (provisioned: "
                f"{', '.join(sorted(known)) or 'none'}); nothing changed; --force to declare anyway")
    if args.notify and not ctx.settings.webmail_url:  # before the scope changes: nothing half done
        raise InputError("--notify needs the webmail URL users should open: --webmail-url URL "
                         "(or FALLBACK_WEBMAIL_URL); nothing changed")
    scope = failover.start(ctx.redis(), names)
    told = _notify(ctx, notices.START, scope, names) if args.notify else None
    _audit(ctx, args, "failover start", names, scope, told)
    _report(ctx, scope)
    return 0


def _notify(ctx: Context, kind: str, scope: failover.Scope, names: list[str] | None) -> str:
    """Notices to the users of these mailstores (None: every one `scope` covers)."""
    mailboxes = failover.iter_affected(ctx.directory(), scope, names)
    tally = notices.notify(ctx.redis(), ctx.settings, ctx.directory(), kind, scope, mailboxes)
    text = tally.describe(kind)
    ctx.console.print(text, markup=False, soft_wrap=True)
    return text


def run_stop(ctx: Context, args: argparse.Namespace) -> int:
    names = _names(args)
    r = ctx.redis()
    known = ctx.directory().mailstores()
    if names is not None:
        current = failover.read(r)
        covered = set(current.mailstores) if current.mode == failover.LISTED else set(known)
        absent = [n for n in names if n not in covered]
        if absent:
            raise InputError(f"not failed over: {', '.join(absent)} ({current.describe()}); nothing changed")
    before = failover.read(r)  # the episodes being ended, for the notices
    scope = failover.stop(r, names, known=sorted(known))
    told = _notify(ctx, notices.STOP, before, names) if args.notify else None
    _audit(ctx, args, "failover stop", names, scope, told)
    _report(ctx, scope)
    return 0


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def run_status(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.redis()
    scope = failover.read(r)
    provisioned = ctx.directory().mailstores()
    rows = [{"mailstore": name, "mailboxes": provisioned.get(name, 0), "failed_over": scope.covers(name),
             "since": scope.mailstores.get(name, scope.since if scope.mode == failover.ALL else None)}
            for name in sorted(set(provisioned) | set(scope.mailstores))]
    if args.format == "json":
        data = {"scope": scope.as_dict(), "affected": failover.affected_count(scope, provisioned),
                "mailstores": rows,
                "recent_actions": [e.__dict__ for e in audit.recent(r, 10)]}
        print(json.dumps(data, indent=2))
        return 0
    ctx.console.print(f"{scope.describe()} (mode {scope.mode}, since {_when(scope.since)})", markup=False)
    table = Table()
    for col, just in (("mailstore", "left"), ("mailboxes", "right"), ("failed over", "left"),
                      ("since", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(row["mailstore"], str(row["mailboxes"]), "yes" if row["failed_over"] else "no",
                      _when(row["since"]) if row["failed_over"] else "-")
    ctx.console.print(table)
    ctx.console.print(f"{failover.affected_count(scope, provisioned)} mailbox(es) affected", markup=False)
    return 0
