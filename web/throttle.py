"""Login throttling: growing delays per client network and per account, kept in Redis.

Every attempt is counted *before* its password is checked, in the same Lua
step that decides whether it may go ahead, so a burst of concurrent guesses
cannot all slip through before the first failure is written: an attempt is
"not known to be right" until it succeeds, and only a success takes it back.

Three kinds of counter (docs/webmail.md "Logins and sessions"):

- per client, whatever the account: the client's address (IPv4 /32, IPv6
  /64) after `login_source_failures`, its IPv4 /24 after four times that;
- per (client network, account): the client's /24 or /64 on one account,
  after `login_source_failures`;
- per account, from everywhere: after `login_account_failures`.  Networks
  that logged in to the account before (`known`) are not held by it, so
  guessing from elsewhere slows down the guessers, not the owner.

From the threshold on, each attempt doubles the wait before the next one is
even looked at (1 s, 2 s, 4 s ...), up to a cap: a delay, never a lockout.
A counter is forgotten WINDOW seconds after its last counted attempt.

Account counters are kept for addresses that do not exist too, so the
answers for a known and an unknown account look alike; text that is not an
address at all is throttled by client only.  The client and account hashes
live in different cluster slots: each script touches one slot only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from fallback import keys
from fallback.intake import clientlimits

SOURCE_MAX_DELAY = 300    # seconds: the longest wait of a guessing client
ACCOUNT_MAX_DELAY = 120   # seconds: the longest wait of everyone on an attacked account
WINDOW = 3600             # a counter is forgotten this long after its last counted attempt
KNOWN_FOR = 30 * 86400    # a network that logged in stays known this long
NETWORK_FACTOR = 4        # an IPv4 /24 may fail this many times more than one address

# KEYS[1] one client counter; ARGV now, threshold, window, cap.  -> seconds to wait (0: go ahead,
# counted).  Times are stored rounded down to the ms, so a wait is never over-stated.
_TAKE = """
local function at(t) return string.format('%.3f', math.floor(t * 1000) / 1000) end
local now, threshold = tonumber(ARGV[1]), tonumber(ARGV[2])
local untl = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
if untl > now then return math.ceil(untl - now) end
local n = redis.call('HINCRBY', KEYS[1], 'fails', 1)
if n >= threshold then
  local delay = math.min(tonumber(ARGV[4]), 2 ^ (n - threshold))
  redis.call('HSET', KEYS[1], 'until', at(now + delay))
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 0
"""

# KEYS[1] one client counter; ARGV threshold.  An attempt taken back (right password, or never checked).
_GIVE_BACK = """
local n = redis.call('HINCRBY', KEYS[1], 'fails', -1)
if n <= 0 then redis.call('DEL', KEYS[1])
elseif n < tonumber(ARGV[1]) then redis.call('HDEL', KEYS[1], 'until') end
return n
"""

# KEYS[1] the account's hash, KEYS[2] its known networks; ARGV now, network, per-network
# threshold, account threshold, window, network cap, account cap, known_for.
# -> {seconds to wait (0: go ahead, counted), 1 when the account-wide delay held it}
_TAKE_ACCOUNT = """
local function at(t) return string.format('%.3f', math.floor(t * 1000) / 1000) end
local now, net = tonumber(ARGV[1]), ARGV[2]
local s, a = tonumber(ARGV[3]), tonumber(ARGV[4])
local fk, uk = 'f:' .. net, 'u:' .. net
local v = redis.call('HMGET', KEYS[1], 'until', uk)
local au, nu = tonumber(v[1] or '0'), tonumber(v[2] or '0')
if nu > now then return {math.ceil(nu - now), 0} end
local seen = redis.call('HGET', KEYS[2], net)
local known = seen and (now - tonumber(seen)) < tonumber(ARGV[8])
if au > now and not known then return {math.ceil(au - now), 1} end
local n = redis.call('HINCRBY', KEYS[1], fk, 1)
if n >= s then
  redis.call('HSET', KEYS[1], uk, at(now + math.min(tonumber(ARGV[6]), 2 ^ (n - s))))
end
local m = redis.call('HINCRBY', KEYS[1], 'fails', 1)
if m >= a then
  redis.call('HSET', KEYS[1], 'until', at(now + math.min(tonumber(ARGV[7]), 2 ^ (m - a))))
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {0, 0}
"""

# KEYS as above; ARGV network, per-network threshold, account threshold, now, known_for,
# "ok" (right password: forget this network's count, remember it as known) or "undo".
_GIVE_BACK_ACCOUNT = """
local net, s, a = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local fk, uk = 'f:' .. net, 'u:' .. net
local m = redis.call('HINCRBY', KEYS[1], 'fails', -1)
if m <= 0 then redis.call('HDEL', KEYS[1], 'fails', 'until')
elseif m < a then redis.call('HDEL', KEYS[1], 'until') end
if ARGV[6] == 'ok' then
  redis.call('HDEL', KEYS[1], fk, uk)
  local now, keep = tonumber(ARGV[4]), tonumber(ARGV[5])
  local all = redis.call('HGETALL', KEYS[2])
  for i = 1, #all, 2 do
    if now - tonumber(all[i + 1]) >= keep then redis.call('HDEL', KEYS[2], all[i]) end
  end
  redis.call('HSET', KEYS[2], net, string.format('%.3f', now))
  redis.call('EXPIRE', KEYS[2], math.floor(keep))
else
  local n = redis.call('HINCRBY', KEYS[1], fk, -1)
  if n <= 0 then redis.call('HDEL', KEYS[1], fk, uk)
  elseif n < s then redis.call('HDEL', KEYS[1], uk) end
end
return m
"""


def client_prefixes(ip: str) -> tuple[str, str]:
    """(the client, its network), as the SMTP limits see them (fallback.intake.clientlimits):
    IPv4 "192.0.2.7/32" and "192.0.2.0/24", IPv6 "2001:db8::/64" twice (one IPv6
    subscriber gets a /64); IPv4-mapped IPv6 counts as IPv4.  Text that is not an address
    (a test client, a Unix socket) is its own client."""
    found = clientlimits.prefixes(ip.strip()[:64] or "unknown")
    return found[0], found[-1]


@dataclass
class Attempt:
    """One log-in attempt: how long it must wait (0: it was counted and may go ahead)."""
    ip: str
    account: str | None
    wait: int = 0
    account_wide: bool = False  # held by the account-wide delay, not by its own client's
    counted: list[tuple[str, int]] = field(default_factory=list)  # client keys, thresholds
    account_counted: bool = False


class LoginThrottle:
    def __init__(self, r: redis.Redis, source_failures: int = 5, account_failures: int = 50,
                 clock: Callable[[], float] = time.time) -> None:
        self.r = r
        self.clock = clock  # the scripts get the time from here, not from Redis: one clock
        self.source = source_failures
        self.account = account_failures
        self._take = r.register_script(_TAKE)
        self._give_back = r.register_script(_GIVE_BACK)
        self._take_account = r.register_script(_TAKE_ACCOUNT)
        self._give_back_account = r.register_script(_GIVE_BACK_ACCOUNT)

    def _client_counters(self, ip: str) -> list[tuple[str, int]]:
        client, network = client_prefixes(ip)
        counters = [(keys.login_throttle("src", client), self.source)]
        if network != client:
            counters.append((keys.login_throttle("src", network), self.source * NETWORK_FACTOR))
        return counters

    def attempt(self, ip: str, account: str | None, now: float | None = None) -> Attempt:
        """Count this attempt, or say how long to wait; account None: not an address."""
        now = self.clock() if now is None else now
        att = Attempt(ip, account)
        for key, threshold in self._client_counters(ip):
            wait = int(self._take(keys=[key], args=[repr(now), threshold, WINDOW, SOURCE_MAX_DELAY]))
            if wait:
                att.wait = wait
                self._undo_clients(att)
                return att
            att.counted.append((key, threshold))
        if account is not None:
            wait, wide = self._take_account(
                keys=self._account_keys(account),
                args=[repr(now), client_prefixes(ip)[1], self.source, self.account, WINDOW,
                      SOURCE_MAX_DELAY, ACCOUNT_MAX_DELAY, KNOWN_FOR])
            if int(wait):
                att.wait, att.account_wide = int(wait), bool(int(wide))
                self._undo_clients(att)
                return att
            att.account_counted = True
        return att

    def _account_keys(self, account: str) -> list[str]:
        return [keys.login_throttle("acct", account), keys.login_known_networks(account)]

    def _undo_clients(self, att: Attempt) -> None:
        for key, threshold in att.counted:
            self._give_back(keys=[key], args=[threshold])
        att.counted = []

    def _undo_account(self, att: Attempt, how: str, now: float) -> None:
        if att.account is not None and att.account_counted:
            self._give_back_account(keys=self._account_keys(att.account),
                                    args=[client_prefixes(att.ip)[1], self.source, self.account,
                                          repr(now), KNOWN_FOR, how])
            att.account_counted = False

    def succeeded(self, att: Attempt, now: float | None = None) -> None:
        """The right password: the attempt is taken back and the client's network becomes
        known to the account.  Its client counters keep their other failures, otherwise
        one valid account would reset the throttle for guessing others."""
        now = self.clock() if now is None else now
        self._undo_clients(att)
        self._undo_account(att, "ok", now)

    def not_checked(self, att: Attempt) -> None:
        """The password was never checked (the hashing pool was full): not a guess."""
        self._undo_clients(att)
        self._undo_account(att, "undo", self.clock())
