"""`fallback audit [--since DURATION] [--format table|json] [--limit N]`: the audit log of admin
actions (fallback.ops.audit), oldest first, so the newest is at the bottom as in a log file."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from rich.table import Table

from fallback.commands.context import Context, check_limit, duration_option
from fallback.commands.token import when
from fallback.ops import audit


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("audit", parents=[parents["common"]],
                       help="who did what when: the admin actions, newest last")
    p.add_argument("--since", metavar="DURATION",
                   help="only the last DURATION (e.g. 1h, 2d); default: all kept")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--limit", type=int, default=1000, metavar="N", help="at most the newest N (default 1000)")
    p.set_defaults(handler=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    seconds = duration_option(args.since, "--since")
    check_limit(args.limit)
    entries = audit.since(ctx.redis(), seconds, count=args.limit)
    if args.format == "json":
        print(json.dumps([asdict(e) for e in entries], indent=1))
        return 0
    within = f" in the last {args.since}" if seconds is not None else ""
    table = Table(title=f"audit log: {len(entries)} action(s){within}, newest last")
    for col in ("time (UTC)", "who", "action", "arguments", "outcome"):
        table.add_column(col, overflow="fold")
    for e in entries:
        given = ", ".join(f"{k}={v}" for k, v in sorted(e.args.items()))
        table.add_row(when(e.time), e.actor, e.action, given or "-", e.outcome)
    ctx.console.print(table)
    return 0
