"""The lines of a provisioning file: CSV or Dovecot passwd-file, as checked entries or
line-exact errors (provision.py loads them).

Lines are parsed one at a time, so a broken line is reported with its number and reason
while the good ones still load.  The common CSV line (a canonical address, a bcrypt hash, a
mailstore) is matched whole by one compiled pattern; for an import into an empty directory a
block of such lines comes as one FastRows, without an Entry per line (issue 17).
"""

from __future__ import annotations

import csv
import itertools
import re
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from fallback.addresses import normalize_address
from fallback.errors import InputError
from fallback.mailbox import hashcodec, passwords
from fallback.mailbox.directory import DEFAULT_MAILSTORE, check_mailstore

CSV_COLUMNS = ("address", "password", "mailstore")
CSV_OPTIONAL = ("alternate",)
PROGRESS_EVERY = 4096  # lines between progress callbacks


@dataclass(slots=True)
class Entry:
    line: int
    address: str
    password: str      # as given: {SCHEME}hash or plain text
    mailstore: str
    alternate: str = ""
    checked: bool = False  # address, mailstore and hash already validated (_FAST_ROW)


@dataclass(slots=True)
class FastRows:
    """Lines start, start+1, ... of a block that _FAST_BLOCK matched whole: checked entries
    without an Entry each (the fresh import's path, Provisioner._add_fresh; issue 17)."""
    start: int
    addresses: list[str]
    hashes: list[bytes]   # bcrypt's canonical form (hashcodec.BCRYPT_PATTERN)
    stores: list[str]

    def entries(self) -> list[Entry]:
        return [Entry(self.start + i, a, h.decode(), s, "", True)
                for i, (a, h, s) in enumerate(zip(self.addresses, self.hashes, self.stores, strict=True))]


@dataclass
class Invalid:
    line: int
    reason: str


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
# The hash is bcrypt's canonical form (hashcodec.BCRYPT_PATTERN), so that a fresh import packs
# it without matching again (Provisioner._add_fresh).
# The lookahead refuses ".." in the address (not canonical); a hash may hold dots.
_ROW = (rb"((?![^,]*\.\.)[a-z0-9._+-]{1,64}@[a-z0-9-]{1,63}(?:\.[a-z0-9-]{1,63})+),"
        rb"(" + hashcodec.BCRYPT_PATTERN + rb"),"
        rb"([A-Za-z0-9][A-Za-z0-9._-]{0,63})")
_FAST_ROW = re.compile(_ROW + rb"\n?")
# A whole block of such lines, matched at once: taken as a FastRows when every line matched.
_FAST_BLOCK = re.compile(rb"^" + _ROW + rb"\n", re.MULTILINE)
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


def _fast_rows(start: int, block: list[bytes]) -> FastRows | None:
    """The block as one FastRows when _FAST_BLOCK matches each of its lines, else None."""
    rows = _FAST_BLOCK.findall(b"".join(block))
    if len(rows) != len(block):
        return None
    addresses, hashes, stores = zip(*rows, strict=True)
    # Split back after one decode each: in C, not a decode per line.
    return FastRows(start, b"\n".join(addresses).decode().split("\n"), list(hashes),
                    b"\n".join(stores).decode().split("\n"))


def _parse_csv(path: Path, progress: Callable[[int], None],
               blocks: bool = False) -> Iterator[Entry | Invalid | FastRows]:
    """The rows of a CSV file: lines read a megabyte at a time, the common ones (_FAST_ROW)
    made into checked entries at once, the others parsed and checked one by one; with
    `blocks`, a block whose every line is common comes as one FastRows."""
    columns: list[str] | None = None
    fast: Callable[[bytes], re.Match[bytes] | None] | None = None
    n = done = 0
    with open(path, "rb") as fh:
        while block := fh.readlines(READ_HINT):
            whole = _fast_rows(n + 1, block) if blocks and fast is not None else None
            if whole is not None:
                yield whole
                n += len(block)
                done += sum(map(len, block))
                progress(done)
                continue
            for raw in block:
                n += 1
                m = fast(raw) if fast is not None else None
                if m is not None:
                    address, password, store = m.groups()
                    yield Entry(n, address.decode(), password.decode(), store.decode(), "", True)
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


def needs_hashing(password: str) -> bool:
    scheme, _ = passwords.split_scheme(password)
    return scheme is None or scheme == "PLAIN"


def read_entries(path: Path, fmt: str | None, default_mailstore: str,
                 progress: Callable[[int], None] = lambda done: None,
                 default_scheme: str | None = None) -> Iterator[Entry | Invalid]:
    """Every line of the file as an Entry (checked) or an Invalid, duplicates included.
    `default_scheme` (checked with passwords.check_scheme_name) is the scheme of passwd-file
    hashes without a {SCHEME} prefix."""
    return cast(Iterator[Entry | Invalid], read_items(path, fmt, default_mailstore, progress,
                                                      default_scheme, blocks=False))


def read_items(path: Path, fmt: str | None, default_mailstore: str, progress: Callable[[int], None],
          default_scheme: str | None, blocks: bool) -> Iterator[Entry | Invalid | FastRows]:
    """read_entries; with `blocks`, whole blocks of common CSV lines as FastRows too."""
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
    parsed: Iterator[Entry | Invalid | FastRows]
    if fmt == "csv":
        decoded.close()
        parsed = _parse_csv(path, progress, blocks)  # reads the file from its start again
    else:
        parsed = _parse_passwd(lines, default_mailstore, progress, default_scheme)
    seen: dict[str, int] = {}
    for item in parsed:
        if isinstance(item, FastRows):
            # No address twice in the block nor seen before (isdisjoint: O(block), not O(seen)).
            if len(set(item.addresses)) == len(item.addresses) and seen.keys().isdisjoint(item.addresses):
                seen.update(zip(item.addresses, itertools.count(item.start)))
                yield item
                continue
            parsed = itertools.chain(item.entries(), parsed)  # a duplicate: line by line
            continue
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
