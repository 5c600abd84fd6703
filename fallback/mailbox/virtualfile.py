"""Importing aliases from a Postfix virtual(5) source file, with the checks a whole file needs.

The syntax is Postfix's: blank lines and lines whose first non-blank
character is `#` are ignored; a logical line starts in column one and every
following line that starts with whitespace continues it; a logical line is
`pattern  target, target ...` (commas and/or whitespace between targets)
where the pattern is `user@domain` or `@domain` (a catch-all).  A line
`example.com  anything` (a pattern without @ and one word without @: how
Postfix files declare a virtual alias domain) is skipped: the domains served
here come from the directory and the aliases themselves.  A bare `user`
pattern is refused: Postfix matches it only in $myorigin's domains, which we
cannot know.  `#` in the middle of a line is no comment (as in Postfix).

Each bad line is reported with its number (provision.Invalid) and the good
ones load, unless `strict`.  Over the whole file plus the aliases already
stored, an alias loop (a -> b -> a) and a chain of more than MAX_DEPTH
aliases are refused on the line of every alias in them or leading into
them, and none of those is stored.  The checks follow the receiver's
resolution (intake/addressing.py), which is Postfix's: an alias wins over a
mailbox of the same address, so a target that is a mailbox is expanded
further when it is also an alias; an alias naming itself (`alice@x
alice@x, alice@elsewhere`) stops there (its mailbox, or the main system's
address), so it is no loop, and neither is a cycle whose every member is a
mailbox (each stops at its own).  A cycle with a member that is no mailbox
is refused whole: mail to that member would loop (451) at run time.  A
catch-all's mail that would come back to the same catch-all is forwarded
to the main system at run time, so catch-alls are no loops; subaddresses of
targets are not followed here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fallback.errors import InputError
from fallback.mailbox.aliases import Alias, Aliases, make_alias
from fallback.mailbox.directory import Directory
from fallback.mailbox.provision import PROGRESS_EVERY, Invalid, Report

# Postfix's virtual_alias_recursion_limit is 1000; a real directory nests two or three levels
# (list -> team -> person), and the receiver expands chains at every RCPT, so ours is small.
MAX_DEPTH = 8
_SPLIT = re.compile(r"[\s,]+")


@dataclass
class Parsed:
    aliases: dict[str, tuple[int, Alias]] = field(default_factory=dict)  # address -> (line, alias)
    invalid: list[Invalid] = field(default_factory=list)


def _logical_lines(path: Path, progress: Callable[[int], None]) -> Iterator[tuple[int, str | None]]:
    """(number of the first physical line, the joined logical line, or None when undecodable)."""
    start, done = 0, 0
    parts: list[str] = []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            done += len(raw)
            if n % PROGRESS_EVERY == 0:
                progress(done)
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                if parts:
                    yield start, " ".join(parts)
                    parts = []
                yield n, None
                continue
            stripped = text.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if text[0].isspace():
                if parts:
                    parts.append(stripped)
                else:
                    yield n, ""  # a continuation with nothing to continue
                continue
            if parts:
                yield start, " ".join(parts)
            start, parts = n, [stripped]
    if parts:
        yield start, " ".join(parts)


def parse_line(text: str) -> Alias | None:
    """One logical line as an Alias; None for a domain declaration; InputError when it is bad."""
    pattern, *rest = text.split(None, 1)
    words = [w for w in _SPLIT.split(rest[0]) if w] if rest else []
    if "@" not in pattern:
        if len(words) == 1 and "@" not in words[0] and "." in pattern:
            return None  # `example.com  anything`: Postfix's virtual alias domain line
        raise InputError(f"{pattern!r} has no @domain: write user@domain, or @domain for a catch-all "
                         "(Postfix matches a bare user only in $myorigin's domains)")
    if not words:
        raise InputError(f"alias {pattern} has no target")
    for word in words:
        if word.startswith("#"):
            raise InputError(f"target {word!r} is not an address (a comment must be on a line of its own)")
        if "@" not in word:
            raise InputError(f"target {word!r} has no @domain; give the full address")
    return make_alias(pattern, words)


def parse_file(path: Path, progress: Callable[[int], None] = lambda done: None) -> Parsed:
    """Every alias of the file (the first of duplicates) and every bad line, by line number."""
    parsed = Parsed()
    for n, text in _logical_lines(path, progress):
        if text is None:
            parsed.invalid.append(Invalid(n, "not UTF-8 text"))
            continue
        if not text:
            parsed.invalid.append(Invalid(n, "a continuation line (starting with a blank) "
                                             "with no line before it to continue"))
            continue
        try:
            alias = parse_line(text)
        except InputError as exc:
            parsed.invalid.append(Invalid(n, exc.reason))
            continue
        if alias is None:
            continue
        first = parsed.aliases.get(alias.address)
        if first is not None:
            parsed.invalid.append(Invalid(n, f"duplicate alias {alias.address} (first on line {first[0]})"))
            continue
        parsed.aliases[alias.address] = (n, alias)
    return parsed


def looks_like_virtual(path: Path) -> bool:
    """True when the first line that is not blank or a comment reads `pattern  target` with
    an @ in both, or `domain  anything`, and no colon or comma in the pattern (a CSV header
    and a passwd-file line always have one)."""
    with open(path, "rb") as fh:
        for _, raw in zip(range(1000), fh, strict=False):
            text = raw.decode("utf-8", "replace").strip().lstrip("\ufeff")
            if not text or text.startswith("#"):
                continue
            words = text.split()
            if len(words) < 2 or ":" in words[0] or "," in words[0]:
                return False
            domain_line = len(words) == 2 and "." in words[0] and "@" not in text
            return domain_line or ("@" in words[0] and "@" in words[1])
    return False


class _Graph:
    """The aliases of the file over those already stored: who leads to whom."""

    def __init__(self, parsed: Parsed, store: Aliases, directory: Directory, stored: bool) -> None:
        self.targets = {a: alias.targets for a, (_, alias) in parsed.aliases.items()}
        self.lines = {a: line for a, (line, _) in parsed.aliases.items()}
        self._fetch_stored(store, directory, stored)

    def _fetch_stored(self, store: Aliases, directory: Directory, stored: bool) -> None:
        asked: set[str] = set(self.targets)
        frontier = list(self.targets)
        # Rounds enough to see past MAX_DEPTH: deeper chains are refused whatever lies beyond.
        # A sync replaces every stored alias by the file's: then only the file's count.
        for _ in range(MAX_DEPTH + 1 if stored else 0):
            wanted = sorted({t for a in frontier for t in self.targets[a] if t not in asked})
            if not wanted:
                break
            asked.update(wanted)
            frontier = []
            for name, alias in zip(wanted, store.get_many(wanted), strict=True):
                if alias is not None:
                    self.targets[name] = alias.targets
                    frontier.append(name)
        # Aliases that are also mailboxes: a cycle of those is no loop (see check_chains).
        named = sorted({t for ts in self.targets.values() for t in ts if t in self.targets})
        self.mailboxes = {a for a, v in zip(named, directory.get_many(named), strict=True) if v is not None}

    def edges(self, address: str) -> list[str]:
        # An alias naming itself stops there (Postfix): no edge.  An alias that is a mailbox too
        # is still expanded when reached: the alias wins.
        return [t for t in self.targets.get(address, ()) if t in self.targets and t != address]

    def where(self, address: str) -> str:
        line = self.lines.get(address)
        return f"{address} (line {line})" if line is not None else f"{address} (stored)"


def _chain(graph: _Graph, depth: dict[str, int], start: str) -> str:
    names, node = [start], start
    while len(names) <= MAX_DEPTH + 1:
        kids = [k for k in graph.edges(node) if k in depth]
        if not kids:
            break
        node = max(kids, key=lambda k: depth[k])
        names.append(node)
    return " -> ".join(names) + (" -> ..." if depth[start] > len(names) else "")


def check_chains(parsed: Parsed, store: Aliases, directory: Directory,
                 stored: bool = True) -> list[Invalid]:
    """Loops and over-deep chains among the file's aliases (and the stored ones they reach,
    unless not `stored`: a sync's file is the whole set)."""
    graph = _Graph(parsed, store, directory, stored)
    depth: dict[str, int] = {}
    loops: dict[str, list[str]] = {}  # alias -> the loop it is in or leads into
    for root in parsed.aliases:
        if root in depth or root in loops:
            continue
        path, on_path, pending = [root], {root}, [iter(graph.edges(root))]
        while pending:
            child = next(pending[-1], None)
            if child is None:
                node = path.pop()
                pending.pop()
                on_path.discard(node)
                if node not in loops:
                    kids = graph.edges(node)
                    into = next((k for k in kids if k in loops), None)
                    if into is not None:
                        loops[node] = loops[into]
                    else:
                        # A kid missing from depth closed a cycle of mailboxes: the chain ends there.
                        depth[node] = 1 + max((depth.get(k, 0) for k in kids), default=0)
            elif child in on_path:
                cycle = [*path[path.index(child):], child]
                if all(member in graph.mailboxes for member in cycle[:-1]):
                    continue  # each alias of the cycle stops at its own mailbox when reached again
                for member in cycle[:-1]:
                    loops.setdefault(member, cycle)
            elif child not in depth and child not in loops:
                path.append(child)
                on_path.add(child)
                pending.append(iter(graph.edges(child)))
    refused = []
    for address, (line, _) in parsed.aliases.items():
        if address in loops:
            ring = loops[address][:-1]
            if address in ring:  # told from its own line: the loop starts at this alias
                at = ring.index(address)
                ring = ring[at:] + ring[:at]
            text = " -> ".join(graph.where(a) for a in ring) + f" -> {ring[0]}"
            refused.append(Invalid(line, f"alias loop: {text}" if address in ring
                                   else f"alias {address} leads into the alias loop {text}"))
        elif depth[address] > MAX_DEPTH:
            refused.append(Invalid(line, f"alias chain deeper than {MAX_DEPTH} aliases: "
                                         f"{_chain(graph, depth, address)}"))
    return refused


def import_file(store: Aliases, directory: Directory, path: Path, strict: bool = False,
                progress: Callable[[int], None] = lambda done: None) -> Report:
    """Load the file's aliases; added / updated / unchanged / invalid as for mailboxes."""
    parsed = parse_file(path, progress)
    refused = check_chains(parsed, store, directory)
    report = Report(invalid=sorted(parsed.invalid + refused, key=lambda item: item.line))
    if strict and report.invalid:
        report.loaded = False
        return report
    bad = {item.line for item in refused}
    good = [alias for line, alias in parsed.aliases.values() if line not in bad]
    olds = store.get_many([a.address for a in good])
    writes = []
    for alias, old in zip(good, olds, strict=True):
        if old == alias:
            report.unchanged += 1
            continue
        writes.append(alias)
        if old is None:
            report.added += 1
        else:
            report.updated += 1
    store.put_many(writes)
    progress(path.stat().st_size)
    return report
