-- A node starts listening to a conversation (before it subscribes): it
-- enters the conversation's listeners hash, so that appends publish for it,
-- and says hello on the channel, so that nodes streaming into it publish
-- their deltas again. A conversation with no log yet gets no hash: its one
-- socket is on this node, and the append that creates it enters this node.
-- KEYS[1] meta hash, KEYS[2] listeners hash
-- ARGV: 1 node id, 2 retention seconds, 3 channel, 4 the hello payload
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], 1)
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
