"""The receiver's short-lived cache of what it found (fallback.mailbox.ttlcache)."""

from __future__ import annotations

from fallback.mailbox.directory import Mailbox
from fallback.mailbox.ttlcache import TtlCache

ALICE = Mailbox("alice@example.com", "east", "{PLAIN}x")


def test_hit_within_ttl_then_expired() -> None:
    cache = TtlCache[Mailbox](ttl=10.0)
    assert cache.get(ALICE.address, now=100.0) is None
    cache.put(ALICE.address, ALICE, now=100.0)
    assert cache.get(ALICE.address, now=109.9) == ALICE
    assert cache.get(ALICE.address, now=110.1) is None


def test_ttl_zero_caches_nothing() -> None:
    cache = TtlCache[Mailbox](ttl=0.0)
    cache.put(ALICE.address, ALICE, now=1.0)
    assert cache.get(ALICE.address, now=1.0) is None


def test_bounded() -> None:
    cache = TtlCache[Mailbox](ttl=10.0, max_entries=3)
    for n in range(10):
        cache.put(f"u{n}@example.com", Mailbox(f"u{n}@example.com", "east", "h"), now=1.0)
        assert len(cache.entries) <= 3
