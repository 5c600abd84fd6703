"""The message record's layout: writing it, and reading every layout back.

Layout 1 (before issue 17): `raw` as received, `v`="1", and one hash field per
display and threading value (fields.PARSED), `rstate`="pending" from the start.
Layout 2: `raw` as compression.py stores it (zstd when that saves), the
display and threading values packed into one field `m` (fields.PACKED, NUL
separated, its first value the layout version), `rstate` written only once
reconcile touches the message (absent means pending), `flags` only once there
are flags, `kind` only when not "received", no `v` field.  Fewer
fields keep the hash small: each field of a Redis hash table costs about 48
bytes before its value.  Every reader of a record's display values or bytes goes
through `decode`/`raw_of` here, so a record stored by an older release reads
the same as a new one.  The fields that Lua scripts read one by one (ts,
size, kind, folder, flags, rstate) keep their own fields in every layout.
Layout 3: layout 2 without `raw` in the hash; the stored bytes are a key of their
own beside it, `mbx:{addr}:r:<id>` (keys.message_raw, `raw_key`: the same hash tag,
so the same cluster slot, and a Lua script given the message key reaches it), a
string or, past PIECE bytes, a hash of pieces that fit the allocator's size class.
A hash of small fields only stays listpack-encoded, about 190 bytes less per
message.  The bytes are read, written and deleted only through this module:
`queue_write`, `queue_raw`, `read_raw`, `queue_read`, `queue_delete`, and in Lua
the functions of `LUA` (`raw_of`, `raw_head`, `set_raw`, `del_message`), which look
for the bytes' own key first and the hash field second, so records of layouts 1
and 2 stay readable and deletable forever.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fallback.mailbox import fields as F
from fallback.mailbox.compression import Codec, codec, unpack

LAYOUT = F.RECORD_VERSION
SEP = "\0"  # headers.summarize's values never hold a NUL (the write path drops them)
# Layout 2 leaves out the fields that hold their default: no flags yet, kind "received", and
# the reconcile state until reconcile first touches the message (the Lua readers treat a
# missing one alike: bulk.py, expunge.py, purge.py, reconcile/state.py).
DEFAULTS = {F.FLAGS: "", F.RSTATE: F.PENDING, F.KIND: "received"}


def non_defaults(flags: tuple[str, ...], kind: str) -> dict[str, str]:
    """The flags and kind fields of a new record, those holding their default left out."""
    out = {F.FLAGS: " ".join(flags)} if flags else {}
    if kind != DEFAULTS[F.KIND]:
        out[F.KIND] = kind
    return out


@dataclass(frozen=True)
class Stored:
    """One message as the write path stores it: the bytes to store (maybe compressed), the
    raw size (what quotas and usage count) and the packed display values."""

    data: bytes
    size: int
    packed: str
    extra: tuple[tuple[str, str], ...] = ()  # fields of their own the caller added (a draft's form)

    def fields(self) -> dict[str, Any]:
        """The hash fields written once at delivery (besides ts, folder, flags, kind); the
        bytes go to their own key (`queue_write`)."""
        return {F.SIZE: self.size, F.PACKED: self.packed, **dict(self.extra)}


# Layout 3 keeps the stored bytes in a key of their own beside the record: a string, or a
# value longer than PIECE as a hash of pieces "1".."n" of PIECE bytes, only the last one shorter.
# jemalloc rounds every allocation up to its size class (four per doubling: up to 25 % more for
# a large value); a piece of PIECE bytes is an sds of 5 bytes of header, the bytes and a NUL,
# exactly 64 KiB, so only the last piece of a big message is rounded.  (docs/performance.md,
# "Issue 17: RAM per stored message", has the measurement; a client's SET of a big value keeps
# Redis' query buffer with two bytes more, so pieces are always written by HSET, which copies.)
PIECE = 65536 - 5 - 1


def raw_key(key: str) -> str:
    """The key of a message's stored bytes (layout 3) for its record `key` (keys.message):
    keys.message_raw, with the same hash tag, so the same cluster slot."""
    head, _, msg_id = key.rpartition(":m:")
    return f"{head}:r:{msg_id}"


# The Lua side of the same accessors, prepended to every script that reads, writes or deletes a
# message's bytes.  `key` is the message (hash) key; the bytes' key is derived from it as
# raw_key does (same slot).  The bytes' own key comes first: a layout-1 or -2 record has none and
# keeps its bytes in the hash's `raw` field.
LUA = """
local function raw_key(key)
  local head, id = string.match(key, '^(.*):m:(.*)$')
  return head .. ':r:' .. id
end
local function own_raw(key, upto)
  local rk = raw_key(key)
  local t = redis.call('TYPE', rk)['ok']
  if t == 'string' then  -- the start only, when that is all that is asked (a snippet)
    if upto then return redis.call('GETRANGE', rk, 0, upto - 1) end
    return redis.call('GET', rk)
  end
  if t ~= 'hash' then return false end
  local parts, got = {}, 0
  for i = 1, redis.call('HLEN', rk) do
    parts[i] = redis.call('HGET', rk, tostring(i))
    got = got + #parts[i]
    if upto and got >= upto then break end
  end
  return table.concat(parts)
end
local function raw_of(key)
  return own_raw(key) or redis.call('HGET', key, 'raw')
end
local function raw_head(key, n, nz, magic)
  local raw = own_raw(key, nz) or redis.call('HGET', key, 'raw')
  if raw and string.sub(raw, 1, 4) == magic then n = nz end
  return raw and string.sub(raw, 1, n) or false
end
local function set_raw(rk, raw)  -- rk: the bytes' key itself (the delivery script has it in KEYS)
  if #raw <= PIECE then return redis.call('SET', rk, raw) end
  local n = 0
  for at = 1, #raw, PIECE do
    n = n + 1
    redis.call('HSET', rk, tostring(n), string.sub(raw, at, at + PIECE - 1))
  end
end
local function del_message(key)
  return redis.call('DEL', key, raw_key(key))
end
""".replace("PIECE", str(PIECE))
_READ_RAW = LUA + "return raw_of(KEYS[1])"
_READ_OWN = LUA + "return own_raw(KEYS[1])"


def pieces(data: bytes) -> dict[str, bytes] | None:
    """The hash of pieces that stores `data`, or None when it is stored as one string."""
    if len(data) <= PIECE:
        return None
    return {str(n + 1): data[at : at + PIECE] for n, at in enumerate(range(0, len(data), PIECE))}


def queue_write(pipe: Any, key: str, stored: Stored, more: Mapping[str, Any],
                replacing: bool = False) -> None:
    """Queue a record's writes on a (sync or async) pipeline: the hash (stored.fields() and
    `more`) and the bytes' key.  `replacing`: the record may exist already, in any layout (a
    draft saved again): its bytes go first, wherever they are."""
    rk = raw_key(key)
    if replacing:
        pipe.hdel(key, F.RAW)
        pipe.delete(rk)
    pipe.hset(key, mapping={**stored.fields(), **more})
    split = pieces(stored.data)
    if split is None:
        pipe.set(rk, stored.data)
    else:
        pipe.hset(rk, mapping=split)


def queue_delete(pipe: Any, key: str) -> None:
    """Queue the delete of a record and its bytes (any layout)."""
    pipe.delete(key, raw_key(key))


def queue_raw(pipe: Any, key: str) -> None:
    """Queue the read of a message's stored bytes, any layout: one reply for `raw_of`."""
    # EVAL by hand: redis-py refuses script objects in a cluster pipeline.
    pipe.execute_command("EVAL", _READ_RAW, 1, key)


def read_raw(r: Any, key: str) -> bytes | None:
    """The exact bytes of the message whose record is `key` (sync client), one round trip."""
    return raw_of(r.execute_command("EVAL", _READ_RAW, 1, key))


async def read_raw_async(r: Any, key: str) -> bytes | None:
    """`read_raw` for an asyncio client."""
    return raw_of(await r.execute_command("EVAL", _READ_RAW, 1, key))


def read_stored(r: Any, key: str) -> bytes | None:
    """The stored value itself, compressed or not, any layout (what a measurement counts)."""
    value = r.execute_command("EVAL", _READ_RAW, 1, key)
    return None if value is None else bytes(value)


def queue_read(pipe: Any, key: str) -> None:
    """Queue the read of a whole record: two replies for `decode_read`."""
    pipe.hgetall(key)
    pipe.execute_command("EVAL", _READ_OWN, 1, key)


def pack_meta(meta: Mapping[str, str]) -> str:
    """headers.summarize's values as the one packed field."""
    return SEP.join([LAYOUT, *(meta.get(name, "").replace(SEP, "") for name in F.PARSED)])


def store(raw: bytes, meta: Mapping[str, str], how: Codec | None = None) -> Stored:
    """What the write path stores for a message (compressed once, here, not in Redis)."""
    extra = tuple((k, v) for k, v in meta.items() if k not in F.PARSED)
    return Stored((how or codec()).pack(raw), len(raw), pack_meta(meta), extra)


def unpack_meta(packed: str) -> dict[str, str]:
    """The display values of a packed field (a later layout's extra values are ignored)."""
    values = packed.split(SEP)
    return dict(zip(F.PARSED, values[1:], strict=False))


def names_for(wanted: Iterable[str]) -> tuple[str, ...]:
    """The hash fields to HMGET for `wanted`: the packed field too when a display value is
    wanted (layout 2), the display values' own fields stay for layout-1 records."""
    wanted = tuple(wanted)
    if any(name in F.PARSED for name in wanted) and F.PACKED not in wanted:
        return (*wanted, F.PACKED)
    return wanted


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def decode(names: Sequence[str], values: Sequence[Any]) -> dict[str, str]:
    """An HMGET's (names_for's names) values as {field: text} of either layout: missing
    fields left out, display values from the packed field when there is one."""
    row = {name: _text(v) for name, v in zip(names, values, strict=True) if v is not None}
    if row:
        for name, default in DEFAULTS.items():
            if name in names:
                row.setdefault(name, default)
    return _resolve(row)


def decode_mapping(record: Mapping[Any, Any]) -> tuple[dict[str, str], bytes]:
    """An HGETALL of a record as (metadata, exact raw bytes), either layout."""
    raw = b""
    row: dict[str, str] = {}
    for key, value in record.items():
        name = _text(key)
        if name == F.RAW:
            raw = unpack(bytes(value))
        else:
            row[name] = _text(value)
    if row:
        for name, default in DEFAULTS.items():
            row.setdefault(name, default)
    return _resolve(row), raw


def decode_read(record: Mapping[Any, Any], own: Any) -> tuple[dict[str, str], bytes]:
    """`queue_read`'s two replies as (metadata, exact raw bytes), any layout (empty metadata:
    no such message)."""
    meta, raw = decode_mapping(record)
    if own is not None and meta:
        return meta, unpack(bytes(own))
    if F.RAW not in record and F.RAW.encode() not in record:
        return {}, b""  # layout 3 with its bytes gone: deleted between the two reads
    return meta, raw


def _resolve(row: dict[str, str]) -> dict[str, str]:
    packed = row.pop(F.PACKED, None)
    if packed is not None:
        row.update(unpack_meta(packed))
        row[F.VERSION] = packed.split(SEP, 1)[0]
    return row


def raw_of(stored: Any) -> bytes | None:
    """The exact bytes of a stored `raw` value as a client returned it (bytes; None or a
    Lua false: no such message)."""
    if stored is None or stored is False:
        return None
    return unpack(stored.encode() if isinstance(stored, str) else bytes(stored))
