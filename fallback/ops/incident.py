"""The live incident text: what the operator tells users now, on the webmail's banner, the
login page and the public /status page, changed without a restart.

One small hash, `ops:incident` (keys.INCIDENT): the text, since when it is set and
who set it.  `fallback incident set|clear|show` writes and reads it (audited,
fallback/commands/incident.py); every webmail process reads it through an
`IncidentCache` at most every couple of seconds.  When no live text is set,
the `incident_message` setting is shown as before.

The text is plain: the webmail escapes it, it is one line of at most
MAX_LENGTH characters, and control characters (a newline, an escape, a
right-to-left override that would turn the rest of a page around) are refused
with the position of the first one.
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from fallback import keys
from fallback.errors import InputError
from fallback.mailbox.ttlcache import TtlCache

MAX_LENGTH = 500  # characters: a banner line on a phone, not a page
CACHE_TTL = 2.0   # seconds a webmail process reuses one read
# Unicode's explicit direction controls: plain text here must not reorder the page around it.
_BIDI = {0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069, 0x200E, 0x200F}


@dataclass(frozen=True)
class Incident:
    text: str
    since: float
    actor: str

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "since": self.since, "actor": self.actor}


def check_text(text: str) -> str:
    """The text as it will be shown (trimmed); InputError, saying what is wrong, when it cannot be."""
    text = text.strip()
    if not text:
        raise InputError("the incident text is empty; use `fallback incident clear` to remove it")
    if len(text) > MAX_LENGTH:
        raise InputError(f"the incident text has {len(text)} characters; at most {MAX_LENGTH} are allowed")
    for pos, ch in enumerate(text, 1):
        if unicodedata.category(ch) == "Cc" or ord(ch) in _BIDI:
            raise InputError(f"the incident text has a control character (U+{ord(ch):04X}) at character "
                             f"{pos}; use plain text on one line")
    return text


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def read(r: redis.Redis) -> Incident | None:
    raw: Any = r.hgetall(keys.INCIDENT)
    f = {_text(k): _text(v) for k, v in (raw or {}).items()}
    if not f.get("text"):
        return None
    return Incident(f["text"], float(f.get("since") or 0), f.get("actor", ""))


def set_text(r: redis.Redis, text: str, actor: str, now: float | None = None) -> Incident:
    """Replace the live text (checked first: nothing is written when it is refused)."""
    incident = Incident(check_text(text), time.time() if now is None else now, actor)
    with r.pipeline(transaction=True) as pipe:
        pipe.delete(keys.INCIDENT)
        pipe.hset(keys.INCIDENT, mapping={"text": incident.text, "since": f"{incident.since:.3f}",
                                          "actor": actor})
        pipe.execute()
    return incident


def clear(r: redis.Redis) -> Incident | None:
    """Remove the live text; the one that was set, if any."""
    before = read(r)
    r.delete(keys.INCIDENT)
    return before


class IncidentCache:
    """One process's copy of the live text (or of its absence), read again after `ttl` seconds."""

    def __init__(self, ttl: float = CACHE_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        # A one-tuple, so that "no live text" is remembered too (TtlCache keeps only found values).
        self.cache: TtlCache[tuple[Incident | None]] = TtlCache(ttl, max_entries=1)

    def get(self, r: redis.Redis) -> Incident | None:
        now = self.clock()
        hit = self.cache.get("incident", now)
        if hit is None:
            hit = (read(r),)
            self.cache.put("incident", hit, now)
        return hit[0]
