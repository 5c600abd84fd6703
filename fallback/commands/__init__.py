"""The subcommands of `fallback`, one module each; REGISTRY is their order in --help."""

from __future__ import annotations

from fallback.commands import (
    affected,
    alias,
    audit,
    check,
    dns,
    export,
    failover,
    incident,
    mailbox,
    provision,
    purge,
    queue,
    reconcile,
    smtp,
    status,
    token,
    trace,
    up,
    watch,
    web,
    worker,
)

REGISTRY = [
    up.register, smtp.register, web.register, worker.register,          # running the service
    provision.register, mailbox.register, alias.register, export.register, status.register,  # mailboxes
    queue.register, reconcile.register, purge.register,                 # the queues, after the outage
    failover.register, affected.register, dns.register, check.register,  # outage operations
    incident.register,
    watch.register,                                                     # the mailstore watcher
    token.register, audit.register,                                     # reseller tokens, the audit log
    trace.register,                                                     # issue 16: the message trace
]
