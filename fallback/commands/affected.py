"""`fallback affected`: the users the current failover covers, for resellers and user notices.

Output is streamed row by row (there may be millions of mailboxes), in the
directory's bucket order, so memory stays flat; `--format json` still writes
one valid JSON array.  The scope is read once at the start, so one listing is
one consistent answer even if an operator changes the scope meanwhile.

The CSV is made to be opened in a spreadsheet, so a cell that a spreadsheet
would run as a formula (one starting with = + - @, a tab or a CR: an address
such as `=1+2@example.com` or `-bob@example.com` is valid) gets a leading `'`,
as OWASP recommends.  No cell of ours is a number, so nothing numeric changes;
JSON (for programs) carries the values unchanged.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any, TextIO

from fallback.commands.context import Context
from fallback.mailbox.directory import Mailbox, check_mailstore
from fallback.ops import failover

COLUMNS = ("address", "domain", "mailstore", "alternate")


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("affected", parents=[parents["common"]],
                       help="list the mailboxes the failover covers (table, csv or json)")
    p.add_argument("--mailstore", action="extend", nargs="+", metavar="NAME",
                   help="only mailboxes on this mailstore (repeatable)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(handler=run)


def _row(m: Mailbox) -> dict[str, str]:
    return {"address": m.address, "domain": m.domain, "mailstore": m.mailstore, "alternate": m.alternate}


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_cell(value: str) -> str:
    """`value` as a spreadsheet shows it as text, never runs it as a formula."""
    return "'" + value if value.startswith(FORMULA_START) else value


def write_csv(rows: Any, out: TextIO) -> int:
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    n = 0
    for m in rows:
        writer.writerow({k: spreadsheet_cell(v) for k, v in _row(m).items()})
        n += 1
    return n


def write_json(rows: Any, out: TextIO) -> int:
    out.write("[")
    n = 0
    for n, m in enumerate(rows, 1):
        out.write(("\n" if n == 1 else ",\n") + json.dumps(_row(m)))
    out.write("\n]\n" if n else "]\n")
    return n


def write_table(rows: Any, out: TextIO) -> int:
    # Fixed widths instead of a rich table: a rich table would hold every row in memory first.
    line = "{:<40} {:<20} {}\n"
    out.write(line.format("ADDRESS", "MAILSTORE", "ALTERNATE"))
    n = 0
    for m in rows:
        out.write(line.format(m.address, m.mailstore, m.alternate or "-"))
        n += 1
    return n


WRITERS = {"csv": write_csv, "json": write_json, "table": write_table}


def run(ctx: Context, args: argparse.Namespace) -> int:
    only = [check_mailstore(n) for n in args.mailstore] if args.mailstore else None
    scope = failover.read(ctx.redis())
    rows = failover.iter_affected(ctx.directory(), scope, only)
    n = WRITERS[args.format](rows, sys.stdout)
    sys.stdout.flush()
    # The count goes to stderr so that stdout stays a clean CSV/JSON document.
    print(f"{n} affected mailbox(es); {scope.describe()}", file=sys.stderr)
    return 0
