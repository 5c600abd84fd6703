"""The admin HTTP API for resellers' and operators' tools: /admin/api/status and /admin/api/affected.

Every request needs `Authorization: Bearer TOKEN` with the configured
admin_token (or admin_token_file), compared in constant time.  Without a
configured token the API is off and says so (403); a missing or wrong token
is 401.  The API never reads or sets a cookie, so a logged-in browser cannot
be tricked into calling it (no CSRF), and it answers only GET.  Errors are
JSON: `{"error": "..."}`.

`affected` streams its JSON array row by row (millions of mailboxes) in the
same shape as `fallback affected --format json`; the scope is read once, so
one answer is one consistent list.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, request

from fallback.errors import InputError
from fallback.mailbox.directory import Mailbox, check_mailstore
from fallback.mailbox.store import mailstore_stats
from fallback.ops import failover, health
from web.context import state

bp = Blueprint("admin", __name__, url_prefix="/admin/api")

def json_error(code: int, text: str, **headers: str) -> Response:
    response = jsonify({"error": text})
    response.status_code = code
    response.headers.update(headers)
    return response


@bp.before_request
def _authorize() -> Response | None:
    expected = state().admin_token
    if expected is None:
        return json_error(403, "the admin API is off: set admin_token or admin_token_file")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": 'Bearer realm="fallback admin"'}
    if scheme.lower() != "bearer" or not given.strip():
        return json_error(401, "missing token: send Authorization: Bearer TOKEN", **challenge)
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        return json_error(401, "wrong token", **challenge)
    return None


@bp.get("/status")
def status() -> Any:
    r = state().r
    scope = failover.read(r)
    provisioned = state().directory().mailstores()
    stored = mailstore_stats(r)
    now_ms = health.redis_now_ms(r)
    mailstores = {
        name: {"mailboxes": provisioned.get(name, 0),
               "messages": stored.get(name, {}).get("messages", 0),
               "bytes": stored.get(name, {}).get("bytes", 0),
               "failed_over": scope.covers(name)}
        for name in sorted(set(provisioned) | set(stored) | set(scope.mailstores))}
    queues = {b.name: {"depth": b.depth, "oldest_age_seconds": round(b.age(now_ms), 3), "dead": b.dead}
              for b in health.backlogs(r)}
    return jsonify({"scope": scope.as_dict(), "affected": failover.affected_count(scope, provisioned),
                    "mailstores": mailstores, "queues": queues, "redis": health.redis_health(
                        r, state().settings.memory_reserve, state().settings.replica_acks)})


def _row(m: Mailbox) -> str:
    return json.dumps({"address": m.address, "domain": m.domain, "mailstore": m.mailstore,
                       "alternate": m.alternate})


def _stream(first: Mailbox | None, rest: Iterator[Mailbox]) -> Iterator[str]:
    if first is None:
        yield "[]\n"
        return
    yield "[\n" + _row(first)
    for m in rest:
        yield ",\n" + _row(m)
    yield "\n]\n"


@bp.get("/affected")
def affected() -> Any:
    try:
        only = [check_mailstore(n) for n in request.args.getlist("mailstore")]
    except InputError as exc:
        return json_error(400, exc.reason)
    st = state()
    scope = failover.read(st.r)
    rows = failover.iter_affected(st.directory(), scope, only or None)
    # The first rows are read here, so a Redis failure is a 503, not a cut-off document.
    first = next(rows, None)
    response = Response(_stream(first, rows), mimetype="application/json")
    response.headers["X-Failover-Scope"] = scope.describe()
    return response
