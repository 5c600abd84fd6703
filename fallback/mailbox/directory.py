"""The directory of provisioned mailboxes: who exists, their mailstore and password hash.

Millions of users must fit in little memory, so records live in bucketed
hashes (`dir:{n}`, see keys.py) whose values are one short binary record
(Mailbox.encode; the hash in hashcodec's form): small hashes with values under
64 bytes stay listpack-encoded even on a stock Redis.  The same functions
serve the sync client (CLI, webmail) and the async one (receiver), which only
needs `lookup_async` and `domain_known_async`.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import hiredis
import redis
import redis.asyncio as aioredis

from fallback import keys
from fallback.errors import InputError
from fallback.mailbox import dirindex, hashcodec
from fallback.redisconn import is_cluster

_MAILSTORE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_MAILSTORE = "default"
RECORD_V1 = 0x80  # high bit of a binary record's first byte (its mailstore's length; issue 17)




def check_mailstore(name: str) -> str:
    if not _MAILSTORE_RE.match(name):
        raise InputError(f"not a mailstore name: {name!r} (letters, digits, . _ -)")
    return name


@dataclass(frozen=True)
class Mailbox:
    address: str
    mailstore: str
    password_hash: str
    alternate: str = ""

    def encode(self) -> bytes:
        """RECORD_V1 | the mailstore's length (at most 64), the mailstore, the hash (hashcodec),
        the alternate address (the rest): 47 bytes for a bcrypt hash and a 6-letter mailstore,
        under a stock Redis' hash-max-listpack-value of 64 (issue 17)."""
        return encode_record(self.mailstore, hashcodec.pack(self.password_hash), self.alternate)

    @classmethod
    def decode(cls, address: str, value: bytes | str) -> Mailbox:
        if isinstance(value, bytes) and value and value[0] & RECORD_V1:
            end = 1 + (value[0] & 0x7F)
            password_hash, at = hashcodec.unpack(value, end)
            return cls(address, value[1:end].decode(), password_hash, value[at:].decode())
        # Written before issue 17: "mailstore<TAB>hash[<TAB>alternate]" (a mailstore name
        # starts with an ASCII letter or digit: no high bit), still read as it is;
        # `provision` rewrites it.
        text = value.decode() if isinstance(value, bytes) else value
        parts = text.split("\t")
        return cls(address, parts[0], parts[1] if len(parts) > 1 else "",
                   parts[2] if len(parts) > 2 else "")

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]


def encode_record(mailstore: str, packed_hash: bytes, alternate: str = "") -> bytes:
    """Mailbox.encode's record from the hash already in hashcodec's form (a fresh import packs
    it straight from the line it matched, issue 17)."""
    store = mailstore.encode()
    return bytes((RECORD_V1 | len(store),)) + store + packed_hash + alternate.encode()


DEFAULT_BUCKETS = 65536   # Settings.directory_buckets' default
COMPACT_BUCKETS = 16384   # what that default becomes where hashes of 1,024 fields stay compact
COMPACT_FIELDS = 1024


def first_count(default: int, listpack_entries: int | None) -> int:
    """The bucket count a new directory gets: the setting, but its default divided by four on
    a server that keeps hashes of COMPACT_FIELDS fields or more as listpacks (the embedded
    Redis does).  Four times the mailboxes per bucket there costs a quarter of the keys: 88.6
    instead of 93.1 bytes a mailbox at 1,000,000 (docs/performance.md, issue 17), and up to
    16 million mailboxes still fit its listpacks.  A stock server (512 fields) keeps the
    default, under which every bucket stays a listpack up to 33 million mailboxes."""
    if default == DEFAULT_BUCKETS and listpack_entries is not None and listpack_entries >= COMPACT_FIELDS:
        return COMPACT_BUCKETS
    return default


def _listpack_entries(config: dict[Any, Any]) -> int | None:
    """hash-max-listpack-entries from a CONFIG GET's reply (hash-max-ziplist-entries before 7)."""
    for name in ("hash-max-listpack-entries", "hash-max-ziplist-entries"):
        for key, value in config.items():
            if (key.decode() if isinstance(key, bytes) else str(key)) == name:
                try:
                    return int(value)
                except (TypeError, ValueError):
                    return None
    return None


def ensure_buckets(r: redis.Redis, default: int) -> int:
    """The bucket count is fixed by the first process that needs it; all others read it."""
    found = r.hget(keys.DIR_META, "buckets")
    if found is None:
        try:
            config: Any = r.config_get("hash-max-*-entries")
        except redis.ResponseError:  # CONFIG renamed or refused (a managed Redis): the setting
            config = {}
        r.hsetnx(keys.DIR_META, "buckets", first_count(default, _listpack_entries(config)))
        found = r.hget(keys.DIR_META, "buckets")
    r.hsetnx(keys.DIR_META, "version", keys.SCHEMA_VERSION)
    return int(found or default)


async def ensure_buckets_async(r: aioredis.Redis, default: int) -> int:
    found = await r.hget(keys.DIR_META, "buckets")
    if found is None:
        try:
            config: Any = await r.config_get("hash-max-*-entries")
        except redis.ResponseError:
            config = {}
        await r.hsetnx(keys.DIR_META, "buckets", first_count(default, _listpack_entries(config)))
        found = await r.hget(keys.DIR_META, "buckets")
    await r.hsetnx(keys.DIR_META, "version", keys.SCHEMA_VERSION)
    return int(found or default)


class Directory:
    """Sync access for the CLI and the webmail."""

    def __init__(self, r: redis.Redis, buckets: int, name_index: bool = True) -> None:
        self.r = r
        self.buckets = buckets
        # Issue 15's name index for address suggestions; off with `--contacts-directory false`
        # (issue 17: the command then marks it for a rebuild, dirindex.forget).
        self.name_index = name_index

    def get(self, address: str) -> Mailbox | None:
        value = self.r.hget(keys.dir_bucket(address, self.buckets), address)
        return None if value is None else Mailbox.decode(address, value)

    def _by_bucket(self, addresses: Iterable[str]) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for address in addresses:
            groups.setdefault(keys.dir_bucket(address, self.buckets), []).append(address)
        return groups

    def get_many(self, addresses: list[str]) -> list[bytes | None]:
        """Stored records of many addresses: one HMGET per bucket, pipelined."""
        groups = self._by_bucket(addresses)
        replies = send_many(self.r, [("HMGET", bucket, *members) for bucket, members in groups.items()])
        found: dict[str, bytes | None] = {}
        for members, values in zip(groups.values(), replies, strict=True):
            found.update(zip(members, values, strict=True))
        return [found[a] for a in addresses]

    def put_many(self, mailboxes: Iterable[tuple[Mailbox, Mailbox | None]]) -> None:
        """Write (new, old) pairs: one HSET per bucket, the per-domain and per-mailstore
        counts summed first (one HINCRBY per name, not per mailbox)."""
        rows: list[tuple[str, bytes]] = []
        added: list[str] = []
        stores: Counter[str] = Counter()
        for new, old in mailboxes:
            rows.append((new.address, new.encode()))
            if old is None:
                added.append(new.address)
                stores[new.mailstore] += 1
            elif old.mailstore != new.mailstore:
                stores[new.mailstore] += 1
                stores[old.mailstore] -= 1
        domains = Counter(a.rpartition("@")[2] for a in added)
        self._write(rows, domains, stores, dirindex.group(a for a, _ in rows) if self.name_index else {})

    def add_new(self, rows: list[tuple[str, bytes]], stores: list[str]) -> None:
        """Write mailboxes known not to be in the directory, each address once (an import into
        an empty one): (address, its record from encode_record) and each one's mailstore; as
        put_many of (new, None) pairs, with each address split once for the counts and the index."""
        groups = dirindex.group(a for a, _ in rows)
        domains = Counter({domain: sum(map(len, fields.values())) for domain, fields in groups.items()})
        self._write(rows, domains, Counter(stores), groups if self.name_index else {})

    def _write(self, rows: list[tuple[str, bytes]], domains: Counter[str], stores: Counter[str],
               names: dirindex.Groups) -> None:
        records: dict[int, list[Any]] = {}
        crc32, buckets = zlib.crc32, self.buckets  # keys.bucket_of, inlined: a million calls
        for address, record in rows:
            fields = records.get(bucket := crc32(address.encode()) % buckets)
            if fields is None:
                fields = records[bucket] = ["HSET", keys.dir_bucket_n(bucket)]
            fields += (address, record)
        send_many(self.r, [tuple(fields) for fields in records.values()]
                  + [("HINCRBY", keys.DIR_DOMAINS, domain, n) for domain, n in domains.items()]
                  + [("HINCRBY", keys.DIR_MAILSTORES, store, n) for store, n in stores.items() if n])
        # Issue 15's name index: every address written (not only the new), so that a lost write heals.
        dirindex.add_groups(self.r, names)

    def put(self, mailbox: Mailbox) -> bool:
        """Add or update one mailbox; True when it was new."""
        old = self.get(mailbox.address)
        self.put_many([(mailbox, old)])
        return old is None

    def remove(self, address: str) -> bool:
        mailbox = self.get(address)
        if mailbox is None:
            return False
        pipe = self.r.pipeline(transaction=False)
        pipe.hdel(keys.dir_bucket(address, self.buckets), address)
        pipe.hincrby(keys.DIR_DOMAINS, mailbox.domain, -1)
        pipe.hincrby(keys.DIR_MAILSTORES, mailbox.mailstore, -1)
        _, domain_left, store_left = pipe.execute()
        if self.name_index:
            dirindex.remove(self.r, [address])  # issue 15: the name index for suggestions
        if int(domain_left) <= 0:
            self.r.hdel(keys.DIR_DOMAINS, mailbox.domain)
        if int(store_left) <= 0:
            self.r.hdel(keys.DIR_MAILSTORES, mailbox.mailstore)
        return True

    def remove_many(self, mailboxes: list[Mailbox]) -> None:
        """Remove many (as read): one HDEL per bucket, the counts lowered once per name
        (a directory sync; `remove` is the one-at-a-time form)."""
        groups = self._by_bucket(m.address for m in mailboxes)
        domains: Counter[str] = Counter(m.domain for m in mailboxes)
        stores: Counter[str] = Counter(m.mailstore for m in mailboxes)
        pipe = self.r.pipeline(transaction=False)
        for bucket, members in groups.items():
            pipe.hdel(bucket, *members)
        for domain, n in domains.items():
            pipe.hincrby(keys.DIR_DOMAINS, domain, -n)
        for store, n in stores.items():
            pipe.hincrby(keys.DIR_MAILSTORES, store, -n)
        left = pipe.execute()[len(groups):]
        if self.name_index:  # issue 15: the name index for suggestions
            dirindex.remove(self.r, (m.address for m in mailboxes))
        counted = [(keys.DIR_DOMAINS, d) for d in domains] + [(keys.DIR_MAILSTORES, s) for s in stores]
        pipe = self.r.pipeline(transaction=False)
        for (key, name), n in zip(counted, left, strict=True):
            if int(n) <= 0:  # a domain we no longer serve: its unknown users get 550 5.7.1
                pipe.hdel(key, name)
        pipe.execute()

    def domains(self) -> dict[str, int]:
        raw: dict[Any, Any] = self.r.hgetall(keys.DIR_DOMAINS)
        return {k.decode(): int(v) for k, v in raw.items()}

    def iter_mailboxes(self, batch: int = 256) -> Iterator[Mailbox]:
        """Every provisioned mailbox, bucket by bucket (pipelined, no single hot key)."""
        for start in range(0, self.buckets, batch):
            pipe = self.r.pipeline(transaction=False)
            for n in range(start, min(start + batch, self.buckets)):
                pipe.hgetall(keys.dir_bucket_n(n))
            for bucket in pipe.execute():
                for address, value in bucket.items():
                    addr = address.decode()
                    yield Mailbox.decode(addr, value)

    def mailstores(self) -> dict[str, int]:
        raw: dict[Any, Any] = self.r.hgetall(keys.DIR_MAILSTORES)
        return {k.decode(): int(v) for k, v in raw.items()}

    def count(self) -> int:
        return sum(self.domains().values())


def send_many(r: redis.Redis, commands: list[Any], batch: int = 2048) -> list[Any]:
    """The replies of many commands (tuples of arguments), in order; an error reply raises
    (redis-py's read_response).  On one server they are packed by hiredis and written a batch
    at once, the next batch sent before the last one's replies are read, so that Redis works
    while we pack:
    redis-py's Pipeline spends more per field than Redis takes to store it (issue 17).  A
    cluster client takes its pipeline (one slot per command)."""
    if is_cluster(r):
        pipe = r.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute())
    replies: list[Any] = []
    conn = r.connection_pool.get_connection()
    try:
        sent = 0
        for start in range(0, len(commands), batch):
            part = commands[start:start + batch]
            conn.send_packed_command([b"".join(map(hiredis.pack_command, part))])
            replies.extend(conn.read_response() for _ in range(sent))
            sent = len(part)
        replies.extend(conn.read_response() for _ in range(sent))
    except BaseException:
        conn.disconnect()  # replies may be left unread: not reusable as it is
        raise
    finally:
        r.connection_pool.release(conn)
    return replies


async def lookup_async(r: aioredis.Redis, buckets: int, address: str) -> Mailbox | None:
    value = await r.hget(keys.dir_bucket(address, buckets), address)
    return None if value is None else Mailbox.decode(address, value)


async def domain_known_async(r: aioredis.Redis, domain: str) -> bool:
    return bool(await r.hexists(keys.DIR_DOMAINS, domain))
