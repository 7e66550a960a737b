-- kcons ConsistentCache: every write to a cache key goes through this one script, so the
-- version guard is atomic. Redis Cluster safe: KEYS[1] (data), KEYS[2] (lease) and KEYS[3]
-- (floor) share a hash tag, so they live in one slot.
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
-- ARGV[2] version, ARGV[3] value, ARGV[4] ttl in ms, ARGV[5] lease token,
-- ARGV[6] ('set') the source commit time in ms since the epoch, minus the allowed clock skew,
-- or '' when unknown, ARGV[7] ('set' without a commit time) the age in ms the key's history
-- must have.
--
-- Guard: 'tomb' applies when its version is newer than the stored one (value or tombstone).
-- 'fill' and 'set' apply when the version is newer than a stored value, or at least the
-- version of a stored tombstone (a tombstone at V says "V is current but not cached").
--
-- History: KEYS[3] holds the key's *floor*, '<version>:<since ms>': the highest version any
-- accepted write stored (kept at least twice as long as that write's TTL, so it outlives the
-- entry), and since when Redis has kept the key's history (0 once a leased fill stored a
-- value: a fill loads from the source after taking its lease, so nothing committed earlier
-- can be newer than it). Every write must be at least the floor, so an evicted or expired
-- newer entry still refuses an older write. A 'set' (lease-less: its value was read before
-- this call, maybe long before) needs a history that predates it: a floor whose since is
-- not after the write's commit time (or, when that is unknown, at least ARGV[7] old). Else
-- Redis cannot tell whether a newer version was stored and lost (restart without
-- persistence, flush, eviction of entry and floor, history rebuilt by a lagging invalidator),
-- so the set stores a tombstone at its version instead of its value (when that tombstone is
-- newer than what is stored) and returns -2; the next read loads under a lease.
-- Returns {code, stored_version}: 1 applied, 0 refused as stale, -1 lease lost, -2 no history.

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

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local ver = ARGV[2]

if op == 'fill' then
  if redis.call('GET', KEYS[2]) ~= ARGV[5] then
    local cur = redis.call('GET', KEYS[1])
    local cur_ver = ''
    if cur then cur_ver = string.sub(cur, 2, string.find(cur, ':', 2, true) - 1) end
    return {-1, cur_ver}
  end
  -- the lease is spent either way: the loader is done with this key
  redis.call('DEL', KEYS[2])
end

local cur = redis.call('GET', KEYS[1])
local cur_ver = ''
local kind = ''
if cur then
  kind = string.sub(cur, 1, 1)
  cur_ver = string.sub(cur, 2, string.find(cur, ':', 2, true) - 1)
end
local floor_raw = redis.call('GET', KEYS[3])
local floor = nil
local since = nil
if floor_raw then
  local colon = string.find(floor_raw, ':', 1, true)
  floor = string.sub(floor_raw, 1, colon - 1)
  since = tonumber(string.sub(floor_raw, colon + 1))
end

local accept = true
if cur then
  local c = newer(ver, cur_ver)
  if op == 'tomb' then
    accept = c > 0
  elseif kind == 't' then
    accept = c >= 0
  else
    accept = c > 0
  end
end
if accept and floor and newer(ver, floor) < 0 then
  accept = false
end
if not accept then
  return {0, cur_ver}
end

local code = 1
if op == 'set' then
  local trusted = false
  if floor then
    if since == 0 then
      trusted = true
    elseif ARGV[6] ~= '' then
      trusted = tonumber(ARGV[6]) >= since
    else
      trusted = now_ms() - since >= tonumber(ARGV[7])
    end
  end
  if not trusted then
    code = -2
    op = 'tomb'
    if cur and newer(ver, cur_ver) <= 0 then
      return {-2, cur_ver}  -- a tombstone at this version says nothing new
    end
  end
end

if op == 'tomb' then
  redis.call('SET', KEYS[1], 't' .. ver .. ':', 'PX', ARGV[4])
  redis.call('DEL', KEYS[2])
else
  redis.call('SET', KEYS[1], 'v' .. ver .. ':' .. ARGV[3], 'PX', ARGV[4])
end
local keep = 2 * tonumber(ARGV[4])
local left = redis.call('PTTL', KEYS[3])
if left > keep then keep = left end
local top = ver
if floor and newer(floor, ver) > 0 then top = floor end
if op == 'fill' then
  since = 0
elseif not since then
  since = now_ms()
end
redis.call('SET', KEYS[3], top .. ':' .. since, 'PX', keep)
return {code, ver}
