-- kcons dedup store: claim, complete or release a whole batch of ids in one round trip.
--
-- KEYS: one key per id, all in the same hash slot ("{kcons:dedup:<namespace>}:<id>").
-- ARGV[1]: operation: "claim", "complete" or "release".
-- ARGV[2]: the caller's owner token.
-- ARGV[3]: TTL in milliseconds: the lease for "claim", the retention for "complete".
--
-- A key holds "p:<owner>" while in progress (expires with the lease) and "d" once done
-- (expires with the retention). Every key written has a TTL, so the store stays bounded.
--
-- claim returns one integer per key: 1 claimed by the caller, 0 done (a duplicate),
-- 2 held by another owner under an unexpired lease (busy). A key the caller already
-- holds is claimed again and its lease renewed.
-- complete and release return the number of keys changed.

local op = ARGV[1]
local mine = "p:" .. ARGV[2]
local ttl = tonumber(ARGV[3])

if op == "claim" then
  local out = {}
  for i, key in ipairs(KEYS) do
    if redis.call("SET", key, mine, "NX", "PX", ttl) then
      out[i] = 1
    else
      local value = redis.call("GET", key)
      if value == "d" then
        out[i] = 0
      elseif value == mine then
        redis.call("PEXPIRE", key, ttl)
        out[i] = 1
      else
        out[i] = 2
      end
    end
  end
  return out
elseif op == "complete" then
  for _, key in ipairs(KEYS) do
    redis.call("SET", key, "d", "PX", ttl)
  end
  return #KEYS
elseif op == "release" then
  local n = 0
  for _, key in ipairs(KEYS) do
    if redis.call("GET", key) == mine then
      redis.call("DEL", key)
      n = n + 1
    end
  end
  return n
end
return redis.error_reply("kcons dedup: unknown operation " .. tostring(op))
