"""The search index of one mailbox: sender and subject of every message, case-folded, packed
into a few strings ("haystacks") that one Lua call scans, and the search that reads them.

Keys (all under the mailbox's hash tag, one cluster slot): `srch` (a hash: `buckets`, the
number of haystacks; `mark`, the newest folder score indexed; `live` and `dead`, entries
written and entries of messages deleted since) and `srch:<n>` (haystack n).  A haystack
is lines of `<from>\\r<subject>\\x01<id><score>\\n` (the 26-character id, the score in 13
digits: fixed widths, so the script reads them without a pattern), oldest first, at most
BUCKET_BYTES long.

The entry carries the message's folder score (its time, keys.folder): a search keeps an
entry only when the folder it looks at holds that id with that very score.  So a move
(same score) needs no index write, a deleted message simply stops matching, and a draft
saved again (a new score, re-indexed) leaves its old entry unmatched: the writers never
touch the index, and nothing can match a message that is not in the folder.

Before each search the same script brings it up to date: it reads the messages scored from
`mark` on (less SKEW_MS: a writer's clock may be a little behind another's) in every
folder, and returns those not in the newest haystacks yet, to be indexed (`catch_up`).  The
receiver's 250 path gets no extra write, and a mailbox filled before this index existed (or by a bulk load) is
indexed on its first search, at most MAX_PER_CALL messages a call.  `forget` counts
messages deleted for good; past a quarter of the entries, the next catch-up rewrites the
haystacks without them.
"""

from __future__ import annotations

from typing import Any

import redis

from fallback import keys
from fallback.mailbox import fields as F
from fallback.mailbox import record

BUCKET_BYTES = 64 * 1024  # one haystack: one GET in the script, a few hundred entries
BATCH = 1000              # messages read per round trip while indexing
MAX_PER_CALL = 200_000    # messages one catch-up indexes; the next search goes on from there
SKEW_MS = 10_000          # as threads.SKEW_MS: this much older than the mark is looked at again
LOCK_MS = 30_000          # one request indexes a mailbox at a time; the others search what is there
_READ = record.names_for((F.FROM, F.SUBJECT, F.TS))  # the packed field too (layout 2)
COUNT_LIMIT = 5000        # matches counted exactly; past it, "more than" (a refined query is cheaper)
SLACK = 200               # matches sorted past the page: entries out of time order by a few seconds
_CONTROL = str.maketrans({c: " " for c in "\x00\x01\r\n\t"})


def meta_key(address: str) -> str:
    return f"{keys.mbx(address)}:srch"


def bucket_key(address: str, n: int) -> str:
    return f"{keys.mbx(address)}:srch:{n}"


def recent_key(address: str) -> str:
    """zset: the entries of the last 2 * SKEW_MS indexed (id -> score), so the skew window is not
    indexed twice."""
    return f"{keys.mbx(address)}:srch:recent"


def lock_key(address: str) -> str:
    return f"{keys.mbx(address)}:srch:lock"


def needle(query: str) -> str:
    """What the index is searched for: the query case-folded, its control characters spaces."""
    return query.casefold().translate(_CONTROL)


def entry(msg_id: str, score: int, sender: str, subject: str) -> bytes:
    return (f"{needle(sender)}\r{needle(subject)}\x01{msg_id}{score:013d}\n").encode()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else (value or "")


# KEYS: the folder searched, the index's hash, `recent`, every folder (fields.FOLDERS).
# ARGV: the haystack key prefix, needle, start, count, SLACK, SKEW_MS, MAX_PER_CALL, "1" to look
# for unindexed mail, COUNT_LIMIT, the offset of the needle's rarest byte (_rarest).
# Returns {total, more (0/1), id, score, ...} for the page, newest first, counting up to the
# limit; or, when mail arrived that is not indexed yet (or a quarter of the entries are dead),
# {-1, compact (0/1), id, score, ...} of it.
_SEARCH_LUA = """
local meta = redis.call('HMGET', KEYS[2], 'buckets', 'mark', 'live', 'dead')
local n, mark = tonumber(meta[1] or '0'), tonumber(meta[2] or '0')
if ARGV[8] == '1' then
  local todo, cut = {}, math.huge
  for f = 4, #KEYS do
    -- What is newer than the mark, oldest first (cut at MAX_PER_CALL), and the skew window before it.
    local rows = redis.call('ZRANGEBYSCORE', KEYS[f], '(' .. mark, '+inf', 'WITHSCORES', 'LIMIT', 0,
                            tonumber(ARGV[7]))
    local window = redis.call('ZREVRANGEBYSCORE', KEYS[f], mark, math.max(0, mark - tonumber(ARGV[6])),
                              'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[7]))
    -- A folder cut at MAX_PER_CALL: nothing past its cut is taken (the mark says how far it got).
    if #rows >= 2 * tonumber(ARGV[7]) then cut = math.min(cut, tonumber(rows[#rows])) end
    for k = 1, #window do rows[#rows + 1] = window[k] end
    for k = 1, #rows, 2 do
      local id, score = rows[k], tonumber(rows[k + 1])
      local new = score > mark
      if not new then  -- in the skew window: indexed already when `recent` has it with this score
        local had = redis.call('ZSCORE', KEYS[3], id)
        new = not had or tonumber(had) ~= score
      end
      if new then todo[#todo + 1] = id todo[#todo + 1] = score end
    end
  end
  local kept = {}
  for k = 1, #todo, 2 do
    if todo[k + 1] <= cut then kept[#kept + 1] = todo[k] kept[#kept + 1] = todo[k + 1] end
  end
  todo = kept
  local compact = tonumber(meta[4] or '0') * 4 > math.max(tonumber(meta[3] or '0'), 1)
  if #todo > 0 or compact then
    table.insert(todo, 1, compact and 1 or 0)
    table.insert(todo, 1, -1)
    return todo
  end
end
local needle, start, count = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if count == 0 then return {0, 0} end  -- catch_up: nothing to index, nothing to search
local limit = math.max(tonumber(ARGV[9]), start + count + tonumber(ARGV[5]))
local keep = start + count + tonumber(ARGV[5])
-- Only a needle of digits can match inside an entry's id and time ([0-9A-Z]; a case-folded
-- needle has no capital letter): for it each match is checked to end before its line's id.
local digits = string.find(needle, '^[0-9]+$') ~= nil
local total, page, seen = 0, {}, {}
local shift = tonumber(ARGV[10])
local anchor = string.sub(needle, shift + 1)
for b = n - 1, 0, -1 do
  if total >= limit then break end  -- enough counted: newer haystacks come first
  local s = redis.call('GET', ARGV[1] .. b)
  if s then
    local ids, scores, pos = {}, {}, 1
    while true do
      -- Found by its rarest part (Lua's plain find costs a compare per place its first byte is).
      local a = string.find(s, anchor, pos, true)
      if not a then break end
      local i = a - shift
      local j = i + #needle - 1
      if i < 1 or string.sub(s, i, j) ~= needle then
        pos = a + 1  -- the rare part, not the whole needle
      else
        local p = string.find(s, '\\1', j + 1, true)
        if not p then break end
        local nl = digits and string.find(s, '\\n', j, true) or p
        if nl < p then
          pos = nl + 1  -- the match was in an id or a time: go on from the next line
        else
          ids[#ids + 1], scores[#scores + 1] = string.sub(s, p + 1, p + 26), string.sub(s, p + 27, p + 39)
          pos = p + 41
        end
      end
    end
    if #ids > 0 then
      local have = redis.call('ZMSCORE', KEYS[1], unpack(ids))
      for k = #ids, 1, -1 do
        local id, score = ids[k], tonumber(scores[k])
        if have[k] and tonumber(have[k]) == score and not seen[id] then
          seen[id] = true
          total = total + 1
          if #page < keep then page[#page + 1] = {id, score} end
        end
      end
    end
  end
end
table.sort(page, function(a, b) if a[2] ~= b[2] then return a[2] > b[2] end return a[1] > b[1] end)
local out = {math.min(total, limit), total > limit and 1 or 0}
for k = start + 1, math.min(#page, start + count) do
  out[#out + 1] = page[k][1]
  out[#out + 1] = page[k][2]
end
return out
"""


def search(r: redis.Redis, address: str, folder: str, query: str, start: int,
           count: int) -> tuple[int, bool, list[str]]:
    """(messages of `folder` whose sender or subject contains `query`, case-insensitive, counted
    up to COUNT_LIMIT (or past the page asked for); whether more match; the ids of `count` of
    them from `start`, newest first).  Every message of the folder is looked at.

    One round trip when the index is up to date (the usual case): the same script looks for
    unindexed mail first, and returns that instead when there is some, to be indexed here.
    """
    text = needle(query)
    if not text.strip():
        return 0, False, []
    for attempt in range(3):  # bounded: index what the script found, search; the third time as it is
        reply = _run(r, address, folder, text, start, count, look=attempt < 2)
        if int(reply[0]) >= 0:
            return int(reply[0]), bool(int(reply[1])), [_text(i) for i in reply[2::2]]
        _update(r, address, _todo(reply), compact=bool(int(reply[1])))
    raise AssertionError("not reached: the third call does not look for unindexed mail")


def catch_up(r: redis.Redis, address: str) -> int:
    """Index what arrived since the last call (at most MAX_PER_CALL messages); how many it indexed.
    Another process indexing the same mailbox at the moment: returns 0 at once."""
    reply = _run(r, address, F.INBOX, "-", 0, 0, look=True)
    if int(reply[0]) >= 0:
        return 0  # the usual case: reads only (a write would cost an fsync under appendfsync always)
    return _update(r, address, _todo(reply), compact=bool(int(reply[1])))


def _run(r: redis.Redis, address: str, folder: str, text: str, start: int, count: int,
         look: bool) -> Any:
    folders = [keys.folder(address, name) for name in F.FOLDERS]
    return r.eval(_SEARCH_LUA, 3 + len(folders), keys.folder(address, folder), meta_key(address),
                  recent_key(address), *folders, bucket_key(address, 0)[:-1], text, start, count,
                  SLACK, SKEW_MS, MAX_PER_CALL, "1" if look else "0", COUNT_LIMIT, _rarest(text))


# Bytes of senders and subjects, commonest first (English-ish mail; every sender has " <@.>").
_COMMON = " esrntaoidlcu.<>@mhgpfybwvkxjqz"


def _rarest(text: str) -> int:
    """Offset in the needle's bytes of its rarest one by _COMMON (anything else, such as a
    digit or a non-ASCII byte, counts as rarest): the script looks for the needle from there."""
    data = text.encode()
    ranks = [_COMMON.find(chr(b)) if b < 128 else -1 for b in data]
    ranks = [len(_COMMON) if r < 0 else r for r in ranks]
    return max(range(len(data)), key=lambda k: ranks[k]) if data else 0


def _todo(reply: Any) -> list[tuple[int, str]]:
    return sorted((int(score), _text(i)) for i, score in zip(reply[2::2], reply[3::2], strict=True))


def forget(r: redis.Redis, address: str, removed: int) -> None:
    """Count `removed` messages deleted for good: their entries no longer match anything, and
    are dropped when they grow to a quarter of the index."""
    if removed > 0:
        r.hincrby(meta_key(address), "dead", removed)


def _update(r: redis.Redis, address: str, todo: list[tuple[int, str]], compact: bool) -> int:
    """Index `todo` ((score, id) oldest first; compacting first if asked), under the mailbox's lock."""
    if not r.set(lock_key(address), "1", nx=True, px=LOCK_MS):
        return 0
    try:
        buckets = int(r.hget(meta_key(address), "buckets") or 0)
        if compact:
            _compact(r, address, buckets)
        return _index(r, address, todo[:MAX_PER_CALL], buckets)
    finally:
        r.delete(lock_key(address))


# KEYS: the message key prefix (this mailbox's; the message keys are built from it, as in
# store.list_page).  ARGV: n, n field names, then ids.  Returns the fields of each id, flat.
_READ_LUA = """
local n, out = tonumber(ARGV[1]), {}
local names = {}
for k = 2, n + 1 do names[#names + 1] = ARGV[k] end
for k = n + 2, #ARGV do
  local values = redis.call('HMGET', KEYS[1] .. ARGV[k], unpack(names))
  for f = 1, n do out[#out + 1] = values[f] end
end
return out
"""


def _index(r: redis.Redis, address: str, todo: list[tuple[int, str]], buckets: int) -> int:
    if not todo:
        return 0
    last: Any = r.get(bucket_key(address, buckets - 1)) if buckets else None
    n, size = (buckets - 1, len(last)) if last is not None else (max(buckets - 1, 0), 0)
    done = 0
    for pos in range(0, len(todo), BATCH):
        chunk = todo[pos : pos + BATCH]
        # One script call per batch, not a pipeline of HMGETs: one reply to parse, in C.
        flat: Any = r.eval(_READ_LUA, 1, keys.message(address, ""), len(_READ), *_READ,
                           *(i for _, i in chunk))
        records = [flat[k : k + len(_READ)] for k in range(0, len(flat), len(_READ))]
        appends: dict[int, list[bytes]] = {}
        mark = 0
        for (score, msg_id), values in zip(chunk, records, strict=True):
            mark = max(mark, score)
            row = record.decode(_READ, values)  # either layout of the record (issue 17)
            if F.TS not in row:
                continue  # deleted between the two reads
            line = entry(msg_id, score, row.get(F.FROM, ""), row.get(F.SUBJECT, ""))
            if size and size + len(line) > BUCKET_BYTES:
                n, size = n + 1, 0
            appends.setdefault(n, []).append(line)
            size += len(line)
            done += 1
        with r.pipeline(transaction=True) as pipe:
            for b, lines in appends.items():
                pipe.append(bucket_key(address, b), b"".join(lines))
            pipe.hset(meta_key(address), "buckets", n + 1 if appends or buckets else 0)
            pipe.hincrby(meta_key(address), "live", sum(len(x) for x in appends.values()))
            pipe.zadd(recent_key(address), {i: score for score, i in chunk})
            pipe.zremrangebyscore(recent_key(address), 0, mark - 2 * SKEW_MS)
            pipe.execute()
        # The mark only grows (another catch-up may have gone further meanwhile).
        r.eval("if tonumber(redis.call('HGET', KEYS[1], 'mark') or '0') < tonumber(ARGV[1]) then "
               "redis.call('HSET', KEYS[1], 'mark', ARGV[1]) end", 1, meta_key(address), mark)
    return done


# KEYS: the haystack, the folder zsets.  Keeps the lines whose id a folder holds with that score.
_COMPACT_LUA = """
local s = redis.call('GET', KEYS[1])
if not s then return 0 end
local kept, n = {}, 0
for line, id, score in string.gmatch(s, '([^\\n]*\\1(' .. string.rep('.', 26) .. ')(%d+)\\n)') do
  for i = 2, #KEYS do
    local have = redis.call('ZSCORE', KEYS[i], id)
    if have and tonumber(have) == tonumber(score) then kept[#kept + 1] = line n = n + 1 break end
  end
end
redis.call('SET', KEYS[1], table.concat(kept))
return n
"""


def _compact(r: redis.Redis, address: str, buckets: int) -> None:
    """Rewrite every haystack without the entries that match no folder any more."""
    folders = [keys.folder(address, name) for name in F.FOLDERS]
    live = 0
    for n in range(buckets):  # one short script per haystack: Redis is never blocked for long
        live += int(r.eval(_COMPACT_LUA, 1 + len(folders), bucket_key(address, n), *folders))
    r.hset(meta_key(address), mapping={"live": live, "dead": 0})
