"""The directory's name index: a domain's provisioned local parts, found by prefix as a user types.

The directory itself (directory.py) is bucketed by a hash of the address, so
a domain's users are spread over every bucket and a prefix lookup there
would read all of them.  This index keeps, per domain, one hash
(keys.dir_name_index, the domain as its hash tag): a field per first PREFIX
characters of the local part, whose value is the sorted rest of those local
parts, one per line, deflated past PACK_AT bytes (docs/performance.md, "Issue
17: provisioning into a stock Redis", session 7: a field per name cost 68
bytes a mailbox on a stock server, this 2.5).  A small domain's hash stays
listpack-encoded: one key for its few names, not a key per prefix.  A query of
PREFIX characters or more reads one field; a shorter one reads the first
SHORT_BUCKETS fields its prefix names.

Written by the directory's own writes (Directory.put_many, remove,
remove_many: provision, sync, LDAP), a read-modify-write per domain made safe
by a compare-and-set script (another writer in between: read again).  The index
of an older layout, or of a directory written while the index was off
(`--contacts-directory false`), is rebuilt at the next `fallback provision`
(`ensure`: once, marked by keys.DIR_NAME_INDEX_BUILT).
"""

from __future__ import annotations

import hashlib
import time
import zlib
from collections.abc import Iterable
from typing import Any

import redis

from fallback import keys
from fallback.errors import StorageError

PREFIX = 3          # characters of the local part that choose its field
SHORT_BUCKETS = 4   # fields a query shorter than PREFIX looks into (the first in order)
PACK_AT = 64        # a field's names longer than this are deflated (64: stock listpack values)
DEFLATED = b"\x00"  # first byte of a deflated field (a local part never holds NUL)
LEVEL = 6           # zlib level: 9 no smaller on sorted names, twice the time; 1 3-5 % larger
TRIES = 8           # compare-and-set rounds before a write gives up (StorageError)
_OLD_LAYOUT = "dirx:*"  # before session 7: a hash per (domain, prefix) and a zset per domain

# KEYS[1] the domain's index; ARGV: (field, sha1 of the value read or "" for none, new value
# or "" to delete) ...  Writes nothing unless every field is still as it was read.
_CAS = """
for i = 1, #ARGV, 3 do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if (v and redis.sha1hex(v) or '') ~= ARGV[i + 1] then return 0 end
end
for i = 1, #ARGV, 3 do
  if ARGV[i + 2] == '' then redis.call('HDEL', KEYS[1], ARGV[i])
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2]) end
end
return 1
"""

Groups = dict[str, dict[str, set[str]]]  # domain -> prefix -> the rest of each local part


def group(addresses: Iterable[str]) -> Groups:
    groups: Groups = {}
    get = groups.get
    for address in addresses:
        local, _, domain = address.rpartition("@")
        if local:
            fields = get(domain)
            if fields is None:
                fields = groups[domain] = {}
            rest = fields.get(prefix := local[:PREFIX])
            if rest is None:
                rest = fields[prefix] = set()
            rest.add(local[PREFIX:])
    return groups


def encode(rests: Iterable[str]) -> bytes:
    """A field's value: the rests sorted (code point order, that is UTF-8 byte order), one per line."""
    text = "".join(f"{rest}\n" for rest in sorted(rests)).encode()
    return DEFLATED + zlib.compress(text, LEVEL, wbits=-15) if len(text) > PACK_AT else text


def decode(value: bytes | None) -> list[str]:
    if not value:
        return []
    if value[:1] == DEFLATED:
        value = zlib.decompress(value[1:], wbits=-15)
    return value.decode("utf-8", "replace").split("\n")[:-1]


def add(r: redis.Redis, addresses: Iterable[str]) -> None:
    _update(r, group(addresses), adding=True)


def add_groups(r: redis.Redis, groups: Groups) -> None:
    """add() of addresses already grouped (group())."""
    _update(r, groups, adding=True)


def remove(r: redis.Redis, addresses: Iterable[str]) -> None:
    _update(r, group(addresses), adding=False)


def _update(r: redis.Redis, groups: Groups, adding: bool) -> None:
    from fallback.mailbox.directory import send_many  # directory.py imports this module

    for _ in range(TRIES):
        if not groups:
            return
        domains = list(groups)
        reads = send_many(r, [("HMGET", keys.dir_name_index(d), *groups[d]) for d in domains])
        writes: list[tuple[Any, ...]] = []
        written: list[str] = []
        for domain, values in zip(domains, reads, strict=True):
            args: list[Any] = []
            for (prefix, change), value in zip(groups[domain].items(), values, strict=True):
                old = set(decode(value))
                new = old | change if adding else old - change
                if new != old:
                    args += (prefix, "" if value is None else _digest(value), encode(new) if new else b"")
            if args:
                writes.append(("EVAL", _CAS, 1, keys.dir_name_index(domain), *args))
                written.append(domain)
        done = send_many(r, writes)
        groups = {d: groups[d] for d, ok in zip(written, done, strict=True) if not ok}
    if groups:
        raise StorageError(f"the name index of {len(groups)} domain(s) kept changing under "
                           f"{TRIES} tries: run `fallback provision` again")


def _digest(value: bytes) -> str:
    """What the script compares (redis.sha1hex): a change check, not a secret."""
    return hashlib.sha1(value, usedforsecurity=False).hexdigest()


def lookup(r: redis.Redis, domain: str, q: str, limit: int) -> list[str]:
    """Up to `limit` addresses of `domain` whose local part starts with `q`'s part before any
    "@" (case folded already), in byte order of the local part."""
    local = q.partition("@")[0]
    if not local:
        return []
    key = keys.dir_name_index(domain)
    if len(local) >= PREFIX:
        prefixes = [local[:PREFIX]]
    else:
        fields: Any = r.hkeys(key)
        prefixes = sorted(p for p in (f.decode("utf-8", "replace") for f in fields)
                          if p.startswith(local))[:SHORT_BUCKETS]
        if not prefixes:
            return []
    values: Any = r.hmget(key, prefixes)
    names = sorted(name for prefix, value in zip(prefixes, values, strict=True)
                   for rest in decode(value) if (name := prefix + rest).startswith(local))
    return [f"{n}@{domain}" for n in names[:limit]]


def ensure(r: redis.Redis, all_addresses: Iterable[str] | None) -> int | None:
    """Build the index over the whole directory once (an older layout, or written while the
    index was off); None when it was built already, else how many addresses it took.
    `all_addresses` None: the directory was empty before this run, whose writes indexed it all."""
    if r.exists(keys.DIR_NAME_INDEX_BUILT):
        return None
    _delete(r, _OLD_LAYOUT)
    n = 0 if all_addresses is None else rebuild(r, all_addresses)
    r.set(keys.DIR_NAME_INDEX_BUILT, str(int(time.time())))
    return n


def forget(r: redis.Redis) -> None:
    """The directory changes while the index is off: the next `ensure` rebuilds it."""
    r.delete(keys.DIR_NAME_INDEX_BUILT)


def rebuild(r: redis.Redis, all_addresses: Iterable[str], batch: int = 50_000) -> int:
    """The index made again from every address given (Directory.iter_mailboxes); how many."""
    _delete(r, keys.dir_name_index("*"))
    n = 0
    chunk: list[str] = []
    for address in all_addresses:
        chunk.append(address)
        if len(chunk) >= batch:
            add(r, chunk)
            n, chunk = n + len(chunk), []
    add(r, chunk)
    return n + len(chunk)


def _delete(r: redis.Redis, pattern: str) -> None:
    for key in r.scan_iter(match=pattern, count=1000):
        r.delete(key)
