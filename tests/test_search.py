"""The search index (fallback/mailbox/search.py): complete over 100,000 messages, per folder as the
webmail shows them, kept through moves, drafts saved again, delete, expunge and purge."""

from __future__ import annotations

import pytest

from fallback import keys
from fallback.ids import new_id
from fallback.mailbox import drafts, expunge, purge, search, store
from fallback.mailbox import fields as F
from tests.webutil import log_in_as, put_message, simple

ALICE = "alice@example.com"


# Writes message records directly in the record format, many per call: a 100,000-message
# mailbox in a few seconds.  ARGV: address-prefix, folder key, folder name, then (id, ts, i) triples.
_FILL_LUA = """
for k = 4, #ARGV, 3 do
  local id, ts, i = ARGV[k], ARGV[k + 1], tonumber(ARGV[k + 2])
  redis.call('HSET', ARGV[1] .. id, 'ts', ts, 'size', '100', 'kind', 'received',
             'from', 'Sender ' .. (i % 97) .. ' <s' .. (i % 97) .. '@remote' .. (i % 13) .. '.test>',
             'to', 'alice@example.com', 'subject', 'Report ' .. i, 'attach', '0', 'folder', ARGV[3],
             'flags', '')
  redis.call('ZADD', ARGV[2], ts, id)
end
"""


def bulk_records(r, address: str, n: int, folder: str = F.INBOX, first_ms: int = 1_700_000_000_000,
                 batch: int = 2000) -> list[tuple[str, str, str]]:
    """n message records, (id, sender, subject) oldest first; sender and subject as _FILL_LUA
    writes them, so a test can scan them in Python for what a search must find."""
    made = []
    for pos in range(0, n, batch):
        args: list = [keys.message(address, ""), keys.folder(address, folder), folder]
        for i in range(pos, min(pos + batch, n)):
            ts = first_ms + i * 10
            msg_id = new_id(ts)
            args += [msg_id, ts, i]
            made.append((msg_id, f"Sender {i % 97} <s{i % 97}@remote{i % 13}.test>", f"Report {i}"))
        r.eval(_FILL_LUA, 0, *args)
    return made


@pytest.mark.slow
def test_search_is_complete_over_100000_messages(r) -> None:
    made = bulk_records(r, ALICE, 100_000)
    # Far past the newest 20,000 (which is all the old scan looked at).
    target = made[1234][0]
    r.hset(keys.message(ALICE, target), F.FROM, "Needle Person <needle@odd.test>")
    r.hset(keys.message(ALICE, target), F.SUBJECT, "Straße closed")
    total, _, ids = search.search(r, ALICE, F.INBOX, "needle person", 0, 50)
    assert (total, ids) == (1, [target])
    assert search.search(r, ALICE, F.INBOX, "STRASSE", 0, 50) == (1, False, [target])  # case-folded: ß is ss
    # A query with many matches: the count, and the page newest first, as a scan would give them.
    expected = [i for i, sender, subject in reversed(made)
                if "report 4242" in (sender + "\n" + subject).casefold()]
    total, _, ids = search.search(r, ALICE, F.INBOX, "Report 4242", 0, 5)
    assert total == len(expected) == 11 and ids == expected[:5]  # 4242 and 42420 to 42429
    assert search.search(r, ALICE, F.INBOX, "Report 4242", 10, 5) == (11, False, expected[10:15])
    # Every message matches: the count is the folder's, the page its newest.
    everything = [i for i, _, subject in reversed(made) if i != target]
    assert search.search(r, ALICE, F.INBOX, "report", 0, 50) == (search.COUNT_LIMIT, True, everything[:50])
    # A page far down counts that far: the oldest page, and the exact count.
    assert search.search(r, ALICE, F.INBOX, "report", 99_950, 50) == (99_999, False, everything[99_950:])
    meta = r.hgetall(search.meta_key(ALICE))
    assert int(meta[b"live"]) == 100_000 and int(meta[b"buckets"]) > 100  # packed, not one huge string


def test_web_search_reaches_past_the_newest_20000(client, r) -> None:
    made = bulk_records(r, ALICE, 25_000)
    log_in_as(client, ALICE)
    old = made[10][0]
    r.hset(keys.message(ALICE, old), F.SUBJECT, "The oldest minutes")
    page = client.get("/?q=oldest+minutes").text
    assert old in page and "1 message" in page


def test_search_per_folder_and_through_moves(r) -> None:
    a = put_message(r, ALICE, simple("budget plan", sender="Finance <fin@corp.test>"))
    b = put_message(r, ALICE, simple("budget lunch", sender="Pat <pat@remote.test>"))
    s = put_message(r, ALICE, simple("budget reply", sender=ALICE), folder=F.SENT, kind="sent")
    assert search.search(r, ALICE, F.INBOX, "budget", 0, 50) == (2, False, [b, a])
    assert search.search(r, ALICE, F.SENT, "budget", 0, 50) == (1, False, [s])
    store.move(r, ALICE, a, F.TRASH)  # no index write: the folder decides
    assert search.search(r, ALICE, F.INBOX, "budget", 0, 50) == (1, False, [b])
    assert search.search(r, ALICE, F.TRASH, "budget", 0, 50) == (1, False, [a])
    store.move(r, ALICE, a, F.INBOX)
    assert search.search(r, ALICE, F.INBOX, "budget", 0, 50) == (2, False, [b, a])
    # Arrived after the index was built: found by the next search.
    c = put_message(r, ALICE, simple("budget final"))
    assert search.search(r, ALICE, F.INBOX, "budget", 0, 50) == (3, False, [c, b, a])


def test_a_query_never_matches_ids_or_spans_fields(r) -> None:
    a = put_message(r, ALICE, simple("alpha", sender="Ann <ann@remote.test>"))
    assert search.search(r, ALICE, F.INBOX, a[:12], 0, 50) == (0, False, [])        # the id is not searched
    assert search.search(r, ALICE, F.INBOX, "remote.test> alpha", 0, 50) == (0, False, [])  # across fields
    assert search.search(r, ALICE, F.INBOX, "test>\nalpha", 0, 50) == (0, False, [])
    assert search.search(r, ALICE, F.INBOX, "  ", 0, 50) == (0, False, [])
    assert search.search(r, ALICE, F.INBOX, "ANN@REMOTE", 0, 50) == (1, False, [a])


def test_a_draft_saved_again_is_found_by_its_new_subject_only(r) -> None:
    draft_id = new_id()
    drafts.save(r, ALICE, "default", draft_id, simple("first words"), {})
    assert search.search(r, ALICE, F.DRAFTS, "first words", 0, 50) == (1, False, [draft_id])
    drafts.save(r, ALICE, "default", draft_id, simple("second thoughts"), {})
    assert search.search(r, ALICE, F.DRAFTS, "first words", 0, 50) == (0, False, [])
    assert search.search(r, ALICE, F.DRAFTS, "second thoughts", 0, 50) == (1, False, [draft_id])


def test_expunge_and_purge_drop_entries_and_compact(r) -> None:
    ids = [put_message(r, ALICE, simple(f"notice {n}")) for n in range(8)]
    assert search.search(r, ALICE, F.INBOX, "notice", 0, 50)[0] == 8
    for msg_id in ids[:2]:
        store.move(r, ALICE, msg_id, F.TRASH)
    assert expunge.expunge(r, ALICE, ids[:2]).deleted == 2
    assert search.search(r, ALICE, F.TRASH, "notice", 0, 50) == (0, False, [])
    assert search.search(r, ALICE, F.INBOX, "notice", 0, 50) == (6, False, list(reversed(ids[2:])))
    # 2 dead of 8: not yet a quarter past, so nothing rewritten yet.
    assert int(r.hget(search.meta_key(ALICE), "dead")) == 2
    r.hset(keys.message(ALICE, ids[2]), F.RSTATE, F.DONE)
    r.srem(keys.pending(ALICE), ids[2])
    assert purge.delete_reconciled(r, ALICE, [ids[2]], cutoff_ms=2**62)[0] == 1
    # 3 dead of 8 is past a quarter: the next search rewrites the haystacks without them.
    assert search.search(r, ALICE, F.INBOX, "notice", 0, 50) == (5, False, list(reversed(ids[3:])))
    meta = r.hgetall(search.meta_key(ALICE))
    assert (int(meta[b"live"]), int(meta[b"dead"])) == (5, 0)
    haystack = r.get(search.bucket_key(ALICE, 0))
    assert haystack.count(b"\n") == 5 and all(i.encode() not in haystack for i in ids[:3])


def test_the_batch_limit_of_one_catch_up(r, monkeypatch) -> None:
    made = bulk_records(r, ALICE, 7)
    monkeypatch.setattr(search, "MAX_PER_CALL", 6)
    assert search.catch_up(r, ALICE) == 6      # at the limit: one call indexes 6
    assert search.catch_up(r, ALICE) == 1      # past it: the 7th waits for the next call
    assert search.catch_up(r, ALICE) == 0
    assert search.search(r, ALICE, F.INBOX, "report", 0, 50) == (7, False, [i for i, _, _ in reversed(made)])


def test_a_folder_cut_at_the_batch_limit_holds_the_mark_back(r, monkeypatch) -> None:
    inbox = bulk_records(r, ALICE, 8)                                    # 8 in INBOX, older
    sent = bulk_records(r, ALICE, 2, folder=F.SENT, first_ms=1_800_000_000_000)  # 2 in Sent, newer
    monkeypatch.setattr(search, "MAX_PER_CALL", 5)
    calls = [search.catch_up(r, ALICE) for _ in range(4)]
    assert calls == [5, 5, 0, 0]
    assert search.search(r, ALICE, F.INBOX, "report", 0, 50)[:2] == (8, False)
    assert search.search(r, ALICE, F.SENT, "report", 0, 50) == (2, False, [i for i, _, _ in reversed(sent)])
    assert len(inbox) == 8


def test_the_haystack_size_limit(r, monkeypatch) -> None:
    made = bulk_records(r, ALICE, 6)
    line = len(search.entry(made[0][0], 1_700_000_000_000, made[0][1], made[0][2]))
    monkeypatch.setattr(search, "BUCKET_BYTES", 2 * line)  # exactly two entries fit
    search.catch_up(r, ALICE)
    sizes = [len(r.get(search.bucket_key(ALICE, n))) for n in range(3)]
    assert sizes == [2 * line] * 3 and r.get(search.bucket_key(ALICE, 3)) is None
    monkeypatch.setattr(search, "BUCKET_BYTES", 2 * line - 1)  # one byte less: one entry each
    more = bulk_records(r, ALICE, 2, first_ms=1_800_000_000_000)
    search.catch_up(r, ALICE)
    assert [len(r.get(search.bucket_key(ALICE, n))) for n in (3, 4)] == [line, line]
    everything = [i for i, _, _ in reversed(made + more)]
    assert search.search(r, ALICE, F.INBOX, "report", 0, 50) == (8, False, everything)


def test_the_count_limit(r, monkeypatch) -> None:
    made = bulk_records(r, ALICE, 6)
    newest = [i for i, _, _ in reversed(made)]
    monkeypatch.setattr(search, "SLACK", 0)
    monkeypatch.setattr(search, "COUNT_LIMIT", 6)   # at the limit: counted exactly
    assert search.search(r, ALICE, F.INBOX, "report", 0, 2) == (6, False, newest[:2])
    monkeypatch.setattr(search, "COUNT_LIMIT", 5)   # one past it: "more than 5"
    assert search.search(r, ALICE, F.INBOX, "report", 0, 2) == (5, True, newest[:2])


def test_web_says_more_than_the_count_limit(client, r, monkeypatch) -> None:
    bulk_records(r, ALICE, 300)
    monkeypatch.setattr(search, "COUNT_LIMIT", 100)
    monkeypatch.setattr(search, "SLACK", 0)
    log_in_as(client, ALICE)
    page = client.get("/?q=report").text
    assert "more than 100 messages" in page and "Page 1 of 3" in page and "Older" in page


@pytest.mark.parametrize("query", ["report 3", "s3@remote3"])
def test_matches_equal_a_plain_scan(r, query: str) -> None:
    made = bulk_records(r, ALICE, 3000)
    expected = [i for i, sender, subject in reversed(made) if query in (sender + "\n" + subject).casefold()]
    total, _, ids = search.search(r, ALICE, F.INBOX, query, 0, len(made))
    assert total == len(expected) and ids == expected
