"""Mutated requests through a real socket: whatever the bytes, the gateway answers 1xx-4xx or closes,
never 5xx, never hangs past its deadlines, logs no internal error (see conftest), and never sends the
upstream anything its strict parser refuses.

A seeded mutation run, not a coverage-guided fuzzer: deterministic, about a second, and it found
two real bugs (a second answer written after a half-close, a keep-alive left without a deadline).
"""

from __future__ import annotations

import asyncio
import random

import pytest

from .wire import route

SEEDS = [
    b"GET /a/b?x=1 HTTP/1.1\r\nHost: a.test\r\nX-A: b\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello",
    b"POST /p HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX: y\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET /%2e/x HTTP/1.1\r\nHost: [::1]:80\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\nGET /3 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X_A\r\nX_A: 1\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\nxyz",
]
ALPHABET = b"\r\n\x00 :;,/%.\\#?\t\x0bchunkedContent-LengthTransfer-EncodingHost0123456789aF\xff\x80"


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        i = rng.randrange(len(b) + 1)
        if op < 0.4 and b:
            del b[i : i + rng.randint(1, 4)]
        elif op < 0.8:
            b[i:i] = bytes(rng.choice(ALPHABET) for _ in range(rng.randint(1, 4)))
        else:
            b[i:i] = rng.choice(SEEDS)
    if rng.random() < 0.3:
        b += rng.choice(SEEDS)
    return bytes(b)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_mutated_requests_never_get_a_5xx_or_hang(up, gateway, seed) -> None:
    h = await gateway(
        [route(up)],
        trusted_proxies=["127.0.0.1/32"],
        limits={"header_timeout": "0.2s", "body_timeout": "0.2s", "idle_timeout": "0.2s", "max_pipelined": 3},
    )
    rng = random.Random(seed)
    problems: list[tuple[bytes, str]] = []

    async def one(data: bytes) -> None:
        c = await h.client()
        await c.send(data)
        head_only = b"HEAD" in data  # a HEAD answer's Content-Length announces no bytes
        try:
            while True:
                r = await c.response(timeout=1.0, head_only=head_only)
                if r.status >= 500:
                    problems.append((data, f"{r.status} {r.body[:200]!r}"))
        except EOFError:
            pass
        except TimeoutError:
            problems.append((data, "no answer and no close within 1 s"))
        except AssertionError as e:
            if not head_only:
                problems.append((data, f"unparsable response: {e}"))
        finally:
            c.close()

    for _ in range(3):
        await asyncio.gather(*(one(mutate(rng, rng.choice(SEEDS))) for _ in range(100)))
    assert not problems, problems[:5]
    assert up.parse_errors == 0, "the gateway forwarded bytes the upstream's strict parser refused"
