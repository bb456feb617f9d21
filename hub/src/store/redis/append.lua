-- Appends one durable event to a conversation log and publishes it, atomically.
-- KEYS[1] meta hash, KEYS[2] log list, KEYS[3] message-id zset
-- ARGV: 1 from, 2 id, 3 text, 4 flags (letters: f fallback, i interrupted,
--       c cancelled), 5 now_ms, 6 log cap,
--       7 retention seconds, 8 channel, 9 origin ("node/session" or ""),
--       10 timing JSON for reply.done (published, not stored; may be ""),
--       11 owner and 12 epoch to create the log with if it is missing
--       (both "" to never create)
-- Returns {1, seq} when stored, {0, seq} for a customer message id already
-- stored, {-1, 0} when the conversation does not exist (lost or expired),
-- or, when creating, exists with another owner or epoch.
local meta, log, ids = KEYS[1], KEYS[2], KEYS[3]
local owner, epoch = ARGV[11], ARGV[12]
if redis.call('EXISTS', meta) == 0 then
  if owner == '' then
    return {-1, 0}
  end
  -- A new log, or a lost one started again: leftovers of a lost one (its
  -- list or ids, if they outlived the meta) go, so the epoch starts clean.
  redis.call('DEL', log, ids)
  redis.call('HSET', meta, 'user', owner, 'epoch', epoch, 'seq', 0, 'created_ms', ARGV[5])
elseif owner ~= '' then
  local current = redis.call('HMGET', meta, 'user', 'epoch')
  if current[1] ~= owner or current[2] ~= epoch then
    return {-1, 0}
  end
end
local from, id = ARGV[1], ARGV[2]
if from == 'customer' then
  local seen = redis.call('ZSCORE', ids, id)
  if seen then
    return {0, tonumber(seen)}
  end
end
local seq = redis.call('HINCRBY', meta, 'seq', 1)
local event = cjson.encode({
  seq = seq, from = from, id = id, text = ARGV[3],
  fallback = string.find(ARGV[4], 'f', 1, true) ~= nil,
  interrupted = string.find(ARGV[4], 'i', 1, true) ~= nil,
  cancelled = string.find(ARGV[4], 'c', 1, true) ~= nil,
  at_ms = tonumber(ARGV[5]),
})
local cap = tonumber(ARGV[6])
redis.call('RPUSH', log, event)
redis.call('LTRIM', log, -cap, -1)
if from == 'customer' then
  redis.call('ZADD', ids, seq, id)
  redis.call('ZREMRANGEBYSCORE', ids, '-inf', seq - cap)
end
local ttl = tonumber(ARGV[7])
redis.call('EXPIRE', meta, ttl)
redis.call('EXPIRE', log, ttl)
redis.call('EXPIRE', ids, ttl)
redis.call('PUBLISH', ARGV[8], 'E' .. ARGV[9] .. '\n' .. ARGV[10] .. '\n' .. event)
return {1, seq}
