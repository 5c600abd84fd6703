"""Importing the user directory: CSV or Dovecot passwd-file, idempotent, line-exact errors.

Lines are parsed one at a time, so a broken line is reported with its number
and reason while the good ones still load (`strict` validates everything first
and loads nothing if any line is bad).  Re-runs compare with what is stored
and report added / updated / unchanged / invalid.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import itertools
import os
import re
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fallback.addresses import normalize_address
from fallback.errors import InputError
from fallback.mailbox import logins, passwords
from fallback.mailbox.directory import (
    DEFAULT_MAILSTORE,
    RECORD_V1,
    Directory,
    Mailbox,
    check_mailstore,
)

CSV_COLUMNS = ("address", "password", "mailstore")
CSV_OPTIONAL = ("alternate",)
# Big chunks let one HMGET/HSET per directory bucket carry many mailboxes (see put_many).
CHUNK = 250_000
PROGRESS_EVERY = 4096  # lines between progress callbacks


@dataclass(slots=True)
class Entry:
    line: int
    address: str
    password: str      # as given: {SCHEME}hash or plain text
    mailstore: str
    alternate: str = ""
    checked: bool = False  # address, mailstore and hash already validated (_FAST_ROW)


@dataclass
class Invalid:
    line: int
    reason: str


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


def detect_format(first_line: str) -> str:
    text = first_line.strip().lstrip("\ufeff").lower()
    if text.replace(" ", "").startswith("address,"):
        return "csv"
    if text.count(":") >= 1 and "@" in text.split(":", 1)[0]:
        return "passwd"
    raise InputError(
        "cannot tell the file format from its first line: expected a CSV header "
        "'address,password,mailstore' or passwd-file lines 'user@domain:{SCHEME}hash:...'; "
        "give --format csv|passwd"
    )


def _decode_lines(path: Path) -> Generator[tuple[int, str | None, int], None, None]:
    """(line number, text or None when undecodable, bytes consumed so far)."""
    done = 0
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            done += len(raw)
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield n, raw.decode("utf-8").rstrip("\r\n"), done
            except UnicodeDecodeError:
                yield n, None, done


# The common line of a large import, matched whole in C: a canonical address (what
# normalize_address returns unchanged), a bcrypt hash (what check_stored returns unchanged)
# and a mailstore name (check_mailstore).  Every other line takes _csv_row, which gives the
# same result for these; issue 17 measured it (docs/performance.md).
_FAST_ROW = re.compile(
    rb"([a-z0-9._+-]{1,64}@[a-z0-9-]{1,63}(?:\.[a-z0-9-]{1,63})+),"
    rb"(\{BLF-CRYPT\}\$2[abxy]?\$[0-9][0-9]\$[./0-9A-Za-z]{53}),"
    rb"([A-Za-z0-9][A-Za-z0-9._-]{0,63})\n?")
READ_HINT = 1 << 20  # bytes of lines read at once


def _csv_header(n: int, text: str) -> list[str]:
    try:
        row = next(csv.reader([text], strict=True))
    except (csv.Error, StopIteration) as exc:
        raise InputError(f"line {n}: unreadable CSV header: {exc}") from None
    columns = [c.strip().lower() for c in row]
    missing = [c for c in CSV_COLUMNS if c not in columns]
    unknown = [c for c in columns if c not in CSV_COLUMNS + CSV_OPTIONAL]
    if missing or unknown:
        raise InputError(
            f"line {n}: CSV header must be 'address,password,mailstore' "
            f"(optional: alternate); "
            + (f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}")
        )
    return columns


def _csv_row(n: int, text: str, columns: list[str]) -> Entry | Invalid:
    try:
        # Lines without quotes (nearly all) need no CSV machinery.
        row = text.split(",") if '"' not in text else next(csv.reader([text], strict=True))
    except (csv.Error, StopIteration) as exc:
        return Invalid(n, f"broken CSV: {exc}")
    if len(row) != len(columns):
        return Invalid(n, f"broken CSV: expected {len(columns)} fields, found {len(row)}")
    values = dict(zip(columns, row, strict=True))
    return Entry(n, values["address"], values["password"], values["mailstore"].strip(),
                 values.get("alternate", "").strip())


def _parse_csv(path: Path, progress: Callable[[int], None]) -> Iterator[Entry | Invalid]:
    """The rows of a CSV file: lines read a megabyte at a time, the common ones (_FAST_ROW)
    made into checked entries at once, the others parsed and checked one by one."""
    columns: list[str] | None = None
    fast = None
    n = done = 0
    with open(path, "rb") as fh:
        while block := fh.readlines(READ_HINT):
            for raw in block:
                n += 1
                m = fast(raw) if fast is not None else None
                if m is not None and b".." not in m[1]:
                    yield Entry(n, m[1].decode(), m[2].decode(), m[3].decode(), "", True)
                    continue
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    text = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    yield Invalid(n, "not UTF-8 text")
                    continue
                if not text.strip():
                    continue
                if columns is None:
                    columns = _csv_header(n, text)
                    fast = _FAST_ROW.fullmatch if columns == list(CSV_COLUMNS) else None
                    continue
                yield _csv_row(n, text, columns)
            done += sum(map(len, block))
            progress(done)


def _passwd_hash(n: int, user: str, field: str, default_scheme: str | None) -> str | Invalid:
    """The password field of a passwd-file line as `{SCHEME}hash`.  Without a prefix Dovecot
    reads it in its default_pass_scheme: so do we when told which (--default-scheme); never
    as plain text, which would store a hash of the hash and lock the user out."""
    scheme, _ = passwords.split_scheme(field)
    if scheme is not None:
        return field
    if default_scheme is None:
        return Invalid(n, f"the password of {user} has no {{SCHEME}} prefix; give --default-scheme "
                          "SCHEME (Dovecot's default_pass_scheme) if the file relies on one")
    if default_scheme == "PLAIN":
        return "{PLAIN}" + field
    stored = "{" + default_scheme + "}" + field
    try:
        passwords.check_stored(stored)
    except InputError:
        return Invalid(n, f"the password of {user} does not look like a {default_scheme} hash "
                          f"(--default-scheme {default_scheme})")
    return stored


def _parse_passwd(lines: Iterator[tuple[int, str | None, int]], mailstore: str,
                  progress: Callable[[int], None],
                  default_scheme: str | None = None) -> Iterator[Entry | Invalid]:
    for n, text, done in lines:
        if n % PROGRESS_EVERY == 0:
            progress(done)
        if text is None:
            yield Invalid(n, "not UTF-8 text")
            continue
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        parts = text.split(":")
        if len(parts) < 2 or not parts[1]:
            yield Invalid(n, "expected user@domain:{SCHEME}hash[:uid:gid:gecos:home:shell:extra]")
            continue
        store = mailstore
        if len(parts) >= 8:
            for item in ":".join(parts[7:]).split():
                key, _, value = item.partition("=")
                if key in ("mailstore", "userdb_mailstore") and value:
                    store = value
        stored = _passwd_hash(n, parts[0].strip(), parts[1], default_scheme)
        yield stored if isinstance(stored, Invalid) else Entry(n, parts[0], stored, store)


def _check(entry: Entry) -> Entry | Invalid:
    """Validate addresses and names; hashes are checked in `_prepare`."""
    try:
        entry.address = normalize_address(entry.address)
        entry.mailstore = check_mailstore(entry.mailstore or DEFAULT_MAILSTORE)
        if entry.alternate:
            entry.alternate = normalize_address(entry.alternate)
    except InputError as exc:
        return Invalid(entry.line, exc.reason)
    return entry


def _needs_hashing(password: str) -> bool:
    scheme, _ = passwords.split_scheme(password)
    return scheme is None or scheme == "PLAIN"


def read_entries(path: Path, fmt: str | None, default_mailstore: str,
                 progress: Callable[[int], None] = lambda done: None,
                 default_scheme: str | None = None) -> Iterator[Entry | Invalid]:
    """Every line of the file as an Entry (checked) or an Invalid, duplicates included.
    `default_scheme` (checked with passwords.check_scheme_name) is the scheme of passwd-file
    hashes without a {SCHEME} prefix."""
    decoded = _decode_lines(path)
    lines: Iterator[tuple[int, str | None, int]] = decoded
    if fmt is None:
        # Guess from the first line that is not blank or a passwd-file comment.
        head: list[tuple[int, str | None, int]] = []
        for line in lines:
            head.append(line)
            text = line[1]
            if text is None:
                raise InputError(f"line {line[0]}: not UTF-8 text")
            if text.strip() and not text.lstrip().startswith("#"):
                fmt = detect_format(text)
                break
        if fmt is None:
            return
        lines = itertools.chain(head, lines)
    parsed: Iterator[Entry | Invalid]
    if fmt == "csv":
        decoded.close()
        parsed = _parse_csv(path, progress)  # reads the file from its start again
    else:
        parsed = _parse_passwd(lines, default_mailstore, progress, default_scheme)
    seen: dict[str, int] = {}
    for item in parsed:
        if isinstance(item, Entry):
            checked = item if item.checked else _check(item)
            if isinstance(checked, Entry):
                if checked.address in seen:
                    yield Invalid(checked.line, f"duplicate address {checked.address} "
                                                f"(first on line {seen[checked.address]})")
                    continue
                seen[checked.address] = checked.line
            yield checked
        else:
            yield item


def _chunks(items: Iterable[Entry | Invalid], size: int) -> Iterator[list[Entry | Invalid]]:
    chunk: list[Entry | Invalid] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _check_hash(password: str) -> str | InputError:
    if _needs_hashing(password):
        return ""  # replaced by Provisioner._prepare
    try:
        return passwords.check_stored(password)
    except InputError as exc:
        return exc


def password_problem(entry: Entry) -> Invalid | None:
    """Why the entry's password field cannot be stored, checked without hashing anything."""
    try:
        if not _needs_hashing(entry.password):
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
            entries = read_entries(path, fmt, self.default_mailstore, progress, self.default_scheme)
            for chunk in _chunks(entries, CHUNK):
                self._load_chunk(chunk, report)
        progress(path.stat().st_size)
        report.invalid.sort(key=lambda item: item.line)  # hash checks come per chunk, after parsing
        return report

    def _load_chunk(self, chunk: list[Entry | Invalid], report: Report) -> None:
        self.write(self.plan_chunk(chunk, report))

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
        slow = [i for i, e in enumerate(entries) if not e.checked and _needs_hashing(e.password)]
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
            if _needs_hashing(entry.password):
                plain = passwords.plain_text(entry.password)
                if old is not None and passwords.verify_password(plain, old.password_hash):
                    return old.password_hash
            return passwords.prepare_for_import(entry.password, self.scheme)
        except InputError as exc:
            return exc
