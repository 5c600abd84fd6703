"""Compressing a stored message's bytes with zstd, and giving back the exact bytes.

The write path compresses once per stored copy, in the process that received
the message (never in Redis); every reader of a message's `raw` field passes
the value through `unpack`.  The stored value says itself which it is: a zstd
frame starts with the frame magic number (28 B5 2F FD), which no message can
start with (a header line is printable text), and `pack` compresses any message
that does, whatever the saving, so the first four bytes are the record's
compression flag.  Messages under MIN_SIZE, and those that compression does
not shrink by MARGIN, are stored as they are (a JPEG's base64 saves its 25 %, an already compressed
upload may save nothing).  docs/performance.md, "Issue 17: RAM per stored
message", has the measurements behind LEVEL and MARGIN.
"""

from __future__ import annotations

import functools
import threading

import zstandard

MAGIC = b"\x28\xb5\x2f\xfd"  # zstd frame magic (RFC 8878), the first bytes of every frame
LEVEL = 1         # measured: level 3 and 6 save under 1 % more on the mix for 1.5-3x the CPU
MIN_SIZE = 512    # smaller messages are stored as they are: a few dozen bytes saved at most
MARGIN = 0.05     # and compressed only when that saves at least 5 % of the bytes
OFF, ZSTD = "off", "zstd"  # the settings' store_compression values
CHOICES = (OFF, ZSTD)


class Codec:
    """zstd contexts for one level, one pair per thread (a context is not thread-safe and
    costs more to make than to compress a small message with)."""

    def __init__(self, level: int = LEVEL, enabled: bool = True) -> None:
        self.level = level
        self.enabled = enabled
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level)
        return c

    def decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def pack(self, raw: bytes) -> bytes:
        """What to store for `raw`: its zstd frame when that saves enough, else raw itself."""
        magic = raw.startswith(MAGIC)
        if not magic and (not self.enabled or len(raw) < MIN_SIZE):
            return raw
        packed = self._compressor().compress(raw)
        if magic or len(raw) - len(packed) >= len(raw) * MARGIN:
            return packed
        return raw


def unpack(stored: bytes) -> bytes:
    """The exact bytes of a stored `raw` value (compressed or not, any layout version)."""
    if not stored.startswith(MAGIC):
        return stored
    return _decompressor().decompress(stored)


# A zstd frame decodes block by block, a block up to 128 KiB of message and never more
# stored bytes than that (plus its header): the first BLOCK_STORED stored bytes of a
# compressed value always give at least its first block's bytes.
BLOCK_STORED = 128 * 1024 + 64


def unpack_prefix(stored: bytes, n: int) -> bytes:
    """At most the first n bytes of the message from the start of a stored value (the whole
    value, or its first BLOCK_STORED bytes at least when it is compressed)."""
    if not stored.startswith(MAGIC):
        return stored[:n]
    return _decompressor().decompressobj().decompress(stored)[:n]


def _decompressor() -> zstandard.ZstdDecompressor:
    return codec().decompressor()  # any level's frames: the default codec's contexts serve all


@functools.cache
def codec(setting: str = ZSTD, level: int = LEVEL) -> Codec:
    """The shared codec for a store_compression setting ("zstd" or "off")."""
    return Codec(level, enabled=setting != OFF)
