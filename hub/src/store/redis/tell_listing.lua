-- Tells the nodes listing a conversation's tenant that it changed, if any
-- node lists it (see presence.rs).
-- KEYS[1] the tenant's listing flag
-- ARGV: 1 the tenant's changes channel, 2 the conversation id
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('PUBLISH', ARGV[1], ARGV[2])
