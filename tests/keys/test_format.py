"""Key format: `<prefix>_<env>_<body><checksum>`, checked before any I/O; 10,000 malformed keys
through the proxy cost the store (and the cache) nothing."""

from __future__ import annotations

import asyncio
import re
import secrets

import pytest

from gateway.keys.format import (
    ALPHABET,
    CHECKSUM_CHARS,
    RANDOM_CHARS,
    KeyFormat,
    base62,
    checksum,
    generate,
    hint,
)
from tests.helpers.gateway import RunningGateway

from .support import Conn, count_store_calls, request_bytes

FMT = KeyFormat("sk")
KEY = re.compile(r"^sk_(live|test)_[0-9A-Za-z]{49}$")


def _body() -> str:
    return base62(int.from_bytes(secrets.token_bytes(32), "big"), RANDOM_CHARS)


def _with_checksum(head: str) -> str:
    return head + checksum(head)


def test_generated_keys_parse() -> None:
    for env in ("live", "test"):
        for _ in range(200):
            key = generate("sk", env)
            assert KEY.match(key), key
            assert FMT.env_of(key.encode()) == env
    assert len({generate("sk", "live") for _ in range(1000)}) == 1000


def test_generated_key_has_256_random_bits_and_a_crc32_checksum() -> None:
    key = generate("sk", "live")
    head, check = key[:-CHECKSUM_CHARS], key[-CHECKSUM_CHARS:]
    assert len(head) == len("sk_live_") + RANDOM_CHARS
    assert 62**RANDOM_CHARS >= 2**256
    assert check == checksum(head)
    assert set(key[len("sk_live_"):]) <= set(ALPHABET)


def test_other_prefix() -> None:
    fmt = KeyFormat("acme")
    key = generate("acme", "test")
    assert fmt.env_of(key.encode()) == "test"
    assert FMT.env_of(key.encode()) is None
    assert fmt.env_of(generate("sk", "test").encode()) is None


def test_generate_refuses_unknown_env() -> None:
    with pytest.raises(ValueError, match="env"):
        generate("sk", "prod")


def malformed(n: int) -> list[str]:
    """n malformed keys in four kinds: bad checksum, wrong prefix, wrong env, wrong length (plus a
    few outside the alphabet and mangled case)."""
    out: list[str] = []
    kinds = 4
    for i in range(n):
        kind = i % kinds
        if kind == 0:  # bad checksum: one character of the body or the checksum changed
            key = generate("sk", "live" if i % 8 else "test")
            pos = len("sk_live_") + (i * 7) % (RANDOM_CHARS + CHECKSUM_CHARS)
            c = key[pos]
            key = key[:pos] + ALPHABET[(ALPHABET.index(c) + 1 + i % 61) % 62] + key[pos + 1:]
        elif kind == 1:  # wrong prefix, valid checksum for it
            key = _with_checksum(f"{('pk', 'sK', 'xx', 'ss')[i % 4]}_live_{_body()}")
        elif kind == 2:  # wrong env, valid checksum for it
            key = _with_checksum(f"sk_{('prod', 'Live', 'tset', 'dev_')[i % 4]}_{_body()}")
        else:  # wrong length, valid checksum for what is there
            body = _body()
            body = body[: -(1 + i % 5)] if i % 2 else body + body[: 1 + i % 5]
            key = _with_checksum(f"sk_live_{body}")
        out.append(key)
    # Outside the alphabet, same length as a real key
    good = generate("sk", "live")
    out[0] = good[:10] + "-" + good[11:]
    out[1] = good[:10] + "\u00e9" + good[11:]
    return out


def test_malformed_keys_are_refused_offline() -> None:
    keys = malformed(2000)
    assert all(FMT.env_of(k.encode("latin-1")) is None for k in keys)
    good = generate("sk", "live")
    for bad in (good.upper(), good.lower(), good + " ", good[:-1], good[1:], "", "sk_live_", good * 2):
        assert FMT.env_of(bad.encode()) is None, bad


def test_hint() -> None:
    key = generate("sk", "live")
    assert hint(key) == f"sk_live_…{key[-4:]}"
    key = generate("sk", "test")
    assert hint(key) == f"sk_test_…{key[-4:]}"


async def test_ten_thousand_malformed_keys_cost_no_store_call(gw: RunningGateway) -> None:
    calls = count_store_calls(gw.services.store)
    cache = gw.services.cache
    before = cache.store_calls
    keys = malformed(10_000)
    assert len(set(keys)) == len(keys)

    async def worker(chunk: list[str]) -> list[tuple[int, bytes]]:
        conn = await Conn.open(gw.port)
        out = []
        try:
            for start in range(0, len(chunk), 25):
                batch = chunk[start:start + 25]
                reqs = [
                    request_bytes("GET", "/any/x", [("X-API-Key", k)] if j % 2 else [("Authorization", f"Bearer {k}")])
                    for j, k in enumerate(batch)
                ]
                out += [(r.status, r.body) for r in await conn.many(reqs)]
        finally:
            await conn.close()
        return out

    chunks = [keys[i::8] for i in range(8)]
    results = [r for part in await asyncio.gather(*(worker(c) for c in chunks)) for r in part]
    assert len(results) == 10_000
    assert {status for status, _ in results} == {401}
    assert all(b'"code":"invalid_api_key"' in body for _, body in results)
    assert calls["find_by_digests"] == 0
    assert cache.store_calls == before
    assert not cache.positive and not cache.negative and not cache.inflight
