-- Reads a conversation's position and the events after a seq, atomically.
-- KEYS[1] meta hash, KEYS[2] log list; ARGV[1] after (seq)
-- Returns {} when the conversation does not exist, else {seq, epoch, user, {events...}}.
local m = redis.call('HMGET', KEYS[1], 'seq', 'epoch', 'user')
if not m[2] then
  return {}
end
local seq = tonumber(m[1])
local n = seq - tonumber(ARGV[1])
local events = {}
if n > 0 then
  events = redis.call('LRANGE', KEYS[2], -n, -1)
end
return {seq, m[2], m[3] or '', events}
