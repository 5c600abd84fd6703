"""The mail log's one vocabulary: every typed event writes the same keys in every process."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

from fallback.maillog import FIELDS, LOGGER_NAME, LineFormatter, MailLog


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def captured(name: str) -> Iterator[tuple[MailLog, list[str]]]:
    """A MailLog on its own logger, and the lines it wrote."""
    logger = logging.getLogger(f"{LOGGER_NAME}.{name}")
    logger.setLevel(logging.INFO)
    sink = Lines()
    logger.addHandler(sink)
    try:
        yield MailLog(logger), sink.lines
    finally:
        logger.removeHandler(sink)


def keys_of(line: str) -> list[str]:
    return re.findall(r'(?:^| )(\w+)=(?:"(?:[^"\\]|\\.)*"|\S*)', line)


def test_every_event_uses_from_and_to_and_only_the_declared_keys():
    with captured("test") as (log, lines):
        _every_event(log)
    assert len(lines) == 13
    a, b = "s@remote.test", "alice@example.com"
    for line in lines:
        names = keys_of(line)
        assert names[0] == "event"
        assert set(names[1:]) <= set(FIELDS), line
        assert "sender" not in names and "rcpt" not in names, line
    by_event: dict[str, str] = {}
    for line in lines:
        by_event.setdefault(line.split()[0], line)
    # Every message event names its recipient as to=, so one grep finds a message's whole life.
    for event in ("received", "queued", "rejected", "deferred", "forwarded", "reconciled"):
        assert f"to={b}" in by_event[f"event={event}"], event
    assert f"from={a}" in by_event["event=forwarded"] and f"from={b}" in by_event["event=sent"]
    assert by_event["event=login"].startswith("event=login user=alice@example.com ip=192.0.2.9")
    assert "event=login-failed" in by_event


def _every_event(log: MailLog) -> None:
    a, b = "s@remote.test", "alice@example.com"
    log.received("I1", a, b, size=10, peer="192.0.2.1", took="1.0ms")
    log.queued("I2", a, b, route="forward", size=10, peer="192.0.2.1")
    log.queued("I3", b, "x@remote.test", route="outbound", via="webmail")
    log.rejected("I4", a, b, outcome="550 5.1.1", reason="not provisioned", peer="192.0.2.1")
    log.sent("I5", b, "x@remote.test", reply="250 ok", peer="smarthost:25")
    log.deferred("I6", a, b, reason="temporary failure, retried", route="forward", retry_in=60.0)
    log.bounced("I7", b, "x@remote.test", reply="550 no such user")
    log.forwarded("I8", a, b, reply="250 ok", peer="mx:25")
    log.reconciled("I9", b, outcome="appended", folder="INBOX", uid=7)
    log.failed("I10", b, "x@remote.test", reason="refused", stage="outbound", notice="N1")
    log.alert("I11", b, reason="old", route="forward", age=3600)
    log.login(b, "192.0.2.9")
    log.login(b, "192.0.2.9", outcome="failed")


def test_the_null_sender_is_written_the_same_everywhere():
    with captured("null") as (log, lines):
        log.received("I1", "", "alice@example.com")
        log.forwarded("I2", "<>", "alice@example.com", reply="250 ok")
    assert len(lines) == 2 and all(" from=<> " in line for line in lines), lines


HOSTILE = ["a\nevent=forged", "b\r\n", "c\u2028d", "e\u2029f", "g\x85h", "i\x1cj\x1dk\x1el",
           "m\x0bn\x0co", "p\x00q", "\x1b[2J\x1b[31mred", 'say "hi"\\ there', "tab\there"]


def test_a_hostile_value_cannot_forge_a_line_a_field_or_drive_a_terminal():
    """Addresses and log-in names come from the Internet: every line separator any reader
    knows (str.splitlines), every control character and the quote are escaped."""
    with captured("hostile") as (log, lines):
        for value in HOSTILE:
            log.login(value, "192.0.2.7", outcome="failed", reason=value)
    assert len(lines) == len(HOSTILE)
    for line, value in zip(lines, HOSTILE, strict=True):
        assert line.splitlines() == [line]
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in line)
        assert keys_of(line) == ["event", "user", "ip", "reason"]
        # The value reads back: escapes undone give the original text.
        quoted = re.search(r' user=("(?:[^"\\]|\\.)*"|\S*)', line).group(1)
        inner = quoted[1:-1] if quoted.startswith('"') else quoted
        assert inner.encode().decode("unicode_escape") == value


def test_line_formatter_writes_what_loggings_formatter_writes() -> None:
    # LineFormatter keeps the date text of a second; each line must still read exactly as the
    # standard Formatter writes it, within a second, across seconds and back in time.
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    ours, standard = LineFormatter(fmt), logging.Formatter(fmt)
    for created in (1796155889.001, 1796155889.999, 1796155890.0, 1796155890.5, 1796155889.25,
                    1796159999.75, 0.0):
        record = logging.makeLogRecord({"msg": "event=received id=X", "levelname": "INFO",
                                        "name": LOGGER_NAME, "created": created,
                                        "msecs": (created - int(created)) * 1000})
        assert ours.format(record) == standard.format(record)
    record.created, record.msecs = 1796155889.5, 500.0
    assert ours.formatTime(record, "%H:%M") == standard.formatTime(record, "%H:%M")
