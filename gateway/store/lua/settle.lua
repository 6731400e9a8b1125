-- Settle one request or many of one key after their responses, through the ledger
-- (resolve_expired in lib.lua says the entries' formats). For each (request id, actual
-- cost): a pending entry gets (actual - reservation); an entry resolved at its lease end
-- gets (actual - reservation) when it was charged, the actual cost when it was refunded;
-- an id with no entry was settled already (or its entry forgotten): nothing. Either way the
-- entry is gone after, so a settlement applied twice changes nothing. Deltas go to the
-- buckets of the instant the request was authorized, so a request that straddles midnight
-- is charged to one day only. The key's expired entries are resolved first.
-- KEYS: 1 record, 2 usage prefix (kg:u:{id}:), 3 the key's ledger, 4 its ledger entries,
--       5 its pending ids (max_in_flight's count; optional)
-- ARGV: 1 clock override ms ('' = TIME), then pairs: request id, actual cost (micro)
-- Returns {settled, settled after their lease was resolved, already settled, expired
-- entries charged, expired entries refunded}; all 0 when the key was revoked meanwhile
-- (nothing is written for it then).
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0, 0, 0, 0} end
local now = math.floor(clock_us(ARGV[1]) / 1000)
local charged, refunded = resolve_expired(KEYS[3], KEYS[4], KEYS[2], now, KEYS[5])
local settled, late, already = 0, 0, 0
-- Deltas summed per UTC day and BYOK flag, then written once each: exact (integers), and
-- the same buckets, since every instant of one day falls in the same day, week and month.
local sums, order, done, gone = {}, {}, {}, {}
for i = 2, #ARGV - 1, 2 do
  local id = ARGV[i]
  local entry = not done[id] and redis.call('HGET', KEYS[4], id)
  done[id] = true
  local state, amount, at, byok
  if entry then state, amount, at, byok = string.match(entry, '^([pcr]):(%-?%d+):(%d+):([01])') end
  if state then
    local delta = tonumber(ARGV[i + 1])
    if state == 'p' then settled = settled + 1 else late = late + 1 end
    if state ~= 'r' then delta = delta - tonumber(amount) end
    if delta ~= 0 then
      at = tonumber(at)
      local group = math.floor(at / DAY) .. byok
      local sum = sums[group]
      if sum then sum[3] = sum[3] + delta
      else sums[group] = {at, byok, delta} order[#order + 1] = group end
    end
    gone[#gone + 1] = id
  else
    already = already + 1
  end
end
for _, group in ipairs(order) do
  local sum = sums[group]
  if sum[3] ~= 0 then add_usage(KEYS[2], buckets(sum[1]), sum[2] == '1', sum[3]) end
end
if #gone > 0 then
  redis.call('HDEL', KEYS[4], unpack(gone))
  redis.call('ZREM', KEYS[3], unpack(gone))
  if KEYS[5] then redis.call('ZREM', KEYS[5], unpack(gone)) end
end
return {settled, late, already, charged, refunded}
