"""`fallback incident set TEXT | clear | show`: the live incident text users see.

The text appears at once (within the webmail's couple of seconds of caching)
on the banner of every webmail page, the login page and the public /status
page; without a live text those show the `incident_message` setting.  Every
change is written to the audit log with the actor (fallback.ops.audit).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from fallback.commands.context import Context
from fallback.ops import audit, incident


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("incident", help="set, clear or show the incident text users see in the webmail")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = actions.add_parser("set", parents=[parents["common"]], help="show this text to users now",
                           description="Show TEXT on the webmail's banner, login page and /status page "
                           f"(plain text, one line, at most {incident.MAX_LENGTH} characters).")
    s.add_argument("text", metavar="TEXT")
    c = actions.add_parser("clear", parents=[parents["common"]],
                           help="remove the live text (the incident_message setting is shown again)")
    for a in (s, c):
        a.add_argument("--actor", metavar="NAME", help="who to name in the audit log "
                       "(default $SUDO_USER, else $USER)")
    s.set_defaults(handler=run_set)
    c.set_defaults(handler=run_clear)
    w = actions.add_parser("show", parents=[parents["common"]], help="print what users see now")
    w.add_argument("--format", choices=("text", "json"), default="text")
    w.set_defaults(handler=run_show)


def _audit(ctx: Context, args: argparse.Namespace, action: str, given: dict[str, object],
           outcome: str) -> None:
    entry = audit.Entry(action=action, actor=audit.actor_name(args.actor), args=given, outcome=outcome)
    for problem in audit.record(ctx.redis(), entry, ctx.settings.audit_log):
        print(f"fallback incident: warning: {problem}", file=sys.stderr)


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def run_set(ctx: Context, args: argparse.Namespace) -> int:
    text = incident.check_text(args.text)   # refused before anything is written or audited
    actor = audit.actor_name(args.actor)
    incident.set_text(ctx.redis(), text, actor)
    _audit(ctx, args, "incident set", {"text": text}, "ok")
    ctx.console.print(f"incident text set; users see it within {incident.CACHE_TTL:g} seconds: {text}",
                      markup=False, soft_wrap=True)
    return 0


def run_clear(ctx: Context, args: argparse.Namespace) -> int:
    before = incident.clear(ctx.redis())
    _audit(ctx, args, "incident clear", {"text": before.text if before else None},
           "ok" if before else "ok: no live text was set")
    ctx.console.print("incident text cleared; users see the configured incident_message again"
                      if before else "no live incident text was set; nothing changed", markup=False)
    return 0


def run_show(ctx: Context, args: argparse.Namespace) -> int:
    live = incident.read(ctx.redis())
    if args.format == "json":
        print(json.dumps({"live": live.as_dict() if live else None,
                          "shown": live.text if live else ctx.settings.incident_message}, indent=2))
        return 0
    if live is None:
        ctx.console.print(f"no live text; users see the incident_message setting: "
                          f"{ctx.settings.incident_message}", markup=False, soft_wrap=True)
    else:
        ctx.console.print(f"{live.text}\n(set {_when(live.since)} by {live.actor})", markup=False,
                          soft_wrap=True)
    return 0
