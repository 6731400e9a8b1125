-- Create a key record atomically, refusing a secret hash that is already known.
-- KEYS: 1 hash->id, 2 record (one slot: see gateway/store/slots.py)
-- ARGV: 1 key id, 2 created_at (ms, the instant of its listing index member),
--       3.. record field/value pairs
-- Returns 1 on success, -1 if the hash exists, -2 if the id exists.
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -2 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'created_at', ARGV[2], 'updated_at', ARGV[2], unpack(ARGV, 3))
return 1
