-- Change only the given fields of a record, if it exists and belongs to the workspace.
-- When a spending cap changes (rebase = '1'), each cap's baseline is set so that spend
-- already made in its current period counts, but never beyond the cap: a change can leave
-- a key exactly at a cap, never over it (README: "Changing a limit").
-- KEYS: 1 record, 2 usage prefix (kg:u:{id}:)
-- ARGV: 1 required workspace ('' = any), 2 clock override ms ('' = TIME), 3 rebase
--       '1'|'0', 4 number of fields to set, then field/value pairs, then names of fields
--       to clear
-- Returns the whole record after the change, or an empty list if there is none to change.
local ws = redis.call('HGET', KEYS[1], 'workspace_id')
if not ws or (ARGV[1] ~= '' and ws ~= ARGV[1]) then return {} end
local now = math.floor(clock_us(ARGV[2]) / 1000)
local n = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'updated_at', now, unpack(ARGV, 5, 4 + 2 * n))
if #ARGV > 4 + 2 * n then
  redis.call('HDEL', KEYS[1], unpack(ARGV, 5 + 2 * n))
end
if ARGV[3] == '1' then
  local g = redis.call('HMGET', KEYS[1], unpack(CAP_FIELDS))
  local b = buckets(now)
  local base, over_any = {}, false
  for i, cap in ipairs(caps_of(g[1], g[2], g[4])) do
    local used, bucket = counted(KEYS[2], cap, b, g[3] == '1', nil)
    if used > cap[2] then
      base[i], over_any = {bucket, used - cap[2]}, true
    else
      base[i] = {'', 0}
    end
  end
  if over_any then
    redis.call('HSET', KEYS[1], 'cap_base', cjson.encode(base))
  else
    redis.call('HDEL', KEYS[1], 'cap_base')
  end
end
return redis.call('HGETALL', KEYS[1])
