"""The subcommands of `fallback`, one module each; REGISTRY is their order in --help."""

from __future__ import annotations

from fallback.commands import export, mailbox, provision, purge, reconcile, status, up

REGISTRY = [up.register, provision.register, mailbox.register, export.register, status.register]
REGISTRY += [reconcile.register, purge.register]
from fallback.commands import queue, worker  # noqa: E402 - outbound delivery (issue 5)

REGISTRY += [worker.register, queue.register]
from fallback.commands import web  # noqa: E402 - the webmail alone (issue 3)

REGISTRY += [web.register]
from fallback.commands import affected, check, dns, failover, smtp  # noqa: E402 - operations (issue 6)

REGISTRY += [smtp.register, failover.register, affected.register, dns.register, check.register]
from fallback.commands import forward  # noqa: E402 - the forward queue (issue 6); extends `worker`

REGISTRY += [forward.register]
