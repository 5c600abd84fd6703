"""The message record: its hash fields, the folders and the flags, declared once.

A message is one hash, `mbx:{addr}:m:<id>` (keys.message), and since layout 3 its
bytes in a string key beside it, `mbx:{addr}:m:<id>:r` (record.raw_key).  Every module that
reads or writes one (the write path, the webmail's reads, reconcile, purge,
the outbound queue) names its fields through these constants, so a field is
renamed or added in one place.  Reading goes through record.py, which decodes both
layouts of the record (issue 17).  The Lua scripts spell the same names inside
their source (grep the constant's value); tests/test_headers.py checks that
every name a script writes is declared here.
"""

from __future__ import annotations

# Written once, at delivery.
RAW = "raw"            # layouts 1-2: the exact bytes, our Received: line first (zstd: compression.py);
                       # layout 3 keeps them in their own key (record.raw_key)
VERSION = "v"          # layout 1: its version ("1"); layout 2 keeps it first in PACKED (record.py)
RECORD_VERSION = "3"   # issue 17: the layout written now (record.py reads 1, 2 and 3)
PACKED = "m"           # layouts 2-3: the PARSED values in one field (record.pack_meta)
TS = "ts"              # received (or sent) time, ms
SIZE = "size"          # len(raw)
KIND = "kind"          # received, sent, notice, ...
# Display metadata, parsed from the header when the message is stored (headers.summarize).
FROM, TO, CC, SUBJECT, DATE, MSGID, ATTACH = "from", "to", "cc", "subject", "date", "msgid", "attach"
DISPLAY = (FROM, TO, CC, SUBJECT, DATE, MSGID, ATTACH)
# Issue 15 (conversations): the threading headers, parsed at delivery like the display fields
# (headers.summarize): well-formed ids only, space separated: In-Reply-To's last, References'
# last 20 (headers.THREAD_IDS).
INREPLYTO, REFERENCES = "irt", "refs"
THREADING = (INREPLYTO, REFERENCES)
PARSED = (*DISPLAY, *THREADING)  # what headers.summarize writes on every record
# Changed by the user.
FOLDER = "folder"
FLAGS = "flags"        # space separated IMAP flags
LOCAL = "local"        # sent mail: the recipients that had a mailbox here (display only)
REMOTE = "remote"      # "1": the user chose to load this message's remote images (webmail)
# Reconcile's state (docs/reconcile.md): pending -> appending -> done with the main store's UID.
RSTATE = "rstate"
RBOX, RFOLDER, RFLAGS = "rbox", "rfolder", "rflags"
RUIDVALIDITY, RUID = "ruidvalidity", "ruid"
RTS, RERROR = "rts", "rerror"
PENDING, APPENDING, DONE, FAILED = "pending", "appending", "done", "failed"

ALL = (RAW, VERSION, PACKED, TS, SIZE, KIND, *PARSED, FOLDER, FLAGS, LOCAL, REMOTE, RSTATE, RBOX, RFOLDER,
       RFLAGS, RUIDVALIDITY, RUID, RTS, RERROR)
# What a folder page shows of each message.
LIST = (FLAGS, TS, SIZE, FROM, TO, SUBJECT, ATTACH, KIND, FOLDER)

INBOX, SENT, TRASH = "INBOX", "Sent", "Trash"
DRAFTS = "Drafts"  # issue 15: compose's saved drafts (kind "draft", flag \\Draft), web/drafts.py
FOLDERS = (INBOX, SENT, DRAFTS, TRASH)
SEEN, FLAGGED, ANSWERED, FORWARDED = "\\Seen", "\\Flagged", "\\Answered", "$Forwarded"
DRAFT = "\\Draft"
DRAFT_FORM = "form"  # drafts only: JSON of the form as typed (Bcc is never in the bytes)
