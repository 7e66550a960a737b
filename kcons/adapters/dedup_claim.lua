-- kcons dedup store: record done ids and claim a batch of ids, atomically, in one round trip.
--
-- KEYS[1]: the namespace root "{<prefix>:<namespace>}". The braces are a hash tag: every key
--          the script touches starts with KEYS[1], so all of them live in KEYS[1]'s hash slot
--          and the script runs on one node of a Redis Cluster.
--   <root>:i:<id>   one key per id, "<owner>|<seq>|<lease deadline ms>": the claim by <owner>'s
--                   claim call number <seq>, in progress until the deadline (server clock);
--                   or "d": done. TTL = the retention.
--   <root>:b:<owner>|<seq>   set of the ids of that claim call that are done. TTL = the retention.
-- A claimed id becomes done by joining its claim's set (one SADD per batch instead of one write
-- per id). Every key has a TTL, so the store stays bounded.
--
-- ARGV[1]: "batch" or "release"; ARGV[2]: the caller's owner token (no "|");
-- ARGV[3]: lease in ms; ARGV[4]: retention in ms; ARGV[5]: seq of this claim call;
-- ARGV[6]: ids to claim (batch) or release, separated by "\n" (the client hashes ids that
--          contain "\n", are empty or are long);
-- ARGV[7], ARGV[8], ...: pairs (tag "<owner>|<seq>", ids) of ids to record done before the
--          claim; an empty tag marks ids whose claim is unknown: they are written "d".
--
-- batch answers one character per id to claim: "1" claimed by the caller (new, its own claim
-- again, or another owner's expired claim), "0" done (a duplicate), "2" busy (another owner's
-- unexpired claim). release deletes the caller's own claims that are not done; answers a count.

local root = KEYS[1]
local op = ARGV[1]
local owner = ARGV[2]
local lease = tonumber(ARGV[3])
local retention = tonumber(ARGV[4])

local function parse(value)
  return string.match(value, "^([^|]+)|([^|]+)|(%d+)$")
end

local function done_in(tag, id)
  return redis.call("SISMEMBER", root .. ":b:" .. tag, id) == 1
end

if op == "release" then
  local n = 0
  for id in string.gmatch(ARGV[6], "[^\n]+") do
    local key = root .. ":i:" .. id
    local value = redis.call("GET", key)
    if value then
      local o, s = parse(value)
      if o == owner and not done_in(o .. "|" .. s, id) then
        redis.call("DEL", key)
        n = n + 1
      end
    end
  end
  return n
end

if op ~= "batch" then
  return redis.error_reply("kcons dedup: unknown operation " .. tostring(op))
end

for g = 7, #ARGV, 2 do
  local tag = ARGV[g]
  if tag == "" then
    for id in string.gmatch(ARGV[g + 1], "[^\n]+") do
      redis.call("SET", root .. ":i:" .. id, "d", "PX", retention)
    end
  else
    local set = root .. ":b:" .. tag
    local members = {}
    for id in string.gmatch(ARGV[g + 1], "[^\n]+") do
      members[#members + 1] = id
      if #members == 1000 then
        redis.call("SADD", set, unpack(members))
        members = {}
      end
    end
    if #members > 0 then
      redis.call("SADD", set, unpack(members))
    end
    redis.call("PEXPIRE", set, retention)
  end
end

if ARGV[6] == "" then
  return ""
end
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mine = owner .. "|" .. ARGV[5] .. "|" .. string.format("%.0f", now + lease)
local out = {}
local n = 0
for id in string.gmatch(ARGV[6], "[^\n]+") do
  local key = root .. ":i:" .. id
  local code = "1"
  if not redis.call("SET", key, mine, "NX", "PX", retention) then
    local value = redis.call("GET", key)
    if value == "d" then
      code = "0"
    else
      local o, s, deadline = parse(value)
      if o == nil then
        code = "2"
      elseif done_in(o .. "|" .. s, id) then
        code = "0"
      elseif o == owner or tonumber(deadline) <= now then
        redis.call("SET", key, mine, "PX", retention)
      else
        code = "2"
      end
    end
  end
  n = n + 1
  out[n] = code
end
return table.concat(out)
