"""The message trace: every mail-log event of a message, kept per message id in Redis.

A `TraceBuffer` is a mail-log sink (fallback.maillog.EventSink) that rides on a
process's metrics counters (fallback.ops.metrics.Counters takes one as `trace`):
events are kept in memory and written by the counters' flush loop: a few
Lua calls per flush, each appending to many records and address indexes (on a
Redis Cluster one call per hash slot's keys), since a command per message costs
the receiver more CPU than the rest of the trace together.  So intake pays no round trip per event,
and a trace write never delays or fails a 250: a failed write is logged and the
events are kept for the next flush (bounded); a process killed between two
flushes loses at most that interval's trace lines, never mail.

Keys (fallback/keys.py), each in its own cluster slot:

- `trace:{ID}`: a list of JSON lines, at most `cap` (64).  Past the cap the
  first `HEAD` events (how the message came in) and the newest stay; the ones
  between are replaced by one `{"e":"trimmed","n":N}` line.  It expires
  `trace_retention` after its last event.
- `trace:a:{ADDRESS}`: a zset of message ids by time of their last event from
  or to that address, the newest `ADDRESS_CAP` kept, expiring like the records.

`message()` and `recent()` return plain data (dicts and lists), for
`fallback trace` and the admin console alike.
"""

from __future__ import annotations

import json
import json.encoder
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from fallback import keys
from fallback.maillog import FIELDS
from fallback.redisconn import is_cluster

log = logging.getLogger(__name__)

CAP = 64             # lines per message
HEAD = 8             # of them, the first kept whatever follows
VALUE_CAP = 200      # characters of one field (a peer's reply, a reason)
ADDRESS_CAP = 1000   # messages per address in its index
BUFFER_CAP = 50_000  # events waiting for a flush; past it new ones are dropped (and said so)
TRIMMED = "trimmed"

# Which component wrote an event, when the buffer's owner did not say.
_COMPONENT = {"received": "intake", "rejected": "intake", "queued": "intake", "sent": "outbound",
              "bounced": "outbound", "forwarded": "forward", "reconciled": "reconcile",
              "purged": "purge"}
_NO_ADDRESS = ("", "-", "<>")

# One call writes many records and address indexes (KEYS: the records, then the indexes).
# ARGV: cap, head, ttl ms, address cap, number of records, a JSON array with, per record, its
# number of new lines and, per index, its flat [time, id, time, id...] (times as ZADD's score
# strings; one ZADD per 500 of them, not one per entry); and every record's new
# lines, in KEYS' order, each ended by "\n" (a JSON line never holds a raw newline: JSON
# escapes every control character).  Lines travel as they are, not escaped again inside one
# JSON document: that second encoding, and its decoding here, cost more than the rest.  A
# record past the cap keeps its first `head` lines; the lines after them go first, counted in
# one marker line at index `head` (LTRIM cannot cut the middle of a list: the victims are
# overwritten with a NUL and removed with LREM).  RPUSH goes in chunks: unpack() has a
# stack limit.
_WRITE = """
local cap, head, ttl, acap = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local nrec = tonumber(ARGV[5])
local data = cjson.decode(ARGV[6])
local blob, pos = ARGV[7], 1
for i = 1, #KEYS do
  local k, d = KEYS[i], data[i]
  if i <= nrec then
    local n, left = 0, d
    while left > 0 do
      local chunk = {}
      for j = 1, math.min(left, 500) do
        local e = string.find(blob, '\\n', pos, true)
        chunk[j] = string.sub(blob, pos, e - 1)
        pos = e + 1
      end
      left = left - #chunk
      n = redis.call('RPUSH', k, unpack(chunk))
    end
    if n > cap then
      local excess = n - cap
      local mark = redis.call('LINDEX', k, head)
      local dropped = 1
      if string.sub(mark, 1, 15) == '{"e":"trimmed",' then
        dropped = tonumber(string.match(mark, '"n":(%d+)'))
      end
      for j = 1, excess do redis.call('LSET', k, head + j, '\\0') end
      redis.call('LREM', k, excess, '\\0')
      redis.call('LSET', k, head, '{"e":"trimmed","n":' .. (dropped + excess) .. '}')
    end
  else
    for s = 1, #d, 1000 do redis.call('ZADD', k, unpack(d, s, math.min(s + 999, #d))) end
    redis.call('ZREMRANGEBYRANK', k, 0, -acap - 1)
  end
  redis.call('PEXPIRE', k, ttl)
end
return #KEYS
"""
BATCH_ITEMS = 20_000  # lines and index entries of one call, about: each call takes a few ms


_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_STR = json.encoder.encode_basestring  # the C function _JSON writes every string with
# '"name":' of the mail log's keys, written once: a trace line spells them the way _JSON does.
_KEYS = {k: _STR(k) + ":" for k in FIELDS}
_OWN = frozenset(("t", "c", "e"))  # a line's own keys: a field of that name goes the slow way


def _cut(value: Any) -> Any:
    if isinstance(value, (int, float)):
        return value
    text = str(value)
    return text if len(text) <= VALUE_CAP else text[:VALUE_CAP - 1] + "…"


def encode_slow(ts: float, component: str, event: str, fields: Mapping[str, Any]) -> str:
    """One trace line by the json library: what `encode` must spell byte for byte."""
    line: dict[str, Any] = {"t": round(ts, 3), "c": component, "e": event}
    for k, v in fields.items():
        if v is None or k == "id":
            continue
        line[k] = v if type(v) is str and len(v) <= VALUE_CAP else _cut(v)
    return _JSON(line)


def encode(ts: float, component: str, event: str, fields: Mapping[str, Any]) -> str:
    """One trace line: time, component, event, then the mail log's fields but the id."""
    return _encode(repr(round(ts, 3)), ts, component, event, fields)


def _encode(t: str, ts: float, component: str, event: str, fields: Mapping[str, Any]) -> str:
    """`encode` with the time already written (`t`: the flush writes it once per event, for
    the line and the address indexes' scores).

    The receiver's hot path: strings and ints (nearly every field) are written the way the
    json library writes them (its own C function for strings), at about half the cost of a
    JSONEncoder call per line; anything else is left to `encode_slow`."""
    parts = ['{"t":', t, ',"c":', _STR(component), ',"e":', _STR(event)]
    for k, v in fields.items():
        if v is None or k == "id":
            continue
        kind = type(v)
        if kind is str:
            value = _STR(v if len(v) <= VALUE_CAP else _cut(v))
        elif kind is int:
            value = int.__repr__(v)
        else:  # a float, a bool, anything else: rare, the library's way
            return encode_slow(ts, component, event, fields)
        name = _KEYS.get(k)
        if name is None:
            if k in _OWN or type(k) is not str:
                return encode_slow(ts, component, event, fields)
            name = _STR(k) + ":"
        parts += (",", name, value)
    parts.append("}")
    return "".join(parts)


class TraceBuffer:
    """A mail-log sink that keeps each message's events until the owner's flush writes them.

    `component` names the process (intake, outbound, forward, reconcile, webmail, purge);
    thread-safe (webmail threads share one)."""

    def __init__(self, retention: float, component: str | None = None, *, cap: int = CAP,
                 address_cap: int = ADDRESS_CAP, buffer_cap: int = BUFFER_CAP) -> None:
        self.ttl_ms = max(1, int(retention * 1000))
        self.component = component
        self.cap = cap
        self.address_cap = address_cap
        self.buffer_cap = buffer_cap
        self._lock = threading.Lock()
        self._events: list[tuple[float, str, Mapping[str, Any]]] = []
        self.dropped = 0  # events not kept since the last flush (buffer full)

    @classmethod
    def for_settings(cls, settings: Any, component: str) -> TraceBuffer | None:
        """The process's trace, or None when `trace_retention` is 0 (the trace is off)."""
        retention = float(getattr(settings, "trace_retention", 0) or 0)
        return cls(retention, component) if retention > 0 else None

    def event(self, event: str, fields: Mapping[str, Any]) -> None:
        msg_id = fields.get("id")
        if not msg_id or msg_id == "-":
            return  # log-ins, alerts about no message: not a message's life
        with self._lock:
            if len(self._events) >= self.buffer_cap:
                self.dropped += 1
                return
            self._events.append((time.time(), event, fields))

    def pending(self) -> int:
        with self._lock:
            return len(self._events)

    def _take(self) -> list[tuple[float, str, Mapping[str, Any]]]:
        with self._lock:
            events, self._events = self._events, []
            if self.dropped:
                log.warning("trace: %d events not kept (more than %d waited for a flush)",
                            self.dropped, self.buffer_cap)
                self.dropped = 0
        return events

    def _give_back(self, events: list[tuple[float, str, Mapping[str, Any]]]) -> None:
        with self._lock:
            room = max(0, self.buffer_cap - len(self._events))
            self.dropped += max(0, len(events) - room)
            self._events[:0] = events[:room]

    def _calls(self, events: list[tuple[float, str, Mapping[str, Any]]],
               clustered: bool) -> list[list[Any]]:
        """The EVAL calls that write `events`: few and large on one Redis; on a Cluster one
        per hash slot's keys (each record and index has its own tag)."""
        lines: dict[str, list[str]] = {}
        seen: dict[str, dict[str, str]] = {}
        own = self.component
        for ts, event, fields in events:  # per event: the receiver's hot path, kept plain
            msg_id = fields["id"]
            if type(msg_id) is not str:
                msg_id = str(msg_id)
            t = repr(round(ts, 3))  # the line's time and the indexes' score, written once
            line = _encode(t, ts, own if own is not None else _COMPONENT.get(event, "-"), event, fields)
            record = lines.get(msg_id)
            if record is None:
                lines[msg_id] = [line]
            else:
                record.append(line)
            for who in (fields.get("from"), fields.get("to")):
                if who is not None:
                    text = who if type(who) is str else str(who)
                    if text not in _NO_ADDRESS:
                        seen.setdefault(text.lower(), {})[msg_id] = t
        items: list[tuple[str, bool, list[Any]]] = [(keys.trace(i), True, b) for i, b in lines.items()]
        items += [(keys.trace_address(a), False, [x for i, t in ids.items() for x in (t, i)])
                  for a, ids in seen.items()]
        groups: dict[int, list[tuple[str, bool, list[Any]]]] = {}
        for item in items:
            groups.setdefault(key_slot(item[0].encode()) if clustered else 0, []).append(item)
        calls = []
        for group in groups.values():
            batch: list[tuple[str, bool, list[Any]]] = []
            size = 0
            for item in [*(g for g in group if g[1]), *(g for g in group if not g[1])]:
                batch.append(item)
                size += len(item[2])
                if size >= BATCH_ITEMS:
                    calls.append(self._call(batch))
                    batch, size = [], 0
            if batch:
                calls.append(self._call(batch))
        return calls

    def _call(self, batch: list[tuple[str, bool, list[Any]]]) -> list[Any]:
        records = [args for _, is_record, args in batch if is_record]
        counts = [len(b) for b in records] + [args for _, is_record, args in batch if not is_record]
        lines = [line for b in records for line in b]
        blob = "\n".join(lines) + "\n" if lines else ""
        return ["EVAL", _WRITE, len(batch), *(k for k, _, _ in batch), self.cap, HEAD, self.ttl_ms,
                self.address_cap, len(records), _JSON(counts), blob]

    def flush(self, r: redis.Redis) -> None:
        """Write what waits; on a Redis error it is logged and kept for the next flush."""
        events = self._take()
        if not events:
            return
        try:
            with r.pipeline(transaction=False) as pipe:
                for call in self._calls(events, is_cluster(r)):
                    # EVAL by hand: redis-py refuses script objects in a cluster pipeline.
                    pipe.execute_command(*call)
                pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self._give_back(events)
            log.warning("trace: %d events not written (kept for the next flush): %s", len(events), exc)

    async def flush_async(self, r: aioredis.Redis) -> None:
        events = self._take()
        if not events:
            return
        try:
            async with r.pipeline(transaction=False) as pipe:
                for call in self._calls(events, is_cluster(r)):
                    pipe.execute_command(*call)
                await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self._give_back(events)
            log.warning("trace: %d events not written (kept for the next flush): %s", len(events), exc)


# --- reading: plain data for the CLI and the console -----------------------------------------

def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def decode(line: Any) -> dict[str, Any]:
    """A trace line as a dict (time, component, event, and the mail log's fields); a line that
    is not JSON (never written by us) comes back as its text, under `detail`."""
    try:
        raw = json.loads(_text(line))
    except ValueError:
        raw = None
    if not isinstance(raw, dict):
        return {"time": None, "component": "-", "event": "unreadable", "detail": _text(line)}
    out: dict[str, Any] = {"time": raw.pop("t", None), "component": raw.pop("c", "-"),
                           "event": raw.pop("e", "-")}
    if out["event"] == TRIMMED:
        out["dropped"] = raw.pop("n", 0)
    out.update(raw)
    return out


def message(r: redis.Redis, msg_id: str) -> list[dict[str, Any]] | None:
    """Every kept event of `msg_id`, oldest first; None when there is no trace of it.

    Each process appends at its own flush, so the list's order is not the events' order:
    they are sorted by their time (a marker of dropped events keeps its place after the
    event before it)."""
    lines: Any = r.lrange(keys.trace(msg_id), 0, -1)
    if not lines:
        return None
    events = [decode(x) for x in lines]
    order, last = [], 0.0
    for e in events:
        last = e["time"] if isinstance(e["time"], (int, float)) else last
        order.append(last)
    return [e for _, _, e in sorted(zip(order, range(len(events)), events, strict=True),
                                    key=lambda x: (x[0], x[1]))]


def ttl(r: redis.Redis, msg_id: str) -> int | None:
    """Seconds until the trace of `msg_id` expires (None: no trace)."""
    left = int(r.ttl(keys.trace(msg_id)))
    return left if left >= 0 else None


def recent(r: redis.Redis, address: str, since: float | None = None, limit: int = 100,
           now: float | None = None) -> list[dict[str, Any]]:
    """The newest `limit` messages from or to `address` (in the last `since` seconds), newest
    first: id, time of the last event, sender, recipients, and the last event (its state)."""
    low = "-inf" if since is None else (now if now is not None else time.time()) - since
    found: Any = r.zrevrangebyscore(keys.trace_address(address.lower()), "+inf", low, start=0,
                                    num=limit, withscores=True)
    if not found:
        return []
    pipe = r.pipeline(transaction=False)
    for member, _ in found:
        pipe.lrange(keys.trace(_text(member)), 0, -1)
    records = pipe.execute()
    out = []
    for (member, score), lines in zip(found, records, strict=True):
        events = [decode(x) for x in lines or []]
        if not events:
            continue  # the record expired before its index entry
        real = [e for e in events if e["event"] != TRIMMED]
        rcpts = sorted({str(e["to"]) for e in real if e.get("to") not in (None, "-")})
        sender = next((str(e["from"]) for e in real if e.get("from") is not None), None)
        # Its state for this address: the last event about it as a recipient, else the last.
        mine = [e for e in real if str(e.get("to", "")).lower() == address.lower()] or real or events
        out.append({"id": _text(member), "time": float(score), "from": sender, "to": rcpts,
                    "last": mine[-1], "events": len(events)})
    return out
