-- kcons ConsistentCache: every write to a cache key goes through this one script, so the
-- version guard is atomic. Redis Cluster safe: KEYS[1] (data) and KEYS[2] (lease) share a
-- hash tag, so they live in one slot.
--
-- Data key layout (one string): 'v' .. version .. ':' .. value   (a cached value)
--                               't' .. version .. ':'            (a tombstone)
-- Versions are non-negative decimal integers without leading zeros, compared as strings
-- (length first), so they may exceed 2^53 (LSNs, microsecond timestamps).
--
-- ARGV[1] op:
--   'lease' take the fill lease: returns {2, entry} when a value is cached, {1, ''} when the
--           lease was taken (ARGV[5] = token), {0, ''} when another loader holds it.
--           ARGV[4] = lease ttl in ms.
--   'fill'  store a loaded value; only while the caller's lease (ARGV[5]) is still held.
--   'set'   store a value without a lease (write-through, write-behind).
--   'tomb'  store a tombstone (invalidation); removes any lease, so a loader that started
--           before this invalidation cannot fill afterwards.
--   'release' drop the caller's lease (ARGV[5]) if it still holds it; returns {1, ''}.
-- ARGV[2] version, ARGV[3] value, ARGV[4] ttl in ms, ARGV[5] lease token.
--
-- Guard: 'tomb' applies when its version is newer than the stored one (value or tombstone).
-- 'fill' and 'set' apply when the version is newer than a stored value, or at least the
-- version of a stored tombstone (a tombstone at V says "V is current but not cached").
-- Returns {code, stored_version}: 1 applied, 0 refused as stale, -1 lease lost.

local op = ARGV[1]

if op == 'lease' then
  local cur = redis.call('GET', KEYS[1])
  if cur and string.sub(cur, 1, 1) == 'v' then
    return {2, cur}
  end
  if redis.call('SET', KEYS[2], ARGV[5], 'NX', 'PX', ARGV[4]) then
    return {1, ''}
  end
  return {0, ''}
end

if op == 'release' then
  if redis.call('GET', KEYS[2]) == ARGV[5] then
    redis.call('DEL', KEYS[2])
  end
  return {1, ''}
end

local function newer(a, b)
  -- 1 when decimal a > b, 0 when equal, -1 when a < b
  if #a ~= #b then
    if #a > #b then return 1 else return -1 end
  end
  if a == b then return 0 end
  if a > b then return 1 else return -1 end
end

local ver = ARGV[2]

if op == 'fill' then
  if redis.call('GET', KEYS[2]) ~= ARGV[5] then
    local cur = redis.call('GET', KEYS[1])
    local cur_ver = ''
    if cur then cur_ver = string.sub(cur, 2, string.find(cur, ':', 2, true) - 1) end
    return {-1, cur_ver}
  end
end

local cur = redis.call('GET', KEYS[1])
local accept = true
local cur_ver = ''
if cur then
  local kind = string.sub(cur, 1, 1)
  cur_ver = string.sub(cur, 2, string.find(cur, ':', 2, true) - 1)
  local c = newer(ver, cur_ver)
  if op == 'tomb' then
    accept = c > 0
  elseif kind == 't' then
    accept = c >= 0
  else
    accept = c > 0
  end
end

if op == 'fill' then
  -- the lease is spent either way: the loader is done with this key
  redis.call('DEL', KEYS[2])
end

if not accept then
  return {0, cur_ver}
end

if op == 'tomb' then
  redis.call('SET', KEYS[1], 't' .. ver .. ':', 'PX', ARGV[4])
  redis.call('DEL', KEYS[2])
else
  redis.call('SET', KEYS[1], 'v' .. ver .. ':' .. ARGV[3], 'PX', ARGV[4])
end
return {1, ver}
