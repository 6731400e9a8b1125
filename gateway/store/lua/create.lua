-- Create a key record atomically, refusing a secret hash that is already known.
-- KEYS: 1 hash->id, 2 record, 3 workspace index, 4 org index
-- ARGV: 1 key id, 2.. record field/value pairs
-- Returns the server time in ms on success, -1 if the hash exists, -2 if the id exists.
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -2 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'created_at', now, 'updated_at', now, unpack(ARGV, 2))
-- Members sort by creation time then id: a lexicographic cursor never skips or repeats.
local member = string.format('%015d', now) .. ':' .. ARGV[1]
redis.call('ZADD', KEYS[3], 0, member)
redis.call('ZADD', KEYS[4], 0, member)
return now
