"""The mail log: one greppable line per event with the message id and outcome.

Lines are logfmt (`key=value`, values quoted when they hold spaces) on the
`fallback.mail` logger, so operators can grep a message id across every
process.  Events: received, rejected, queued, sent, deferred, bounced,
reconciled, failed, alert (needs an operator; the mail is kept).  Forwarded
mail carries route=forward (queued at intake, sent to the main system).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Protocol

LOGGER_NAME = "fallback.mail"


_ESCAPED = re.compile(r'[\\"\r\n]')
_QUOTED = re.compile(r"[\s=]")  # \s: exactly what str.isspace() calls whitespace


def _quote(value: Any) -> str:
    text = str(value)
    # The receiver logs several fields per message: the common clean value costs two scans.
    if _ESCAPED.search(text):
        text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "\\r").replace("\n", "\\n")
    if not text or _QUOTED.search(text):
        return f'"{text}"'
    return text


def format_event(event: str, **fields: Any) -> str:
    parts = [f"event={event}"]
    parts += [f"{k}={_quote(v)}" for k, v in fields.items() if v is not None]
    return " ".join(parts)


class EventSink(Protocol):
    """Something that counts events (fallback.ops.metrics.MailCounters): what is logged is counted."""

    def event(self, event: str, fields: Mapping[str, Any]) -> None: ...


class MailLog:
    def __init__(self, logger: logging.Logger | None = None, counters: EventSink | None = None) -> None:
        self.logger = logger or logging.getLogger(LOGGER_NAME)
        self.counters = counters

    def event(self, event: str, **fields: Any) -> None:
        if self.counters is not None:
            self.counters.event(event, fields)
        if self.logger.isEnabledFor(logging.INFO):  # the receiver calls this per recipient
            self.logger.info(format_event(event, **fields))
