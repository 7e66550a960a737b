-- kcons dedup store: claim, complete or release a whole batch of ids in one round trip.
--
-- KEYS[1]: the namespace root "{<prefix>:<namespace>}". Each id's key is KEYS[1] .. ":" .. id;
--          the braces are a hash tag, so every key the script touches lives in KEYS[1]'s hash
--          slot and the script runs on one node of a Redis Cluster.
-- ARGV[1]: operation: "claim", "complete", "release" or "complete_claim".
-- ARGV[2]: the caller's owner token.
-- ARGV[3]: TTL in milliseconds: the lease for "claim", the retention for "complete".
-- ARGV[4]: the ids, separated by "\n" (ids never contain "\n"; the client hashes those that do).
-- ARGV[5], ARGV[6]: for "complete_claim" only: ids to mark done first, and the retention in ms.
--
-- A key holds "p:<owner>" while in progress (expires with the lease) and "d" once done
-- (expires with the retention). Every key written has a TTL, so the store stays bounded.
--
-- claim returns one character per id, in order: "1" claimed by the caller, "0" done (a
-- duplicate), "2" held by another owner under an unexpired lease (busy). A key the caller
-- already holds is claimed again and its lease renewed.
-- complete and release return the number of keys changed. complete_claim marks the ARGV[5]
-- ids done, then claims the ARGV[4] ids (so a batch's done records ride on the next batch's
-- claim: one round trip per batch), and answers like claim.

local root = KEYS[1] .. ":"
local op = ARGV[1]
local mine = "p:" .. ARGV[2]
local ttl = tonumber(ARGV[3])
local ids = ARGV[4]

local function complete(list, retention)
  local n = 0
  for id in string.gmatch(list, "[^\n]+") do
    redis.call("SET", root .. id, "d", "PX", retention)
    n = n + 1
  end
  return n
end

if op == "complete_claim" then
  complete(ARGV[5], tonumber(ARGV[6]))
  op = "claim"
end

if op == "claim" then
  local out = {}
  local n = 0
  for id in string.gmatch(ids, "[^\n]+") do
    local key = root .. id
    local code = "1"
    local old = redis.call("SET", key, mine, "NX", "PX", ttl, "GET")
    if old then
      if old == "d" then
        code = "0"
      elseif old == mine then
        redis.call("PEXPIRE", key, ttl)
      else
        code = "2"
      end
    end
    n = n + 1
    out[n] = code
  end
  return table.concat(out)
elseif op == "complete" then
  return complete(ids, ttl)
elseif op == "release" then
  local n = 0
  for id in string.gmatch(ids, "[^\n]+") do
    local key = root .. id
    if redis.call("GET", key) == mine then
      redis.call("DEL", key)
      n = n + 1
    end
  end
  return n
end
return redis.error_reply("kcons dedup: unknown operation " .. tostring(op))
