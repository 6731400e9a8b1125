-- Mark a key as belonging to a workspace with a budget (record field workspace_capped),
-- so that the proxy reserves on the workspace's slot too; only if the record exists: a
-- key revoked meanwhile must not come back as a stray hash. The flag is never cleared.
-- KEYS: 1 the key record
-- Returns 1 when the record exists (flagged), else 0.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'workspace_capped', '1')
return 1
