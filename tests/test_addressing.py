"""Every address the main system accepts, accepted here: aliases, subaddresses, catch-alls,
postmaster@ and abuse@, over SMTP (real receiver, real Redis, smtplib from several loopback
sources) and from the webmail, each real mailbox getting the message exactly once."""

from __future__ import annotations

import logging
import os
import smtplib
from typing import Any

import pytest
import redis

from fallback import keys
from fallback.config import Settings, load_settings
from fallback.errors import ConfigError
from fallback.intake import addressing, routing
from fallback.intake.addressing import Policy, Resolution
from fallback.mailbox import store
from fallback.mailbox.aliases import Aliases, make_alias
from fallback.mailbox.delivery import Delivery
from fallback.mailbox.directory import Mailbox, ensure_buckets
from fallback.maillog import LOGGER_NAME
from fallback.ops import failover
from fallback.ops.failover import LISTED, Scope
from fallback.redisconn import is_cluster
from tests.conftest import add_mailbox
from tests.webutil import log_in_as

ALICE, BOB, DAVE = "alice@example.com", "bob@example.com", "dave@example.com"
EXT, EXT2 = "ext@remote.test", "ext2@remote.test"
SENDER = "sender@remote.test"
BODY = b"Subject: hello\r\n\r\nbody\r\n"


@pytest.fixture
def served(r: redis.Redis, settings: Settings) -> Aliases:
    """alice and bob on failed-over store1, dave on healthy store2, and the aliases of the issue."""
    add_mailbox(r, settings, ALICE, mailstore="store1")
    add_mailbox(r, settings, BOB, mailstore="store1")
    add_mailbox(r, settings, DAVE, mailstore="store2")
    failover.start(r, ["store1"])
    book = Aliases(r, ensure_buckets(r, settings.directory_buckets))
    for address, targets in (
        ("sales@example.com", [ALICE, BOB]),
        ("info@example.com", ["sales@example.com", ALICE]),   # names alice twice, through sales
        ("team@example.com", [ALICE, DAVE, EXT]),             # here, healthy and outside
        ("list@example.com", [EXT, EXT2]),                    # outside only
        ("@catch.example", [BOB]),
        ("loop1@example.com", ["loop2@example.com"]),
        ("loop2@example.com", ["loop1@example.com"]),
    ):
        book.put(make_alias(address, targets))
    return book


def transaction(port: int, source: str, rcpts: list[str]) -> tuple[list[tuple[int, bytes]], int, bytes]:
    """One message from `source`: each RCPT's reply, then DATA's (if a recipient was taken)."""
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=30) as s:
        s.ehlo("client.test")
        s.mail(SENDER)
        replies = [s.rcpt(rcpt) for rcpt in rcpts]
        if not any(code == 250 for code, _ in replies):
            return replies, 0, b""
        code, text = s.data(BODY)
    return replies, code, text


def inbox(r: redis.Redis, address: str) -> list[bytes]:
    reader = store.MailboxReader(r, address)
    return [reader.raw(i) or b"" for i in reader.ids("INBOX")]


def forwards(r: redis.Redis) -> list[str]:
    """The recipient of every forward record queued (the main MTA's envelope recipients)."""
    out: list[str] = []
    for n in range(keys.FORWARD_SHARDS):
        entries: Any = r.xrange(keys.forward_stream_n(n))
        out.extend(entry[b"a"].decode() for _, entry in entries)
    return sorted(out)


def test_aliases_and_subaddress_reach_each_mailbox_once(r: redis.Redis, served: Aliases,
                                                        receiver_factory: Any) -> None:
    rt = receiver_factory()
    replies, code, _ = transaction(rt.port, "127.0.0.2",
                                   ["sales@example.com", "info@example.com", "alice+news@example.com",
                                    "someone@catch.example"])
    assert [c for c, _ in replies] == [250, 250, 250, 250] and code == 250
    assert len(inbox(r, ALICE)) == 1 and len(inbox(r, BOB)) == 1
    assert forwards(r) == []
    # alice was reached through three addresses, so her copy names none of them.
    assert b"Delivered-To" not in inbox(r, ALICE)[0]


def test_subaddress_keeps_the_original_recipient(r: redis.Redis, served: Aliases,
                                                 receiver_factory: Any) -> None:
    rt = receiver_factory()
    _, code, _ = transaction(rt.port, "127.0.0.3", ["Alice+News@Example.com"])
    assert code == 250
    (raw,) = inbox(r, ALICE)
    head = raw.split(b"\r\n\r\n")[0]
    assert b"for <alice+news@example.com>" in head
    assert b"\r\nDelivered-To: alice+news@example.com\r\n" in head
    assert raw.endswith(BODY)


def test_mixed_alias_local_copy_and_forwards_of_the_rest(r: redis.Redis, served: Aliases,
                                                         receiver_factory: Any) -> None:
    rt = receiver_factory()
    _, code, _ = transaction(rt.port, "127.0.0.2", ["team@example.com", "list@example.com"])
    assert code == 250
    assert len(inbox(r, ALICE)) == 1
    # dave (healthy) and ext (team's outside target) each once; list@ as addressed, which the
    # main MTA expands itself; never team@ itself (the main MTA would deliver to alice again).
    assert forwards(r) == sorted([DAVE, EXT, "list@example.com"])
    assert inbox(r, DAVE) == []


def test_alias_loop_at_run_time_is_451_and_nothing_stored(r: redis.Redis, served: Aliases,
                                                          receiver_factory: Any,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    rt = receiver_factory()
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        replies, code, _ = transaction(rt.port, "127.0.0.3", ["loop1@example.com"])
    assert replies == [(451, b"4.4.6 Mail loop detected for this address, please try again later")]
    assert code == 0 and inbox(r, ALICE) == [] and forwards(r) == []
    (line,) = [m for m in caplog.messages if "to=loop1@example.com" in m]
    assert "event=rejected" in line and "451 4.4.6" in line and "loop" in line


def test_over_deep_chain_is_451(r: redis.Redis, served: Aliases, receiver_factory: Any) -> None:
    chain = [f"hop{n}@example.com" for n in range(addressing.MAX_DEPTH + 1)]
    for here, there in zip(chain, [*chain[1:], ALICE], strict=True):
        served.put(make_alias(here, [there]))
    rt = receiver_factory()
    # At the limit: MAX_DEPTH aliases deep is delivered; one more is refused.
    replies, code, _ = transaction(rt.port, "127.0.0.2", [chain[1]])
    assert replies[0][0] == 250 and code == 250 and len(inbox(r, ALICE)) == 1
    replies, code, _ = transaction(rt.port, "127.0.0.3", [chain[0]])
    assert replies[0][0] == 451 and code == 0 and len(inbox(r, ALICE)) == 1


def test_postmaster_and_abuse_without_alias_go_to_the_main_system(
        r: redis.Redis, served: Aliases, receiver_factory: Any) -> None:
    rt = receiver_factory()
    replies, code, _ = transaction(rt.port, "127.0.0.2", ["postmaster@example.com", "abuse@example.com",
                                                          "postmaster@catch.example"])
    assert [c for c, _ in replies] == [250, 250, 250] and code == 250
    # catch.example's catch-all takes its postmaster; example.com has none: forwarded as addressed.
    assert forwards(r) == ["abuse@example.com", "postmaster@example.com"]
    assert len(inbox(r, BOB)) == 1
    replies, _, _ = transaction(rt.port, "127.0.0.3", ["postmaster@foreign.test"])
    assert replies == [(550, b"5.7.1 Relaying denied: we do not accept mail for that domain")]


def test_postmaster_address_and_alias(r: redis.Redis, served: Aliases, receiver_factory: Any) -> None:
    rt = receiver_factory(postmaster_address=BOB, directory_cache_ttl=0)  # the alias counts at once
    _, code, _ = transaction(rt.port, "127.0.0.2", ["postmaster@example.com", "abuse@example.com"])
    assert code == 250 and len(inbox(r, BOB)) == 1 and forwards(r) == []
    served.put(make_alias("abuse@example.com", [ALICE]))  # an alias wins over postmaster_address
    _, code, _ = transaction(rt.port, "127.0.0.3", ["abuse@example.com"])
    assert code == 250 and len(inbox(r, ALICE)) == 1 and len(inbox(r, BOB)) == 1


def test_unknown_and_delimiter_off(r: redis.Redis, served: Aliases, receiver_factory: Any) -> None:
    rt = receiver_factory(recipient_delimiter="")
    replies, _, _ = transaction(rt.port, "127.0.0.2", ["alice+news@example.com", "nobody@example.com"])
    assert replies == [(550, b"5.1.1 No such user here")] * 2
    replies, code, _ = transaction(rt.port, "127.0.0.3", ["alice@example.com"])
    assert replies[0][0] == 250 and code == 250 and len(inbox(r, ALICE)) == 1


def test_exact_address_beats_subaddress_and_catch_all(r: redis.Redis, settings: Settings,
                                                      served: Aliases, receiver_factory: Any) -> None:
    add_mailbox(r, settings, "carol+x@catch.example", mailstore="store1")
    rt = receiver_factory()
    _, code, _ = transaction(rt.port, "127.0.0.2", ["carol+x@catch.example"])
    assert code == 250 and len(inbox(r, "carol+x@catch.example")) == 1 and inbox(r, BOB) == []


def test_webmail_send_to_an_alias_routes_as_smtp(r: redis.Redis, settings: Settings,
                                                 served: Aliases) -> None:
    from tests.test_web_compose import send
    from tests.webutil import make_app

    client = make_app(settings, r).test_client()
    log_in_as(client, DAVE)
    resp, msg_id = send(client, to="sales@example.com, team@example.com", subject="hi", body="x")
    assert resp.status_code == 302
    assert len(inbox(r, ALICE)) == 1 and len(inbox(r, BOB)) == 1
    assert inbox(r, ALICE)[0] == store.MailboxReader(r, DAVE).raw(msg_id)  # the Sent copy's bytes
    # team@'s other targets: dave's own mailstore is healthy (forwarded), ext outside.
    assert forwards(r) == sorted([DAVE, EXT])
    resp, _ = send(client, to="loop1@example.com", subject="hi", body="x")
    assert resp.status_code == 400
    assert ("Mail to loop1@example.com cannot be delivered now: that address is an alias that "
            "loops. Nothing was sent; please tell your mail administrator.") in resp.text
    assert len(inbox(r, ALICE)) == 1 and r.zcard(keys.folder(DAVE, "Sent")) == 1


# --- the rules as pure functions ----------------------------------------------------------

@pytest.mark.parametrize("address, delimiter, base", [
    ("alice+news@x.test", "+", "alice@x.test"),
    ("alice-news+a@x.test", "+-", "alice@x.test"),
    ("alice@x.test", "+", None),
    ("+news@x.test", "+", None),  # nothing before the delimiter: no user to deliver to
    ("alice+news@x.test", "", None),
])
def test_base_address(address: str, delimiter: str, base: str | None) -> None:
    assert addressing.base_address(address, delimiter) == base


def test_plan_sends_each_mailbox_once() -> None:
    a, b, d = Mailbox(ALICE, "store1", ""), Mailbox(BOB, "store1", ""), Mailbox(DAVE, "store2", "")
    scope = Scope(LISTED, 1.0, {"store1": 1.0})
    routes = routing.plan({ALICE: "store1"}, [
        Resolution("sales@example.com", addressing.VIA_ALIAS, (a, b)),
        Resolution("dave+x@example.com", addressing.SUBADDRESS, (d,)),
        Resolution("team@example.com", addressing.VIA_ALIAS, (a, d), (EXT,)),
        Resolution("list@example.com", addressing.VIA_ALIAS, (), (EXT, EXT2)),
    ], scope)
    assert routes.mailboxes == [Delivery(ALICE, "store1"), Delivery(BOB, "store1")]
    assert routes.forward == ["dave+x@example.com", DAVE, EXT, "list@example.com"]


def test_an_alias_with_nothing_here_is_forwarded_as_addressed_once() -> None:
    """Its mailboxes all on healthy mailstores: the main MTA gets the alias itself and expands
    it; forwarding its targets one by one too would give them a second copy."""
    d = Mailbox(DAVE, "store2", "")
    scope = Scope(LISTED, 1.0, {"store1": 1.0})
    routes = routing.plan({}, [
        Resolution("desk@example.com", addressing.VIA_ALIAS, (d,), (EXT,)),
        Resolution("dave@example.com", addressing.VIA_ALIAS, (d,), (EXT2,)),  # alias of a mailbox
    ], scope)
    assert routes.mailboxes == []
    assert routes.forward == ["desk@example.com", "dave@example.com"]


@pytest.mark.parametrize("value, message", [
    ("a@", "recipient_delimiter: 'a@' holds a character that cannot separate a subaddress"),
])
def test_bad_delimiter_is_refused(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({"recipient_delimiter": value}, env={})
    assert exc.value.reason == message


def test_bad_postmaster_address_is_refused() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({"postmaster_address": "not an address"}, env={})
    assert exc.value.reason.startswith("postmaster_address: ")


def test_policy_of_settings() -> None:
    s = load_settings({"postmaster_address": "Ops@Example.com", "recipient_delimiter": "-"}, env={})
    assert Policy.of(s) == Policy("-", "ops@example.com")


# --- an alias wins over a mailbox of its address (Postfix's virtual_alias_maps) ------------

def test_alias_of_a_mailbox_address_redirects(r: redis.Redis, settings: Settings, served: Aliases,
                                              receiver_factory: Any) -> None:
    served.put(make_alias(BOB, [ALICE]))  # bob left: his mail goes to alice
    rt = receiver_factory()
    replies, code, _ = transaction(rt.port, "127.0.0.2", [BOB, "bob+tag@example.com"])
    assert [c for c, _ in replies] == [250, 250] and code == 250
    assert len(inbox(r, ALICE)) == 1 and inbox(r, BOB) == [] and forwards(r) == []
    # The webmail routes the same way.
    from tests.test_web_compose import send
    from tests.webutil import make_app

    client = make_app(settings, r).test_client()
    log_in_as(client, DAVE)
    resp, _ = send(client, to=BOB, subject="hi", body="x")
    assert resp.status_code == 302
    assert len(inbox(r, ALICE)) == 2 and inbox(r, BOB) == [] and forwards(r) == []


def test_self_including_alias_keeps_a_copy_and_forwards_the_rest(
        r: redis.Redis, served: Aliases, receiver_factory: Any) -> None:
    served.put(make_alias(ALICE, [ALICE, EXT]))
    rt = receiver_factory()
    _, code, _ = transaction(rt.port, "127.0.0.3", [ALICE])
    assert code == 250 and len(inbox(r, ALICE)) == 1 and forwards(r) == [EXT]
    # Naming itself without a mailbox here: the main system's address, forwarded as addressed.
    served.put(make_alias("gone@example.com", ["gone@example.com", ALICE]))
    _, code, _ = transaction(rt.port, "127.0.0.2", ["gone@example.com"])
    # alice@'s own alias applies on the way too: her copy, and ext once more (a new message).
    assert code == 250 and len(inbox(r, ALICE)) == 2
    assert forwards(r) == sorted([EXT, EXT, "gone@example.com"])


def test_chain_back_to_a_mailbox_is_not_a_loop(r: redis.Redis, served: Aliases,
                                               receiver_factory: Any) -> None:
    served.put(make_alias(ALICE, [BOB]))
    served.put(make_alias(BOB, [ALICE, EXT]))  # alice -> bob -> alice: her mailbox, and bob's back
    rt = receiver_factory()
    replies, code, _ = transaction(rt.port, "127.0.0.2", [ALICE])
    assert replies[0][0] == 250 and code == 250
    assert len(inbox(r, ALICE)) == 1 and inbox(r, BOB) == [] and forwards(r) == [EXT]
    _, code, _ = transaction(rt.port, "127.0.0.3", [ALICE, BOB])
    assert code == 250 and len(inbox(r, ALICE)) == 2 and len(inbox(r, BOB)) == 1
    assert forwards(r) == [EXT, EXT]  # once per message
    # Back through an alias that is no mailbox: nothing would take the mail, 451, nothing stored.
    served.put(make_alias("desk@example.com", [ALICE]))
    served.put(make_alias(ALICE, ["desk@example.com"]))
    replies, code, _ = transaction(rt.port, "127.0.0.2", ["desk@example.com"])
    assert replies == [(451, b"4.4.6 Mail loop detected for this address, please try again later")]
    # A loop between aliases none of which is a mailbox, likewise.
    replies, code, _ = transaction(rt.port, "127.0.0.3", ["loop2@example.com"])
    assert replies == [(451, b"4.4.6 Mail loop detected for this address, please try again later")]
    assert code == 0 and len(inbox(r, ALICE)) == 2 and forwards(r) == [EXT, EXT]


def test_alias_of_the_base_beats_a_mailbox_of_the_subaddress(
        r: redis.Redis, settings: Settings, served: Aliases, receiver_factory: Any) -> None:
    # Postfix looks up user+tag@d, then user@d, in virtual_alias_maps before any mailbox.
    add_mailbox(r, settings, "carol+x@catch.example", mailstore="store1")
    served.put(make_alias("carol@catch.example", [ALICE]))
    rt = receiver_factory()
    _, code, _ = transaction(rt.port, "127.0.0.2", ["carol+x@catch.example"])
    assert code == 250 and len(inbox(r, ALICE)) == 1 and inbox(r, "carol+x@catch.example") == []


def _redis_work(r: redis.Redis) -> tuple[int, dict[str, int]]:
    """Reads the server has processed (one per round trip of a client) and calls per command."""
    stats: Any = r.info("stats")
    calls: Any = r.info("commandstats")
    return int(stats["total_reads_processed"]), {k: int(v["calls"]) for k, v in calls.items()}


@pytest.mark.skipif(os.environ.get("FALLBACK_TEST_REDIS") == "cluster",
                    reason="counts one server's reads; on a cluster the directory and alias "
                    "buckets are on different nodes (two round trips, at once)")
def test_a_mailbox_without_alias_costs_one_round_trip_per_rcpt(
        r: redis.Redis, settings: Settings, served: Aliases, receiver_factory: Any) -> None:
    names = [f"user{n}@example.com" for n in range(6)]
    for name in names:
        add_mailbox(r, settings, name, mailstore="store1")
    rt = receiver_factory(directory_cache_ttl=0, mailbox_quota=0)  # every RCPT asks Redis

    def cost(rcpts: list[str]) -> tuple[int, dict[str, int]]:
        """What the RCPT commands alone cost Redis (MAIL before, nothing stored after)."""
        with smtplib.SMTP("127.0.0.1", rt.port, source_address=("127.0.0.2", 0), timeout=30) as s:
            s.ehlo("client.test")
            s.mail(SENDER)
            reads0, calls0 = _redis_work(r)
            assert [s.rcpt(rcpt)[0] for rcpt in rcpts] == [250] * len(rcpts)
            reads1, calls1 = _redis_work(r)
        return reads1 - reads0, {k: n - calls0.get(k, 0) for k, n in calls1.items() if n != calls0.get(k, 0)}

    one_reads, one_calls = cost(names[:1])
    six_reads, six_calls = cost(names)
    extra = {k: six_calls.get(k, 0) - one_calls.get(k, 0) for k in {*one_calls, *six_calls}}
    # Five more plain mailboxes: five more round trips of two HGETs each (directory, alias), nothing else.
    assert {k: n for k, n in extra.items() if n} == {"cmdstat_hget": 10}
    assert six_reads - one_reads == 5


# --- each local copy names the address it was reached through (Postfix's Delivered-To:) -----

CAROL = "carol@example.com"
MIXED = ["alice+news@example.com", "sales2@example.com", CAROL]


def _fill(r: redis.Redis, key: str, maxmemory: Any) -> None:
    """The Redis (on a cluster: the node of `key`) refuses writes (maxmemory 1) or takes them again."""
    if is_cluster(r):
        r.config_set("maxmemory", maxmemory, target_nodes=r.get_node_from_key(key))  # type: ignore[attr-defined]
    else:
        r.config_set("maxmemory", maxmemory)


def _trace(raw: bytes) -> bytes:
    """Our Received: line and what follows it up to the client's own headers."""
    return raw[: raw.index(BODY)]


def test_each_copy_names_its_own_original_recipient(r: redis.Redis, settings: Settings,
                                                    served: Aliases, receiver_factory: Any) -> None:
    add_mailbox(r, settings, CAROL, mailstore="store1")
    served.put(make_alias("sales2@example.com", [BOB]))
    rt = receiver_factory()
    replies, code, _ = transaction(rt.port, "127.0.0.2", MIXED)
    assert [c for c, _ in replies] == [250, 250, 250] and code == 250
    (a,), (b,), (c,) = inbox(r, ALICE), inbox(r, BOB), inbox(r, CAROL)
    assert a.endswith(BODY) and b.endswith(BODY) and c.endswith(BODY)
    assert b"\tfor <alice+news@example.com>;" in _trace(a)
    assert _trace(a).endswith(b"\r\nDelivered-To: alice+news@example.com\r\n")
    assert b"\tfor <sales2@example.com>;" in _trace(b)
    assert _trace(b).endswith(b"\r\nDelivered-To: sales2@example.com\r\n")
    # carol was reached by her own address: her copy names no one (the others stay Bcc).
    assert b"Delivered-To" not in c and b" for <" not in c and b"example.com" not in _trace(c)
    # One message, one id, each copy's size its own bytes.
    ids = [store.MailboxReader(r, m).ids("INBOX") for m in (ALICE, BOB, CAROL)]
    assert ids[0] == ids[1] == ids[2]
    assert [int(r.hget(keys.info(m), "bytes") or 0) for m in (ALICE, BOB, CAROL)] == [len(a), len(b), len(c)]
    assert forwards(r) == []


def test_a_retry_after_a_failed_write_of_several_copies_stores_each_once(
        r: redis.Redis, settings: Settings, served: Aliases, receiver_factory: Any) -> None:
    add_mailbox(r, settings, CAROL, mailstore="store1")
    served.put(make_alias("sales2@example.com", [BOB]))
    rt = receiver_factory(memory_reserve="100GiB", directory_cache_ttl=60.0)
    with smtplib.SMTP("127.0.0.1", rt.port, source_address=("127.0.0.3", 0), timeout=30) as s:
        s.ehlo("client.test")  # RCPT lookups cached before Redis refuses writes
        s.mail(SENDER)
        assert [s.rcpt(rcpt)[0] for rcpt in MIXED] == [250, 250, 250]
        s.rset()
    _fill(r, keys.mbx(CAROL), 1)
    try:
        _, code, text = transaction(rt.port, "127.0.0.3", MIXED)
    finally:
        _fill(r, keys.mbx(CAROL), 0)
    assert (code, text) == (451, b"4.3.0 Temporary storage problem, please try again later")
    assert inbox(r, CAROL) == []
    _, code, _ = transaction(rt.port, "127.0.0.2", MIXED)  # the sender's retry
    assert code == 250
    assert [len(inbox(r, m)) for m in (ALICE, BOB, CAROL)] == [1, 1, 1]
    assert all(raw.endswith(BODY) for m in (ALICE, BOB, CAROL) for raw in inbox(r, m))
    assert _trace(inbox(r, BOB)[0]).endswith(b"\r\nDelivered-To: sales2@example.com\r\n")


def _record(r: redis.Redis, rcpt: str, msg_id: str) -> dict[bytes, bytes]:
    record: Any = r.hgetall(keys.forward_record(rcpt, msg_id))
    return dict(record)


def test_local_copies_name_their_recipient_when_others_are_forwarded(
        r: redis.Redis, served: Aliases, receiver_factory: Any) -> None:
    """Issue 14: a message with forwarded recipients still gives each mailbox reached through an
    alias or a subaddress its own copy naming it, in the same one write as the forward records."""
    served.put(make_alias("sales3@example.com", [ALICE, EXT]))  # a local mailbox and an outside one
    rt = receiver_factory()
    rcpts = ["sales3@example.com", "bob+tag@example.com", DAVE]
    replies, code, text = transaction(rt.port, "127.0.0.2", rcpts)
    assert [c for c, _ in replies] == [250, 250, 250] and code == 250
    msg_id = text.decode().rsplit("id=", 1)[1]
    (a,), (b,) = inbox(r, ALICE), inbox(r, BOB)
    assert b"\tfor <sales3@example.com>;" in _trace(a)
    assert _trace(a).endswith(b"\r\nDelivered-To: sales3@example.com\r\n")
    assert b"\tfor <bob+tag@example.com>;" in _trace(b)
    assert _trace(b).endswith(b"\r\nDelivered-To: bob+tag@example.com\r\n")
    assert store.MailboxReader(r, ALICE).ids("INBOX") == store.MailboxReader(r, BOB).ids("INBOX") == [msg_id]
    # dave (healthy) and ext (sales3's outside target), each once, with the bytes naming nobody.
    assert forwards(r) == sorted([DAVE, EXT])
    assert inbox(r, DAVE) == []
    for rcpt in (DAVE, EXT):
        rec = _record(r, rcpt, msg_id)
        assert rec[b"rcpt"] == rcpt.encode() and rec[b"sender"] == SENDER.encode()
        assert rec[b"raw"].endswith(BODY) and msg_id.encode() in rec[b"raw"]
        assert b"Delivered-To" not in rec[b"raw"] and b" for <" not in rec[b"raw"]
    # Each copy counted with its own size.
    assert [int(r.hget(keys.info(m), "bytes") or 0) for m in (ALICE, BOB)] == [len(a), len(b)]
    # The sender's retry of the same transaction (a 451 it thinks it got) on a cluster finds it
    # stored; on one Redis it is a new message (nothing there tells it from a real second one).
    _, code, _ = transaction(rt.port, "127.0.0.3", rcpts)
    assert code == 250
    second = 1 if is_cluster(r) else 2
    assert len(inbox(r, ALICE)) == len(inbox(r, BOB)) == second
    assert len(forwards(r)) == 2 * second


def test_one_forwarded_recipient_and_its_local_copy_name_it(r: redis.Redis, served: Aliases,
                                                           receiver_factory: Any) -> None:
    served.put(make_alias("sales3@example.com", [ALICE, EXT]))
    rt = receiver_factory()
    _, code, text = transaction(rt.port, "127.0.0.3", ["sales3@example.com"])
    assert code == 250
    msg_id = text.decode().rsplit("id=", 1)[1]
    (a,) = inbox(r, ALICE)
    assert _trace(a).endswith(b"\r\nDelivered-To: sales3@example.com\r\n")
    # The only recipient: the forwarded copy is the same bytes (no Bcc to hide).
    assert forwards(r) == [EXT] and _record(r, EXT, msg_id)[b"raw"] == a
