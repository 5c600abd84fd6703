"""Aliases (Postfix virtual(5) entries): storage, the virtual-file importer and `fallback alias`.

All against a real redis-server (and one test on a real Redis Cluster): the
bucketed storage, the parser's line-numbered errors, loops and over-deep
chains refused at import with nothing of them stored, and the CLI's texts
and exit codes.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from fallback import keys
from fallback.cli import main
from fallback.config import Settings, load_settings
from fallback.errors import InputError
from fallback.mailbox import aliases, virtualfile
from fallback.mailbox.aliases import Alias, Aliases
from fallback.mailbox.directory import Directory, ensure_buckets
from fallback.ops import audit, failover
from fallback.redisconn import async_client, sync_client
from tests.conftest import add_mailbox
from tests.servers import RedisClusterServers, SmtpSink, sink_payload, wait_for


def _aliases(r: redis.Redis, settings: Settings) -> Aliases:
    return Aliases(r, ensure_buckets(r, settings.directory_buckets))


def test_put_get_lookup_remove_count(r: redis.Redis, settings: Settings) -> None:
    store = _aliases(r, settings)
    sales = Alias("sales@example.com", ("alice@example.com", "boss@elsewhere.test"))
    catch = Alias("@example.org", ("carol@example.org",))
    store.put(sales)
    assert store.put_many([catch, Alias("info@example.com", ("sales@example.com",))]) == 2
    assert store.put_many([Alias("info@example.com", ("bob@example.com",))]) == 0  # replaced, not new
    assert store.get("sales@example.com") == sales
    assert store.get("@example.org") == catch
    assert store.get("nobody@example.com") is None
    assert aliases.lookup(r, store.buckets, "info@example.com") == ("bob@example.com",)
    assert aliases.lookup(r, store.buckets, "alice@example.com") is None
    assert store.count() == 3
    assert sorted(store.addresses()) == ["@example.org", "info@example.com", "sales@example.com"]
    assert store.remove("sales@example.com") is True
    assert store.remove("sales@example.com") is False
    assert store.count() == 2
    assert store.domains() == {"example.com": 1, "example.org": 1}
    store.remove("@example.org")
    assert store.domains() == {"example.com": 1}  # no zero counts left behind
    # The value is the compact form: the origin's tag, then the targets joined by commas,
    # in one small bucket hash.
    bucket = keys.alias_bucket("info@example.com", store.buckets)
    assert r.hget(bucket, "info@example.com") == b"v|bob@example.com"


def test_origin_is_stored_with_the_alias_and_untagged_values_read_as_virtual(
        r: redis.Redis, settings: Settings) -> None:
    store = _aliases(r, settings)
    store.put(Alias("ldap@example.com", ("alice@example.com",), aliases.LDAP))
    store.put(Alias("hand@example.com", ("bob@example.com", "carol@example.com"), aliases.MANUAL))
    # A value written before origins existed: no tag, read as a virtual file's.
    old_bucket = keys.alias_bucket("old@example.com", store.buckets)
    r.hset(old_bucket, "old@example.com", "alice@example.com,bob@example.com")
    assert r.hget(keys.alias_bucket("hand@example.com", store.buckets), "hand@example.com") == \
        b"m|bob@example.com,carol@example.com"
    assert store.get("old@example.com") == Alias("old@example.com", ("alice@example.com", "bob@example.com"))
    assert store.get("ldap@example.com") == Alias("ldap@example.com", ("alice@example.com",), aliases.LDAP)
    # The routing lookup returns the targets only, tag or no tag.
    assert aliases.lookup(r, store.buckets, "hand@example.com") == ("bob@example.com", "carol@example.com")
    assert aliases.lookup(r, store.buckets, "old@example.com") == ("alice@example.com", "bob@example.com")
    by_origin = {o: sorted(a.address for a in store.entries(o)) for o in aliases.ORIGINS}
    assert by_origin == {"v": ["old@example.com"], "l": ["ldap@example.com"], "m": ["hand@example.com"]}
    assert len(list(store.entries())) == 3


def test_lookup_async_and_domain_known(r: redis.Redis, settings: Settings) -> None:
    store = _aliases(r, settings)
    store.put(Alias("@aliasonly.test", ("alice@example.com",)))
    store.put(Alias("list@example.com", ("a@x.test", "b@y.test")))

    async def ask() -> tuple[object, object, bool, bool]:
        ar = async_client(str(settings.redis_url))
        try:
            return (await aliases.lookup_async(ar, store.buckets, "list@example.com"),
                    await aliases.lookup_async(ar, store.buckets, "other@example.com"),
                    await aliases.domain_known_async(ar, "aliasonly.test"),
                    await aliases.domain_known_async(ar, "unknown.test"))
        finally:
            await ar.aclose()

    assert asyncio.run(ask()) == (("a@x.test", "b@y.test"), None, True, False)


def test_make_alias_normalises_and_drops_duplicates() -> None:
    alias = aliases.make_alias("<Sales@Example.COM>", ["Alice@example.com", "alice@EXAMPLE.com", "b@x.test"])
    assert alias == Alias("sales@example.com", ("alice@example.com", "b@x.test"))
    assert aliases.make_alias("@Example.ORG", ["c@example.org"]).address == "@example.org"
    with pytest.raises(InputError, match="not a domain for a catch-all: '@'"):
        aliases.normalize_alias_address("@")
    with pytest.raises(InputError, match=r"alias sales@example\.com has no target"):
        aliases.make_alias("sales@example.com", [])


VIRTUAL = """\
# aliases of example.com, exported from the main MTA
example.com            anything
sales@example.com      alice@example.com, bob@example.com
info@example.com       sales@example.com
	boss@elsewhere.test,
   Alice@Example.com
  # an indented comment is still a comment
@example.org           carol@example.org
list@example.com   a@x.test b@x.test,c@x.test , a@x.test
"""


def _write(tmp_path: Path, text: str, name: str = "virtual") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _stored(r: redis.Redis, settings: Settings) -> dict[str, tuple[str, ...]]:
    store = _aliases(r, settings)
    found = {}
    for address in store.addresses():
        alias = store.get(address)
        assert alias is not None
        found[address] = alias.targets
    return found


def test_parser_comments_continuations_catch_all_duplicates(tmp_path: Path) -> None:
    parsed = virtualfile.parse_file(_write(tmp_path, VIRTUAL))
    assert parsed.invalid == []
    assert {a: (line, alias.targets) for a, (line, alias) in parsed.aliases.items()} == {
        "sales@example.com": (3, ("alice@example.com", "bob@example.com")),
        # continued over two lines; the target repeated in another case counted once
        "info@example.com": (4, ("sales@example.com", "boss@elsewhere.test", "alice@example.com")),
        "@example.org": (8, ("carol@example.org",)),
        "list@example.com": (9, ("a@x.test", "b@x.test", "c@x.test")),
    }


def test_parser_reports_each_bad_line_by_number(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(
        b"  orphan@example.com  a@example.com\n"         # 1: continuation with nothing before
        b"sales@example.com  a@example.com\n"            # 2
        b"root  admin@example.com\n"                     # 3: bare user
        b"nobody@example.com\n"                          # 4: no target
        b"ops@example.com  root\n"                       # 5: target without domain
        b"dom@example.com  @example.net\n"               # 6: domain rewrite
        b"note@example.com  a@example.com # old\n"       # 7: # mid-line
        b"sales@EXAMPLE.com  b@example.com\n"            # 8: duplicate of line 2
        b"bin@example.com  \xff@example.com\n"           # 9: not UTF-8
        b"bad@@example.com  a@example.com\n"             # 10: not an address
        b"good@example.com  a@example.com\n")            # 11
    parsed = virtualfile.parse_file(path)
    assert [(i.line, i.reason) for i in parsed.invalid] == [
        (1, "a continuation line (starting with a blank) with no line before it to continue"),
        (3, "'root' has no @domain: write user@domain, or @domain for a catch-all "
            "(Postfix matches a bare user only in $myorigin's domains)"),
        (4, "alias nobody@example.com has no target"),
        (5, "target 'root' has no @domain; give the full address"),
        (6, "target '@example.net' rewrites a whole domain; give full addresses as targets"),
        (7, "target '#' is not an address (a comment must be on a line of its own)"),
        (8, "duplicate alias sales@example.com (first on line 2)"),
        (9, "not UTF-8 text"),
        (10, "not an email address: 'bad@@example.com'"),
    ]
    assert sorted(parsed.aliases) == ["good@example.com", "sales@example.com"]


def test_import_counts_and_reruns(r: redis.Redis, settings: Settings, tmp_path: Path, mailboxes: list[str],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    add_mailbox(r, settings, "dave@example.org")  # a catch-all's target must be no catch-all of itself
    path = _write(tmp_path, VIRTUAL)
    argv = ["provision", str(path), "--format", "virtual", "--redis-url", str(settings.redis_url)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"provisioned from {path}" in out and "│     4 │       0 │         0 │       0 │" in out
    assert _stored(r, settings)["info@example.com"] == ("sales@example.com", "boss@elsewhere.test",
                                                        "alice@example.com")
    path.write_text(VIRTUAL.replace("carol@example.org", "dave@example.org"))
    assert main(argv[:2] + argv[4:]) == 0  # no --format: a virtual file is recognised
    assert "│     0 │       1 │         3 │       0 │" in capsys.readouterr().out
    assert _stored(r, settings)["@example.org"] == ("dave@example.org",)
    assert Directory(r, ensure_buckets(r, settings.directory_buckets)).count() == 4  # no mailbox made


def _import(r: redis.Redis, settings: Settings, path: Path, strict: bool = False) -> virtualfile.Report:
    store = _aliases(r, settings)
    return virtualfile.import_file(store, Directory(r, store.buckets), path, strict)


def test_loops_refused_with_line_numbers_and_not_stored(r: redis.Redis, settings: Settings,
                                                        tmp_path: Path) -> None:
    path = _write(tmp_path, "a@example.com  b@example.com\n"
                            "b@example.com  c@example.com, outside@remote.test\n"
                            "c@example.com  a@example.com\n"
                            "feeds@example.com  b@example.com\n"
                            "self@example.com  self@example.com, keep@remote.test\n"
                            "ok@example.com  outside@remote.test\n"
                            "alice@example.com  ok@example.com, alice@example.com\n"
                            "m1@example.com  m2@example.com\n"
                            "m2@example.com  m1@example.com, outside@remote.test\n"
                            "half@example.com  other@example.com\n"
                            "other@example.com  half@example.com\n")
    for mailbox in ("alice@example.com", "m1@example.com", "m2@example.com", "half@example.com"):
        add_mailbox(r, settings, mailbox)
    report = _import(r, settings, path)
    loop = ("a@example.com (line 1) -> b@example.com (line 2) -> c@example.com (line 3) -> a@example.com")
    assert [(i.line, i.reason) for i in report.invalid] == [
        (1, f"alias loop: {loop}"),
        (2, "alias loop: b@example.com (line 2) -> c@example.com (line 3) -> a@example.com (line 1) "
            "-> b@example.com"),
        (3, "alias loop: c@example.com (line 3) -> a@example.com (line 1) -> b@example.com (line 2) "
            "-> c@example.com"),
        (4, f"alias feeds@example.com leads into the alias loop {loop}"),
        # other@ is no mailbox: mail to it would come back to it through half@ (451 at run time).
        (10, "alias loop: half@example.com (line 10) -> other@example.com (line 11) -> half@example.com"),
        (11, "alias loop: other@example.com (line 11) -> half@example.com (line 10) -> other@example.com"),
    ]
    # An alias naming itself stops there (Postfix), and so does a cycle of mailboxes: no loops.
    assert _stored(r, settings) == {"self@example.com": ("self@example.com", "keep@remote.test"),
                                    "ok@example.com": ("outside@remote.test",),
                                    "alice@example.com": ("ok@example.com", "alice@example.com"),
                                    "m1@example.com": ("m2@example.com",),
                                    "m2@example.com": ("m1@example.com", "outside@remote.test")}
    assert report.added == 5


def test_loop_through_stored_aliases_but_not_catch_alls(r: redis.Redis, settings: Settings,
                                                       tmp_path: Path) -> None:
    store = _aliases(r, settings)
    store.put(Alias("team@example.com", ("lead@example.com",)))
    add_mailbox(r, settings, "real@example.net")
    path = _write(tmp_path, "lead@example.com  team@example.com\n"
                            "@example.net  postmaster@example.net\n"
                            "ok@example.com  real@example.net\n")
    report = _import(r, settings, path)
    assert [(i.line, i.reason) for i in report.invalid] == [
        (1, "alias loop: lead@example.com (line 1) -> team@example.com (stored) -> lead@example.com"),
    ]
    # Mail a catch-all would take again is forwarded to the main system at run time: no loop.
    assert _stored(r, settings) == {"team@example.com": ("lead@example.com",),
                                    "@example.net": ("postmaster@example.net",),
                                    "ok@example.com": ("real@example.net",)}


def _chain_file(tmp_path: Path, length: int) -> Path:
    lines = [f"a{n}@example.com  a{n + 1}@example.com\n" for n in range(length - 1)]
    return _write(tmp_path, "".join(lines) + f"a{length - 1}@example.com  end@remote.test\n")


def test_chain_at_the_depth_limit_loads(r: redis.Redis, settings: Settings, tmp_path: Path) -> None:
    report = _import(r, settings, _chain_file(tmp_path, virtualfile.MAX_DEPTH))
    assert report.invalid == [] and report.added == virtualfile.MAX_DEPTH


def test_chain_past_the_depth_limit_is_refused(r: redis.Redis, settings: Settings, tmp_path: Path) -> None:
    report = _import(r, settings, _chain_file(tmp_path, virtualfile.MAX_DEPTH + 1))
    chain = " -> ".join(f"a{n}@example.com" for n in range(9))
    assert [(i.line, i.reason) for i in report.invalid] == [
        (1, f"alias chain deeper than 8 aliases: {chain}")]
    # The other eight are each within the limit from where they start.
    assert sorted(_stored(r, settings)) == [f"a{n}@example.com" for n in range(1, 9)]


def test_strict_loads_nothing(r: redis.Redis, settings: Settings, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "good@example.com  a@remote.test\nloop@example.com  loop2@example.com\n"
                            "loop2@example.com  loop@example.com\n")
    argv = ["provision", str(path), "--format", "virtual", "--redis-url", str(settings.redis_url)]
    assert main([*argv, "--strict"]) == 1
    captured = capsys.readouterr()
    assert "nothing was loaded (--strict)" in captured.err
    assert (f"{path}:2: alias loop: loop@example.com (line 2) -> loop2@example.com (line 3) "
            "-> loop@example.com") in captured.out
    assert _stored(r, settings) == {}
    assert main(argv) == 1
    assert "2 invalid line(s); the other aliases were loaded" in capsys.readouterr().err
    assert _stored(r, settings) == {"good@example.com": ("a@remote.test",)}


def _cli(settings: Settings, *argv: str) -> int:
    return main([*argv, "--redis-url", str(settings.redis_url)])


def test_alias_add_show_remove(r: redis.Redis, settings: Settings, mailboxes: list[str],
                               capsys: pytest.CaptureFixture[str]) -> None:
    add_mailbox(r, settings, "x@example.net")
    assert _cli(settings, "alias", "add", "Team@Example.com", "alice@example.com", "carol@example.org",
                "--actor", "ops") == 0
    assert capsys.readouterr().out == "added team@example.com -> alice@example.com, carol@example.org\n"
    assert _cli(settings, "alias", "add", "@example.net", "bob@example.com") == 0
    capsys.readouterr()
    assert _cli(settings, "alias", "add", "sales@example.com", "team@example.com", "boss@remote.test",
                "who@example.net", "x@example.net") == 0
    capsys.readouterr()
    assert _cli(settings, "alias", "show", "sales@example.com") == 0
    assert capsys.readouterr().out == (
        "alias:      sales@example.com\n"
        "origin:     alias add\n"
        "  team@example.com: alias\n"
        "  boss@remote.test: outside: forwarded to the main system\n"
        "  who@example.net: catch-all @example.net\n"
        "  x@example.net: mailbox here (mailstore default)\n")
    assert _cli(settings, "alias", "add", "alice@example.com", "alice@example.com", "bob@example.com") == 0
    assert capsys.readouterr().out == (
        "added alice@example.com -> alice@example.com, bob@example.com\n"
        "note: alice@example.com is also a mailbox here; the alias wins, as in Postfix: the mailbox "
        "keeps a copy (the alias names it) and the other targets get theirs\n")
    assert _cli(settings, "alias", "show", "alice@example.com") == 0
    assert capsys.readouterr().out == ("alias:      alice@example.com\n"
                                       "origin:     alias add\n"
                                       "note:       also a mailbox here; the alias wins: the mailbox "
                                       "keeps a copy (the alias names it) and the other targets get "
                                       "theirs\n"
                                       "  alice@example.com: itself: mailbox here (mailstore default)\n"
                                       "  bob@example.com: mailbox here (mailstore default)\n")
    assert _cli(settings, "alias", "add", "bob@example.com", "carol@example.org") == 0
    assert capsys.readouterr().out == (
        "added bob@example.com -> carol@example.org\n"
        "note: bob@example.com is also a mailbox here; the alias wins, as in Postfix: its mail goes "
        "to the targets, not to the mailbox (add the address itself to keep a copy)\n")
    assert _cli(settings, "alias", "show", "alice@example.com") == 0
    assert capsys.readouterr().out.endswith(
        "  bob@example.com: alias (also a mailbox here: the alias wins)\n")
    assert _cli(settings, "alias", "remove", "TEAM@example.com", "--actor", "ops") == 0
    assert capsys.readouterr().out == "removed alias team@example.com\n"
    entries = [(e.action, e.actor, e.args, e.outcome) for e in audit.recent(r, 10)]
    assert entries[0] == ("alias remove", "ops", {"address": "team@example.com"}, "ok: removed")
    added = {"address": "team@example.com", "targets": ["alice@example.com", "carol@example.org"]}
    assert ("alias add", "ops", added, "ok: added") in entries


@pytest.mark.parametrize(("argv", "error"), [
    (["alias", "add", "not-an-address", "a@example.com"],
     "fallback alias: not an email address: 'not-an-address'\n"),
    (["alias", "add", "a@example.com", "root"], "fallback alias: not an email address: 'root'\n"),
    (["alias", "add", "a@example.com", "@example.net"],
     "fallback alias: target '@example.net' rewrites a whole domain; give full addresses as targets\n"),
    (["alias", "add", "b@example.com", "a@example.com"],
     "fallback alias: alias loop: b@example.com (new) -> a@example.com (stored) -> b@example.com\n"),
    (["alias", "remove", "nobody@example.com"], "fallback alias: nobody@example.com is not an alias\n"),
    (["alias", "show", "@example.com"], "fallback alias: @example.com is not an alias\n"),
    (["alias", "show", "@"], "fallback alias: not a domain for a catch-all: '@'\n"),
])
def test_alias_errors_are_one_line_and_change_nothing(r: redis.Redis, settings: Settings, argv: list[str],
                                                      error: str, capsys: pytest.CaptureFixture[str]) -> None:
    _aliases(r, settings).put(Alias("a@example.com", ("b@example.com",)))
    before = len(audit.recent(r, 100))
    assert _cli(settings, *argv) == 1
    captured = capsys.readouterr()
    assert captured.err == error and captured.out == ""
    assert _stored(r, settings) == {"a@example.com": ("b@example.com",)}
    assert len(audit.recent(r, 100)) == before


def test_ten_thousand_aliases_are_lean(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    # Bucket density as for a large directory (a million mailboxes over 65,536 buckets: ~15 each).
    buckets = ensure_buckets(r, 1024)
    store = Aliases(r, buckets)
    before = int(r.info("memory")["used_memory"])
    n = 10_000
    assert store.put_many(Alias(f"alias{i}@example.com", (f"user{i}@example.com",)) for i in range(n)) == n
    per_entry = (int(r.info("memory")["used_memory"]) - before) / n
    print(f"{per_entry:.0f} bytes per alias (alias{{i}}@example.com -> user{{i}}@example.com)")
    assert store.count() == n
    assert per_entry < 120
    assert r.object("encoding", keys.alias_bucket("alias1@example.com", buckets)) == b"listpack"


def test_aliases_on_a_redis_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = RedisClusterServers(tmp_path / "cluster").start()
    try:
        settings = load_settings({"redis_url": cluster.url, "data_dir": str(tmp_path / "data")}, env={})
        path = _write(tmp_path, "".join(f"a{i}@example.com  u{i}@example.com, x@remote.test\n"
                                        for i in range(200)) + "@example.org  a1@example.com\n")
        assert main(["provision", str(path), "--redis-url", cluster.url]) == 0
        assert "│   201 │       0 │         0 │       0 │" in capsys.readouterr().out
        r = sync_client(cluster.url)
        try:
            store = Aliases(r, ensure_buckets(r, settings.directory_buckets))
            assert store.count() == 201 and len(set(store.addresses())) == 201
            assert aliases.lookup(r, store.buckets, "a7@example.com") == ("u7@example.com", "x@remote.test")
            assert _cli(settings, "alias", "remove", "a7@example.com") == 0
            assert store.get("a7@example.com") is None and store.count() == 200
        finally:
            r.close()
    finally:
        cluster.stop()



def test_alias_with_outside_and_healthy_targets_reaches_smtp_sink(
        r: redis.Redis, settings: Settings, receiver_factory: Any) -> None:
    """alias -> a failed-over mailbox (a copy here), a healthy one and an outside address (each
    forwarded under its own address by the real forward worker), byte for byte."""
    from tests.test_forward import ForwarderThread, forwarded, in_mailbox, queue_is_empty, send
    local, healthy, outside = "alice@example.com", "bob@example.com", "partner@remote.test"
    add_mailbox(r, settings, local, mailstore="store1")
    add_mailbox(r, settings, healthy, mailstore="store2")
    _aliases(r, settings).put(Alias("team@example.com", (local, healthy, outside)))
    failover.start(r, ["store1"])
    body = b"Subject: to the team\r\n\r\n\xc3\xa9t\xc3\xa9\r\n.leading dot\r\n"
    msg_id = send(receiver_factory().port, ["team@example.com"], body)
    assert in_mailbox(r, local, msg_id) is not None
    raws = {rcpt: forwarded(r, rcpt, msg_id)["raw"] for rcpt in (healthy, outside)}
    assert all(raws.values()) and not forwarded(r, "team@example.com", msg_id)
    # The main MTA and the user still see which address the message was sent to.
    assert all(b"for <team@example.com>" in raw for raw in raws.values()), raws
    sink = SmtpSink(None).start()
    worker = ForwarderThread(replace(settings, forward_to=f"smtp://127.0.0.1:{sink.port}",
                                     forward_timeout=10.0)).start()
    try:
        wait_for(lambda: len(sink.messages()) == 2, what="both forwards at the sink")
        wait_for(lambda: queue_is_empty(r), what="the forward queue to drain")
        got = {tuple(rcpts): payload for rcpts, payload in map(sink_payload, sink.messages())}
    finally:
        worker.stop()
        sink.cleanup()
    assert got == {(rcpt,): raw.replace(b"\r\n", b"\n") for rcpt, raw in raws.items()}
    assert all(b"\xc3\xa9t\xc3\xa9\n.leading dot\n" in payload for payload in got.values())


def test_alias_add_takes_an_address_over_as_manual(r: redis.Redis, settings: Settings,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    store = _aliases(r, settings)
    store.put(Alias("sales@example.com", ("alice@example.com",), aliases.LDAP))
    assert _cli(settings, "alias", "add", "sales@example.com", "alice@example.com") == 0
    # Same targets, new origin: no sync of LDAP or of a virtual file removes it any more.
    assert capsys.readouterr().out == "updated sales@example.com -> alice@example.com\n"
    assert store.get("sales@example.com") == Alias("sales@example.com", ("alice@example.com",),
                                                   aliases.MANUAL)
