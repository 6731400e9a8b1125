-- Decide whether a presented secret hash may act as the key it maps to.
-- KEYS: 1 record
-- ARGV: 1 presented sha256
-- Returns {status, now_ms, field, value, ...}; status is ok|not_found|disabled|expired.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local record = redis.call('HGETALL', KEYS[1])
if #record == 0 then return {'not_found', now} end
local f = {}
for i = 1, #record, 2 do f[record[i]] = record[i + 1] end
local presented = ARGV[1]
local valid = f.hash == presented
  or (f.grace_hash == presented and now < tonumber(f.grace_until or '0'))
if not valid then return {'not_found', now} end
local status = 'ok'
if f.disabled == '1' then
  status = 'disabled'
elseif f.expires_at and now >= tonumber(f.expires_at) then
  status = 'expired'
end
local reply = {status, now}
for i = 1, #record do reply[i + 2] = record[i] end
return reply
