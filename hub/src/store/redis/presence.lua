-- Sets this node's presence entry of a conversation, valid for the TTL,
-- if the conversation exists (see presence.rs).
-- KEYS[1] presence hash, KEYS[2] meta hash
-- ARGV: 1 node id, 2 `<until ms>\n<entry>`, 3 TTL in ms
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
