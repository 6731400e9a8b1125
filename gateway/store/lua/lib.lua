-- Shared by the scripts that read or write usage (prepended to each; see store/scripts.py).
-- Periods, bucket names and spending caps live here once, so the decision before a
-- request (authorize), its settlement and every report agree to the micro-unit.
-- gateway/usage/periods.py mirrors the period arithmetic; a test checks that they agree.

local DAY = 86400000

-- The script's clock in microseconds: the server's TIME, so that every replica agrees, or
-- a test's instant in ms ('' = TIME).
local function clock_us(override)
  if override ~= nil and override ~= '' then return tonumber(override) * 1000 end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Days since 1970-01-01 -> y, m, d (proleptic Gregorian; Howard Hinnant's algorithm).
local function civil(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return y, m, d
end

local function days_from_civil(y, m, d)
  y = y - (m <= 2 and 1 or 0)
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * (m > 2 and m - 3 or m + 9) + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- The buckets an instant falls in: name and end (ms) of its UTC day, ISO week, month.
local function buckets(ms)
  local days = math.floor(ms / DAY)
  local y, m, d = civil(days)
  local weekday = (days + 3) % 7 -- 0 = Monday (1970-01-01 was a Thursday)
  local monday = days - weekday
  local iso_year = civil(monday + 3) -- the week belongs to the year of its Thursday
  local week = math.floor((monday + 3 - days_from_civil(iso_year, 1, 1)) / 7) + 1
  local next_y, next_m = y, m + 1
  if next_m == 13 then next_y, next_m = y + 1, 1 end
  return {
    daily = string.format('d:%04d%02d%02d', y, m, d),
    weekly = string.format('w:%04dW%02d', iso_year, week),
    monthly = string.format('m:%04d%02d', y, m),
    total = 't',
    daily_end = (days + 1) * DAY,
    weekly_end = (monday + 7) * DAY,
    monthly_end = days_from_civil(next_y, next_m, 1) * DAY,
  }
end

-- The buckets of `ms` from the caller's hint, when `ms` falls in the hinted UTC day:
-- hint[i] day start, then the daily, weekly and monthly names, then their three ends (ms),
-- as gateway/usage/periods.py:day_hint gives them; otherwise (a wrong or absent hint, a
-- client clock off by a day boundary) computed here. Names cost ~3 us of Lua otherwise.
local function buckets_at(ms, hint, i)
  local start = tonumber(hint[i])
  if start and ms >= start and ms < tonumber(hint[i + 4]) then
    return {daily = hint[i + 1], weekly = hint[i + 2], monthly = hint[i + 3], total = 't',
      daily_end = tonumber(hint[i + 4]), weekly_end = tonumber(hint[i + 5]),
      monthly_end = tonumber(hint[i + 6])}
  end
  return buckets(ms)
end

-- How long a bucket outlives its period: enough for the history GET .../usage serves
-- (90 days, 26 weeks, 24 months).
local KEEP = {daily = 92 * DAY, weekly = 189 * DAY, monthly = 762 * DAY}

-- Add delta micro-units to every bucket of one instant (the BYOK ones when byok).
local function add_usage(prefix, b, byok, delta)
  local p = byok and 'b' or ''
  for _, period in ipairs({'daily', 'weekly', 'monthly'}) do
    local key = prefix .. p .. b[period]
    -- A bucket gets its expiry when it is created (its value is then the delta); one
    -- that already existed has it, so the common case is a single command.
    if redis.call('INCRBY', key, delta) == delta then
      redis.call('PEXPIREAT', key, b[period .. '_end'] + KEEP[period])
    end
  end
  redis.call('INCRBY', prefix .. p .. 't', delta)
end

-- The record fields every cap computation reads, in HMGET order after the caller's own.
local CAP_FIELDS = {'limit_micro', 'limit_reset', 'include_byok_in_limit', 'spend_caps',
  'cap_base'}

-- The key's caps from those fields: {name, amount, period} each; `limit` first.
local function caps_of(limit, reset, spend_caps)
  local caps = {}
  if limit then caps[1] = {'limit', tonumber(limit), reset or 'total'} end
  if spend_caps then
    for i, cap in ipairs(cjson.decode(spend_caps)) do
      caps[#caps + 1] = {'spend_caps[' .. (i - 1) .. ']', cap[1], cap[2]}
    end
  end
  return caps
end

-- Spend that counts against a cap in bucket b: the period's usage (plus BYOK usage when
-- it is included), less the baseline recorded when the cap was set in this same bucket.
local function counted(prefix, cap, b, with_byok, base)
  local bucket = b[cap[3]]
  local used = tonumber(redis.call('GET', prefix .. bucket) or '0')
  if with_byok then used = used + tonumber(redis.call('GET', prefix .. 'b' .. bucket) or '0') end
  if base and base[1] == bucket then used = used - base[2] end
  return used, bucket
end

-- When a cap resets (ms), or 0 for a cap over all time.
local function resets_at(cap, b)
  if cap[3] == 'total' then return 0 end
  return b[cap[3] .. '_end']
end

-- The reservation ledger (docs/architecture.md, "The reservation ledger"). Per key, a
-- sorted set of request ids scored by when something is due, and a hash of entries:
--   'p:<amount>:<authorized ms>:<byok 0|1>:<c|r>:<lease end ms>'  pending: reserved and not
--       settled yet; at its lease end it is charged (c) or refunded (r)
--   'c:<amount>:<authorized ms>:<byok>' or 'r:...'  resolved at its lease end, unsettled; a
--       late settlement still makes its charge the actual cost, once
-- A resolved entry is kept LEDGER_KEEP after its resolution, then forgotten. A key with
-- max_in_flight also lists its pending ids in a second sorted set, by lease end (authorize
-- counts them there); an id leaves it when its entry is settled or resolved.
local LEDGER_KEEP = DAY
local RESOLVE_PER_CALL = 100 -- bounds one script's work; the next call resolves the rest

-- Resolve the entries of a key whose lease ended unsettled (their process died, or their
-- settlement never got through), and forget resolved ones kept long enough.
-- ``pending``: the key's sorted set of pending ids, or nil. Returns how many were charged
-- and how many refunded.
local function resolve_expired(ledger, entries, usage, now, pending)
  local due = redis.call('ZRANGEBYSCORE', ledger, '-inf', now, 'LIMIT', 0, RESOLVE_PER_CALL)
  if #due == 0 then return 0, 0 end
  local charged, refunded = 0, 0
  for _, id in ipairs(due) do
    local entry = redis.call('HGET', entries, id)
    local amount, at, byok, rule
    if entry then
      amount, at, byok, rule = string.match(entry, '^p:(%-?%d+):(%d+):([01]):([cr])')
    end
    if rule then
      if rule == 'r' then
        local micro = tonumber(amount)
        if micro ~= 0 then add_usage(usage, buckets(tonumber(at)), byok == '1', -micro) end
        refunded = refunded + 1
      else
        charged = charged + 1 -- the reservation already counts in usage
      end
      redis.call('HSET', entries, id, rule .. ':' .. amount .. ':' .. at .. ':' .. byok)
      redis.call('ZADD', ledger, now + LEDGER_KEEP, id)
    else
      redis.call('HDEL', entries, id)
      redis.call('ZREM', ledger, id)
    end
  end
  if pending then redis.call('ZREM', pending, unpack(due)) end
  return charged, refunded
end

-- Usage per model (GET /v1/key's usage_by_model), per key or workspace and bucket: a hash
-- model -> '<cost micro> <input tokens> <output tokens> <requests>', named usage prefix ..
-- MODEL_BUCKETS .. bucket (gateway/store/names.py: model_usage), so on the usage's slot. Storage is bounded: at most MODELS_PER_BUCKET named models per bucket; the
-- requests of any further model are counted under 'other' (a model named 'other' shares
-- it). Kept as long as the usage buckets (KEEP); sums exact up to 2^53.
local MODEL_BUCKETS = 'models:'
local MODELS_PER_BUCKET = 32

-- One model's sums {cost, input, output, requests} added to its fields in the buckets b.
local function add_model_usage(prefix, b, model, sums)
  for _, period in ipairs({'daily', 'weekly', 'monthly'}) do
    local key = prefix .. MODEL_BUCKETS .. b[period]
    local field = model
    local was = redis.call('HGET', key, field)
    local fresh = false
    if not was then
      local count = redis.call('HLEN', key)
      fresh = count == 0
      -- Full when MODELS_PER_BUCKET fields besides 'other' exist.
      if field ~= 'other' and count >= MODELS_PER_BUCKET
        and (count > MODELS_PER_BUCKET or redis.call('HEXISTS', key, 'other') == 0) then
        field = 'other'
        was = redis.call('HGET', key, field)
      end
    end
    local c, i, o, n = 0, 0, 0, 0
    if was then
      local wc, wi, wo, wn = string.match(was, '^(%-?%d+) (%d+) (%d+) (%d+)$')
      if wn then c, i, o, n = tonumber(wc), tonumber(wi), tonumber(wo), tonumber(wn) end
    end
    redis.call('HSET', key, field, string.format('%d %d %d %d', c + sums[1], i + sums[2],
      o + sums[3], n + sums[4]))
    if fresh then redis.call('PEXPIREAT', key, b[period .. '_end'] + KEEP[period]) end
  end
end

-- Settle requests of one key (settle.lua; the authorize script too, for settlements that
-- ride along with the key's next authorization). For each (request id, actual cost, usage
-- note) triple in args[from], args[from + 1], args[from + 2], ...: a pending entry gets
-- (actual - reservation); an entry resolved at its lease end gets (actual - reservation)
-- when it was charged, the actual cost when it was refunded; an id with no entry was
-- settled already (or its entry forgotten): nothing. Either way the entry is gone after,
-- so a settlement applied twice changes nothing. Deltas go to the buckets of the instant
-- the request was authorized, so a request that straddles midnight is charged to one day
-- only; they are summed per UTC day and BYOK flag, then written once each: exact
-- (integers), and the same buckets, since every instant of one day falls in the same day,
-- week and month. The usage note is '' (no token usage) or '<model>\t<input tokens>\t<output
-- tokens>' (gateway/proxy/settle.py: usage_note): a settled entry with one adds its actual
-- cost, its tokens and one request to its model's usage in the same buckets (BYOK or not),
-- summed per day and model likewise; a note that does not parse adds nothing.
-- ``hint``: the caller's day hint at args[hint] (buckets_at), or nil. ``pending``: the
-- key's pending ids (max_in_flight's count), or nil. Returns how many were settled,
-- settled after their lease was resolved, and already settled.
-- The token limits' windows in a key's record (gateway/policies/tokens.py), read when a
-- settlement first needs them: {limits, windows, used} or false (the key has none).
local function token_windows(record)
  local f = redis.call('HMGET', record, 'token_limits', 'tk_w1', 'tk_w2', 'tk_w3', 'tk_w4',
    'tk_u1', 'tk_u2', 'tk_u3', 'tk_u4')
  if not f[1] then return false end
  local limits, windows, used = cjson.decode(f[1]), {}, {}
  for i = 1, 4 do windows[i], used[i] = tonumber(f[1 + i] or ''), tonumber(f[5 + i] or '0') end
  return {limits, windows, used, false}
end

-- An entry's token estimate (the 7th field a pending entry holds; none on late or
-- workspace entries) replaced by the tokens its answer used, in each window of the key's
-- token limits that is still the one it was admitted in.
local function true_up_tokens(state, entry, at, input, output)
  local estimate = tonumber(string.match(entry, '^p:%-?%d+:%d+:[01]:[cr]:%d+:(%d+)') or '0')
  if estimate == 0 or not state then return end
  local delta = tonumber(input) + tonumber(output) - estimate
  for i, limit in ipairs(state[1]) do
    if state[2][i] == math.floor(at / math.floor(limit[2] * 1000)) and delta ~= 0 then
      state[3][i] = math.max(0, state[3][i] + delta)
      state[4] = true
    end
  end
end

local function apply_settlements(usage, ledger, entries, pending, args, from, hint, record)
  local settled, late, already = 0, 0, 0
  local tokens = nil -- token_windows(record), read at the first entry that needs it
  local sums, order, done, gone = {}, {}, {}, {}
  local days, day_order = {}, {} -- per-model sums: day -> {at, sums per model, models in order}
  for i = from, #args - 2, 3 do
    local id = args[i]
    local entry = not done[id] and redis.call('HGET', entries, id)
    done[id] = true
    local state, amount, at, byok
    if entry then state, amount, at, byok = string.match(entry, '^([pcr]):(%-?%d+):(%d+):([01])') end
    if state then
      local actual = tonumber(args[i + 1])
      local delta = actual
      if state == 'p' then settled = settled + 1 else late = late + 1 end
      if state ~= 'r' then delta = delta - tonumber(amount) end
      at = tonumber(at)
      local day = math.floor(at / DAY)
      if delta ~= 0 then
        local group = day .. byok
        local sum = sums[group]
        if sum then sum[3] = sum[3] + delta
        else sums[group] = {at, byok, delta} order[#order + 1] = group end
      end
      local model, input, output = string.match(args[i + 2], '^([^\t]+)\t(%d+)\t(%d+)$')
      if model and record and state == 'p' and string.find(entry, ':%d+:%d+$') then
        if tokens == nil then tokens = token_windows(record) end
        true_up_tokens(tokens, entry, at, input, output)
      end
      if model then
        local per_day = days[day]
        if not per_day then
          per_day = {at, {}, {}}
          days[day] = per_day
          day_order[#day_order + 1] = day
        end
        local m = per_day[2][model]
        if m then
          m[1], m[2], m[3], m[4] = m[1] + actual, m[2] + tonumber(input), m[3] + tonumber(output),
            m[4] + 1
        else
          per_day[2][model] = {actual, tonumber(input), tonumber(output), 1}
          per_day[3][#per_day[3] + 1] = model
        end
      end
      gone[#gone + 1] = id
    else
      already = already + 1
    end
  end
  for _, group in ipairs(order) do
    local sum = sums[group]
    if sum[3] ~= 0 then
      local b = hint and buckets_at(sum[1], args, hint) or buckets(sum[1])
      add_usage(usage, b, sum[2] == '1', sum[3])
    end
  end
  for _, day in ipairs(day_order) do
    local per_day = days[day]
    local b = hint and buckets_at(per_day[1], args, hint) or buckets(per_day[1])
    for _, model in ipairs(per_day[3]) do add_model_usage(usage, b, model, per_day[2][model]) end
  end
  if tokens and tokens[4] then
    local writes = {}
    for i in ipairs(tokens[1]) do
      writes[#writes + 1] = 'tk_u' .. i
      writes[#writes + 1] = tokens[3][i]
    end
    redis.call('HSET', record, unpack(writes))
  end
  if #gone > 0 then
    redis.call('HDEL', entries, unpack(gone))
    redis.call('ZREM', ledger, unpack(gone))
    if pending then redis.call('ZREM', pending, unpack(gone)) end
  end
  return settled, late, already
end
