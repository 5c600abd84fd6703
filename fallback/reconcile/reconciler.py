"""Reconcile: put every fallback message into the user's real mailbox, exactly once.

Each message hash carries its reconcile state next to the raw bytes:

    rstate        pending -> appending -> done, or failed (the server said NO)
    rbox          the main-store mailbox (modified UTF-7) it was / is being appended to
    rfolder       the fallback folder (INBOX/Sent/Trash) as last synced
    rflags        the flags as last synced
    ruidvalidity  UIDVALIDITY and UID from APPENDUID (or COPYUID after a move)
    ruid
    rts           when it was synced (ms), rerror: the server's reason for the last failure

`appending` is written (durably) before the APPEND is sent, and `done` after
the server's OK.  A message still `appending` at the start of a run may or may
not be in the main store (the last run died, or its connection broke, between
the two): it is looked up with UID SEARCH HEADER Received <id> -- our own
unique id, never a sender-controlled string -- and appended only if absent.
The per-mailbox `pending` set is the work list; an id leaves it only when the
state recorded equals the message's current folder and flags, checked
atomically in Redis, so a webmail change made while we worked is kept for the
next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from fallback import keys
from fallback.config import Settings
from fallback.errors import ReconcileError
from fallback.mailbox.fields import INBOX, SENT, TRASH
from fallback.maillog import MailLog
from fallback.reconcile.imap import (
    ConnectionLost,
    ImapTarget,
    ServerRefused,
    Session,
    decode_mailbox,
    encode_mailbox,
)
from fallback.reconcile.report import Failure, MailboxReport, NoProgress, ProgressSink, Report

log = logging.getLogger(__name__)

CHUNK = 100                      # messages read and marked per Redis round trip
RAW_BATCH_BYTES = 8 * 1024 * 1024  # raw bytes fetched from Redis at once
_META = ("folder", "flags", "ts", "size", "rstate", "rbox", "rfolder", "rflags", "ruidvalidity", "ruid")
_ROLES = {SENT: "\\sent", TRASH: "\\trash"}
_NEVER = "\0"  # a folder no message has: "do not take the id off the pending list"
_SEP = "\x1f"  # between the fields of one entry of _RECORD_LUA

# KEYS: the pending set, then one message hash per entry.  ARGV: one string per entry,
# fields joined by \x1f (packing one argument per message, not a dozen, halves the
# client's CPU per message): id, synced folder, synced flags, then field/value pairs.
# Writes the state only while the message exists (never a stub hash), and takes the id
# off the pending list only when its folder and flags are still those just synced.  One
# call per chunk: the batch is atomic and costs one round trip.
_RECORD_LUA = """
for k = 2, #KEYS do
  local e = {}
  for part in string.gmatch(ARGV[k - 1] .. '\\31', '([^\\31]*)\\31') do e[#e + 1] = part end
  local id, folder, flags = e[1], e[2], e[3]
  if redis.call('EXISTS', KEYS[k]) == 0 then
    redis.call('SREM', KEYS[1], id)
  else
    if #e > 3 then redis.call('HSET', KEYS[k], unpack(e, 4)) end
    if folder ~= '\\0' and redis.call('HGET', KEYS[k], 'folder') == folder
       and (redis.call('HGET', KEYS[k], 'flags') or '') == flags then
      redis.call('SREM', KEYS[1], id)
    end
  end
end
return 0
"""
# Reads for a whole chunk in one command each (KEYS: the message hashes): per-message
# commands cost more client CPU to pack than the APPENDs they feed.
_META_LUA = """
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HMGET', KEYS[i], unpack(ARGV)) end
return out
"""
_RAW_LUA = """
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HGET', KEYS[i], 'raw') or false end
return out
"""
# Puts a message marked `appending` but never sent back to `pending`.
_UNMARK_LUA = """
if redis.call('HGET', KEYS[1], 'rstate') == 'appending' then
  redis.call('HSET', KEYS[1], 'rstate', ARGV[1])
end
return 0
"""


@dataclass
class _Item:
    """One message's metadata as read at the start of its chunk."""

    id: str
    folder: str
    flags: str
    ts: int
    size: int
    rstate: str
    rbox: str
    rfolder: str
    rflags: str
    ruidvalidity: int | None
    ruid: int | None

    @classmethod
    def parse(cls, msg_id: str, values: Sequence[bytes | None]) -> _Item | None:
        if values[0] is None:
            return None  # deleted since it was listed
        v = [x.decode("utf-8", "replace") if x is not None else "" for x in values]
        return cls(msg_id, v[0], v[1], int(v[2] or 0), int(v[3] or 0), v[4] or "pending", v[5], v[6],
                   v[7], int(v[8]) if v[8].isdigit() else None, int(v[9]) if v[9].isdigit() else None)

    @property
    def flag_list(self) -> list[str]:
        return self.flags.split()


def read_password(path: Any) -> str:
    """The master password: the file's first line, without its line end."""
    try:
        text = open(path, encoding="utf-8").read()  # noqa: SIM115 - one small read
    except OSError as exc:
        raise ReconcileError(f"cannot read the master password file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ReconcileError(f"the master password file {path} is not UTF-8 text") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise ReconcileError(f"the master password file {path} is empty")
    return password


class Reconciler:
    """Runs reconcile for a list of mailboxes, `concurrency` at a time."""

    def __init__(self, settings: Settings, r: aioredis.Redis, password: str, *, dry_run: bool = False,
                 progress: ProgressSink | None = None, maillog: MailLog | None = None) -> None:
        if not settings.imap_url:
            raise ReconcileError("no main store given: use --imap-url imap://HOST:PORT")
        if not settings.master_user:
            raise ReconcileError("no master user given: use --master-user NAME")
        self.settings = settings
        self.target = ImapTarget.from_url(settings.imap_url, settings.imap_timeout, settings.imap_ca_file)
        self.r = r
        self.password = password
        self.dry_run = dry_run
        self.progress = progress or NoProgress()
        self.maillog = maillog or MailLog()
        self._record = r.register_script(_RECORD_LUA)
        self.log_on = self.maillog.logger.isEnabledFor(logging.INFO)
        self._meta = r.register_script(_META_LUA)
        self._raw = r.register_script(_RAW_LUA)

    async def _login(self, address: str) -> Session:
        s = self.settings
        return await Session.open(self.target, address, s.master_user or "", self.password,
                                  s.master_separator)

    async def preflight(self, addresses: Sequence[str], tries: int = 3) -> None:
        """Refuse the whole run, before anything changes, when the master login cannot work.

        A refusal for one user may mean that user is missing from the main store; the
        same refusal for the first few users means the master user or password is wrong.
        """
        errors = []
        for address in list(addresses)[:tries]:
            try:
                session = await self._login(address)
            except ServerRefused as exc:
                if "AUTHORIZATIONFAILED" in exc.reason.upper():
                    return  # the master login worked; this user is just not allowed / missing
                errors.append(exc.reason)
                continue
            except ConnectionLost as exc:
                raise ReconcileError(f"{exc.reason}; nothing was changed") from None
            await session.close()
            return
        if errors:
            raise ReconcileError(
                f"{errors[0]} -- check --master-user and --master-password-file "
                f"(refused for the first {len(errors)} mailbox(es)); nothing was changed")

    async def run(self, addresses: Sequence[str]) -> Report:
        report = Report(self.dry_run, str(self.target))
        await self.preflight(addresses)
        queue: asyncio.Queue[str] = asyncio.Queue()
        for a in addresses:
            queue.put_nowait(a)

        async def worker() -> None:
            while True:
                try:
                    address = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                result = await self.mailbox(address)
                report.mailboxes[address] = result
                self.progress.mailbox_done(result)

        workers = max(1, min(self.settings.reconcile_concurrency, len(addresses)))
        await asyncio.gather(*(worker() for _ in range(workers)))
        report.finished = time.time()
        return report

    async def mailbox(self, address: str) -> MailboxReport:
        """One mailbox, start to end; every failure ends up in the report, never raised."""
        report = MailboxReport(address)
        try:
            ids = sorted(m.decode() if isinstance(m, bytes) else m
                         for m in await self.r.smembers(keys.pending(address)))
            report.left = len(ids)
            if not ids:
                return report
            try:
                session = await self._login(address)
            except ReconcileError as exc:
                report.error = exc.reason
                self.progress.messages(len(ids))
                return report
            session.readonly = self.dry_run   # EXAMINE, never SELECT: nothing changes
            job = _MailboxJob(self, session, address, report)
            try:
                for start in range(0, len(ids), CHUNK):
                    await job.chunk(ids[start : start + CHUNK])
            finally:
                await asyncio.gather(job.settle(), session.close())
        except ReconcileError as exc:
            report.error = exc.reason
        except Exception as exc:  # one mailbox's surprise never stops the others
            log.exception("reconcile of %s failed", address)
            report.error = f"internal error: {type(exc).__name__}: {exc}"
        if not self.dry_run:
            with contextlib.suppress(Exception):
                report.left = int(await self.r.scard(keys.pending(address)))
        if report.error:
            self.maillog.event("failed", rcpt=address, stage="reconcile", reason=report.error)
        return report


class _MailboxJob:
    """The state of one mailbox's run: its session, folder names and pending outcomes."""

    def __init__(self, rec: Reconciler, session: Session, address: str, report: MailboxReport) -> None:
        self.rec = rec
        self.s = session
        self.address = address
        self.report = report
        self.boxes: dict[str, str] = {INBOX: "INBOX"}
        self.existing: set[str] = set()
        self.resolved = False
        self.outcomes: list[tuple[str, str, str, dict[str, Any]]] = []
        self.writing: asyncio.Future[None] | None = None

    # -- folders --------------------------------------------------------------------------

    async def resolve_folders(self) -> None:
        """Sent/Trash: the server's SPECIAL-USE mailboxes, else the configured names.

        Done on the first need only: a mailbox with nothing but INBOX mail costs no LIST.
        """
        self.resolved = True
        folders = await self.s.folders()
        self.existing = {f.name for f in folders}
        for folder, role in _ROLES.items():
            found = next((f.name for f in folders if role in f.attributes), None)
            configured = (self.rec.settings.reconcile_sent_folder if folder == SENT
                          else self.rec.settings.reconcile_trash_folder)
            self.boxes[folder] = found or encode_mailbox(configured)

    async def box(self, folder: str) -> str:
        """The main-store mailbox of a fallback folder, created on first use."""
        if folder != INBOX and not self.resolved:
            await self.resolve_folders()
        name = self.boxes.get(folder, "INBOX")
        if name.upper() != "INBOX" and name not in self.existing:
            self.report.folders_created.append(decode_mailbox(name))
            if not self.rec.dry_run:
                await self.s.create(name)
            self.existing.add(name)
        return name

    # -- one chunk ---------------------------------------------------------------------------

    async def chunk(self, ids: list[str]) -> None:
        r = self.rec.r
        rows = await self.rec._meta(keys=[keys.message(self.address, i) for i in ids], args=list(_META))
        items: list[_Item] = []
        for msg_id, values in zip(ids, rows, strict=True):
            item = _Item.parse(msg_id, values)
            if item is None:
                if not self.rec.dry_run:
                    await r.srem(keys.pending(self.address), msg_id)
            else:
                items.append(item)

        to_append: list[_Item] = []
        to_update: list[_Item] = []
        for item in items:
            if item.rstate == "appending":
                if await self._recover(item):
                    to_update.append(item)
                else:
                    to_append.append(item)
            elif item.rstate == "done":
                to_update.append(item)
            else:
                to_append.append(item)

        if self.rec.dry_run:
            self.report.would_append += len(to_append)
            for item in to_update:
                if await self._changed(item):
                    self.report.would_update += 1
            for item in to_append:
                await self.box(item.folder)
            self.rec.progress.messages(len(items))
            return

        try:
            await self._append_all(to_append)
            for item in to_update:
                await self._update(item)
        finally:
            await self._flush()

    async def _recover(self, item: _Item) -> bool:
        """A message left `appending`: is it already in the main store?  True when found."""
        box = item.rbox or await self.box(item.folder)
        if box.upper() != "INBOX" and not self.resolved:
            await self.resolve_folders()
        if box not in self.existing and box.upper() != "INBOX":
            return False
        uids = await self.s.find(box, item.id, item.ts)
        if not uids:
            return False
        if len(uids) > 1:
            log.warning("%s: id %s found %d times in %s", self.address, item.id, len(uids), box)
        self.report.already_present += 1
        # What was appended: the box and flags written with the `appending` mark.
        item.rstate, item.rbox, item.ruidvalidity, item.ruid = "done", box, self.s.uidvalidity, uids[0]
        item.rfolder = item.rfolder or item.folder
        self.maillog.event("reconciled", id=item.id, rcpt=self.address, outcome="already-present",
                           box=decode_mailbox(box))
        return True

    @property
    def maillog(self) -> MailLog:
        return self.rec.maillog

    async def _changed(self, item: _Item) -> bool:
        if item.rfolder != item.folder or set(item.rflags.split()) != set(item.flag_list):
            return True
        return item.rbox != await self.box(item.folder)

    def _done(self, item: _Item) -> None:
        """Queue the `done` record of what the main store now holds for this message."""
        self.outcomes.append((item.id, item.rfolder, item.rflags, {
            "rstate": "done", "rbox": item.rbox, "rfolder": item.rfolder, "rflags": item.rflags,
            "ruidvalidity": "" if item.ruidvalidity is None else item.ruidvalidity,
            "ruid": "" if item.ruid is None else item.ruid,
            "rts": int(time.time() * 1000), "rerror": "",
        }))

    def _fail(self, item: _Item, reason: str, state: str) -> None:
        self.report.failed.append(Failure(item.id, item.folder, reason))
        self.outcomes.append((item.id, _NEVER, "", {"rstate": state, "rerror": reason}))
        self.maillog.event("failed", id=item.id, rcpt=self.address, stage="reconcile", reason=reason)

    async def _flush(self) -> None:
        """Write the chunk's outcomes in the background while the next chunk goes on.

        Safe to overlap: until it lands, those messages read as `appending`, which a
        later run resolves by looking them up.
        """
        await self.settle()
        if self.outcomes:
            self.writing = asyncio.ensure_future(self._write(self.outcomes))
            self.outcomes = []

    async def settle(self) -> None:
        """Wait for the background write; also writes anything still queued."""
        if self.writing is not None:
            writing, self.writing = self.writing, None
            await writing
        if self.outcomes:
            outcomes, self.outcomes = self.outcomes, []
            await self._write(outcomes)

    async def _write(self, entries: list[tuple[str, str, str, dict[str, Any]]]) -> None:
        """Record states of many messages in one atomic script call (see _RECORD_LUA)."""
        keys_: list[str] = [keys.pending(self.address)]
        args: list[str] = []
        for msg_id, folder, flags, fields in entries:
            keys_.append(keys.message(self.address, msg_id))
            parts = [msg_id, folder, flags]
            for k, v in fields.items():
                parts += [k, str(v).replace(_SEP, " ")]   # server words could hold anything
            args.append(_SEP.join(parts))
        await self.rec._record(keys=keys_, args=args)

    # -- APPEND ------------------------------------------------------------------------------

    async def _append_all(self, items: list[_Item]) -> None:
        if not items:
            return
        # Durable `appending` marks (with the box and flags about to be written) before any APPEND.
        marks = []
        for item in items:
            item.rbox = await self.box(item.folder)
            item.rfolder, item.rflags = item.folder, item.flags
            marks.append((item.id, _NEVER, "", {"rstate": "appending", "rbox": item.rbox,
                                                 "rfolder": item.rfolder, "rflags": item.rflags}))
        await self._write(marks)
        attempted = 0
        try:
            for batch in _size_batches(items, RAW_BATCH_BYTES):
                raws = await self.rec._raw(keys=[keys.message(self.address, i.id) for i in batch])
                for item, raw in zip(batch, raws, strict=True):
                    attempted += 1
                    if raw is None:
                        continue  # deleted meanwhile: the record script drops it from pending
                    await self._append(item, raw)
        except ConnectionLost:
            # Sent-but-unanswered stays `appending` (looked up next run); never-sent goes back.
            pipe = self.rec.r.pipeline(transaction=False)
            for item in items[attempted:]:
                # EVAL by hand: redis-py refuses script objects in a cluster pipeline.
                pipe.execute_command("EVAL", _UNMARK_LUA, 1, keys.message(self.address, item.id),
                                     "pending")
            await pipe.execute()
            raise

    async def _append(self, item: _Item, raw: bytes) -> None:
        try:
            validity, uid = await self.s.append(item.rbox, raw, item.flag_list, item.ts)
        except ServerRefused as exc:
            self._fail(item, exc.reason, "failed")
            self.rec.progress.messages(1)
            return
        except ConnectionLost as exc:
            reason = (f"connection lost during APPEND ({exc.reason}): outcome unknown, the next run "
                      "looks it up by id before appending again")
            self.report.failed.append(Failure(item.id, item.folder, reason))
            self.outcomes.append((item.id, _NEVER, "", {"rerror": reason}))
            raise
        item.rstate, item.ruidvalidity, item.ruid = "done", validity, uid
        self.report.appended += 1
        self._done(item)
        if self.rec.log_on:   # the hot path: skip formatting a line nobody will see
            self.maillog.event("reconciled", id=item.id, rcpt=self.address, outcome="appended",
                               box=decode_mailbox(item.rbox), uid=uid)
        self.rec.progress.messages(1)

    # -- changes after a message was reconciled ------------------------------------------------

    async def _update(self, item: _Item) -> None:
        if not await self._changed(item):
            self._done(item)   # nothing to do: takes the id off the pending list
            self.rec.progress.messages(1)
            return
        target = await self.box(item.folder)
        try:
            uid = await self._locate(item)
            if uid is None:
                # Gone from where we put it (mailbox re-created, restored from a backup):
                # the fallback copy is the only one left, so it goes in again.
                await self._append_all([item])
                return
            if item.rbox != target:
                new_uid = await self.s.move(uid, target)
                item.rbox = target
                uid = new_uid
                validity = await self.s.select(target)
                if uid is None:
                    found = await self.s.find(target, item.id, item.ts)
                    uid = found[0] if found else None
                item.ruidvalidity, item.ruid = validity, uid
            add = [f for f in item.flag_list if f not in item.rflags.split()]
            remove = [f for f in item.rflags.split() if f not in item.flag_list]
            if uid is not None and (add or remove):
                await self.s.select(item.rbox)
                await self.s.store_flags(uid, add, remove)
        except ServerRefused as exc:
            self._fail(item, exc.reason, "done")
            self.rec.progress.messages(1)
            return
        item.rfolder, item.rflags = item.folder, item.flags
        self.report.updated += 1
        self._done(item)
        self.maillog.event("reconciled", id=item.id, rcpt=self.address, outcome="updated",
                           box=decode_mailbox(item.rbox), uid=item.ruid)
        self.rec.progress.messages(1)

    async def _locate(self, item: _Item) -> int | None:
        """The message's UID in rbox: the recorded one while UIDVALIDITY holds, else by id."""
        validity = await self.s.select(item.rbox)
        if item.ruid is not None and item.ruidvalidity == validity:
            return item.ruid
        found = await self.s.find(item.rbox, item.id, item.ts)
        if not found:
            return None
        item.ruidvalidity, item.ruid = validity, found[0]
        return found[0]


def _size_batches(items: Iterable[_Item], limit: int) -> Iterable[list[_Item]]:
    batch: list[_Item] = []
    size = 0
    for item in items:
        if batch and size + item.size > limit:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item.size
    if batch:
        yield batch
