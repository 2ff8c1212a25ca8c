"""The Lua scripts of the admission queue: every state change is one atomic script.

Per model ``m`` (all keys share the hash tag ``{<prefix>:m}``):

- ``wait``  ZSET ticket -> score: ``rank * LANE + start_tag`` (priority lane first, then
  start-time fair queuing between tenants, then arrival: ticket ids sort by arrival);
- ``meta``  HASH ticket -> JSON {t: tenant, d: deadline ms, s: start tag, r: rank};
- ``leases`` ZSET ticket -> lease expiry (ms): granted requests; its size is the capacity in use;
- ``lease_tenant`` HASH ticket -> tenant;
- ``vt``    HASH ``<tenant>:<rank>`` -> the tenant's last finish tag, ``now:<rank>`` -> the
  lane's virtual time (start tag of the last admitted ticket);
- ``rejected`` HASH ticket -> reason, for waiters whose ticket was dropped (deadline passed);
- ``stats`` HASH: ``expired`` (leases that expired un-released), ``ewma_ms`` (service time);
- channel ``grants``: space-separated tickets granted by a script, for waiting gateways.

Per tenant, ``active`` ZSET ticket -> expiry counts its queued and running requests.

Start-time fair queuing: a ticket's start tag is ``max(lane virtual time, the tenant's last
finish tag)`` and its finish tag ``start + 1/weight``; the lane serves the smallest start
tag first. A tenant with weight 3 gets three starts for every one of a weight-1 tenant
while both are backlogged, and an idle tenant banks no credit.
"""

from __future__ import annotations

__all__ = ["CANCEL", "CHECK", "ENQUEUE", "LANE", "RELEASE", "RENEW"]

LANE = 1e12

_ADMIT = """
local function admit(W, M, L, LT, V, R, S, now, cap, ttl, maxg, channel)
  local expired = redis.call('ZRANGEBYSCORE', L, '-inf', now)
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', L, '-inf', now)
    for _, t in ipairs(expired) do redis.call('HDEL', LT, t) end
    redis.call('HINCRBY', S, 'expired', #expired)
  end
  local used = redis.call('ZCARD', L)
  local granted = {}
  while used < cap and #granted < maxg do
    local top = redis.call('ZRANGE', W, 0, 0)
    if #top == 0 then break end
    local t = top[1]
    redis.call('ZREM', W, t)
    local raw = redis.call('HGET', M, t)
    redis.call('HDEL', M, t)
    local meta = raw and cjson.decode(raw) or {}
    if meta.d and meta.d > 0 and now > meta.d then
      redis.call('HSET', R, t, 'deadline')
    else
      redis.call('ZADD', L, now + ttl, t)
      redis.call('HSET', LT, t, meta.t or '')
      local lane = 'now:' .. tostring(meta.r or 0)
      local cur = tonumber(redis.call('HGET', V, lane) or '0')
      if meta.s and meta.s > cur then redis.call('HSET', V, lane, meta.s) end
      used = used + 1
      granted[#granted + 1] = t
    end
  end
  if #granted > 0 then redis.call('PUBLISH', channel, table.concat(granted, ' ')) end
  return granted
end
"""

# KEYS: wait meta leases lease_tenant vt rejected stats tenant_active
# ARGV: ticket tenant rank weight deadline_ms now_ms capacity ttl_ms max_grants
#       tenant_limit channel lane
# -> {status, position, depth}: status 1 granted, 0 waiting, -1 tenant concurrency limit
ENQUEUE = (
    _ADMIT
    + """
local W, M, L, LT, V, R, S, TA = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local ticket, tenant = ARGV[1], ARGV[2]
local rank, weight = tonumber(ARGV[3]), tonumber(ARGV[4])
local deadline, now = tonumber(ARGV[5]), tonumber(ARGV[6])
local cap, ttl, maxg = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local limit, channel, lanew = tonumber(ARGV[10]), ARGV[11], tonumber(ARGV[12])
redis.call('ZREMRANGEBYSCORE', TA, '-inf', now)
if limit > 0 and redis.call('ZCARD', TA) >= limit then return {-1, 0, redis.call('ZCARD', W)} end
redis.call('ZADD', TA, now + ttl, ticket)
redis.call('PEXPIRE', TA, ttl * 4)
local lane = tostring(rank)
local vnow = tonumber(redis.call('HGET', V, 'now:' .. lane) or '0')
local last = tonumber(redis.call('HGET', V, tenant .. ':' .. lane) or '0')
local start = math.max(vnow, last)
redis.call('HSET', V, tenant .. ':' .. lane, start + 1.0 / weight)
redis.call('ZADD', W, rank * lanew + start, ticket)
redis.call('HSET', M, ticket, cjson.encode({t = tenant, d = deadline, s = start, r = rank}))
admit(W, M, L, LT, V, R, S, now, cap, ttl, maxg, channel)
if redis.call('ZSCORE', L, ticket) then return {1, 0, redis.call('ZCARD', W)} end
return {0, redis.call('ZRANK', W, ticket), redis.call('ZCARD', W)}
"""
)

# KEYS: as ENQUEUE;  ARGV: ticket now_ms capacity ttl_ms max_grants channel
# -> 1 granted, 0 waiting, -2 rejected (deadline), -3 unknown (lost: Redis restarted)
CHECK = (
    _ADMIT
    + """
local W, M, L, LT, V, R, S = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local t, now = ARGV[1], tonumber(ARGV[2])
admit(W, M, L, LT, V, R, S, now, tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6])
if redis.call('ZSCORE', L, t) then return 1 end
if redis.call('ZSCORE', W, t) then return 0 end
if redis.call('HGET', R, t) then redis.call('HDEL', R, t); return -2 end
return -3
"""
)

# KEYS: as ENQUEUE;  ARGV: ticket now_ms capacity ttl_ms max_grants channel service_ms
# -> number of tickets granted by the freed capacity
RELEASE = (
    _ADMIT
    + """
local W, M, L, LT, V, R, S, TA = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local t, now = ARGV[1], tonumber(ARGV[2])
redis.call('ZREM', L, t)
redis.call('HDEL', LT, t)
redis.call('ZREM', TA, t)
local service = tonumber(ARGV[7])
if service >= 0 then
  local old = tonumber(redis.call('HGET', S, 'ewma_ms') or '-1')
  if old < 0 then old = service end
  redis.call('HSET', S, 'ewma_ms', 0.8 * old + 0.2 * service)
end
local g = admit(W, M, L, LT, V, R, S, now, tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6])
return #g
"""
)

# KEYS: as ENQUEUE;  ARGV: ticket now_ms capacity ttl_ms max_grants channel
# -> 1 removed while waiting, 2 it had been granted (and is now released), 0 unknown
CANCEL = (
    _ADMIT
    + """
local W, M, L, LT, V, R, S, TA = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local t, now = ARGV[1], tonumber(ARGV[2])
redis.call('ZREM', TA, t)
redis.call('HDEL', R, t)
if redis.call('ZREM', W, t) == 1 then redis.call('HDEL', M, t); return 1 end
if redis.call('ZREM', L, t) == 1 then
  redis.call('HDEL', LT, t)
  admit(W, M, L, LT, V, R, S, now, tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6])
  return 2
end
return 0
"""
)

# KEYS: leases lease_tenant tenant_active;  ARGV: ticket tenant expiry_ms ttl_ms
# Re-adds the lease when it is missing (Redis restarted, or admitted locally while
# Redis was away), so capacity accounting comes back with Redis.
RENEW = """
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[4]) * 4)
return 1
"""
