"""Outbound delivery: TLS and AUTH to the smarthost, DKIM, the operator's `fallback queue`, settings."""

from __future__ import annotations

import base64
import io
import json
import ssl
from dataclasses import replace
from pathlib import Path

import dkim
import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fallback import keys
from fallback.cli import build_parser, main
from fallback.config import load_settings
from fallback.errors import ConfigError
from fallback.mailbox import record
from fallback.queues import outbound
from tests import test_outbound as ob
from tests.servers import free_port, sink_payload
from tests.test_outbound import (
    SENDER,
    TableHandler,
    inbox,
    queue_is_empty,
    queue_message,
    smarthost,
    states,
    wait_for,
)
from tests.test_web_compose import stream_entries

out_settings, sinks, workers = ob.out_settings, ob.sinks, ob.workers  # the fixtures, shared


# --- STARTTLS + AUTH with a test CA --------------------------------------------------------

class TlsController(Controller):
    """aiosmtpd with STARTTLS required and AUTH checked against one user."""

    def __init__(self, handler: TableHandler, port: int, tls: ssl.SSLContext) -> None:
        def check(server, session, envelope, mechanism, auth_data) -> AuthResult:
            ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
                b"relay-user", b"s3cret pass")
            return AuthResult(success=ok)

        super().__init__(handler, hostname="127.0.0.1", port=port, tls_context=tls,
                         require_starttls=True, authenticator=check, auth_required=True)


@pytest.fixture
def tls_smarthost(tmp_path: Path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    handler = TableHandler({})
    port = free_port()
    ctl = TlsController(handler, port, server_ctx)
    ctl.start()
    yield handler, port, ca_file
    ctl.stop()


def test_starttls_and_auth_to_the_smarthost(r, workers, tls_smarthost, tmp_path) -> None:
    handler, port, ca_file = tls_smarthost
    secret = tmp_path / "relay.pw"
    secret.write_text("s3cret pass\n")
    msg_id = queue_message(r, ["bob@remote.test"], "over tls")
    workers(smarthost=smarthost(port), smarthost_tls="starttls", smarthost_ca_file=ca_file,
            smarthost_user="relay-user", smarthost_password_file=secret)
    wait_for(lambda: states(r, msg_id) == {"bob@remote.test": "delivered"}, what="delivery over TLS")
    assert handler.tls_sessions == [True]
    assert [t for t, _ in handler.delivered] == [["bob@remote.test"]]


def test_untrusted_certificate_or_wrong_password_defers(r, workers, tls_smarthost, tmp_path) -> None:
    handler, port, ca_file = tls_smarthost
    wrong = tmp_path / "wrong.pw"
    wrong.write_text("nope\n")
    a = queue_message(r, ["bob@remote.test"], "no ca")
    first = workers(smarthost=smarthost(port), smarthost_tls="starttls")  # system CAs only

    def reply_of(msg_id: str) -> str:
        return str(outbound.recipient_status(r, SENDER, msg_id)["bob@remote.test"]["reply"])

    wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in reply_of(a), what="a certificate failure")
    assert states(r, a) == {"bob@remote.test": "deferred"}
    first.stop()
    r.flushall()
    b = queue_message(r, ["bob@remote.test"], "bad password")
    workers(smarthost=smarthost(port), smarthost_tls="starttls", smarthost_ca_file=ca_file,
            smarthost_user="relay-user", smarthost_password_file=wrong)
    # aiosmtpd answers a wrong password with 535 or, after its failure delay, not at all.
    wait_for(lambda: "login" in reply_of(b), what="a refused login")
    # Our credentials are wrong, not the recipient: deferred, never bounced.
    assert states(r, b) == {"bob@remote.test": "deferred"}
    assert handler.delivered == [] and inbox(r) == []


# --- DKIM ----------------------------------------------------------------------------------

def test_dkim_signature_verifies_with_the_published_key(r, sinks, workers, tmp_path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_dir = tmp_path / "dkim"
    key_dir.mkdir()
    (key_dir / "example.com.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    public = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    sink = sinks()
    msg_id = queue_message(r, ["bob@remote.test"], "signed")
    workers(smarthost=smarthost(sink.port), dkim_selector="fb2026", dkim_key_dir=key_dir)
    wait_for(lambda: states(r, msg_id) == {"bob@remote.test": "delivered"}, what="delivery")
    [dump] = sink.messages()
    _, body = sink_payload(dump)
    sent = body.replace(b"\n", b"\r\n")
    assert sent.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    assert b" d=example.com;" in sent and b" s=fb2026;" in sent
    looked_up: list[bytes] = []

    def dns(name: bytes, timeout: int = 5) -> bytes:
        looked_up.append(name)
        return f"v=DKIM1; k=rsa; p={public}".encode() if name == b"fb2026._domainkey.example.com." else b""

    assert dkim.verify(sent, dnsfunc=dns)
    assert looked_up == [b"fb2026._domainkey.example.com."]
    # A changed body no longer verifies: the signature covers what was sent.
    assert not dkim.verify(sent.replace(b"Hello from", b"Hello FROM"), dnsfunc=dns)
    # The Sent copy is what the user composed, unsigned.
    assert b"DKIM-Signature" not in (record.read_raw(r, keys.message(SENDER, msg_id)) or b"")


def test_domain_without_a_key_goes_unsigned(tmp_path: Path) -> None:
    from fallback.queues.dkim import Signer

    raw = b"From: a@other.test\r\nSubject: x\r\n\r\nbody\r\n"
    assert Signer("s1", tmp_path).sign(raw, "a@other.test") == raw


# --- fallback queue ------------------------------------------------------------------------

def cli(settings, *args: str) -> int:
    return main([*args, "--redis-url", settings.redis_url])


def test_queue_list_show_and_delete(r, settings, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    a = queue_message(r, ["bob@remote.test", "carol@remote.test"], "first")
    b = queue_message(r, ["dave@remote.test"], "second")
    assert cli(settings, "queue", "list") == 0
    out = capsys.readouterr().out
    assert "outbound queue: 2 message(s)" in out
    for column in ("age", "attempts", "next try", "last reply"):
        assert column in out
    assert a in out and b in out and SENDER in out

    assert cli(settings, "queue", "show", a) == 0
    out = capsys.readouterr().out
    assert "bob@remote.test" in out and "carol@remote.test" in out and "queued" in out

    # No terminal and no --yes: refused, nothing deleted.
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    assert cli(settings, "queue", "delete", a) == 1
    assert "without confirmation: give --yes" in capsys.readouterr().err
    assert len(outbound.scan(r)) == 2

    # A terminal that answers no: nothing deleted.
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Tty("n\n"))
    assert cli(settings, "queue", "delete", a) == 1
    assert "not deleted" in capsys.readouterr().out
    assert len(outbound.scan(r)) == 2

    assert cli(settings, "queue", "delete", a, "--yes") == 0
    assert "2 recipient(s) marked failed" in capsys.readouterr().out
    assert [i.msg_id for i in outbound.scan(r)] == [b]
    assert states(r, a) == {"bob@remote.test": "failed", "carol@remote.test": "failed"}
    [notice] = inbox(r)  # the sender is told, not left guessing
    assert b"deleted from the queue by the operator" in notice
    assert a not in r.smembers(keys.outbox(SENDER)) and b.encode() in r.smembers(keys.outbox(SENDER))


@pytest.mark.parametrize(("args", "message"), [
    (["queue", "show", "nonsense"], "'nonsense' is not a message id"),
    (["queue", "show", "01M8566TE4ZJXM1JJ2TXRSTKEP"], "is not in the outbound queue"),
    (["queue", "retry", "01M8566TE4ZJXM1JJ2TXRSTKEP"], "is not in the outbound queue"),
    (["queue", "delete", "01M8566TE4ZJXM1JJ2TXRSTKEP", "--yes"], "is not in the outbound queue"),
    (["queue", "list", "--limit", "0"], "--limit must be greater than 0"),
])
def test_queue_bad_input(r, settings, capsys, args, message) -> None:
    kept = queue_message(r, ["bob@remote.test"], "keep me")
    assert cli(settings, *args) == 1
    err = capsys.readouterr().err
    assert err.startswith("fallback queue: ") and message in err and err.count("\n") == 1
    assert [i.msg_id for i in outbound.scan(r)] == [kept]


def test_delete_refuses_a_message_being_delivered(r, settings, capsys) -> None:
    msg_id = queue_message(r, ["bob@remote.test"], "busy")
    r.set(keys.outbound_lease(SENDER, msg_id), "some-worker", px=60_000)
    assert cli(settings, "queue", "delete", msg_id, "--yes") == 1
    assert "being delivered right now" in capsys.readouterr().err
    assert states(r, msg_id) == {"bob@remote.test": "queued"}


def test_retry_makes_a_deferred_message_due_now(r, settings, sinks, workers) -> None:
    sink = sinks(["-r", "RCPT"])
    msg_id = queue_message(r, ["bob@remote.test"], "retry me")
    workers(smarthost=smarthost(sink.port), retry_base=3600.0, retry_max_interval=3600.0)
    wait_for(lambda: states(r, msg_id) == {"bob@remote.test": "deferred"}, what="a deferral")
    [item] = outbound.scan(r)
    assert item.where == "retry"
    sink.stop()
    sinks(port=sink.port)
    # Without the operator this would wait an hour.
    assert cli(settings, "queue", "retry", msg_id) == 0
    wait_for(lambda: states(r, msg_id) == {"bob@remote.test": "delivered"}, what="delivery")
    wait_for(lambda: queue_is_empty(r), what="an empty queue")


# --- settings ------------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "message"), [
    ({"smarthost": "mail.example.com"}, "smarthost: 'mail.example.com' is not HOST:PORT"),
    ({"smarthost": "mail.example.com:70000"}, "70000 is not a port number"),
    ({"smarthost_tls": "ssl"}, "smarthost_tls: 'ssl' is not one of none, starttls, tls"),
    ({"smarthost_user": "u"}, "smarthost_user and smarthost_password_file must be given together"),
    ({"smarthost_user": "u", "smarthost_password_file": "/nonexistent/pw"},
     "smarthost_password_file: /nonexistent/pw is not a readable file"),
    ({"retry_base": "0"}, "retry_base: must be greater than 0"),
    ({"retry_deadline": "five days"}, "--retry-deadline: not a duration: 'five days'"),
    ({"dkim_selector": "s1"}, "dkim_selector and dkim_key_dir must be given together"),
    ({"max_crashes": "0"}, "max_crashes: must be greater than 0"),
])
def test_bad_outbound_settings_fail_with_one_line(flags, message) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(flags, env={})
    assert message in str(err.value)


def test_defaults_and_environment() -> None:
    s = load_settings({}, env={})
    assert (s.retry_base, s.retry_deadline, s.smarthost, s.smarthost_tls) == (60.0, 432000.0, None,
                                                                              "starttls")
    s = load_settings({}, env={"FALLBACK_SMARTHOST": "relay.example:587", "FALLBACK_RETRY_DEADLINE": "2d"})
    assert (s.smarthost, s.retry_deadline) == ("relay.example:587", 172800.0)


def test_worker_and_up_take_the_same_flags() -> None:
    flags = ["--smarthost", "relay.example:465", "--smarthost-tls", "tls", "--retry-base", "5",
             "--retry-deadline", "1d", "--smarthost-user", "u", "--smarthost-password-file", "/pw"]
    for command in ("worker", "up"):
        args = vars(build_parser().parse_args([command, *flags]))
        assert (args["smarthost"], args["smarthost_tls"], args["retry_base"], args["retry_deadline"],
                args["smarthost_user"], args["smarthost_password_file"]) == (
            "relay.example:465", "tls", "5", "1d", "u", "/pw")


def test_worker_without_a_smarthost_says_so(settings, capsys) -> None:
    assert cli(settings, "worker") == 1
    assert capsys.readouterr().err == (
        "fallback worker: smarthost: not set; give --smarthost HOST:PORT (or FALLBACK_SMARTHOST)\n")


def test_bad_tls_choice_prints_usage(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["worker", "--smarthost", "a:25", "--smarthost-tls", "ssl"])
    assert exc.value.code == 2
    assert "invalid choice: 'ssl'" in capsys.readouterr().err


def test_up_runs_the_worker_component(r, settings, sinks) -> None:
    import asyncio

    from fallback.redisconn import async_client
    from fallback.service import WorkerComponent

    sink = sinks()
    msg_id = queue_message(r, ["bob@remote.test"], "via up")

    async def run() -> tuple[str, str]:
        client = async_client(settings.redis_url or "")
        off = WorkerComponent(settings, client)
        banner_off = await off.start()
        await off.stop()
        on = WorkerComponent(replace(settings, smarthost=smarthost(sink.port), smarthost_tls="none"),
                             client)
        banner = await on.start()
        for _ in range(200):
            if states(r, msg_id) == {"bob@remote.test": "delivered"}:
                break
            await asyncio.sleep(0.05)
        await on.stop()
        await client.aclose()
        return banner_off, banner

    banner_off, banner = asyncio.run(run())
    assert "off (no --smarthost)" in banner_off
    assert banner.startswith("outbound worker ") and f"smarthost 127.0.0.1:{sink.port}" in banner
    assert states(r, msg_id) == {"bob@remote.test": "delivered"}


# --- end to end: webmail compose -> worker -> smarthost -> the Sent view -------------------

def test_sent_view_shows_each_recipients_outcome(r, client, workers) -> None:
    import html
    import re

    from tests.test_web_compose import send
    from tests.webutil import log_in_as

    handler = TableHandler({
        "ok@remote.test": ["250 2.1.5 Ok"],
        "later@remote.test": ["451 4.2.0 Mailbox busy, try later"],
        "no@remote.test": ["550 5.1.1 User unknown"],
    })
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        log_in_as(client, SENDER)
        resp, msg_id = send(client, to="ok@remote.test, later@remote.test, no@remote.test",
                            subject="from the webmail", body="Hello")
        assert resp.status_code == 302
        workers(smarthost=smarthost(port), retry_base=3600.0, retry_max_interval=3600.0)
        wait_for(lambda: states(r, msg_id) == {"ok@remote.test": "delivered", "later@remote.test":
                                               "deferred", "no@remote.test": "failed"}, what="outcomes")
        page = html.unescape(client.get(f"/message/{msg_id}").text)
        # The next attempt is a <time> element (in the reader's zone): match the cell's text.
        page = re.sub(r"</?time[^>]*>", "", page)
        rows = dict(re.findall(r"<td>([^<]+@remote\.test)</td><td>\s*([^<]*?)\s*</td>", page))
        assert rows["ok@remote.test"] == "Delivered"
        assert rows["no@remote.test"] == "Failed: 550 5.1.1 User unknown"
        assert re.fullmatch(r"Waiting to retry \(next attempt \w{3} \d{1,2} \w{3} \d{4}, [\d:]+ UTC\): "
                            r"451 4\.2\.0 Mailbox busy, try later", rows["later@remote.test"])
        # What the smarthost got is the Sent copy, byte for byte (it kept its Message-ID and Date).
        [(rcpts, data)] = handler.delivered
        assert rcpts == ["ok@remote.test"]
        assert data == record.read_raw(r, keys.message(SENDER, msg_id))
    finally:
        ctl.stop()


# --- hold and release one sender -----------------------------------------------------------

def retry_members(r) -> list[str]:
    return sorted(outbound.split_member(m)[0]
                  for m in r.zrange(keys.outbound_retry_n(keys.outbound_shard(SENDER)), 0, -1))


def test_hold_stops_delivery_and_release_delivers_unchanged(r, settings, mailboxes, sinks, workers,
                                                            capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    sink = sinks()
    assert cli(settings, "queue", "hold", "--user", "<Alice@Example.COM>", "--reason", "stolen") == 0
    assert ("alice@example.com: outbound mail held (0 message(s) queued); new mail from this user "
            "is queued and held too.") in capsys.readouterr().out
    a = queue_message(r, ["bob@remote.test"], "held one")
    b = queue_message(r, ["carol@remote.test", "dave@remote.test"], "held two")
    workers(smarthost=smarthost(sink.port))
    # The worker looked at both and put them back to wait: no attempt made, none counted.
    wait_for(lambda: retry_members(r) == sorted([a, b]) and not stream_entries(r),
             what="both messages back in the retry zset")
    assert sink.messages() == []
    for msg_id in (a, b):
        assert set(states(r, msg_id).values()) == {"queued"}
        status = outbound.recipient_status(r, SENDER, msg_id)
        assert all(st["attempts"] == 0 and st.get("held") is True for st in status.values())
        assert r.hget(keys.outbound_record(SENDER, msg_id), "runs") in (None, b"0")
    assert cli(settings, "queue", "list") == 0
    out = capsys.readouterr().out
    assert "held: all outbound mail from alice@example.com" in out and "stolen" in out
    assert cli(settings, "queue", "list", "--format", "json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted((m["id"], m["state"]) for m in listed["messages"]) == sorted([(a, "held"), (b, "held")])
    assert [(h["user"], h["reason"]) for h in listed["held"]] == [(SENDER, "stolen")]
    assert cli(settings, "queue", "retry", a) == 1
    assert (f"message {a} is held with all mail from alice@example.com; `fallback queue release "
            "--user alice@example.com` lets it go") in capsys.readouterr().err
    assert sink.messages() == []

    assert cli(settings, "queue", "release", "--user", SENDER) == 0
    assert "alice@example.com: released; 2 message(s) due for delivery now" in capsys.readouterr().out
    wait_for(lambda: len(sink.messages()) == 2 and queue_is_empty(r), what="both delivered")
    for dump in sink.messages():
        _, body = sink_payload(dump)
        msg_id = a if b"held one" in body else b
        stored = record.read_raw(r, keys.message(SENDER, msg_id)) or b""
        assert body == stored.replace(b"\r\n", b"\n")
    assert float(r.hget(keys.outbound_record(SENDER, a), "held") or 0) > 0
    assert [e.action for e in audit_entries(r)][-2:] == ["queue hold", "queue release"]


def audit_entries(r):
    from fallback.ops import audit

    return [audit.Entry.from_fields(f) for _, f in r.xrange(keys.AUDIT_STREAM)]


def test_time_held_does_not_count_towards_the_retry_deadline(r, mailboxes, sinks, workers) -> None:
    import time

    from fallback.queues import hold

    sink = sinks()
    msg_id = queue_message(r, ["bob@remote.test"], "held for two hours")
    two_hours_ago = time.time() - 7200
    r.hset(keys.outbound_record(SENDER, msg_id), "created", two_hours_ago)
    hold.hold(r, SENDER, "test", now=two_hours_ago)
    workers(smarthost=smarthost(sink.port), retry_deadline=3600.0)  # past it, but for the hold
    wait_for(lambda: retry_members(r) == [msg_id], what="the held message back in the retry zset")
    hold.release(r, SENDER)
    wait_for(lambda: states(r, msg_id) == {"bob@remote.test": "delivered"}, what="delivery")
    assert len(sink.messages()) == 1 and inbox(r) == []  # no "gave up" notice


def test_webmail_send_while_held_says_so(client, r) -> None:
    import html
    import re

    from fallback.queues import hold
    from tests.test_web_compose import send
    from tests.webutil import log_in_as

    hold.hold(r, SENDER, "test")
    log_in_as(client, SENDER)
    resp, msg_id = send(client, to="x@remote.test", subject="while held", body="b")
    assert resp.headers["Location"] == f"/message/{msg_id}?sent=held"
    page = html.unescape(client.get(resp.headers["Location"]).text)
    assert ("Your message is in Sent and queued, but the operator is holding mail from your "
            "account: it will not leave until they release it.") in page
    rows = dict(re.findall(r"<td>([^<]+@remote\.test)</td><td>\s*([^<]*?)\s*</td>", page))
    assert rows == {"x@remote.test": "Queued, held by the operator (not sent until they release it)"}
    [item] = outbound.scan(r)
    assert (item.msg_id, item.where) == (msg_id, "held")
    hold.release(r, SENDER)
    page = html.unescape(client.get(f"/message/{msg_id}").text)
    assert "Queued for delivery" in page


@pytest.mark.parametrize(("args", "message"), [
    (["queue", "hold", "--user", "not-an-address"], "--user: 'not-an-address' is not an email address"),
    (["queue", "release", "--user", "alice@example.com"],
     "the outbound mail of alice@example.com is not held"),
    (["queue", "hold", "--user", "nobody@example.com"],
     "no mailbox nobody@example.com is provisioned and it has no queued mail: nothing to hold"),
])
def test_hold_bad_input(r, settings, mailboxes, capsys, args, message) -> None:
    kept = queue_message(r, ["bob@remote.test"], "keep me")
    r.delete(keys.outbox("nobody@example.com"))
    assert cli(settings, *args) == 1
    err = capsys.readouterr().err
    assert err.startswith("fallback queue: ") and message in err and err.count("\n") == 1
    assert [i.msg_id for i in outbound.scan(r)] == [kept] and not r.exists(keys.outbound_hold(SENDER))


def test_second_hold_keeps_the_first(r, settings, mailboxes, capsys) -> None:
    assert cli(settings, "queue", "hold", "--user", SENDER, "--reason", "first") == 0
    capsys.readouterr()
    assert cli(settings, "queue", "hold", "--user", SENDER, "--reason", "second") == 0
    assert "alice@example.com: already held since" in capsys.readouterr().out
    assert r.hget(keys.outbound_hold(SENDER), "reason") == b"first"
