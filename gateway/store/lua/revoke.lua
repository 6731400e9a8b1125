-- Delete a key and every way to authenticate with it, if its hash is still the one the
-- caller read. Its listing index members are removed by the caller afterwards (another
-- slot); listings skip a member whose record is gone.
-- KEYS: 1 record, 2 hash->id (current), 3 hash->id (grace, may repeat 2),
--       4 rate state, 5 total usage, 6 total BYOK usage, 7 ledger, 8 ledger entries,
--       9 pending entry ids
-- ARGV: 1 expected current hash
-- Returns 1 when deleted, 0 when the record is gone, -1 when it changed meanwhile.
local current = redis.call('HGET', KEYS[1], 'hash')
if not current then return 0 end
if current ~= ARGV[1] then return -1 end
redis.call('DEL', unpack(KEYS))
return 1
