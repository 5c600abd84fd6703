"""The one routing decision: fallback mailbox, forward queue or outbound queue, per recipient."""

from __future__ import annotations

import asyncio

import pytest
import redis

from fallback.config import Settings
from fallback.intake import routing
from fallback.mailbox.delivery import Delivery
from fallback.mailbox.directory import Directory, ensure_buckets
from fallback.ops import failover
from fallback.ops.failover import ALL, DEFAULT, LISTED, Scope
from fallback.redisconn import async_client
from tests.conftest import add_mailbox

NO_FAILOVER_YET = Scope(DEFAULT)
EVERYONE = Scope(ALL, 1.0)
STORE1 = Scope(LISTED, 1.0, {"store1": 1.0})
NO_ONE = Scope(LISTED, 1.0)  # every listed failover stopped again

A, B, C, X = "a@example.com", "b@example.com", "c@example.com", "x@remote.test"

# (recipient -> mailstore or None, scope, mailbox recipients, forward, outbound)
CASES = [
    ({A: "store1"}, NO_FAILOVER_YET, [A], [], []),
    ({A: "store1", B: "store2"}, EVERYONE, [A, B], [], []),
    ({A: "store1", B: "store2"}, STORE1, [A], [B], []),
    ({A: "store1", B: "store2"}, NO_ONE, [], [A, B], []),
    ({X: None}, STORE1, [], [], [X]),
    ({X: None}, EVERYONE, [], [], [X]),  # not provisioned: remote, whatever the scope
    ({B: "store2", X: None, A: "store1", C: "store2"}, STORE1, [A], [B, C], [X]),
    ({}, STORE1, [], [], []),
]


@pytest.mark.parametrize("mailstores, scope, mailboxes, forward, outbound", CASES)
def test_decide(mailstores: dict[str, str | None], scope: Scope, mailboxes: list[str],
                forward: list[str], outbound: list[str]) -> None:
    routes = routing.decide(mailstores, scope)
    assert routes == routing.Routes(
        [Delivery(a, mailstores[a] or "") for a in mailboxes], forward, outbound)


def test_mailbox_route_is_an_inbox_delivery_on_the_recipients_mailstore() -> None:
    (d,) = routing.decide({A: "store1"}, STORE1).mailboxes
    assert d == Delivery(A, "store1") and d.folder == "INBOX" and d.kind == "received"


@pytest.fixture
def provisioned(r: redis.Redis, settings: Settings) -> Directory:
    add_mailbox(r, settings, A, mailstore="store1")
    add_mailbox(r, settings, B, mailstore="store2")
    failover.start(r, ["store1"])
    return Directory(r, ensure_buckets(r, settings.directory_buckets))


def test_route_reads_directory_and_scope(provisioned: Directory) -> None:
    scopes = failover.ScopeCache(0.0)
    routes = routing.route(provisioned, scopes, [X, B, A])
    assert routes == routing.Routes([Delivery(A, "store1")], [B], [X])


def test_route_async_gives_the_same_answer(provisioned: Directory, redis_url: str) -> None:
    client = async_client(redis_url)

    async def via_async() -> routing.Routes:
        try:
            return await routing.route_async(client, provisioned.buckets, failover.ScopeCache(0.0),
                                             [X, B, A])
        finally:
            await client.aclose()

    assert asyncio.run(via_async()) == routing.route(provisioned, failover.ScopeCache(0.0), [X, B, A])


def test_scope_cache_is_read_once_per_ttl(provisioned: Directory, r: redis.Redis) -> None:
    scopes = failover.ScopeCache(3600.0)
    assert routing.route(provisioned, scopes, [B]).forward == [B]
    failover.start(r, ["store2"])
    assert routing.route(provisioned, scopes, [B]).forward == [B]  # the cached scope, until it expires
    scopes.clear()
    assert routing.route(provisioned, scopes, [B]).mailboxes == [Delivery(B, "store2")]
