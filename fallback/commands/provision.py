"""`fallback provision FILE`: import the user directory before an outage."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fallback.commands import provision_ldap, provision_sync
from fallback.commands.context import Context
from fallback.errors import InputError
from fallback.mailbox import dirindex
from fallback.mailbox.aliases import Aliases
from fallback.mailbox.directory import ensure_buckets
from fallback.mailbox.provision import Provisioner, Report
from fallback.mailbox.sync import FileEntries
from fallback.mailbox.virtualfile import import_file, looks_like_virtual
from fallback.ops import audit

SHOW_INVALID = 50


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("provision", parents=[parents["common"]],
                       help="import mailboxes from CSV or a Dovecot passwd-file",
                       description="Import the user directory: CSV with header "
                       "address,password,mailstore[,alternate], or passwd-file lines "
                       "user@domain:{SCHEME}hash:...  Re-runs are idempotent.")
    p.add_argument("file", type=Path, metavar="FILE", nargs="?", help="omit with --ldap-url")
    p.add_argument("--format", choices=("csv", "passwd", "virtual"),
                   help="default: guessed from the content; virtual: Postfix virtual(5) aliases")
    p.add_argument("--strict", action="store_true", help="load nothing if any line is invalid")
    p.add_argument("--mailstore", default="default",
                   help="mailstore for passwd-file lines without mailstore=NAME (default: default)")
    p.add_argument("--default-scheme", metavar="SCHEME",
                   help="scheme of passwd-file hashes without a {SCHEME} prefix, as Dovecot's "
                   "default_pass_scheme (e.g. SHA512-CRYPT; FALLBACK_DEFAULT_SCHEME); "
                   "unset: such lines are refused")
    p.add_argument("--contacts-directory", metavar="BOOL",
                   help="index the mailboxes for address suggestions in compose (default: true, "
                   "FALLBACK_CONTACTS_DIRECTORY, as the webmail's); false skips the index")
    provision_sync.add_arguments(p)
    provision_ldap.add_options(p)
    p.set_defaults(usage_error=p.error)
    p.set_defaults(handler=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    if (args.file is None) == (args.ldap_url is None):
        args.usage_error("give either FILE or --ldap-url")   # exits 2 with the usage
    if args.file is not None and not args.file.is_file():
        raise InputError(f"{args.file}: no such file")
    # Issue 17: into an empty directory every mailbox goes through the directory's writes, which
    # index it: nothing to read back for the name index (a second pass over a million records).
    was_empty = not ctx.directory().domains()
    rc = _run(ctx, args)
    if rc == 0 and not getattr(args, "dry_run", False):
        # Issue 15: a directory provisioned before the name index for suggestions existed gets
        # it once, after a run that succeeded (a refused or dry run writes nothing); the directory's
        # writes keep it up to date from then on.
        # Issue 17: with `--contacts-directory false` nothing is indexed; the index is marked for
        # a rebuild at the first run with it on again, so that it names every mailbox then.
        if not ctx.settings.contacts_directory:
            dirindex.forget(ctx.redis())
        else:
            dirindex.ensure(ctx.redis(), None if was_empty else
                            (m.address for m in ctx.directory().iter_mailboxes()))
    return rc


def _run(ctx: Context, args: argparse.Namespace) -> int:
    if args.ldap_url is not None:
        return provision_ldap.run(ctx, args)
    path: Path = args.file
    if args.format == "virtual" or (args.format is None and looks_like_virtual(path)):
        if provision_sync.wanted(args):
            return provision_sync.run_alias_sync(ctx, args, path)
        return run_virtual(ctx, path, args.strict)
    provision_sync.check_arguments(args)
    provisioner = Provisioner(ctx.directory(), ctx.settings.password_scheme, args.mailstore,
                              ctx.settings.default_scheme)
    if provision_sync.wanted(args):
        entries = FileEntries(path, args.format, args.mailstore, provisioner.default_scheme)
        return provision_sync.run_sync(ctx, args, provisioner, entries, str(path))
    total = path.stat().st_size
    with Progress(TextColumn("provisioning"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=ctx.err, disable=not ctx.err.is_terminal, transient=True) as progress:
        task = progress.add_task("provision", total=total)
        report = provisioner.run(path, args.format, args.strict,
                                 progress=lambda done: progress.update(task, completed=done))
    print_report(ctx, path, report)
    if report.invalid:
        ctx.err.print(f"fallback provision: {len(report.invalid)} invalid line(s); "
                      + ("nothing was loaded (--strict)" if not report.loaded
                         else "the other lines were loaded"))
        return 1
    return 0


def run_virtual(ctx: Context, path: Path, strict: bool) -> int:
    """Aliases from a Postfix virtual(5) file (mailbox/virtualfile.py), reported like mailboxes."""
    r = ctx.redis()
    aliases = Aliases(r, ensure_buckets(r, ctx.settings.directory_buckets))
    with Progress(TextColumn("importing aliases"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=ctx.err, disable=not ctx.err.is_terminal, transient=True) as progress:
        task = progress.add_task("aliases", total=path.stat().st_size)
        report = import_file(aliases, ctx.directory(), path, strict,
                             progress=lambda done: progress.update(task, completed=done))
    print_report(ctx, path, report)
    if report.invalid:
        ctx.err.print(f"fallback provision: {len(report.invalid)} invalid line(s); "
                      + ("nothing was loaded (--strict)" if not report.loaded
                         else "the other aliases were loaded"))
        return 1
    return 0


def print_report(ctx: Context, path: Path, report: Report) -> None:
    ctx.console.print(f"provisioned from {path}", markup=False, soft_wrap=True)
    table = Table()
    for col in ("added", "updated", "unchanged", "invalid"):
        table.add_column(col, justify="right")
    table.add_row(str(report.added), str(report.updated), str(report.unchanged), str(len(report.invalid)))
    ctx.console.print(table)
    for item in report.invalid[:SHOW_INVALID]:
        # One greppable line each, never wrapped at the terminal width.
        ctx.console.print(f"{path}:{item.line}: {item.reason}", markup=False, soft_wrap=True)
    if len(report.invalid) > SHOW_INVALID:
        ctx.console.print(f"... and {len(report.invalid) - SHOW_INVALID} more invalid lines")
    audit.write(ctx.redis(), ctx.settings.audit_log, "provision", audit.actor_name(), {"source": str(path)},
                f"{'ok' if report.loaded else 'nothing loaded'}: {report.added} added, {report.updated} "
                f"updated, {report.unchanged} unchanged, {len(report.invalid)} invalid",
                warn_as="fallback provision")
