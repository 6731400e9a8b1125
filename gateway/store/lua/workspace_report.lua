-- A workspace's budget now (GET /v1/workspaces/{id}, keygate workspaces show): its caps
-- with their counted spend and reset, its usage per period, and its requests in flight
-- (pending ledger entries whose lease has not ended) with what they reserve. Reads only.
-- KEYS: 1 the budget hash, 2 usage prefix (kg:wu:{w:<id>}:), 3 ledger entries
-- ARGV: 1 clock override ms ('' = TIME)
-- Returns {now_ms, usage {daily, weekly, monthly, total}, caps {name, amount, period,
-- counted, resets_at_ms, ...}, in flight, reserved (micro), updated_at ms or false, usage
-- per model {daily, weekly, monthly: each its hash flat (lib.lua's add_model_usage)}}.
local now = math.floor(clock_us(ARGV[1]) / 1000)
local b = buckets(now)
local usage = {}
for _, period in ipairs({'daily', 'weekly', 'monthly', 'total'}) do
  usage[#usage + 1] = tonumber(redis.call('GET', KEYS[2] .. b[period]) or '0')
end
local f = redis.call('HMGET', KEYS[1], 'spend_caps', 'updated_at')
local caps = {}
for _, cap in ipairs(caps_of(nil, nil, f[1])) do
  local used = counted(KEYS[2], cap, b, false, nil)
  for _, v in ipairs({'workspace.' .. cap[1], cap[2], cap[3], used, resets_at(cap, b)}) do
    caps[#caps + 1] = v
  end
end
local in_flight, reserved = 0, 0
for _, entry in ipairs(redis.call('HVALS', KEYS[3])) do
  local amount, lease_end = string.match(entry, '^p:(%-?%d+):%d+:[01]:[cr]:(%d+)$')
  if amount and tonumber(lease_end) > now then
    in_flight = in_flight + 1
    reserved = reserved + tonumber(amount)
  end
end
local models = {}
for _, period in ipairs({'daily', 'weekly', 'monthly'}) do
  models[#models + 1] = redis.call('HGETALL', KEYS[2] .. MODEL_BUCKETS .. b[period])
end
return {now, usage, caps, in_flight, reserved, f[2] or false, models}
