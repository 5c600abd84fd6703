"""The schema of the one typed configuration: every setting with its type, default and doc.

`Settings` is the whole schema; `fallback.config.load` fills it from the
sources and `fallback.config.checks` validates it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "FALLBACK_"
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# Schemes `password_scheme` may name: what provisioning can hash a plain-text password with
# (fallback.mailbox.passwords verifies many more).
HASHABLE_SCHEMES = ("ARGON2ID", "ARGON2I", "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT")


def setting(default: Any, doc: str, unit: str | None = None, secret: bool = False) -> Any:
    return field(default=default, metadata={"doc": doc, "unit": unit, "secret": secret})



@dataclass(frozen=True)
class Settings:
    # Where state lives.
    data_dir: Path = setting(Path("./fallback-data"),
                             "Directory for the embedded Redis and runtime files")
    redis_url: str | None = setting(
        None,
        "Redis to use (redis://, rediss://, unix://, redis+cluster://H:P,H:P, redis+sentinel://H:P/SERVICE); "
        "unset: the embedded redis-server of `fallback up`",
        secret=True,
    )
    redis_server: str = setting("redis-server", "redis-server binary for the embedded Redis")
    redis_maxmemory: str | None = setting(
        None, "maxmemory of the embedded Redis (e.g. 4gb; 0: no limit); unset: half the machine's RAM "
        "(or of its cgroup memory limit, if lower)")
    replica_acks: int = setting(
        0, "Replicas that must hold each accepted message before 250 (WAIT, or WAITAOF on Redis 7.2+); "
        "0: the primary's own fsync only")
    replica_ack_timeout: float = setting(
        2.0, "How long a write waits for replica_acks before the sender gets 451", unit="seconds")
    # The SMTP receiver.
    hostname: str | None = setting(None, "Name in the SMTP greeting and Received: lines; unset: hostname")
    smtp_host: str = setting("127.0.0.1", "Address the SMTP receiver listens on (0.0.0.0 for all)")
    smtp_port: int = setting(2525, "SMTP receiver port")
    max_message_size: int = setting(
        50 * MIB, "Largest message accepted (SIZE and actual), bytes; suffixes KiB/MiB", unit="bytes")
    max_recipients: int = setting(100, "Most RCPT TO per message; more get 452 4.5.3")
    max_connections: int = setting(1000, "Concurrent SMTP connections in total; more get 421 4.7.0")
    max_connections_per_ip: int = setting(
        20, "Concurrent SMTP connections from one client (/32, /64 for IPv6) to one receiver "
        "process; its /24 may hold 4 times that; more get 421 4.7.0")
    max_commands: int = setting(1000, "Times one SMTP command may be given on one connection")
    connection_timeout: float = setting(600.0, "Whole-connection time limit, seconds", unit="seconds")
    idle_timeout: float = setting(
        300.0, "Time an SMTP client may go without progress (MAIL, RCPT, DATA; NOOP, RSET and the "
        "like do not count), seconds", unit="seconds")
    smtp_workers: int = setting(
        1, "SMTP receiver processes sharing the port (SO_REUSEPORT), to use every core; 0: one per CPU")
    workers: int | None = setting(
        None, "`fallback up`: processes for the SMTP receiver and for the webmail at once (sets "
        "smtp_workers and web_workers unless they are given); 0: one per CPU")
    smtp_reuse_port: bool = setting(
        False, "Bind the SMTP port with SO_REUSEPORT (set for every receiver when smtp_workers > 1)")
    tls_cert: Path | None = setting(None, "PEM certificate for STARTTLS (with tls_key)")
    tls_key: Path | None = setting(None, "PEM private key for STARTTLS (with tls_cert)")
    # The webmail.
    http_host: str = setting("127.0.0.1", "Address the webmail listens on")
    http_port: int = setting(8080, "Webmail port")
    secret_key: str | None = setting(
        None, "Webmail secret for signing form tokens (32+ characters); --demo makes one up",
        secret=True)
    secret_key_file: Path | None = setting(None, "File holding the webmail secret (instead of secret_key)")
    session_idle_timeout: float = setting(
        1800.0, "Webmail sessions end after this much idle time, seconds", unit="seconds")
    cookie_secure: bool | None = setting(
        None, "Send the session cookie over HTTPS only; unset: yes, except with --demo")
    max_upload_size: int = setting(
        25 * MIB, "Largest total of attachments in one composed message, bytes", unit="bytes")
    incident_message: str = setting(
        "Our main mail system is down. We are working on it.",
        "Operator's message on the public /status page and the login page")
    web_workers: int = setting(2, "gunicorn worker processes of the webmail")
    web_threads: int = setting(4, "Threads per gunicorn worker (concurrent requests each)")
    # Issue 17 (webmail pages, web/pagecache.py): drawn pages kept for an identical next request.
    web_page_cache: int = setting(
        32 * MIB, "Memory for rendered folder and message pages kept per webmail worker, keyed "
        "on everything they show (an identical next request is served from it), and a quarter of it "
        "again for parsed message bodies (a message page and its frame parse once); 0: off",
        unit="bytes")
    # Directory and passwords.
    directory_buckets: int = setting(
        65536, "Hash buckets of the user directory (fixed at first use; the default becomes 16384 "
        "on a Redis that keeps hashes of 1,024 fields compact, as the embedded one does)")
    password_scheme: str = setting("ARGON2ID", "Scheme used to hash plain-text passwords on import")
    directory_cache_ttl: float = setting(
        10.0, "Seconds a receiver reuses a found mailbox's directory record (0: look up every RCPT)",
        unit="seconds")
    # Logging.
    log_level: str = setting("INFO", "Log level: DEBUG, INFO, WARNING, ERROR")
    mail_log: str = setting("-", "Mail log destination: - (stderr; under systemd, the journal), syslog "
                            "(/dev/log, facility mail), syslog:/path/to/socket, syslog:HOST:PORT (UDP), "
                            "or a file path")
    demo: bool = setting(False, "Provision a demo mailbox at start (fallback up)")
    # Reconcile.
    imap_url: str | None = setting(None, "Main store for reconcile: imap://HOST:PORT or imaps://HOST:PORT")
    master_user: str | None = setting(None, "Dovecot master user that reconcile logs in as")
    master_password_file: Path | None = setting(None, "File holding the master user's password")
    master_separator: str = setting(
        "*", "Separator of USER*MASTER logins; empty: SASL PLAIN with an authorization id")
    imap_ca_file: Path | None = setting(None, "CA bundle for imaps:// (default: the system's)")
    imap_timeout: float = setting(120.0, "Time limit of one IMAP command, seconds", unit="seconds")
    reconcile_sent_folder: str = setting("Sent", "Sent folder when the server announces no \\Sent")
    reconcile_trash_folder: str = setting("Trash", "Trash folder when the server announces no \\Trash")
    reconcile_concurrency: int = setting(8, "Mailboxes reconciled in parallel (IMAP connections)")
    # Outbound delivery.
    smarthost: str | None = setting(
        None, "Smarthost HOST:PORT the outbound worker relays sent mail through; unset: mail stays queued")
    smarthost_tls: str = setting("starttls", "TLS to the smarthost: none, starttls or tls (implicit)")
    smarthost_user: str | None = setting(None, "User for SMTP AUTH at the smarthost (with a password file)")
    smarthost_password_file: Path | None = setting(None, "File holding the smarthost AUTH password")
    smarthost_ca_file: Path | None = setting(
        None, "CA bundle that signs the smarthost's certificate (default: the system's)")
    smarthost_timeout: float = setting(60.0, "Time limit of one SMTP command to the smarthost, seconds",
                                       unit="seconds")
    retry_base: float = setting(60.0, "First retry delay after a temporary failure, seconds; doubles "
                                "each attempt, with jitter", unit="seconds")
    retry_max_interval: float = setting(4 * 3600.0, "Longest delay between two attempts, seconds",
                                        unit="seconds")
    retry_deadline: float = setting(5 * 86400.0, "Give up on a recipient (and notify the sender) "
                                    "this long after the message was sent, seconds", unit="seconds")
    claim_timeout: float = setting(120.0, "Work a silent (crashed) worker holds this long is taken over "
                                   "by another worker, seconds", unit="seconds")
    max_crashes: int = setting(5, "Times a message may be taken up without the attempt finishing "
                               "(worker crash or error) before it is parked as a dead letter")
    worker_concurrency: int = setting(8, "Messages one worker delivers at the same time")
    dkim_selector: str | None = setting(None, "DKIM selector; sign mail of domains with a key in "
                                        "dkim_key_dir")
    dkim_key_dir: Path | None = setting(None, "Directory of DKIM private keys, one PEM file per "
                                        "domain named DOMAIN.pem")
    # Failover and operations.
    failover_cache_ttl: float = setting(
        2.0, "How long the receiver and webmail may reuse a read of the failover scope, seconds",
        unit="seconds")
    audit_log: Path | None = setting(
        None, "Also append every admin action as a JSON line to this file (Redis stream `audit` always)")
    admin_token: str | None = setting(None, "Bearer token of the admin HTTP API; unset: API off",
                                      secret=True)
    admin_token_file: Path | None = setting(None, "File holding the admin API token (instead of admin_token)")
    dns_server: str | None = setting(
        None, "Primary authoritative DNS server that takes the MX updates: HOST, HOST:PORT or [IPv6]:PORT")
    dns_zone: str | None = setting(None, "Zone that holds the MX records, e.g. example.com")
    dns_tsig_key_file: Path | None = setting(
        None, "TSIG key for the updates: a BIND key clause as `tsig-keygen` writes it")
    dns_mx_name: str = setting("@", "Owner of the MX records, relative to the zone (@: the zone apex)")
    dns_primary_mx: str | None = setting(
        None, "MX records of normal operation, e.g. '10 mx1.example.com, 20 mx2.example.com'")
    dns_fallback_mx: str | None = setting(
        None, "MX records during the outage, e.g. '10 fallback.example.net'")
    dns_low_ttl: int = setting(300, "TTL (seconds) the MX records get before and after a switch")
    dns_timeout: float = setting(10.0, "Time limit of one DNS query or update, seconds", unit="seconds")
    check_warn_queue_age: float = setting(
        3600.0, "fallback check: WARNING when the oldest queued message is this old, seconds",
        unit="seconds")
    check_crit_queue_age: float = setting(
        4 * 3600.0, "fallback check: CRITICAL when the oldest queued message is this old, seconds",
        unit="seconds")
    forward_to: str | None = setting(
        None, "Next hop of the main mail system for users whose mailstore is not failed over: "
        "smtp://HOST:PORT or lmtp://HOST:PORT; unset: their mail waits in the forward queue")
    forward_alert_age: float = setting(
        3600.0, "Forwarded mail still waiting this long is alerted (log; fallback check WARNING); "
        "it keeps waiting, seconds", unit="seconds")
    forward_retry_base: float = setting(
        30.0, "First retry delay of a forward the next hop did not take, seconds; doubles each "
        "attempt, with jitter", unit="seconds")
    forward_retry_max_interval: float = setting(
        600.0, "Longest delay between two forward attempts, seconds (it never gives up)", unit="seconds")
    forward_timeout: float = setting(60.0, "Time limit of one command to the forward next hop, seconds",
                                     unit="seconds")
    metrics_flush_interval: float = setting(
        5.0, "How often a process adds its counters (mail events, log-ins) to the shared ones in "
        "Redis that /metrics reads, seconds", unit="seconds")
    notice_sender: str | None = setting(
        None, "From address of the user notices of `failover start/stop --notify`; unset: "
        "postmaster@ the first provisioned domain")
    webmail_url: str | None = setting(
        None, "The webmail's public URL, as users should type it (https://...), for the notices")
    check_warn_memory: float = setting(80.0, "fallback check: WARNING at this % of Redis maxmemory")
    check_crit_memory: float = setting(90.0, "fallback check: CRITICAL at this % of Redis maxmemory")
    # Limits against a hostile Internet (docs/runbook.md "Limits").
    mailbox_quota: int = setting(
        2 * GIB, "Message bytes (as received) one mailbox may hold; at or over it new mail gets "
        "452 4.2.2; 0: no quota", unit="bytes")
    memory_reserve: str = setting(
        "90%", "Redis used_memory at which the receiver answers 452 4.3.1 to new mail, keeping the "
        "rest for the webmail: a share of maxmemory (90%) or a size (3GiB)")
    trusted_relays: str | None = setting(
        None, "CIDRs of the perimeter MTAs (e.g. 192.0.2.0/28,2001:db8::/64), exempt from the "
        "per-client limits")
    max_messages_per_ip_per_minute: int = setting(
        120, "Messages one client (/32, /64 for IPv6) may send per minute before 451 4.7.1; "
        "its /24 may send 4 times that; 0: no limit")
    stress_idle_timeout: float = setting(
        10.0, "Idle time allowed between SMTP commands while the receiver holds 80% of "
        "max_connections or more (instead of idle_timeout), seconds", unit="seconds")
    min_data_rate: int = setting(
        500, "Slowest DATA transfer the receiver waits for, bytes per second, judged over each "
        "idle period; slower senders get 421 4.4.2; 0: no minimum", unit="bytes")
    login_source_failures: int = setting(
        5, "Failed webmail logins from one client (address and /24 or /64) before its attempts "
        "are slowed down")
    login_account_failures: int = setting(
        50, "Failed logins to one account, from all clients together, before every attempt on "
        "it is slowed down")
    max_password_length: int = setting(1024, "Longest password the webmail hashes; longer is refused")
    password_check_queue: int = setting(
        8, "Password checks one webmail process lets wait for the hashing pool; more get 503")
    password_check_timeout: float = setting(
        5.0, "A password check that takes longer counts as a failed login, seconds", unit="seconds")
    session_max_age: float = setting(
        12 * 3600.0, "Webmail sessions end this long after login whatever the activity, seconds",
        unit="seconds")
    send_limit_per_hour: int = setting(
        100, "Recipients one webmail user may send to per hour; more get HTTP 429; 0: no limit")
    send_limit_per_day: int = setting(
        500, "Recipients one webmail user may send to per day; more get HTTP 429; 0: no limit")
    metrics_token_file: Path | None = setting(
        None, "File holding a bearer token that non-loopback clients of /metrics and /readyz "
        "must send; unset: loopback only")
    default_scheme: str | None = setting(
        None, "Scheme of passwd-file hashes without a {SCHEME} prefix (Dovecot's "
        "default_pass_scheme); unset: such lines are refused")
    forward_dead_letter_after: float = setting(
        86400.0, "A forward the next hop answers only with 5xx for this long (from the first 5xx; "
        "a 4xx starts again) is parked as a dead letter, seconds", unit="seconds")
    # Issue 14: addresses the main system accepts besides mailboxes (fallback/intake/addressing.py).
    recipient_delimiter: str = setting(
        "+", "Separates a subaddress (alice+news@) from the user, as Postfix's recipient_delimiter; "
        "each character is a delimiter; empty: no subaddresses")
    postmaster_address: str | None = setting(
        None, "Where postmaster@ and abuse@ of every served domain go when no alias names them "
        "(a mailbox here is stored, another address forwarded); unset: forwarded as addressed "
        "to the main system")
    # Issue 18 (the mailstore watcher, fallback/ops/watch.py): `fallback watch`.
    watch_targets: object = setting(
        None, "Mailstores `fallback watch` probes: a TOML table [watch_targets] of NAME = "
        "\"imap://HOST:PORT/PROBE_USER\", or NAME=URL,NAME=URL in the environment; --target wins")
    watch_master_user: str | None = setting(
        None, "fallback watch --master-user: the Dovecot master user the probes log in through")
    watch_master_password_file: Path | None = setting(
        None, "fallback watch --master-password-file: the file holding the master user's password")
    watch_interval: float = setting(
        30.0, "fallback watch --interval: how often each mailstore is probed, seconds", unit="seconds")
    watch_fail_after: int = setting(
        3, "fallback watch --fail-after: failed probes in a row after which a mailstore is alerted "
        "on (and failed over with auto-failover)")
    watch_slow_after: float = setting(
        5.0, "fallback watch --slow-after: a probe slower than this in total (or a step not answering "
        "in it) fails, seconds",
        unit="seconds")
    watch_healthy_after: float = setting(
        600.0, "fallback watch --healthy-after: how long a failed-over mailstore must answer every "
        "probe before the watcher says it looks healthy again, seconds", unit="seconds")
    watch_auto_failover: bool = setting(
        False, "fallback watch --auto-failover: run failover start for a mailstore past fail-after "
        "(off: alert only)")
    # Issue 15 (undo send, fallback/queues/delayed.py): how long a sent message waits for Undo.
    undo_send_seconds: float = setting(
        10, "After Send, how long the message waits (and the webmail offers Undo) before it "
        "leaves, local copies included, seconds; 0: sent at once, no Undo", unit="seconds")
    # Issue 15 (address suggestions, fallback/mailbox/contacts.py): what compose suggests.
    contacts_directory: bool = setting(
        True, "Address suggestions in compose include the users of the user's own mail domain "
        "from the directory (false: only people the user wrote to or heard from here)")
    # Issue 15 (live incident text, fallback/ops/incident.py): what the public /status page tells.
    status_show_scope: bool = setting(
        False, "The public /status page names the mailstores that are failed over (off: it says "
        "only since when the service is active)")
    # Issue 16 (message trace, fallback/ops/trace.py): how long `fallback trace` can see a message.
    trace_retention: float = setting(
        14 * 86400.0, "How long each message's trace (fallback trace) is kept after its last event, "
        "seconds (e.g. 14d); 0: no trace is kept", unit="seconds")
    # Issue 17 (reconcile throughput, fallback/reconcile/job.py): messages per APPEND command.
    reconcile_append_batch: int = setting(
        50, "fallback reconcile: messages sent in one APPEND command where the main store offers "
        "MULTIAPPEND and LITERAL+ (one round trip for them all; 1: one APPEND per message)")
    reconcile_mailbox_connections: int = setting(
        4, "fallback reconcile: IMAP connections one mailbox with more than 100 messages to append "
        "is worked over, each taking the next 100 (up to concurrency x this connections in all)")
    # Issue 17 (intake): the event loop the receiver and the workers run on (service.run).
    event_loop: str = setting(
        "uvloop", "Event loop of fallback up, smtp and worker: uvloop (libuv; about a tenth less "
        "CPU per SMTP connection) or asyncio (the standard library's)")
    # Issue 17 (RAM per stored message, fallback/mailbox/compression.py): stored bytes in zstd.
    store_compression: str = setting(
        "zstd", "How the receiver stores each message's bytes: zstd (compressed when that saves "
        "5 % or more; read back byte-exact) or off (as received); quotas count the raw size either way")
