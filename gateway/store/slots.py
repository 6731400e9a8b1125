"""Key ids and secrets chosen so that everything about one key lives in one Cluster slot.

The data model (docs/architecture.md) gives a key's record, usage and rate state the hash
tag ``{<id>}``, but the lookup by secret, ``kg:h:<sha256>``, hashes on the digest, which the
id cannot know. So the id is chosen to fall in the lookup's slot (a UUID4 whose last four
hex digits are picked), and a rotated secret is drawn until its lookup falls in the id's
slot. Then create, revoke and rotate are each one script on one slot: on a Redis Cluster
too, a key is never half written, and a secret is never claimed twice. Only the listing
indexes (one sorted set per workspace, one for all) live elsewhere; they are written around
the script and their readers skip a member whose record is gone."""

from __future__ import annotations

import functools
import hashlib
import secrets
import uuid
from binascii import crc_hqx
from itertools import product

from gateway.store.secrets import BASE62, CHECKSUM_LENGTH, RANDOM_LENGTH, checksum

SLOTS = 16384
_HEX = "0123456789abcdef"
_CHOSEN = 3  # base62 characters of a secret picked to land in a slot: 238,328 choices


def key_slot(key: str) -> int:
    """Redis Cluster's slot for ``key``: CRC16 of its hash tag, or of all of it."""
    data = key.encode()
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return crc_hqx(data, 0) % SLOTS


@functools.cache
def _suffix_for_low_bits() -> dict[int, str]:
    """CRC16 of each 4-hex-digit string, cut to a slot, mapped back to one such string."""
    table: dict[int, str] = {}
    for digits in product(_HEX, repeat=4):
        text = "".join(digits)
        table.setdefault(crc_hqx(text.encode(), 0) % SLOTS, text)
    return table


def id_in_slot(slot: int) -> str:
    """A random UUID4 (as text) whose record key ``...{<id>}`` falls in ``slot``.

    CRC16 without an initial value is linear: for strings of one length,
    crc(a XOR b) = crc(a) XOR crc(b), and leading zero bytes do not change it. So the
    CRC of ``head + tail`` is crc(head + four zero bytes) XOR crc(tail), and the tail that
    gives the wanted slot is one table lookup.
    """
    table = _suffix_for_low_bits()
    while True:
        head = str(uuid.uuid4())[:-4]
        base = crc_hqx(head.encode() + bytes(4), 0)
        tail = table.get((base ^ slot) % SLOTS)
        if tail is not None:  # the table misses a few slots: another head then
            return head + tail


def secret_in_slot(prefix: str, slot: int, lookup_prefix: str) -> str:
    """A new secret (the format of secrets.generate) whose lookup key, ``lookup_prefix``
    followed by its sha256 in hex, falls in ``slot``. Its last random characters are
    searched, ~16,000 tries (tens of ms: call it in a thread); the other random
    characters still hold 160 bits."""
    if "{" in lookup_prefix:
        raise ValueError("the lookup key must not have a hash tag")
    lookup_crc = crc_hqx(lookup_prefix.encode(), 0)  # CRC16 continues from the prefix's
    while True:
        head = prefix + "".join(secrets.choice(BASE62) for _ in range(RANDOM_LENGTH - _CHOSEN))
        for chosen in product(BASE62, repeat=_CHOSEN):
            body = head + "".join(chosen)
            secret = body + checksum(body)
            digest = hashlib.sha256(secret.encode()).hexdigest().encode()
            if crc_hqx(digest, lookup_crc) % SLOTS == slot:
                return secret


assert RANDOM_LENGTH > _CHOSEN and CHECKSUM_LENGTH > 0  # the format secret_in_slot follows
