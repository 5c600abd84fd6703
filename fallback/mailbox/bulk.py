"""Changing many messages of one mailbox at once: flags and moves for the webmail's bulk actions.

One script call per message, all of one action in one pipeline: each
message changes atomically (flags, the unseen set, the folder indexes and
the reconcile mark together), and the whole page costs one round trip.
Every key a call names is the mailbox's own (one hash tag, one cluster
slot), so an id of another mailbox is simply not found.  The single-message
changes of the message page are store.set_flags / store.move.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from fallback import keys
from fallback.mailbox import changes
from fallback.mailbox.fields import FOLDERS, SEEN, TRASH

# Outcomes of one message's change: done, no such message, not in the folder the page
# showed, already where it was to go.
CHANGED, MISSING, ELSEWHERE, ALREADY = 1, 0, -1, -2

# KEYS: message, unseen, pending, change token.  ARGV: id, flag to add ('' none), flag to
# remove ('' none), the \Seen flag's name, a new change token (changes.py).
# Returns 1 (changed, or already so), 0 when the message does not exist.
_FLAGS_LUA = """
local flags = redis.call('HGET', KEYS[1], 'flags')
if not flags then
  if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
  flags = ''
end
local out, seen = {}, false
for f in string.gmatch(flags, '%S+') do
  if f ~= ARGV[3] and f ~= ARGV[2] then out[#out + 1] = f end
end
if ARGV[2] ~= '' then out[#out + 1] = ARGV[2] end
for _, f in ipairs(out) do if f == ARGV[4] then seen = true end end
redis.call('HSET', KEYS[1], 'flags', table.concat(out, ' '))
if seen then redis.call('SREM', KEYS[2], ARGV[1]) else redis.call('SADD', KEYS[2], ARGV[1]) end
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SET', KEYS[4], ARGV[5])
return 1
"""

# KEYS: message, pending, change token, then the zset of each folder named in ARGV[5..].
# ARGV: id, target folder ('' = where the message was before Trash: Sent for sent mail, else
# INBOX), the folder it must be in now (the page's), a new change token, then the folder
# names.  Returns CHANGED, MISSING, ALREADY (in the target already) or ELSEWHERE (not in the
# page's folder: a draft, say, is left alone).
_MOVE_LUA = """
local v = redis.call('HMGET', KEYS[1], 'folder', 'ts', 'kind')
if not v[2] then return 0 end
local old, target = v[1] or 'INBOX', ARGV[2]
if target == '' then
  if v[3] == 'sent' then target = 'Sent' else target = 'INBOX' end
end
if old == target then return -2 end
if old ~= ARGV[3] then return -1 end
for i = 5, #ARGV do
  if ARGV[i] == old then redis.call('ZREM', KEYS[i - 1], ARGV[1]) end
  if ARGV[i] == target then redis.call('ZADD', KEYS[i - 1], tonumber(v[2]), ARGV[1]) end
end
redis.call('HSET', KEYS[1], 'folder', target)
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[4])
return 1
"""


@dataclass
class Outcome:
    """How many of the ids asked for changed, were not found, were already where they were to
    go, or were in another folder than the page's (and left as they were)."""

    changed: int = 0
    missing: int = 0
    already: int = 0
    elsewhere: int = 0

    def add(self, result: int) -> None:
        if result == CHANGED:
            self.changed += 1
        elif result == MISSING:
            self.missing += 1
        elif result == ALREADY:
            self.already += 1
        else:
            self.elsewhere += 1


def _run(r: redis.Redis, calls: list[tuple[Any, ...]]) -> Outcome:
    outcome = Outcome()
    if not calls:
        return outcome
    pipe = r.pipeline(transaction=False)
    for call in calls:
        # EVAL by hand: redis-py refuses script objects in a cluster pipeline.
        pipe.execute_command("EVAL", *call)
    for result in pipe.execute():
        outcome.add(int(result))
    return outcome


def set_flags(r: redis.Redis, address: str, ids: list[str], add: str = "", remove: str = "") -> Outcome:
    """Add or remove one flag on each message; marks each for reconcile."""
    return _run(r, [(_FLAGS_LUA, 4, keys.message(address, i), keys.unseen(address), keys.pending(address),
                     keys.changes(address), i, add, remove, SEEN, changes.token()) for i in ids])


def move(r: redis.Redis, address: str, ids: list[str], target: str, only_from: str) -> Outcome:
    """Move each message that is in `only_from` to `target` ('' = back from Trash to where it
    belongs); marks each for reconcile."""
    folder_keys = [keys.folder(address, f) for f in FOLDERS]
    return _run(r, [(_MOVE_LUA, 3 + len(FOLDERS), keys.message(address, i), keys.pending(address),
                     keys.changes(address), *folder_keys, i, target, only_from, changes.token(), *FOLDERS)
                    for i in ids])


def to_trash(r: redis.Redis, address: str, ids: list[str], only_from: str) -> Outcome:
    return move(r, address, ids, TRASH, only_from)


def restore(r: redis.Redis, address: str, ids: list[str]) -> Outcome:
    return move(r, address, ids, "", only_from=TRASH)

