"""One process's short-lived, bounded memory of what it read from Redis (the receiver's
resolved recipients and mailbox usage): `TtlCache`."""

from __future__ import annotations

from typing import Generic, TypeVar

V = TypeVar("V")


class TtlCache(Generic[V]):
    """Values by key, reused for `ttl` seconds (0: nothing is kept).

    Only what was found is put here: a mailbox provisioned a moment ago is
    found at once, one removed a moment ago may still be used for `ttl`
    seconds (its mail is stored, never lost).  Bounded: a full cache simply
    starts over, which costs a few reads and no bookkeeping per hit.
    """

    def __init__(self, ttl: float, max_entries: int = 100_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.entries: dict[str, tuple[float, V]] = {}

    def get(self, key: str, now: float) -> V | None:
        hit = self.entries.get(key)
        return None if hit is None or hit[0] < now else hit[1]

    def put(self, key: str, value: V, now: float) -> None:
        if self.ttl <= 0:
            return
        if len(self.entries) >= self.max_entries:
            self.entries.clear()
        self.entries[key] = (now + self.ttl, value)

    def replace(self, key: str, value: V) -> None:
        """A newer value for a cached key, keeping its expiry (nothing when it is not cached)."""
        hit = self.entries.get(key)
        if hit is not None:
            self.entries[key] = (hit[0], value)
