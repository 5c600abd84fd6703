"""Times in the reader's time zone (web.filters, web.prefs, web/static/tz.js).

The filters with zoneinfo: a DST change, a day boundary that depends on the zone, today's
time against this year's and older dates, a Date: header that is not a date.  Through the
app: the `tz` cookie picks the zone, a zone zoneinfo does not know is ignored and the page
then says UTC.  In Chromium: the same messages seen from Tokyo and from New York, where
tz.js tells the server the browser's zone; a page rendered before it did is reloaded once
in the right zone, and without scripts the times say they are UTC.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from fallback import keys
from fallback.mailbox import fields
from tests.test_web_browser import ARGS, CHROMIUM, log_in, smtp_send
from tests.webutil import log_in_as, put_message, served, simple
from web import filters, prefs

ALICE = "alice@example.com"
NEW_YORK = prefs.parse_zone("America/New_York")
TOKYO = prefs.parse_zone("Asia/Tokyo")
UNKNOWN = prefs.Zone(prefs.UTC, "UTC", False)


def ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)  # type: ignore[misc]


def secs(*args: int) -> float:
    return ms(*args) / 1000


def test_zone_names_are_checked_against_zoneinfo() -> None:
    assert NEW_YORK is not None and TOKYO is not None and NEW_YORK.known
    assert prefs.parse_zone("Etc/GMT+5") is not None
    for bad in ("", None, "Mars/Olympus", "../../etc/passwd", "/etc/localtime", "America/New_York\x00",
                "A" * 65, "Europe/Paris; Path=/"):
        assert prefs.parse_zone(bad) is None, bad


def test_dst_change_in_new_york() -> None:
    assert NEW_YORK is not None
    # 8 March 2026: clocks go from 01:59:59 EST straight to 03:00 EDT (07:00 UTC).
    before, after = secs(2026, 3, 8, 6, 59), secs(2026, 3, 8, 7, 0)
    assert str(filters.epoch(before, NEW_YORK)) == (
        '<time datetime="2026-03-08T01:59:00-05:00" title="Sun 8 Mar 2026, 01:59 EST">'
        "Sun 8 Mar 2026, 01:59 EST</time>")
    assert "Sun 8 Mar 2026, 03:00 EDT</time>" in str(filters.epoch(after, NEW_YORK))
    # The same evening, seen the next morning: today in both, one hour between them on the clock.
    now = secs(2026, 3, 8, 20, 0)
    assert filters.short_date(ms(2026, 3, 8, 6, 59), now, NEW_YORK) == "01:59"
    assert filters.short_date(ms(2026, 3, 8, 7, 0), now, NEW_YORK) == "03:00"


def test_today_time_this_year_day_older_full_date() -> None:
    assert TOKYO is not None and NEW_YORK is not None
    now = secs(2026, 12, 1, 10, 0)
    # 23:30 UTC the evening before: 08:30 today in Tokyo, yesterday in UTC and New York.
    late = ms(2026, 11, 30, 23, 30)
    assert filters.short_date(late, now, TOKYO) == "08:30"
    assert filters.short_date(late, now, NEW_YORK) == "30 Nov"
    assert filters.short_date(late, now, UNKNOWN) == "30 Nov"
    assert filters.short_date(ms(2026, 11, 3, 12, 0), now, TOKYO) == "3 Nov"
    assert filters.short_date(ms(2025, 11, 3, 12, 0), now, TOKYO) == "3 Nov 2025"
    # Until the browser told us its zone, a time of day says which zone it is in.
    assert filters.short_date(ms(2026, 12, 1, 9, 5), now, UNKNOWN) == "09:05 UTC"
    row = str(filters.list_time(ms(2026, 12, 1, 9, 5), now, TOKYO))
    assert row == '<time datetime="2026-12-01T18:05:00+09:00" title="Tue 1 Dec 2026, 18:05 JST">18:05</time>'
    assert filters.short_date("not a number", now, TOKYO) == "" and str(filters.list_time("", now)) == ""


def test_header_dates() -> None:
    assert TOKYO is not None
    shown = str(filters.header_date("Mon, 23 Nov 2026 09:30:00 +0000", TOKYO))
    assert shown.endswith(">Mon 23 Nov 2026, 18:30 JST</time>")
    # "-0000": the sender's zone is unknown (RFC 5322 3.3): the moment is taken as UTC.
    assert 'datetime="2026-11-23T09:30:00+00:00"' in str(
        filters.header_date("Mon, 23 Nov 2026 09:30:00 -0000", UNKNOWN))
    # Not a date: shown as it came, escaped, never an error page.
    assert str(filters.header_date("next <b>Tuesday</b>", TOKYO)) == "next &lt;b&gt;Tuesday&lt;/b&gt;"
    assert str(filters.header_date("", TOKYO)) == ""


def _list_time(page: str) -> str:
    m = re.search(r'<span class="meta">.*?(<time datetime="[^"]+" title="[^"]+">[^<]*</time>)', page, re.S)
    assert m, "no <time> in the list"
    return m.group(1)


def test_cookie_picks_the_zone_and_unknown_zones_are_ignored(client, r) -> None:
    log_in_as(client, ALICE)
    msg = put_message(r, ALICE, simple("zoned"))
    stamp = int(r.hget(keys.message(ALICE, msg), fields.TS) or 0)
    now = time.time()
    page = client.get("/").text
    utc_text = filters.short_date(stamp, now, UNKNOWN)
    assert utc_text.endswith(" UTC") and f">{utc_text}</time>" in _list_time(page)
    assert '<meta name="fallback-tz" content=""' in page

    client.set_cookie(prefs.COOKIE, "Asia/Tokyo")
    page = client.get("/").text
    assert TOKYO is not None
    assert _list_time(page) == str(filters.list_time(stamp, now, TOKYO))
    assert '<meta name="fallback-tz" content="Asia/Tokyo"' in page
    shown = client.get(f"/message/{msg}").text
    assert "Mon 23 Nov 2026, 19:00 JST</time>" in shown  # Date: 10:00 +0000

    for bad in ("Mars/Olympus", "../../../etc/passwd", "x" * 300):
        client.set_cookie(prefs.COOKIE, bad)
        page = client.get("/").text
        assert f">{utc_text}</time>" in _list_time(page), bad
        assert "Mon 23 Nov 2026, 10:00 UTC</time>" in client.get(f"/message/{msg}").text
        assert msg in page  # the message is still listed


def script_errors(page: Any) -> list[str]:
    """Script errors of this page, and scripts the CSP refused (the favicon's 404 is no error)."""
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if "Refused" in m.text else None)
    return errors


@pytest.fixture
def webmail(settings, receiver) -> Iterator[str]:
    with served(settings) as url:
        yield url


@pytest.mark.browser
@pytest.mark.slow
def test_browser_zone_changes_the_hours(webmail, receiver, r) -> None:
    from playwright.sync_api import sync_playwright

    base = webmail
    smtp_send(receiver.port, [(ALICE, simple("today's news").replace(
        b"Date: Mon, 23 Nov 2026 10:00:00 +0000", b"Date: Mon, 23 Nov 2026 14:00:00 +0000"))])
    smtp_send(receiver.port, [(ALICE, simple("old news"))])
    # The second one has been here since March 2025 (delivery time and list order).
    _, (old_id, _) = r.zrevrange(keys.folder(ALICE, fields.INBOX), 0, -1, withscores=True)
    old_ms = ms(2025, 3, 9, 12, 0)
    r.hset(keys.message(ALICE, old_id.decode()), fields.TS, old_ms)
    r.zadd(keys.folder(ALICE, fields.INBOX), {old_id: old_ms})
    seen: dict[str, dict[str, str]] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            for zone in ("Asia/Tokyo", "America/New_York"):
                context = browser.new_context(timezone_id=zone)
                page = context.new_page()
                errors = script_errors(page)
                log_in(page, base, ALICE)
                # tz.js ran on the login page (under the CSP nonce): the inbox came in this zone.
                assert page.locator('meta[name="fallback-tz"]').get_attribute("content") == zone
                times = page.locator("ul.list time")
                assert times.count() == 2
                seen[zone] = {"list": times.nth(0).inner_text(), "old": times.nth(1).inner_text(),
                              "iso": times.nth(0).get_attribute("datetime") or ""}
                page.get_by_role("link", name="today's news").click()
                seen[zone]["header"] = page.locator("dl.headers time").inner_text()
                if zone == "Asia/Tokyo":
                    # A page rendered before the server knew the zone (the cookie gone): tz.js
                    # sets it again and reloads the page once, now in Tokyo time.
                    context.clear_cookies(name=prefs.COOKIE)
                    page.goto(f"{base}/")
                    page.wait_for_function(
                        "document.querySelector('meta[name=fallback-tz]').content === 'Asia/Tokyo'",
                        timeout=10_000)
                    assert page.locator("ul.list time").nth(0).inner_text() == seen[zone]["list"]
                assert errors == [], errors
                context.close()
            # Without scripts the zone stays unknown, and the list says its times are UTC.
            context = browser.new_context(timezone_id="Asia/Tokyo", java_script_enabled=False)
            page = context.new_page()
            log_in(page, base, ALICE)
            assert page.locator("ul.list time").nth(0).inner_text().endswith(" UTC")
            page.get_by_role("link", name="today's news").click()
            assert page.locator("dl.headers time").inner_text() == "Mon 23 Nov 2026, 14:00 UTC"
            context.close()
        finally:
            browser.close()
    tokyo, new_york = seen["Asia/Tokyo"], seen["America/New_York"]
    assert tokyo["header"] == "Mon 23 Nov 2026, 23:00 JST"
    assert new_york["header"] == "Mon 23 Nov 2026, 09:00 EST"
    # Today's mail shows a time (no zone label now that the zone is known), 13 or 14 hours apart.
    assert re.fullmatch(r"\d\d:\d\d", tokyo["list"]) and re.fullmatch(r"\d\d:\d\d", new_york["list"])
    assert tokyo["list"] != new_york["list"]
    assert tokyo["iso"].endswith("+09:00") and new_york["iso"][-6:] in ("-05:00", "-04:00")
    # Mail from an earlier year shows the date.
    assert tokyo["old"] == new_york["old"] == "9 Mar 2025"
