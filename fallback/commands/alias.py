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
from fallback.mailbox.aliases import (
    MANUAL,
    ORIGINS,
    Aliases,
    domain_of,
    make_alias,
    normalize_alias_address,
)
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
    # Manual: no sync (LDAP or a virtual file) removes it, only `alias remove` (or a source
    # that names the same address and so takes it over).
    alias = make_alias(args.address, args.targets, MANUAL)
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
        ctx.console.print(f"note: {alias.address} is also a mailbox here; the alias wins, as in Postfix: "
                          + _over_mailbox(alias.address, alias.targets), markup=False, soft_wrap=True)
    return 0


def remove_alias(ctx: Context, args: argparse.Namespace) -> int:
    address = normalize_alias_address(args.address)
    aliases, _ = _stores(ctx)
    if not aliases.remove(address):
        raise NotFound(f"{address} is not an alias")
    _audit(ctx, args, "alias remove", {"address": address}, "ok: removed")
    ctx.console.print(f"removed alias {address}", markup=False)
    return 0


def _over_mailbox(address: str, targets: tuple[str, ...]) -> str:
    """What an alias of a mailbox's address does with its mail (intake/addressing.py)."""
    if address in targets:
        return "the mailbox keeps a copy (the alias names it) and the other targets get theirs"
    return "its mail goes to the targets, not to the mailbox (add the address itself to keep a copy)"


def _kind(target: str, address: str, aliases: Aliases, directory: Any) -> str:
    """What the receiver finds for the target (intake/addressing.py's order: an alias wins)."""
    mailbox = directory.get(target)
    here = None if mailbox is None else f"mailbox here (mailstore {mailbox.mailstore})"
    if target == address:  # Postfix: an alias naming itself stops the recursion there
        return f"itself: {here or 'forwarded to the main system'}"
    if aliases.get(target) is not None:
        return "alias" + (" (also a mailbox here: the alias wins)" if here else "")
    if here is not None:
        return here
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
    ctx.console.print(f"origin:     {ORIGINS[alias.origin]}", markup=False)
    if not alias.catch_all and directory.get(address) is not None:
        ctx.console.print("note:       also a mailbox here; the alias wins: "
                          + _over_mailbox(address, alias.targets), markup=False, soft_wrap=True)
    for target in alias.targets:
        ctx.console.print(f"  {target}: {_kind(target, address, aliases, directory)}", markup=False,
                          soft_wrap=True)
    return 0
