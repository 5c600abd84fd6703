"""`fallback provision ... --sync | --dry-run`: run a directory sync and say what it did.

Shared by every source (a file, LDAP, a virtual(5) file of aliases): the caller builds the Provisioner and
the entries, this module runs mailbox/sync.py, prints the counts and the first
addresses of each list (all of them with --report FILE.json), records a real
sync in the audit log, and turns a refusal into the command's one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from rich.table import Table

from fallback.commands.context import Context
from fallback.errors import InputError
from fallback.mailbox.aliases import Aliases
from fallback.mailbox.directory import ensure_buckets
from fallback.mailbox.provision import Entry, Invalid, Provisioner
from fallback.mailbox.sync import (
    SyncReport,
    parse_max_remove,
    sync,
    sync_aliases,
    sync_ldap_aliases,
)
from fallback.ops import audit

SHOW = 20  # addresses of each kind printed; --report has them all
SHOW_INVALID = 50


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("directory sync")
    g.add_argument("--sync", action="store_true",
                   help="make the directory equal to the source: mailboxes it does not name are "
                   "removed (their mail is kept until reconcile and purge)")
    g.add_argument("--dry-run", action="store_true",
                   help="print what would be added, changed and removed; change nothing")
    g.add_argument("--max-remove", metavar="N|P%",
                   help="with --sync: refuse to remove more than N mailboxes or P%% of the "
                   "directory (default 10%%)")
    g.add_argument("--force", action="store_true", help="with --sync: remove past --max-remove")
    g.add_argument("--allow-empty", action="store_true",
                   help="with --sync: let a source with no entries at all empty the directory "
                   "(refused otherwise, even with --force)")
    g.add_argument("--report", type=Path, metavar="FILE.json",
                   help="write every added, changed and removed address here")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse sync-only flags without --sync before anything is read."""
    for flag, given in (("--max-remove", args.max_remove is not None), ("--force", args.force),
                        ("--allow-empty", args.allow_empty)):
        if given and not args.sync:
            raise InputError(f"{flag} is only for --sync")
    if args.max_remove is not None:
        parse_max_remove(args.max_remove)


def wanted(args: argparse.Namespace) -> bool:
    return bool(args.sync or args.dry_run)


def run_sync(ctx: Context, args: argparse.Namespace, provisioner: Provisioner,
             entries: Iterable[Entry | Invalid], source: str,
             before_write: Callable[[], None] = lambda: None) -> int:
    limit = None if args.max_remove is None else parse_max_remove(args.max_remove)
    return _run(ctx, args, source, "mailboxes", lambda: sync(
        provisioner, entries, dry_run=args.dry_run, max_remove=limit, force=args.force,
        remove=args.sync, before_write=before_write, allow_empty=args.allow_empty, source=source))


def ldap_alias_sync(ctx: Context, args: argparse.Namespace, aliases: dict[str, list[str]],
                    plan_only: bool = False) -> SyncReport:
    """The aliases LDAP created made equal to `aliases`; `plan_only` checks the limit (raising
    InputError as a real run would) and writes nothing."""
    limit = None if args.max_remove is None else parse_max_remove(args.max_remove)
    r = ctx.redis()
    store = Aliases(r, ensure_buckets(r, ctx.settings.directory_buckets))
    return sync_ldap_aliases(store, aliases, dry_run=args.dry_run or plan_only, max_remove=limit,
                             force=args.force, remove=args.sync)


def run_ldap_alias_sync(ctx: Context, args: argparse.Namespace, aliases: dict[str, list[str]],
                        source: str) -> int:
    """--sync / --dry-run of LDAP's aliases, printed and audited as a virtual file's are."""
    return _run(ctx, args, source, "aliases", lambda: ldap_alias_sync(ctx, args, aliases))


def run_alias_sync(ctx: Context, args: argparse.Namespace, path: Path) -> int:
    """--sync / --dry-run of a virtual(5) file: the stored aliases made equal to it."""
    check_arguments(args)
    limit = None if args.max_remove is None else parse_max_remove(args.max_remove)
    r = ctx.redis()
    store = Aliases(r, ensure_buckets(r, ctx.settings.directory_buckets))
    return _run(ctx, args, str(path), "aliases", lambda: sync_aliases(
        store, ctx.directory(), path, dry_run=args.dry_run, max_remove=limit, force=args.force,
        remove=args.sync, allow_empty=args.allow_empty))


def _run(ctx: Context, args: argparse.Namespace, source: str, kind: str,
         run: Callable[[], SyncReport]) -> int:
    """Run a sync of `kind` (mailboxes or aliases), print it, audit it, turn refusals into one line."""
    try:
        report = run()
    except InputError as exc:
        _audit(ctx, source, None, f"refused: {exc.reason}", kind)
        raise
    print_sync_report(ctx, source, report, args.sync, kind)
    if args.report:
        _write_json(args.report, report)
    if report.invalid:
        ctx.err.print(f"fallback provision: {len(report.invalid)} invalid line(s); nothing was "
                      "changed (a sync needs every line valid)" if not report.added + report.changed
                      else f"fallback provision: {len(report.invalid)} invalid line(s)",
                      markup=False, highlight=False, soft_wrap=True)
        return 1
    if not args.dry_run and args.sync:
        _audit(ctx, source, report, "ok", kind)
    if report.refused:
        ctx.err.print(f"fallback provision: {report.refused}", markup=False, highlight=False,
                      soft_wrap=True)
        return 1
    return 0


def _addresses(ctx: Context, verb: str, items: list[str], note: str = "") -> None:
    if not items:
        return
    shown = ", ".join(items[:SHOW])
    more = f", ... and {len(items) - SHOW:,} more (all in --report FILE.json)" if len(items) > SHOW else ""
    ctx.console.print(f"{verb} ({len(items):,}){note}: {shown}{more}", markup=False, soft_wrap=True)


def print_sync_report(ctx: Context, source: str, report: SyncReport, removing: bool,
                      kind: str = "mailboxes") -> None:
    if report.invalid and not (report.added or report.changed):
        for item in report.invalid[:SHOW_INVALID]:
            ctx.console.print(f"{source}:{item.line}: {item.reason}", markup=False, soft_wrap=True)
        if len(report.invalid) > SHOW_INVALID:
            ctx.console.print(f"... and {len(report.invalid) - SHOW_INVALID} more invalid lines")
        return
    dry = " (dry run: nothing was changed)" if report.dry_run else ""
    what = " aliases" if kind == "aliases" else ""
    ctx.console.print(f"{'synced' if removing else 'provisioned'}{what} from {source}{dry}",
                      markup=False, soft_wrap=True)
    would = "would be " if report.dry_run else ""
    table = Table()
    columns = ["added", "changed", "removed", "unchanged", "kept mail"] if removing else \
        ["added", "changed", "unchanged"]
    if kind == "aliases":  # an alias holds no mail
        columns = [c for c in columns if c != "kept mail"]
    for col in columns:
        table.add_column(f"{would}{col}" if col in ("added", "changed", "removed") else col,
                         justify="right")
    values = {"added": len(report.added), "changed": len(report.changed), "removed": len(report.removed),
              "unchanged": report.unchanged, "kept mail": len(report.kept_mail)}
    table.add_row(*(f"{values[c]:,}" for c in columns))
    ctx.console.print(table)
    _addresses(ctx, f"{would}added", report.added)
    _addresses(ctx, f"{would}changed", report.changed)
    if removing:
        _addresses(ctx, f"{would}removed", report.removed)
        _addresses(ctx, "kept mail", report.kept_mail,
                   " (removed, mail kept until reconcile --all and purge)")
    for item in report.invalid[:SHOW_INVALID]:
        ctx.console.print(f"{source}:{item.line}: {item.reason}", markup=False, soft_wrap=True)
    if report.sessions_ended:
        ctx.console.print(f"ended {report.sessions_ended:,} webmail session(s) of removed mailboxes",
                          markup=False)


def _write_json(path: Path, report: SyncReport) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(report.as_json(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot write the report {path}: {exc.strerror}") from None


def _audit(ctx: Context, source: str, report: SyncReport | None, outcome: str,
           kind: str = "mailboxes") -> None:
    """A sync that removes users (or refused to) is an admin action worth its audit line."""
    counts = {} if report is None else {"added": len(report.added), "changed": len(report.changed),
                                        "removed": len(report.removed), "kept_mail": len(report.kept_mail)}
    entry = audit.Entry(action="provision-sync", actor=audit.actor_name(),
                        args={"source": source, "kind": kind, **counts}, outcome=outcome)
    for problem in audit.record(ctx.redis(), entry, ctx.settings.audit_log):
        print(f"fallback provision: warning: {problem}", file=sys.stderr)
