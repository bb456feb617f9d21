-- Per-tenant counts shared by the nodes of a cluster, atomically.
-- ARGV[1] is the operation; the time is Redis's own (TIME), so the nodes'
-- clocks do not matter.
--
-- connect  KEYS[1] the tenant's connections zset (lease id -> expiry, ms)
--          ARGV 2 lease id, 3 lease ms, 4 cap
--          -> 1 counted, 0 the tenant is at its cap
-- release  KEYS[1] the zset; ARGV 2 lease id -> 1
-- renew    KEYS[1] the zset; ARGV 2 lease ms, 3.. lease ids -> 1
-- message  KEYS[1] the user's GCRA state (theoretical arrival time, ms)
--          ARGV 2 max messages, 3 window ms (a burst of max, then one
--          per window/max) -> 0 counted, else ms until one would be
local op = ARGV[1]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
if op == 'connect' then
  local lease, ttl, cap = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= cap then
    return 0
  end
  redis.call('ZADD', KEYS[1], now + ttl, lease)
  redis.call('PEXPIRE', KEYS[1], ttl)
  return 1
elseif op == 'release' then
  redis.call('ZREM', KEYS[1], ARGV[2])
  return 1
elseif op == 'renew' then
  local ttl = tonumber(ARGV[2])
  for i = 3, #ARGV do
    redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  end
  redis.call('PEXPIRE', KEYS[1], ttl)
  return 1
elseif op == 'message' then
  local max, window = tonumber(ARGV[2]), tonumber(ARGV[3])
  local interval = window / max
  local tat = tonumber(redis.call('GET', KEYS[1]) or now)
  if tat < now then
    tat = now
  end
  local allowed_at = tat + interval - window
  if allowed_at > now then
    return math.max(1, math.ceil(allowed_at - now))
  end
  local next_tat = tat + interval
  redis.call('SET', KEYS[1], string.format('%.3f', next_tat), 'PX', math.ceil(next_tat - now) + 1)
  return 0
end
return redis.error_reply('unknown operation')
