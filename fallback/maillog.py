"""The mail log: one greppable line per event with the message id and outcome.

Lines are logfmt (`key=value`, values quoted when they hold spaces) on the
`fallback.mail` logger, so operators can grep a message id across every
process.  Events: received, rejected, queued, sent, deferred, bounced,
reconciled, failed.
"""

from __future__ import annotations

import logging
from typing import Any

LOGGER_NAME = "fallback.mail"


def _quote(value: Any) -> str:
    text = str(value)
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "\\r").replace("\n", "\\n")
    if not text or any(ch.isspace() or ch == "=" for ch in text):
        return f'"{text}"'
    return text


def format_event(event: str, **fields: Any) -> str:
    parts = [f"event={event}"]
    parts += [f"{k}={_quote(v)}" for k, v in fields.items() if v is not None]
    return " ".join(parts)


class MailLog:
    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(LOGGER_NAME)

    def event(self, event: str, **fields: Any) -> None:
        if self.logger.isEnabledFor(logging.INFO):  # the receiver calls this per recipient
            self.logger.info(format_event(event, **fields))
