"""The receiver's short-lived cache of found directory records."""

from __future__ import annotations

from fallback.mailbox.directory import LookupCache, Mailbox

ALICE = Mailbox("alice@example.com", "east", "{PLAIN}x")


def test_hit_within_ttl_then_expired() -> None:
    cache = LookupCache(ttl=10.0)
    assert cache.get(ALICE.address, now=100.0) is None
    cache.put(ALICE, now=100.0)
    assert cache.get(ALICE.address, now=109.9) == ALICE
    assert cache.get(ALICE.address, now=110.1) is None


def test_ttl_zero_caches_nothing() -> None:
    cache = LookupCache(ttl=0.0)
    cache.put(ALICE, now=1.0)
    assert cache.get(ALICE.address, now=1.0) is None


def test_bounded() -> None:
    cache = LookupCache(ttl=10.0, max_entries=3)
    for n in range(10):
        cache.put(Mailbox(f"u{n}@example.com", "east", "h"), now=1.0)
        assert len(cache.entries) <= 3
