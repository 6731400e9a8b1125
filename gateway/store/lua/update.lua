-- Change only the given fields of a record, if it exists and belongs to the workspace.
-- KEYS: 1 record
-- ARGV: 1 required workspace ('' = any), 2 number of fields to set, then field/value
--       pairs, then names of fields to clear
-- Returns the whole record after the change, or an empty list if there is none to change.
local ws = redis.call('HGET', KEYS[1], 'workspace_id')
if not ws or (ARGV[1] ~= '' and ws ~= ARGV[1]) then return {} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'updated_at', now, unpack(ARGV, 3, 2 + 2 * n))
if #ARGV > 2 + 2 * n then
  redis.call('HDEL', KEYS[1], unpack(ARGV, 3 + 2 * n))
end
return redis.call('HGETALL', KEYS[1])
