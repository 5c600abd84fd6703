"""Jinja filters for the mailbox pages: sizes, dates and senders the way people read them.

Times are shown in the reader's time zone (web.prefs: the browser's, once it told us), each
as a `<time datetime="ISO">`; while the zone is not known yet the text says "UTC", so no one
reads a UTC time as their own.  Today's mail shows the time, this year's the day and month
("3 Nov"), older mail the full date ("3 Nov 2025"), with the month and day names of the
page's language (Babel's CLDR data; web.i18n picks the language).

`frame_scheme` decides the message frame's colour scheme: a mail that sets its own colours
keeps them on a light page; one without follows the reader's light or dark mode.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, tzinfo
from email.utils import parsedate_to_datetime

from babel.dates import format_datetime
from flask import Flask
from flask_babel import gettext
from markupsafe import Markup, escape

from web import i18n
from web.prefs import Zone, current_zone

# CLDR patterns per language: (this year's day, an older day, the whole moment before its zone).
# English keeps the day-month order people here read ("3 Nov"); the others their own.
PATTERNS = {
    "en": ("d MMM", "d MMM y", "EEE d MMM y, HH:mm"),
    "fr": ("d MMM", "d MMM y", "EEE d MMM y, HH:mm"),
    "de": ("d. MMM", "d. MMM y", "EEE, d. MMM y, HH:mm"),
    "es": ("d MMM", "d MMM y", "EEE, d MMM y, HH:mm"),
}


def human_size(value: str | int) -> str:
    return size_texts()(value)


def size_texts(ugettext: Callable[[str], str] = gettext) -> Callable[[str | int], str]:
    """human_size with its three units translated once: a folder page shows fifty sizes, and
    each gettext is a walk through Flask-Babel's request context (issue 17).  `ugettext`: the
    request's catalogue's, when the caller has it."""
    units = (ugettext("%(n)s B"), ugettext("%(n)s KB"), ugettext("%(n)s MB"))

    def size(value: str | int) -> str:
        try:
            n = int(value)
        except (TypeError, ValueError):
            return ""
        if n < 1024:
            return units[0] % {"n": n}
        if n < 1024 * 1024:
            return units[1] % {"n": f"{n / 1024:.0f}"}
        return units[2] % {"n": f"{n / (1024 * 1024):.1f}"}

    return size


def _local(seconds: float, tz: tzinfo) -> datetime | None:
    try:
        return datetime.fromtimestamp(seconds, tz)
    except (OverflowError, OSError, ValueError):
        return None


def _seconds(ts_ms: str | int) -> float | None:
    try:
        return int(ts_ms) / 1000
    except (TypeError, ValueError):
        return None


def _zone_label(d: datetime) -> str:
    return d.tzname() or d.strftime("%z")


def _patterns() -> tuple[str, str, str]:
    return PATTERNS.get(i18n.current(), PATTERNS["en"])


def _long(d: datetime) -> str:
    """'Mon 23 Nov 2026, 18:30 JST' ('Mo., 23. Nov. 2026, 18:30 JST'): the whole moment, with its zone."""
    return f"{format_datetime(d, _patterns()[2], locale=i18n.locale())} {_zone_label(d)}"


def _short(d: datetime, today: datetime, zone: Zone) -> str:
    if d.date() == today.date():
        clock = f"{d.hour:02d}:{d.minute:02d}"
        return clock if zone.known else f"{clock} {_zone_label(d)}"
    this_year, older, _ = _patterns()
    return format_datetime(d, this_year if d.year == today.year else older, locale=i18n.locale())


def _time_element(d: datetime, text: str, long: str | None = None) -> Markup:
    """`long`: _long(d) when the caller has it (Babel's format is most of this element's cost)."""
    iso = d.isoformat(timespec="seconds")
    title = _long(d) if long is None else long
    return Markup('<time datetime="{}" title="{}">{}</time>').format(iso, title, text)


def short_date(ts_ms: str | int, now: float | None = None, zone: Zone | None = None) -> str:
    """The list's text for a delivery time (ms since the epoch): '14:05', '3 Nov', '3 Nov 2025'."""
    zone = zone or current_zone()
    seconds = _seconds(ts_ms)
    d = None if seconds is None else _local(seconds, zone.tz)
    today = _local(time.time() if now is None else now, zone.tz)
    if d is None or today is None:
        return ""
    return _short(d, today, zone)


def list_time(ts_ms: str | int, now: float | None = None, zone: Zone | None = None) -> Markup:
    """short_date as a `<time>` element, the full moment in its datetime and title."""
    zone = zone or current_zone()
    seconds = _seconds(ts_ms)
    d = None if seconds is None else _local(seconds, zone.tz)
    today = _local(time.time() if now is None else now, zone.tz)
    if d is None or today is None:
        return Markup("")
    return _time_element(d, _short(d, today, zone))


def list_times(values: list[str], now: float) -> list[Markup]:
    """list_time of a page of rows (issue 17), the same elements for a fraction of the cost: the
    zone read once, Babel asked once per distinct day (_DayTexts), each distinct minute's texts
    escaped once, and each row's element one f-string of those (Markup's `%` was a tenth of a
    folder page)."""
    zone = current_zone()
    today = _local(now, zone.tz)
    if today is None:
        return [Markup("") for _ in values]
    days = _DayTexts(today, zone)
    # minute -> (the datetime text before its seconds, after them, the short text, the long one):
    # escaped, as Jinja would.  Only minutes whose zone offset is whole minutes (any since the
    # LMT era): their local minute is the UTC minute, so the second is the epoch's.
    minutes: dict[int, tuple[str, str, str, str]] = {}
    out = []
    for value in values:
        seconds = _seconds(value)
        if seconds is None:
            out.append(Markup(""))
            continue
        second = int(seconds // 1)
        texts = minutes.get(second // 60)
        if texts is None:
            d = _local(seconds, zone.tz)
            if d is None:
                out.append(Markup(""))
                continue
            iso = d.isoformat(timespec="seconds")
            short, long = escape(days.short(d)), escape(days.long(d))
            if d.second != second % 60:
                out.append(Markup(f'<time datetime="{iso}" title="{long}">{short}</time>'))  # noqa: S704
                continue
            texts = minutes[second // 60] = (iso[:17], iso[19:], short, long)
        before, after, shown, title = texts
        # The iso text is digits and -:T+ only; the texts were escaped above.
        out.append(Markup(  # noqa: S704
            f'<time datetime="{before}{second % 60:02d}{after}" title="{title}">{shown}</time>'))
    return out


# The long pattern's clock, when it ends with it: the rest is formatted once per day.
_CLOCK = ", HH:mm"


class _DayTexts:
    """_short and _long of one page's times, Babel asked once per distinct local day: the
    date's words depend only on the day, and the clock ('HH:mm', ASCII digits in every
    language's pattern here) is written in as Babel writes it."""

    def __init__(self, today: datetime, zone: Zone) -> None:
        self.today, self.zone = today, zone
        self.patterns = _patterns()
        self.locale = i18n.locale()
        moment = self.patterns[2]
        self.day_pattern = moment[: -len(_CLOCK)] if moment.endswith(_CLOCK) else None
        self._short: dict[date, str] = {}
        self._long: dict[date, str] = {}

    def short(self, d: datetime) -> str:
        today, day = self.today, d.date()
        if day == today.date():
            return _short(d, today, self.zone)  # the clock: no Babel
        text = self._short.get(day)
        if text is None:
            this_year, older, _ = self.patterns
            text = self._short[day] = format_datetime(d, this_year if d.year == today.year else older,
                                                      locale=self.locale)
        return text

    def long(self, d: datetime) -> str:
        if self.day_pattern is None:
            return _long(d)
        day = d.date()
        words = self._long.get(day)
        if words is None:
            words = self._long[day] = format_datetime(d, self.day_pattern, locale=self.locale)
        return f"{words}, {d.hour:02d}:{d.minute:02d} {_zone_label(d)}"


def full_date(ts_ms: str | int, zone: Zone | None = None) -> Markup:
    seconds = _seconds(ts_ms)
    return epoch(seconds if seconds is not None else "", zone)


def epoch(value: object, zone: Zone | None = None) -> Markup:
    """Seconds since the epoch as a `<time>`: 'Mon 23 Nov 2026, 18:30 JST'."""
    zone = zone or current_zone()
    try:
        d = _local(float(str(value)), zone.tz)
    except (TypeError, ValueError):
        return Markup("")
    if d is None:
        return Markup("")
    long = _long(d)
    return _time_element(d, long, long)


def header_date(value: str | None, zone: Zone | None = None) -> Markup:
    """A Date: header in the reader's zone; a header that is not a date is shown as it is."""
    text = (value or "").strip()
    try:
        d = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return escape(text)
    if d.tzinfo is None:  # "-0000": the sender did not know its zone (RFC 5322 3.3); take UTC
        d = d.replace(tzinfo=UTC)
    return epoch(d.timestamp(), zone)


_NAME_ADDR = re.compile(r'^\s*"?([^"<]*?)"?\s*<([^<>]*)>\s*$')


def sender_name(value: str) -> str:
    """'Ann Example <ann@x.org>' -> 'Ann Example'; a bare address stays as it is.

    A regex rather than email.utils.parseaddr: this runs for every row of every
    folder page, and parseaddr costs as much as the rest of the row.
    """
    m = _NAME_ADDR.match(value or "")
    if m:
        return m.group(1).strip() or m.group(2).strip() or gettext("(no sender)")
    return (value or "").strip() or gettext("(no sender)")


# A colour a mail sets itself: CSS colours/backgrounds and the old HTML attributes.
_OWN_COLOURS = re.compile(
    r"(?:\b(?:bgcolor|text|link)\s*=|(?:^|[;\s\"'])(?:background-color|background|color)\s*:)", re.IGNORECASE)


def frame_scheme(html: str) -> str:
    """The message frame's `color-scheme`: 'light' keeps a mail's own colours on the white
    page they were chosen for; 'light dark' lets a colourless mail follow dark mode."""
    return "light" if _OWN_COLOURS.search(html or "") else "light dark"


def install(app: Flask) -> None:
    app.add_template_filter(human_size, "size")
    app.add_template_filter(short_date, "shortdate")
    app.add_template_filter(full_date, "fulldate")
    app.add_template_filter(sender_name, "sender")
    app.add_template_filter(epoch, "epoch")
    app.add_template_filter(header_date, "headerdate")
    app.add_template_filter(frame_scheme, "framescheme")
