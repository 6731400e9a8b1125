-- Settle one request or many of one key after their responses, through the ledger
-- (apply_settlements in lib.lua; resolve_expired there says the entries' formats). The
-- key's expired entries are resolved first.
-- KEYS: 1 record, 2 usage prefix (kg:u:{id}:), 3 the key's ledger, 4 its ledger entries,
--       5 its pending ids (max_in_flight's count; optional)
-- ARGV: 1 clock override ms ('' = TIME), then triples: request id, actual cost (micro),
--       usage note ('' or '<model>\t<input tokens>\t<output tokens>')
-- Returns {settled, settled after their lease was resolved, already settled, expired
-- entries charged, expired entries refunded}; all 0 when the key was revoked meanwhile
-- (nothing is written for it then).
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0, 0, 0, 0} end
local now = math.floor(clock_us(ARGV[1]) / 1000)
local charged, refunded = resolve_expired(KEYS[3], KEYS[4], KEYS[2], now, KEYS[5])
local settled, late, already = apply_settlements(KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV, 2,
  nil, KEYS[1])
return {settled, late, already, charged, refunded}
