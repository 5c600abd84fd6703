"""`fallback mailbox add|remove|show|logout|unthrottle ADDRESS`: one user at a time."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from fallback.addresses import normalize_address
from fallback.commands.context import Context
from fallback.errors import InputError, NotFound
from fallback.mailbox import logins, passwords, quota, removed
from fallback.mailbox.directory import DEFAULT_MAILSTORE, Mailbox, check_mailstore
from fallback.mailbox.fields import FOLDERS
from fallback.mailbox.store import MailboxReader
from fallback.ops import audit


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("mailbox", help="add, remove or show one mailbox")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", parents=[parents["common"]], help="add or update a mailbox")
    add.add_argument("address")
    add.add_argument("--mailstore", default=DEFAULT_MAILSTORE)
    add.add_argument("--alternate", default="", help="alternate address for notices")
    pw = add.add_mutually_exclusive_group()
    pw.add_argument("--password-hash", metavar="{SCHEME}HASH", help="a Dovecot-style hash")
    pw.add_argument("--password-stdin", action="store_true",
                    help="read the plain password (or {SCHEME}hash) from standard input")
    add.set_defaults(handler=add_mailbox)
    rm = actions.add_parser("remove", parents=[parents["common"]], help="remove a mailbox")
    rm.add_argument("address")
    rm.add_argument("--force", action="store_true",
                    help="remove even though it holds messages not yet reconciled")
    rm.set_defaults(handler=remove_mailbox)
    show = actions.add_parser("show", parents=[parents["common"]], help="show a mailbox")
    show.add_argument("address")
    show.set_defaults(handler=show_mailbox)
    out = actions.add_parser("logout", parents=[parents["common"]],
                             help="end every webmail session of a mailbox now")
    out.add_argument("address")
    out.set_defaults(handler=logout_mailbox)
    lift = actions.add_parser("unthrottle", parents=[parents["common"]],
                              help="forget a mailbox's failed webmail log-ins (lift its delays)")
    lift.add_argument("address")
    lift.set_defaults(handler=unthrottle_mailbox)


def _password(args: argparse.Namespace) -> str:
    if args.password_hash:
        return str(args.password_hash)
    if args.password_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise InputError("the two passwords differ")
    return first


def add_mailbox(ctx: Context, args: argparse.Namespace) -> int:
    address = normalize_address(args.address)
    mailstore = check_mailstore(args.mailstore)
    alternate = normalize_address(args.alternate) if args.alternate else ""
    given = _password(args)
    stored = passwords.prepare_for_import(given, ctx.settings.password_scheme)
    directory = ctx.directory()
    old = directory.get(address)
    if old is not None and _same_password(given, old.password_hash):
        stored = old.password_hash  # the same plain password again: keep its hash (and sessions)
    directory.put(Mailbox(address, mailstore, stored, alternate))
    ctx.console.print(f"{'added' if old is None else 'updated'} {address} (mailstore {mailstore})")
    ended = 0
    if old is not None and old.password_hash != stored:
        # A new password is often the answer to a stolen one: the old sessions end now.
        ended = logins.end_sessions(ctx.redis(), address)
        if ended:
            ctx.console.print(f"password changed: ended {_sessions(ended)} of {address}")
    _audit(ctx, "mailbox add", address,
           f"ok: {'added' if old is None else 'updated'}"
           + ("; password changed" if old is not None and old.password_hash != stored else "")
           + (f"; ended {_sessions(ended)}" if ended else ""), mailstore=mailstore)
    return 0


def _audit(ctx: Context, action: str, address: str, outcome: str, **given: Any) -> None:
    """Who changed which mailbox (never a password or its hash)."""
    audit.write(ctx.redis(), ctx.settings.audit_log, action, audit.actor_name(),
                {"address": address, **given}, outcome, warn_as="fallback mailbox")


def _same_password(given: str, old_hash: str) -> bool:
    scheme, plain = passwords.split_scheme(given)
    return given == old_hash or (scheme is None and passwords.verify_password(plain, old_hash))


def _sessions(n: int) -> str:
    return f"{n} webmail session{'' if n == 1 else 's'}"


def remove_mailbox(ctx: Context, args: argparse.Namespace) -> int:
    address = normalize_address(args.address)
    directory = ctx.directory()
    mailbox = directory.get(address)
    if mailbox is None:
        raise NotFound(f"{address} is not provisioned")
    reader = MailboxReader(ctx.redis(), address)
    held = sum(reader.count(f) for f in FOLDERS)
    if held and not args.force:
        raise InputError(f"{address} holds {held} message(s) not yet purged; reconcile or export "
                         "them first, or give --force (the messages stay in Redis)")
    if held:  # the kept messages stay reachable by reconcile --all, purge and status
        removed.remember(ctx.redis(), [(address, mailbox.mailstore)])
    directory.remove(address)
    ended = logins.end_sessions(ctx.redis(), address)
    ctx.console.print(f"removed {address}" + (f" ({held} message(s) kept in Redis)" if held else "")
                      + (f"; ended {_sessions(ended)}" if ended else ""))
    _audit(ctx, "mailbox remove", address, f"ok: removed; {held} message(s) kept; ended {_sessions(ended)}",
           mailstore=mailbox.mailstore, force=bool(args.force))
    return 0


def logout_mailbox(ctx: Context, args: argparse.Namespace) -> int:
    address = normalize_address(args.address)
    if ctx.directory().get(address) is None:
        raise NotFound(f"{address} is not provisioned")
    ended = logins.end_sessions(ctx.redis(), address)
    ctx.console.print(f"ended {_sessions(ended)} of {address}", markup=False)
    _audit(ctx, "mailbox logout", address, f"ok: ended {_sessions(ended)}")
    return 0


def unthrottle_mailbox(ctx: Context, args: argparse.Namespace) -> int:
    address = normalize_address(args.address)
    if ctx.directory().get(address) is None:
        raise NotFound(f"{address} is not provisioned")
    if logins.lift_throttle(ctx.redis(), address):
        ctx.console.print(f"lifted the log-in delays of {address}", markup=False)
    else:
        ctx.console.print(f"{address} had no failed log-ins to forget", markup=False)
    return 0


def show_mailbox(ctx: Context, args: argparse.Namespace) -> int:
    address = normalize_address(args.address)
    mailbox = ctx.directory().get(address)
    if mailbox is None:
        raise NotFound(f"{address} is not provisioned")
    reader = MailboxReader(ctx.redis(), address)
    scheme, _ = passwords.split_scheme(mailbox.password_hash)
    info = reader.info()
    ctx.console.print(f"address:    {address}", markup=False)
    ctx.console.print(f"mailstore:  {mailbox.mailstore}", markup=False)
    ctx.console.print(f"password:   {{{scheme}}} hash", markup=False)
    if mailbox.alternate:
        ctx.console.print(f"alternate:  {mailbox.alternate}", markup=False)
    ctx.console.print(f"messages:   {info.get('messages', 0)} ({info.get('bytes', 0)} bytes)")
    ctx.console.print(f"quota:      {quota.describe(info.get('bytes', 0), ctx.settings.mailbox_quota)}",
                      markup=False)
    for name in FOLDERS:
        ctx.console.print(f"  {name}: {reader.count(name)}", markup=False)
    return 0
