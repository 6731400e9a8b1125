-- The proxy's decision before forwarding: may this presented hash act as this key now?
-- KEYS: 1 record
-- ARGV: 1 presented sha256
-- Returns {status, now_ms, id, workspace_id, user_id, scopes_json, resources_json|false}
-- with status ok|not_found|disabled|expired. Only the fields the proxy needs travel back.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local f = redis.call('HMGET', KEYS[1], 'hash', 'grace_hash', 'grace_until', 'disabled',
  'expires_at', 'id', 'workspace_id', 'user_id', 'scopes', 'resources')
local presented = ARGV[1]
if not f[1] then return {'not_found', now} end
if f[1] ~= presented and not (f[2] == presented and now < tonumber(f[3] or '0')) then
  return {'not_found', now}
end
local status = 'ok'
if f[4] == '1' then
  status = 'disabled'
elseif f[5] and now >= tonumber(f[5]) then
  status = 'expired'
end
return {status, now, f[6], f[7], f[8], f[9], f[10]}
