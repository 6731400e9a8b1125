-- Settle one request after its response: add (actual cost - reservation) to the buckets
-- the reservation went to, i.e. those of the instant the request was authorized, so a
-- request that straddles midnight is charged to one day only.
-- KEYS: 1 record, 2 usage prefix (kg:u:{id}:)
-- ARGV: 1 the authorize reply's now_ms, 2 byok '1'|'0', 3 delta (micro, may be negative),
--       4-10 the buckets of that instant (see buckets_at in lib.lua)
-- Returns 1, or 0 when the key was revoked meanwhile (nothing is written for it then).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
add_usage(KEYS[2], buckets_at(tonumber(ARGV[1]), ARGV, 4), ARGV[2] == '1', tonumber(ARGV[3]))
return 1
