"""Chaos through the whole stack: clients that vanish at every moment leave nothing held.

A few hundred streamed and non-streamed requests go to SmolLM2 on the shared live stack
(whose admission capacity is small: ``CAPACITY`` per engine replica) from raw TCP clients
that hang up before the response headers, right after them, after the first chunk, in
the middle of the stream, or that never read the body at all. Afterwards:

- the shared queue holds no lease (``oss_serving_queue_leases`` is 0) and nothing waits;
- every slot is free: ``CAPACITY`` streams sent at once are all admitted at once (the
  queue shows ``CAPACITY`` leases and an empty wait set while they stream);
- the engine reports no running request.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from urllib.parse import urlparse

import httpx
import pytest

from tests.integration.conftest import CAPACITY, SMOLLM, LiveStack

pytestmark = pytest.mark.integration

REQUESTS = 240
CONCURRENCY = 16
MODES = ("before_headers", "after_headers", "after_first_chunk", "mid_stream", "never_read", "complete")


def _request(body: dict[str, object], host: str) -> bytes:
    raw = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + raw


async def _one(
    base: str, rng: random.Random, counts: Counter[str], never_read: list[asyncio.StreamWriter]
) -> None:
    url = urlparse(base)
    mode = rng.choice(MODES)
    stream = rng.random() < 0.75
    body = {
        "model": SMOLLM,
        "messages": [{"role": "user", "content": f"Count from one to twenty. ({rng.random():.6f})"}],
        "max_tokens": rng.choice([8, 16, 24]),
        "stream": stream,
    }
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(_request(body, f"{url.hostname}:{url.port}"))
    await writer.drain()
    counts[f"{mode}:{'stream' if stream else 'json'}"] += 1
    try:
        if mode == "before_headers":
            await asyncio.sleep(rng.uniform(0, 0.05))
            return
        if mode == "never_read":
            never_read.append(writer)  # held open, unread, until the end of the run
            return
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 120)
        if mode == "after_headers":
            return
        if mode in ("after_first_chunk", "mid_stream"):
            wanted = 1 if mode == "after_first_chunk" else rng.randint(2, 6)
            seen = 0
            while seen < wanted:
                line = await asyncio.wait_for(reader.readline(), 120)
                if not line:
                    break
                seen += line.startswith(b"data: ")
            return
        rest = await asyncio.wait_for(reader.read(), 120)
        status = int(head.split(b" ", 2)[1])
        counts[f"status:{status}"] += 1
        if status == 200 and stream:
            assert b"data: [DONE]" in rest
    finally:
        if mode != "never_read":
            writer.close()


def _metric(text: str, name: str, model: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _settled(base: str, timeout_s: float = 60) -> str:
    """/metrics once the queue has no lease and nothing waiting (the gauges lag a probe)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=10) as http:
        while True:
            text = (await http.get(base + "/metrics")).text
            leases = _metric(text, "oss_serving_queue_leases", SMOLLM)
            waiting = _metric(text, "oss_serving_queue_depth", SMOLLM)
            if (leases == 0 and waiting == 0) or time.monotonic() > deadline:
                return text
            await asyncio.sleep(0.5)


async def _engine_unfinished(base: str) -> int:
    async with httpx.AsyncClient(timeout=10) as http:
        report = (await http.get(base + "/health")).json()
    return int(report["models"][SMOLLM]["engine_unfinished_requests"] or 0)


async def test_random_disconnects_leave_no_lease_slot_or_engine_request(live_stack: LiveStack) -> None:
    base = live_stack.base_url
    rng = random.Random(12)
    counts: Counter[str] = Counter()
    never_read: list[asyncio.StreamWriter] = []
    sem = asyncio.Semaphore(CONCURRENCY)

    async def limited() -> None:
        async with sem:
            await _one(base, rng, counts, never_read)

    started = time.monotonic()
    await asyncio.gather(*(limited() for _ in range(REQUESTS)))
    await asyncio.sleep(2)
    for writer in never_read:
        writer.close()
    print(f"\n{REQUESTS} requests in {time.monotonic() - started:.1f} s: {dict(sorted(counts.items()))}")
    assert not any(k.startswith("status:5") for k in counts), counts

    text = await _settled(base)
    assert _metric(text, "oss_serving_queue_leases", SMOLLM) == 0
    assert _metric(text, "oss_serving_queue_depth", SMOLLM) == 0
    in_flight = _metric(text, "oss_serving_requests_in_flight", SMOLLM)
    assert in_flight == 0, f"requests still counted in flight: {in_flight}"
    assert _metric(text, "oss_serving_requests_reclaimed_total", SMOLLM) == 0  # nothing leaked to the net

    for _ in range(60):  # the engine's count is probed every second
        if await _engine_unfinished(base) == 0:
            break
        await asyncio.sleep(0.5)
    assert await _engine_unfinished(base) == 0

    # Every slot is free: CAPACITY streams at once are all admitted at once.
    body = {
        "model": SMOLLM,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
        "max_tokens": 200,
        "stream": True,
    }
    async with httpx.AsyncClient(timeout=120) as http:

        async def stream_one() -> float:
            sent = time.monotonic()
            async with http.stream("POST", base + "/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        return time.monotonic() - sent
            return float("inf")

        firsts = await asyncio.gather(*(stream_one() for _ in range(CAPACITY)))
        after = (await http.get(base + "/metrics")).text
    print(f"time to first chunk of {CAPACITY} simultaneous streams: {[round(f, 2) for f in firsts]}")
    waited_total = _metric(after, "oss_serving_queue_wait_seconds_count", SMOLLM) - _metric(
        text, "oss_serving_queue_wait_seconds_count", SMOLLM
    )
    quick = _bucket(after, SMOLLM, "0.5") - _bucket(text, SMOLLM, "0.5")
    assert waited_total == CAPACITY
    assert quick == CAPACITY, f"only {quick} of the {CAPACITY} simultaneous requests started within 0.5 s"


def _bucket(text: str, model: str, le: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith("oss_serving_queue_wait_seconds_bucket{")
            and f'model="{model}"' in line
            and f'le="{le}"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total
