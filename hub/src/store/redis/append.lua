-- Appends one durable event to a conversation log and, if another node
-- listens to the conversation, publishes it, atomically. The event that
-- creates a log is always published: nodes that still have sockets of a
-- lost log of the conversation are in no listeners hash any more, and
-- learn of the new log from it (they listen again, see bus.rs).
-- The hub encodes the event (see wire.rs); this script only splices in the
-- seq it assigns, so an entry is never decoded nor re-encoded here.
-- KEYS[1] meta hash, KEYS[2] log list, KEYS[3] message-id zset,
-- KEYS[4] listeners hash (node id -> 1, for each node with a socket of it),
-- KEYS[5] the tenant's active zset, KEYS[6] the tenant's listing flag,
-- KEYS[7] the agents' notes list (it lives and dies with the log: its
-- expiry is refreshed with the other keys', and a lost log's notes go
-- when the log is started again), KEYS[8] (optional) the writer's
-- `latest` pointer (see keys.rs): the
-- conversation becomes their most recent, active now, whatever the outcome
-- but -3; KEYS[9] (optional, with KEYS[8]) the creator's `created` zset
-- (conversation id -> created at, ms): creating the log counts against the
-- creator's cap, ARGV 22 conversations per ARGV 23 ms (a conversation
-- counted within the window, e.g. a lost log started again, counts once)
-- ARGV: 1 the message's key to de-duplicate by ("" for other events; a
--       customer's is its id, an agent's starts with \1, see dedup_key in
--       event.rs), 2 and 3 the log entry before
--       and after its seq, 4 the published payload before the entry,
--       5 now_ms, 6 log cap, 7 retention seconds, 8 channel,
--       9 owner and 10 epoch to create the log with if it is missing
--       (both "" to never create), 11 this node's id, 12 how many entries
--       before the new one to return (a question's history; 0 for none),
--       13 and 14 the epoch and last seq the hub knows those entries at
--       ("" and 0 for none): when the log is at exactly these, the entries
--       are not read (the hub has them, see recent.rs),
--       15 the owner operation: "" none, "fence" (store only if 16 owns
--       it and, unless 17 is "", under owner epoch 17), "change" (store
--       only if the owner epoch is 17; then 16, named 18, owns it under
--       17 + 1, since 5), 19 the conversation id, 20 the tenant's changes
--       channel (published to only while the listing flag exists), 21 the
--       seconds between two refreshes of the keys' expiry: the keys expire
--       7 + 21 seconds after the last refresh, which is made when that
--       much has passed (`refreshed_ms` in the meta hash), so they live at
--       least 7 seconds after the last append (see Retention in mod.rs)
-- Returns one string (decoded by answer.rs, which describes it): status 1
-- with the seq, the other listening nodes, the entries before when read,
-- the epoch and the owner fields when stored; 0 and the seq for a message
-- already stored; -1 when the conversation does not exist (lost or
-- expired), or, when creating, exists with another owner or epoch; -2
-- and the owner fields when the owner operation found another owner or
-- epoch (nothing stored); -3 when creating the log would exceed the
-- creator's cap (nothing of the conversation, nor `latest`, written).
-- Owner fields absent from the meta hash mean the assistant, epoch 0.
local meta, log, ids = KEYS[1], KEYS[2], KEYS[3]
local function answer(status, seq, others, before, epoch, owner, name, owner_epoch, owner_since)
  local head = {status, seq, others, owner_epoch, owner_since, before and #before or -1, #epoch, #owner, #name}
  local body = {epoch, owner, name}
  if before then
    for i = 1, #before do
      head[#head + 1] = #before[i]
      body[#body + 1] = before[i]
    end
  end
  for i = 1, #head do
    head[i] = string.format('%d', head[i])
  end
  return table.concat(head, ' ') .. '\n' .. table.concat(body)
end
local owner, epoch = ARGV[9], ARGV[10]
local now = tonumber(ARGV[5])
local current = redis.call('HMGET', meta, 'user', 'epoch', 'seq', 'owner', 'owner_name', 'owner_epoch',
  'owner_since', 'refreshed_ms', 'customer_at')
if KEYS[9] and not current[2] and owner ~= '' then
  local created_set, window = KEYS[9], tonumber(ARGV[23])
  redis.call('ZREMRANGEBYSCORE', created_set, '-inf', now - window)
  if not redis.call('ZSCORE', created_set, ARGV[19]) then
    if redis.call('ZCARD', created_set) >= tonumber(ARGV[22]) then
      return answer(-3, 0, 0, false, '', '', '', 0, 0)
    end
    redis.call('ZADD', created_set, now, ARGV[19])
    redis.call('PEXPIRE', created_set, window)
  end
end
if KEYS[8] then
  redis.call('HSET', KEYS[8], 'conversation', ARGV[19], 'last_active_ms', ARGV[5])
  redis.call('EXPIRE', KEYS[8], ARGV[7])
end
local created = false
if not current[2] then
  if owner == '' then
    return answer(-1, 0, 0, false, '', '', '', 0, 0)
  end
  -- A new log, or a lost one started again: leftovers of a lost one (its
  -- list, ids or notes, if they outlived the meta) go, so the epoch starts
  -- clean (its notes' seqs start again at 1 with the meta's `note_seq`).
  redis.call('DEL', log, ids, KEYS[7])
  redis.call('HSET', meta, 'user', owner, 'epoch', epoch, 'seq', 0, 'created_ms', ARGV[5])
  -- The creating socket listens on this node (see listen.lua).
  redis.call('HSET', KEYS[4], ARGV[11], 1)
  current[1], current[2], current[3] = owner, epoch, '0'
  created = true
elseif owner ~= '' and (current[1] ~= owner or current[2] ~= epoch) then
  return answer(-1, 0, 0, false, '', '', '', 0, 0)
end
epoch = current[2]
-- A resend of a stored message is acknowledged again, whoever owns it now.
local id = ARGV[1]
if id ~= '' then
  local seen = redis.call('ZSCORE', ids, id)
  if seen then
    return answer(0, tonumber(seen), 0, false, '', '', '', 0, 0)
  end
end
local owner_now, owner_name = current[4] or 'assistant', current[5] or ''
local owner_epoch, owner_since = tonumber(current[6] or '0'), tonumber(current[7] or '0')
local op = ARGV[15]
if op == 'fence' then
  if owner_now ~= ARGV[16] or (ARGV[17] ~= '' and owner_epoch ~= tonumber(ARGV[17])) then
    return answer(-2, 0, 0, false, '', owner_now, owner_name, owner_epoch, owner_since)
  end
elseif op == 'change' then
  if owner_epoch ~= tonumber(ARGV[17]) then
    return answer(-2, 0, 0, false, '', owner_now, owner_name, owner_epoch, owner_since)
  end
  owner_now, owner_name, owner_epoch, owner_since = ARGV[16], ARGV[18], owner_epoch + 1, tonumber(ARGV[5])
  redis.call('HSET', meta, 'owner', owner_now, 'owner_name', owner_name, 'owner_epoch', owner_epoch,
    'owner_since', owner_since)
end
local before = false
local wanted = tonumber(ARGV[12])
if wanted > 0 and not (epoch == ARGV[13] and current[3] == ARGV[14]) then
  before = redis.call('LRANGE', log, -wanted, -1)
end
local ttl, refresh = tonumber(ARGV[7]), tonumber(ARGV[21])
local expire = ttl + refresh
-- Due when created (the keys have no expiry yet), `refresh` seconds after
-- the last refresh, or when that refresh is in this node's future (clocks
-- differ: better to refresh often than too late).
local since = now - tonumber(current[8] or '0')
local due = created or since >= refresh * 1000 or since < 0
-- The seq read above, plus one: nothing else ran in between. One HSET
-- writes it and the times this append sets.
local seq = tonumber(current[3]) + 1
local fields = {'seq', string.format('%d', seq)}
local customer = id ~= '' and string.byte(id, 1) ~= 1
if customer then
  fields[#fields + 1], fields[#fields + 2] = 'customer_at', ARGV[5]
end
if due then
  fields[#fields + 1], fields[#fields + 2] = 'refreshed_ms', ARGV[5]
end
redis.call('HSET', meta, unpack(fields))
local entry = ARGV[2] .. string.format('%d', seq) .. ARGV[3]
local cap = tonumber(ARGV[6])
if redis.call('RPUSH', log, entry) > cap then
  redis.call('LTRIM', log, -cap, -1)
end
if id ~= '' then
  redis.call('ZADD', ids, seq, id)
  if seq > cap then
    redis.call('ZREMRANGEBYSCORE', ids, '-inf', seq - cap)
  end
  -- The set always holds the last id stored (the trim keeps it), so it
  -- exists, with an expiry, once a customer message was stored in this
  -- epoch (a created log is due); otherwise this append may have created it.
  if not due and not current[9] then
    redis.call('EXPIRE', ids, expire)
  end
end
-- The agents' list: the tenant's conversations by last activity, and a
-- doorbell for the nodes listing it (nothing when no console is open).
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[19])
if due then
  redis.call('EXPIRE', meta, expire)
  redis.call('EXPIRE', log, expire)
  redis.call('EXPIRE', ids, expire)
  redis.call('EXPIRE', KEYS[4], expire)
  redis.call('EXPIRE', KEYS[7], expire)
  -- The active set outlives each of its conversations' refreshes; its
  -- entries past the retention go here, not on every append.
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - ttl * 1000)
  redis.call('EXPIRE', KEYS[5], expire)
end
if redis.call('EXISTS', KEYS[6]) == 1 then
  redis.call('PUBLISH', ARGV[20], ARGV[19])
end
-- This node's sockets had the event at once: only other nodes need it.
local others = redis.call('HLEN', KEYS[4]) - redis.call('HEXISTS', KEYS[4], ARGV[11])
if others > 0 or created then
  redis.call('PUBLISH', ARGV[8], ARGV[4] .. epoch .. '\n' .. entry)
end
return answer(1, seq, others, before, epoch, owner_now, owner_name, owner_epoch, owner_since)
