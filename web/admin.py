"""The admin HTTP API for resellers' and operators' tools: /admin/api/status and /admin/api/affected.

Every request needs `Authorization: Bearer TOKEN`: the configured
admin_token (or admin_token_file), which sees everything, or a reseller token
(`fallback token create`, fallback.ops.tokens), which sees only its domains
on these two endpoints and gets 403 on every other admin endpoint.  Without
a configured admin token the API is off (403) except for reseller tokens; a
missing, wrong, expired or revoked token is 401, counted in /metrics
(fallback_admin_auth_failures_total by reason), and a client prefix with
too many failures in a row gets 429 for a while (the brute-force guard).
`check_token` is the one place that decides who a token is (the admin
console's log-in uses it too).  The API never reads or sets a cookie, so a
logged-in browser cannot be tricked into calling it (no CSRF), and it
answers only GET.  Errors are JSON: `{"error": "..."}`.

`affected` for the admin token without paging parameters streams its JSON
array row by row (millions of mailboxes) in the same shape as `fallback
affected --format json`.  With `limit`/`cursor` (always, for a reseller
token) it answers one page: `{"mailboxes": [...], "next_cursor": ...}`
(fallback.ops.reseller.affected_page).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from fallback import keys
from fallback.errors import InputError
from fallback.mailbox.directory import Mailbox, check_mailstore
from fallback.mailbox.store import mailstore_stats
from fallback.ops import failover, health, metrics, reseller, tokens
from web.context import state
from web.throttle import client_prefixes

bp = Blueprint("admin", __name__, url_prefix="/admin/api")

# The brute-force guard: this many failed tokens from one client prefix within the window,
# then 429 until the window ends.  A real token holder rarely fails more than a few times.
GUARD_FAILURES = 20
GUARD_WINDOW = 600
RESELLER_ENDPOINTS = frozenset({"admin.status", "admin.affected"})
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="fallback admin"'}
MESSAGES = {
    "off": "the admin API is off: set admin_token or admin_token_file",
    "missing": "missing token: send Authorization: Bearer TOKEN",
    "throttled": "too many wrong tokens from your address: try again in {wait} seconds",
    "reseller": "a reseller token may only read /admin/api/status and /admin/api/affected",
}


def json_error(code: int, text: str, **headers: str) -> Response:
    response = jsonify({"error": text})
    response.status_code = code
    response.headers.update(headers)
    return response


def _refused(reason: str, code: int, text: str, **headers: str) -> Response:
    state().counters.add(metrics.ADMIN_AUTH_FAILURES, reason=reason)
    return json_error(code, text, **headers)


def check_token(given: str, client: str) -> tokens.Principal | Response:
    """Who this token is (the admin or a reseller), or the error response to send.

    Counts every refusal in /metrics and each wrong token against the client's
    prefix; a client past the guard is refused before its token is looked at.
    """
    st = state()
    guard = keys.admin_auth_failures(client_prefixes(client)[0])
    failures: Any = st.r.get(guard)
    if int(failures or 0) >= GUARD_FAILURES:
        ttl: Any = st.r.ttl(guard)
        wait = max(int(ttl), 1)
        return _refused("throttled", 429, MESSAGES["throttled"].format(wait=wait),
                        **{"Retry-After": str(wait)})
    found = tokens.authenticate(st.r, given, st.admin_token)
    if isinstance(found, tokens.Principal):
        return found
    if st.admin_token is None and found.reason == "wrong":
        return json_error(403, MESSAGES["off"])
    with st.r.pipeline(transaction=True) as pipe:
        pipe.incr(guard)
        pipe.expire(guard, GUARD_WINDOW, nx=True)
        pipe.execute()
    return _refused(found.reason, 401, found.text, **CHALLENGE)


@bp.before_request
def _authorize() -> Response | None:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        if state().admin_token is None:
            return json_error(403, MESSAGES["off"])
        return _refused("missing", 401, MESSAGES["missing"], **CHALLENGE)
    found = check_token(given.strip(), request.remote_addr or "unknown")
    if isinstance(found, Response):
        return found
    if not found.is_admin and request.endpoint not in RESELLER_ENDPOINTS:
        return json_error(403, MESSAGES["reseller"])
    g.admin_principal = found
    return None


def principal() -> tokens.Principal:
    who: tokens.Principal = g.admin_principal
    return who


@bp.get("/status")
def status() -> Any:
    r = state().r
    who = principal()
    if who.domains is not None:
        return jsonify({"token": {"name": who.name, "domains": sorted(who.domains)},
                        "domains": reseller.domain_status(r, who.domains)})
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


def _fields(m: Mailbox) -> dict[str, str]:
    return {"address": m.address, "domain": m.domain, "mailstore": m.mailstore, "alternate": m.alternate}


def _row(m: Mailbox) -> str:
    return json.dumps(_fields(m))


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
    st, who = state(), principal()
    try:
        only = [check_mailstore(n) for n in request.args.getlist("mailstore")]
        paged = who.domains is not None or "limit" in request.args or "cursor" in request.args
        directory = st.directory()
        limit, bucket, offset = reseller.parse_paging(request.args.get("limit"), request.args.get("cursor"),
                                                      directory.buckets)
    except InputError as exc:
        return json_error(400, exc.reason)
    scope = failover.read(st.r)
    if paged:
        page = reseller.affected_page(directory, scope, who.domains, only or None, limit, bucket, offset)
        response = jsonify({"mailboxes": [_fields(m) for m in page.rows], "next_cursor": page.next_cursor})
    else:
        rows = failover.iter_affected(directory, scope, only or None)
        # The first rows are read here, so a Redis failure is a 503, not a cut-off document.
        first = next(rows, None)
        response = Response(_stream(first, rows), mimetype="application/json")
    if who.is_admin:
        response.headers["X-Failover-Scope"] = scope.describe()  # names every mailstore: admin only
    return response
