"""Reconcile: put every fallback message into the user's real mailbox, exactly once.

The `Reconciler` owns a run: the settings and the main store's address, the
check that the master login works before anything changes, and the pool of
mailboxes worked on `concurrency` at a time.  One mailbox's work is a
`MailboxJob` (fallback/reconcile/job.py: the per-message state machine);
the states live in Redis (fallback/reconcile/state.py), read and written
through `RetryingStates`, which repeats a call whose Redis connection broke
under it; the wire is fallback/reconcile/imap.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

import redis.asyncio as aioredis
import redis.exceptions

from fallback.config import Settings
from fallback.errors import ReconcileError, StorageError
from fallback.maillog import MailLog
from fallback.reconcile.imap import ConnectionLost, ImapTarget, ServerRefused, Session
from fallback.reconcile.job import MailboxJob
from fallback.reconcile.report import MailboxReport, NoProgress, ProgressSink, Report
from fallback.reconcile.state import Item, MessageStates, Record

log = logging.getLogger(__name__)
T = TypeVar("T")

CHUNK = 100                      # messages read and marked per Redis round trip
REDIS_TRIES = 4                  # a Redis call whose connection broke: tried this often in all
REDIS_BACKOFF = 0.1              # seconds before the 2nd try, doubling after


def broken_redis_connection(exc: BaseException) -> bool:
    """A Redis call failed because its connection broke: the same call on a new one may work.

    Besides redis-py's own ConnectionError / TimeoutError (not a refused password), the
    asyncio client can leak the transport's AttributeError when a connection is closed
    under a command (redis-py issue #4287: `'NoneType' object has no attribute
    'writelines'`, or '_add_writer' on Python 3.13).  Only that signature, raised inside
    redis-py, counts: any other AttributeError is a bug and stays one.
    """
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return False
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return True
    if not (isinstance(exc, AttributeError) and exc.obj is None
            and exc.name in ("writelines", "_add_writer")):
        return False
    inside = os.path.dirname(redis.exceptions.__file__) + os.sep
    return any(frame.filename.startswith(inside) for frame in traceback.extract_tb(exc.__traceback__))


class RetryingStates(MessageStates):
    """MessageStates whose calls are repeated, a few times with a short backoff, on a broken connection.

    Safe because every one of them can run twice: reads; writes that set fields; and
    scripts that take an id off the pending list or put `appending` back to `pending`
    only under a condition that the first run leaves as it found it.
    """

    async def _again(self, what: str, address: str, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 1
        while True:
            try:
                return await call()
            except Exception as exc:
                if not broken_redis_connection(exc):
                    raise
                if attempt >= REDIS_TRIES:
                    raise StorageError(f"Redis: {what} failed {REDIS_TRIES} times, the connection broke "
                                       f"each time ({type(exc).__name__}: {exc})") from exc
                log.warning("reconcile of %s: Redis connection broke during %s (%s: %s); try %d of %d",
                            address, what, type(exc).__name__, exc, attempt + 1, REDIS_TRIES)
                await asyncio.sleep(REDIS_BACKOFF * 2 ** (attempt - 1))
                attempt += 1

    async def pending(self, address: str) -> list[str]:
        return await self._again("reading the pending list", address,
                                 lambda: MessageStates.pending(self, address))

    async def left(self, address: str) -> int:
        return await self._again("counting what is left", address, lambda: MessageStates.left(self, address))

    async def items(self, address: str, ids: list[str]) -> list[Item | None]:
        return await self._again("reading message states", address,
                                 lambda: MessageStates.items(self, address, ids))

    async def forget(self, address: str, msg_id: str) -> None:
        await self._again("dropping a deleted message", address,
                          lambda: MessageStates.forget(self, address, msg_id))

    async def deleted_for_good(self, address: str, ids: list[str]) -> int:
        return await self._again("reading tombstones", address,
                                 lambda: MessageStates.deleted_for_good(self, address, ids))

    async def raws(self, address: str, items: list[Item]) -> list[bytes | None]:
        return await self._again("reading messages", address,
                                 lambda: MessageStates.raws(self, address, items))

    async def record(self, address: str, entries: Iterable[Record]) -> None:
        entries = list(entries)   # a generator could not be sent twice
        await self._again("recording states", address, lambda: MessageStates.record(self, address, entries))

    async def unmark(self, address: str, items: Iterable[Item]) -> None:
        items = list(items)
        await self._again("putting unsent messages back", address,
                          lambda: MessageStates.unmark(self, address, items))


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
        self.states: MessageStates = RetryingStates(r)
        self.password = password
        self.dry_run = dry_run
        self.progress = progress or NoProgress()
        self.maillog = maillog or MailLog()
        # Counted (and traced, issue 16) even when the log's lines are off.
        self.log_on = self.maillog.logger.isEnabledFor(logging.INFO) or self.maillog.counters is not None

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

    async def _lanes(self, address: str, report: MailboxReport, first: Session, chunks: list[list[str]],
                     lanes: int) -> None:
        """A mailbox's chunks, in order, over `lanes` sessions: a big mailbox is not one connection's
        round trips after another.  Each chunk is one lane's alone, so each id has one writer;
        the first failure stops the lanes taking more, and is raised once all have settled.
        """
        queue: asyncio.Queue[list[str]] = asyncio.Queue()
        for c in chunks:
            queue.put_nowait(c)
        stop = asyncio.Event()

        async def lane(session: Session | None) -> None:
            if session is None:
                try:
                    session = await self._login(address)
                except ReconcileError as exc:   # the first lane goes on: fewer lanes, same outcome
                    log.warning("reconcile of %s: an extra connection failed (%s)", address, exc.reason)
                    return
            session.readonly = self.dry_run   # EXAMINE, never SELECT: nothing changes
            job = MailboxJob(self, session, address, report)
            try:
                while not stop.is_set() and not queue.empty():
                    await job.chunk(queue.get_nowait())
            except BaseException:
                stop.set()
                raise
            finally:
                await asyncio.gather(job.settle(), session.close())

        results = await asyncio.gather(lane(first), *(lane(None) for _ in range(lanes - 1)),
                                       return_exceptions=True)
        report.folders_created[:] = list(dict.fromkeys(report.folders_created))  # each lane's CREATE
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def mailbox(self, address: str) -> MailboxReport:
        """One mailbox, start to end; every failure ends up in the report, never raised."""
        report = MailboxReport(address)
        try:
            ids = await self.states.pending(address)
            report.left = len(ids)
            if not ids:
                return report
            chunks = [ids[start : start + CHUNK] for start in range(0, len(ids), CHUNK)]
            lanes = 1 if self.dry_run else min(self.settings.reconcile_mailbox_connections, len(chunks))
            try:
                first = await self._login(address)
            except ReconcileError as exc:
                report.error = exc.reason
                self.progress.messages(len(ids))
                return report
            await self._lanes(address, report, first, chunks, lanes)
        except (ReconcileError, StorageError) as exc:
            report.error = exc.reason
        except Exception as exc:  # one mailbox's surprise never stops the others
            log.exception("reconcile of %s failed", address)
            report.error = f"internal error: {type(exc).__name__}: {exc}"
        if not self.dry_run:
            with contextlib.suppress(Exception):
                report.left = await self.states.left(address)
        if report.error:
            self.maillog.failed(None, None, address, reason=report.error, stage="reconcile")
        return report
