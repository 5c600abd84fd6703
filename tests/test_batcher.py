"""The group commit's kept connection (mailbox/batcher.py): batches go out on one connection
of the pool, kept between batches, and checked before each batch, so a connection Redis
closed meanwhile (a restart, CLIENT KILL, its idle timeout) costs no delivery."""

from __future__ import annotations

import asyncio
import os
from typing import cast

import pytest
import redis

from fallback import keys
from fallback.mailbox import delivery, fields, record
from fallback.mailbox.batcher import DeliveryBatcher
from fallback.redisconn import async_client

pytestmark = pytest.mark.skipif(os.environ.get("FALLBACK_TEST_REDIS") == "cluster",
                                reason="a cluster's batches go through redis-py's cluster pipeline")

RAW = b"From: a@remote.test\r\nSubject: kept\r\n\r\nbody\r\n"
USER = "kept@example.com"


async def _deliveries(redis_url: str, kill_between: bool) -> tuple[list[object], set[int]]:
    """Six deliveries one after the other, the batcher's connection killed by Redis after the
    third when `kill_between`.  Each delivery's outcome (None when stored), and the ids of the
    connections the batches went out on."""
    client = async_client(redis_url)
    sync = redis.Redis.from_url(redis_url)
    batcher = DeliveryBatcher(client)
    outcomes: list[object] = []
    used: set[int] = set()

    async def one(msg_id: str) -> None:
        try:
            await delivery.deliver_async(client, [delivery.Delivery(USER, "east")], msg_id, RAW,
                                         batcher=batcher)
            outcomes.append(None)
        except Exception as exc:
            outcomes.append(exc)
        await batcher.conn.send_command("CLIENT", "ID")
        used.add(int(await batcher.conn.read_response()))

    try:
        for n in range(1, 7):
            await one(f"01KEPT{n}")
            if n == 3 and kill_between:
                assert sync.client_kill_filter(_id=str(max(used))) == 1
                await asyncio.sleep(0.1)  # the loop sees the connection's end
        await batcher.aclose()
        assert batcher.conn is None
    finally:
        sync.close()
        await client.aclose()
    return outcomes, used


def _stored(r: redis.Redis) -> list[bytes]:
    return sorted(cast(list[bytes], r.zrange(keys.folder(USER, fields.INBOX), 0, -1)))


def test_batches_go_out_on_one_kept_connection(r: redis.Redis, redis_url: str) -> None:
    outcomes, used = asyncio.run(_deliveries(redis_url, kill_between=False))
    assert outcomes == [None] * 6
    assert len(used) == 1
    assert _stored(r) == [f"01KEPT{n}".encode() for n in range(1, 7)]


def test_a_kept_connection_redis_closed_is_made_anew_and_nothing_fails(r: redis.Redis,
                                                                       redis_url: str) -> None:
    outcomes, used = asyncio.run(_deliveries(redis_url, kill_between=True))
    assert outcomes == [None] * 6
    assert len(used) == 2  # the killed one, then its successor for the last three
    assert _stored(r) == [f"01KEPT{n}".encode() for n in range(1, 7)]
    assert record.read_raw(r, keys.message(USER, "01KEPT4")) == RAW
