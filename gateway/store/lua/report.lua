-- A key's record with its usage now: every period's spend, each cap's counted spend and
-- reset, and its rate state. For GET /v1/key (with the presented hash checked) and for
-- the management API (ARGV[1] = '').
-- KEYS: 1 record, 2 usage prefix (kg:u:{id}:), 3 the key's rate state
-- ARGV: 1 presented sha256 or '', 2 clock override ms ('' = TIME)
-- Returns {status, now_ms} for not_found, else {status, now_ms, record (flat field/value
-- list), usage {daily, weekly, monthly, total, then the four BYOK ones}, period ends
-- {daily, weekly, monthly} (ms), caps {name, amount, period, counted, resets_at_ms, ...},
-- rate state (GCRA theoretical arrival time in us) or false, usage per model {daily,
-- weekly, monthly: each its hash flat, model, 'cost input output requests', ...}}.
local now = math.floor(clock_us(ARGV[2]) / 1000)
local record = redis.call('HGETALL', KEYS[1])
if #record == 0 then return {'not_found', now} end
local f = {}
for i = 1, #record, 2 do f[record[i]] = record[i + 1] end
local status = 'ok'
if ARGV[1] ~= '' then
  local presented = ARGV[1]
  if f.hash ~= presented
    and not (f.grace_hash == presented and now < tonumber(f.grace_until or '0')) then
    return {'not_found', now}
  end
end
if f.disabled == '1' then
  status = 'disabled'
elseif f.expires_at and now >= tonumber(f.expires_at) then
  status = 'expired'
end
local b = buckets(now)
local usage = {}
for _, p in ipairs({'', 'b'}) do
  for _, period in ipairs({'daily', 'weekly', 'monthly', 'total'}) do
    usage[#usage + 1] = tonumber(redis.call('GET', KEYS[2] .. p .. b[period]) or '0')
  end
end
local caps = {}
local base = f.cap_base and cjson.decode(f.cap_base) or {}
for i, cap in ipairs(caps_of(f.limit_micro, f.limit_reset, f.spend_caps)) do
  local used = counted(KEYS[2], cap, b, f.include_byok_in_limit == '1', base[i])
  for _, v in ipairs({cap[1], cap[2], cap[3], used, resets_at(cap, b)}) do
    caps[#caps + 1] = v
  end
end
local models = {}
for _, period in ipairs({'daily', 'weekly', 'monthly'}) do
  models[#models + 1] = redis.call('HGETALL', KEYS[2] .. MODEL_BUCKETS .. b[period])
end
return {status, now, record, usage, {b.daily_end, b.weekly_end, b.monthly_end}, caps,
  redis.call('GET', KEYS[3]), models}
