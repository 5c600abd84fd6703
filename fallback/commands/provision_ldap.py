"""`fallback provision --ldap-url ...`: the user directory read from LDAP instead of a FILE."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.progress import Progress, TextColumn
from rich.table import Table

from fallback.commands import provision_sync
from fallback.commands.context import Context
from fallback.errors import InputError
from fallback.mailbox.ldapsource import DEFAULT_FILTER, LdapEntries, LdapQuery, load, load_aliases
from fallback.mailbox.provision import Provisioner, Report
from fallback.ops import audit

SHOW_INVALID = 50


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LDAP source (instead of FILE)")
    g.add_argument("--ldap-url", metavar="URL", help="ldap://HOST:PORT or ldaps://HOST:PORT (certificate "
                   "checked against the system's CAs, or --ldap-ca-file's)")
    g.add_argument("--ldap-ca-file", type=Path, metavar="FILE",
                   help="ldaps://: trust the CA certificates in this PEM bundle instead of the system's")
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
                                   args.ldap_password_file, args.ldap_filter, args.ldap_map,
                                   args.ldap_ca_file)
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
    """--sync / --dry-run from LDAP: mailboxes as for a file (mailbox/sync.py), then the aliases
    LDAP created (those no longer in LDAP removed; a virtual file's and `alias add`'s kept).
    The aliases' removal limit is checked after the first read, before any mailbox is
    written, so a refusal of either changes nothing."""
    source = f"{query.url} {query.base}"

    def guard() -> None:
        if args.sync and not args.dry_run and not entries.alias_problems:
            report = provision_sync.ldap_alias_sync(ctx, args, entries.aliases, plan_only=True)
            if report.refused:
                raise InputError(report.refused)

    rc = provision_sync.run_sync(ctx, args, provisioner, entries, source, guard)
    if entries.alias_problems:
        # A bad alias value might be one that would otherwise be removed: aliases stay as they are.
        print_problems(ctx, [f"{p.where}: {p.reason}" for p in entries.alias_problems])
        ctx.err.print("fallback provision: invalid alias values in LDAP; no alias was changed",
                      markup=False, soft_wrap=True)
        return 1
    if rc == 0 or args.dry_run:
        rc = max(rc, provision_sync.run_ldap_alias_sync(ctx, args, entries.aliases, source))
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
    audit.write(ctx.redis(), ctx.settings.audit_log, "provision", audit.actor_name(),
                {"source": f"{query.url} {query.base}"},
                f"{'ok' if report.loaded else 'nothing loaded'}: {report.added} added, {report.updated} "
                f"updated, {report.unchanged} unchanged, {len(report.invalid)} invalid, {aliases} new "
                "alias(es)", warn_as="fallback provision")


def print_problems(ctx: Context, problems: list[str]) -> None:
    """Each entry's DN and what is wrong with it (invalid entries, then aliases)."""
    for text in problems[:SHOW_INVALID]:
        # One greppable line each, never wrapped at the terminal width.
        ctx.console.print(text, markup=False, soft_wrap=True)
    if len(problems) > SHOW_INVALID:
        ctx.console.print(f"... and {len(problems) - SHOW_INVALID} more invalid entries")
