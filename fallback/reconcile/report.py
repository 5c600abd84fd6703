"""What a reconcile run reports: per mailbox and in total, as a table, JSON and progress.

The engine (fallback/reconcile/reconciler.py and job.py) fills these in; `fallback reconcile` prints
the summary, writes the JSON report, and feeds the progress bar through a
`ProgressSink`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol


class ProgressSink(Protocol):
    def messages(self, n: int) -> None: ...

    def mailbox_done(self, report: MailboxReport) -> None: ...


class NoProgress:
    def messages(self, n: int) -> None:
        pass

    def mailbox_done(self, report: MailboxReport) -> None:
        pass


@dataclass
class Failure:
    id: str
    folder: str
    reason: str


@dataclass
class MailboxReport:
    address: str
    appended: int = 0
    already_present: int = 0
    updated: int = 0
    failed: list[Failure] = field(default_factory=list)
    changed: list[Failure] = field(default_factory=list)   # stored, but not byte for byte (NUL bytes)
    error: str | None = None
    left: int = 0
    would_append: int = 0
    would_update: int = 0
    folders_created: list[str] = field(default_factory=list)
    drafts: int = 0  # of `appended`: unsent webmail drafts, into the main store's \Drafts
    deleted_for_good: int = 0   # deleted from Trash for good by the user: not appended

    def as_json(self, dry_run: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "appended": self.appended, "already_present": self.already_present,
            "updated": self.updated,
            "failed": [{"id": f.id, "folder": f.folder, "reason": f.reason} for f in self.failed],
            "changed": [{"id": f.id, "folder": f.folder, "reason": f.reason} for f in self.changed],
            "error": self.error, "left": self.left, "drafts": self.drafts,
            "deleted_for_good": self.deleted_for_good,
            ("folders_to_create" if dry_run else "folders_created"): self.folders_created,
        }
        if dry_run:
            out["would_append"] = self.would_append
            out["would_update"] = self.would_update
        return out


@dataclass
class Report:
    dry_run: bool
    target: str
    mailboxes: dict[str, MailboxReport] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    finished: float = 0.0

    def totals(self) -> dict[str, int]:
        m = self.mailboxes.values()
        return {
            "mailboxes": len(self.mailboxes),
            "appended": sum(x.appended for x in m),
            "drafts": sum(x.drafts for x in m),
            "already_present": sum(x.already_present for x in m),
            "updated": sum(x.updated for x in m),
            "failed": sum(len(x.failed) for x in m),
            "changed": sum(len(x.changed) for x in m),
            "mailbox_errors": sum(1 for x in m if x.error),
            "left": sum(x.left for x in m),
            "deleted_for_good": sum(x.deleted_for_good for x in m),
            "would_append": sum(x.would_append for x in m),
            "would_update": sum(x.would_update for x in m),
        }

    @property
    def ok(self) -> bool:
        """Nothing left to do.  Messages in `changed` are done: another run would store them the same way."""
        t = self.totals()
        if self.dry_run:
            return t["mailbox_errors"] == 0
        return t["left"] == 0 and t["failed"] == 0 and t["mailbox_errors"] == 0

    def as_json(self) -> dict[str, Any]:
        return {
            "imap_url": self.target, "dry_run": self.dry_run,
            "started": self.started, "finished": self.finished,
            "totals": self.totals(),
            "mailboxes": {a: r.as_json(self.dry_run) for a, r in sorted(self.mailboxes.items())},
        }
