"""Every Redis key name keygate uses, built in one place (docs/architecture.md).

Everything about one API key carries the hash tag ``{<key_id>}`` so that a script over one
key touches one Redis Cluster slot.
"""

from __future__ import annotations

from dataclasses import dataclass

# What follows a usage prefix in the name of a per-model usage bucket (kg:u:{<id>}:models:
# d:20261122); lib.lua's MODEL_BUCKETS is the same text.
MODEL_BUCKETS = "models:"


@dataclass(frozen=True, slots=True)
class KeyNames:
    prefix: str = "kg:"

    def by_hash(self, sha256_hex: str) -> str:
        """String: key id for a presented secret's sha256."""
        return f"{self.prefix}h:{sha256_hex}"

    def record(self, key_id: str) -> str:
        """Hash: the key record."""
        return f"{self.prefix}k:{{{key_id}}}"

    def usage(self, key_id: str, bucket: str) -> str:
        """Int string: usage in micro-units for a bucket such as ``d:20261122`` or ``t``."""
        return f"{self.prefix}u:{{{key_id}}}:{bucket}"

    def model_usage(self, key_id: str, bucket: str) -> str:
        """Hash: usage per model in a bucket such as ``d:20261122`` (lib.lua's
        add_model_usage says the format). lib.lua builds the name from the usage prefix
        (``usage(key_id, "")`` + MODEL_BUCKETS + bucket): the same hash tag, one slot."""
        return self.usage(key_id, MODEL_BUCKETS + bucket)

    def rate(self, key_id: str) -> str:
        """String: GCRA theoretical arrival time."""
        return f"{self.prefix}r:{{{key_id}}}"

    def tokens(self, key_id: str) -> str:
        """Hash: the token limits' windows, w<i> (window number) and u<i> (tokens used)."""
        return f"{self.prefix}tk:{{{key_id}}}"

    def ledger(self, key_id: str) -> str:
        """Sorted set: the reservation ledger's request ids, scored by when something is due
        (a pending entry's lease end; a resolved entry's time to be forgotten)."""
        return f"{self.prefix}l:{{{key_id}}}"

    def ledger_entries(self, key_id: str) -> str:
        """Hash: request id -> its ledger entry (lua/lib.lua says the formats)."""
        return f"{self.prefix}le:{{{key_id}}}"

    def pending_ids(self, key_id: str) -> str:
        """Sorted set: the pending ledger entries' ids of a key with max_in_flight, scored
        by their lease end (authorize.lua counts the key's requests in flight there)."""
        return f"{self.prefix}lp:{{{key_id}}}"

    # A workspace's budget (PUT /v1/workspaces/{id}) lives on its own slot, hash tag
    # {w:<workspace_id>}: its caps, usage buckets and reservation ledger, in the same
    # formats as a key's so that settle.lua settles a workspace entry unchanged.

    def workspace_budget(self, workspace_id: str) -> str:
        """Hash: the workspace's budget (spend_caps JSON, updated_at); settle.lua's record."""
        return f"{self.prefix}w:{{w:{workspace_id}}}"

    def workspace_usage(self, workspace_id: str, bucket: str) -> str:
        """Int string: the workspace's usage in micro-units for a bucket (as ``usage``)."""
        return f"{self.prefix}wu:{{w:{workspace_id}}}:{bucket}"

    def workspace_model_usage(self, workspace_id: str, bucket: str) -> str:
        """Hash: the workspace's usage per model in a bucket (as ``model_usage``)."""
        return self.workspace_usage(workspace_id, MODEL_BUCKETS + bucket)

    def workspace_ledger(self, workspace_id: str) -> str:
        """Sorted set: the workspace's reservation ledger (as ``ledger``)."""
        return f"{self.prefix}wl:{{w:{workspace_id}}}"

    def workspace_ledger_entries(self, workspace_id: str) -> str:
        """Hash: the workspace's ledger entries (as ``ledger_entries``)."""
        return f"{self.prefix}wle:{{w:{workspace_id}}}"

    def workspace_pending_ids(self, workspace_id: str) -> str:
        """Sorted set never written (a workspace has no max_in_flight): settle.lua's fifth
        key, named in the workspace's slot so that a Cluster accepts the call."""
        return f"{self.prefix}wlp:{{w:{workspace_id}}}"

    def workspace_index(self, workspace_id: str) -> str:
        """Sorted set: the workspace's keys, ordered for listing."""
        return f"{self.prefix}ws:{workspace_id}"

    def org_index(self) -> str:
        """Sorted set: every key, ordered for listing."""
        return f"{self.prefix}org"

    def all_pattern(self) -> str:
        """SCAN pattern matching everything under this prefix (tests and tooling)."""
        return f"{self.prefix}*"
