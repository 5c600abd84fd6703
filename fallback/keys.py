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


def mbx(address: str) -> str:
    """Prefix of every key of one mailbox."""
    return f"mbx:{{{address}}}"


def message(address: str, msg_id: str) -> str:
    """hash: raw bytes and metadata of one message (its fields: fallback/mailbox/fields.py)."""
    return f"{mbx(address)}:m:{msg_id}"


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


def forward_record(recipient: str, msg_id: str) -> str:
    """hash: one message waiting for the main system for one recipient (raw, sender, attempts, reply).

    It lives in its stream shard's slot, not the recipient's: taking it off the
    queue (record, stream entry, retry zset) is then one single-slot transaction.
    """
    return f"fwdq:{{f{forward_shard(recipient)}}}:r:{recipient}:{msg_id}"


def forward_lease(recipient: str, msg_id: str) -> str:
    """string with TTL: the worker forwarding this record right now."""
    return f"{forward_record(recipient, msg_id)}:lease"
