-- Counts one conversation creation against its user's cap, atomically.
-- KEYS[1] the user's `created` zset (conversation id -> created at, ms)
-- ARGV: 1 conversation id, 2 now_ms, 3 window ms, 4 cap
-- Returns 1 when counted (or counted before: a retried first message),
-- 0 when the user already created `cap` conversations within the window.
local created, id = KEYS[1], ARGV[1]
local now, window, cap = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', created, '-inf', now - window)
if redis.call('ZSCORE', created, id) then
  return 1
end
if redis.call('ZCARD', created) >= cap then
  return 0
end
redis.call('ZADD', created, now, id)
redis.call('PEXPIRE', created, window)
return 1
