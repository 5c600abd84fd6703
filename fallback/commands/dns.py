"""`fallback dns switch|lower-ttl|show`: point the MX records at the fallback or back, by RFC 2136.

Works without Redis (the DNS switch may be the first thing done in an
outage): the audit entry then goes to the `audit_log` file only, with a
warning.  `--dry-run` reads the current records and prints the updates it
would send, and sends none.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import dns.message

from fallback.commands.context import Context
from fallback.errors import FallbackError
from fallback.ops import audit, dnsupdate

_DNS_FLAGS = (("dns-server", "HOST[:PORT]"), ("dns-zone", "ZONE"), ("dns-tsig-key-file", "FILE"),
              ("dns-mx-name", "NAME"), ("dns-primary-mx", "'PREF HOST, ...'"),
              ("dns-fallback-mx", "'PREF HOST, ...'"), ("dns-low-ttl", "SECONDS"),
              ("dns-timeout", "SECONDS"), ("audit-log", "FILE"))


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    dns_opts = argparse.ArgumentParser(add_help=False)
    g = dns_opts.add_argument_group("DNS options (also FALLBACK_DNS_* or the config file)")
    for name, metavar in _DNS_FLAGS:
        g.add_argument(f"--{name}", metavar=metavar)
    common = [parents["common"], dns_opts]
    p = sub.add_parser("dns", help="switch the MX records between the main system and the fallback")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = actions.add_parser("switch", parents=common, help="replace the MX records (TTL lowered first)")
    s.add_argument("--to", choices=("fallback", "primary"), required=True)
    l_ = actions.add_parser("lower-ttl", parents=common,
                            help="only lower the TTL of the current MX records, ahead of a switch")
    for a in (s, l_):
        a.add_argument("--ttl", type=int, metavar="SECONDS",
                       help="TTL of the records after the update (default --dns-low-ttl)")
        a.add_argument("--dry-run", action="store_true", help="print the updates, send nothing")
        a.add_argument("--actor", metavar="NAME", help="who to name in the audit log")
    s.set_defaults(handler=run_switch)
    l_.set_defaults(handler=run_lower)
    show = actions.add_parser("show", parents=common, help="the MX records the primary server holds now")
    show.set_defaults(handler=run_show)


def _print_update(ctx: Context, title: str, update: dns.message.Message) -> None:
    ctx.console.print(f";; {title}", markup=False)
    ctx.console.print(update.to_text(), markup=False)


def _audit(ctx: Context, args: argparse.Namespace, action: str, details: dict[str, Any],
           outcome: str) -> None:
    try:
        r = ctx.redis()
    except FallbackError as exc:
        r = None  # no Redis: the file copy must do
        print(f"fallback dns: warning: audit entry not written to Redis: {exc.reason}", file=sys.stderr)
    for problem in audit.record(r, audit.Entry(action=action, actor=audit.actor_name(args.actor),
                                               args=details, outcome=outcome), ctx.settings.audit_log):
        print(f"fallback dns: warning: {problem}", file=sys.stderr)


def _run(ctx: Context, args: argparse.Namespace, to: str | None) -> int:
    s = ctx.settings
    t = dnsupdate.target_from(s)
    ttl = args.ttl if args.ttl is not None else s.dns_low_ttl
    if ttl <= 0:
        raise FallbackError(f"--ttl {ttl}: must be greater than 0")
    records = dnsupdate.records_for(s, to) if to else None
    now = dnsupdate.current(t)
    updates: list[tuple[str, dns.message.Message]] = []
    lower = dnsupdate.lower_ttl_update(t, now, ttl)
    if lower is not None:
        updates.append((f"1. lower the TTL of {t.name} MX from {now.ttl if now else 0} to {ttl}", lower))
    if records is not None and not dnsupdate.already(now, records, ttl):
        updates.append((f"{len(updates) + 1}. point {t.name} MX at the {to}",
                        dnsupdate.switch_update(t, records, ttl)))
    action = "dns switch" if to else "dns lower-ttl"
    details: dict[str, Any] = {"server": f"{t.host}:{t.port}", "name": str(t.name), "ttl": ttl}
    if to:
        details["to"] = to
    if not updates:
        ctx.console.print(f"{t.name} MX already as asked (TTL {now.ttl if now else '-'}); nothing sent",
                          markup=False)
        return 0
    if args.dry_run:
        for title, u in updates:
            _print_update(ctx, title + " (dry run: not sent)", u)
        return 0
    for n, (title, u) in enumerate(updates):
        try:
            dnsupdate.send(t, u)
        except FallbackError as exc:
            _audit(ctx, args, action, details, f"failed at step {n + 1}: {exc.reason}")
            raise
        ctx.console.print(f"sent: {title}", markup=False)
    _audit(ctx, args, action, details, "ok")
    return 0


def run_switch(ctx: Context, args: argparse.Namespace) -> int:
    return _run(ctx, args, args.to)


def run_lower(ctx: Context, args: argparse.Namespace) -> int:
    return _run(ctx, args, None)


def run_show(ctx: Context, args: argparse.Namespace) -> int:
    t = dnsupdate.target_from(ctx.settings)
    now = dnsupdate.current(t)
    ctx.console.print(now.to_text() if now is not None else f"{t.name}: no MX records", markup=False)
    return 0
