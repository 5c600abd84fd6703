"""The receiver's scripted write and the webmail's MULTI write store exactly the same thing."""

from __future__ import annotations

import asyncio

import redis

from fallback import keys
from fallback.mailbox import delivery, fields, record
from fallback.mailbox.batcher import DeliveryBatcher
from fallback.redisconn import async_client

RAW = (b"Received: from x ([127.0.0.1])\r\n\tby h (fallback) with ESMTP id ID; date\r\n"
       b"From: =?utf-8?q?J=C3=BCrgen?= <j@remote.test>\r\nTo: a@example.com\r\n"
       b"Subject: with a NUL\x00 inside\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\nbody\r\n")


def _dump(r: redis.Redis, address: str, msg_id: str) -> dict[str, object]:
    out: dict[str, object] = {}
    out["message"] = {k: v for k, v in r.hgetall(keys.message(address, msg_id)).items() if k != b"ts"}
    out["raw"] = record.read_stored(r, keys.message(address, msg_id))  # layout 3: a key of its own
    out["folder"] = r.zrange(keys.folder(address, fields.INBOX), 0, -1)
    out["unseen"] = r.smembers(keys.unseen(address))
    out["pending"] = r.smembers(keys.pending(address))
    out["info"] = r.hgetall(keys.info(address))
    return out


def test_scripted_and_multi_writes_are_identical(r: redis.Redis, redis_url: str) -> None:
    a, b = "a@example.com", "b@example.com"
    delivery.deliver(r, [delivery.Delivery(a, "east")], "01ID", RAW)

    async def scripted() -> None:
        client = async_client(redis_url)
        await delivery.deliver_async(client, [delivery.Delivery(b, "east")], "01ID", RAW)
        await client.aclose()

    asyncio.run(scripted())
    left, right = _dump(r, a, "01ID"), _dump(r, b, "01ID")
    assert left == right
    message = left["message"]
    assert isinstance(message, dict)
    meta, raw = record.decode_read(message, left["raw"])  # layout 3: the bytes beside (issue 17)
    assert raw == RAW and b"raw" not in message
    assert meta[fields.SUBJECT] == "with a NUL inside"
    assert meta[fields.FROM].startswith("Jürgen")
    assert meta[fields.ATTACH] == "1"
    assert meta[fields.VERSION] == fields.RECORD_VERSION


def test_batched_deliveries_succeed_or_fail_one_by_one(r: redis.Redis, redis_url: str) -> None:
    """Deliveries sharing a pipeline keep their own outcome: one failing never fails or hides another."""
    good, bad = "good@example.com", "bad@example.com"
    r.set(keys.message(bad, "02ID"), "not a hash")  # its script fails at its first write

    async def both() -> list[object]:
        client = async_client(redis_url)
        batcher = DeliveryBatcher(client)
        results = await asyncio.gather(
            delivery.deliver_async(client, [delivery.Delivery(good, "east")], "02ID", RAW, batcher=batcher),
            delivery.deliver_async(client, [delivery.Delivery(bad, "east")], "02ID", RAW, batcher=batcher),
            return_exceptions=True)
        await client.aclose()
        return list(results)

    ok, failed = asyncio.run(both())
    assert ok is None
    assert isinstance(failed, redis.ResponseError) and "WRONGTYPE" in str(failed)
    assert record.read_raw(r, keys.message(good, "02ID")) == RAW
    assert r.zcard(keys.folder(bad, fields.INBOX)) == 0
