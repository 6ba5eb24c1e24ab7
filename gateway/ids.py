"""Request ids: UUIDv7, so they sort by time and index well as a primary key."""

from __future__ import annotations

import random
import time

# Request ids need uniqueness, not secrecy: the Mersenne generator costs a tenth of os.urandom.
_rand = random.Random()
_getrandbits = _rand.getrandbits
_VARIANT = 0b10 << 62
_LOW62 = (1 << 62) - 1


class _Prefix:
    """The text of the 48-bit millisecond time and the version nibble, made once per millisecond:
    a request id is minted for every request, and most share their millisecond with the last."""

    __slots__ = ("ms", "text")

    def __init__(self) -> None:
        self.ms = -1
        self.text = ""


_prefix = _Prefix()


def uuid7() -> str:
    """A random UUIDv7 (RFC 9562) in its canonical text form."""
    ms = time.time_ns() // 1_000_000
    p = _prefix
    if ms != p.ms:
        t = f"{ms & 0xFFFFFFFFFFFF:012x}"
        p.text = f"{t[:8]}-{t[8:]}-7"
        p.ms = ms
    r = _getrandbits(74)  # 12 bits after the version, 62 after the variant
    low = f"{_VARIANT | r & _LOW62:016x}"
    return f"{p.text}{r >> 62:03x}-{low[:4]}-{low[4:]}"


def reseed() -> None:
    """Give a forked worker its own sequence."""
    _rand.seed()
