-- The proxy's whole decision before forwarding, atomic (docs/architecture.md; Unkey's order):
-- the presented hash is the key's -> not disabled -> not expired -> scopes -> resource ->
-- rate limit (GCRA) -> concurrency (max_in_flight) -> reserve the expected cost against
-- every spending cap. Nothing is written unless every check passes; then the reservation,
-- its ledger entry, the rate state, total_uses and last_used_at are written together.
-- Whatever the outcome, the key's ledger entries whose lease ended unsettled are resolved
-- first (resolve_expired, lib.lua).
-- Concurrency: a key with max_in_flight admits a request only while fewer of its ledger
-- entries are pending with their lease not ended; every request it admits gets an entry
-- (amount 0 on a route that charges nothing), also listed in KEYS[7] by lease end, so
-- the count is one ZCOUNT. Entries written before the limit was set are not counted.
-- KEYS: 1 record, 2 usage prefix (kg:u:{id}:), 3 the key's rate state, 4 the route's
--       default rate state for this key, 5 the key's ledger, 6 its ledger entries,
--       7 its pending entries (optional; without it max_in_flight is not applied)
-- ARGV: 1 presented sha256, 2 clock override ms ('' = TIME), 3 reserve (micro; '' for a
--       route that charges nothing: caps do not apply to it),
--       4 byok route '1'|'0', 5 needed scopes (space-separated), 6 resource: '0' the route
--       names none, '1' not read yet, '2' read: 7, 8 route rate limit requests ('' none),
--       9 route rate period (ms), 10-16 the buckets of the caller's clock (a hint, see
--       buckets_at in lib.lua), 17 the ledger entry's request id (unique per
--       authorization; '' for none), 18 its lease (ms), 19 at its lease end 'c' charge | 'r'
--       refund
-- Returns {status, now_ms} for not_found, else {status, now_ms, id, workspace_id, user_id,
-- scopes_json, resources_json|false, name|false, workspace capped 1|0 (its workspace has
-- a budget: the proxy reserves there next), expired entries charged, expired entries
-- refunded, ...}: for ok then held, 1 when a ledger entry was written (else 0), and the
-- rate fields: RateLimit-Policy, RateLimit, Retry-After seconds ('' alone when no rate
-- limit applies; the key's own limit is policy "key", a route's default "route"); for
-- rate_limited 0 then the rate fields; for concurrency_limited max_in_flight, the entries
-- in flight, then the rate fields (the state without this request); for
-- spend_limited then cap name, amount, period, counted spend, resets_at_ms (0: never),
-- then the rate fields (the state without this request); for forbidden_scope and
-- forbidden_resource the rate fields alone.
local now_us = clock_us(ARGV[2])
local now = math.floor(now_us / 1000)
local f = redis.call('HMGET', KEYS[1], 'hash', 'grace_hash', 'grace_until', 'disabled',
  'expires_at', 'id', 'workspace_id', 'user_id', 'scopes', 'resources', 'rate_limit',
  'last_used_at', 'name', 'max_in_flight', 'workspace_capped', unpack(CAP_FIELDS))
local presented = ARGV[1]
if not f[1] then return {'not_found', now} end
if f[1] ~= presented and not (f[2] == presented and now < tonumber(f[3] or '0')) then
  return {'not_found', now}
end
local charged, refunded = 0, 0
if KEYS[5] then
  charged, refunded = resolve_expired(KEYS[5], KEYS[6], KEYS[2], now, KEYS[7])
end
local function reply(status, ...)
  return {status, now, f[6], f[7], f[8], f[9], f[10], f[13], f[15] == '1' and 1 or 0,
    charged, refunded, ...}
end
if f[4] == '1' then return reply('disabled') end
if f[5] and now >= tonumber(f[5]) then return reply('expired') end

-- Rate limit: GCRA over integer microseconds. A burst of `requests` is allowed, then one
-- per period/requests; the interval is rounded up, so rounding never admits extra. Read
-- here, decided after scopes and resource, so that their denials can show it too.
local requests, period_us, rate_key, policy
if f[11] then
  local spec = cjson.decode(f[11])
  requests, period_us, rate_key, policy = spec[1], math.ceil(spec[2] * 1000000), KEYS[3], 'key'
elseif ARGV[8] ~= '' then
  requests, period_us = tonumber(ARGV[8]), tonumber(ARGV[9]) * 1000
  rate_key, policy = KEYS[4], 'route'
end
-- The IETF draft's header values are written here, where the numbers are, so the
-- proxy only copies them: RateLimit-Policy, RateLimit, and Retry-After (seconds).
local rate = {''} -- after this request
local interval, window, tat, new_tat, allow_at
local function rate_fields(remaining, full_in_us, retry_in_us)
  return {string.format('"%s";q=%d;w=%d', policy, requests, math.max(1, math.ceil(window / 1e6))),
    string.format('"%s";r=%d;t=%d', policy, remaining, math.ceil(full_in_us / 1e6)),
    math.max(1, math.ceil(retry_in_us / 1e6))}
end
if requests then
  interval = math.ceil(period_us / requests)
  window = interval * requests
  tat = tonumber(redis.call('GET', rate_key) or '0')
  if tat < now_us then tat = now_us end
  new_tat = tat + interval
  allow_at = new_tat - window
  local remaining = math.floor((now_us - allow_at) / interval)
  if now_us >= allow_at then rate = rate_fields(remaining, new_tat - now_us, 0) end
end
-- The state without this request, for refusals only: formatted when one is made.
local function idle()
  if not requests then return '' end
  return unpack(rate_fields(math.max(0, math.min(requests, math.floor((now_us - allow_at) /
    interval) + 1)), tat - now_us, allow_at - now_us))
end

if ARGV[5] ~= '' then
  local scopes, held = f[9] or '[]', nil
  for needed in string.gmatch(ARGV[5], '%S+') do
    -- The scope itself, quoted, in the JSON list: granted without decoding it (stored
    -- scopes are [A-Za-z0-9_.:*-] only, so a match is always a whole list item).
    if not string.find(scopes, '"' .. needed .. '"', 1, true) then
      held = held or cjson.decode(scopes)
      local ok = false
      for _, s in ipairs(held) do
        if s == needed or s == '*'
          or (string.sub(s, -2) == ':*' and string.sub(needed, 1, #s - 1) == string.sub(s, 1, -2))
        then ok = true break end
      end
      if not ok then return reply('forbidden_scope', idle()) end
    end
  end
end

if f[10] and ARGV[6] ~= '0' then
  if ARGV[6] == '1' then return reply('need_resource') end
  local allowed = false
  for _, r in ipairs(cjson.decode(f[10])) do
    if r == ARGV[7] then allowed = true break end
  end
  if ARGV[7] == '' or not allowed then return reply('forbidden_resource', idle()) end
end

if requests and now_us < allow_at then return reply('rate_limited', 0, idle()) end

-- Concurrency: the key's pending entries whose lease has not ended (those that ended were
-- resolved above, or are resolved by a later call; either way they hold no slot).
local max_in_flight = KEYS[7] and tonumber(f[14] or '')
if max_in_flight then
  local held = redis.call('ZCOUNT', KEYS[7], '(' .. now, '+inf')
  if held >= max_in_flight then
    return reply('concurrency_limited', max_in_flight, held, idle())
  end
end

-- Spending caps: every cap must have room for the reservation, and a cap already used up
-- refuses even a request that reserves nothing, unless its route charges nothing at all.
local reserve = tonumber(ARGV[3]) or 0
local byok = ARGV[4] == '1'
local with_byok = f[18] == '1'
local b = nil
if ARGV[3] ~= '' and (f[16] or f[19]) and (not byok or with_byok) then
  b = buckets_at(now, ARGV, 10)
  local base = f[20] and cjson.decode(f[20]) or {} -- [bucket, micro] per cap (update.lua)
  local blocking = nil
  for i, cap in ipairs(caps_of(f[16], f[17], f[19])) do
    local used = counted(KEYS[2], cap, b, with_byok, base[i])
    if used >= cap[2] or used + reserve > cap[2] then
      local at = resets_at(cap, b)
      -- Report the cap that blocks longest: the request can pass only once it resets.
      if not blocking or at == 0 or (blocking[5] ~= 0 and at > blocking[5]) then
        blocking = {cap[1], cap[2], cap[3], used, at}
      end
    end
  end
  if blocking then
    for _, v in ipairs({idle()}) do blocking[#blocking + 1] = v end
    return reply('spend_limited', unpack(blocking))
  end
end

if new_tat then
  -- Kept a second longer than it matters (an arrival time in the past reads as "now"),
  -- so that a test's clock running ahead of the server's cannot expire it early.
  redis.call('SET', rate_key, string.format('%.0f', new_tat), 'PX',
    math.ceil((new_tat - now_us) / 1000) + 1000)
end
if reserve > 0 then add_usage(KEYS[2], b or buckets_at(now, ARGV, 10), byok, reserve) end
local entry = ARGV[17]
local written = 0
if entry and entry ~= '' and (ARGV[3] ~= '' or max_in_flight) then
  local lease_end = now + tonumber(ARGV[18])
  redis.call('ZADD', KEYS[5], lease_end, entry)
  redis.call('HSET', KEYS[6], entry, string.format('p:%d:%d:%s:%s:%d', reserve, now,
    byok and '1' or '0', ARGV[19], lease_end))
  if max_in_flight then redis.call('ZADD', KEYS[7], lease_end, entry) end
  written = 1
end
redis.call('HINCRBY', KEYS[1], 'total_uses', 1)
-- last_used_at to the second: a busy key's record is not rewritten on every request.
if not f[12] or now - tonumber(f[12]) >= 1000 or now < tonumber(f[12]) then
  redis.call('HSET', KEYS[1], 'last_used_at', now)
end
return reply('ok', reserve, written, unpack(rate))
