"""`fallback purge --reconciled [--older-than DAYS] [--yes]`: free what reconcile has finished with.

Only messages in reconcile state `done` with nothing pending (no webmail
change since) and no outbound delivery left are deleted; `--older-than`
keeps those reconciled within the last DAYS days.  The deletion itself
re-checks each message atomically (purge.delete_reconciled), so a message
changed between the count and the deletion stays.  A purge that deletes is
written to the audit log.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from typing import Any

import redis

from fallback import keys
from fallback.commands.context import Context
from fallback.errors import InputError
from fallback.mailbox import fields, removed
from fallback.mailbox.fields import FOLDERS
from fallback.mailbox.purge import delete_reconciled
from fallback.maillog import MailLog
from fallback.ops import audit, metrics
from fallback.ops.trace import TraceBuffer

_BATCH = 500


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("purge", parents=[parents["common"]],
                       help="delete messages already reconciled into the main store")
    p.add_argument("--reconciled", action="store_true", required=True,
                   help="delete messages in reconcile state done (required: the only kind purged)")
    p.add_argument("--older-than", type=float, metavar="DAYS", default=0.0,
                   help="only those reconciled at least DAYS days ago (default 0: all)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--actor", metavar="NAME", help="who to name in the audit log "
                   "(default $SUDO_USER, else $USER)")
    p.set_defaults(handler=run)


def candidates(r: Any, address: str, cutoff_ms: int) -> Iterator[tuple[list[str], int]]:
    """Batches of (ids, bytes) of one mailbox that look purgeable now."""
    # Still pending (changed since) or still being sent: the delete script re-checks both.
    pending = {m.decode() for m in r.smembers(keys.pending(address))}
    pending |= {m.decode() for m in r.smembers(keys.outbox(address))}
    for folder in FOLDERS:
        ids = [i.decode() for i in r.zrange(keys.folder(address, folder), 0, -1)]
        for start in range(0, len(ids), _BATCH):
            chunk = [i for i in ids[start : start + _BATCH] if i not in pending]
            pipe = r.pipeline(transaction=False)
            for msg_id in chunk:
                pipe.hmget(keys.message(address, msg_id), [fields.RSTATE, fields.RTS, fields.TS, fields.SIZE])
            ready, size = [], 0
            for msg_id, (state, rts, ts, sz) in zip(chunk, pipe.execute(), strict=True):
                when = int(rts or ts or 0)
                if state == b"done" and when <= cutoff_ms:
                    ready.append(msg_id)
                    size += int(sz or 0)
            if ready:
                yield ready, size


def run(ctx: Context, args: argparse.Namespace) -> int:
    if args.older_than < 0:
        raise InputError(f"--older-than: {args.older_than:g} is negative (give a number of days)")
    r = ctx.redis()
    cutoff_ms = int((time.time() - args.older_than * 86400) * 1000)
    directory = ctx.directory()
    # With those a directory sync removed while they held mail (mailbox/removed.py).
    addresses = list(dict.fromkeys([*(m.address for m in directory.iter_mailboxes()),
                                    *removed.addresses(r)]))
    count = size = boxes = 0
    for address in addresses:
        found = False
        for ids, nbytes in candidates(r, address, cutoff_ms):
            count, size, found = count + len(ids), size + nbytes, True
        boxes += found
    age = f" reconciled over {args.older_than:g} day(s) ago" if args.older_than else ""
    if count == 0:
        ctx.console.print(f"nothing to purge: no reconciled message{age}")
        return 0
    ctx.console.print(f"{count} reconciled message(s){age}, {size} bytes, in {boxes} mailbox(es) "
                      "will be deleted from the fallback", markup=False, soft_wrap=True)
    if not args.yes:
        if not sys.stdin.isatty():
            raise InputError("refusing to delete without confirmation: give --yes "
                             "(stdin is not a terminal)")
        answer = input("type 'yes' to delete them: ")
        if answer.strip().lower() != "yes":
            ctx.console.print("nothing deleted")
            return 1
    deleted = freed = 0
    # Issue 16: each purge is a mail-log line, counted and kept in the message's trace.
    counters = metrics.Counters(trace=TraceBuffer.for_settings(ctx.settings, "purge"))
    mail = MailLog(counters=metrics.MailCounters(counters))
    for address in addresses:
        for ids, _ in list(candidates(r, address, cutoff_ms)):
            gone: list[str] = []
            n, b = delete_reconciled(r, address, ids, cutoff_ms, gone)
            deleted, freed = deleted + n, freed + b
            for msg_id in gone:
                mail.purged(msg_id, address)
            try:
                counters.flush(r)
            except (redis.RedisError, OSError) as exc:  # figures and trace only: the purge goes on
                print(f"fallback purge: warning: counts not written: {exc}", file=sys.stderr)
    removed.prune(r, directory)  # those left empty need no finding any more
    entry = audit.Entry(action="purge", actor=audit.actor_name(args.actor),
                        args={"reconciled": True, "older_than_days": args.older_than},
                        outcome=f"ok: deleted {deleted} message(s), {freed} bytes")
    for problem in audit.record(r, entry, ctx.settings.audit_log):
        print(f"fallback purge: warning: {problem}", file=sys.stderr)
    ctx.console.print(f"deleted {deleted} message(s), {freed} bytes")
    return 0
