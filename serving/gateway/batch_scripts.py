"""The Lua scripts of the Batch API (``serving/gateway/batches.py``): each one atomic step.

Keys of one batch (``batch.key_prefix`` ``P``): ``P:b:<id>`` (the batch: a hash of its
fields, ``status`` and ``remaining`` among them), ``P:o:<id>`` and ``P:e:<id>`` (results
by ``custom_id``: output lines and error lines), ``P:x:<id>`` (lines that failed
validation, by line number), ``P:statuses`` (batches per status), ``P:active`` (batches
not finished), ``P:lines`` (the stream of lines to run, consumer group ``workers``).
"""

from __future__ import annotations

__all__ = ["KEEPALIVE", "LINE_DONE", "TERMINAL", "TRANSITION", "UNLOCK"]

TERMINAL = ("failed", "completed", "expired", "cancelled")

_IS_TERMINAL = " or ".join(f"s == '{s}'" for s in TERMINAL)

TRANSITION = f"""
-- KEYS: 1 batch, 2 status counts, 3 active set, 4.. keys deleted when the new status is final
-- ARGV: 1 allowed current statuses (comma separated), 2 new status, 3 batch id,
--       4.. field, value pairs set with the status
-- -> {{1, old status}} when it moved, {{0, current status or ''}} when not
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {{0, ''}} end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == cur then allowed = true end
end
if not allowed then return {{0, cur}} end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('HINCRBY', KEYS[2], cur, -1)
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
local s = ARGV[2]
if {_IS_TERMINAL} then
  redis.call('ZREM', KEYS[3], ARGV[3])
  for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
end
return {{1, cur}}
"""

LINE_DONE = """
-- One line is done: its result written once (by custom_id, in neither hash yet), its
-- stream entry acknowledged and deleted, the batch's remaining count decremented once
-- (only by the call that deleted the entry). A batch already final gets no result.
-- KEYS: 1 stream, 2 batch, 3 output results, 4 error results
-- ARGV: 1 group, 2 entry id, 3 custom_id, 4 'o' | 'e' | '' (nothing to write), 5 value,
--       6-9 the answer's tokens: input, output, cached input, reasoning (added once)
-- -> {wrote (1 written, 2 already answered, 0 nothing), remaining (-1: no batch), status}
local st = redis.call('HGET', KEYS[2], 'status')
local wrote = 0
if ARGV[4] ~= '' and (st == 'in_progress' or st == 'cancelling') then
  if redis.call('HEXISTS', KEYS[3], ARGV[3]) == 0 and redis.call('HEXISTS', KEYS[4], ARGV[3]) == 0 then
    local target = KEYS[4]
    if ARGV[4] == 'o' then target = KEYS[3] end
    redis.call('HSET', target, ARGV[3], ARGV[5])
    local names = {'usage_in', 'usage_out', 'usage_cached', 'usage_reasoning'}
    for i = 1, 4 do
      local n = tonumber(ARGV[5 + i] or '0') or 0
      if n > 0 then redis.call('HINCRBY', KEYS[2], names[i], n) end
    end
    wrote = 1
  else
    wrote = 2
  end
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
local deleted = redis.call('XDEL', KEYS[1], ARGV[2])
local left = -1
if st then
  if deleted == 1 then
    left = redis.call('HINCRBY', KEYS[2], 'remaining', -1)
  else
    left = tonumber(redis.call('HGET', KEYS[2], 'remaining') or '-1')
  end
end
return {wrote, left, st or ''}
"""

KEEPALIVE = """
-- Renew this consumer's claims on the entries it still owns; the ids it no longer owns
-- (another replica took them over, or they are gone) are returned.
-- KEYS: 1 stream; ARGV: 1 group, 2 consumer, 3 idle ms to set (0: renew), 4.. entry ids
local lost = {}
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""

UNLOCK = """
-- Release a lock only if it is still ours. KEYS: 1 lock; ARGV: 1 token
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
