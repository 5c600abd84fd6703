"""Making the directory equal to a source (`fallback provision --sync`): plan, guard, apply.

The source (a file, or LDAP) is read twice: first to check every entry and
collect the addresses it names, then to write.  Between the two, the
directory is walked for the mailboxes the source no longer names; if there
are more of them than `--max-remove` allows, nothing at all is changed (a
truncated export must not empty the directory in the middle of an outage).
A dry run plans the writes, hashes included, and writes none.

Removing a mailbox ends its webmail sessions and drops its directory record,
so new mail to it gets 550 5.1.1 (after at most `directory_cache_ttl` seconds
in a receiver that had just looked it up).  The mail it already holds stays:
mailboxes that hold any are remembered first (mailbox/removed.py), so
reconcile --all and purge still reach them.

The aliases of a virtual(5) file are synced the same way (sync_aliases): the
file is parsed and checked once, held in memory (aliases are few next to
mailboxes), the removals are counted against the stored aliases.  Each
source removes only the aliases it created (the origin stored with each
alias, aliases.py): a virtual file's sync those of virtual files, an LDAP
sync (sync_ldap_aliases) those of LDAP; an `alias add` is removed only by
`alias remove`.  The limit counts against the aliases of that origin.  An
alias a source names takes that source's origin, whoever created it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from fallback.errors import InputError
from fallback.mailbox import logins, removed
from fallback.mailbox.aliases import LDAP, ORIGINS, VIRTUAL, Alias, Aliases
from fallback.mailbox.directory import Directory, Mailbox
from fallback.mailbox.provision import (
    CHUNK,
    Entry,
    Invalid,
    Provisioner,
    Report,
    password_problem,
    read_entries,
    without_cycle_collector,
)
from fallback.mailbox.virtualfile import check_chains, parse_file

DEFAULT_MAX_REMOVE = "10%"
_LIMIT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")


@dataclass(frozen=True)
class RemovalLimit:
    """At most `count` mailboxes, or at most `percent` % of the directory, may be removed."""

    count: int | None = None
    percent: Decimal | None = None

    def allows(self, removing: int, total: int) -> bool:
        if self.count is not None:
            return removing <= self.count
        assert self.percent is not None
        return removing * 100 <= self.percent * total

    def __str__(self) -> str:
        return f"{self.count:,}" if self.count is not None else f"{_number(self.percent or 0)} %"


def parse_max_remove(text: str) -> RemovalLimit:
    """`--max-remove N` (mailboxes) or `P%` (of the directory)."""
    m = _LIMIT_RE.match(text)
    if m is not None:
        try:
            value = Decimal(m.group(1))
        except InvalidOperation:  # pragma: no cover - the pattern admits only numbers
            value = Decimal(-1)
        if m.group(2) and value <= 100:
            return RemovalLimit(percent=value)
        if not m.group(2) and value == value.to_integral_value():
            return RemovalLimit(count=int(value))
    raise InputError(f"--max-remove: {text!r} is not a number of mailboxes (e.g. 500) "
                     "or a percentage of the directory up to 100 (e.g. 5%)")


def _number(value: Decimal | float) -> str:
    """23, 23.4: no trailing zeros, at most one decimal."""
    text = f"{float(value):.1f}"
    return text[:-2] if text.endswith(".0") else text


@dataclass
class SyncReport:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept_mail: list[str] = field(default_factory=list)  # removed, still holding mail (kept)
    unchanged: int = 0
    invalid: list[Invalid] = field(default_factory=list)
    before: int = 0              # mailboxes in the directory before the sync
    dry_run: bool = False
    refused: str = ""            # why a dry run's real run would refuse ("" when it would not)
    sessions_ended: int = 0

    @property
    def ok(self) -> bool:
        return not self.invalid and not self.refused

    def as_json(self) -> dict[str, object]:
        return {"dry_run": self.dry_run, "before": self.before, "added": self.added,
                "changed": self.changed, "removed": self.removed, "kept_mail": self.kept_mail,
                "unchanged": self.unchanged, "refused": self.refused,
                "sessions_ended": self.sessions_ended,
                "invalid": [{"line": i.line, "reason": i.reason} for i in self.invalid]}


class FileEntries:
    """A provisioning file as a source that can be read more than once."""

    def __init__(self, path: Path, fmt: str | None, default_mailstore: str,
                 default_scheme: str | None = None,
                 progress: Callable[[int], None] = lambda done: None) -> None:
        self.path, self.fmt, self.default_mailstore = path, fmt, default_mailstore
        self.default_scheme, self.progress = default_scheme, progress

    def __iter__(self) -> Iterator[Entry | Invalid]:
        return read_entries(self.path, self.fmt, self.default_mailstore, self.progress,
                            self.default_scheme)


def refusal(removing: int, total: int, limit: RemovalLimit, noun: str = "mailboxes") -> str:
    share = f" ({_number(Decimal(removing * 100) / total)} %)" if total else ""
    return (f"--sync would remove {removing:,} of {total:,} {noun}{share}, more than "
            f"--max-remove {limit}; a truncated export? Check the file, or give --force")


def empty_refusal(source: str, total: int, noun: str = "mailboxes") -> str:
    return (f"{source} has no entries; refusing to empty the directory ({total:,} {noun}), even "
            "with --force: give --allow-empty if that is what you want")


def sync(provisioner: Provisioner, entries: Iterable[Entry | Invalid], *, dry_run: bool,
         max_remove: RemovalLimit | int | None, force: bool, remove: bool = True,
         before_write: Callable[[], None] = lambda: None, allow_empty: bool = False,
         source: str = "the source") -> SyncReport:
    """Make the directory equal to `entries` (Entry or Invalid items, as read_entries yields).

    `entries` is read twice when it can be (a list, FileEntries, any re-iterable); a one-shot
    iterator is held in memory instead.  Any invalid entry changes nothing (its address
    might be one that would otherwise be removed).  Over `max_remove` (None: 10 %, an int:
    that many mailboxes) raises InputError before anything is written, unless `force`; a dry
    run reports it in `refused` instead.  `remove=False` plans or loads without removing.
    `before_write` runs after the first read and the guard, before anything is written: a
    caller's own guard (LDAP's aliases, collected by that read) may raise there.
    A source with no entries at all (an export that wrote only its header) would remove
    everything: refused like a mass removal but even with `force`, unless `allow_empty`.
    """
    if iter(entries) is entries:
        entries = list(entries)
    limit = (parse_max_remove(DEFAULT_MAX_REMOVE) if max_remove is None
             else RemovalLimit(count=max_remove) if isinstance(max_remove, int) else max_remove)
    report = SyncReport(dry_run=dry_run)
    directory = provisioner.directory
    with without_cycle_collector():
        named: set[str] = set()
        for item in entries:
            problem = item if isinstance(item, Invalid) else password_problem(item)
            if problem is not None:
                report.invalid.append(problem)
            else:
                assert isinstance(item, Entry)
                named.add(item.address)
        if report.invalid:
            report.invalid.sort(key=lambda i: i.line)
            return report
        gone = [m for m in directory.iter_mailboxes() if m.address not in named]
        named_any = bool(named)
        report.before = directory.count()
        if not remove:
            gone = []
        del named
        report.removed = sorted(m.address for m in gone)
        message = ""
        if gone and not named_any:
            # --allow-empty is the operator saying exactly this, so no --force is needed too.
            message = "" if allow_empty else empty_refusal(source, report.before)
        elif gone and not force and not limit.allows(len(gone), report.before):
            message = refusal(len(gone), report.before, limit)
        if message:
            if not dry_run:
                raise InputError(message)
            report.refused = message
        before_write()
        _apply(provisioner, entries, report, dry_run)
    if gone:
        _remove(provisioner, gone, report, dry_run)
    return report


def sync_aliases(store: Aliases, directory: Directory, path: Path, *, dry_run: bool,
                 max_remove: RemovalLimit | None, force: bool, remove: bool = True,
                 allow_empty: bool = False) -> SyncReport:
    """Make the stored aliases of virtual files equal to a virtual(5) file, as sync() does for
    mailboxes.

    Any bad line (syntax, a loop, a chain too deep: checked among the file's aliases
    only, since the file replaces the stored set) changes nothing.  Only aliases that came
    from virtual files are removed (never LDAP's or `alias add`'s); the limit counts them:
    removing more than `max_remove` (None: 10 %) of them raises InputError unless `force`;
    a dry run reports it in `refused`.  An alias holds no mail, so removing one leaves
    nothing to keep: its address gets 550 5.1.1 (or the catch-all of its domain) from the
    next RCPT on.  A file without any alias is refused as sync() refuses an empty source.
    """
    parsed = parse_file(path)
    invalid = sorted(parsed.invalid + check_chains(parsed, store, directory, stored=False),
                     key=lambda item: item.line)
    if invalid:
        return SyncReport(dry_run=dry_run, invalid=invalid)
    wanted = [alias for _, alias in parsed.aliases.values()]
    return sync_alias_set(store, wanted, VIRTUAL, dry_run=dry_run, max_remove=max_remove,
                          force=force, remove=remove, empty_source=str(path), allow_empty=allow_empty)


def sync_ldap_aliases(store: Aliases, aliases: dict[str, list[str]], *, dry_run: bool,
                      max_remove: RemovalLimit | None, force: bool, remove: bool = True) -> SyncReport:
    """The aliases LDAP collected (address -> the users naming it) made the stored LDAP ones."""
    wanted = [Alias(a, tuple(sorted(t)), LDAP) for a, t in aliases.items()]
    return sync_alias_set(store, wanted, LDAP, dry_run=dry_run, max_remove=max_remove,
                          force=force, remove=remove)


def sync_alias_set(store: Aliases, wanted: list[Alias], origin: str, *, dry_run: bool,
                   max_remove: RemovalLimit | None, force: bool, remove: bool = True,
                   empty_source: str | None = None, allow_empty: bool = False) -> SyncReport:
    """Write `wanted` (all of `origin`) and remove the stored aliases of `origin` it does not name.

    The limit counts against the stored aliases of `origin` only (`before`); a refusal
    raises InputError before anything is written, unless `force` or `dry_run`.  With
    `empty_source` (the source's name) an empty `wanted` is refused even with `force`, unless
    `allow_empty`."""
    limit = parse_max_remove(DEFAULT_MAX_REMOVE) if max_remove is None else max_remove
    report = SyncReport(dry_run=dry_run)
    named = {alias.address for alias in wanted}
    mine = [a.address for a in store.entries(origin)]
    report.before = len(mine)
    gone = sorted(a for a in mine if a not in named) if remove else []
    report.removed = gone
    source = "virtual files" if origin == VIRTUAL else ORIGINS[origin]
    message = ""
    if gone and not wanted and empty_source is not None:
        message = "" if allow_empty else empty_refusal(empty_source, report.before, f"aliases from {source}")
    elif gone and not force and not limit.allows(len(gone), report.before):
        message = refusal(len(gone), report.before, limit, f"aliases from {source}")
    if message:
        if not dry_run:
            raise InputError(message)
        report.refused = message
    writes = []
    for alias, old in zip(wanted, store.get_many([a.address for a in wanted]), strict=True):
        if old == alias:
            report.unchanged += 1
            continue
        writes.append(alias)
        (report.added if old is None else report.changed).append(alias.address)
    report.added.sort()
    report.changed.sort()
    if not dry_run:
        store.put_many(writes)
        for address in gone:
            store.remove(address)
    return report


def _apply(provisioner: Provisioner, entries: Iterable[Entry | Invalid], report: SyncReport,
           dry_run: bool) -> None:
    counts = Report()
    chunk: list[Entry | Invalid] = []
    was_removed = set(removed.entries(provisioner.directory.r))

    def flush() -> None:
        writes = provisioner.plan_chunk(chunk, counts)
        chunk.clear()
        for new, old in writes:
            if old is new:  # unchanged, only rewritten in the short form (issue 17)
                continue
            (report.added if old is None else report.changed).append(new.address)
        if not dry_run:
            provisioner.write(writes)
            # Provisioned again: its mail is found through the directory once more.
            removed.forget(provisioner.directory.r, [n.address for n, o in writes
                                                     if o is None and n.address in was_removed])

    for item in entries:
        chunk.append(item)
        if len(chunk) >= CHUNK:
            flush()
    if chunk:
        flush()
    # The source may have changed between the two reads: what is bad now was not written.
    report.invalid = sorted(counts.invalid, key=lambda i: i.line)
    report.unchanged = counts.unchanged
    report.added.sort()
    report.changed.sort()


def _remove(provisioner: Provisioner, gone: list[Mailbox], report: SyncReport, dry_run: bool) -> None:
    r = provisioner.directory.r
    holding = removed.message_counts(r, [m.address for m in gone])
    report.kept_mail = sorted(a for a, n in holding.items() if n)
    if dry_run:
        return
    # Remembered before the records go: a crash in between leaves the mail findable.
    removed.remember(r, [(m.address, m.mailstore) for m in gone if holding[m.address]])
    for start in range(0, len(gone), CHUNK):
        part = gone[start : start + CHUNK]
        provisioner.directory.remove_many(part)
        ended = logins.end_sessions_of(r, [m.address for m in part])
        report.sessions_ended += sum(ended.values())
