"""The message record's layout: writing it, and reading both layouts back.

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
size, kind, folder, flags, rstate) keep their own fields in both layouts.
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
        """The layout-2 fields written once at delivery (besides ts, folder, flags, kind)."""
        return {F.RAW: self.data, F.SIZE: self.size, F.PACKED: self.packed, **dict(self.extra)}


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
