"""The reader's display preferences that come from the browser: for now, their time zone.

web/static/tz.js stores the browser's zone (`Intl.DateTimeFormat().resolvedOptions().timeZone`)
in the `tz` cookie, a session cookie: it lives as long as the browser session and carries
nothing secret.  Each request reads it here; a name zoneinfo does not know (or one too long
or oddly spelt to be a zone) is ignored, and the pages then say that their times are UTC.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from flask import Flask, g, has_app_context, request

COOKIE = "tz"
UTC = ZoneInfo("UTC")
# IANA names: letters, digits and _+-/ ("America/Argentina/Buenos_Aires", "Etc/GMT+5").
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+){0,3}$")


@dataclass(frozen=True)
class Zone:
    tz: tzinfo
    name: str
    # False until the browser told us its zone: the pages then label their times "UTC".
    known: bool


def parse_zone(name: str | None) -> Zone | None:
    """The zone named `name`, or None when it is not a zone zoneinfo knows."""
    if not name or len(name) > 64 or not _NAME.match(name):
        return None
    try:
        return Zone(ZoneInfo(name), name, True)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def current_zone() -> Zone:
    """This request's zone (set before each request); UTC, labelled so, outside a request."""
    zone = g.get("zone") if has_app_context() else None
    return zone if isinstance(zone, Zone) else Zone(UTC, "UTC", False)


def _read_cookie() -> None:
    g.zone = parse_zone(request.cookies.get(COOKIE)) or Zone(UTC, "UTC", False)


def install(app: Flask) -> None:
    app.before_request(_read_cookie)

    @app.context_processor
    def _inject() -> dict[str, object]:
        zone = current_zone()
        # tz.js reloads a page shown in another zone than the browser's, once, and only a GET.
        return {"tz_name": zone.name if zone.known else "", "tz_reloadable": request.method == "GET"}
