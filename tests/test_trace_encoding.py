"""The trace's fast paths (fallback/ops/trace.py) against the library's way, on real data.

A trace line is written by `trace.encode` (strings and ints spelled as the json
library spells them) and travels to Redis with the other lines of a flush as
they are, one per "\\n".  Each must give what `encode_slow` (one JSONEncoder
call) gives, byte for byte, for every event the mail log writes, hostile
values included; and every line of a flush must land in its own record, in
order, across the chunks of one record and the calls of one flush.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import redis

from fallback import keys
from fallback.maillog import MailLog
from fallback.ops import trace
from fallback.ops.trace import TraceBuffer

ALICE = "alice@example.com"
# What senders and peers put in fields: quotes, backslashes, line ends of every kind,
# controls, non-ASCII, astral characters, and strings at the field cap and one past it.
HOSTILE = ['plain', 'a "quoted" \\ value', "two\r\nlines\tand\x00nul\x1b[31m", "\u2028\u2029\x85\x7f",
           "Grüße, 日本語, \U0001f4e7", "", " ", "x" * trace.VALUE_CAP, "é" * (trace.VALUE_CAP + 1),
           "}\n{\"t\":1}", "550 5.1.1 <bob@example.com>: Recipient address rejected"]


class Recorder:
    """A mail-log sink keeping each event's fields as the trace is given them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Mapping[str, Any]]] = []

    def event(self, event: str, fields: Mapping[str, Any]) -> None:
        self.events.append((event, dict(fields)))


def every_event(value: str, n: int) -> list[tuple[str, Mapping[str, Any]]]:
    """Every typed event of the mail log, with `value` in each free-text field."""
    rec = Recorder()
    log = MailLog(counters=rec)
    msg = f"01JDX{n:021d}"
    log.received(msg, value, ALICE, size=4300 + n, peer="127.0.0.2", took="0.004", fixed_line_ends=True)
    log.received(msg, "", ALICE, size=1, via="webmail")  # the null sender
    log.queued(msg, value, f"bob{n}@example.com", route="forward", size=n, peer="::1")
    log.rejected(msg, value, "nobody@example.com", outcome="550 5.1.1", reason=value, peer="127.0.0.3")
    log.sent(msg, ALICE, value, reply=value, peer="smarthost.test:25", attempts=n)
    log.deferred(msg, ALICE, "x@remote.test", reason=value, reply=value, attempts=3, retry_in=12.5,
                 route="outbound", size=0)
    log.bounced(msg, ALICE, "x@remote.test", reply=value)
    log.forwarded(msg, value, ALICE, reply="250 2.0.0 Ok", peer="mx.test", attempts=1)
    log.reconciled(msg, ALICE, outcome="appended", folder=value, uid=2 ** 40 + n)
    log.purged(msg, ALICE)
    log.failed(msg, value, ALICE, reason=value, stage="outbound", notice=msg, outcome="dead-letter")
    log.alert(msg, ALICE, reason=value, route="forward", reply=value, age=-n)
    return rec.events


def test_every_mail_log_event_is_encoded_as_the_library_encodes_it() -> None:
    ts = time.time()
    count = 0
    for n, value in enumerate(HOSTILE):
        for event, fields in every_event(value, n):
            for component in ("intake", "outbound", "wébmail"):
                fast = trace.encode(ts + n / 7, component, event, fields)
                assert fast == trace.encode_slow(ts + n / 7, component, event, fields), (event, fields)
                assert "\n" not in fast  # what lets a flush send lines one per "\n"
                count += 1
    assert count == len(HOSTILE) * 12 * 3
    # What an event reads back as: the fields but the id, capped, types kept.
    fields = {"id": "M", "from": "é" * (trace.VALUE_CAP + 1), "size": 7, "uid": 2 ** 40, "x": None}
    assert json.loads(trace.encode(1.0, "intake", "received", fields)) == {
        "t": 1.0, "c": "intake", "e": "received", "from": "é" * (trace.VALUE_CAP - 1) + "…",
        "size": 7, "uid": 2 ** 40}


def test_fields_the_fast_path_leaves_to_the_library_are_spelled_the_same() -> None:
    cases: list[dict[str, Any]] = [
        {"id": "M", "ok": True, "no": False}, {"id": "M", "retry_in": 0.1}, {"id": "M", "n": 1e300},
        {"id": "M", "e": "a field named like the event key"}, {"id": "M", "t": 5, "c": "x"},
        {"id": "M", "unknown_key": "v", "ключ": "значение"}, {"id": "M", "obj": ("a", 1)},
        {"id": "M", "path": b"bytes".decode(), "big": 10 ** 30, "neg": -1},
    ]
    for fields in cases:
        line = trace.encode(1733068800.123456, "forward", "deferred", fields)
        assert line == trace.encode_slow(1733068800.123456, "forward", "deferred", fields), fields
        assert json.loads(line)["t"] == (1733068800.123 if "t" not in fields else 5)


def stored(r: redis.Redis, msg_id: str) -> list[str]:
    lines: Any = r.lrange(keys.trace(msg_id), 0, -1)
    return [x.decode() for x in lines]


def test_a_flush_puts_each_line_in_its_record_byte_for_byte(r: redis.Redis) -> None:
    buf = TraceBuffer(3600, "intake", cap=2000)
    want: dict[str, list[str]] = {}
    clock = 1733068800.0
    # One record of 1,201 lines in one flush: three RPUSH chunks of 500 at most, the last short.
    for i in range(1201):
        line = {"id": "LONG", "from": HOSTILE[i % len(HOSTILE)], "to": ALICE, "attempts": i}
        buf._events.append((clock + i, "deferred", line))
        want.setdefault("LONG", []).append(trace.encode_slow(clock + i, "intake", "deferred", line))
    for n, value in enumerate(HOSTILE):  # and short records between, hostile values everywhere
        for event, fields in every_event(value, n):
            buf._events.append((clock, event, fields))
            want.setdefault(str(fields["id"]), []).append(trace.encode_slow(clock, "intake", event, fields))
    buf.flush(r)
    assert buf.pending() == 0
    for msg_id, lines in want.items():
        assert stored(r, msg_id) == lines, msg_id
    assert r.zscore(keys.trace_address(ALICE), "LONG") == clock + 1200


def test_a_flush_larger_than_one_call_loses_no_line(r: redis.Redis) -> None:
    """trace.BATCH_ITEMS lines per call: a flush at it is one call, one past it two."""
    buf = TraceBuffer(3600, "intake")
    for total, calls in ((trace.BATCH_ITEMS, 1), (trace.BATCH_ITEMS + 1, 2)):
        r.flushall()
        for i in range(total):  # no address to index (a null sender, no recipient): lines only
            buf.event("rejected", {"id": f"C{i:06d}", "from": "<>", "to": "-", "outcome": "421"})
        assert len(buf._calls(list(buf._events), clustered=False)) == calls
        buf.flush(r)
        assert buf.pending() == 0
        assert sum(1 for _ in r.scan_iter(match="trace:{*", count=5000)) == total
        for i in (0, trace.BATCH_ITEMS - 1, total - 1):
            [line] = stored(r, f"C{i:06d}")
            assert json.loads(line)["e"] == "rejected" and json.loads(line)["outcome"] == "421"
