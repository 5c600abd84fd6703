"""Per-user limits on mail sent from the webmail: recipients per rolling hour and per rolling day.

A stolen webmail password must not turn the provider's smarthost (and its
DKIM signature) into a spam cannon during the outage.  Each user's sends are
one sorted set in the user's own slot (keys.send_log): a member
"<msg_id>:<recipients>" per message, scored by when it was sent (ms).  One Lua
script trims what is older than the longest window, sums both windows and adds
the message only if it fits both, so two sends at the edge cannot both pass.
The set holds at most `per_day` members (each counts at least one recipient).

A refused send adds nothing.  A send counted here that then fails before it is
filed gives its count back (`refund`).  Windows are rolling, not calendar
hours: the answer says exactly when enough of the oldest sends leave the
window for this message to fit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from fallback import keys

HOUR, DAY = 3600.0, 86400.0
WINDOWS = {"hour": HOUR, "day": DAY}

# KEYS: send log, alert marker (hour), alert marker (day).
# ARGV: now ms, recipients, member, per-hour limit, per-day limit, ms to keep.
# {1}: counted.  {0, window index, used, ms when it fits, 1 when this is the first refusal in the window}.
_RESERVE = """
local now, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local keep = tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - keep)
local function count(member) return tonumber(string.match(member, ':(%d+)$')) or 0 end
local windows = {{3600000, tonumber(ARGV[4])}, {86400000, tonumber(ARGV[5])}}
for i, w in ipairs(windows) do
  local span, limit = w[1], w[2]
  if limit > 0 then
    local entries = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (now - span), '+inf', 'WITHSCORES')
    local used = 0
    for j = 1, #entries, 2 do used = used + count(entries[j]) end
    if used + n > limit then
      local need, freed, at = used + n - limit, 0, now + span
      for j = 1, #entries, 2 do
        freed = freed + count(entries[j])
        if freed >= need then at = tonumber(entries[j + 1]) + span break end
      end
      local first = redis.call('SET', KEYS[i + 1], '1', 'NX', 'PX', math.max(math.floor(at - now), 1))
      return {0, i, used, at, first and 1 or 0}
    end
  end
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], keep)
return {1}
"""


@dataclass(frozen=True)
class Limits:
    """Recipients per rolling hour and per rolling day; 0: no limit for that window."""

    per_hour: int
    per_day: int

    @property
    def active(self) -> bool:
        return self.per_hour > 0 or self.per_day > 0

    def keep(self) -> float:
        """How long a send must be remembered: the longest window that has a limit."""
        return DAY if self.per_day > 0 else HOUR

    def of(self, window: str) -> int:
        return self.per_hour if window == "hour" else self.per_day


@dataclass(frozen=True)
class Refusal:
    """Why a send does not fit: which window, its limit, what was already sent in it, and when."""

    window: str               # "hour" or "day"
    limit: int
    used: int                 # recipients sent to in the window before this message
    wanted: int               # this message's recipients
    retry_at: float | None    # epoch seconds when it fits; None: it never will (wanted > limit)
    first: bool               # the first refusal of this user in this window: alert the operator


def _member(msg_id: str, recipients: int) -> str:
    return f"{msg_id}:{recipients}"


def reserve(r: redis.Redis, user: str, msg_id: str, recipients: int, limits: Limits,
            now: float | None = None) -> Refusal | None:
    """Count `recipients` for this message if they fit both windows (None), else say why not."""
    if not limits.active or recipients <= 0:
        return None
    for window in WINDOWS:
        limit = limits.of(window)
        if 0 < limit < recipients:
            return Refusal(window, limit, 0, recipients, None, first=False)
    now = time.time() if now is None else now
    got: Any = r.eval(_RESERVE, 3, keys.send_log(user), keys.send_limit_alerted(user, "hour"),
                      keys.send_limit_alerted(user, "day"), int(now * 1000), recipients,
                      _member(msg_id, recipients), limits.per_hour, limits.per_day,
                      int(limits.keep() * 1000))
    if int(got[0]) == 1:
        return None
    window = ("hour", "day")[int(got[1]) - 1]
    return Refusal(window, limits.of(window), int(got[2]), recipients, int(got[3]) / 1000,
                   first=bool(int(got[4])))


def refund(r: redis.Redis, user: str, msg_id: str, recipients: int) -> None:
    """A counted send that was not filed after all (storage trouble): it does not count."""
    r.zrem(keys.send_log(user), _member(msg_id, recipients))


def used(r: redis.Redis, user: str, now: float | None = None) -> dict[str, int]:
    """Recipients this user sent to in the last hour and the last day."""
    now = time.time() if now is None else now
    members: Any = r.zrangebyscore(keys.send_log(user), f"({int((now - DAY) * 1000)}", "+inf",
                                   withscores=True)
    out = dict.fromkeys(WINDOWS, 0)
    for member, score in members:
        n = int(member.decode().rpartition(":")[2] or 0)
        for window, span in WINDOWS.items():
            if score > (now - span) * 1000:
                out[window] += n
    return out
