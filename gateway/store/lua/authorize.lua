-- The frame of the proxy's whole decision before forwarding, atomic (docs/architecture.md,
-- "The authorize script"): the presented hash is the key's -> not disabled -> not expired
-- -> the policies, in chain order (gateway/policies/chain.py) -> the writes. Nothing is
-- written unless every policy passes; then each policy's writes, the request's ledger
-- entry, total_uses and last_used_at go together. Whatever the outcome, the key's ledger
-- entries whose lease ended unsettled are resolved first (resolve_expired, lib.lua).
--
-- This file is a template: gateway/policies/layout.py puts the policies' sections at the
-- --@ lines (inline, each in its own block: no closure per call) and binds every
-- ARG.<name>, FIELD.<name>, KEY.<name> (and ARG_AT.<name>, an argument's index) to its
-- position, ARG_COUNT to how many arguments it names, and the HMGET's field list to the
-- record fields.
-- Replies: {'not_found', now_ms}; for a key that is not usable, {status, now_ms, identity}
-- (identity: id, workspace_id, user_id, scopes_json, resources_json|false, name|false,
-- workspace capped 1|0 (its workspace has a budget: the proxy reserves there next),
-- expired entries charged, expired entries refunded); else {status, now_ms, identity,
-- every policy's notes, ...}: for 'ok' whether a ledger entry was written (1|0), then every
-- policy's ok values; for a refusal the values of the policy that refused.
local now_us = clock_us(ARG.clock)
local now = math.floor(now_us / 1000)
local f = redis.call('HMGET', KEY.record, FIELD_NAMES)
local presented = ARG.digest
if not FIELD.hash then return {'not_found', now} end
-- Settlements of this key that ride along with its authorization (gateway/proxy/settle.py):
-- (request id, actual cost, usage note) triples after the layout's ARG_COUNT arguments,
-- applied first, whatever this request's outcome, so its checks see their refunds; one
-- script instead of a settle.lua call each (lib.lua's apply_settlements, the same code).
if #ARGV > ARG_COUNT then
  apply_settlements(KEY.usage, KEY.ledger, KEY.entries, KEY.pending, ARGV, ARG_COUNT + 1,
    ARG_AT.hint, KEY.record)
end
if FIELD.hash ~= presented
  and not (FIELD.grace_hash == presented and now < tonumber(FIELD.grace_until or '0')) then
  return {'not_found', now}
end
local charged, refunded = resolve_expired(KEY.ledger, KEY.entries, KEY.usage, now, KEY.pending)
local function reply(status, ...)
  return {status, now, FIELD.id, FIELD.workspace_id, FIELD.user_id, FIELD.scopes,
    FIELD.resources, FIELD.name, FIELD.workspace_capped == '1' and 1 or 0, charged, refunded, ...}
end
if FIELD.disabled == '1' then return reply('disabled') end
if FIELD.expires_at and now >= tonumber(FIELD.expires_at) then return reply('expired') end

-- The policies, in chain order: every one's state, then each one's prepare, then each
-- one's check (a check refuses with `return refuse(status, ...)`: the reply with every
-- policy's notes).
--@policies

-- Every policy passed. The request's ledger entry: its id (unique per authorization; ''
-- for none) and lease end; a policy's commit sets what goes in it, and whether one is
-- written (entry_wanted).
local entry_id, lease_end = ARG.entry, now + tonumber(ARG.lease_ms)
local entry_amount, entry_byok, entry_wanted = 0, false, false
local entry_tokens = 0 -- the token limits' estimate, trued up by the settlement
--@commit
local written = 0
if entry_wanted and entry_id ~= '' then
  redis.call('ZADD', KEY.ledger, lease_end, entry_id)
  redis.call('HSET', KEY.entries, entry_id, string.format('p:%d:%d:%s:%s:%d:%d', entry_amount,
    now, entry_byok and '1' or '0', ARG.on_expiry, lease_end, entry_tokens))
  written = 1
end
redis.call('HINCRBY', KEY.record, 'total_uses', 1)
-- last_used_at to the second: a busy key's record is not rewritten on every request.
if not FIELD.last_used_at or now - tonumber(FIELD.last_used_at) >= 1000
  or now < tonumber(FIELD.last_used_at) then
  redis.call('HSET', KEY.record, 'last_used_at', now)
end
--@ok
