"""`fallback token create --domain D ... [--name NAME] [--expires DURATION]`, `fallback token list`
and `fallback token revoke NAME`: the reseller tokens of the admin API (fallback.ops.tokens)."""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from typing import Any

from rich.table import Table

from fallback.commands.context import Context, duration_option
from fallback.ops import audit, tokens


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("token", help="reseller tokens of the admin API: create, list, revoke")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", parents=[parents["common"]],
                                help="a new token that sees only these domains (printed once, last line)")
    create.add_argument("--domain", action="append", required=True, metavar="DOMAIN",
                        help="a domain the token may see (repeat for more)")
    create.add_argument("--name", metavar="NAME", help="unique name (default: first domain + random)")
    create.add_argument("--expires", metavar="DURATION", help="valid for this long (e.g. 30d); default: "
                        "until revoked")
    create.add_argument("--actor", metavar="NAME", help="who to name in the audit log")
    create.set_defaults(handler=create_token)
    ls = actions.add_parser("list", parents=[parents["common"]], help="every token (never the token itself)")
    ls.add_argument("--format", choices=("table", "json"), default="table")
    ls.set_defaults(handler=list_tokens)
    revoke = actions.add_parser("revoke", parents=[parents["common"]], help="the token stops working at once")
    revoke.add_argument("name", metavar="NAME")
    revoke.add_argument("--actor", metavar="NAME", help="who to name in the audit log")
    revoke.set_defaults(handler=revoke_token)


def when(ts: float | None, never: str = "never") -> str:
    if ts is None:
        return never
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def create_token(ctx: Context, args: argparse.Namespace) -> int:
    expires = duration_option(args.expires, "--expires")
    actor = audit.actor_name(args.actor)
    r = ctx.redis()
    token, rec = tokens.create(r, args.domain, args.name, expires, actor)
    audit.write(r, ctx.settings.audit_log, "token create", actor,
                {"name": rec.name, "domains": list(rec.domains), "expires": rec.expires},
                warn_as="fallback token")
    ctx.console.print(f"token {rec.name} for {', '.join(rec.domains)}, expires {when(rec.expires)}; "
                      "shown once (only its hash is kept):", markup=False, soft_wrap=True)
    print(token)  # alone on the last line: `fallback token create ... | tail -n 1`
    return 0


def list_tokens(ctx: Context, args: argparse.Namespace) -> int:
    found = tokens.listing(ctx.redis())
    now = time.time()
    if args.format == "json":
        print(json.dumps([{"name": t.name, "domains": list(t.domains), "created": t.created,
                           "expires": t.expires, "expired": t.expired(now), "last_used": t.last_used,
                           "creator": t.creator} for t in found], indent=1))
        return 0
    table = Table(title=f"reseller tokens: {len(found)}")
    for col in ("name", "domains", "created", "expires", "last used", "by"):
        table.add_column(col, overflow="fold")
    for t in found:
        expires = when(t.expires) + (" (expired)" if t.expired(now) else "")
        table.add_row(t.name, ", ".join(t.domains), when(t.created), expires, when(t.last_used, "-"),
                      t.creator)
    ctx.console.print(table)
    return 0


def revoke_token(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.redis()
    rec = tokens.revoke(r, args.name)
    audit.write(r, ctx.settings.audit_log, "token revoke", audit.actor_name(args.actor),
                {"name": rec.name, "domains": list(rec.domains)}, warn_as="fallback token")
    ctx.console.print(f"revoked token {rec.name} ({', '.join(rec.domains)}): refused from now on",
                      markup=False)
    return 0
