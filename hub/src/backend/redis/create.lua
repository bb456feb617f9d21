-- Creates a conversation log, or revives a lost one, atomically.
-- KEYS[1] meta hash, KEYS[2] log list, KEYS[3] message-id zset
-- ARGV: 1 user, 2 new epoch, 3 now_ms, 4 retention seconds
-- A missing meta means a new or lost log: leftovers of a lost one (its list
-- or ids, if they outlived the meta) are deleted so the new epoch starts clean.
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('HSET', KEYS[1], 'user', ARGV[1], 'epoch', ARGV[2], 'seq', 0, 'created_ms', ARGV[3])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
