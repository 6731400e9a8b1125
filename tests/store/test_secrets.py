from __future__ import annotations

import string

from gateway.store import secrets


def test_generated_secret_has_prefix_random_part_and_valid_checksum() -> None:
    secret = secrets.generate("kg_")
    assert secret.startswith("kg_")
    assert len(secret) == 3 + 30 + 6
    assert set(secret[3:]) <= set(string.ascii_letters + string.digits)
    assert not secrets.has_bad_checksum(secret, "kg_")


def test_one_changed_character_is_caught_by_the_checksum() -> None:
    secret = secrets.generate("kg_")
    flipped = secret[:10] + ("A" if secret[10] != "A" else "B") + secret[11:]
    assert secrets.has_bad_checksum(flipped, "kg_")


def test_foreign_formats_are_not_judged_by_the_checksum() -> None:
    assert not secrets.has_bad_checksum("sk-legacy-123456", "kg_")
    assert not secrets.has_bad_checksum("kg_short", "kg_")


def test_display_forms_of_generated_and_imported_secrets() -> None:
    # An imported secret: prefix and label overlap and show a third of it together.
    assert secrets.imported_masks("abcdefghijklmnop") == ("abcd", "abcd...p")
    assert secrets.imported_masks("sk-" + "x" * 45) == ("sk-xxxxxxxxx", "sk-xxxxxxxxx...xxxx")
    assert secrets.label("kg_7fK2pQ9xAzzzzzzzzzzzzzzzzzzzzzzzzzzx9Qa").startswith("kg_7fK2...")
    assert secrets.label("kg_7fK2pQ9xAzzzzzzzzzzzzzzzzzzzzzzzzzzx9Qa").endswith("x9Qa")
    assert len(secrets.display_prefix(secrets.generate("kg_"))) == 12


def test_hash_is_sha256_hex() -> None:
    assert secrets.hash_secret("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
