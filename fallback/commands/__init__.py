"""The subcommands of `fallback`, one module each; REGISTRY is their order in --help."""

from __future__ import annotations

from fallback.commands import export, mailbox, provision, status, up

REGISTRY = [up.register, provision.register, mailbox.register, export.register, status.register]
