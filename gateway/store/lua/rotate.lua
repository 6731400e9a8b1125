-- Give a key a new secret hash; the old one stays valid for a grace period.
-- KEYS: 1 record, 2 new hash->id, 3 current hash->id, 4 previous grace hash->id (may
--       repeat 3)
-- ARGV: 1 expected current hash, 2 new hash, 3 grace ms, 4 new prefix, 5 new label,
--       6 required workspace ('' = any)
-- Returns the record after rotation, {-1} if it changed meanwhile, {-2} if the new hash
-- is taken, or an empty list if there is no such key in the workspace.
local f = redis.call('HMGET', KEYS[1], 'hash', 'workspace_id', 'id')
if not f[1] or (ARGV[6] ~= '' and f[2] ~= ARGV[6]) then return {} end
if f[1] ~= ARGV[1] then return {-1} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {-2} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local grace = tonumber(ARGV[3])
if KEYS[4] ~= KEYS[3] then redis.call('DEL', KEYS[4]) end
redis.call('SET', KEYS[2], f[3])
if grace > 0 then
  redis.call('PEXPIRE', KEYS[3], grace)
  redis.call('HSET', KEYS[1], 'grace_hash', ARGV[1], 'grace_until', now + grace)
else
  redis.call('DEL', KEYS[3])
  redis.call('HDEL', KEYS[1], 'grace_hash', 'grace_until')
end
redis.call('HSET', KEYS[1], 'hash', ARGV[2], 'prefix', ARGV[4], 'label', ARGV[5], 'updated_at', now)
return redis.call('HGETALL', KEYS[1])
