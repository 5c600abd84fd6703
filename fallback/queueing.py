"""Redis scripts shared by the reliable queues (outbound and forward).

Both queues move work the same way: streams read through a consumer group,
a per-message lease (SET NX with a TTL, refreshed while working, released by
its owner only), and a retry zset per shard whose due members go back onto
the shard's stream.  Each script touches one slot.
"""

from __future__ import annotations

# Due members ("<id>\t<address>") of a retry zset go back onto their stream.
# KEYS: retry zset, stream; ARGV: now, batch size.
PROMOTE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  local tab = string.find(m, '\\t', 1, true)
  redis.call('XADD', KEYS[2], '*', 'a', string.sub(m, tab + 1), 'id', string.sub(m, 1, tab - 1))
  redis.call('ZREM', KEYS[1], m)
end
return #due
"""

# Extend a lease, only while we still own it.  KEYS: lease; ARGV: token, ttl ms.
REFRESH_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# Give a lease back, only if it is still ours.  KEYS: lease; ARGV: token.
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
