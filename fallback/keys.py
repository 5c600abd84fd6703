"""The Redis key schema, in one place.

Every key that belongs to one mailbox carries the mailbox's address as its
hash tag (`mbx:{alice@example.com}:...`), so all of a mailbox's keys live in
one Redis Cluster slot and every per-mailbox operation is single-slot.  The
directory is bucketed into many small hashes (each with its own tag, so they
spread over the cluster) that stay listpack-encoded.  docs/architecture.md
describes each key; keep the two in step.
"""

from __future__ import annotations

import zlib

SCHEMA_VERSION = "1"

DIR_META = "dir:meta"            # hash: buckets, version
DIR_DOMAINS = "dir:domains"      # hash: domain -> number of provisioned mailboxes
DIR_MAILSTORES = "dir:mailstores"  # hash: mailstore -> number of provisioned mailboxes
STATS_SHARDS = 16                # stats:{n} hashes: per-mailstore message/byte counters


def bucket_of(address: str, buckets: int) -> int:
    return zlib.crc32(address.encode()) % buckets


def dir_bucket(address: str, buckets: int) -> str:
    """hash: address -> directory record."""
    return f"dir:{{{bucket_of(address, buckets)}}}"


def dir_bucket_n(n: int) -> str:
    return f"dir:{{{n}}}"


ALIAS_DOMAINS = "alias:domains"  # hash: domain -> number of aliases (a catch-all counts for its domain)


def alias_bucket(address: str, buckets: int) -> str:
    """hash: alias address (or "@domain" for a catch-all) -> its targets joined by ","."""
    return f"alias:{{{bucket_of(address, buckets)}}}"


def alias_bucket_n(n: int) -> str:
    return f"alias:{{{n}}}"


def stats_shard(address: str) -> str:
    """hash: "<mailstore>\\tmessages|bytes" -> counter; sharded to avoid one hot key."""
    return f"stats:{{s{zlib.crc32(address.encode()) % STATS_SHARDS}}}"


def stats_shard_n(n: int) -> str:
    return f"stats:{{s{n}}}"


def reconcile_counts_shard(address: str) -> str:
    """hash: "<mailstore>\t<state>" -> messages in reconcile state appending, done or failed,
    moved by the state scripts (reconcile/state.py) and purge; sharded like stats."""
    return f"rstats:{{s{zlib.crc32(address.encode()) % STATS_SHARDS}}}"


def reconcile_counts_shard_n(n: int) -> str:
    return f"rstats:{{s{n}}}"


def mbx(address: str) -> str:
    """Prefix of every key of one mailbox."""
    return f"mbx:{{{address}}}"


def message(address: str, msg_id: str) -> str:
    """hash: raw bytes and metadata of one message (its fields: fallback/mailbox/fields.py)."""
    return f"{mbx(address)}:m:{msg_id}"


def message_raw(address: str, msg_id: str) -> str:
    """string, or hash of pieces "1".."n": a message's stored bytes, record layout 3 (issue 17).
    Derived from the message key by fallback/mailbox/record.py (raw_key), in Lua too."""
    return f"{mbx(address)}:r:{msg_id}"


def folder(address: str, name: str) -> str:
    """zset: message id -> received time (ms), one per folder (INBOX, Sent, Trash)."""
    return f"{mbx(address)}:f:{name}"


def unseen(address: str) -> str:
    """set: ids of messages without \\Seen."""
    return f"{mbx(address)}:unseen"


def info(address: str) -> str:
    """hash: messages, bytes, mailstore of one mailbox; `bytes` (the sizes of the messages it
    holds, as stored) is what the mailbox quota counts (mailbox/quota.py)."""
    return f"{mbx(address)}:info"


QUOTA_SHARDS = 16


def quota_refused_n(n: int) -> str:
    """zset: address -> when the receiver last refused mail for it at its quota (mailbox/quota.py),
    sharded; entries older than a day are trimmed when one is added."""
    return f"quota:{{r{n}}}:refused"


def quota_refused(address: str) -> str:
    return quota_refused_n(zlib.crc32(address.encode()) % QUOTA_SHARDS)


REMOVED_SHARDS = 16


def removed_n(n: int) -> str:
    """hash: address -> mailstore of mailboxes a directory sync removed while they still held
    mail (mailbox/removed.py), so reconcile --all, purge and status still find them; sharded."""
    return f"dir:{{r{n}}}:removed"


def removed(address: str) -> str:
    return removed_n(zlib.crc32(address.encode()) % REMOVED_SHARDS)


def dedupe(address: str, digest: str) -> str:
    """string with TTL: the id a message with this digest was stored under in this mailbox.

    Only on a Redis Cluster, for messages whose recipients span slots: each slot
    is its own atomic write, a 451 after a partial write makes the sender retry,
    and the retry must not be stored twice where it already was.
    """
    return f"{mbx(address)}:dup:{digest}"


def forward_dedupe(recipient: str, digest: str) -> str:
    """string with TTL: the same guard for a forwarded copy, in the forward record's slot."""
    return f"fwdq:{{f{forward_shard(recipient)}}}:dup:{recipient}:{digest}"


DEDUPE_TTL_MS = 5 * 86400 * 1000  # as long as senders' queues retry (Postfix: 5 days)


def pending(address: str) -> str:
    """set: ids not yet reconciled into the main store (or changed since)."""
    return f"{mbx(address)}:pending"


def expunged(address: str) -> str:
    """hash: id -> "<ms> <rstate>" of messages the user deleted for good from Trash (the
    tombstones of mailbox/expunge.py: reconcile counts them instead of appending them)."""
    return f"{mbx(address)}:expunged"


OUTBOUND_SHARDS = 16


def outbound_record(address: str, msg_id: str) -> str:
    """hash: one sent message's delivery state (recipients, per-recipient status)."""
    return f"{mbx(address)}:out:{msg_id}"


def outbox(address: str) -> str:
    """set: ids of the sender's messages with recipients not yet finished."""
    return f"{mbx(address)}:outbox"


def outbound_stream(sender: str) -> str:
    """stream (consumer group `workers`): work items {a: sender, id: msg_id}, sharded by sender."""
    return f"outq:{{q{zlib.crc32(sender.encode()) % OUTBOUND_SHARDS}}}"


def outbound_stream_n(n: int) -> str:
    return f"outq:{{q{n}}}"


def web_session(token_hash: str) -> str:
    """hash: one webmail session (user, csrf, created), keyed by a hash of the cookie;
    TTL = idle timeout, never past created + session max age."""
    return f"websess:{{{token_hash}}}"


def web_sessions_of(address: str) -> str:
    """zset: digests of the user's webmail sessions -> created (s), so they can all be ended
    at once; may hold digests of sessions already expired (pruned when read)."""
    return f"{mbx(address)}:websess"


def login_throttle(kind: str, subject: str) -> str:
    """hash: log-in attempts not known to be right, of one client prefix (kind "src":
    fails, until) or of one account (kind "acct": fails, until for the account, and
    f:<prefix>, u:<prefix> for each client network trying it)."""
    return f"throttle:{{{kind}:{subject}}}"


def login_known_networks(account: str) -> str:
    """hash: client networks (/24, /64) that logged in to the account -> time of the last
    success; these are not held by the account-wide delay.  Same slot as the account's
    throttle hash (one Lua script reads both)."""
    return f"throttle:{{acct:{account}}}:known"


def smtp_rate(prefix: str, minute: int) -> str:
    """string: messages (DATA complete) from one SMTP client prefix (a /32, /24 or /64) in one
    minute since the epoch (intake.clientlimits); expires after two minutes."""
    return f"smtprate:{{{prefix}}}:{minute}"


def compose_once(address: str, msg_id: str) -> str:
    """string: set once when a composed message is sent, so a resubmitted form is not sent twice."""
    return f"{mbx(address)}:sending:{msg_id}"


def send_log(address: str) -> str:
    """zset: "<msg_id>:<recipients>" -> sent at (ms): the webmail sends of the last day (sendlimits)."""
    return f"{mbx(address)}:sends"


def send_limit_alerted(address: str, window: str) -> str:
    """string with TTL: the operator was alerted that this user hit the hour/day send limit."""
    return f"{mbx(address)}:sendlimit:{window}"


def outbound_hold(address: str) -> str:
    """hash (since, actor, reason): the operator holds this sender's outbound mail (queues/hold.py)."""
    return f"{mbx(address)}:outhold"


OUTBOUND_HELD = "outq:held"  # set: the senders on hold, for `fallback queue list` (hold.py)


OUTBOUND_GROUP = "workers"  # the consumer group every outbound worker reads the streams with


def outbound_retry_n(n: int) -> str:
    """zset: "<msg_id>\\t<sender>" -> due time (s) of a message waiting for a retry; its stream's slot."""
    return f"outq:{{q{n}}}:retry"


def outbound_dead_n(n: int) -> str:
    """zset: "<msg_id>\\t<sender>" -> time (s) it was parked as a dead letter (poison); same slot."""
    return f"outq:{{q{n}}}:dead"


def outbound_shard(sender: str) -> int:
    return zlib.crc32(sender.encode()) % OUTBOUND_SHARDS


def outbound_lease(address: str, msg_id: str) -> str:
    """string with TTL: the worker delivering this message right now (no two workers at once)."""
    return f"{mbx(address)}:out:{msg_id}:lease"


FAILOVER_SCOPE = "failover:scope"  # hash: mode, since, ms:<mailstore> -> declared at (failover.py)
AUDIT_STREAM = "audit"             # stream: admin actions, time, actor, arguments (audit.py)
INCIDENT = "ops:incident"         # hash: text, since, actor of the live incident text (ops/incident.py)
# Issue 16 (reseller tokens, fallback/ops/tokens.py): one hash tag, so a token's records change in one slot.
RESELLERS = "admin:{tokens}"                 # hash: token name -> JSON (domains, created, expires, creator)
RESELLER_DIGESTS = "admin:{tokens}:digests"  # hash: sha256 of a live token -> its name (the lookup)
RESELLER_REVOKED = "admin:{tokens}:revoked"  # hash: sha256 of a revoked token -> JSON (name, revoked)
RESELLER_USED = "admin:{tokens}:used"        # hash: token name -> last time it was accepted


def admin_auth_failures(client: str) -> str:
    """string with TTL: failed admin API tokens from one client prefix (the brute-force guard)."""
    return f"admin:authfail:{client}"
FORWARD_SHARDS = 16


def forward_stream(recipient: str) -> str:
    """stream: mail for healthy mailstores waiting for the main system's next hop, sharded by recipient."""
    return f"fwdq:{{f{zlib.crc32(recipient.encode()) % FORWARD_SHARDS}}}"


def forward_stream_n(n: int) -> str:
    return f"fwdq:{{f{n}}}"


METRICS_SHARDS = 16


def metrics_shard_n(n: int) -> str:
    """hash: "<metric>\\t<label>=<value>..." -> count, summed over shards by /metrics (metrics.py)."""
    return f"metrics:{{c{n}}}"


def notice_marker(address: str) -> str:
    """hash: start|stop -> the failover episode (declared-at) this mailbox's user was last told about."""
    return f"{mbx(address)}:notice"


FORWARD_GROUP = "forwarders"  # the consumer group every forward worker reads the streams with


def forward_shard(recipient: str) -> int:
    return zlib.crc32(recipient.encode()) % FORWARD_SHARDS


def forward_retry_n(n: int) -> str:
    """zset: "<msg_id>\\t<recipient>" -> due time (s) of a forward waiting for a retry; its stream's slot."""
    return f"fwdq:{{f{n}}}:retry"


def forward_refused_n(n: int) -> str:
    """zset: "<msg_id>\\t<recipient>" -> time of a forward whose last attempt got a 5xx (still retried)."""
    return f"fwdq:{{f{n}}}:refused"


def forward_dead_n(n: int) -> str:
    """zset: "<msg_id>\\t<recipient>" -> time parked: forwards the next hop kept refusing with 5xx
    for forward_dead_letter_after; kept with their bytes until `fallback queue forward-retry`."""
    return f"fwdq:{{f{n}}}:dead"


def forward_held_n(n: int) -> str:
    """zset: "<msg_id>\\t<recipient>" -> time an operator held it (`fallback queue hold --forward`);
    the record is marked parked, so workers skip it until `fallback queue retry --forward`."""
    return f"fwdq:{{f{n}}}:held"


def forward_record(recipient: str, msg_id: str) -> str:
    """hash: one message waiting for the main system for one recipient (raw, sender, attempts, reply).

    It lives in its stream shard's slot, not the recipient's: taking it off the
    queue (record, stream entry, retry zset) is then one single-slot transaction.
    """
    return f"fwdq:{{f{forward_shard(recipient)}}}:r:{recipient}:{msg_id}"


def forward_lease(recipient: str, msg_id: str) -> str:
    """string with TTL: the worker forwarding this record right now."""
    return f"{forward_record(recipient, msg_id)}:lease"


# Issue 15 (conversations and address suggestions): fallback/mailbox/threads.py, contacts.py,
# dirindex.py.
def thread_of(address: str) -> str:
    """hash: message id -> its conversation's id (the id of the conversation's first message seen)."""
    return f"{mbx(address)}:thr:of"


def thread_ids(address: str) -> str:
    """hash: Message-ID (without <>) of a message or one it refers to -> conversation id."""
    return f"{mbx(address)}:thr:ids"


def thread_subjects(address: str) -> str:
    """hash: normalised subject -> "<conversation id> <newest ts ms>" (the subject fallback)."""
    return f"{mbx(address)}:thr:subj"


def thread(address: str, thread_id: str) -> str:
    """zset: message id -> ts (ms) of one conversation, across INBOX, Sent and Trash."""
    return f"{mbx(address)}:thr:t:{thread_id}"


def thread_mark(address: str) -> str:
    """string: ts (ms) up to which the mailbox's messages are in its conversation index."""
    return f"{mbx(address)}:thr:mark"


def thread_lock(address: str) -> str:
    """string with TTL: a webmail request is bringing the conversation index up to date."""
    return f"{mbx(address)}:thr:lock"


def contacts(address: str) -> str:
    """zset: address the user wrote to or received from -> recency-weighted frequency (capped)."""
    return f"{mbx(address)}:contacts"


def contact_names(address: str) -> str:
    """hash: contact address -> the display name last seen with it."""
    return f"{mbx(address)}:contacts:names"


def changes(address: str) -> str:
    """string: a random token set anew in the same atomic step as every change to what a
    folder page shows (mailbox/changes.py); the webmail keeps folder pages under it."""
    return f"{mbx(address)}:chg"


def list_prefs(address: str) -> str:
    """hash: the user's folder-list choices (group: "1" = one row per conversation)."""
    return f"{mbx(address)}:listprefs"


def dir_names(domain: str, prefix: str) -> str:
    """hash (small: stays listpack-encoded): local part -> "" of a domain's provisioned mailboxes
    whose local part starts with `prefix` (its first dirindex.PREFIX characters), for address
    suggestions (mailbox/dirindex.py)."""
    return f"dirx:{{{domain}/{prefix}}}"


DIR_NAMES_BUILT = "dirx:built"  # string: when the name index was built over the whole directory


def dir_name_prefixes(domain: str) -> str:
    """zset (all scores 0, read by lex range): the prefixes that have a dir_names hash."""
    return f"dirx:{{{domain}}}:p"


# Issue 17 (provisioning into a stock Redis, session 7): the name index's layout since then;
# dir_names, dir_name_prefixes and DIR_NAMES_BUILT are the layout before it (dirindex.ensure
# deletes them).
def dir_name_index(domain: str) -> str:
    """hash: a domain's provisioned local parts by their first dirindex.PREFIX characters ->
    the rest of each, sorted, one per line (deflated when long), for address suggestions."""
    return f"dirn:{{{domain}}}"


DIR_NAME_INDEX_BUILT = "dirn:built"  # string: when dir_name_index was built over the whole directory


# Issue 16 (admin console): its sessions and the last hour of mail-log counts by minute.
def console_session(token_hash: str) -> str:
    """hash: one admin console session (who, csrf, created), keyed by a hash of its cookie;
    TTL = idle timeout, never past created + session max age (web/console/session.py)."""
    return f"consess:{{{token_hash}}}"


def metrics_minute_n(n: int, minute: int) -> str:
    """hash: like metrics_shard_n (same hash tag, so one flush stays in one slot), the mail-log
    counts flushed in one minute since the epoch; expires after a little over an hour
    (ops/intakerate.py)."""
    return f"metrics:{{c{n}}}:m{minute}"


# Issue 16 (message trace, fallback/ops/trace.py): each message's events, and who they concern.
def trace(msg_id: str) -> str:
    """list: one message's trace events (JSON lines, capped, expiring after trace_retention)."""
    return f"trace:{{{msg_id}}}"


def trace_address(address: str) -> str:
    """zset: message id -> time of its last event to or from `address` (capped, expiring);
    tagged by the address, like the mailbox's keys."""
    return f"trace:a:{{{address}}}"
