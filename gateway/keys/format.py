"""The key format: `<prefix>_<env>_<body>`, body = base62(32 random bytes) + base62(CRC32) (6 chars).

The checksum (GitHub's token design) lets the gateway refuse a mistyped or made-up key before it
touches any cache or store, and lets secret scanners recognise our keys with few false positives.
"""

from __future__ import annotations

import secrets
import zlib

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}
_CHARSET = frozenset(ALPHABET)
RANDOM_BYTES = 32
RANDOM_CHARS = 43  # ceil(256 / log2(62))
CHECKSUM_CHARS = 6  # 62**6 > 2**32
ENVS = ("live", "test")


def base62(n: int, width: int) -> str:
    out = []
    while n:
        n, r = divmod(n, 62)
        out.append(ALPHABET[r])
    return "".join(reversed(out)).rjust(width, "0")


def checksum(text: str) -> str:
    return base62(zlib.crc32(text.encode("ascii")), CHECKSUM_CHARS)


def generate(prefix: str, env: str) -> str:
    """A new raw key. It exists once: in the answer to whoever created it."""
    if env not in ENVS:
        raise ValueError(f"env must be one of {', '.join(ENVS)}")
    body = base62(int.from_bytes(secrets.token_bytes(RANDOM_BYTES), "big"), RANDOM_CHARS)
    head = f"{prefix}_{env}_{body}"
    return head + checksum(head)


_VALUE = [-1] * 256
for _i, _c in enumerate(ALPHABET):
    _VALUE[ord(_c)] = _i


class KeyFormat:
    """Parses keys of one prefix; `env_of` returns the env of a well-formed key, else None."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.length = len(prefix) + 6 + RANDOM_CHARS + CHECKSUM_CHARS
        self._live = (prefix + "_live_").encode()
        self._test = (prefix + "_test_").encode()
        self.marks = (self._live, self._test)  # how every key of this prefix begins
        self._split = self.length - CHECKSUM_CHARS
        self._body = len(self._live)

    def env_of(self, key: bytes) -> str | None:
        """Check length, prefix, env, alphabet and checksum of a key as sent, all without I/O."""
        if len(key) != self.length:
            return None
        if key.startswith(self._live):
            env = "live"
        elif key.startswith(self._test):
            env = "test"
        else:
            return None
        if not key[self._body :].isalnum():  # ASCII letters and digits: exactly base62
            return None
        split = self._split
        v = _VALUE
        a, b, c, d, e, f = key[split:]
        n = ((((v[a] * 62 + v[b]) * 62 + v[c]) * 62 + v[d]) * 62 + v[e]) * 62 + v[f]
        if n != zlib.crc32(key[:split]):
            return None
        return env


def hint(key: str) -> str:
    """What may be shown after creation: `sk_live_…a1b2`."""
    prefix, env, _ = key.split("_", 2)
    return f"{prefix}_{env}_…{key[-4:]}"
