"""`fallback reconcile`: merge the fallback's messages into the main store (see fallback/reconcile/).

fallback reconcile --imap-url imap://HOST:PORT|imaps://HOST:PORT --master-user NAME
    --master-password-file FILE [--user ADDR ... | --mailstore NAME | --all]
    [--dry-run] [--concurrency N] [--report FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from fallback import keys
from fallback.addresses import normalize_address
from fallback.commands.context import Context
from fallback.config import read_secret_file
from fallback.errors import ConfigError, InputError
from fallback.mailbox import removed
from fallback.mailbox.directory import check_mailstore
from fallback.maillog import MailLog
from fallback.ops import audit, metrics
from fallback.ops.trace import TraceBuffer
from fallback.reconcile.reconciler import Reconciler
from fallback.reconcile.report import MailboxReport, Report
from fallback.redisconn import async_client, resolve_url


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("reconcile", parents=[parents["common"]],
                       help="put every fallback message into the users' real mailboxes (IMAP), once")
    p.add_argument("--imap-url", metavar="imap://HOST:PORT",
                   help="the main store (imap:// or imaps://); FALLBACK_IMAP_URL")
    p.add_argument("--master-user", metavar="NAME", help="Dovecot master user; FALLBACK_MASTER_USER")
    p.add_argument("--master-password-file", metavar="FILE",
                   help="file with the master user's password; FALLBACK_MASTER_PASSWORD_FILE")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", action="append", metavar="ADDR", dest="users",
                     help="this mailbox (repeatable)")
    who.add_argument("--mailstore", metavar="NAME", help="every mailbox of this mailstore")
    who.add_argument("--all", action="store_true", help="every mailbox with something to reconcile")
    p.add_argument("--dry-run", action="store_true",
                   help="log in, check folders, report what would be appended; change nothing")
    p.add_argument("--concurrency", "--reconcile-concurrency", type=int, metavar="N",
                   dest="reconcile_concurrency",
                   help="mailboxes in parallel (default 8); FALLBACK_RECONCILE_CONCURRENCY")
    p.add_argument("--report", type=Path, metavar="FILE.json", help="write the per-mailbox report here")
    more = p.add_argument_group("main store options (also FALLBACK_* / TOML; see docs/reconcile.md)")
    more.add_argument("--master-separator", metavar="SEP",
                      help="USER<SEP>MASTER login (default *); empty: SASL PLAIN with authorization id")
    more.add_argument("--imap-ca-file", metavar="PEM", help="CA bundle for imaps:// (default: system)")
    more.add_argument("--imap-timeout", metavar="SECONDS", help="limit of one IMAP command (default 120)")
    more.add_argument("--reconcile-sent-folder", metavar="NAME",
                      help="Sent folder when the server announces no \\Sent (default Sent)")
    more.add_argument("--reconcile-trash-folder", metavar="NAME",
                      help="Trash folder when the server announces no \\Trash (default Trash)")
    more.add_argument("--reconcile-append-batch", type=int, metavar="N",
                      help="messages per APPEND where the server offers MULTIAPPEND (default 50; "
                      "1: one each)")
    more.add_argument("--reconcile-mailbox-connections", type=int, metavar="N",
                      help="connections for one big mailbox, 100 messages each in turn (default 4)")
    p.set_defaults(handler=run)


def _pending_counts(ctx: Context, addresses: Iterator[str], batch: int = 1000) -> dict[str, int]:
    """Mailboxes with something to do, with how much: pipelined SCARD, in batches."""
    r = ctx.redis()
    out: dict[str, int] = {}
    chunk: list[str] = []

    def flush() -> None:
        pipe = r.pipeline(transaction=False)
        for a in chunk:
            pipe.scard(keys.pending(a))
        for a, n in zip(chunk, pipe.execute(), strict=True):
            if int(n):
                out[a] = int(n)
        chunk.clear()

    for a in addresses:
        chunk.append(a)
        if len(chunk) >= batch:
            flush()
    if chunk:
        flush()
    return out


def select_mailboxes(ctx: Context, args: argparse.Namespace) -> dict[str, int]:
    if args.users:
        wanted = list(dict.fromkeys(normalize_address(u) for u in args.users))
        return {a: n for a, n in _pending_counts(ctx, iter(wanted)).items()}
    directory = ctx.directory()
    if args.mailstore:
        name = check_mailstore(args.mailstore)
        gone = list(removed.addresses(ctx.redis(), name))  # removed by a sync, mail kept
        if name not in directory.mailstores() and not gone:
            raise InputError(f"no mailstore {name!r} in the directory "
                             f"(known: {', '.join(sorted(directory.mailstores())) or 'none'})")
        return _pending_counts(ctx, itertools.chain(
            (m.address for m in directory.iter_mailboxes() if m.mailstore == name), gone))
    # Mailboxes a directory sync removed still hold mail to reconcile (mailbox/removed.py).
    return _pending_counts(ctx, itertools.chain((m.address for m in directory.iter_mailboxes()),
                                                removed.addresses(ctx.redis())))


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text("-/s" if task.speed is None else f"{task.speed:,.0f}/s")


class RichProgress:
    """Users and messages done, rate and ETA, on a terminal."""

    def __init__(self, progress: Progress, users: int, messages: int) -> None:
        self.p = progress
        self.users = progress.add_task("mailboxes", total=users)
        self.msgs = progress.add_task("messages", total=messages)

    def messages(self, n: int) -> None:
        self.p.advance(self.msgs, n)

    def mailbox_done(self, report: MailboxReport) -> None:
        self.p.advance(self.users, 1)


def summary_table(report: Report) -> Table:
    t = report.totals()
    title = "reconcile (dry run)" if report.dry_run else "reconcile"
    table = Table(title=f"{title}: {report.target}")
    table.add_column("", justify="left")
    table.add_column("count", justify="right")
    rows = [("mailboxes", t["mailboxes"])]
    if report.dry_run:
        rows += [("would append", t["would_append"]), ("would update", t["would_update"])]
    else:
        rows += [("appended", t["appended"]), ("  of them drafts (into \\Drafts)", t["drafts"]),
                 ("already present", t["already_present"]),
                 ("updated (flags, folder)", t["updated"]), ("failed", t["failed"]),
                 ("stored changed by the server", t["changed"])]
    rows += [("deleted for good by the user", t["deleted_for_good"]),
             ("mailboxes with errors", t["mailbox_errors"]), ("left to do", t["left"])]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def problems_table(report: Report, limit: int = 20) -> Table | None:
    rows = []
    for address, m in sorted(report.mailboxes.items()):
        if m.error:
            rows.append((address, "-", m.error))
        for f in (*m.failed, *m.changed):
            rows.append((address, f.id, f.reason))
    if not rows:
        return None
    table = Table(title=f"problems ({len(rows)}; all of them in the JSON report)" if len(rows) > limit
                  else "problems")
    for col in ("mailbox", "message", "reason"):
        table.add_column(col)
    for row in rows[:limit]:
        table.add_row(*row)
    return table


def write_report(path: Path, report: Report) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(report.as_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot write the report {path}: {exc.strerror}") from None


async def _reconcile(ctx: Context, password: str, dry_run: bool, work: dict[str, int]) -> Report:
    r = async_client(resolve_url(ctx.settings))
    # Reconciled/failed events feed /metrics (shared counters in Redis), flushed at the end.
    counters = metrics.Counters(trace=TraceBuffer.for_settings(ctx.settings, "reconcile"))
    maillog = MailLog(counters=metrics.MailCounters(counters))
    # Issue 16: the trace (and counts) are written as the run goes, not all at its end.
    flusher = asyncio.create_task(counters.run_async(r))
    try:
        addresses = sorted(work)
        if ctx.console.is_terminal:
            columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                       TaskProgressColumn(), RateColumn(), TimeElapsedColumn(), TimeRemainingColumn())
            with Progress(*columns, console=ctx.console, transient=False) as progress:
                sink = RichProgress(progress, len(addresses), sum(work.values()))
                rec = Reconciler(ctx.settings, r, password, dry_run=dry_run, progress=sink,
                                 maillog=maillog)
                return await rec.run(addresses)
        rec = Reconciler(ctx.settings, r, password, dry_run=dry_run, maillog=maillog)
        return await rec.run(addresses)
    finally:
        flusher.cancel()  # its last flush writes what is left
        with contextlib.suppress(asyncio.CancelledError, Exception):  # never fails a reconcile
            await flusher
        await r.aclose()


def master_password(path: Path) -> str:
    """The file's first line, spaces kept: a password may begin or end with one."""
    text = read_secret_file("master_password_file", path, keep_spaces=True)
    password = text.splitlines()[0] if text else ""
    if not password:
        raise ConfigError(f"master_password_file: {path} is empty")
    return password


def run(ctx: Context, args: argparse.Namespace) -> int:
    s = ctx.settings
    if not s.imap_url:
        raise InputError("give --imap-url imap://HOST:PORT (or imaps://HOST:PORT)")
    if not s.master_user:
        raise InputError("give --master-user NAME")
    if s.master_password_file is None:
        raise InputError("give --master-password-file FILE")
    password = master_password(s.master_password_file)
    work = select_mailboxes(ctx, args)
    if not work:
        ctx.console.print("nothing to reconcile")
        report = Report(args.dry_run, s.imap_url)
    else:
        dry = " (dry run)" if args.dry_run else ""
        ctx.console.print(f"{sum(work.values())} message(s) in {len(work)} mailbox(es) to reconcile "
                          f"into {s.imap_url}{dry}", markup=False, soft_wrap=True)
        report = asyncio.run(_reconcile(ctx, password, args.dry_run, work))
    ctx.console.print(summary_table(report))
    problems = problems_table(report)
    if problems is not None:
        ctx.console.print(problems)
    if args.report:
        write_report(args.report, report)
    t = report.totals()
    audit.write(ctx.redis(), s.audit_log, "reconcile", audit.actor_name(),
                {"target": s.imap_url, "dry_run": bool(args.dry_run), "mailboxes": len(work)},
                f"{'ok' if report.ok else 'incomplete'}: " + ", ".join(
                    f"{k} {t[k]}" for k in ("appended", "already_present", "updated", "failed", "left")
                    if k in t), warn_as="fallback reconcile")
    if not report.ok:
        what = ("mailbox(es) failed the checks" if args.dry_run
                else "message(s) left; run again after fixing the causes above")
        count = t["mailbox_errors"] if args.dry_run else t["left"]
        ctx.err.print(f"fallback reconcile: {count} {what}", markup=False, highlight=False)
        return 1
    return 0
