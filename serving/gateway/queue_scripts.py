"""The Lua scripts of the admission queue: every state change is one atomic script.

Per model ``m`` (all keys share the hash tag ``{<prefix>:m}``):

- ``wait``  ZSET ticket -> score: ``rank * LANE + start_tag`` (priority lane first, then
  start-time fair queuing between tenants, then arrival: ticket ids sort by arrival);
- ``meta``  HASH ticket -> JSON {t: tenant, d: drop time ms, s: start tag, r: rank, w:
  weight}; the drop time is the request's deadline, or its arrival plus the longest queue
  wait: no ticket waits forever (``d`` 0: none, from gateways of earlier versions); the
  weight is the capacity slots the request needs (the sequences it runs, ``n x prompts``;
  absent: 1);
- ``hb``    ZSET ticket -> heartbeat expiry (ms) of a waiting ticket: its gateway renews it
  (every third of the heartbeat timeout, all its waiting tickets in one round trip, and
  at every check of the ticket). A ticket whose heartbeat expired belongs to a gateway
  that is gone: it is dropped, never granted (the way Redis Streams reclaims a dead
  consumer's idle entries), so a dead gateway's queued requests take no capacity. A
  waiting ticket without an entry (enqueued by an earlier version) is granted as before;
- ``leases`` ZSET ticket -> lease expiry (ms): granted requests;
- ``lease_weight`` HASH ticket -> weight, for leases of more than one slot. The capacity in
  use is ``ZCARD leases`` plus ``weight - 1`` per entry (an entry whose lease is gone is
  dropped when it is counted). A ticket is granted only when its weight fits in the free
  capacity (a weight above the capacity counts as the capacity: it runs alone), and the
  head of the wait set waits for its slots: nothing overtakes it. Gateways of earlier
  versions count one slot per lease;
- ``lease_tenant`` HASH ticket -> tenant;
- ``released`` ZSET ticket -> expiry (ms) of a tombstone written when a lease is released
  or cancelled: a renewal of that lease still on its way (sent in the same batch, or on
  another connection) finds it and does not bring the lease back. A tombstone lives as
  long as the lease would have;
- ``vt``    HASH ``<tenant>:<rank>`` -> the tenant's last finish tag, ``now:<rank>`` -> the
  lane's virtual time (start tag of the last admitted ticket);
- ``rejected`` HASH ticket -> reason, for waiters whose ticket was dropped (drop time passed);
- ``stats`` HASH: ``expired`` (leases that expired un-released), ``abandoned`` (waiting
  tickets dropped because their heartbeat expired), ``ewma_ms`` (service time);
- channel ``grants``: space-separated tickets granted by a script, for waiting gateways.

Per tenant, ``active`` ZSET ticket -> expiry counts its queued and running requests
(``max_concurrent_requests``): a waiting ticket's entry lives as long as its heartbeat,
a lease's as long as the lease, and both are renewed with them.

Start-time fair queuing: a ticket's start tag is ``max(lane virtual time, the tenant's last
finish tag)`` and its finish tag ``start + slots/weight``; the lane serves the smallest start
tag first. A tenant with weight 3 gets three starts for every one of a weight-1 tenant
while both are backlogged, a request of four slots costs its tenant four starts, and an
idle tenant banks no credit.

Times are the calling gateway's clock (``now_ms`` in ARGV), as for lease expiries.
"""

from __future__ import annotations

__all__ = ["CANCEL", "CHECK", "ENQUEUE", "HOLD", "LANE", "RELEASE", "RENEW", "RENEW_BATCH"]

LANE = 1e12

RENEW_BATCH = 256
"""Most tickets one RENEW call carries (a longer list is split into several calls)."""

# Every script but RENEW gets the same KEYS:
#   wait meta leases lease_tenant vt rejected stats tenant_active hb released lease_weight
# (tenant_active is the tenant of the ticket the script is called for).

_ADMIT = """
local SWEEP = 256  -- dead waiting tickets dropped per call, at most (the head check drops the rest)

-- Capacity slots in use: one per lease, plus weight - 1 per heavier lease. An entry of LW
-- whose lease is gone (expired, released by an earlier version) is dropped.
local function in_use(L, LW)
  local used = redis.call('ZCARD', L)
  local heavy = redis.call('HGETALL', LW)
  for i = 1, #heavy, 2 do
    if redis.call('ZSCORE', L, heavy[i]) then
      used = used + tonumber(heavy[i + 1]) - 1
    else
      redis.call('HDEL', LW, heavy[i])
    end
  end
  return used
end

-- Expire leases and dead waiting tickets, then grant the head of the wait set while its
-- weight fits in the free capacity. Returns the granted tickets (also published on ``channel``).
local function admit(W, M, L, LT, V, R, S, HB, LW, now, cap, ttl, maxg, channel)
  -- Leases not renewed in time: their gateway is gone, the capacity returns.
  local expired = redis.call('ZRANGEBYSCORE', L, '-inf', now)
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', L, '-inf', now)
    for _, t in ipairs(expired) do
      redis.call('HDEL', LT, t)
      redis.call('HDEL', LW, t)
    end
    redis.call('HINCRBY', S, 'expired', #expired)
  end
  -- Waiting tickets whose heartbeat expired: nobody waits for them any more. Their tenant
  -- entries expire by themselves (they were renewed with the heartbeat).
  local abandoned = 0
  local dead = redis.call('ZRANGEBYSCORE', HB, '-inf', now, 'LIMIT', 0, SWEEP)
  for _, t in ipairs(dead) do
    redis.call('ZREM', HB, t)
    if redis.call('ZREM', W, t) == 1 then
      redis.call('HDEL', M, t)
      abandoned = abandoned + 1
    end  -- else granted or cancelled already (by a gateway of an earlier version)
  end
  local used = in_use(L, LW)
  local granted = {}
  while #granted < maxg do
    local top = redis.call('ZRANGE', W, 0, 0)
    if #top == 0 then break end
    local t = top[1]
    local raw = redis.call('HGET', M, t)
    local meta = raw and cjson.decode(raw) or {}
    local hb = redis.call('ZSCORE', HB, t)
    local gone = hb and tonumber(hb) <= now  -- a dead ticket the bounded sweep left
    local late = meta.d and meta.d > 0 and now > meta.d
    local lim = cap  -- a batch-lane ticket may use only the capacity not kept for the others
    if meta.b and meta.b > 0 then lim = math.min(cap, meta.b) end
    local w = math.min(math.max(tonumber(meta.w or 1) or 1, 1), lim)  -- heavier than all: alone
    if not gone and not late and used + w > lim then break end  -- the head waits for its slots
    redis.call('ZREM', W, t)
    redis.call('HDEL', M, t)
    redis.call('ZREM', HB, t)
    if gone then
      abandoned = abandoned + 1  -- dropped, not granted
    elseif late then
      redis.call('HSET', R, t, 'deadline')
    else
      redis.call('ZADD', L, now + ttl, t)
      redis.call('HSET', LT, t, meta.t or '')
      if w > 1 then redis.call('HSET', LW, t, w) end
      local lane = 'now:' .. tostring(meta.r or 0)
      local cur = tonumber(redis.call('HGET', V, lane) or '0')
      if meta.s and meta.s > cur then redis.call('HSET', V, lane, meta.s) end
      used = used + w
      granted[#granted + 1] = t
    end
  end
  if abandoned > 0 then redis.call('HINCRBY', S, 'abandoned', abandoned) end
  if #granted > 0 then redis.call('PUBLISH', channel, table.concat(granted, ' ')) end
  return granted
end

-- A lease is gone (released or cancelled): write its tombstone, drop stale ones.
local function tombstone(RL, t, now, ttl)
  redis.call('ZREMRANGEBYSCORE', RL, '-inf', now)
  redis.call('ZADD', RL, now + ttl, t)
  redis.call('PEXPIRE', RL, ttl * 2)
end
"""

# ARGV: ticket tenant rank weight drop_ms now_ms capacity ttl_ms max_grants
#       tenant_limit channel lane heartbeat_ms slots batch_limit
# -> {status, position, depth}: status 1 granted, 0 waiting, -1 tenant concurrency limit
ENQUEUE = (
    _ADMIT
    + """
local W, M, L, LT, V, R, S, TA = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local HB = KEYS[9]
local ticket, tenant = ARGV[1], ARGV[2]
local rank, weight = tonumber(ARGV[3]), tonumber(ARGV[4])
local drop, now = tonumber(ARGV[5]), tonumber(ARGV[6])
local cap, ttl, maxg = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local limit, channel, lanew = tonumber(ARGV[10]), ARGV[11], tonumber(ARGV[12])
local hbms = tonumber(ARGV[13])
local slots = math.max(tonumber(ARGV[14] or '1') or 1, 1)
local blim = tonumber(ARGV[15] or '0') or 0  -- > 0: the slots a batch-lane ticket may fill
local LW = KEYS[11]
redis.call('ZREMRANGEBYSCORE', TA, '-inf', now)
if limit > 0 and redis.call('ZCARD', TA) >= limit then return {-1, 0, redis.call('ZCARD', W)} end
-- Counted for the tenant while it waits, as long as its heartbeat lives.
redis.call('ZADD', TA, now + hbms, ticket)
redis.call('PEXPIRE', TA, math.max(ttl, hbms) * 4)
local lane = tostring(rank)
local vnow = tonumber(redis.call('HGET', V, 'now:' .. lane) or '0')
local last = tonumber(redis.call('HGET', V, tenant .. ':' .. lane) or '0')
local start = math.max(vnow, last)
-- A ticket of k slots costs its tenant k turns of its fair share.
redis.call('HSET', V, tenant .. ':' .. lane, start + math.min(slots, cap) / weight)
redis.call('ZADD', W, rank * lanew + start, ticket)
local meta = {t = tenant, d = drop, s = start, r = rank, w = slots}
if blim > 0 then meta.b = blim end
redis.call('HSET', M, ticket, cjson.encode(meta))
redis.call('ZADD', HB, now + hbms, ticket)
admit(W, M, L, LT, V, R, S, HB, LW, now, cap, ttl, maxg, channel)
if redis.call('ZSCORE', L, ticket) then
  redis.call('ZADD', TA, now + ttl, ticket)  -- granted at once: counted as long as its lease
  return {1, 0, redis.call('ZCARD', W)}
end
return {0, redis.call('ZRANK', W, ticket), redis.call('ZCARD', W)}
"""
)

# ARGV: ticket now_ms capacity ttl_ms max_grants channel heartbeat_ms
# -> 1 granted, 0 waiting, -2 rejected (drop time passed), -3 unknown (lost: Redis restarted,
# or its heartbeat expired)
# A check is a sign of life too: a waiting ticket's heartbeat and tenant entry are renewed,
# and a granted one's tenant entry lives as long as its lease until the lease renewals take
# over.
CHECK = (
    _ADMIT
    + """
local W, M, L, LT, V, R, S, TA = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local HB = KEYS[9]
local LW = KEYS[11]
local t, now = ARGV[1], tonumber(ARGV[2])
local ttl, hbms = tonumber(ARGV[4]), tonumber(ARGV[7])
admit(W, M, L, LT, V, R, S, HB, LW, now, tonumber(ARGV[3]), ttl, tonumber(ARGV[5]), ARGV[6])
if redis.call('ZSCORE', L, t) then
  redis.call('ZADD', TA, now + ttl, t)
  redis.call('PEXPIRE', TA, math.max(ttl, hbms) * 4)
  return 1
end
if redis.call('ZSCORE', W, t) then
  redis.call('ZADD', HB, now + hbms, t)
  redis.call('ZADD', TA, now + hbms, t)
  redis.call('PEXPIRE', TA, math.max(ttl, hbms) * 4)
  return 0
end
if redis.call('HGET', R, t) then redis.call('HDEL', R, t); return -2 end
return -3
"""
)

# ARGV: ticket now_ms capacity ttl_ms max_grants channel service_ms
# -> number of tickets granted by the freed capacity
RELEASE = (
    _ADMIT
    + """
local W, M, L, LT, V, R, S, TA = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local HB, RL, LW = KEYS[9], KEYS[10], KEYS[11]
local t, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
redis.call('ZREM', L, t)
redis.call('HDEL', LT, t)
redis.call('HDEL', LW, t)  -- all of its slots
redis.call('ZREM', TA, t)
tombstone(RL, t, now, ttl)
local service = tonumber(ARGV[7])
if service >= 0 then
  local old = tonumber(redis.call('HGET', S, 'ewma_ms') or '-1')
  if old < 0 then old = service end
  redis.call('HSET', S, 'ewma_ms', 0.8 * old + 0.2 * service)
end
local g = admit(W, M, L, LT, V, R, S, HB, LW, now, tonumber(ARGV[3]), ttl, tonumber(ARGV[5]), ARGV[6])
return #g
"""
)

# ARGV: ticket now_ms capacity ttl_ms max_grants channel
# -> 1 removed while waiting, 2 it had been granted (and is now released), 0 unknown
CANCEL = (
    _ADMIT
    + """
local W, M, L, LT, V, R, S, TA = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local HB, RL, LW = KEYS[9], KEYS[10], KEYS[11]
local t, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
local cap, maxg, channel = tonumber(ARGV[3]), tonumber(ARGV[5]), ARGV[6]
redis.call('ZREM', TA, t)
redis.call('HDEL', R, t)
redis.call('ZREM', HB, t)
if redis.call('ZREM', W, t) == 1 then
  redis.call('HDEL', M, t)
  admit(W, M, L, LT, V, R, S, HB, LW, now, cap, ttl, maxg, channel)  -- a heavy head held them up
  return 1
end
if redis.call('ZREM', L, t) == 1 then
  redis.call('HDEL', LT, t)
  redis.call('HDEL', LW, t)
  tombstone(RL, t, now, ttl)
  admit(W, M, L, LT, V, R, S, HB, LW, now, cap, ttl, maxg, channel)
  return 2
end
return 0
"""
)

# One gateway's renewals for one model and tenant (its maintenance task sends one call per
# model and tenant, all in one round trip).
# KEYS: leases lease_tenant tenant_active wait hb released lease_weight
# ARGV: tenant lease_expiry_ms heartbeat_expiry_ms tenant_key_ttl_ms n_leases
#       lease tickets (n_leases of them), their weights (n_leases), then waiting tickets
# -> {leases renewed, leases skipped (released: tombstone), waiting renewed, waiting unknown}
#
# A lease is renewed, and re-added when it is missing (Redis restarted, it expired while
# its gateway stalled, or it was granted locally while Redis was away), so capacity
# accounting comes back with Redis (with its weight); but never one that was released: its
# tombstone says so.
# A waiting ticket's heartbeat is renewed only while it still waits: a renewal never brings
# back a ticket that was granted, dropped or cancelled.
RENEW = """
local L, LT, TA, W, HB, RL = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local LW = KEYS[7]
local tenant = ARGV[1]
local lexp, hexp, keyttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local nl = tonumber(ARGV[5])
local renewed, skipped, waiting, unknown = 0, 0, 0, 0
for i = 6, 5 + nl do
  local t = ARGV[i]
  local w = tonumber(ARGV[i + nl]) or 1
  if redis.call('ZSCORE', RL, t) then
    skipped = skipped + 1
  else
    redis.call('ZADD', L, lexp, t)
    redis.call('HSET', LT, t, tenant)
    if w > 1 then redis.call('HSET', LW, t, w) end
    redis.call('ZADD', TA, lexp, t)
    renewed = renewed + 1
  end
end
for i = 6 + 2 * nl, #ARGV do
  local t = ARGV[i]
  if redis.call('ZSCORE', W, t) then
    redis.call('ZADD', HB, hexp, t)
    redis.call('ZADD', TA, hexp, t)
    waiting = waiting + 1
  else
    unknown = unknown + 1
  end
end
if renewed + waiting > 0 then redis.call('PEXPIRE', TA, keyttl) end
return {renewed, skipped, waiting, unknown}
"""


# A request that runs elsewhere (handed off to an upstream) counted against its tenant's
# concurrency limit without taking engine capacity: an entry in the tenant's active set,
# renewed by its gateway like a lease, removed when the request ends (ZREM).
# KEYS: tenant_active
# ARGV: ticket now_ms ttl_ms tenant_limit -> 1 held, -1 tenant concurrency limit
HOLD = """
local TA = KEYS[1]
local t, now, ttl, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', TA, '-inf', now)
if limit > 0 and redis.call('ZCARD', TA) >= limit then return -1 end
redis.call('ZADD', TA, now + ttl, t)
redis.call('PEXPIRE', TA, ttl * 4)
return 1
"""
