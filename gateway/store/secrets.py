"""Secret format, hashing and masking (docs/architecture.md).

A keygate secret is ``<prefix><30 base62 random><6 base62 CRC32 of the first part>``.
The checksum lets the proxy refuse a mistyped or made-up key without asking Redis, the
way GitHub tokens do. Only ``sha256(secret)`` is ever stored.
"""

from __future__ import annotations

import hashlib
import secrets
import zlib

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE62_SET = frozenset(BASE62)
RANDOM_LENGTH = 30
CHECKSUM_LENGTH = 6  # 62**6 > 2**32, so every CRC32 fits
PREFIX_DISPLAY_LENGTH = 12


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(BASE62[digit])
    return "".join(reversed(digits))


def checksum(body: str) -> str:
    """The 6-character base62 CRC32 of ``body`` (prefix plus random part)."""
    return _base62(zlib.crc32(body.encode()), CHECKSUM_LENGTH)


def generate(prefix: str) -> str:
    """A new secret: ``prefix`` + 30 random base62 characters + checksum."""
    body = prefix + "".join(secrets.choice(BASE62) for _ in range(RANDOM_LENGTH))
    return body + checksum(body)


def has_bad_checksum(secret: str, prefix: str) -> bool:
    """True only for a string shaped exactly like a keygate secret whose checksum fails.

    Anything else (imported keys of other formats) is not judged here: it may be valid.
    """
    expected_length = len(prefix) + RANDOM_LENGTH + CHECKSUM_LENGTH
    if len(secret) != expected_length or not secret.startswith(prefix):
        return False
    tail = secret[len(prefix) :]
    if not _BASE62_SET.issuperset(tail):
        return False
    return checksum(secret[:-CHECKSUM_LENGTH]) != secret[-CHECKSUM_LENGTH:]


def hash_secret(secret: str) -> str:
    """sha256 hex digest: the only form of a secret that is stored."""
    return hashlib.sha256(secret.encode()).hexdigest()


def display_prefix(secret: str) -> str:
    """The leading characters of a generated secret safe to store and show: 12 characters
    (9 of its 30 random ones). Imported secrets use ``imported_masks``."""
    return secret[: min(PREFIX_DISPLAY_LENGTH, len(secret) // 3)]


def label(secret: str) -> str:
    """Masked display form of a generated secret, e.g. ``kg_7fK2...x9Qa``: the first 7
    characters (within ``display_prefix``) and the last 4, which are checksum."""
    head = secret[: min(7, len(secret) // 4)]
    tail = secret[-min(4, len(secret) // 8) :] if len(secret) >= 8 else ""
    return f"{head}...{tail}"


def imported_masks(secret: str) -> tuple[str, str]:
    """The display prefix and label of an imported secret, whose format keygate does not
    know: the two overlap (the label starts with the prefix) and together show at most a
    third of the secret, at most 12 characters in front and 4 at the end."""
    budget = len(secret) // 3
    tail = min(4, budget // 4)
    head = min(PREFIX_DISPLAY_LENGTH, budget - tail)
    shown_tail = secret[len(secret) - tail :] if tail else ""
    return secret[:head], f"{secret[:head]}...{shown_tail}"


def label_for_hash_import(key_id: str) -> str:
    """Display form of a key imported by its sha256 only: from its id, as nothing of the
    secret is known, and any part of the hash would narrow a guess of a short secret."""
    return f"imported:{key_id[:8]}"
