-- kcons dedup store: record done ids and claim a batch of ids, atomically, in one round trip.
--
-- KEYS[1]: the namespace root "{<prefix>:<namespace>}". The braces are a hash tag: every key
--          the script touches starts with KEYS[1], so all of them live in KEYS[1]'s hash slot
--          and the script runs on one node of a Redis Cluster.
--   <root>:h:<bucket>  hash of the ids written while floor(now / width) was <bucket> (server
--                      clock, ms): field = id, value "<tag>" (claimed by the claim call <tag>) or
--                      "d" (done); plus one field "\n<tag>" = "<owner>|<lease deadline ms>" per
--                      claim call that wrote there (no id contains "\n"). Expires at
--                      (bucket + 1) * width + lease + retention (the longest lease written in it):
--                      a claim completed within its lease stays findable for at least the
--                      retention after its completion.
--   <root>:r           sorted set of the buckets, scored by their expiry: the live buckets, which
--                      a lookup reads (one variadic HMGET each).
--   <root>:v           the namespace's id format: "2" compact (a canonical lowercase UUID is kept
--                      as its 16 bytes, other ids as text, never 16 bytes long), "1" text only
--                      (a namespace with data from before compact ids). Lives as long as the
--                      newest bucket; written by the "format" operation.
--   <root>:b:<tag>     present when every id the claim call <tag> claimed is done (written once,
--                      when they are completed together). Expires a retention after it is written.
-- A claim call's ids are marked done with one key, however many they are. Ids completed apart
-- from the rest of their claim call, after their lease deadline, or whose claim the caller no
-- longer tracks, are written "d" in the current bucket (one field each: the rare case). Every
-- key has a TTL, so the store stays bounded. Values "<tag>:<index>" (the layout before this one,
-- where <root>:b:<tag> was a bitmap of the call's done indices) are still read.
--
-- ARGV[1]: "batch", "release" or "format", then ":" and the caller's id format for the first two
--          (the answer is "F<format>" when the namespace's differs: nothing was done); ARGV[2]: the caller's owner token; ARGV[3]: lease in ms;
-- ARGV[4]: retention in ms; ARGV[5]: tag of this claim call (unique in the namespace, hex, no
--          ":"); ARGV[6]: ids to claim (batch) or release, in one of the forms split() reads
--          (the client hashes ids that contain "\n", are empty or are long); ARGV[7]: bucket
--          width in ms;
-- ARGV[8], ARGV[9], ...: groups of three, ids to record done before the claim: (tag of their
--          claim call, its lease deadline, ids as in ARGV[6] or ""): a group with a tag marks
--          its whole claim call done; an empty tag marks ids written "d" one by one. A group whose
--          deadline has passed is written "d" too, which needs its ids: when one comes without
--          them, nothing is written and the answer is "L" and the numbers of such groups (1 = the
--          first group), comma-separated; the client sends the call again with their ids.
--
-- batch answers "<deadline>|" and one character per id to claim: "1" claimed by the caller (new,
-- its own claim again, or another owner's expired claim), "0" done (a duplicate), "2" busy
-- (another owner's unexpired claim); "" when there are no ids to claim. release deletes the
-- caller's own claims that are not done and answers their count.

local root = KEYS[1]
local op, fmt = string.match(ARGV[1], "^(%a+):?(%d*)$")
local owner = ARGV[2]
local lease = tonumber(ARGV[3])
local retention = tonumber(ARGV[4])
local width = tonumber(ARGV[7])
local CHUNK = 4000 -- arguments of one variadic call: well below Lua's unpack limit

if op == "format" then
  -- The namespace's id format, fixed by the first worker: text when data from before exists.
  local v = redis.call("GET", root .. ":v")
  if not v then
    v = redis.call("EXISTS", root .. ":r") == 1 and "1" or "2"
    redis.call("SET", root .. ":v", v, "PX", ARGV[4])
  end
  return v
end

if op ~= "batch" and op ~= "release" then
  return redis.error_reply("kcons dedup: unknown operation " .. tostring(ARGV[1]))
end

-- The caller's id format must be the namespace's: a namespace whose keys all expired is written
-- again by whoever comes first, and a caller that cached the other format is told to ask again.
if fmt ~= "" then
  local v = redis.call("GET", root .. ":v")
  if not v then
    redis.call("SET", root .. ":v", fmt, "PX", ARGV[4])
  elseif v ~= fmt then
    return "F" .. v
  end
end

local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local bucket = string.format("%.0f", math.floor(now / width))
local current = root .. ":h:" .. bucket
local registry = root .. ":r"

local function num(x)
  return string.format("%.0f", x)
end

-- The ids of an argument: "" (none), or a mode byte then the ids: "u" 16-byte ids back to back
-- (compact UUIDs), "l" each id after its length in two bytes (big-endian), "n" ids separated by
-- "\n" (plain find: much cheaper than a pattern per character).
local function split(s)
  local ids, n = {}, 0
  if s == "" then
    return ids, 0
  end
  local byte, find, sub = string.byte, string.find, string.sub
  local mode, size = byte(s, 1), #s
  if mode == 117 then -- "u"
    for p = 2, size, 16 do
      n = n + 1
      ids[n] = sub(s, p, p + 15)
    end
    return ids, n
  end
  if mode == 108 then -- "l"
    local p = 2
    while p < size do
      local len = byte(s, p) * 256 + byte(s, p + 1)
      n = n + 1
      ids[n] = sub(s, p + 2, p + 1 + len)
      p = p + 2 + len
    end
    return ids, n
  end
  local p = 2
  while true do
    local q = find(s, "\n", p, true)
    if not q then
      break
    end
    n = n + 1
    ids[n] = sub(s, p, q - 1)
    p = q + 1
  end
  n = n + 1
  ids[n] = sub(s, p)
  return ids, n
end

-- Make key expire no sooner than at (ms): gives a TTL to a key that has none, never shortens one.
local function expire_no_sooner(key, at)
  local left = redis.call("PTTL", key)
  if left < 0 or now + left < at then
    redis.call("PEXPIREAT", key, num(at))
  end
end

-- The current bucket was just written: it and its registry entry outlive what it holds.
local function touch_current()
  local at = (math.floor(now / width) + 1) * width + lease + retention
  local score = redis.call("ZSCORE", registry, bucket)
  if not score or tonumber(score) < at then
    redis.call("ZADD", registry, num(at), bucket)
    expire_no_sooner(registry, at)
  end
  expire_no_sooner(current, at)
  expire_no_sooner(root .. ":v", at)
end

-- HSET key with the flat field/value list, CHUNK arguments per call.
local function hset(key, args, n)
  for c = 1, n, CHUNK do
    redis.call("HSET", key, unpack(args, c, math.min(n, c + CHUNK - 1)))
  end
end

-- The keys of the live buckets, newest first.
local function live_buckets()
  local entries = redis.call("ZRANGE", registry, 0, -1, "WITHSCORES")
  local numbers, stale = {}, false
  for i = 1, #entries, 2 do
    if tonumber(entries[i + 1]) > now then
      numbers[#numbers + 1] = tonumber(entries[i])
    else
      stale = true
    end
  end
  if stale then
    redis.call("ZREMRANGEBYSCORE", registry, "-inf", num(now))
  end
  table.sort(numbers, function(a, b)
    return a > b
  end)
  local keys = {}
  for i, b in ipairs(numbers) do
    keys[i] = root .. ":h:" .. num(b)
  end
  return keys
end

-- found[i] = {key1, value1, key2, value2, ...} for the ids present in a live bucket (newest first);
-- nil when no id is present anywhere (the common case: a batch of new ids).
local function lookup(ids, n)
  local found
  for _, key in ipairs(live_buckets()) do
    for c = 1, n, CHUNK do
      local got = redis.call("HMGET", key, unpack(ids, c, math.min(n, c + CHUNK - 1)))
      for j = 1, #got do
        if got[j] then
          found = found or {}
          local i = c + j - 1
          local f = found[i]
          if not f then
            f = {}
            found[i] = f
          end
          f[#f + 1] = key
          f[#f + 1] = got[j]
        end
      end
    end
  end
  return found
end

-- Whether each claim call's ids are all done (its key exists); the older layout's bitmaps too.
local calls = {}
local function call_key(tag)
  local v = calls[tag]
  if v == nil then
    v = redis.call("GET", root .. ":b:" .. tag) or false
    calls[tag] = v
  end
  return v
end

-- A found value: whether its id is done, and the tag of the claim call that wrote it (nil for a
-- value that is neither "d" nor a claim: busy is the safe answer for it).
local function is_done(value)
  if value == "d" then
    return true, "d"
  end
  if not string.find(value, ":", 1, true) then
    return call_key(value) ~= false, value
  end
  local tag, index = string.match(value, "^([^:]+):(%d+)$") -- the older layout: a bit per index
  if tag == nil then
    return false, nil
  end
  local i = tonumber(index)
  local byte = string.byte(call_key(tag) or "", math.floor(i / 8) + 1)
  return byte ~= nil and bit.band(byte, bit.rshift(128, i % 8)) ~= 0, tag
end

-- The owner and lease deadline of claim call tag, from the bucket its ids were written to.
local function claim_of(key, tag)
  local meta = redis.call("HGET", key, "\n" .. tag)
  local o, deadline = string.match(meta or "", "^(.*)|(%d+)$")
  return o, tonumber(deadline) or 0 -- no record (evicted?): an expired claim, never a done one
end

-- What a found id is: "0" done, "1" ours to claim (our own claim, or an expired one), "2" busy.
-- f is {key1, value1, key2, value2, ...}, newest bucket first; the newest claim decides.
local function state(f)
  local newest
  for k = 2, #f, 2 do
    local done, tag = is_done(f[k])
    if tag == nil then
      return "2" -- unknown value: busy is the safe answer
    end
    if done then
      return "0"
    end
    if newest == nil then
      local o, deadline = claim_of(f[k - 1], tag)
      newest = (o == owner or deadline <= now) and "1" or "2"
    end
  end
  return newest
end

if op == "release" then
  local ids, n = split(ARGV[6])
  local released = 0
  for i, f in pairs(lookup(ids, n) or {}) do
    local mine = false
    for k = 2, #f, 2 do
      local done, tag = is_done(f[k])
      if tag == nil or done then
        mine = false
        break
      end
      mine = mine or claim_of(f[k - 1], tag) == owner
    end
    if mine then
      for k = 1, #f, 2 do
        redis.call("HDEL", f[k], ids[i])
      end
      released = released + 1
    end
  end
  return released
end

-- Record done ids first. A group past its deadline is written "d", which needs its ids.
local late = {}
for g = 8, #ARGV, 3 do
  if ARGV[g] ~= "" and tonumber(ARGV[g + 1]) < now and ARGV[g + 2] == "" then
    late[#late + 1] = (g - 5) / 3
  end
end
if #late > 0 then
  return "L" .. table.concat(late, ",")
end
for g = 8, #ARGV, 3 do
  local tag = ARGV[g]
  if tag ~= "" and tonumber(ARGV[g + 1]) >= now then
    redis.call("SET", root .. ":b:" .. tag, "1", "PX", retention)
  else
    -- Ids completed apart from their claim call, unknown claims, or completed after their lease
    -- (their bucket may expire too soon): "d".
    local list, count = split(ARGV[g + 2])
    local args = {}
    for i = 1, count do
      args[2 * i - 1] = list[i]
      args[2 * i] = "d"
    end
    if count > 0 then
      hset(current, args, 2 * count)
      touch_current()
    end
  end
end

if ARGV[6] == "" then
  return ""
end
local ids, n = split(ARGV[6])
local deadline = num(now + lease)
local tag = ARGV[5]
local found = lookup(ids, n)
local args = {}
local m = 0
local out
if found == nil then
  for i = 1, n do
    args[2 * i - 1] = ids[i]
    args[2 * i] = tag
  end
  m = 2 * n
else
  out = {}
  for i = 1, n do
    local f = found[i]
    local code = "1"
    if f ~= nil then
      code = state(f)
      if code == "1" then
        for k = 1, #f, 2 do
          if f[k] ~= current then
            redis.call("HDEL", f[k], ids[i])
          end
        end
      end
    end
    if code == "1" then
      args[m + 1] = ids[i]
      args[m + 2] = tag
      m = m + 2
    end
    out[i] = code
  end
end
if m > 0 then
  args[m + 1] = "\n" .. tag
  args[m + 2] = owner .. "|" .. deadline
  hset(current, args, m + 2)
  touch_current()
end
return deadline .. "|" .. (out and table.concat(out) or string.rep("1", n))
