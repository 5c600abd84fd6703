"""Per-user send limits of the webmail: recipients per rolling hour and day, at the limit and past it.

Real parts: the webmail (create_app) on the test redis-server, the outbound
worker, Postfix's smtp-sink as the smarthost.  Time is moved by ageing the
user's send log in Redis (or by `now=` on the counting script), never by
waiting.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time

import pytest
from markupsafe import escape

from fallback import keys
from fallback.ids import new_id
from fallback.intake import sendlimits
from fallback.intake.sendlimits import Limits
from fallback.mailbox import record
from fallback.maillog import LOGGER_NAME
from fallback.ops import metrics
from fallback.queues import outbound
from tests import test_outbound as ob
from tests import test_web_browser
from tests.servers import sink_payload, wait_for
from tests.test_web_compose import compose_page, stream_entries
from tests.webutil import log_in_as, make_app
from web.sessions import COOKIE

out_settings, sinks, workers = ob.out_settings, ob.sinks, ob.workers  # the fixtures, shared
webmail, browser = test_web_browser.webmail, test_web_browser.browser

ALICE = "alice@example.com"
DEFAULT = Limits(100, 500)


def rcpts(prefix: str, n: int) -> str:
    return ", ".join(f"{prefix}{i}@remote.test" for i in range(n))


def post(client, form: dict[str, str], **values):
    data = {**form, "to": "", "cc": "", "bcc": "", "subject": "s", "body": "b", **values}
    return client.post("/compose", data=data, content_type="multipart/form-data")


def clock(ts: float) -> str:
    return time.strftime("%H:%M UTC", time.gmtime(ts))


def oldest(r) -> float:
    ((_, score),) = r.zrange(keys.send_log(ALICE), 0, 0, withscores=True)
    return score / 1000


def age_log(r, seconds: float) -> None:
    """Every send of the log moved `seconds` into the past (the clock moving on)."""
    log = keys.send_log(ALICE)
    r.zadd(log, {m: s - seconds * 1000 for m, s in r.zrange(log, 0, -1, withscores=True)})


def all_sent(r) -> bool:
    """Every message in Sent delivered to the smarthost (it answered 250: its dump is complete)."""
    ids = [i.decode() for i in r.zrange(keys.folder(ALICE, "Sent"), 0, -1)]
    return bool(ids) and all(set(ob.states(r, i).values()) == {"delivered"} for i in ids)


def mail_lines(caplog, event: str) -> list[str]:
    return [rec.getMessage() for rec in caplog.records
            if rec.name == LOGGER_NAME and rec.getMessage().startswith(f"event={event} ")]


def counted(web_app, r) -> dict[tuple[tuple[str, str], ...], int]:
    web_app.extensions["fallback"].counters.flush(r)
    return metrics.totals(r).get(metrics.MAIL_EVENTS, {})


def test_hundred_recipients_in_the_hour_go_and_one_more_gets_429(
        web_app, client, r, sinks, workers, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    sink = sinks()
    workers(smarthost=ob.smarthost(sink.port))
    log_in_as(client, ALICE)
    for n in range(4):  # 4 x 25 = exactly the default 100 per hour
        resp = post(client, compose_page(client), to=rcpts(f"m{n}-", 25), subject=f"batch {n}")
        assert resp.status_code == 302 and resp.headers["Location"].endswith("sent=1")
    wait_for(lambda: all_sent(r), what="four messages at the smarthost")
    assert len(sink.messages()) == 4
    assert sum(len(sink_payload(d)[0]) for d in sink.messages()) == 100

    form = compose_page(client)
    typed = {"to": "one@remote.test", "cc": "two@remote.test", "bcc": "three@remote.test",
             "subject": "One too many", "body": "Kept exactly as typed."}
    resp = post(client, form, **typed)
    assert resp.status_code == 429
    m = re.search(r"You have sent to 100 recipients in the last hour, the limit for this service "
                  r"during the outage\. You can send again at (\d\d:\d\d UTC) \(in (\d+) minutes?\)\. "
                  r"Nothing was sent\.", resp.text)
    assert m, resp.text
    assert m.group(1) == clock(oldest(r) + 3600) and 1 <= int(m.group(2)) <= 60
    for value in typed.values():
        assert f'value="{escape(value)}"' in resp.text or f">{escape(value)}<" in resp.text
    assert f'name="draft" value="{form["draft"]}"' in resp.text
    # Nothing of the refused message was filed, queued or counted.
    assert r.zcard(keys.folder(ALICE, "Sent")) == 4 and not r.exists(
        keys.outbound_record(ALICE, form["draft"]))
    assert sendlimits.used(r, ALICE) == {"hour": 100, "day": 100}

    # The operator is alerted once per user and window; every refused recipient is logged.
    assert post(client, form, **typed).status_code == 429
    assert len(mail_lines(caplog, "alert")) == 1
    (alert,) = mail_lines(caplog, "alert")
    assert "to=alice@example.com" in alert and "send limit of 100 recipients per hour" in alert
    assert "fallback queue hold --user alice@example.com" in alert
    rejected = mail_lines(caplog, "rejected")
    assert len(rejected) == 6 and all("outcome=429" in line for line in rejected)
    events = counted(web_app, r)
    assert events[(("event", "alert"), ("outcome", ""))] == 1
    assert events[(("event", "rejected"), ("outcome", "429"))] == 6
    text = metrics.exposition(r).decode()
    assert 'fallback_mail_events_total{event="alert",outcome=""} 1.0' in text
    assert 'fallback_mail_events_total{event="rejected",outcome="429"} 6.0' in text

    # An hour later the same form sends, once, and reaches the smarthost with its 3 recipients.
    age_log(r, 3601)
    resp = post(client, form, **typed)
    assert resp.headers["Location"] == f"/message/{form['draft']}?sent=1"
    wait_for(lambda: all_sent(r) and r.zcard(keys.folder(ALICE, "Sent")) == 5, what="the fifth message")
    assert len(sink.messages()) == 5
    late = [sink_payload(d) for d in sink.messages() if b"One too many" in d]
    assert len(late) == 1 and sorted(late[0][0]) == ["one@remote.test", "three@remote.test",
                                                     "two@remote.test"]
    assert sendlimits.used(r, ALICE) == {"hour": 3, "day": 103}


def test_message_that_would_pass_the_limit_says_how_many_fit_now(client, r) -> None:
    sendlimits.reserve(r, ALICE, new_id(), 98, DEFAULT)
    log_in_as(client, ALICE)
    form = compose_page(client)
    resp = post(client, form, to=rcpts("x", 3), attachments=[(io.BytesIO(b"data"), "plan.txt")])
    assert resp.status_code == 429
    assert "Nothing was sent." in resp.text and "Attach your files again" not in resp.text
    assert "attached: plan.txt (4 B)" in resp.text  # kept with the draft (issue 15): not chosen again
    at = clock(oldest(r) + 3600)
    assert re.search(
        r"This message has 3 recipients, but you have sent to 98 in the last hour and the limit "
        r"for this service during the outage is 100 per hour\. You can send it at "
        + re.escape(at) + r" \(in \d+ minutes?\), or send it now to at most 2 recipients\. "
        r"Nothing was sent\.", resp.text), resp.text
    assert stream_entries(r) == []
    # Corrected to two recipients, the same form sends: exactly at the limit.
    resp = post(client, form, to=rcpts("x", 2))
    assert resp.headers["Location"].endswith("sent=1")
    assert sendlimits.used(r, ALICE)["hour"] == 100 and len(stream_entries(r)) == 1


def test_per_day_limit_and_lifting_it(settings, r, mailboxes) -> None:
    now = time.time()
    for hours_ago in (23, 20, 15, 10, 5):  # 5 x 100, never 100 in one hour
        assert sendlimits.reserve(r, ALICE, new_id(), 100, DEFAULT, now=now - hours_ago * 3600) is None
    client = make_app(settings, r).test_client()
    log_in_as(client, ALICE)
    form = compose_page(client)
    resp = post(client, form, to="late@remote.test")
    assert resp.status_code == 429
    assert re.search(r"You have sent to 500 recipients in the last day, the limit for this service "
                     r"during the outage\. You can send again at " + re.escape(clock(oldest(r) + 86400))
                     + r" \(in \d+ minutes?\)\.", resp.text), resp.text
    assert stream_entries(r) == []
    # The operator lifts the daily limit (--send-limit-per-day 0): the same form sends.
    lifted = make_app(settings, r, send_limit_per_day=0).test_client()
    cookie = client.get_cookie(COOKIE)
    assert cookie is not None
    lifted.set_cookie(COOKIE, cookie.value)  # the same browser, after the webmail's restart
    assert post(lifted, form, to="late@remote.test").headers["Location"].endswith("sent=1")


def test_more_recipients_than_the_limit_itself(settings, r, mailboxes, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    client = make_app(settings, r, send_limit_per_hour=2).test_client()
    log_in_as(client, ALICE)
    resp = post(client, compose_page(client), to=rcpts("y", 3))
    assert resp.status_code == 429
    assert ("This message has 3 recipients, more than the 2 per hour this service allows during "
            "the outage. Send it to fewer recipients. Nothing was sent.") in resp.text
    assert stream_entries(r) == [] and not r.exists(keys.send_log(ALICE))
    assert mail_lines(caplog, "alert") == []  # nothing was sent: no sign of abuse yet


def test_concurrent_sends_at_the_edge_pass_exactly_up_to_the_limit(web_app, r) -> None:
    sendlimits.reserve(r, ALICE, new_id(), 95, DEFAULT)
    first = web_app.test_client()
    log_in_as(first, ALICE)
    cookie = first.get_cookie(COOKIE)
    assert cookie is not None
    clients = [first] + [web_app.test_client() for _ in range(9)]
    for c in clients[1:]:
        c.set_cookie(COOKIE, cookie.value)
    forms = [compose_page(c) for c in clients]
    barrier = threading.Barrier(len(clients), timeout=10)
    codes: list[int] = []

    def submit(c, form) -> None:
        barrier.wait()
        codes.append(post(c, form, to=f"{form['draft'].lower()}@remote.test").status_code)

    threads = [threading.Thread(target=submit, args=pair) for pair in zip(clients, forms, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(codes) == [302] * 5 + [429] * 5
    assert len(stream_entries(r)) == 5 and r.zcard(keys.folder(ALICE, "Sent")) == 5
    assert sendlimits.used(r, ALICE)["hour"] == 100


def test_window_boundaries_and_retry_time(r) -> None:
    """The script's arithmetic, with the clock given: what counts, and when a send fits again."""
    now = time.time()
    assert sendlimits.reserve(r, ALICE, "a", 60, DEFAULT, now=now - 3599) is None
    assert sendlimits.reserve(r, ALICE, "b", 40, DEFAULT, now=now - 10) is None
    refusal = sendlimits.reserve(r, ALICE, "c", 1, DEFAULT, now=now)
    assert refusal is not None and (refusal.window, refusal.used, refusal.limit) == ("hour", 100, 100)
    # One recipient fits once the oldest send (60) leaves the hour: 3600 s after it was made.
    assert refusal.retry_at == pytest.approx(now - 3599 + 3600, abs=0.002) and refusal.first
    again = sendlimits.reserve(r, ALICE, "c", 1, DEFAULT, now=now)
    assert again is not None and not again.first  # one alert per user and window
    # 61 recipients need both sends gone (41 would fit once the older leaves): 3590 s from now.
    big = sendlimits.reserve(r, ALICE, "d", 61, DEFAULT, now=now)
    assert big is not None and big.retry_at == pytest.approx(now - 10 + 3600, abs=0.002)
    fits = sendlimits.reserve(r, ALICE, "d", 41, DEFAULT, now=now)
    assert fits is not None and fits.retry_at == pytest.approx(now - 3599 + 3600, abs=0.002)
    # A send exactly an hour old no longer counts.
    assert sendlimits.reserve(r, ALICE, "e", 60, DEFAULT, now=now + 1) is None
    assert sendlimits.used(r, ALICE, now=now + 1) == {"hour": 100, "day": 160}


def test_no_limits_count_nothing(r) -> None:
    assert sendlimits.reserve(r, ALICE, "x", 10_000, Limits(0, 0)) is None
    assert not r.exists(keys.send_log(ALICE))
    # An hourly limit alone remembers sends for an hour only.
    assert sendlimits.reserve(r, ALICE, "y", 5, Limits(10, 0)) is None
    assert 0 < r.pttl(keys.send_log(ALICE)) <= 3600 * 1000


@pytest.mark.browser
@pytest.mark.slow
def test_in_chromium_429_keeps_the_form_and_the_same_form_sends_later(webmail, browser, r) -> None:
    """What a person sees: the 429 page with the form as typed (files kept with the draft), then the same
    form, corrected, sends; a header character mail cannot carry gets a 400 on the way."""
    from tests.test_web_browser import log_in

    sendlimits.reserve(r, ALICE, new_id(), 100, DEFAULT)
    page = browser.new_page()
    log_in(page, webmail, ALICE)
    page.goto(f"{webmail}/compose")
    typed = {"#to": "Ann <one@remote.test>", "#cc": "two@remote.test", "#bcc": "three@remote.test",
             "#subject": "Plan f\u00fcr morgen", "#body": "First line\nsecond line \u2028 same line"}
    for selector, value in typed.items():
        page.fill(selector, value)
    page.set_input_files("#attachments", files=[{"name": "plan.txt", "mimeType": "text/plain",
                                                 "buffer": b"the plan"}])
    with page.expect_response(lambda resp: resp.url.endswith("/compose")) as answer:
        page.get_by_role("button", name="Send").click()
    assert answer.value.status == 429
    alert = page.get_by_role("alert").inner_text()
    assert alert.startswith("You have sent to 100 recipients in the last hour, the limit for this "
                            "service during the outage. You can send again at ")
    assert alert.endswith("Nothing was sent.")
    assert page.get_by_text("attached: plan.txt").count() == 1  # kept with the draft (issue 15)
    for selector, value in typed.items():
        assert page.input_value(selector) == value, selector
    assert r.zcard(keys.folder(ALICE, "Sent")) == 0

    age_log(r, 3601)  # an hour later; a line separator slipped into the subject meanwhile
    page.fill("#subject", "Plan\u2028f\u00fcr morgen")
    with page.expect_response(lambda resp: resp.url.endswith("/compose")) as answer:
        page.get_by_role("button", name="Send").click()
    assert answer.value.status == 400
    assert page.get_by_role("alert").inner_text().startswith(
        "The subject contains a character that cannot be sent (line separator U+2028). Remove it "
        "and try again. Nothing was sent.")
    page.fill("#subject", typed["#subject"])
    page.get_by_role("button", name="Send").click()
    page.wait_for_url(re.compile(r".*/message/[0-9A-Z]{26}\?sent=1$"))
    assert "Your message was sent." in page.content()
    (sent,) = [i.decode() for i in r.zrange(keys.folder(ALICE, "Sent"), 0, -1)]
    sent_raw = record.read_raw(r, keys.message(ALICE, sent)) or b""
    assert b'filename="plan.txt"' in sent_raw  # never chosen again
    assert sorted(outbound.recipient_status(r, ALICE, sent)) == ["one@remote.test", "three@remote.test",
                                                "two@remote.test"]
