"""One mailbox's reconcile run: its IMAP session, its folder names, and each message's step.

A chunk of pending ids is read, then each message is appended (pending), looked
up (appending: the last run may have stored it), or brought up to date (done:
moved, flags changed).  `appending` is written (durably) before the APPEND is
sent, and `done` after the server's OK.  A message still `appending` at the
start of a run may or may not be in the main store (the last run died, or its
connection broke, between the two): it is looked up with UID SEARCH HEADER
Received <id> -- our own unique id, never a sender-controlled string -- and
appended only if absent.  The Redis side is fallback/reconcile/state.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from fallback.config import Settings
from fallback.mailbox.fields import (
    APPENDING,
    DONE,
    DRAFTS,
    FAILED,
    INBOX,
    RBOX,
    RERROR,
    RFLAGS,
    RFOLDER,
    RSTATE,
    RTS,
    RUID,
    RUIDVALIDITY,
    SENT,
    TRASH,
)
from fallback.maillog import MailLog
from fallback.reconcile.imap import (
    ConnectionLost,
    ServerRefused,
    Session,
    byte_changes,
    decode_mailbox,
    encode_mailbox,
)
from fallback.reconcile.report import Failure, MailboxReport, ProgressSink
from fallback.reconcile.state import NEVER, Item, MessageStates, Record, size_batches


class Run(Protocol):
    """What a mailbox's job needs of the run it belongs to (fallback.reconcile.reconciler.Reconciler)."""

    settings: Settings
    states: MessageStates
    dry_run: bool
    progress: ProgressSink
    maillog: MailLog
    log_on: bool

log = logging.getLogger(__name__)

RAW_BATCH_BYTES = 8 * 1024 * 1024  # raw bytes fetched from Redis at once
_ROLES = {SENT: "\\sent", TRASH: "\\trash", DRAFTS: "\\drafts"}  # RFC 6154 SPECIAL-USE


def _runs(batch: list[Item], raws: list[bytes | None], most: int) -> list[list[tuple[Item, bytes | None]]]:
    """The batch cut into APPEND commands: consecutive messages of one box, at most `most`.

    A message with NUL bytes (a literal8 and a check after it) or deleted meanwhile
    (raw None) goes alone.
    """
    out: list[list[tuple[Item, bytes | None]]] = []
    for item, raw in zip(batch, raws, strict=True):
        alone = raw is None or b"\0" in raw
        last = out[-1] if out else None
        if (last is not None and not alone and len(last) < most and last[0][1] is not None
                and b"\0" not in last[0][1] and last[0][0].rbox == item.rbox):
            last.append((item, raw))
        else:
            out.append([(item, raw)])
    return out


class MailboxJob:
    """The state of one mailbox's run: its session, folder names and pending outcomes."""

    def __init__(self, rec: Run, session: Session, address: str, report: MailboxReport) -> None:
        self.rec = rec
        self.states = rec.states
        self.s = session
        self.address = address
        self.report = report
        self.boxes: dict[str, str] = {INBOX: "INBOX"}
        self.existing: set[str] = set()
        self.resolved = False
        self.outcomes: list[Record] = []
        self.writing: asyncio.Future[None] | None = None

    @property
    def maillog(self) -> MailLog:
        return self.rec.maillog

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
                          else self.rec.settings.reconcile_trash_folder if folder == TRASH
                          else DRAFTS)  # issue 15: unsent drafts, with their \Draft flag
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
        items: list[Item] = []
        gone: list[str] = []
        for msg_id, item in zip(ids, await self.states.items(self.address, ids), strict=True):
            if item is None:
                gone.append(msg_id)
                if not self.rec.dry_run:
                    await self.states.forget(self.address, msg_id)
            else:
                items.append(item)
        if gone:  # deleted for good by the user (Empty Trash): counted, never appended
            self.report.deleted_for_good += await self.states.deleted_for_good(self.address, gone)

        to_append: list[Item] = []
        to_update: list[Item] = []
        for item in items:
            if item.rstate == APPENDING:
                if await self._recover(item):
                    to_update.append(item)
                else:
                    to_append.append(item)
            elif item.rstate == DONE:
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

    async def _recover(self, item: Item) -> bool:
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
        item.rstate, item.rbox, item.ruidvalidity, item.ruid = DONE, box, self.s.uidvalidity, uids[0]
        item.rfolder = item.rfolder or item.folder
        self.maillog.reconciled(item.id, self.address, outcome="already-present", folder=decode_mailbox(box))
        return True

    async def _changed(self, item: Item) -> bool:
        if item.rfolder != item.folder or set(item.rflags.split()) != set(item.flag_list):
            return True
        return item.rbox != await self.box(item.folder)

    def _done(self, item: Item) -> None:
        """Queue the `done` record of what the main store now holds for this message."""
        self.outcomes.append(Record(item.id, item.rfolder, item.rflags, {
            RSTATE: DONE, RBOX: item.rbox, RFOLDER: item.rfolder, RFLAGS: item.rflags,
            RUIDVALIDITY: "" if item.ruidvalidity is None else item.ruidvalidity,
            RUID: "" if item.ruid is None else item.ruid,
            RTS: int(time.time() * 1000), RERROR: "",
        }))

    def _fail(self, item: Item, reason: str, state: str) -> None:
        self.report.failed.append(Failure(item.id, item.folder, reason))
        self.outcomes.append(Record(item.id, NEVER, "", {RSTATE: state, RERROR: reason}))
        self.maillog.failed(item.id, None, self.address, reason=reason, stage="reconcile")

    async def _flush(self) -> None:
        """Write the chunk's outcomes in the background while the next chunk goes on.

        Safe to overlap: until it lands, those messages read as `appending`, which a
        later run resolves by looking them up.
        """
        await self.settle()
        if self.outcomes:
            self.writing = asyncio.ensure_future(self.states.record(self.address, self.outcomes))
            self.outcomes = []

    async def settle(self) -> None:
        """Wait for the background write; also writes anything still queued."""
        if self.writing is not None:
            writing, self.writing = self.writing, None
            await writing
        if self.outcomes:
            outcomes, self.outcomes = self.outcomes, []
            await self.states.record(self.address, outcomes)

    # -- APPEND ------------------------------------------------------------------------------

    async def _append_all(self, items: list[Item]) -> None:
        if not items:
            return
        # Durable `appending` marks (with the box and flags about to be written) before any APPEND.
        marks = []
        for item in items:
            item.rbox = await self.box(item.folder)
            item.rfolder, item.rflags = item.folder, item.flags
            marks.append(Record(item.id, NEVER, "", {RSTATE: APPENDING, RBOX: item.rbox,
                                                     RFOLDER: item.rfolder, RFLAGS: item.rflags}))
        await self.states.record(self.address, marks)
        attempted = 0
        per_command = self.rec.settings.reconcile_append_batch if self.s.can_multiappend() else 1
        try:
            for batch in size_batches(items, RAW_BATCH_BYTES):
                raws = await self.states.raws(self.address, batch)
                for run in _runs(batch, raws, per_command):
                    attempted += len(run)
                    sendable = [(item, raw) for item, raw in run if raw is not None]
                    if len(sendable) > 1:
                        await self._append_many(sendable)
                    elif sendable:   # none: deleted meanwhile, the record script drops it
                        await self._append(*sendable[0])
        except ConnectionLost:
            # Sent-but-unanswered stays `appending` (looked up next run); never-sent goes back.
            await self.states.unmark(self.address, items[attempted:])
            raise

    async def _append(self, item: Item, raw: bytes) -> None:
        try:
            validity, uid = await self.s.append(item.rbox, raw, item.flag_list, item.ts)
        except ServerRefused as exc:
            self._fail(item, exc.reason, FAILED)
            self.rec.progress.messages(1)
            return
        except ConnectionLost as exc:
            reason = (f"connection lost during APPEND ({exc.reason}): outcome unknown, the next run "
                      "looks it up by id before appending again")
            self.report.failed.append(Failure(item.id, item.folder, reason))
            self.outcomes.append(Record(item.id, NEVER, "", {RERROR: reason}))
            raise
        self._appended(item, validity, uid, raw)
        if b"\0" in raw:
            await self._check_stored(item, raw)

    async def _append_many(self, run: list[tuple[Item, bytes]]) -> None:
        """One MULTIAPPEND for a run of one box: all stored or none (RFC 3502).

        Refused (one message over quota, say): none was stored, so each goes again on its
        own and only the ones the server refuses fail.  Connection lost: every one of
        them stays `appending`, looked up by id next run.
        """
        box = run[0][0].rbox
        try:
            validity, uids = await self.s.append_many(box, [(raw, i.flag_list, i.ts) for i, raw in run])
        except ServerRefused:
            for item, raw in run:
                await self._append(item, raw)
            return
        except ConnectionLost as exc:
            reason = (f"connection lost during APPEND ({exc.reason}): outcome unknown, the next run "
                      "looks it up by id before appending again")
            for item, _ in run:
                self.report.failed.append(Failure(item.id, item.folder, reason))
                self.outcomes.append(Record(item.id, NEVER, "", {RERROR: reason}))
            raise
        for n, (item, raw) in enumerate(run):
            self._appended(item, validity if uids else None, uids[n] if uids else None, raw)

    def _appended(self, item: Item, validity: int | None, uid: int | None, raw: bytes) -> None:
        item.rstate, item.ruidvalidity, item.ruid = DONE, validity, uid
        self.report.appended += 1
        if item.folder == DRAFTS:
            self.report.drafts += 1
        self._done(item)
        if self.rec.log_on:   # the hot path: skip formatting a line nobody will see
            self.maillog.reconciled(item.id, self.address, outcome="appended",
                                    folder=decode_mailbox(item.rbox), uid=uid)
        self.rec.progress.messages(1)

    async def _check_stored(self, item: Item, raw: bytes) -> None:
        """A message with NUL bytes: fetch it back and report it when the server changed it.

        Only these messages (IMAP's one byte a server may not take as sent) cost the extra
        download; it is `done` either way -- appending it again would not change the
        outcome -- and the fallback keeps the bytes as received.
        """
        try:
            uid = item.ruid
            if uid is None:   # no UIDPLUS: find it by our id
                found = await self.s.find(item.rbox, item.id, item.ts)
                uid = found[0] if found else None
            if uid is None:
                change: str | None = "not found after its APPEND"
            else:
                stored = await self.s.fetch_message(item.rbox, uid)
                change = byte_changes(raw, stored, binary=self.s.wants_binary(raw))
        except ServerRefused as exc:
            change = f"its bytes could not be checked: {exc.reason}"
        except ConnectionLost as exc:
            self._changed_bytes(item, f"its bytes could not be checked: {exc.reason}")
            raise
        if change is not None:
            self._changed_bytes(item, change)

    def _changed_bytes(self, item: Item, change: str) -> None:
        reason = f"NUL bytes: stored, but {change}"
        self.report.changed.append(Failure(item.id, item.folder, reason))
        self.maillog.alert(item.id, self.address, reason=f"reconcile: {reason}")

    # -- changes after a message was reconciled ------------------------------------------------

    async def _update(self, item: Item) -> None:
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
            self._fail(item, exc.reason, DONE)
            self.rec.progress.messages(1)
            return
        item.rfolder, item.rflags = item.folder, item.flags
        self.report.updated += 1
        self._done(item)
        self.maillog.reconciled(item.id, self.address, outcome="updated", folder=decode_mailbox(item.rbox),
                                uid=item.ruid)
        self.rec.progress.messages(1)

    async def _locate(self, item: Item) -> int | None:
        """The message's UID in rbox: the recorded one while UIDVALIDITY holds, else by id."""
        validity = await self.s.select(item.rbox)
        if item.ruid is not None and item.ruidvalidity == validity:
            return item.ruid
        found = await self.s.find(item.rbox, item.id, item.ts)
        if not found:
            return None
        item.ruidvalidity, item.ruid = validity, found[0]
        return found[0]
