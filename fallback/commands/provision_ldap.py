"""`fallback provision --ldap-url ...`: the user directory read from LDAP instead of a FILE."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.progress import Progress, TextColumn
from rich.table import Table

from fallback.commands import provision_sync
from fallback.commands.context import Context
from fallback.mailbox.ldapsource import DEFAULT_FILTER, LdapEntries, LdapQuery, load, load_aliases
from fallback.mailbox.provision import Provisioner, Report

SHOW_INVALID = 50


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LDAP source (instead of FILE)")
    g.add_argument("--ldap-url", metavar="URL", help="ldap://HOST:PORT or ldaps://HOST:PORT (certificate "
                   "checked against the system's CAs)")
    g.add_argument("--ldap-base", metavar="DN", help="search base, e.g. ou=people,dc=example,dc=com")
    g.add_argument("--ldap-bind-dn", metavar="DN", help="bind as this DN (default: anonymous)")
    g.add_argument("--ldap-password-file", type=Path, metavar="FILE", help="the bind DN's password")
    g.add_argument("--ldap-filter", metavar="FILTER", help=f"default: {DEFAULT_FILTER}")
    g.add_argument("--ldap-map", metavar="FIELD=ATTR,...",
                   help="attributes of address, password, mailstore, alternate, alias (multi-valued: "
                   "aliases of the user); default: address=mail,password=userPassword; without "
                   "mailstore=ATTR every user gets --mailstore")


def run(ctx: Context, args: argparse.Namespace) -> int:
    query = LdapQuery.from_options(args.ldap_url, args.ldap_base, args.ldap_bind_dn,
                                   args.ldap_password_file, args.ldap_filter, args.ldap_map)
    provision_sync.check_arguments(args)
    directory = ctx.directory()
    provisioner = Provisioner(directory, ctx.settings.password_scheme, args.mailstore,
                              ctx.settings.default_scheme)
    with Progress(TextColumn("provisioning from LDAP: {task.completed} entries"), console=ctx.err,
                  disable=not ctx.err.is_terminal, transient=True) as progress:
        task = progress.add_task("provision", total=None)
        entries = LdapEntries(query, args.mailstore, ctx.settings.default_scheme,
                              progress=lambda found: progress.update(task, completed=found))
        if provision_sync.wanted(args):
            return run_sync(ctx, args, provisioner, entries, query)
        report = load(provisioner, entries, args.strict)
    aliases = 0
    if report.loaded and entries.aliases:
        aliases = load_aliases(directory.r, directory.buckets, entries.aliases)
    print_report(ctx, query, entries, report, aliases)
    bad = len(report.invalid) + len(entries.alias_problems)
    if bad:
        ctx.err.print(f"fallback provision: {bad} invalid LDAP entr{'y' if bad == 1 else 'ies'}; "
                      + ("nothing was loaded (--strict)" if not report.loaded
                         else "the other entries were loaded"), markup=False, soft_wrap=True)
        return 1
    return 0


def run_sync(ctx: Context, args: argparse.Namespace, provisioner: Provisioner, entries: LdapEntries,
             query: LdapQuery) -> int:
    """--sync / --dry-run from LDAP: mailboxes as for a file (mailbox/sync.py); the aliases of a
    real run are added afterwards (aliases no longer in LDAP are not removed)."""
    rc = provision_sync.run_sync(ctx, args, provisioner, entries, f"{query.url} {query.base}")
    if entries.alias_problems:
        print_problems(ctx, [f"{p.where}: {p.reason}" for p in entries.alias_problems])
        rc = 1
    if rc == 0 and args.sync and not args.dry_run and entries.aliases:
        directory = provisioner.directory
        load_aliases(directory.r, directory.buckets, entries.aliases)
    return rc


def print_report(ctx: Context, query: LdapQuery, entries: LdapEntries, report: Report,
                 aliases: int) -> None:
    ctx.console.print(f"provisioned from {query.url} {query.base} ({entries.found} entries)",
                      markup=False, soft_wrap=True)
    table = Table()
    for col in ("added", "updated", "unchanged", "invalid", "aliases"):
        table.add_column(col, justify="right")
    table.add_row(str(report.added), str(report.updated), str(report.unchanged),
                  str(len(report.invalid) + len(entries.alias_problems)), str(len(entries.aliases)))
    ctx.console.print(table)
    print_problems(ctx, [i.reason for i in report.invalid]
                   + [f"{p.where}: {p.reason}" for p in entries.alias_problems])
    if aliases:
        ctx.console.print(f"{aliases} new alias(es)")


def print_problems(ctx: Context, problems: list[str]) -> None:
    """Each entry's DN and what is wrong with it (invalid entries, then aliases)."""
    for text in problems[:SHOW_INVALID]:
        # One greppable line each, never wrapped at the terminal width.
        ctx.console.print(text, markup=False, soft_wrap=True)
    if len(problems) > SHOW_INVALID:
        ctx.console.print(f"... and {len(problems) - SHOW_INVALID} more invalid entries")
