"""The console's dashboard and its affected-users pages (search, paging, CSV download).

The figures come from fallback.ops.overview, which reads only what is kept
up to date as mail flows.  The affected-users list is one page of the
directory per request (a cursor in the link to the next page), however many
users are provisioned; the CSV download streams every affected mailbox
matching the search, row by row, without holding them.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Iterator
from typing import Any

from flask import Response, render_template, request

from fallback.errors import InputError
from fallback.mailbox.directory import Mailbox
from fallback.ops import failover
from fallback.ops import overview as figures
from web.console import bp
from web.console.format import ago, size, when
from web.context import state

PAGE = 50
COLUMNS = ("address", "domain", "mailstore", "alternate")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet would run these as formulas


@bp.get("/")
def dashboard() -> Any:
    st = state()
    d = figures.dashboard(st.r, st.directory(), st.settings.memory_reserve)
    return render_template("admin/dashboard.html", d=d, ago=ago, when=when, size=size,
                           queues=figures.queue_ages(d.queues, d.now_ms))


@bp.get("/affected")
def affected() -> Any:
    st = state()
    raw_q = request.args.get("q", "")
    cursor = request.args.get("cursor") or None
    try:
        q = figures.check_query(raw_q)
        page = figures.search_page(st.directory(), failover.read(st.r), q, PAGE, cursor)
    except InputError as exc:
        return Response(render_template("admin/affected.html", q=raw_q[:figures.MAX_QUERY], rows=[],
                                        next_cursor=None, error=exc.reason, cursor=None), 400)
    return render_template("admin/affected.html", q=q, rows=page.rows, next_cursor=page.next_cursor,
                           error=None, cursor=cursor)


def _cell(value: str) -> str:
    return "'" + value if value.startswith(FORMULA_START) else value


def _csv_rows(first: Mailbox | None, rest: Iterator[Mailbox]) -> Iterator[str]:
    """The header, then one line per mailbox (a chunk each: nothing is held)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    rows = rest if first is None else itertools.chain([first], rest)
    for m in rows:
        writer.writerow([_cell(m.address), _cell(m.domain), _cell(m.mailstore), _cell(m.alternate)])
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
    if buf.getvalue():
        yield buf.getvalue()


@bp.get("/affected.csv")
def affected_csv() -> Any:
    st = state()
    try:
        q = figures.check_query(request.args.get("q", ""))
    except InputError as exc:
        return Response(exc.reason + "\n", 400, mimetype="text/plain")
    rows = (m for m in failover.iter_affected(st.directory(), failover.read(st.r)) if m.address.startswith(q))
    first = next(rows, None)  # read here: a Redis failure is a 503 page, not a cut-off file
    response = Response(_csv_rows(first, rows), mimetype="text/csv")
    response.headers["Content-Disposition"] = 'attachment; filename="affected.csv"'
    return response
