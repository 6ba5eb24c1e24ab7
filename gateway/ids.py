"""Request ids: UUIDv7, so they sort by time and index well as a primary key."""

from __future__ import annotations

import random
import time

# Request ids need uniqueness, not secrecy: the Mersenne generator costs a tenth of os.urandom.
_rand = random.Random()
_getrandbits = _rand.getrandbits


def uuid7() -> str:
    """A random UUIDv7 (RFC 9562) in its canonical text form."""
    ms = time.time_ns() // 1_000_000
    n = (ms & 0xFFFFFFFFFFFF) << 80 | 0x7 << 76 | _getrandbits(12) << 64 | 0b10 << 62 | _getrandbits(62)
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def reseed() -> None:
    """Give a forked worker its own sequence."""
    _rand.seed()
