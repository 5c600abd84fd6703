"""The directory's name index (issue 17, session 7 layout) on a real redis-server: what it finds
equals a plain filter over the same names, its limits, its compare-and-set, the rebuild of an
older layout, `--contacts-directory false`, and the fresh import's fast path equal to the
general one (records byte-identical, index identical)."""

from __future__ import annotations

import binascii
import random
from pathlib import Path
from typing import Any

import redis

from fallback import keys
from fallback.cli import main
from fallback.mailbox import dirindex, hashcodec, provisionfile
from fallback.mailbox.directory import Directory, Mailbox, ensure_buckets
from fallback.mailbox.provision import Provisioner

_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_TO_BCRYPT = bytes.maketrans(_B64, b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


def bcrypt_like(rng: random.Random) -> str:
    """A canonical bcrypt string as bcrypt writes it (random salt and digest)."""
    raw = rng.randbytes(39)
    b2a = binascii.b2a_base64
    return "{BLF-CRYPT}$2y$10$" + (b2a(raw[:16], newline=False)[:22]
                                   + b2a(raw[16:], newline=False)[:31]).translate(_TO_BCRYPT).decode()


def reference(names: list[str], domain: str, q: str, limit: int) -> list[str]:
    """What the index answers, computed the slow way: a query shorter than PREFIX looks into
    the first SHORT_BUCKETS prefixes that start with it."""
    local = q.partition("@")[0]
    if not local:
        return []
    if len(local) >= dirindex.PREFIX:
        allowed = {local[:dirindex.PREFIX]}
    else:
        allowed = set(sorted({n[:dirindex.PREFIX] for n in names if n.startswith(local)})
                      [:dirindex.SHORT_BUCKETS])
    found = sorted(n for n in set(names) if n[:dirindex.PREFIX] in allowed and n.startswith(local))
    return [f"{n}@{domain}" for n in found[:limit]]


def index_contents(r: redis.Redis) -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    for key in r.scan_iter(match=keys.dir_name_index("*")):
        out[key.decode()] = {f.decode(): dirindex.decode(v) for f, v in r.hgetall(key).items()}
    return out


def test_lookups_equal_a_plain_filter_over_the_same_names(r) -> None:
    rng = random.Random(17)
    names = ([f"user{n:06d}" for n in rng.sample(range(1_000_000), 3000)]
             + ["jo", "joe", "josé", "j", "zoë", "ann.b", "ann-c", "anna", "x", "xy", "xyz"]
             + ["".join(rng.choice("abcdeé.-_") for _ in range(rng.randint(1, 9))) for _ in range(500)])
    dirindex.add(r, [f"{n}@big.test" for n in names])
    dirindex.add(r, [f"{n}@big.test" for n in names[:100]])  # again: nothing doubles
    queries = sorted({n[:k] for n in names for k in (1, 2, 3, 4, 7)})
    for q in [*rng.sample(queries, 150), "q", "zz", "user9999999", "ann@x", "@", "j", "jo", "jos", "x"]:
        for limit in (1, 11, 1_000_000):
            assert dirindex.lookup(r, "big.test", q, limit) == reference(names, "big.test", q, limit), q
    assert dirindex.lookup(r, "other.test", "jo", 11) == []
    # Removing some: the rest is found as before, the removed not at all.
    gone = set(rng.sample(names, 400)) | {"joe"}
    dirindex.remove(r, [f"{n}@big.test" for n in gone])
    left = [n for n in names if n not in gone]
    for q in ("u", "us", "use", "user0", "jo", "j", "an", "x"):
        assert dirindex.lookup(r, "big.test", q, 1_000_000) == reference(left, "big.test", q, 1_000_000)
    dirindex.remove(r, [f"{n}@big.test" for n in left])
    assert not r.exists(keys.dir_name_index("big.test"))  # every field gone with its last name


def test_a_field_is_text_up_to_pack_at_bytes_and_deflated_past_it(r) -> None:
    # "abc" + 63 characters + "\n" = the rest of one name, one per line: exactly PACK_AT bytes.
    at_limit = "abc" + "d" * (dirindex.PACK_AT - 1)
    dirindex.add(r, [f"{at_limit}@limit.test"])
    value = r.hget(keys.dir_name_index("limit.test"), "abc")
    assert value == b"d" * (dirindex.PACK_AT - 1) + b"\n" and len(value) == dirindex.PACK_AT
    assert r.object("encoding", keys.dir_name_index("limit.test")) == b"listpack"  # a stock server's 64
    dirindex.add(r, ["abcx@limit.test"])  # one byte more than PACK_AT in all: deflated
    value = r.hget(keys.dir_name_index("limit.test"), "abc")
    assert value[:1] == dirindex.DEFLATED and len(value) < dirindex.PACK_AT + 2
    assert dirindex.decode(value) == ["d" * (dirindex.PACK_AT - 1), "x"]
    assert dirindex.lookup(r, "limit.test", "abc", 11) == [f"{at_limit}@limit.test", "abcx@limit.test"]
    # A big field: a few bytes a name, not a field (and ~60 bytes) each.
    dirindex.add(r, [f"user{n:07d}@big.test" for n in range(0, 1_000_000, 100)])
    assert len(r.hget(keys.dir_name_index("big.test"), "use")) < 10_000 * 4


def test_the_script_writes_nothing_over_a_change_it_did_not_read(r) -> None:
    dirindex.add(r, ["ann@cas.test"])
    key = keys.dir_name_index("cas.test")
    value = r.hget(key, "ann")
    assert r.eval(dirindex._CAS, 1, key, "ann", "0" * 40, b"\nx\n") == 0  # stale: refused
    assert r.eval(dirindex._CAS, 1, key, "bob", dirindex._digest(b"x"), b"\n") == 0  # not there
    assert r.hgetall(key) == {b"ann": value}
    assert r.eval(dirindex._CAS, 1, key, "ann", dirindex._digest(value), b"\nx\n") == 1
    assert dirindex.lookup(r, "cas.test", "ann", 11) == ["ann@cas.test", "annx@cas.test"]


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("address,password,mailstore\n" + "".join(f"{row}\n" for row in rows))
    return path


def test_an_older_layout_is_rebuilt_once_and_deleted(r, redis_url, tmp_path, capsys) -> None:
    d = Directory(r, ensure_buckets(r, 64))
    old = [f"old{n}@example.com" for n in range(30)]
    d.put_many([(Mailbox(a, "store1", bcrypt_like(random.Random(n))), None) for n, a in enumerate(old)])
    # As the layout before session 7 left it: a hash per (domain, prefix), a zset, its flag.
    for key in r.scan_iter(match="dirn:*"):
        r.delete(key)
    r.hset("dirx:{example.com/old}", mapping={a.partition("@")[0]: "" for a in old})
    r.zadd("dirx:{example.com}:p", {"old": 0})
    r.set("dirx:built", "1")
    src = write_csv(tmp_path / "more.csv", ["new1@example.com,{PLAIN}pw,store1"])
    assert main(["provision", str(src), "--redis-url", redis_url]) == 0
    capsys.readouterr()
    assert list(r.scan_iter(match="dirx:*")) == []
    assert dirindex.lookup(r, "example.com", "old", 100) == sorted(old, key=lambda a: a.partition("@")[0])
    assert dirindex.lookup(r, "example.com", "ne", 100) == ["new1@example.com"]
    assert r.exists(keys.DIR_NAME_INDEX_BUILT)


def test_contacts_directory_false_skips_the_index_and_a_later_run_rebuilds_it(r, redis_url, tmp_path,
                                                                            capsys) -> None:
    rng = random.Random(5)
    first = write_csv(tmp_path / "a.csv", [f"ann{n}@example.com,{bcrypt_like(rng)},store1" for n in range(5)])
    assert main(["provision", str(first), "--redis-url", redis_url, "--contacts-directory", "false"]) == 0
    assert list(r.scan_iter(match="dirn:*")) == []  # nothing indexed, no flag
    assert Directory(r, ensure_buckets(r, 64)).count() == 5  # but every mailbox is there
    bad = ["provision", str(first), "--redis-url", redis_url, "--contacts-directory", "maybe"]
    assert main(bad) != 0
    assert capsys.readouterr().err == ("fallback provision: --contacts-directory: not a boolean: 'maybe' "
                                       "(use true or false)\n")
    assert Directory(r, ensure_buckets(r, 64)).count() == 5  # nothing lost
    second = write_csv(tmp_path / "b.csv",
                       [f"bob{n}@example.com,{bcrypt_like(rng)},store1" for n in range(3)])
    assert main(["provision", str(second), "--redis-url", redis_url]) == 0
    capsys.readouterr()
    assert dirindex.lookup(r, "example.com", "ann", 100) == [f"ann{n}@example.com" for n in range(5)]
    assert dirindex.lookup(r, "example.com", "bob", 100) == [f"bob{n}@example.com" for n in range(3)]


def mixed_rows(n: int, duplicate_at: int | None = None) -> list[str]:
    """Lines the fast path takes (canonical address, bcrypt, mailstore) and lines it leaves to the
    general path: upper case, a bcrypt with a non-canonical last character, cost 04 and "$2b$",
    another scheme, an invalid hash, an alternate-less plain row with spaces."""
    rng = random.Random(n)
    rows = [f"user{i:05d}@d{i % 7}.example.com,{bcrypt_like(rng)},store{i % 3}" for i in range(n)]
    if duplicate_at is not None:  # line 5's address again, with another hash
        rows.insert(duplicate_at, f"user00005@d5.example.com,{bcrypt_like(rng)},store1")
    noncanonical = bcrypt_like(rng)[:-1] + "b"
    rows += [f"Upper@D1.Example.com,{bcrypt_like(rng)},store1",
             f"odd@d1.example.com,{noncanonical},store1",
             f"cost@d2.example.com,{bcrypt_like(rng).replace('$2y$10$', '$2b$04$')},store2",
             "sha@d2.example.com,{SHA512-CRYPT}$6$saltsalt$" + "a" * 86 + ",store2",
             "broken@d3.example.com,{BLF-CRYPT}$2y$10$short,store1",
             f" spaced@d3.example.com ,{bcrypt_like(rng)}, store2 "]
    return rows


def directory_contents(r: redis.Redis) -> dict[bytes, Any]:
    out: dict[bytes, Any] = {k: r.hgetall(k) for k in r.scan_iter(match="dir:{*}")}
    out[b"domains"] = r.hgetall(keys.DIR_DOMAINS)
    out[b"mailstores"] = r.hgetall(keys.DIR_MAILSTORES)
    return out


def test_a_fresh_import_writes_what_the_general_path_writes(r, tmp_path) -> None:
    # 30,000 fast lines (about 3 MB: blocks of a megabyte, one FastRows each where every line is
    # common), a duplicate inside the third block, then the odd lines.
    rows = mixed_rows(30000, duplicate_at=25000)
    src = write_csv(tmp_path / "users.csv", rows)
    blocks = list(provisionfile.read_items(src, None, "default", lambda done: None, None, blocks=True))
    assert sum(len(b.addresses) for b in blocks if isinstance(b, provisionfile.FastRows)) > 9000
    expanded = [e for b in blocks for e in (b.entries() if isinstance(b, provisionfile.FastRows) else [b])]
    assert expanded == list(provisionfile.read_entries(src, None, "default"))  # line by line
    fresh = Provisioner(Directory(r, ensure_buckets(r, 64)))
    report = fresh.run(src)
    assert fresh.fresh and report.added == 30005
    dup = "duplicate address user00005@d5.example.com (first on line 7)"
    assert [(i.line, i.reason) for i in report.invalid] == [(25002, dup),
                                                            (30007, "malformed {BLF-CRYPT} hash")]
    fast = (directory_contents(r), index_contents(r), [(i.line, i.reason) for i in report.invalid])
    r.flushall()
    d = Directory(r, ensure_buckets(r, 64))
    seed = Mailbox("seed@seed.test", "store9", bcrypt_like(random.Random(0)))
    d.put(seed)  # not empty: every line takes plan_chunk and Mailbox.encode
    general = Provisioner(d)
    again = general.run(src)
    assert not general.fresh and (again.added, again.updated, again.unchanged) == (30005, 0, 0)
    d.remove(seed.address)
    assert (directory_contents(r), index_contents(r),
            [(i.line, i.reason) for i in again.invalid]) == fast
    # And every record reads back as the line gave it, the hash verifiable as imported.
    for row in rows[:5] + rows[30001:30004]:
        address, stored, _ = row.split(",")
        got = d.get(address.lower())
        assert got is not None and got.password_hash == stored
    assert d.get("upper@d1.example.com") is not None and d.get("spaced@d3.example.com") is not None
    assert d.get("broken@d3.example.com") is None


def test_pack_bcrypt_matched_equals_pack() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        stored = bcrypt_like(rng)
        for variant, cost in (("y", "10"), ("a", "04"), ("b", "31"), ("x", "00")):
            text = stored.replace("$2y$10$", f"$2{variant}${cost}$")
            assert hashcodec.pack_bcrypt_matched(text.encode()) == hashcodec.pack(text)
            assert hashcodec.unpack(hashcodec.pack(text))[0] == text
    texts = [bcrypt_like(rng).replace("$2y$10$", f"$2{v}${c:02d}$").encode()
             for v, c in (("y", 10), ("a", 4), ("b", 31), ("x", 0)) * 500]
    assert hashcodec.pack_bcrypt_many(texts) == [hashcodec.pack(t.decode()) for t in texts]
    assert hashcodec.pack_bcrypt_many([]) == []
