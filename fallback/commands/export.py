"""`fallback export ADDRESS --format maildir|mbox --output PATH`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fallback.addresses import normalize_address
from fallback.commands.context import Context
from fallback.errors import InputError, NotFound
from fallback.mailbox.fields import FOLDERS
from fallback.mailbox.store import MailboxReader
from fallback.ops import audit
from fallback.ops.export import write_maildir, write_mbox


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export", parents=[parents["common"]],
                       help="write a mailbox's messages to an mbox file or a Maildir")
    p.add_argument("address")
    p.add_argument("--format", choices=("mbox", "maildir"), default="mbox")
    p.add_argument("--output", type=Path, metavar="PATH",
                   help="file (mbox) or directory (maildir); default ADDRESS.mbox / ADDRESS.maildir")
    p.add_argument("--folder", action="append", choices=FOLDERS,
                   help="only this folder (repeatable; default all)")
    p.set_defaults(handler=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    address = normalize_address(args.address)
    if ctx.directory().get(address) is None and not MailboxReader(ctx.redis(), address).info():
        raise NotFound(f"{address} is not provisioned and has no messages")
    output: Path = args.output or Path(f"{address}.{args.format}")
    folders = tuple(args.folder) if args.folder else FOLDERS
    reader = MailboxReader(ctx.redis(), address)
    if args.format == "mbox":
        if output.is_dir():
            raise InputError(f"{output} is a directory; mbox output is a file")
        count = write_mbox(reader, output, folders)
    else:
        if output.exists() and not output.is_dir():
            raise InputError(f"{output} exists and is not a directory")
        count = write_maildir(reader, output, folders)
    ctx.console.print(f"exported {count} message(s) of {address} to {output} ({args.format})")
    # An admin reading a user's mail: always on the record.
    audit.write(ctx.redis(), ctx.settings.audit_log, "export", audit.actor_name(),
                {"address": address, "format": args.format, "output": str(output), "folders": list(folders)},
                f"ok: {count} message(s)", warn_as="fallback export")
    return 0
