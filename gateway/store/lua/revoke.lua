-- Delete a key and every way to reach it, if its hash is still the one the caller read.
-- KEYS: 1 record, 2 hash->id (current), 3 hash->id (grace, may repeat 2),
--       4 workspace index, 5 org index, 6 rate state, 7 total usage, 8 total BYOK usage
-- ARGV: 1 expected current hash, 2 index member
-- Returns 1 when deleted, 0 when the record is gone, -1 when it changed meanwhile.
local current = redis.call('HGET', KEYS[1], 'hash')
if not current then return 0 end
if current ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[6], KEYS[7], KEYS[8])
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('ZREM', KEYS[5], ARGV[2])
return 1
