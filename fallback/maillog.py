"""The mail log: one greppable line per event of a message's life, in one vocabulary.

Lines are logfmt (`key=value`, values quoted when they hold spaces) on the
`fallback.mail` logger, so operators can grep a message id, a sender or a
recipient across every process.  The vocabulary is fixed here: each event
has a typed method, and every process writes the same keys
(docs/architecture.md, "The mail log"):

    event  id  from  to  size  outcome  peer  route  via  reply  reason  took ...

`from=` is always the envelope sender and `to=` always one recipient (or the
mailbox a line is about), so `grep to=alice@example.com` finds every line of
every message for Alice, whichever process wrote it.  Events: received,
rejected, queued, sent, deferred, bounced, forwarded, reconciled, purged, failed,
alert (needs an operator; the mail is kept), login, login-failed,
login-refused.
"""

from __future__ import annotations

import errno
import logging
import logging.handlers
import re
import socket
import time
from collections.abc import Mapping
from typing import Any, Protocol

LOGGER_NAME = "fallback.mail"

# Every key a line may carry, in the order they are written.
FIELDS = ("id", "from", "to", "size", "outcome", "peer", "route", "via", "reply", "stage", "reason",
          "took", "uid", "folder", "user", "ip", "age", "attempts", "retry_in", "notice",
          "fixed_line_ends")

# What a field may not carry as it is: the quote and backslash, and every character that
# ends a line for some reader (str.splitlines: \x1c-\x1e, \x85, U+2028/9) or drives an
# operator's terminal (ESC and the other controls).  Values come from senders and
# log-in forms: a hostile one must not forge a line or a field.
_ESCAPED = re.compile(r'[\\"\x00-\x1f\x7f-\x9f\u2028\u2029]')
_NAMED = {"\\": "\\\\", '"': '\\"', "\r": "\\r", "\n": "\\n", "\t": "\\t"}
_QUOTED = re.compile(r"[\s=]")  # \s: exactly what str.isspace() calls whitespace
# Either of those: a line none of whose values holds one is written as it is, in one scan.
_SPECIAL = re.compile(r'[\\"\x00-\x1f\x7f-\x9f\u2028\u2029\s=]')


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def _quote(value: Any) -> str:
    text = str(value)
    # The receiver logs several fields per message: the common clean value costs two scans.
    if _ESCAPED.search(text):
        text = _ESCAPED.sub(_escape, text)
    if not text or _QUOTED.search(text):
        return f'"{text}"'
    return text


def format_event(event: str, **fields: Any) -> str:
    texts = {k: str(v) for k, v in fields.items() if v is not None}
    # The receiver writes a line per message: most lines have no value to quote or escape.
    plain = all(texts.values()) and not _SPECIAL.search("".join(texts.values()))
    return " ".join([f"event={event}", *(f"{k}={v if plain else _quote(v)}" for k, v in texts.items())])


class EventSink(Protocol):
    """Something that counts events (fallback.ops.metrics.MailCounters): what is logged is counted."""

    def event(self, event: str, fields: Mapping[str, Any]) -> None: ...


def _sender(value: str | None) -> str | None:
    # aiosmtpd spells the null sender (MAIL FROM:<>) "<>"; the log spells it the same everywhere.
    return "<>" if value == "" else value


class MailLog:
    """The typed events.  `sender` is written as `from=`, `rcpt` as `to=`, in every process."""

    def __init__(self, logger: logging.Logger | None = None, counters: EventSink | None = None) -> None:
        self.logger = logger or logging.getLogger(LOGGER_NAME)
        self.counters = counters

    def _emit(self, event: str, msg_id: str | None, sender: str | None, rcpt: str | None,
              **extra: Any) -> None:
        fields: dict[str, Any] = {"id": msg_id, "from": _sender(sender), "to": rcpt, **extra}
        if self.counters is not None:
            self.counters.event(event, fields)
        if self.logger.isEnabledFor(logging.INFO):  # the receiver calls this per recipient
            self.logger.info(format_event(event, **fields))

    # --- intake ---------------------------------------------------------------------------

    def received(self, msg_id: str, sender: str | None, rcpt: str, *, size: int | None = None,
                 peer: str | None = None, via: str | None = None, took: str | None = None,
                 fixed_line_ends: bool = False) -> None:
        """Stored in a fallback mailbox (outcome 250 for SMTP)."""
        self._emit("received", msg_id, sender, rcpt, size=size, outcome="250" if via is None else None,
                   peer=peer, route="mailbox", via=via, took=took,
                   fixed_line_ends="yes" if fixed_line_ends else None)

    def queued(self, msg_id: str, sender: str | None, rcpt: str, *, route: str,
               size: int | None = None, peer: str | None = None, via: str | None = None,
               took: str | None = None, fixed_line_ends: bool = False) -> None:
        """Accepted for a queue: route=forward (the main system) or route=outbound (the smarthost)."""
        self._emit("queued", msg_id, sender, rcpt, size=size, outcome="250" if via is None else None,
                   peer=peer, route=route, via=via, took=took,
                   fixed_line_ends="yes" if fixed_line_ends else None)

    def rejected(self, msg_id: str | None, sender: str | None, rcpt: str, *, outcome: str,
                 reason: str, peer: str | None = None) -> None:
        """Refused at the perimeter with `outcome` ("550 5.1.1"); nothing was accepted."""
        self._emit("rejected", msg_id, sender, rcpt, outcome=outcome, peer=peer, reason=reason)

    # --- delivery -------------------------------------------------------------------------

    def sent(self, msg_id: str, sender: str | None, rcpt: str, *, reply: str, peer: str | None = None,
             attempts: int | None = None) -> None:
        """The smarthost (`peer`) took mail sent from the webmail with 2xx."""
        self._emit("sent", msg_id, sender, rcpt, peer=peer, route="outbound", reply=reply,
                   attempts=attempts)

    def deferred(self, msg_id: str, sender: str | None, rcpt: str, *, reason: str,
                 outcome: str | None = None, route: str | None = None, reply: str | None = None,
                 size: int | None = None, peer: str | None = None, attempts: int | None = None,
                 retry_in: float | None = None) -> None:
        """Not done yet, will be retried (a 451 to an SMTP client, or a retry scheduled)."""
        self._emit("deferred", msg_id, sender, rcpt, size=size, outcome=outcome, peer=peer, route=route,
                   reply=reply, reason=reason, attempts=attempts, retry_in=retry_in)

    def bounced(self, msg_id: str, sender: str | None, rcpt: str, *, reply: str) -> None:
        """The smarthost refused it for good; the sender gets a notice (DSN)."""
        self._emit("bounced", msg_id, sender, rcpt, route="outbound", reply=reply)

    def forwarded(self, msg_id: str, sender: str | None, rcpt: str, *, reply: str, peer: str | None = None,
                  attempts: int | None = None) -> None:
        """Handed on to the main system's next hop (`peer`; the forward queue's 2xx)."""
        self._emit("forwarded", msg_id, sender, rcpt, peer=peer, route="forward", reply=reply,
                   attempts=attempts)

    def reconciled(self, msg_id: str, rcpt: str, *, outcome: str, folder: str | None = None,
                   uid: int | None = None) -> None:
        """Carried into the main store: outcome appended, updated or already-present."""
        self._emit("reconciled", msg_id, None, rcpt, outcome=outcome, folder=folder, uid=uid)

    def purged(self, msg_id: str, rcpt: str) -> None:
        """Deleted from the fallback (`fallback purge`) after reconcile carried it over."""
        self._emit("purged", msg_id, None, rcpt)

    def failed(self, msg_id: str | None, sender: str | None, rcpt: str | None, *, reason: str,
               stage: str | None = None, via: str | None = None, notice: str | None = None,
               outcome: str | None = None) -> None:
        """Gave up on this step (a dead letter, a reconcile failure); the mail itself is kept.
        `notice`: the id of the DSN put in the sender's INBOX; `outcome`: dead-letter when a
        queue parked the message for an operator."""
        self._emit("failed", msg_id, sender, rcpt, outcome=outcome, stage=stage, via=via, reason=reason,
                   notice=notice)

    def alert(self, msg_id: str | None, rcpt: str | None, *, reason: str, route: str | None = None,
              reply: str | None = None, age: int | None = None) -> None:
        """Needs an operator; nothing is dropped."""
        self._emit("alert", msg_id, None, rcpt, route=route, reply=reply, age=age, reason=reason)

    # --- webmail --------------------------------------------------------------------------

    def login(self, user: str, ip: str, *, outcome: str = "ok", reason: str | None = None) -> None:
        """A webmail log-in: outcome ok, failed (wrong address or password) or refused."""
        event = {"ok": "login", "failed": "login-failed"}.get(outcome, "login-refused")
        self._emit(event, None, None, None, user=user, ip=ip, reason=reason)



# --- where the lines go (the mail_log setting) ---------------------------------------------

class LineFormatter(logging.Formatter):
    """logging's Formatter, the date text of its default format made once a second: the
    receiver writes a line per message, and localtime with strftime was a tenth of its cost."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second, text = self._second
        if int(record.created) != second:
            text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (int(record.created), text)
        msec = self.default_msec_format
        return text if msec is None else msec % (text, record.msecs)


SYSLOG_SOCKET = "/dev/log"
SYSLOG_IDENT = "fallback"  # as Postfix operators grep it: grep fallback /var/log/mail.log
SYSLOG_HELP = ("-/stderr (the default; under systemd that is the journal), syslog, "
               "syslog:/path/to/socket, syslog:HOST:PORT (UDP) or a file path")


def syslog_address(destination: str) -> str | tuple[str, int] | None:
    """Where `mail_log` sends the lines to syslog: a Unix socket path, (host, UDP port), or
    None when it is not a syslog destination.  ValueError names what is wrong."""
    if destination != "syslog" and not destination.startswith("syslog:"):
        return None
    where = destination.partition(":")[2]
    if not where:
        return SYSLOG_SOCKET if destination == "syslog" else _bad(destination, "names no socket or HOST:PORT")
    if where.startswith("/"):
        return where
    host, sep, port = where.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return _bad(destination, "must be syslog:/path/to/socket or syslog:HOST:PORT (a UDP port 1-65535)")
    return host, int(port)


def _bad(destination: str, why: str) -> str:
    raise ValueError(f"{destination!r} {why}; the mail log goes to {SYSLOG_HELP}")


def check_destination(destination: str) -> None:
    """ValueError (one line) when `mail_log` cannot be a destination; nothing is opened."""
    if destination == "journald":
        raise ValueError("'journald' is not a destination of its own: under systemd the default (stderr) "
                         "already goes to the journal, tagged by the unit's SyslogIdentifier "
                         "(journalctl -t fallback); or use syslog")
    if destination in ("", "-", "stderr"):
        return
    syslog_address(destination)


def handler(destination: str) -> logging.Handler | None:
    """The handler of the `fallback.mail` logger for `mail_log`; None: stderr, with the other logs.

    syslog: facility mail, tag fallback[PID], the logfmt line as the message (RFC 3164, as
    the local syslog daemon expects), so it lands in /var/log/mail.log beside Postfix's lines.
    OSError when the socket or file cannot be opened."""
    check_destination(destination)
    if destination in ("", "-", "stderr"):
        return None
    address = syslog_address(destination)
    if address is None:
        out: logging.Handler = logging.FileHandler(destination)
        out.setFormatter(LineFormatter("%(asctime)s %(message)s"))
        return out
    kind = socket.SOCK_DGRAM if isinstance(address, tuple) else None
    if isinstance(address, str):
        # SysLogHandler, like openlog(3), would start without its socket and drop every line
        # until it appears: a mistyped path must stop the start instead.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect(address)
            except OSError as exc:
                if exc.errno != errno.EPROTOTYPE:  # a stream socket (some syslog daemons): fine
                    raise
    syslog = logging.handlers.SysLogHandler(address, facility=logging.handlers.SysLogHandler.LOG_MAIL,
                                            socktype=kind)
    syslog.append_nul = False  # a line as Postfix writes it; syslog daemons do not need the NUL
    # The PID of the process that writes (gunicorn forks its workers after this is made).
    syslog.setFormatter(logging.Formatter(SYSLOG_IDENT + "[%(process)d]: %(message)s"))
    return syslog
