"""The directory's binary hash form (mailbox/hashcodec.py): every scheme a Dovecot passdb holds
comes back exactly as imported and still verifies (libpass), bcrypt in 40 bytes."""

from __future__ import annotations

import pytest
from passlib.hash import bcrypt

from fallback.mailbox import hashcodec
from fallback.mailbox.passwords import hash_password, verify_password
from tests.test_schemes import DOVEADM_SCHEMES, RIGHT, SECRET_VECTORS, doveadm_pw, needs_doveadm

# Hashes this service makes itself, one per scheme it can hash plain text with.
MADE_HERE = ["ARGON2ID", "ARGON2I", "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT"]


@pytest.mark.parametrize("stored", SECRET_VECTORS)
def test_every_known_vector_round_trips_and_verifies(stored: str) -> None:
    packed = hashcodec.pack(stored)
    back, end = hashcodec.unpack(packed + b"tail")
    assert back == stored and end == len(packed)  # self-delimiting: a record goes on after it
    assert verify_password("secret", back)
    assert len(packed) <= len(stored) + 3


@needs_doveadm
@pytest.mark.parametrize("scheme", DOVEADM_SCHEMES)
def test_a_hash_dovecot_made_round_trips_and_verifies(scheme: str) -> None:
    stored = doveadm_pw(scheme)
    back, _ = hashcodec.unpack(hashcodec.pack(stored))
    assert back == stored
    assert verify_password(RIGHT, back) and not verify_password("wrong", back)


@pytest.mark.parametrize("scheme", MADE_HERE)
def test_hashes_made_here_round_trip_verify_and_shrink(scheme: str) -> None:
    stored = hash_password(RIGHT, scheme)
    packed = hashcodec.pack(stored)
    assert packed[0] != hashcodec.TEXT  # a compact form, not the text again
    assert len(packed) < len(stored)
    back, _ = hashcodec.unpack(packed)
    assert back == stored and verify_password(RIGHT, back)


def test_bcrypt_is_40_bytes_for_every_variant_and_cost() -> None:
    for ident in ("2a", "2b", "2y"):
        stored = "{BLF-CRYPT}" + bcrypt.using(ident=ident, rounds=4).hash(RIGHT)
        packed = hashcodec.pack(stored)
        assert len(packed) == 40 and packed[0] & hashcodec.BCRYPT
        assert hashcodec.unpack(packed)[0] == stored
        assert verify_password(RIGHT, hashcodec.unpack(packed)[0])
    body = stored[len("{BLF-CRYPT}$2y$04$"):]
    for cost in ("00", "09", "10", "31"):
        text = "{BLF-CRYPT}$2y$" + cost + "$" + body
        assert len(hashcodec.pack(text)) == 40 and hashcodec.unpack(hashcodec.pack(text))[0] == text


@pytest.mark.parametrize("stored", [
    # A last salt / digest character whose spare bits are not zero (no bcrypt writes that):
    # 16 + 23 bytes could not say which it was, so the text is kept.
    "{BLF-CRYPT}$2y$10$" + "a" * 21 + "b" + "c" * 31,
    "{BLF-CRYPT}$2y$10$" + "a" * 21 + "e" + "c" * 30 + "d",
    "{BLF-CRYPT}$2y$32$" + "a" * 21 + "e" + "c" * 30 + "e",   # a cost past 31
    "{BLF-CRYPT}$2$10$" + "a" * 21 + "e" + "c" * 30 + "e",    # no variant letter
    "{SSHA}qxCNMAYjMvleLTy1r4fG7qhbtaI4Ynl0ZXNhbA==",         # base64 padding
    "{PLAIN}ü and $ and } and \t",
    "",
    "{X}" + "é" * 1000,
])
def test_anything_else_comes_back_exactly(stored: str) -> None:
    assert hashcodec.unpack(hashcodec.pack(stored))[0] == stored


def test_an_unknown_form_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown password hash form 1"):
        hashcodec.unpack(b"\x01abc")
