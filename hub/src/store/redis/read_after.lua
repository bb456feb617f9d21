-- Reads a conversation's position and the events after a seq, atomically.
-- KEYS[1] meta hash, KEYS[2] log list; ARGV[1] after (seq)
-- Returns {} when the conversation does not exist, else {seq, epoch, user,
-- owner, owner name, owner epoch, owner since, {events...}} (owner fields
-- absent mean the assistant, epoch 0).
local m = redis.call('HMGET', KEYS[1], 'seq', 'epoch', 'user', 'owner', 'owner_name', 'owner_epoch', 'owner_since')
if not m[2] then
  return {}
end
local seq = tonumber(m[1])
local n = seq - tonumber(ARGV[1])
local events = {}
if n > 0 then
  events = redis.call('LRANGE', KEYS[2], -n, -1)
end
return {seq, m[2], m[3] or '', m[4] or 'assistant', m[5] or '', tonumber(m[6] or '0'), tonumber(m[7] or '0'), events}
