"""Emergency fallback mailbox service.

The `fallback` package owns everything except the webmail UI: configuration,
the Redis schema, the SMTP receiver, provisioning, export, outbound delivery
and reconciliation.  `web/` builds on it; nothing here imports `web`.
"""

__version__ = "0.1.0"
