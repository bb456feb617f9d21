-- Stores an agents' note of a conversation and, if another node listens,
-- publishes it, atomically. The hub encodes the note (see wire.rs) with
-- `seq` and `after` first; this script splices in the note's seq and the
-- conversation's last event seq, and decodes nothing.
-- A note of the same agent with the same id among the latest ARGV[8] is a
-- resend: nothing is stored, and the stored note's seq, after and time
-- come back.
-- KEYS[1] meta hash, KEYS[2] notes list, KEYS[3] listeners hash
-- ARGV: 1 the note's JSON after its `"after":<n>`, 2 cap, 3 retention
--       seconds, 4 channel, 5 this node's id, 6 and 7 the note's agent and
--       id as its JSON holds them (`,"agent":"…",`, `,"id":"…",`), 8 how
--       many of the latest notes to check
-- Returns {seq, after}, {seq, after, at_ms} for a resend, or {} when the
-- conversation does not exist.
local meta = KEYS[1]
if redis.call('EXISTS', meta) == 0 then
  return {}
end
for _, stored in ipairs(redis.call('LRANGE', KEYS[2], -tonumber(ARGV[8]), -1)) do
  if string.find(stored, ARGV[7], 1, true) and string.find(stored, ARGV[6], 1, true) then
    local seq, after = string.match(stored, '^{"seq":(%d+),"after":(%d+)')
    local at = string.match(stored, '"at_ms":(%d+)}$')
    return {tonumber(seq), tonumber(after), tonumber(at)}
  end
end
local seq = redis.call('HINCRBY', meta, 'note_seq', 1)
local after = tonumber(redis.call('HGET', meta, 'seq') or '0')
local entry = '{"seq":' .. string.format('%d', seq) .. ',"after":' .. string.format('%d', after) .. ARGV[1]
redis.call('RPUSH', KEYS[2], entry)
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
local others = redis.call('HLEN', KEYS[3]) - redis.call('HEXISTS', KEYS[3], ARGV[5])
if others > 0 then
  redis.call('PUBLISH', ARGV[4], 'N' .. ARGV[5] .. '\n' .. entry)
end
return {seq, after}
