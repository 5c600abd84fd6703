"""The subcommands of `fallback`, one module each; REGISTRY is their order in --help."""

from __future__ import annotations

from fallback.commands import (
    affected,
    alias,
    check,
    dns,
    export,
    failover,
    mailbox,
    provision,
    purge,
    queue,
    reconcile,
    smtp,
    status,
    up,
    web,
    worker,
)

REGISTRY = [
    up.register, smtp.register, web.register, worker.register,          # running the service
    provision.register, mailbox.register, alias.register, export.register, status.register,  # mailboxes
    queue.register, reconcile.register, purge.register,                 # the queues, after the outage
    failover.register, affected.register, dns.register, check.register,  # outage operations
]
