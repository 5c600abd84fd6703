"""Importing the user directory: CSV or Dovecot passwd-file, idempotent, line-exact errors.

The file's lines come from provisionfile.py, a broken line reported with its number and
reason while the good ones still load (`strict` validates everything first and loads nothing
if any line is bad).  Re-runs compare with what is stored and report added / updated /
unchanged / invalid.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fallback.errors import InputError
from fallback.mailbox import hashcodec, logins, passwords
from fallback.mailbox.directory import DEFAULT_MAILSTORE, RECORD_V1, Directory, Mailbox, encode_record
from fallback.mailbox.provisionfile import (
    CSV_COLUMNS,
    PROGRESS_EVERY,
    Entry,
    FastRows,
    Invalid,
    detect_format,
    needs_hashing,
    read_entries,
    read_items,
)

# What other modules take from here (the file's lines are read in provisionfile.py).
__all__ = ["CHUNK", "CSV_COLUMNS", "PROGRESS_EVERY", "Entry", "FastRows", "Invalid", "Provisioner",
           "Report", "detect_format", "password_problem", "read_entries", "without_cycle_collector"]

# Big chunks let one HMGET/HSET per directory bucket carry many mailboxes (see put_many).
CHUNK = 250_000


@dataclass
class Report:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    invalid: list[Invalid] = field(default_factory=list)
    loaded: bool = True

    @property
    def ok(self) -> bool:
        return not self.invalid


def _chunks(items: Iterable[Entry | Invalid | FastRows], size: int,
            blocks: bool) -> Iterator[list[Entry | Invalid | FastRows]]:
    """Lists of about `size` lines (a FastRows counts its lines)."""
    if not blocks:  # a line an item: taken in C
        it = iter(items)
        while part := list(itertools.islice(it, size)):
            yield part
        return
    chunk: list[Entry | Invalid | FastRows] = []
    lines = 0
    for item in items:
        chunk.append(item)
        lines += len(item.addresses) if type(item) is FastRows else 1
        if lines >= size:
            yield chunk
            chunk, lines = [], 0
    if chunk:
        yield chunk


def _check_hash(password: str) -> str | InputError:
    if needs_hashing(password):
        return ""  # replaced by Provisioner._prepare
    try:
        return passwords.check_stored(password)
    except InputError as exc:
        return exc


def password_problem(entry: Entry) -> Invalid | None:
    """Why the entry's password field cannot be stored, checked without hashing anything."""
    try:
        if not needs_hashing(entry.password):
            passwords.check_stored(entry.password)
        else:
            passwords.plain_text(entry.password)
    except InputError as exc:
        return Invalid(entry.line, exc.reason)
    return None


@contextlib.contextmanager
def without_cycle_collector() -> Iterator[None]:
    """An import makes and drops millions of small objects, all freed by their reference
    counts; the cycle collector would walk the live ones again and again (about a tenth
    of the run for a million mailboxes) and find nothing."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Provisioner:
    def __init__(self, directory: Directory, scheme_for_plain: str = "ARGON2ID",
                 default_mailstore: str = DEFAULT_MAILSTORE, default_scheme: str | None = None) -> None:
        self.directory = directory
        self.scheme = scheme_for_plain
        self.default_mailstore = default_mailstore
        # Refused (ConfigError) before a line is read: a typo must not reject every line.
        self.default_scheme = (None if default_scheme is None
                               else passwords.check_scheme_name("default_scheme", default_scheme))
        self.fresh = False  # set by run: the directory was empty when it started
        # Hashing plain text is slow on purpose; argon2/bcrypt release the GIL.
        self.pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)

    def run(self, path: Path, fmt: str | None = None, strict: bool = False,
            progress: Callable[[int], None] = lambda done: None) -> Report:
        report = Report()
        if strict:
            # Validate the whole file first; load nothing if any line is bad.
            for item in read_entries(path, fmt, self.default_mailstore, progress, self.default_scheme):
                problem = item if isinstance(item, Invalid) else password_problem(item)
                if problem is not None:
                    report.invalid.append(problem)
            if report.invalid:
                report.loaded = False
                report.invalid.sort(key=lambda item: item.line)
                return report
        # Into an empty directory nothing needs reading back (the file's own duplicates are
        # refused by read_entries): a fresh import skips the HMGETs, a third of its round trips.
        self.fresh = not self.directory.domains()
        with without_cycle_collector():
            entries = read_items(path, fmt, self.default_mailstore, progress, self.default_scheme,
                            blocks=self.fresh)
            for chunk in _chunks(entries, CHUNK, self.fresh):
                self._load_chunk(chunk, report)
        progress(path.stat().st_size)
        report.invalid.sort(key=lambda item: item.line)  # hash checks come per chunk, after parsing
        return report

    def _load_chunk(self, chunk: list[Entry | Invalid | FastRows], report: Report) -> None:
        rest = (self._add_fresh(chunk, report) if self.fresh
                else [item for item in chunk if not isinstance(item, FastRows)])  # none: blocks=fresh
        self.write(self.plan_chunk(rest, report))

    def _add_fresh(self, chunk: list[Entry | Invalid | FastRows], report: Report) -> list[Entry | Invalid]:
        """Into an empty directory, the lines _FAST_ROW matched (a canonical address, a bcrypt
        hash, a mailstore; no alternate) go straight to records, without a Mailbox each (issue
        17: about a fifth of an import); the rest of the chunk is returned for plan_chunk."""
        rows: list[tuple[str, bytes]] = []
        stores: list[str] = []
        rest: list[Entry | Invalid] = []
        pack = hashcodec.pack_bcrypt_matched
        heads: dict[str, bytes] = {}  # a record's first bytes, per mailstore (encode_record)
        for item in chunk:
            if type(item) is FastRows:
                for store in set(item.stores) - heads.keys():
                    heads[store] = encode_record(store, b"")
                packed = hashcodec.pack_bcrypt_many(item.hashes)
                rows += zip(item.addresses, [heads[s] + h for s, h in
                                             zip(item.stores, packed, strict=True)], strict=True)
                stores += item.stores
            elif type(item) is Entry and item.checked:
                store = item.mailstore
                head = heads.get(store)
                if head is None:
                    head = heads[store] = encode_record(store, b"")
                rows.append((item.address, head + pack(item.password.encode())))
                stores.append(store)
            elif not isinstance(item, FastRows):
                rest.append(item)
        if rows:
            self.directory.add_new(rows, stores)
            report.added += len(rows)
        return rest

    def plan_chunk(self, chunk: list[Entry | Invalid],
                   report: Report) -> list[tuple[Mailbox, Mailbox | None]]:
        """The (new, old) records a chunk would write, counted in `report`; nothing is written
        (a dry run stops here)."""
        entries: list[Entry] = []
        for item in chunk:
            if isinstance(item, Invalid):
                report.invalid.append(item)
            else:
                entries.append(item)
        if not entries:
            return []
        existing = ([None] * len(entries) if self.fresh
                    else self.directory.get_many([e.address for e in entries]))
        olds = [None if v is None else Mailbox.decode(e.address, v)
                for e, v in zip(entries, existing, strict=True)]
        # Only plain-text passwords cost real time (hashing); the thread pool is for them alone.
        slow = [i for i, e in enumerate(entries) if not e.checked and needs_hashing(e.password)]
        hashes: list[str | InputError] = [e.password if e.checked else _check_hash(e.password)
                                          for e in entries]
        prepared = self.pool.map(self._prepare, [entries[i] for i in slow], [olds[i] for i in slow])
        for i, stored in zip(slow, prepared, strict=True):
            hashes[i] = stored
        writes: list[tuple[Mailbox, Mailbox | None]] = []
        for entry, old, stored, raw in zip(entries, olds, hashes, existing, strict=True):
            if isinstance(stored, InputError):
                report.invalid.append(Invalid(entry.line, stored.reason))
                continue
            new = Mailbox(entry.address, entry.mailstore, stored, entry.alternate)
            if old == new:
                report.unchanged += 1
                if raw is not None and not raw[0] & RECORD_V1:
                    writes.append((new, new))  # written before issue 17: now in the short form
                continue
            writes.append((new, old))
            if old is None:
                report.added += 1
            else:
                report.updated += 1
        return writes

    def write(self, writes: list[tuple[Mailbox, Mailbox | None]]) -> None:
        if writes:
            self.directory.put_many(writes)
            # A changed password ends the user's webmail sessions at once (it is often the
            # answer to a stolen one); a re-import that keeps the hash keeps them.
            changed = [new.address for new, old in writes
                       if old is not None and old.password_hash != new.password_hash]
            logins.end_sessions_of(self.directory.r, changed)

    def _prepare(self, entry: Entry, old: Mailbox | None) -> str | InputError:
        """The hash to store; a plain password that still matches keeps the old hash."""
        try:
            if needs_hashing(entry.password):
                plain = passwords.plain_text(entry.password)
                if old is not None and passwords.verify_password(plain, old.password_hash):
                    return old.password_hash
            return passwords.prepare_for_import(entry.password, self.scheme)
        except InputError as exc:
            return exc
