"""Layout 3's big values in pieces of one allocator size class (record.PIECE), read back exact.

A stored value up to PIECE bytes is one string key; past it, a hash of pieces
"1".."n", each PIECE bytes but the last.  Both writers are checked (the
Python pipeline of delivery.deliver and the receiver's Lua script, through a
real SMTP client), the limit at and one past it, every reader against the
bytes sent, the conversation snippet's Lua reader across pieces, the memory
the pieces save against one string of the same bytes (MEMORY USAGE, which
does not depend on the load), and that a delete leaves no piece behind.
"""

from __future__ import annotations

import asyncio
import random
import smtplib
from typing import Any

import redis

from fallback import keys
from fallback.mailbox import compression, delivery, expunge, fields, record, store
from fallback.redisconn import async_client
from tests.reconcile_helpers import message

ALICE = "alice@example.com"


def noise(n: int, seed: int) -> bytes:
    """n bytes zstd cannot shrink by its 5 % (random 8-bit lines): stored as they are."""
    data = random.Random(seed).randbytes(n).replace(b"\r", b"x").replace(b"\n", b"y")
    return b"\r\n".join(data[i : i + 996] for i in range(0, n, 998))[:n]


def sized(subject: str, total: int, seed: int) -> tuple[str, bytes]:
    msg_id, head = message(ALICE, subject, body=b"")
    return msg_id, head + noise(total - len(head), seed)


def layout_of(r: redis.Redis, msg_id: str) -> tuple[bytes, list[int]]:
    """(TYPE of the bytes' key, the length of each piece)."""
    rk = keys.message_raw(ALICE, msg_id)
    kind: Any = r.type(rk)
    if kind == b"hash":
        return kind, [int(r.hstrlen(rk, str(n))) for n in range(1, int(r.hlen(rk)) + 1)]
    return kind, [int(r.strlen(rk))]


def test_the_piece_limit_both_writers_and_every_reader(r: redis.Redis, redis_url: str,
                                                       mailboxes: list[str]) -> None:
    assert record.raw_key(keys.message(ALICE, "01ID")) == keys.message_raw(ALICE, "01ID")
    made: dict[str, bytes] = {}
    for total, seed in ((record.PIECE, 1), (record.PIECE + 1, 2), (3 * record.PIECE + 17, 3)):
        msg_id, raw = sized(f"python {total}", total, seed)
        delivery.deliver(r, [delivery.Delivery(ALICE, "default")], msg_id, raw)
        made[msg_id] = raw
        lua_id, lua_raw = sized(f"lua {total}", total, seed + 10)

        async def scripted(msg_id: str = lua_id, raw: bytes = lua_raw) -> None:
            client = async_client(redis_url)
            await delivery.deliver_async(client, [delivery.Delivery(ALICE, "default")], msg_id, raw)
            await client.aclose()

        asyncio.run(scripted())
        made[lua_id] = lua_raw
        for i in (msg_id, lua_id):
            kind, lengths = layout_of(r, i)
            assert record.read_stored(r, keys.message(ALICE, i)) == made[i]  # random: not compressed
            if total == record.PIECE:  # at the limit: one string
                assert (kind, lengths) == (b"string", [record.PIECE])
            else:  # past it: full pieces and the rest
                assert kind == b"hash" and lengths[:-1] == [record.PIECE] * (len(lengths) - 1)
                assert lengths[-1] == total - record.PIECE * (len(lengths) - 1) and sum(lengths) == total
    reader = store.MailboxReader(r, ALICE)
    for msg_id, raw in made.items():
        assert reader.raw(msg_id) == raw
        found = reader.message(msg_id)
        assert found is not None and found[1] == raw and found[0][fields.SIZE] == str(len(raw))
    assert {i: raw for i, _, raw in reader.iter_messages()} == made
    assert store.move(r, ALICE, next(iter(made)), fields.TRASH)
    assert expunge.empty_trash(r, ALICE).deleted == 1
    assert len(list(r.scan_iter(match=keys.mbx(ALICE) + ":r:*", count=1000))) == len(made) - 1


def test_big_mail_over_smtp_in_pieces_saves_the_rounding(r: redis.Redis, mailboxes: list[str],
                                                         receiver_factory: Any) -> None:
    rt = receiver_factory()
    body = noise(3_000_000, 7) + b"\r\n"
    rng = random.Random(5)  # prose-like text: a vocabulary of made-up words, compressible
    vocabulary = [bytes(rng.choices(b"etaoinshrdlucmfwyp", k=rng.randint(2, 9))) for _ in range(3000)]
    text = b"".join(b" ".join(rng.choices(vocabulary, k=12)) + b"\r\n" for _ in range(20_000))
    sent = {}
    for source, payload in (("127.0.0.2", body), ("127.0.0.3", text)):
        data = b"From: <s@remote.test>\r\nTo: <alice@example.com>\r\nSubject: big\r\n\r\n" + payload
        with smtplib.SMTP("127.0.0.1", rt.port, source_address=(source, 0)) as smtp:
            assert smtp.sendmail("s@remote.test", [ALICE], data) == {}
        sent[source] = data
    reader = store.MailboxReader(r, ALICE)
    got = {i: reader.raw(i) for i in reader.ids(fields.INBOX)}
    assert sorted(len(v or b"") > 0 for v in got.values()) == [True, True]
    by_body = {next(s for s, d in sent.items() if (v or b"").endswith(d)): i for i, v in got.items()}
    assert set(by_body) == {"127.0.0.2", "127.0.0.3"}  # both whole, byte for byte after our Received:

    big = keys.message(ALICE, by_body["127.0.0.2"])
    kind, lengths = layout_of(r, by_body["127.0.0.2"])
    stored = record.read_stored(r, big) or b""
    assert kind == b"hash" and len(lengths) == -(-len(stored) // record.PIECE) > 40
    # The same bytes as one string: jemalloc rounds it up to its size class; the pieces are
    # exact but the last, so they cost less (MEMORY USAGE: sizes, not times).
    r.execute_command("EVAL", "return redis.call('SET', KEYS[1], ARGV[1])", 1, "scratch:{one}", stored)
    one = int(r.memory_usage("scratch:{one}", samples=0) or 0)
    split = int(r.memory_usage(keys.message_raw(ALICE, by_body["127.0.0.2"]), samples=0) or 0)
    assert split < one and split <= len(stored) * 1.005 + 16384, (split, one, len(stored))

    # Compressed text in pieces: the conversation snippet's Lua reader spans them.
    small = keys.message(ALICE, by_body["127.0.0.3"])
    packed = record.read_stored(r, small) or b""
    assert packed.startswith(compression.MAGIC) and len(packed) > record.PIECE
    assert layout_of(r, by_body["127.0.0.3"])[0] == b"hash"
    script = record.LUA + "return raw_head(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3])"
    head: Any = r.eval(script, 1, small, 8192, compression.BLOCK_STORED, compression.MAGIC)
    assert compression.unpack_prefix(head, 8192) == (got[by_body["127.0.0.3"]] or b"")[:8192]
    assert len(head) == min(len(packed), compression.BLOCK_STORED)
