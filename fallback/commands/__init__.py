"""The subcommands of `fallback`, one module each, named as its command; COMMANDS is their order in --help.

A command's module is imported only when that command runs (all of them for --help or a
mistyped command): `fallback reconcile` at the end of an outage, or a cron's `fallback check`,
need not load the LDAP, DNS and web libraries first (docs/performance.md, "Issue 17: reconcile").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

COMMANDS = (
    "up", "smtp", "web", "worker",                                   # running the service
    "provision", "mailbox", "alias", "export", "status",             # mailboxes
    "queue", "reconcile", "purge",                                   # the queues, after the outage
    "failover", "affected", "dns", "check", "incident",              # outage operations
    "watch",                                                         # the mailstore watcher
    "token", "audit", "trace",                                       # resellers, the audit log, the trace
)


def registrar(command: str) -> Callable[..., Any]:
    """The `register(subparsers, parents)` of one command's module."""
    register: Callable[..., Any] = importlib.import_module(f"fallback.commands.{command}").register
    return register
