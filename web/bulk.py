"""The folder pages' bulk actions: which ids a form names, what each action does, and the
notice the user reads afterwards.

The routes are in web/mailbox.py; the changes themselves are
fallback/mailbox/bulk.py (flags, moves) and fallback/mailbox/expunge.py
(deleting for good).  Ids are looked up only among the logged-in user's own
keys: another user's id, an id that does not exist and one that is not an
id at all are all "could not be found", counted and never an error.

After the action the browser is sent back to the folder page (POST,
redirect, GET) with the counts in the query string; `notice` turns them
back into one sentence, so the page says nothing a link could make up
beyond numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import redis
from flask_babel import lazy_gettext, ngettext

from fallback.ids import is_id
from fallback.mailbox import bulk, expunge
from fallback.mailbox.fields import DRAFTS, FLAGGED, SEEN, TRASH

MAX_IDS = 500  # ids one request may name: ten pages of 50; bounds the work of one POST

ACTIONS = ("read", "unread", "flag", "unflag", "delete", "restore", "expunge")
# What the user reads, in one place: each sentence whole, so every language can say it its way.
DONE = {
    "read": lambda n: ngettext("%(num)s message marked read.", "%(num)s messages marked read.", n),
    "unread": lambda n: ngettext("%(num)s message marked unread.", "%(num)s messages marked unread.", n),
    "flag": lambda n: ngettext("%(num)s message flagged.", "%(num)s messages flagged.", n),
    "unflag": lambda n: ngettext("%(num)s message unflagged.", "%(num)s messages unflagged.", n),
    "delete": lambda n: ngettext("%(num)s message moved to Trash.", "%(num)s messages moved to Trash.", n),
    "restore": lambda n: ngettext("%(num)s message restored.", "%(num)s messages restored.", n),
    "expunge": lambda n: ngettext("%(num)s message deleted for good.",
                                  "%(num)s messages deleted for good.", n),
}


def _not_in_trash(n: int) -> str:
    return ngettext("%(num)s message was not in Trash.", "%(num)s messages were not in Trash.", n)


SKIPPED = {
    "delete": lambda n: ngettext("%(num)s message was already in Trash.",
                                 "%(num)s messages were already in Trash.", n),
    "restore": _not_in_trash, "expunge": _not_in_trash,
}
COUNTED = {
    "missing": lambda n: ngettext("%(num)s message could not be found.",
                                  "%(num)s messages could not be found.", n),
    "elsewhere": lambda n: ngettext("%(num)s message was not in this folder.",
                                    "%(num)s messages were not in this folder.", n),
    "sending": lambda n: ngettext("%(num)s message is still being sent, so kept in Trash.",
                                  "%(num)s messages are still being sent, so kept in Trash.", n),
}
TEXT = {
    "none": lazy_gettext("No messages were selected, so nothing was changed."),
    "too_many": lazy_gettext("You can act on at most %(n)s messages at once, so nothing was changed. "
                             "Select fewer messages and try again.", n=MAX_IDS),
    "bad_action": lazy_gettext("That action is not available here, so nothing was changed."),
    "trash_only": lazy_gettext("Messages can be deleted for good from Trash only, so nothing was changed."),
}


class TooMany(Exception):
    pass


@dataclass
class Result:
    action: str
    changed: int = 0
    missing: int = 0
    skipped: int = 0     # already so (delete: in Trash), or not in Trash (restore, expunge)
    elsewhere: int = 0   # delete: in another folder than the page's
    sending: int = 0

    def query(self) -> dict[str, str | int]:
        return {"done": self.action, "n": self.changed, "missing": self.missing,
                "skipped": self.skipped, "elsewhere": self.elsewhere, "sending": self.sending}


def selected_ids(values: list[str]) -> tuple[list[str], int]:
    """(well-formed ids in the order given, without repeats; how many others were named)."""
    if len(values) > MAX_IDS:
        raise TooMany(str(TEXT["too_many"]))
    unique = list(dict.fromkeys(values))
    good = [v for v in unique if is_id(v)]
    return good, len(unique) - len(good)


def apply(r: redis.Redis, address: str, folder: str, action: str, ids: list[str], bad: int = 0) -> Result:
    """Do `action` to the messages `ids` of `address`, from the page of `folder` (one pipeline);
    `bad` ids count as missing."""
    result = Result(action, missing=bad)
    if action == "expunge":
        gone = expunge.expunge(r, address, ids)
        result.changed, result.skipped, result.sending = gone.deleted, gone.not_in_trash, gone.sending
        result.missing += gone.missing
        return result
    changes = {
        "read": lambda: bulk.set_flags(r, address, ids, add=SEEN),
        "unread": lambda: bulk.set_flags(r, address, ids, remove=SEEN),
        "flag": lambda: bulk.set_flags(r, address, ids, add=FLAGGED),
        "unflag": lambda: bulk.set_flags(r, address, ids, remove=FLAGGED),
        "delete": lambda: bulk.to_trash(r, address, ids, only_from=folder),
        "restore": lambda: bulk.restore(r, address, ids),
    }
    outcome = changes[action]()
    result.changed = outcome.changed
    if action == "restore":   # not in Trash, wherever it is
        result.skipped = outcome.already + outcome.elsewhere
    else:
        result.skipped, result.elsewhere = outcome.already, outcome.elsewhere
    result.missing += outcome.missing
    return result


def empty_trash(r: redis.Redis, address: str) -> Result:
    gone = expunge.empty_trash(r, address)
    return Result("expunge", changed=gone.deleted, missing=0, skipped=0, sending=gone.sending)


def _number(args: Mapping[str, str], name: str) -> int:
    value = args.get(name, "0")
    return min(int(value), 10**9) if value.isdigit() else 0


def notice(args: Mapping[str, str]) -> str | None:
    """The sentence that reports a bulk action, from the counts the redirect carried."""
    action = args.get("done")
    if action == "none":
        return str(TEXT["none"])
    if action not in DONE:
        return None
    parts = [DONE[action](_number(args, "n"))]
    if _number(args, "missing"):
        parts.append(COUNTED["missing"](_number(args, "missing")))
    if _number(args, "skipped") and action in SKIPPED:
        parts.append(SKIPPED[action](_number(args, "skipped")))
    for what in ("elsewhere", "sending"):
        if _number(args, what):
            parts.append(COUNTED[what](_number(args, what)))
    return " ".join(parts)


def offered(folder: str) -> tuple[str, ...]:
    """The buttons a folder's page shows: Delete outside Trash, Restore and Delete forever in it."""
    if folder == TRASH:
        return ("read", "unread", "flag", "unflag", "restore", "expunge")
    if folder == DRAFTS:  # drafts are opened in compose and deleted when sent (web/drafts.py)
        return ()
    return ("read", "unread", "flag", "unflag", "delete")


def accepts(folder: str, action: str) -> bool:
    """Any action on any folder page (what does not apply is counted as left alone), except
    deleting for good, which only Trash's page does."""
    return action in ACTIONS and folder != DRAFTS and (action != "expunge" or folder == TRASH)
