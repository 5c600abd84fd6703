"""`fallback trace ID` and `fallback trace --address ADDR [--since DURATION]`: the message trace
(fallback.ops.trace) as a timeline, or the recent messages of an address with their last state;
`--format json` for scripts."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from rich.table import Table

from fallback.addresses import normalize_address
from fallback.commands.context import Context, check_limit, duration_option
from fallback.commands.token import when
from fallback.errors import InputError, NotFound
from fallback.ops import trace

# What a person reads, in one place.
NO_TRACE = "no trace of message {id} (an unknown id, or its trace is older than trace_retention)"
ID_OR_ADDRESS = "give a message ID or --address ADDR, not both"
SINCE_NEEDS_ADDRESS = "--since lists an address's messages: give --address ADDR with it"

# Shown in their own columns; the rest of an event's fields go to `detail`.
_OWN = ("time", "component", "event", "to", "outcome", "reply", "from", "dropped")


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("trace", parents=[parents["common"]],
                       help="what happened to a message: its events in order, or an address's "
                            "recent messages")
    p.add_argument("id", nargs="?", metavar="ID", help="the message id (id= in the mail log, "
                   "the 250 reply, our Received: header)")
    p.add_argument("--address", metavar="ADDR", help="list the recent messages from or to ADDR "
                   "with their last state")
    p.add_argument("--since", metavar="DURATION", help="with --address: only the last DURATION "
                   "(e.g. 2h, 1d); default: all kept")
    p.add_argument("--limit", type=int, default=100, metavar="N",
                   help="with --address: at most the newest N messages (default 100)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(handler=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    if (args.id is None) == (args.address is None):
        raise InputError(ID_OR_ADDRESS)
    if args.address is None:
        if args.since is not None:
            raise InputError(SINCE_NEEDS_ADDRESS)
        return _message(ctx, args.id.strip(), args.format)
    check_limit(args.limit)
    seconds = duration_option(args.since, "--since")
    try:
        address = normalize_address(args.address)
    except InputError as exc:
        raise InputError(f"--address: {exc.reason}") from None
    found = trace.recent(ctx.redis(), address, seconds, args.limit)
    if args.format == "json":
        print(json.dumps(found, indent=1, ensure_ascii=False))
        return 0
    within = f" in the last {args.since}" if seconds is not None else ""
    table = Table(title=f"{address}: {len(found)} message(s){within}, newest first")
    for col in ("last event (UTC)", "id", "from", "to", "state", "reply/outcome"):
        # The id whole on one line: operators copy it into `fallback trace ID`.
        table.add_column(col, overflow="fold", no_wrap=col == "id", min_width=26 if col == "id" else None)
    for m in found:
        last = m["last"]
        table.add_row(when(m["time"]), m["id"], m["from"] or "-", ", ".join(m["to"]) or "-",
                      f"{last['event']} ({last['component']})", _reply(last))
    ctx.console.print(table)
    return 0


def _message(ctx: Context, msg_id: str, fmt: str) -> int:
    events = trace.message(ctx.redis(), msg_id)
    if events is None:
        raise NotFound(NO_TRACE.format(id=msg_id))
    if fmt == "json":
        print(json.dumps({"id": msg_id, "events": events}, indent=1, ensure_ascii=False))
        return 0
    table = Table(title=f"message {msg_id}: {len(events)} event(s), oldest first")
    for col in ("time (UTC)", "component", "event", "recipient", "reply/outcome", "detail"):
        table.add_column(col, overflow="fold")
    for e in events:
        if e["event"] == trace.TRIMMED:
            table.add_row("…", "-", "trimmed", "-", "-", f"{e.get('dropped', 0)} event(s) here not kept "
                          f"(a trace keeps its first {trace.HEAD} and its newest)")
            continue
        detail = " ".join(f"{k}={v}" for k, v in e.items() if k not in _OWN)
        if e.get("from") is not None:
            detail = f"from={e['from']} {detail}".strip()
        table.add_row(_at(e["time"]), e["component"], e["event"], str(e.get("to") or "-"), _reply(e),
                      detail or "-")
    ctx.console.print(table, markup=False)
    return 0


def _at(ts: Any) -> str:
    """UTC to the millisecond: events of one message often share a second."""
    if not isinstance(ts, (int, float)):
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _reply(event: dict[str, Any]) -> str:
    parts = [str(event[k]) for k in ("outcome", "reply") if event.get(k) is not None]
    return " / ".join(parts) or "-"
