"""`fallback watch`: probe every mailstore each interval and alert on (or fail over) the sick ones.

The loop and its decisions are fallback.ops.watch; this module reads the
flags and the targets (--target, else the `watch_targets` setting: a TOML
table or NAME=URL,NAME=URL), checks them before the first probe (one line
and exit 1 for a bad one), and hands the watcher `failover start` itself:
the same code as `fallback failover start --mailstore NAME`, with the
watcher as the actor, the probe results as the reason and `--notify`
notices.  SIGTERM and SIGINT end it after the round in progress, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import ssl
from typing import Any

from fallback.commands import failover as failover_command
from fallback.commands.context import Context
from fallback.config.secretfiles import read_secret_file
from fallback.errors import ConfigError, InputError
from fallback.maillog import MailLog
from fallback.ops import metrics, probe, watch
from fallback.redisconn import async_client, resolve_url

HELP = "probe every mailstore's IMAP each interval; alert on (and with --auto-failover fail over) sick ones"


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("watch", parents=[parents["common"]], help=HELP, description=HELP)
    p.add_argument("--target", action="append", metavar="NAME=URL",
                   help=f"a mailstore to probe: {probe.TARGET_FORM} (repeatable; default: the "
                   "watch_targets setting)")
    p.add_argument("--master-user", dest="watch_master_user", metavar="USER",
                   help="Dovecot master user (FALLBACK_WATCH_MASTER_USER)")
    p.add_argument("--master-password-file", dest="watch_master_password_file", metavar="FILE",
                   help="file holding the master user's password")
    p.add_argument("--interval", dest="watch_interval", metavar="DURATION",
                   help="time between two probes of a mailstore (default 30s)")
    p.add_argument("--fail-after", dest="watch_fail_after", metavar="N",
                   help="failed probes in a row before the alert (and the failover) (default 3)")
    p.add_argument("--slow-after", dest="watch_slow_after", metavar="DURATION",
                   help="a probe slower than this fails (default 5s)")
    p.add_argument("--healthy-after", dest="watch_healthy_after", metavar="DURATION",
                   help="answering this long makes a failed-over mailstore 'look healthy again' "
                   "(default 10m)")
    p.add_argument("--auto-failover", dest="watch_auto_failover", action="store_true", default=None,
                   help="fail over a mailstore past --fail-after (default: alert only)")
    p.add_argument("--notify", action="store_true",
                   help="with a failover, send the affected users with an alternate address a notice")
    p.add_argument("--webmail-url", metavar="URL", help="the webmail URL the notices give "
                   "(FALLBACK_WEBMAIL_URL)")
    p.add_argument("--notice-sender", metavar="ADDR", help="From of the notices (FALLBACK_NOTICE_SENDER)")
    p.add_argument("--watcher-id", metavar="NAME", help="this watcher's name in the audit log and "
                   "/metrics (default HOST:PID)")
    p.add_argument("--imap-ca-file", metavar="PEM", help="CA bundle for imaps:// targets' certificates "
                   "(FALLBACK_IMAP_CA_FILE; default: the system's)")
    p.add_argument("--mail-log", metavar="FILE", help="mail log destination (default stderr)")
    p.set_defaults(handler=run)


def targets(ctx: Context, args: argparse.Namespace) -> list[probe.Target]:
    """From --target, else the setting; a mistake is an InputError/ConfigError naming it."""
    if args.target:
        found = [probe.parse_target(spec) for spec in args.target]
    else:
        raw = ctx.settings.watch_targets
        if isinstance(raw, dict):
            found = []
            for name, url in raw.items():
                if not isinstance(url, str):
                    raise ConfigError(f"watch_targets: {name} must be a URL string ({probe.TARGET_FORM})")
                found.append(probe.target_from_url(str(name), url.strip()))
        elif isinstance(raw, str) and raw.strip():
            found = [probe.parse_target(spec.strip()) for spec in raw.replace(" ", ",").split(",")
                     if spec.strip()]
        elif raw is None or raw == "":
            found = []
        else:
            raise ConfigError(f"watch_targets: expected a table of NAME = URL, got {raw!r}")
    if not found:
        raise InputError(f"no mailstore to watch: give --target {probe.TARGET_FORM} (or the "
                         "watch_targets setting)")
    names = [t.name for t in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"mailstore named by two targets: {', '.join(twice)}")
    return found


def _checked(ctx: Context, args: argparse.Namespace) -> tuple[list[probe.Target], str, str, watch.Policy]:
    s = ctx.settings
    found = targets(ctx, args)
    if not s.watch_master_user:
        raise InputError("--master-user is required (the Dovecot master user the probes log in through)")
    if s.watch_master_password_file is None:
        raise InputError("--master-password-file is required (the file holding the master password)")
    password = read_secret_file("--master-password-file", s.watch_master_password_file)
    if not password:
        raise InputError(f"--master-password-file: {s.watch_master_password_file} is empty")
    for name, value in (("--interval", s.watch_interval), ("--slow-after", s.watch_slow_after)):
        if value <= 0:
            raise InputError(f"{name}: must be more than 0 seconds")
    if s.watch_fail_after < 1:
        raise InputError("--fail-after: must be 1 or more")
    if s.watch_healthy_after < 0:
        raise InputError("--healthy-after: must be 0 or more")
    if args.notify and not s.webmail_url:
        raise InputError("--notify needs the webmail URL users should open: --webmail-url URL "
                         "(or FALLBACK_WEBMAIL_URL)")
    known = ctx.directory().mailstores()
    unknown = [t.name for t in found if t.name not in known]
    if unknown:  # a typo would watch a mailstore no user is on, and never protect the real one
        raise InputError(f"unknown mailstore(s): {', '.join(unknown)} (provisioned: "
                         f"{', '.join(sorted(known)) or 'none'})")
    policy = watch.Policy(interval=s.watch_interval, fail_after=s.watch_fail_after,
                          slow_after=s.watch_slow_after, healthy_after=s.watch_healthy_after,
                          auto_failover=s.watch_auto_failover)
    return found, s.watch_master_user, password, policy


def declarer(ctx: Context, args: argparse.Namespace, watcher_id: str) -> watch.Declare:
    """`fallback failover start --mailstore NAME` as the watcher (run in a thread by the loop)."""
    def declare(name: str, reason: str) -> None:
        given = argparse.Namespace(mailstore=[name], all=False, actor=f"watcher {watcher_id}",
                                   force=False, notify=args.notify, reason=reason)
        failover_command.run_start(ctx, given)
    return declare


def _tls(ctx: Context) -> ssl.SSLContext:
    """imaps:// targets are checked against the system's CAs, or imap_ca_file as reconcile does."""
    ca = ctx.settings.imap_ca_file
    try:
        return ssl.create_default_context(cafile=str(ca) if ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise InputError(f"--imap-ca-file: cannot use {ca}: {exc}") from None


def run(ctx: Context, args: argparse.Namespace) -> int:
    found, user, password, policy = _checked(ctx, args)
    tls = _tls(ctx)
    watcher_id = args.watcher_id or f"{socket.gethostname()}:{os.getpid()}"
    asyncio.run(_main(ctx, args, found, user, password, policy, watcher_id, tls))
    return 0


async def _main(ctx: Context, args: argparse.Namespace, found: list[probe.Target], user: str,
                password: str, policy: watch.Policy, watcher_id: str, tls: ssl.SSLContext) -> None:
    r = async_client(resolve_url(ctx.settings))
    counters = metrics.Counters(ctx.settings.metrics_flush_interval)
    maillog = MailLog(counters=metrics.MailCounters(counters))
    watcher = watch.Watcher(r, found, policy, master_user=user, master_password=password,
                            declare=declarer(ctx, args, watcher_id), maillog=maillog,
                            watcher_id=watcher_id, ssl_context=tls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    flusher = asyncio.create_task(counters.run_async(r))
    mode = "auto-failover" if policy.auto_failover else "alert only"
    ctx.err.print(f"fallback watch: {watcher_id} watching {', '.join(t.name for t in found)} every "
                  f"{policy.interval:g}s ({mode}, fail after {policy.fail_after}, slow after "
                  f"{policy.slow_after:g}s)", markup=False, soft_wrap=True)
    try:
        await watcher.run(stop)
    finally:
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await r.aclose()
