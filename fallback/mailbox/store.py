"""Reading mailboxes and changing messages: the webmail's pages, export, status, flag
changes and moves.

Writes of new messages are the write path's (delivery.py); the record's
fields are declared in fields.py.  Every change to a message marks it
pending, so reconcile carries it to the main store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from fallback import keys
from fallback.mailbox import changes, record, threads
from fallback.mailbox import fields as F
from fallback.mailbox import search as search_index
from fallback.mailbox.fields import FOLDERS, SEEN


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class MailboxReader:
    """Sync reads of one mailbox (export, webmail, status)."""

    def __init__(self, r: redis.Redis, address: str) -> None:
        self.r = r
        self.address = address

    def count(self, folder: str) -> int:
        return int(self.r.zcard(keys.folder(self.address, folder)))

    def ids(self, folder: str, start: int = 0, stop: int = -1, newest_first: bool = True) -> list[str]:
        key = keys.folder(self.address, folder)
        raw = (self.r.zrevrange(key, start, stop) if newest_first
               else self.r.zrange(key, start, stop))
        return [i.decode() for i in raw]  # type: ignore[union-attr]

    def raw(self, msg_id: str) -> bytes | None:
        return record.read_raw(self.r, keys.message(self.address, msg_id))

    def meta(self, msg_id: str) -> dict[str, str] | None:
        """The record without its bytes (which may be megabytes): the declared fields only."""
        names = [f for f in F.ALL if f != F.RAW]
        values: Any = self.r.hmget(keys.message(self.address, msg_id), names)
        if values[names.index(F.TS)] is None:
            return None
        return record.decode(names, values)

    def message(self, msg_id: str) -> tuple[dict[str, str], bytes] | None:
        """(metadata, raw bytes) in one read, for the message page."""
        pipe = self.r.pipeline(transaction=False)
        record.queue_read(pipe, keys.message(self.address, msg_id))
        fields, own = pipe.execute()
        meta, raw = record.decode_read(fields, own)
        return (meta, raw) if meta else None

    def message_page(self, msg_id: str) -> tuple[dict[str, str], bytes, tuple[list[str], int]] | None:
        """message() and the message's conversation (threads.current_conversation) in one round
        trip: what the message page reads (issue 17)."""
        pipe = self.r.pipeline(transaction=False)
        record.queue_read(pipe, keys.message(self.address, msg_id))
        threads.queue_current(pipe, self.address, msg_id)
        fields, own, found = pipe.execute()
        meta, raw = record.decode_read(fields, own)
        if not meta:
            return None
        return meta, raw, threads.current_from(self.r, self.address, msg_id, found)

    def iter_messages(self, folders: tuple[str, ...] = FOLDERS,
                      batch: int = 100) -> Iterator[tuple[str, dict[str, str], bytes]]:
        """(id, metadata, raw) in receive order, folder by folder, pipelined in batches."""
        for name in folders:
            ids = self.ids(name, newest_first=False)
            for start in range(0, len(ids), batch):
                chunk = ids[start : start + batch]
                pipe = self.r.pipeline(transaction=False)
                for msg_id in chunk:
                    record.queue_read(pipe, keys.message(self.address, msg_id))
                replies = pipe.execute()
                for msg_id, fields, own in zip(chunk, replies[::2], replies[1::2], strict=True):
                    meta, raw = record.decode_read(fields, own)
                    if not meta:
                        continue  # deleted between the index read and now
                    yield msg_id, meta, raw

    def info(self) -> dict[str, int]:
        fields = self.r.hgetall(keys.info(self.address))
        return {k.decode(): int(v) for k, v in fields.items()
                if k in (b"messages", b"bytes")}


def mailstore_stats(r: redis.Redis) -> dict[str, dict[str, int]]:
    """messages and bytes per mailstore, summed over the stats shards."""
    pipe = r.pipeline(transaction=False)
    for n in range(keys.STATS_SHARDS):
        pipe.hgetall(keys.stats_shard_n(n))
    out: dict[str, dict[str, int]] = {}
    for shard in pipe.execute():
        for field, value in shard.items():
            mailstore, _, what = field.decode().partition("\t")
            bucket = out.setdefault(mailstore, {"messages": 0, "bytes": 0})
            bucket[what] = bucket.get(what, 0) + int(value)
    return out


def _change_watched(r: redis.Redis, key: str, fields: tuple[str, ...],
                    change: Callable[[Any, list[str]], None]) -> bool:
    """Read `fields` of a message under WATCH, then queue `change` in one MULTI; retried when
    the message changed meanwhile.  False (nothing written) when the message is gone."""
    with r.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(key)
                values = pipe.hmget(key, fields)
                if values[0] is None:
                    pipe.reset()
                    return False
                pipe.multi()
                change(pipe, [_text(v) if v is not None else "" for v in values])
                pipe.execute()
                return True
            except redis.WatchError:
                continue


def set_flags(r: redis.Redis, address: str, msg_id: str, add: tuple[str, ...] = (),
              remove: tuple[str, ...] = ()) -> bool:
    """Change a message's flags; marks it for reconcile.  False when the message is gone."""

    def change(pipe: Any, values: list[str]) -> None:
        flags = [f for f in values[1].split() if f not in remove]
        flags += [f for f in add if f not in flags]
        pipe.hset(keys.message(address, msg_id), F.FLAGS, " ".join(flags))
        if SEEN in flags:
            pipe.srem(keys.unseen(address), msg_id)
        else:
            pipe.sadd(keys.unseen(address), msg_id)
        # Reconcile carries flag changes made after a message was appended.
        pipe.sadd(keys.pending(address), msg_id)
        changes.queue_touch(pipe, address)

    # The time first: it is on every record, the flags field only once there are flags.
    return _change_watched(r, keys.message(address, msg_id), (F.TS, F.FLAGS), change)


def move(r: redis.Redis, address: str, msg_id: str, folder: str) -> bool:
    """Move a message between folders (delete = move to Trash); marks it for reconcile."""
    if folder not in FOLDERS:
        raise ValueError(f"unknown folder {folder!r}")

    def change(pipe: Any, values: list[str]) -> None:
        old, ts = values
        pipe.hset(keys.message(address, msg_id), F.FOLDER, folder)
        pipe.zrem(keys.folder(address, old), msg_id)
        pipe.zadd(keys.folder(address, folder), {msg_id: int(ts or 0)})
        pipe.sadd(keys.pending(address), msg_id)
        changes.queue_touch(pipe, address)

    return _change_watched(r, keys.message(address, msg_id), (F.FOLDER, F.TS), change)


# The webmail's folder views: one page of summaries in two round trips, whatever the folder's size.
LIST_FIELDS = record.names_for(F.LIST)  # F.LIST, and the packed display values (layout 2)
SEARCH_LIMIT = 20000  # newest messages the grouped list looks at (web/conversations.py); search sees all


def _summary(msg_id: str, values: list[Any]) -> dict[str, str]:
    row = dict.fromkeys(F.LIST, "")
    row.update(record.decode(LIST_FIELDS, values))
    row["id"] = msg_id
    return row


# One round trip for a whole folder page.  Every key it reads is this mailbox's
# (one hash tag, one cluster slot); the message keys are built from the prefix.
# KEYS: the folder, the unseen set, the list preferences, the change token (changes.py; ''
# before the mailbox's first change), the folders to count.  ARGV: the message key prefix,
# first and last rank, the unread limit, how many fields the short read takes, the fields.
# It writes nothing: a page must show when Redis is full, or on a replica.
_LIST_PAGE_LUA = """
local total = redis.call('ZCARD', KEYS[1])
local unread = {}
for i = 5, #KEYS do unread[#unread + 1] = redis.call('ZINTERCARD', 2, KEYS[i], KEYS[2], 'LIMIT', ARGV[4]) end
local ids = redis.call('ZREVRANGE', KEYS[1], ARGV[2], ARGV[3])
local out = {total, unread, ids, redis.call('HGET', KEYS[3], 'group') or '', redis.call('GET', KEYS[4]) or ''}
local short, fields, all = tonumber(ARGV[5]), {}, {}
for i = 6, #ARGV do
  all[#all + 1] = ARGV[i]
  if #all <= short then fields[#fields + 1] = ARGV[i] end
end
for _, id in ipairs(ids) do
  local v = redis.call('HMGET', ARGV[1] .. id, unpack(fields))
  if v[2] and not v[short] then v = redis.call('HMGET', ARGV[1] .. id, unpack(all)) end
  out[#out + 1] = v
end
return out
"""
# A page reads these of each record; only a layout-1 record (no packed field) also the display
# values' own fields, in a second HMGET (issue 17: ten fields each was a third of its Redis time).
PAGE_FIELDS = (F.FLAGS, F.TS, F.SIZE, F.KIND, F.FOLDER, F.PACKED)
PAGE_ALL_FIELDS = (*PAGE_FIELDS, *(f for f in LIST_FIELDS if f not in PAGE_FIELDS))


@dataclass(frozen=True)
class FolderPage:
    """One page of a folder as Redis returned it.  `data` is every value the page shows,
    hashable; `rows()` decodes.  `token` is the mailbox's change token read with it
    (changes.py): the webmail keeps the page drawn from it under that (web/mailbox.py)."""

    total: int
    counts: dict[str, int]   # unread messages per folder, up to the limit
    grouped: bool            # the user's list choice: one row per conversation
    data: tuple[tuple[Any, ...], ...]  # (id, *LIST_FIELDS values) per message still there
    token: bytes             # b"" before the mailbox's first change: nothing is kept under it

    def rows(self) -> list[dict[str, str]]:
        return [_page_summary(v) for v in self.data]


def _page_summary(value: tuple[Any, ...]) -> dict[str, str]:
    row = dict.fromkeys(F.LIST, "")
    if len(value) == len(PAGE_FIELDS) + 1 and value[-1] is not None:
        # A packed record's six page fields: what record.decode gives them, in fewer steps (a
        # folder page decodes fifty; issue 17; tests/test_web_listrows.py compares the two).
        for name, v in zip(PAGE_FIELDS[:-1], value[1:-1], strict=True):
            if v is not None:
                row[name] = _text(v)
            elif name in record.DEFAULTS:
                row[name] = record.DEFAULTS[name]
        packed = _text(value[-1])
        row.update(record.unpack_meta(packed))
        row[F.VERSION] = packed.split(record.SEP, 1)[0]
    else:
        row.update(record.decode(PAGE_ALL_FIELDS[:len(value) - 1], value[1:]))
    row["id"] = _text(value[0])
    return row


def folder_page(r: redis.Redis, address: str, folder: str, start: int, count: int,
                unread_limit: int = 1000, count_folders: tuple[str, ...] = FOLDERS) -> FolderPage:
    """`count` messages of `folder` from `start`, newest first, with the folder's size, the
    unread messages of each of `count_folders` (counted up to `unread_limit`) and the user's
    grouping choice.

    Unread counts come from the unseen set, which every write path keeps (the delivery
    scripts, flag changes; a move leaves it as it is): intersected with a folder's index,
    bounded by the LIMIT, in the same call as the page.

    A Lua script rather than pipelines: on a busy threaded web worker every
    round trip is another wait for the interpreter lock, so one beats three.
    """
    script = r.register_script(_LIST_PAGE_LUA)
    reply: Any = script(keys=[keys.folder(address, folder), keys.unseen(address), keys.list_prefs(address),
                              keys.changes(address), *(keys.folder(address, f) for f in count_folders)],
                        args=[keys.message(address, ""), start, start + count - 1, unread_limit,
                              len(PAGE_FIELDS), *PAGE_ALL_FIELDS])
    total, unread, raw_ids, group, token, values = (reply[0], reply[1], reply[2], reply[3], reply[4],
                                                    reply[5:])
    # A message moved or deleted between the index read and now has no fields: leave it out.
    data = tuple((i, *v) for i, v in zip(raw_ids, values, strict=True) if v[1] is not None)
    return FolderPage(int(total), {f: int(n) for f, n in zip(count_folders, unread, strict=True)},
                      group == b"1", data, token)


def list_page(r: redis.Redis, address: str, folder: str, start: int, count: int,
              unread_limit: int = 1000,
              count_folders: tuple[str, ...] = FOLDERS) -> tuple[int, list[dict[str, str]], dict[str, int]]:
    """(messages in folder, summaries of `count` messages from `start` newest first,
    unread messages of each of `count_folders`, counted up to `unread_limit`): folder_page."""
    page = folder_page(r, address, folder, start, count, unread_limit, count_folders)
    return page.total, page.rows(), page.counts


def summaries(r: redis.Redis, address: str, ids: list[str]) -> list[dict[str, str]]:
    if not ids:
        return []
    with r.pipeline(transaction=False) as pipe:
        for msg_id in ids:
            pipe.hmget(keys.message(address, msg_id), LIST_FIELDS)
        results = pipe.execute()
    # A message moved or deleted between the two reads has no fields: leave it out.
    return [_summary(i, v) for i, v in zip(ids, results, strict=True) if v[1] is not None]


def search(r: redis.Redis, address: str, folder: str, query: str, start: int,
           count: int) -> tuple[int, bool, list[dict[str, str]]]:
    """Messages of `folder` whose sender or subject contains `query` (case-insensitive), newest
    first: every message of the folder, through the mailbox's search index (search.py).
    (matches counted up to search.COUNT_LIMIT, whether more match, the page's summaries)."""
    total, more, ids = search_index.search(r, address, folder, query, start, count)
    return total, more, summaries(r, address, ids)


def unread_counts(r: redis.Redis, address: str, folders: tuple[str, ...] = FOLDERS,
                  limit: int = 1000) -> dict[str, int]:
    """Unread messages of each folder, counted up to `limit`, in one round trip."""
    with r.pipeline(transaction=False) as pipe:
        for f in folders:
            pipe.execute_command("ZINTERCARD", 2, keys.folder(address, f), keys.unseen(address),
                                 "LIMIT", limit)
        return {f: int(n) for f, n in zip(folders, pipe.execute(), strict=True)}


def unseen_count(r: redis.Redis, address: str, folder: str, limit: int = 1000) -> int:
    """Unread messages in one folder, counted up to `limit` (the unseen set is per mailbox)."""
    return int(r.execute_command("ZINTERCARD", 2, keys.folder(address, folder), keys.unseen(address),
                                 "LIMIT", limit))



def set_grouping(r: redis.Redis, address: str, on: bool) -> None:
    """The user's list choice: one row per conversation or not (the folder page reads it)."""
    with r.pipeline(transaction=True) as pipe:
        pipe.hset(keys.list_prefs(address), "group", "1" if on else "0")
        changes.queue_touch(pipe, address)
        pipe.execute()


def note_local_recipients(r: redis.Redis, address: str, msg_id: str, recipients: list[str]) -> None:
    """Record, on a sent message, which recipients had a mailbox here (display only)."""
    if recipients:
        r.hset(keys.message(address, msg_id), F.LOCAL, " ".join(recipients))

