"""The mailbox's change token (fallback/mailbox/changes.py): every writer sets a new one in the
same atomic step as its change to what a folder page shows, and the webmail serves a list page
again from the token alone, never a stale one.

Each writer runs against the real redis-server while Redis's own MONITOR watches: the commands
are grouped into the atomic steps Redis ran (a MULTI/EXEC, a script) and each step that writes
a page's key (a shown field of a message record, a folder index, the unseen set, the list
choice) must set the token to a value never seen before.  The first test shows that the check
fails for a write that does not.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from fallback import keys
from fallback.ids import new_id
from fallback.mailbox import bulk, changes, delivery, drafts, expunge, fields, purge, store
from tests.conftest import add_mailbox
from tests.test_undo_send import UNDO, form_of, send
from tests.webutil import log_in_as, make_app, put_message, simple
from web.sessions import COOKIE

ALICE = "alice@example.com"
SENTINEL = "changes-test-end-of-watch"
_ARG = re.compile(rb'"((?:\\.|[^"\\])*)"')
_WRITES = {"HSET", "HMSET", "HSETNX", "HDEL", "HINCRBY", "DEL", "UNLINK", "ZADD", "ZREM", "ZINCRBY",
           "ZREMRANGEBYSCORE", "ZREMRANGEBYRANK", "SADD", "SREM", "SMOVE", "RENAME", "EXPIRE",
           "PEXPIRE", "SET", "RESTORE"}


def _argv(line: bytes) -> tuple[str, list[str]]:
    """(who ran it: 'lua' or the client's address, its words) of one MONITOR line."""
    who = line[line.index(b"[") + 1 : line.index(b"]")].split(b" ", 1)[1].decode()
    words = [m.group(1).decode("utf-8", "replace") for m in _ARG.finditer(line[line.index(b"]") :])]
    return who, words


class Watch:
    """Redis's MONITOR while a block runs, as the atomic steps Redis ran: a MULTI/EXEC of one
    client, a script with the commands it called, or one command on its own."""

    def __init__(self, r: redis.Redis) -> None:
        if isinstance(r, redis.RedisCluster):
            pytest.skip("MONITOR watches one server; the writers' steps are the same on a cluster")
        self.r = r
        self.lines: list[bytes] = []
        self._ready = threading.Event()

    def _read(self) -> None:
        with self.r.monitor() as m:
            self._ready.set()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # bounded: the sentinel ends it
                line = m.connection.read_response()
                self.lines.append(line)
                if SENTINEL.encode() in line:
                    return

    @contextmanager
    def running(self) -> Iterator[Watch]:
        thread = threading.Thread(target=self._read, daemon=True)
        thread.start()
        assert self._ready.wait(10)
        time.sleep(0.05)  # MONITOR's OK comes before the server feeds it: let it settle
        try:
            yield self
        finally:
            self.r.echo(SENTINEL)
            thread.join(30)

    def steps(self) -> list[list[list[str]]]:
        steps: list[list[list[str]]] = []
        open_multi: dict[str, list[list[str]]] = {}
        script_of = ""
        for line in self.lines:
            who, words = _argv(line)
            if not words:
                continue
            name = words[0].upper()
            if who == "lua":
                (open_multi.get(script_of) or steps[-1]).append(words)
                continue
            if name == "MULTI":
                open_multi[who] = []
                continue
            if name in ("EXEC", "DISCARD"):
                steps.append(open_multi.pop(who, []))
                continue
            if name in ("EVAL", "EVALSHA", "FCALL"):
                script_of = who
            if who in open_multi:
                open_multi[who].append(words)
            else:
                steps.append([words])
        return steps


def _page_writes(step: list[list[str]], address: str) -> list[list[str]]:
    """The commands of a step that change what a folder page of `address` shows."""
    prefix = keys.mbx(address)
    shown = set(store.PAGE_ALL_FIELDS)
    out = []
    for words in step:
        name = words[0].upper()
        if name not in _WRITES or len(words) < 2:
            continue
        named = words[1:] if name in ("DEL", "UNLINK") else [words[1]]
        for key in named:
            if key.startswith(prefix + ":m:"):
                if name in ("HSET", "HMSET", "HSETNX"):
                    hit = bool(set(words[2::2]) & shown)
                elif name == "HDEL":
                    hit = bool(set(words[2:]) & shown)
                else:
                    hit = name in ("DEL", "UNLINK", "RENAME", "EXPIRE", "PEXPIRE", "RESTORE")
            else:
                hit = (key.startswith(prefix + ":f:") or key in (keys.unseen(address),
                                                                 keys.list_prefs(address)))
            if hit:
                out.append(words)
    return out


def unmarked(watch: Watch, address: str, seen: set[str]) -> tuple[int, list[list[list[str]]]]:
    """(steps that changed a page of `address`, those of them without a new token)."""
    changed, bad = 0, []
    for step in watch.steps():
        if not _page_writes(step, address):
            continue
        changed += 1
        tokens = [w[2] for w in step if w[0].upper() == "SET" and w[1] == keys.changes(address)]
        if len(tokens) != 1 or tokens[0] in seen:
            bad.append(step)
        seen.update(tokens)
    return changed, bad


@pytest.fixture
def watch(r: redis.Redis) -> Iterator[Any]:
    """watch(fn, address): run fn under MONITOR; assert it changed a page and marked each step."""
    seen: set[str] = set()

    def run(fn: Any, address: str = ALICE, expect: int = 1) -> Any:
        w = Watch(r)
        with w.running():
            result = fn()
        changed, bad = unmarked(w, address, seen)
        assert changed >= expect, f"nothing changed a page of {address}"
        assert not bad, f"changed without a new change token: {bad}"
        return result

    yield run


def test_a_write_without_a_new_token_is_caught(r, mailboxes) -> None:
    msg_id = put_message(r, ALICE, simple("one"))
    seen: set[str] = set()
    w = Watch(r)
    with w.running():
        r.hset(keys.message(ALICE, msg_id), fields.FLAGS, "\\Flagged")   # no token
        store.set_flags(r, ALICE, msg_id, add=(fields.SEEN,))            # a new one
        r.srem(keys.unseen(ALICE), msg_id)
    changed, bad = unmarked(w, ALICE, seen)
    assert changed == 3
    assert [s[0][:2] for s in bad] == [["HSET", keys.message(ALICE, msg_id)], ["SREM", keys.unseen(ALICE)]]
    # A token set again to a value it had before is caught too.
    old = seen.pop()
    w = Watch(r)
    with w.running(), r.pipeline(transaction=True) as pipe:
        pipe.sadd(keys.unseen(ALICE), msg_id)
        pipe.set(keys.changes(ALICE), old)
        pipe.execute()
    assert unmarked(w, ALICE, {old})[1]


def test_the_receiver_sets_a_new_token_with_each_message(r, receiver, watch) -> None:
    def two() -> None:
        with smtplib.SMTP("127.0.0.1", receiver.port, timeout=30) as s:
            s.sendmail("ann@remote.test", [ALICE, "bob@example.com"], simple("to two"))
            s.sendmail("ann@remote.test", [ALICE], simple("to one"))

    watch(two, expect=2)
    assert store.MailboxReader(r, ALICE).count(fields.INBOX) == 2


def test_the_webmails_and_the_queues_writes_set_a_new_token(r, mailboxes, watch) -> None:
    msg_id = watch(lambda: put_message(r, ALICE, simple("kept")))     # delivery.deliver

    def queued() -> None:
        with r.pipeline(transaction=True) as pipe:
            delivery.queue_delivery(pipe, delivery.Delivery(ALICE, "default", fields.SENT, (fields.SEEN,),
                                                            "sent"), new_id(), simple("sent"), {},
                                    int(time.time() * 1000))
            pipe.execute()

    watch(queued)
    watch(lambda: store.set_flags(r, ALICE, msg_id, add=(fields.SEEN,)))
    watch(lambda: store.set_flags(r, ALICE, msg_id, remove=(fields.SEEN,)))
    watch(lambda: store.move(r, ALICE, msg_id, fields.TRASH))
    watch(lambda: store.set_grouping(r, ALICE, True))
    watch(lambda: store.set_grouping(r, ALICE, False))


def test_bulk_actions_set_a_new_token_per_message(r, mailboxes, watch) -> None:
    ids = [put_message(r, ALICE, simple(f"m{i}")) for i in range(3)]
    watch(lambda: bulk.set_flags(r, ALICE, ids, add=fields.SEEN), expect=3)
    watch(lambda: bulk.set_flags(r, ALICE, ids, remove=fields.SEEN), expect=3)
    watch(lambda: bulk.to_trash(r, ALICE, ids, fields.INBOX), expect=3)
    watch(lambda: bulk.restore(r, ALICE, ids[:2]), expect=2)


def test_deleting_for_good_and_purging_set_a_new_token(r, mailboxes, watch) -> None:
    ids = [put_message(r, ALICE, simple(f"m{i}"), folder=fields.TRASH) for i in range(3)]
    watch(lambda: expunge.expunge(r, ALICE, ids[:1]))
    watch(lambda: expunge.empty_trash(r, ALICE), expect=2)
    done = put_message(r, ALICE, simple("reconciled"))
    r.hset(keys.message(ALICE, done), mapping={fields.RSTATE: "done", "rts": 1})
    r.srem(keys.pending(ALICE), done)
    assert watch(lambda: purge.delete_reconciled(r, ALICE, [done], int(time.time() * 1000)))[0] == 1


def test_drafts_set_a_new_token(r, mailboxes, watch) -> None:
    draft_id = new_id()
    watch(lambda: drafts.save(r, ALICE, "default", draft_id, simple("draft 1"), {"to": ""}))
    watch(lambda: drafts.save(r, ALICE, "default", draft_id, simple("draft 2"), {"to": ""}))
    assert watch(lambda: drafts.delete(r, ALICE, draft_id))


def test_undo_send_sets_a_new_token(r, settings) -> None:
    add_mailbox(r, settings, ALICE)
    add_mailbox(r, settings, "bob@example.com")
    client = make_app(settings, r, undo_send_seconds=UNDO).test_client()
    log_in_as(client, ALICE)
    form = form_of(client.get("/compose").text)
    assert send(client, form, "to take back").status_code == 302
    seen: set[str] = set()
    w = Watch(r)
    with w.running():
        resp = client.post(f"/sent/{form['draft']}/undo", data={"csrf_token": form["csrf_token"]})
    assert resp.status_code == 302
    changed, bad = unmarked(w, ALICE, seen)
    assert changed >= 2 and not bad   # the Sent copy taken out, the draft put back


def test_the_receivers_copies_path_sets_a_new_token(r, settings, mailboxes) -> None:
    # The mixed write (several copies in one MULTI) runs the same script per copy.
    calls, _ = delivery.copy_calls([([delivery.Delivery(ALICE, "default")], simple("copy a")),
                                    ([delivery.Delivery("bob@example.com", "default")], simple("copy b"))],
                                   new_id(), int(time.time() * 1000), False, None)

    async def write() -> None:
        client = redis.asyncio.from_url(settings.redis_url or "")
        try:
            await delivery.run_atomic(client, calls)
        finally:
            await client.aclose()

    seen: set[str] = set()
    w = Watch(r)
    with w.running():
        asyncio.run(write())
    assert unmarked(w, ALICE, seen) == (1, [])
    assert unmarked(w, "bob@example.com", seen) == (1, [])


# --- the webmail: served again from the token alone, never stale -----------------------------

def _inbox(client: Any) -> str:
    """The inbox page without its per-response nonce."""
    resp = client.get("/")
    assert resp.status_code == 200
    return re.sub(r'nonce="[^"]*"|nonce-[A-Za-z0-9_-]+', "nonce", resp.get_data(as_text=True))


def test_a_list_page_served_again_reads_only_the_token(r, settings, mailboxes) -> None:
    put_message(r, ALICE, simple("first"))
    client = make_app(settings, r).test_client()
    log_in_as(client, ALICE)
    page = _inbox(client)
    assert "first" in page
    w = Watch(r)
    with w.running():
        again = _inbox(client)
    assert again == page
    mine = [s[0][0].upper() for s in w.steps() if any(ALICE in word for word in s[0][1:2])]
    assert "GET" in mine and "EVALSHA" not in mine and "EVAL" not in mine
    # A change: a new token, the page drawn again from Redis.
    put_message(r, ALICE, simple("second"))
    assert "second" in _inbox(client)


def test_a_list_page_is_never_stale_after_any_change(r, settings, mailboxes) -> None:
    client = make_app(settings, r).test_client()
    token = log_in_as(client, ALICE)
    ids = [put_message(r, ALICE, simple(f"note {i}")) for i in range(3)]
    steps: list[tuple[str, Any]] = [
        ("delivered", lambda: put_message(r, ALICE, simple("fresh news"))),
        ("flag", lambda: store.set_flags(r, ALICE, ids[0], add=(fields.FLAGGED,))),
        ("read", lambda: client.get(f"/message/{ids[1]}")),
        ("bulk unread", lambda: client.post("/folder/inbox/bulk", data={
            "csrf_token": token, "action": "unread", "ids": [ids[1]]})),
        ("to trash", lambda: bulk.to_trash(r, ALICE, [ids[2]], fields.INBOX)),
        ("grouped", lambda: client.post("/folder/inbox/group", data={"csrf_token": token, "group": "1"})),
        ("not grouped", lambda: client.post("/folder/inbox/group", data={"csrf_token": token, "group": "0"})),
    ]
    before = _inbox(client)
    for name, change in steps:
        assert _inbox(client) == before, name      # served again: the same page
        change()
        after = _inbox(client)
        assert after != before, f"the inbox did not change after: {name}"
        drawn = make_app(settings, r).test_client()   # another worker, nothing kept
        drawn.set_cookie(COOKIE, client.get_cookie(COOKIE).value)
        assert _inbox(drawn) == after, name
        before = after


def test_a_mailbox_without_a_token_is_drawn_each_time(r, settings, mailboxes) -> None:
    put_message(r, ALICE, simple("old mail"))
    r.delete(keys.changes(ALICE))   # as a mailbox written before the token existed
    client = make_app(settings, r).test_client()
    log_in_as(client, ALICE)
    page = _inbox(client)
    assert "old mail" in page and 'class="flag"' not in page
    assert store.folder_page(r, ALICE, fields.INBOX, 0, 50).token == b""
    # Written behind the webmail's back without a token: still shown (kept under the rows).
    r.hset(keys.message(ALICE, store.MailboxReader(r, ALICE).ids(fields.INBOX)[0]),
           fields.FLAGS, "\\Flagged")
    assert 'class="flag"' in _inbox(client)
    assert r.get(keys.changes(ALICE)) is None   # the page's read wrote nothing
    store.set_flags(r, ALICE, store.MailboxReader(r, ALICE).ids(fields.INBOX)[0], add=(fields.SEEN,))
    assert len(changes.read(r, ALICE) or b"") == 16
