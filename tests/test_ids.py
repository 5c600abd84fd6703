"""Message ids (fallback/ids.py): the ULID layout, made two characters at a time."""

from __future__ import annotations

import random

from fallback import ids


def test_an_id_is_its_value_in_crockford_base32_five_bits_a_character() -> None:
    """ids.encode (two characters per lookup) against the plain definition, on random values and
    the edges: the ULID layout, so ids sort by time and id_time_ms reads the time back."""
    def plain(value: int) -> str:
        return "".join(ids._ALPHABET[(value >> (5 * i)) & 31] for i in reversed(range(26)))

    rng = random.Random(17)
    values = [0, 1, 31, 32, 1023, 1024, 2**80 - 1, 2**80, 2**128 - 1,
              *(rng.getrandbits(128) for _ in range(2000))]
    assert [ids.encode(v) for v in values] == [plain(v) for v in values]
    made = ids.new_id(1_764_000_000_123)
    assert ids.is_id(made) and ids.id_time_ms(made) == 1_764_000_000_123
    assert ids.new_id(1) < ids.new_id(2) < ids.new_id(2**48 - 1)
