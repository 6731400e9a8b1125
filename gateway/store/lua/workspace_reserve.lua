-- Reserve a request's expected cost against its workspace's budget (the proxy's second
-- script, after authorize.lua admitted the key; docs/management-api.md, "Workspace
-- budgets"), atomic on the workspace's slot: resolve the workspace's ledger entries whose
-- lease ended unsettled, then every cap must have room for the reservation (a cap used up
-- refuses even a reservation of 0), then the reservation is added to the usage buckets
-- and its ledger entry written, in the formats of a key's (lib.lua), so that settle.lua
-- settles it unchanged. BYOK spend is never sent here: workspace caps count the rest.
-- KEYS: 1 the budget hash, 2 usage prefix (kg:wu:{w:<id>}:), 3 ledger, 4 ledger entries
-- ARGV: 1 clock override ms ('' = TIME), 2 reserve (micro), 3 the entry's request id,
--       4 its lease (ms), 5 at its lease end 'c' charge | 'r' refund
-- Returns {status, now_ms, expired entries charged, expired entries refunded, ...}:
-- 'ok' (reserved, entry written); 'uncapped' (the workspace has no caps now: nothing
-- written); 'spend_limited' then cap name, amount, period, counted spend, resets_at_ms
-- (0: never) of the cap that blocks longest.
local now = math.floor(clock_us(ARGV[1]) / 1000)
local charged, refunded = resolve_expired(KEYS[3], KEYS[4], KEYS[2], now, nil)
local caps = caps_of(nil, nil, redis.call('HGET', KEYS[1], 'spend_caps'))
if #caps == 0 then return {'uncapped', now, charged, refunded} end
local reserve = tonumber(ARGV[2])
local b = buckets(now)
local blocking = nil
for _, cap in ipairs(caps) do
  local used = counted(KEYS[2], cap, b, false, nil)
  if used >= cap[2] or used + reserve > cap[2] then
    local at = resets_at(cap, b)
    -- The cap that blocks longest: the request can pass only once it resets.
    if not blocking or at == 0 or (blocking[5] ~= 0 and at > blocking[5]) then
      blocking = {'workspace.' .. cap[1], cap[2], cap[3], used, at}
    end
  end
end
if blocking then return {'spend_limited', now, charged, refunded, unpack(blocking)} end
if reserve > 0 then add_usage(KEYS[2], b, false, reserve) end
local lease_end = now + tonumber(ARGV[4])
redis.call('ZADD', KEYS[3], lease_end, ARGV[3])
redis.call('HSET', KEYS[4], ARGV[3], string.format('p:%d:%d:0:%s:%d', reserve, now, ARGV[5],
  lease_end))
return {'ok', now, charged, refunded}
