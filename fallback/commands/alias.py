"""`fallback alias add|remove|show ADDRESS`: one alias (a Postfix virtual(5) entry) at a time.

Files of aliases are imported with `fallback provision FILE --format virtual`;
both refuse loops and over-deep chains the same way (mailbox/virtualfile.py).
Adding and removing are admin actions and go to the audit log.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fallback.commands.context import Context
from fallback.errors import InputError, NotFound
from fallback.mailbox.aliases import Aliases, domain_of, make_alias, normalize_alias_address
from fallback.mailbox.directory import ensure_buckets
from fallback.mailbox.provision import Invalid
from fallback.mailbox.virtualfile import Parsed, check_chains
from fallback.ops import audit


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("alias", help="add, remove or show one alias (virtual(5) entry)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", parents=[parents["common"]],
                             help="add or replace an alias: ADDRESS (or @domain) -> TARGET...")
    add.add_argument("address", metavar="ADDRESS", help="user@domain, or @domain for a catch-all")
    add.add_argument("targets", nargs="+", metavar="TARGET", help="full addresses, here or outside")
    add.add_argument("--actor", metavar="NAME", help="who to name in the audit log")
    add.set_defaults(handler=add_alias)
    rm = actions.add_parser("remove", parents=[parents["common"]], help="remove an alias")
    rm.add_argument("address", metavar="ADDRESS")
    rm.add_argument("--actor", metavar="NAME", help="who to name in the audit log")
    rm.set_defaults(handler=remove_alias)
    show = actions.add_parser("show", parents=[parents["common"]],
                              help="show an alias and what each of its targets is")
    show.add_argument("address", metavar="ADDRESS")
    show.set_defaults(handler=show_alias)


def _stores(ctx: Context) -> tuple[Aliases, Any]:
    r = ctx.redis()
    return Aliases(r, ensure_buckets(r, ctx.settings.directory_buckets)), ctx.directory()


def _audit(ctx: Context, args: argparse.Namespace, action: str, given: dict[str, Any], outcome: str) -> None:
    entry = audit.Entry(action=action, actor=audit.actor_name(args.actor), args=given, outcome=outcome)
    for problem in audit.record(ctx.redis(), entry, ctx.settings.audit_log):
        print(f"fallback alias: warning: {problem}", file=sys.stderr)


def add_alias(ctx: Context, args: argparse.Namespace) -> int:
    alias = make_alias(args.address, args.targets)
    aliases, directory = _stores(ctx)
    refused: list[Invalid] = check_chains(Parsed({alias.address: (0, alias)}), aliases, directory)
    if refused:
        # The new alias is the "line 0" of a one-line file: say "new" rather than a line number.
        raise InputError(refused[0].reason.replace(" (line 0)", " (new)"))
    old = aliases.get(alias.address)
    aliases.put(alias)
    verb = "added" if old is None else "unchanged" if old == alias else "updated"
    _audit(ctx, args, "alias add", {"address": alias.address, "targets": list(alias.targets)}, f"ok: {verb}")
    ctx.console.print(f"{verb} {alias.address} -> {', '.join(alias.targets)}", markup=False, soft_wrap=True)
    if not alias.address.startswith("@") and directory.get(alias.address) is not None:
        ctx.console.print(f"note: {alias.address} is also a mailbox here; mail to it goes to the mailbox "
                          "(mailboxes are looked up first): the alias is not used while the mailbox exists",
                          markup=False, soft_wrap=True)
    return 0


def remove_alias(ctx: Context, args: argparse.Namespace) -> int:
    address = normalize_alias_address(args.address)
    aliases, _ = _stores(ctx)
    if not aliases.remove(address):
        raise NotFound(f"{address} is not an alias")
    _audit(ctx, args, "alias remove", {"address": address}, "ok: removed")
    ctx.console.print(f"removed alias {address}", markup=False)
    return 0


def _kind(target: str, aliases: Aliases, directory: Any) -> str:
    """What the receiver finds first for the target (intake/addressing.py's order)."""
    mailbox = directory.get(target)
    if mailbox is not None:
        return f"mailbox here (mailstore {mailbox.mailstore})"
    if aliases.get(target) is not None:
        return "alias"
    if aliases.get("@" + domain_of(target)) is not None:
        return f"catch-all @{domain_of(target)}"
    return "outside: forwarded to the main system"


def show_alias(ctx: Context, args: argparse.Namespace) -> int:
    address = normalize_alias_address(args.address)
    aliases, directory = _stores(ctx)
    alias = aliases.get(address)
    if alias is None:
        raise NotFound(f"{address} is not an alias")
    ctx.console.print(f"alias:      {address}" + (" (catch-all)" if alias.catch_all else ""), markup=False)
    if not alias.catch_all and directory.get(address) is not None:
        ctx.console.print("note:       also a mailbox here, which gets its mail: this alias is not used",
                          markup=False)
    for target in alias.targets:
        ctx.console.print(f"  {target}: {_kind(target, aliases, directory)}", markup=False,
                          soft_wrap=True)
    return 0
