"""The conversation index of one mailbox: which messages belong together, across INBOX, Sent and Trash.

A message joins the conversation of the first message it names (its own
Message-ID referred to earlier, its In-Reply-To, then its References from the
nearest back), else of the newest conversation with the same normalised
subject (Re:/Fwd:/AW:/WG:/SV:/RE[2]: ... stripped) if that one had a message
within SUBJECT_WINDOW_MS, else it starts its own.  Two conversations that a
later message links are not merged: it joins the first one it names.

Keys (all carry the mailbox's hash tag, keys.py): `thr:of` (message id ->
conversation id), `thr:ids` (Message-ID -> conversation id), `thr:subj`
(subject -> conversation id and newest time), `thr:t:<conversation>` (its
message ids by time) and `thr:mark` (how far the index has got).

The index is brought up to date by `catch_up`: the webmail runs it right
after a send (so the user's reply is in its conversation at once) and before
it reads a conversation, the grouped list or suggestions, for what arrived
since (the receiver's 250 path gets no extra write: the records carry the
threading headers, fields.THREADING, and this reads them later).  The same
pass feeds the mailbox's contacts (contacts.py).  Mailboxes filled before
this index existed are indexed by the same pass, lazily and in bounded
batches, on their first read.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass
from typing import Any

import redis

from fallback import keys
from fallback.mailbox import contacts, record
from fallback.mailbox import fields as F

SUBJECT_WINDOW_MS = 30 * 86400 * 1000  # same subject, no header link: the same conversation within this
BATCH = 1000        # messages read and indexed per round trip
MAX_BATCHES = 20    # per catch_up call: a 20,000-message backlog is indexed in one call, more in the next
# A message's ts is its writer's clock when it began the write: one committed a little later
# may carry a ts older than the mark.  Messages up to this much older are looked at again
# (and skipped when indexed), so every catch-up costs reading the last SKEW_MS of mail.
SKEW_MS = 10_000
LOCK_MS = 30_000    # one request indexes a mailbox at a time; the others read what is there
FOLDERS = (F.INBOX, F.SENT, F.TRASH)
_READ = (F.TS, F.KIND, F.FROM, F.TO, F.CC, F.SUBJECT, F.MSGID, F.INREPLYTO, F.REFERENCES)
_HMGET = record.names_for(_READ)  # and the packed display values (record layout 2)

# Reply and forward prefixes of the common mail clients and languages, each optionally
# counted ("Re[2]:", "RE(3):", "Re^2:"), repeated ("Re: Fwd: AW:").
_PREFIX = re.compile(
    r"^\s*(?:(?:re|fwd?|aw|wg|sv|vs|antw|doorst|tr|rif|r|odp|ynt|res|enc|vl|ref|atb)"
    r"\s*(?:\[\d+\]|\(\d+\)|\^\d+)?\s*[:：]\s*)+", re.IGNORECASE)
_LIST_TAG = re.compile(r"^\s*\[[^\]]{1,40}\]\s*")  # "[team] Re: plans" -> "plans"


def normalize_subject(subject: str) -> str:
    """The subject a conversation is known by: prefixes and a list tag stripped, spaces collapsed,
    case folded; "" for a subject that is only prefixes."""
    text = subject
    for _ in range(10):  # bounded: each pass strips one list tag and a run of prefixes
        stripped = _PREFIX.sub("", _LIST_TAG.sub("", text, count=1), count=1)
        if stripped == text:
            break
        text = stripped
    return " ".join(text.split()).casefold()[:200]


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else (value or "")


@dataclass
class _Message:
    msg_id: str
    ts: int
    kind: str
    values: dict[str, str]


def catch_up(r: redis.Redis, address: str) -> int:
    """Index the mailbox's messages the conversation index has not seen yet; how many it indexed.

    Several web processes may call it at once: one holds keys.thread_lock and
    the others return at once (their request shows the index as it is).  One
    call indexes at most BATCH * MAX_BATCHES messages, oldest first; the next
    call goes on from there.
    """
    if not _pending(r, address):
        return 0  # the usual case: reads only (a write would cost an fsync under appendfsync always)
    lock = keys.thread_lock(address)
    if not r.set(lock, "1", nx=True, px=LOCK_MS):
        return 0
    try:
        return _catch_up(r, address)
    finally:
        r.delete(lock)


# KEYS: the mark, thread_of, the folders.  ARGV: SKEW_MS, BATCH.  {1} when a message is unindexed.
# One round trip (issue 17: it runs before every message page) instead of three.
_PENDING_CHECK = """
local low = math.max(0, tonumber(redis.call('GET', KEYS[1]) or '0') - tonumber(ARGV[1]))
for f = 3, #KEYS do
  local ids = redis.call('ZREVRANGEBYSCORE', KEYS[f], '+inf', low, 'LIMIT', 0, tonumber(ARGV[2]))
  if #ids > 0 then
    local known = redis.call('HMGET', KEYS[2], unpack(ids))
    for k = 1, #ids do if not known[k] then return {1} end end
  end
end
"""
_PENDING_LUA = _PENDING_CHECK + "return {0}\n"


def _pending(r: redis.Redis, address: str) -> bool:
    """Whether the newest messages from the mark on (at most BATCH a folder) hold one the index
    has not seen: what is new comes last, so one look at the newest tells."""
    folders = [keys.folder(address, name) for name in FOLDERS]
    script = r.register_script(_PENDING_LUA)
    found: Any = script(keys=[keys.thread_mark(address), keys.thread_of(address), *folders],
                        args=[SKEW_MS, BATCH])
    return bool(found[0])


def _candidates(r: redis.Redis, address: str, most: int) -> tuple[list[tuple[int, str]], bool]:
    """(ts, id) oldest first of the messages from the mark on (at most `most` a folder) and of
    the newest BATCH a folder in the SKEW_MS before it; and whether a folder was cut at `most`
    (then nothing past the cut is taken from any folder, so the mark says how far it got)."""
    mark = int(_text(r.get(keys.thread_mark(address))) or 0)
    with r.pipeline(transaction=False) as pipe:
        for name in FOLDERS:
            key = keys.folder(address, name)
            pipe.zrangebyscore(key, mark, "+inf", start=0, num=most, withscores=True)
            pipe.zrevrangebyscore(key, f"({mark}", max(0, mark - SKEW_MS), start=0, num=BATCH,
                                  withscores=True)
        found = pipe.execute()
    ahead = found[0::2]
    cut = min((int(rows[-1][1]) for rows in ahead if len(rows) >= most), default=None)
    rows = {(int(ts), _text(i)) for group in found for i, ts in group}
    return sorted(x for x in rows if cut is None or x[0] <= cut), cut is not None


def _catch_up(r: redis.Redis, address: str) -> int:
    mark = int(_text(r.get(keys.thread_mark(address))) or 0)
    candidates, _ = _candidates(r, address, BATCH * MAX_BATCHES)
    done = 0
    for pos in range(0, len(candidates), BATCH):
        chunk = candidates[pos : pos + BATCH]
        done += _one_batch(r, address, chunk)
        mark = max(mark, chunk[-1][0])
        r.set(keys.thread_mark(address), mark)
    return done


def _one_batch(r: redis.Redis, address: str, candidates: list[tuple[int, str]]) -> int:
    """Index those of (ts, id) that are not indexed yet; how many were."""
    ids = [i for _, i in candidates]
    known = r.hmget(keys.thread_of(address), ids)
    todo = [i for i, k in zip(ids, known, strict=True) if k is None]
    if not todo:
        return 0
    with r.pipeline(transaction=False) as pipe:
        for msg_id in todo:
            pipe.hmget(keys.message(address, msg_id), _HMGET)
        records = pipe.execute()
    messages = []
    for msg_id, values in zip(todo, records, strict=True):
        if values[0] is None:
            continue  # deleted between the two reads
        row = {**dict.fromkeys(_READ, ""), **record.decode(_HMGET, values)}
        messages.append(_Message(msg_id, int(row[F.TS] or 0), row[F.KIND], row))
    _index(r, address, messages)
    return len(messages)


def _index(r: redis.Redis, address: str, messages: list[_Message]) -> None:
    if not messages:
        return
    own_ids = {m.msg_id: _ids_of(m) for m in messages}
    wanted = sorted({i for chain in own_ids.values() for i in chain})
    subjects = sorted({normalize_subject(m.values[F.SUBJECT]) for m in messages} - {""})
    with r.pipeline(transaction=False) as pipe:
        pipe.hmget(keys.thread_ids(address), wanted or ["-"])
        pipe.hmget(keys.thread_subjects(address), subjects or ["-"])
        id_values, subject_values = pipe.execute()
    by_id = {k: _text(v) for k, v in zip(wanted, id_values, strict=False) if v is not None}
    by_subject: dict[str, tuple[str, int]] = {}
    for subject, value in zip(subjects, subject_values, strict=False):
        if value is not None:
            known, _, ts = _text(value).partition(" ")
            by_subject[subject] = (known, int(ts or 0))
    new_ids: dict[Any, Any] = {}
    new_subjects: dict[Any, Any] = {}
    of: dict[Any, Any] = {}
    members: dict[str, dict[Any, Any]] = {}
    seen: list[contacts.Seen] = []
    for m in messages:
        chain = own_ids[m.msg_id]
        tid: str | None = next((by_id[i] for i in chain if i in by_id), None)
        subject = normalize_subject(m.values[F.SUBJECT])
        if tid is None and subject in by_subject:
            other, last = by_subject[subject]
            if abs(m.ts - last) <= SUBJECT_WINDOW_MS:
                tid = other
        if tid is None:
            tid = m.msg_id
        for i in chain:
            if i not in by_id:
                by_id[i] = new_ids[i] = tid
        if subject:
            newest = max(m.ts, by_subject[subject][1]) if by_subject.get(subject, ("",))[0] == tid else m.ts
            by_subject[subject] = (tid, newest)
            new_subjects[subject] = f"{tid} {newest}"
        of[m.msg_id] = tid
        members.setdefault(tid, {})[m.msg_id] = m.ts
        seen += _people(address, m)
    with r.pipeline(transaction=True) as pipe:
        pipe.hset(keys.thread_of(address), mapping=of)
        if new_ids:
            pipe.hset(keys.thread_ids(address), mapping=new_ids)
        if new_subjects:
            pipe.hset(keys.thread_subjects(address), mapping=new_subjects)
        for tid, scored in members.items():
            pipe.zadd(keys.thread(address, tid), scored)
        pipe.execute()
    contacts.record(r, address, seen)


def _ids_of(m: _Message) -> list[str]:
    """The Message-IDs that tie a message to others, nearest first: its own, its In-Reply-To,
    then its References from the last (the parent) back."""
    own = m.values[F.MSGID].strip().strip("<>").strip()
    chain = [own] if own else []
    chain += m.values[F.INREPLYTO].split()
    chain += list(reversed(m.values[F.REFERENCES].split()))
    out: list[str] = []
    for i in chain:
        if i and i not in out:
            out.append(i)
    return out


def _people(address: str, m: _Message) -> list[contacts.Seen]:
    """Whom the user wrote to (a sent message's To and Cc) or heard from (a received one's From)."""
    if m.kind == "sent":
        pairs = email.utils.getaddresses([m.values[F.TO], m.values[F.CC]])
    elif m.kind == "received":
        pairs = email.utils.getaddresses([m.values[F.FROM]])
    else:
        return []  # the service's own notices are nobody the user writes to
    return [contacts.Seen(addr, name, m.ts) for name, addr in pairs if addr != address]


def thread_id(r: redis.Redis, address: str, msg_id: str) -> str | None:
    value = r.hget(keys.thread_of(address), msg_id)
    return None if value is None else _text(value)


CONVERSATION_LIMIT = 100  # newest messages a conversation shows; older ones are counted


def conversation(r: redis.Redis, address: str, msg_id: str) -> tuple[list[str], int]:
    """(ids of the message's conversation oldest first, the newest CONVERSATION_LIMIT; how many
    messages it has in all); ([], 0) when the message is not indexed."""
    tid = thread_id(r, address, msg_id)
    if tid is None:
        return [], 0
    key = keys.thread(address, tid)
    with r.pipeline(transaction=False) as pipe:
        pipe.zcard(key)
        pipe.zrange(key, -CONVERSATION_LIMIT, -1)
        total, ids = pipe.execute()
    return [_text(i) for i in ids], int(total)


# The pending check, then the message's conversation (KEYS as there; ARGV: SKEW_MS, BATCH,
# the message id, the conversation keys' prefix, CONVERSATION_LIMIT).  {1} when the index is
# behind, else {0, messages in the conversation, the newest ids}: a message page's one round trip.
_CONVERSATION_LUA = _PENDING_CHECK + """
local tid = redis.call('HGET', KEYS[2], ARGV[3])
if not tid then return {0, 0, {}} end
local key = ARGV[4] .. tid
return {0, redis.call('ZCARD', key), redis.call('ZRANGE', key, -tonumber(ARGV[5]), -1)}
"""


def current_conversation(r: redis.Redis, address: str, msg_id: str) -> tuple[list[str], int]:
    """catch_up, then conversation: in one round trip when the index is up to date (the usual
    case, and what every message page asks)."""
    folders = [keys.folder(address, name) for name in FOLDERS]
    script = r.register_script(_CONVERSATION_LUA)
    found: Any = script(keys=[keys.thread_mark(address), keys.thread_of(address), *folders],
                        args=[SKEW_MS, BATCH, msg_id, keys.thread(address, ""), CONVERSATION_LIMIT])
    return current_from(r, address, msg_id, found)


def queue_current(pipe: Any, address: str, msg_id: str) -> None:
    """Queue current_conversation's read on a pipeline, for a caller that reads more in the same
    round trip (the message page: issue 17); its reply goes to `current_from`."""
    pipe.execute_command("EVAL", _CONVERSATION_LUA, 2 + len(FOLDERS), keys.thread_mark(address),
                         keys.thread_of(address), *(keys.folder(address, name) for name in FOLDERS),
                         SKEW_MS, BATCH, msg_id, keys.thread(address, ""), CONVERSATION_LIMIT)


def current_from(r: redis.Redis, address: str, msg_id: str, found: Any) -> tuple[list[str], int]:
    """current_conversation's result from its script's reply (`queue_current`'s)."""
    if found[0]:
        catch_up(r, address)
        return conversation(r, address, msg_id)
    return [_text(i) for i in found[2]], int(found[1])


def forget(r: redis.Redis, address: str, msg_ids: list[str]) -> None:
    """Take messages that are gone (deleted for good) out of their conversations."""
    if not msg_ids:
        return
    tids = r.hmget(keys.thread_of(address), msg_ids)
    with r.pipeline(transaction=True) as pipe:
        for msg_id, tid in zip(msg_ids, tids, strict=True):
            if tid is not None:
                pipe.zrem(keys.thread(address, _text(tid)), msg_id)
        pipe.hdel(keys.thread_of(address), *msg_ids)
        pipe.execute()


def group_ids(r: redis.Redis, address: str, folder: str, limit: int) -> list[tuple[str, list[str]]]:
    """The folder's conversations, newest first: (conversation id, its ids in this folder newest
    first), from the newest `limit` messages of the folder."""
    found: Any = r.zrevrange(keys.folder(address, folder), 0, limit - 1)
    ids = [_text(i) for i in found]
    if not ids:
        return []
    tids = r.hmget(keys.thread_of(address), ids)
    groups: dict[str, list[str]] = {}
    for msg_id, tid in zip(ids, tids, strict=True):
        # Not indexed yet (arrived since the catch-up): a conversation of its own for now.
        groups.setdefault(_text(tid) if tid is not None else f"={msg_id}", []).append(msg_id)
    return list(groups.items())


def sizes(r: redis.Redis, address: str, tids: list[str]) -> list[int]:
    """Messages in each conversation, across folders."""
    with r.pipeline(transaction=False) as pipe:
        for tid in tids:
            pipe.zcard(keys.thread(address, tid))
        return [int(n) for n in pipe.execute()]
