"""Request ids: canonical UUIDv7 text (RFC 9562), the version and variant bits set, the time in the
first 48 bits, no two alike."""

from __future__ import annotations

import time
import uuid

from gateway.ids import uuid7


def test_request_ids_are_uuid7_with_the_time_and_distinct() -> None:
    before = time.time_ns() // 1_000_000
    ids = [uuid7() for _ in range(20_000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for text in ids:
        u = uuid.UUID(text)
        assert str(u) == text  # canonical: lowercase, 8-4-4-4-12
        assert u.version == 7 and u.variant == uuid.RFC_4122, text
        assert before <= u.int >> 80 <= after, text
    # The random bits are all used: over 20,000 ids each of the 74 varies.
    bits = [(uuid.UUID(t).int & ~(0xF << 76) & ~(0b11 << 62)) & ((1 << 80) - 1) for t in ids]
    assert all(any(b >> i & 1 for b in bits) and not all(b >> i & 1 for b in bits)
               for i in [*range(0, 62), *range(64, 76)])
