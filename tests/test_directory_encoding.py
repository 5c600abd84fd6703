"""Directory records in their short binary form (issue 17): listpack-encoded on a stock
redis-server up to its default hash-max-listpack-value of 64 bytes and not past it, records of
the old text form still read, verified and rewritten by `provision`, and the CSV fast path
giving what the line-by-line one gives."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from passlib.hash import bcrypt

from fallback import keys
from fallback.intake import addressing
from fallback.mailbox.directory import Directory, Mailbox, ensure_buckets, send_many
from fallback.mailbox.passwords import verify_password
from tests.servers import free_port, stop_pid
from tests.test_provision import run

SECRET = "Correct horse 9"
HASH = "{BLF-CRYPT}" + bcrypt.using(ident="2y", rounds=4).hash(SECRET)
OTHER = "{BLF-CRYPT}" + bcrypt.using(ident="2y", rounds=4).hash("another one")


@pytest.fixture(scope="module")
def stock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server with its default configuration (no listpack settings), as an operator's own."""
    binary = shutil.which("redis-server")
    assert binary is not None
    port = free_port()
    workdir = tmp_path_factory.mktemp("stock-redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=1)
    try:
        for _ in range(300):
            try:
                if int(client.info("server")["process_id"]) == proc.pid:
                    break
            except redis.ConnectionError:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError("the stock redis-server did not start")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        stop_pid(proc)


@pytest.fixture
def sr(stock: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stock)
    client.flushall()
    yield client
    client.close()


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("address,password,mailstore\n" + "".join(line + "\n" for line in lines))
    return path


def bucket(r: redis.Redis, address: str) -> str:
    return keys.dir_bucket(address, ensure_buckets(r, 65536))


def test_records_stay_listpack_on_a_stock_server_up_to_64_bytes(sr: redis.Redis, stock: str,
                                                                tmp_path: Path, capsys) -> None:
    assert sr.config_get("hash-max-listpack-value") == {"hash-max-listpack-value": "64"}
    at_limit, past = "s" * 23, "s" * 24  # 1 + 23 + 40 bytes of bcrypt = 64; one more is 65
    names = [f"user{i}@example.com" for i in range(40)]
    lines = [f"{a},{HASH},store1" for a in names[:38]]
    lines += [f"{names[38]},{HASH},{at_limit}", f"{names[39]},{HASH},{past}"]
    rc, out, _ = run(["provision", str(write(tmp_path / "u.csv", lines))], stock, capsys)
    assert rc == 0 and "40" in out
    d = Directory(sr, ensure_buckets(sr, 65536))
    for address in names[:39]:
        raw = sr.hget(bucket(sr, address), address)
        assert raw is not None and len(raw) <= 64
        assert sr.object("encoding", bucket(sr, address)) == b"listpack"
    assert len(d.get_many([names[38]])[0] or b"") == 64
    assert len(d.get_many([names[39]])[0] or b"") == 65
    assert sr.object("encoding", bucket(sr, names[39])) == b"hashtable"
    # Nothing lost whatever the encoding: each reads back whole and verifies.
    for address, store in [(names[0], "store1"), (names[38], at_limit), (names[39], past)]:
        found = d.get(address)
        assert found == Mailbox(address, store, HASH)
        assert verify_password(SECRET, found.password_hash)
    assert d.mailstores() == {"store1": 38, at_limit: 1, past: 1}
    assert d.domains() == {"example.com": 40}


def test_an_old_text_record_is_read_verified_routed_and_rewritten(sr: redis.Redis, stock: str,
                                                                  tmp_path: Path, capsys) -> None:
    d = Directory(sr, ensure_buckets(sr, 65536))
    old = Mailbox("old@example.com", "store1", HASH, "old.alias@example.org")
    sr.hset(bucket(sr, old.address), old.address, f"store1\t{HASH}\told.alias@example.org")
    sr.hincrby(keys.DIR_DOMAINS, "example.com", 1)
    sr.hincrby(keys.DIR_MAILSTORES, "store1", 1)
    assert d.get(old.address) == old
    assert verify_password(SECRET, old.password_hash)

    async def rcpt() -> addressing.Resolution | None:
        ar = aioredis.Redis.from_url(stock)
        try:
            return await addressing.resolve_async(ar, d.buckets, old.address, addressing.Policy())
        finally:
            await ar.aclose()
    found = asyncio.run(rcpt())
    assert found is not None and [m.mailstore for m in found.mailboxes] == ["store1"]

    csv_path = tmp_path / "u.csv"
    csv_path.write_text(f"address,password,mailstore,alternate\n{old.address},{HASH},store1,"
                        "old.alias@example.org\nnew@example.com," + OTHER + ",store1,\n")
    rc, out, _ = run(["provision", str(csv_path), "--sync", "--dry-run"], stock, capsys)
    assert rc == 0
    assert sr.hget(bucket(sr, old.address), old.address).startswith(b"store1\t")  # dry: untouched
    rc, out, _ = run(["provision", str(csv_path)], stock, capsys)
    assert rc == 0 and "│     1 │       0 │         1 │       0 │" in out  # 1 added, 1 unchanged
    raw = sr.hget(bucket(sr, old.address), old.address)
    assert raw is not None and raw[0] & 0x80 and len(raw) < len(f"store1\t{HASH}")
    assert d.get(old.address) == old
    assert d.mailstores() == {"store1": 2} and d.domains() == {"example.com": 2}


def test_sync_rewrites_an_old_record_without_calling_it_changed(sr: redis.Redis, stock: str,
                                                                tmp_path: Path, capsys) -> None:
    d = Directory(sr, ensure_buckets(sr, 65536))
    sr.hset(bucket(sr, "old@example.com"), "old@example.com", f"store1\t{HASH}")
    sr.hincrby(keys.DIR_DOMAINS, "example.com", 1)
    sr.hincrby(keys.DIR_MAILSTORES, "store1", 1)
    report = tmp_path / "sync.json"
    rc, _, err = run(["provision", str(write(tmp_path / "u.csv", [f"old@example.com,{HASH},store1"])),
                        "--sync", "--report", str(report)], stock, capsys)
    assert rc == 0, err
    got = report.read_text()
    assert '"changed": []' in got and '"unchanged": 1' in got
    assert (sr.hget(bucket(sr, "old@example.com"), "old@example.com") or b"\0")[0] & 0x80
    assert d.get("old@example.com") == Mailbox("old@example.com", "store1", HASH)


def test_fast_and_line_by_line_rows_store_the_same(sr: redis.Redis, stock: str, tmp_path: Path,
                                                   capsys) -> None:
    noncanonical = HASH[:-1] + ("b" if HASH[-1] != "b" else "c")  # spare bits set: kept as text
    lines = [
        f"fast@example.com,{HASH},store1",              # the fast path
        f"Slow@Example.COM,{HASH},store1",              # normalised line by line
        f"quoted@example.com,\"{HASH}\",store1",
        f"dots..here@example.com,{HASH},store1",
        f"odd@example.com,{noncanonical},store1\r",
        f"FAST@example.com,{OTHER},store1",              # a duplicate of line 2, other case
        "bad@example.com,{BLF-CRYPT}$2y$04$short,store1",
        f"bad-store@example.com,{HASH},-store",
    ]
    rc, out, err = run(["provision", str(write(tmp_path / "u.csv", lines))], stock, capsys)
    assert rc == 1
    assert "u.csv:7: duplicate address fast@example.com (first on line 2)" in out
    assert "u.csv:8: malformed {BLF-CRYPT} hash" in out
    assert "u.csv:9: not a mailstore name: '-store' (letters, digits, . _ -)" in out
    assert "the other lines were loaded" in err
    d = Directory(sr, ensure_buckets(sr, 65536))
    for address, stored in [("fast@example.com", HASH), ("slow@example.com", HASH),
                            ("quoted@example.com", HASH), ("dots..here@example.com", HASH),
                            ("odd@example.com", noncanonical)]:
        assert d.get(address) == Mailbox(address, "store1", stored)
    assert d.count() == 5
    assert d.get_many(["fast@example.com"]) == d.get_many(["slow@example.com"])  # byte for byte
    assert verify_password(SECRET, d.get("slow@example.com").password_hash)


def test_send_many_reads_every_reply_and_raises_an_error_reply(sr: redis.Redis) -> None:
    commands = [("HSET", f"k{i}", "f", str(i)) for i in range(5000)]  # more than one batch
    assert send_many(sr, commands, batch=1024) == [1] * 5000
    assert send_many(sr, [("HGET", f"k{i}", "f") for i in (0, 4999)]) == [b"0", b"4999"]
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        send_many(sr, [("HGET", "k1", "f"), ("LPUSH", "k1", "x")])
    assert sr.ping()  # the connection that saw the error was not left half-read


def test_the_default_bucket_count_follows_the_servers_compact_hash_limit() -> None:
    from fallback.config import load_settings
    from fallback.mailbox import directory

    assert load_settings({}, env={}).directory_buckets == directory.DEFAULT_BUCKETS
    assert directory.first_count(65536, 1024) == 16384  # at the limit: four times fuller buckets
    assert directory.first_count(65536, 1023) == 65536  # one under it: the default
    assert directory.first_count(65536, None) == 65536  # CONFIG refused: the default
    assert directory.first_count(64, 1024) == 64  # a count the operator chose stays


def test_a_new_directory_on_a_stock_and_on_an_embedded_like_server(sr: redis.Redis, r: redis.Redis) -> None:
    # sr: default configuration (512 fields); r: the embedded Redis' settings (1,024).
    assert ensure_buckets(sr, 65536) == 65536
    assert ensure_buckets(r, 65536) == 16384
    assert ensure_buckets(r, 1000) == 16384  # fixed at first use: later processes read it
    assert asyncio.run(_async_count(r)) == 16384
    r.delete(keys.DIR_META)
    assert asyncio.run(_async_count(r)) == 16384
    assert r.hget(keys.DIR_META, "buckets") == b"16384"


async def _async_count(r: redis.Redis) -> int:
    ar = aioredis.Redis(connection_pool=aioredis.ConnectionPool(**r.connection_pool.connection_kwargs))
    try:
        from fallback.mailbox.directory import ensure_buckets_async

        return await ensure_buckets_async(ar, 65536)
    finally:
        await ar.aclose()
