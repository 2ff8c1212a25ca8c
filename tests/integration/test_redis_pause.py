"""Redis frozen for 10 s under a steady load: the gateway's Redis circuit breaker.

One gateway replica (``build_gateway``, in process, the fake engine) with authentication,
per-tenant rate limits, the response cache, prefix routing and admission, in front of a
private ``redis-server``. A steady load of 20 requests per second runs for 24 s; Redis is
frozen with SIGSTOP for 10 s in the middle (connections are accepted, nothing answers:
the worst case, a slow Redis) and then woken with SIGCONT.

Latency is measured in process around the gateway's pipeline (``GatewayService.run`` to
the end of the answer, stream closed), so client scheduling does not count.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis as redis_sync

from serving.config import ServingConfig
from serving.engine.protocol import Endpoint, EngineJSON, EngineSSE
from serving.engine.routing_hints import HINT_AFFINITY, HINT_KEY_REPLICA, ROUTED_REASON, ROUTED_REPLICA
from serving.gateway.build import redis_client
from serving.gateway.context import RequestContext
from serving.gateway.flight import Flight
from serving.gateway.service import Answer
from serving.gateway.tenants import hash_key
from serving.wire import CACHE_HEADER
from tests.fakes import FakeEngine
from tests.gateway import TestGateway
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

MODEL = "smol"
KEY = "key-alpha"
SYSTEM = "You are the accounting team's assistant; answer in one short sentence. " * 8
RATE = 20.0
"""Requests per second."""
RUN_S = 24.0
FREEZE_AT_S = 7.0
FREEZE_FOR_S = 10.0
WARM_UP_S = 1.5
"""Requests of the first seconds are not part of the baseline."""
ADDED_P99_LIMIT_S = 0.050
"""The requirement: p99 latency added while the breaker is open."""


class RoutedEngine(FakeEngine):
    """The fake engine, plus what the engine's request router does: it writes its choice
    back into the headers, and here also records the hints it was given, by request id."""

    def __init__(self) -> None:
        super().__init__()
        self.hinted: dict[str, bool] = {}

    async def generate(
        self, endpoint: Endpoint, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncIterator[EngineJSON | EngineSSE]:
        request = str(body.get("request_id", "")).rsplit("-", 1)[0]
        self.hinted[request] = HINT_AFFINITY in headers or HINT_KEY_REPLICA in headers
        headers[ROUTED_REPLICA] = self.replica_id
        headers[ROUTED_REASON] = "affinity" if self.hinted[request] else "fallback"
        async with contextlib.aclosing(super().generate(endpoint, body, headers)) as items:
            async for item in items:
                yield item


@dataclass
class Sample:
    index: int
    started: float
    """``perf_counter`` when the pipeline started on it."""
    latency_s: float


def _config(url: str) -> ServingConfig:
    return ServingConfig.model_validate(
        {
            "models": [{"name": MODEL, "source": "/x"}],
            "redis": {"url": url},
            "gateway": {"num_replicas": 2, "health_check_interval_s": 0.5},
            "auth": {"required": True, "refresh_s": 0.5},
            "queue": {"default_capacity": 64},
            "response_cache": {"enabled": True},
            "routing": {"block_chars": 128},
            "tenants": [
                {
                    "id": "alpha",
                    "api_key_sha256": [hash_key(KEY)],
                    "requests_per_minute": 100_000,
                    "tokens_per_minute": 100_000_000,
                    "response_cache": True,
                }
            ],
        }
    )


def _body(i: int) -> dict[str, Any]:
    question = "What is VAT?" if i % 4 == 0 else f"How do I file expense report number {i}?"
    return {
        "model": MODEL,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 16,
        "user": f"user-{i % 8}",
        "stream": i % 2 == 1,
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class LatencyMissed(AssertionError):
    """The added p99 bound was missed (everything else held)."""


async def test_redis_frozen_under_load_costs_no_request(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Latency on a shared 2-core machine is noisy (other processes take the cores): the
    whole scenario runs a second time, on an emptied Redis, only if the first missed the
    latency bound; every other assertion must hold on the first run."""
    try:
        await _frozen_under_load(server, monkeypatch)
    except LatencyMissed as first:
        print(f"first run missed the latency bound ({first}); running the scenario again")
        redis_sync.Redis.from_url(server.url).flushall()
        with monkeypatch.context() as again:
            await _frozen_under_load(server, again)


async def _frozen_under_load(server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    assert server.proc is not None
    pid = server.proc.pid
    cfg = _config(server.url)
    redis = redis_client(cfg, {})  # the production client: 1 s socket timeouts
    engine = RoutedEngine()
    gw = TestGateway(cfg, {MODEL: engine}, redis)
    service = gw.service
    await service.start()
    await service.probe_once()
    assert service.health_report()["redis_breaker"] == "closed"

    samples: list[Sample] = []
    run = service.run

    async def timed_run(ctx: RequestContext, flight: Flight) -> Answer:
        started = time.perf_counter()
        tail = ctx.request_id.rsplit("-", 1)[-1]
        index = int(tail) if tail.isdigit() else -1  # the last checks'

        def done() -> None:
            samples.append(Sample(index, started, time.perf_counter() - started))

        try:
            answer = await run(ctx, flight)
        except BaseException:
            done()
            raise
        if answer.stream is None:
            done()
            return answer
        stream = answer.stream
        close = stream.aclose

        async def aclose() -> None:
            try:
                await close()
            finally:
                done()

        monkeypatch.setattr(stream, "aclose", aclose)
        return answer

    monkeypatch.setattr(service, "run", timed_run)

    statuses: dict[int, int] = {}
    problems: list[str] = []
    semaphore = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        headers = {"Authorization": f"Bearer {KEY}", "X-OSS-Response-Cache": "on", "X-Request-Id": f"req-{i}"}
        async with semaphore:
            response = await gw.http.post("/v1/chat/completions", json=_body(i), headers=headers)
        statuses[i] = response.status_code
        if response.status_code != 200:
            problems.append(f"request {i}: {response.status_code} {response.text[:200]}")
        elif i % 2 == 1 and not response.text.rstrip().endswith("data: [DONE]"):
            problems.append(f"request {i}: stream without [DONE]")

    # --- the breaker as /health reports it, sampled every 5 ms
    events: dict[str, float] = {}
    admission_modes: set[str] = set()
    stop_watching = asyncio.Event()

    async def watch() -> None:
        while not stop_watching.is_set():
            report = service.health_report()
            now = time.perf_counter()
            if "freeze" in events:
                admission_modes.add(report["admission"])
                if report["redis_breaker"] == "open":
                    events.setdefault("open", now)
                    assert gw.metric("oss_serving_redis_breaker_open") == 1
                elif "thaw" in events and "open" in events:
                    events.setdefault("closed", now)
            await asyncio.sleep(0.005)

    async def freeze_and_thaw() -> None:
        await asyncio.sleep(FREEZE_AT_S)
        os.kill(pid, signal.SIGSTOP)
        events["freeze"] = time.perf_counter()
        await asyncio.sleep(FREEZE_FOR_S)
        os.kill(pid, signal.SIGCONT)
        events["thaw"] = time.perf_counter()

    # Warm up (the first request imports vLLM's protocol models), then measure from zero.
    for i in range(4):
        await one(10_000 + i)
    samples.clear()
    statuses.clear()
    watcher = asyncio.create_task(watch())
    chaos = asyncio.create_task(freeze_and_thaw())
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    try:
        for i in range(int(RUN_S * RATE)):
            await asyncio.sleep(max(0.0, start + i / RATE - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        await chaos
    finally:
        os.kill(pid, signal.SIGCONT)
        stop_watching.set()
        await watcher

    try:
        # --- no request failed: no 5xx, no 401, no 429
        assert not problems, "\n".join(problems[:20])
        assert sorted(statuses) == list(range(int(RUN_S * RATE)))

        freeze, thaw = events["freeze"], events["thaw"]
        assert "open" in events, "the breaker never opened"
        assert "closed" in events, "the breaker did not close after SIGCONT"
        opened, closed = events["open"], events["closed"]
        baseline = [s for s in samples if start + WARM_UP_S <= s.started < freeze]
        paused = [s for s in samples if opened <= s.started < thaw]
        base_ms = [1000 * s.latency_s for s in baseline]
        paused_ms = [1000 * s.latency_s for s in paused]
        before_open_ms = [1000 * s.latency_s for s in samples if freeze <= s.started < opened]
        figures = (
            f"baseline ({len(base_ms)} requests): p50 {statistics.median(base_ms):.1f} ms, "
            f"p99 {_pct(base_ms, 0.99):.1f} ms; "
            f"paused, breaker open ({len(paused_ms)}): p50 {statistics.median(paused_ms):.1f} ms, "
            f"p99 {_pct(paused_ms, 0.99):.1f} ms; "
            f"paused, before it opened ({len(before_open_ms)}): max "
            f"{max(before_open_ms, default=0):.0f} ms; "
            f"time to open {1000 * (opened - freeze):.0f} ms; "
            f"time to close after SIGCONT {1000 * (closed - thaw):.0f} ms"
        )
        print(figures)
        assert len(baseline) > 80
        assert len(paused) > 120
        assert opened - freeze < 2.0, figures
        assert closed - thaw < 3.0, figures
        added_p99 = (_pct(paused_ms, 0.99) - _pct(base_ms, 0.99)) / 1000
        latency_missed = added_p99 >= ADDED_P99_LIMIT_S

        # --- while open: every feature took its fallback, admission went local, no affinity hints
        for feature in ("rate_limit", "response_cache", "prefix_index"):
            assert gw.metric("oss_serving_redis_fallbacks_total", feature=feature) > 0, feature
        assert "local (Redis unreachable)" in admission_modes
        hinted = [engine.hinted[f"req-{s.index}"] for s in paused if f"req-{s.index}" in engine.hinted]
        assert hinted
        assert not any(hinted), "requests carried affinity hints while the breaker was open"
        after = [s for s in samples if s.started > closed + 1.0]
        assert any(engine.hinted.get(f"req-{s.index}") for s in after), "no affinity hints after recovery"

        # --- afterwards every feature uses Redis again
        assert gw.metric("oss_serving_redis_breaker_open") == 0
        assert service.health_report()["redis_breaker"] == "closed"
        raw = redis
        bucket = "oss:rl:alpha:req"
        stamp = await raw.hget(bucket, "ts")
        await asyncio.sleep(0.01)
        fallbacks = gw.metric("oss_serving_redis_fallbacks_total", feature="rate_limit")
        first = await gw.http.post(
            "/v1/chat/completions",
            json={**_body(0), "messages": [{"role": "user", "content": "a question asked once, after"}]},
            headers={"Authorization": f"Bearer {KEY}", "X-OSS-Response-Cache": "on"},
        )
        await service._prompt_caching.drain()
        second = await gw.http.post(
            "/v1/chat/completions",
            json={**_body(0), "messages": [{"role": "user", "content": "a question asked once, after"}]},
            headers={"Authorization": f"Bearer {KEY}", "X-OSS-Response-Cache": "on"},
        )
        assert first.headers[CACHE_HEADER] == "miss"
        assert second.headers[CACHE_HEADER] == "hit"  # stored in Redis, found there again
        assert await raw.hget(bucket, "ts") != stamp  # the shared rate-limit bucket moves again
        assert gw.metric("oss_serving_redis_fallbacks_total", feature="rate_limit") == fallbacks
        for _ in range(40):
            if service.health_report()["admission"] == "redis":
                break
            await asyncio.sleep(0.1)
        assert service.health_report()["admission"] == "redis"
        if latency_missed:
            raise LatencyMissed(figures)
    finally:
        await gw.close()
        await redis.aclose()
