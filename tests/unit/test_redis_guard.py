"""The gateway's Redis circuit breaker (``redis_guard.py``) and each feature's fallback.

Each test runs its own ``redis-server`` and breaks it for real: killed (connections
refused) or frozen with SIGSTOP (connections accepted, nothing answered: a slow Redis).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from serving.config import RedisConfig, ResponseCacheConfig, RoutingConfig, UpstreamConfig
from serving.engine.protocol import Endpoint, EngineJSON
from serving.gateway.context import RequestContext
from serving.gateway.errors import RateLimitError
from serving.gateway.handoff import RedisCounters, UpstreamBudget
from serving.gateway.prefix import PrefixIndex
from serving.gateway.ratelimit import RateLimiter
from serving.gateway.redis_guard import FEATURES, RedisGuard, RedisSlow, RedisUnavailable, guard_of
from serving.gateway.response_cache import ResponseCache
from serving.gateway.tenants import Tenant, TenantLimits
from serving.metrics import GatewayMetrics
from serving.wire import CACHE_HEADER
from tests.redis_server import RedisServer

CALL_TIMEOUT_S = 0.1
PROBE_S = 0.1


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis").start()
    yield srv
    if srv.proc is not None:
        os.kill(srv.proc.pid, signal.SIGCONT)
    srv.stop()


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    # The gateway's client settings: a 1 s socket timeout, which the guard must never wait for.
    c = aioredis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
    yield c
    await c.aclose()


@pytest.fixture
def metrics() -> GatewayMetrics:
    return GatewayMetrics(["m"], [0.1, 1.0])


@pytest.fixture
async def guard(client: aioredis.Redis, metrics: GatewayMetrics) -> AsyncIterator[RedisGuard]:
    g = RedisGuard(
        client,
        RedisConfig(call_timeout_s=CALL_TIMEOUT_S, breaker_failures=3),
        metrics,
        probe_interval_s=PROBE_S,
    )
    yield g
    await g.aclose()


def freeze(server: RedisServer) -> None:
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)


def thaw(server: RedisServer) -> None:
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGCONT)


def sample(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def fail_until_open(guard: RedisGuard) -> int:
    """Call until the breaker opens; returns how many calls failed."""
    failures = 0
    while not guard.is_open:
        with pytest.raises((RedisConnectionError, RedisSlow)):
            await guard.client.get("k")
        failures += 1
        assert failures <= guard.failures_to_open
    return failures


async def wait_closed(guard: RedisGuard, within_s: float) -> float:
    started = time.monotonic()
    while guard.is_open:
        assert time.monotonic() - started < within_s, "the breaker did not close"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


# ------------------------------------------------------------------ the breaker
async def test_calls_go_through_while_redis_answers(guard: RedisGuard, metrics: GatewayMetrics) -> None:
    c = guard.client
    await c.set("k", "v")
    assert await c.get("k") == b"v"
    async with c.pipeline(transaction=True) as pipe:
        pipe.incrby("n", 2)
        pipe.incrby("n", 3)
        assert await pipe.execute() == [2, 5]
    script = c.register_script("return redis.call('GET', KEYS[1])")
    assert await script(keys=["k"]) == b"v"
    assert guard.state == "closed"
    assert guard.report()["redis_breaker"] == "closed"
    assert sample(metrics, "oss_serving_redis_breaker_open") == 0
    for feature in FEATURES:  # every label is there from the start, at zero
        assert (
            metrics.registry.get_sample_value("oss_serving_redis_fallbacks_total", {"feature": feature}) == 0
        )
    assert guard_of(c) is guard
    assert guard_of(guard.client.raw) is None


async def test_opens_after_consecutive_failures_then_fails_fast(
    guard: RedisGuard, server: RedisServer, metrics: GatewayMetrics
) -> None:
    server.stop()
    before = time.time()
    assert await fail_until_open(guard) == 3
    assert guard.state == "open"
    report = guard.report()
    assert report["redis_breaker"] == "open"
    assert before <= report["redis_breaker_since_unix"] <= time.time()
    assert sample(metrics, "oss_serving_redis_breaker_open") == 1

    called = []

    async def never() -> None:
        called.append(1)

    started = time.perf_counter()
    for _ in range(100):
        with pytest.raises(RedisUnavailable):
            await guard.call(never)
        with pytest.raises(RedisUnavailable):
            await guard.client.get("k")
        with pytest.raises(RedisUnavailable):
            await guard.client.register_script("return 1")()
        async with guard.client.pipeline() as pipe:
            pipe.get("k")
            with pytest.raises(RedisUnavailable):
                await pipe.execute()
        with pytest.raises(RedisUnavailable):
            guard.client.pubsub()
    elapsed = time.perf_counter() - started
    assert called == []  # no call was even made
    assert elapsed < 0.5, f"500 refused calls took {elapsed:.3f} s"


async def test_slow_redis_counts_as_failures_and_the_probe_closes_it(
    guard: RedisGuard, server: RedisServer, metrics: GatewayMetrics
) -> None:
    await guard.client.set("k", "v")
    freeze(server)
    started = time.perf_counter()
    for _ in range(3):
        t0 = time.perf_counter()
        with pytest.raises(RedisSlow):
            await guard.client.get("k")
        # the call's budget, never the client's 1 s socket timeout
        assert time.perf_counter() - t0 < CALL_TIMEOUT_S + 0.4
    assert guard.is_open
    assert time.perf_counter() - started < 3 * CALL_TIMEOUT_S + 0.8
    await asyncio.sleep(3 * PROBE_S)  # probes go on failing while Redis is frozen
    assert guard.is_open
    thaw(server)
    recovered = await wait_closed(guard, within_s=5)
    assert recovered < 2
    assert sample(metrics, "oss_serving_redis_breaker_open") == 0
    assert guard.report()["redis_breaker"] == "closed"
    assert await guard.client.get("k") == b"v"
    assert guard.opened_total == 1


async def test_a_restarted_redis_closes_it(guard: RedisGuard, server: RedisServer) -> None:
    server.stop()
    await fail_until_open(guard)
    await asyncio.sleep(2 * PROBE_S)
    assert guard.is_open
    server.start()
    await wait_closed(guard, within_s=5)
    await guard.client.set("k", "again")
    assert await guard.client.get("k") == b"again"


async def test_only_consecutive_failures_open_it(client: aioredis.Redis) -> None:
    guard = RedisGuard(client, RedisConfig(call_timeout_s=CALL_TIMEOUT_S, breaker_failures=3))

    async def down() -> None:
        raise RedisConnectionError("refused")

    async def up() -> str:
        return "ok"

    for _ in range(5):
        for _ in range(2):
            with pytest.raises(RedisConnectionError):
                await guard.call(down)
        assert await guard.call(up) == "ok"
    assert not guard.is_open
    for _ in range(3):
        with pytest.raises(RedisConnectionError):
            await guard.call(down)
    assert guard.is_open
    await guard.aclose()


async def test_error_answers_are_not_failures(guard: RedisGuard) -> None:
    await guard.client.set("text", "v")
    for _ in range(10):
        with pytest.raises(ResponseError):  # WRONGTYPE: Redis answered
            await guard.client.hget("text", "f")
    assert not guard.is_open


async def test_after_the_probe_one_failure_opens_it_again(guard: RedisGuard, server: RedisServer) -> None:
    freeze(server)
    await fail_until_open(guard)
    thaw(server)
    await wait_closed(guard, within_s=5)
    freeze(server)  # on probation: the first failure is enough
    with pytest.raises(RedisSlow):
        await guard.client.get("k")
    assert guard.is_open
    thaw(server)
    await wait_closed(guard, within_s=5)
    await guard.client.get("k")  # a success ends the probation
    freeze(server)
    for _ in range(2):
        with pytest.raises(RedisSlow):
            await guard.client.get("k")
        assert not guard.is_open
    with pytest.raises(RedisSlow):
        await guard.client.get("k")
    assert guard.is_open
    thaw(server)


async def test_cancelled_calls_are_not_failures(guard: RedisGuard, server: RedisServer) -> None:
    freeze(server)
    for _ in range(5):
        task = asyncio.ensure_future(guard.client.get("k"))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not guard.is_open
    thaw(server)


# ------------------------------------------------------------------ the features' rules
async def test_rate_limits_fall_back_to_this_replicas_share(
    guard: RedisGuard, server: RedisServer, metrics: GatewayMetrics
) -> None:
    limiter = RateLimiter(guard.client, "rg", local_share=3)
    tenant = Tenant(id="t", limits=TenantLimits(requests_per_minute=10))
    await limiter.check(tenant, 1)
    assert await guard.client.raw.exists("rg:rl:t:req") == 1  # shared through Redis
    server.stop()
    await fail_until_open(guard)
    started = time.perf_counter()
    for _ in range(4):  # ceil(10 / 3), in process
        await limiter.check(tenant, 1)
    with pytest.raises(RateLimitError) as refused:
        await limiter.check(tenant, 1)
    assert refused.value.headers["x-ratelimit-limit-requests"] == "10"
    assert time.perf_counter() - started < 0.05
    assert sample(metrics, "oss_serving_redis_fallbacks_total", feature="rate_limit") == 5


async def test_a_request_larger_than_the_share_passes_a_full_local_bucket(client: aioredis.Redis) -> None:
    limiter = RateLimiter(None, "rg", local_share=4)
    tenant = Tenant(id="t", limits=TenantLimits(tokens_per_minute=1000))
    await limiter.check(tenant, 900)  # more than the share of 250, within the whole limit
    with pytest.raises(RateLimitError) as refused:
        await limiter.check(tenant, 10)  # the bucket is in debt now
    assert "Retry-After" in refused.value.headers
    with pytest.raises(RateLimitError, match="whole limit"):
        await limiter.check(tenant, 1001)


async def test_upstream_budget_fails_closed(
    guard: RedisGuard, server: RedisServer, metrics: GatewayMetrics
) -> None:
    upstream = UpstreamConfig(
        name="cloud", base_url="http://127.0.0.1:1/v1", requests_per_minute=100, monthly_token_cap=10_000
    )
    counters = RedisCounters(guard.client)
    budget = UpstreamBudget(upstream, counters, key_prefix="rg")
    reservation = await budget.reserve(100)
    assert reservation is not None
    assert counters.reachable
    used = await budget.used()
    assert used["month_tokens"] == 100
    freeze(server)
    for _ in range(5):  # declined, whether the breaker is still closed or open by now
        assert await budget.reserve(1) is None
        assert not counters.reachable
    assert guard.is_open
    started = time.perf_counter()
    assert await budget.reserve(1) is None
    assert time.perf_counter() - started < 0.01
    await budget.settle(reservation, 150)  # lost, not counted in process
    assert (await budget.used())["month_tokens"] == 100  # the value last read
    assert sample(metrics, "oss_serving_redis_fallbacks_total", feature="upstream_budget") == 9
    thaw(server)
    await wait_closed(guard, within_s=5)
    again = await budget.reserve(10)
    assert again is not None
    assert counters.reachable
    # Nothing was counted in process meanwhile. A call that ran out of its budget may still
    # run once Redis wakes up (it was sent): the budget can only be overcounted, never under.
    assert 110 <= (await budget.used())["month_tokens"] <= 115


async def test_response_cache_is_skipped(
    guard: RedisGuard, server: RedisServer, metrics: GatewayMetrics
) -> None:
    cache = ResponseCache(guard.client, ResponseCacheConfig(enabled=True, key_prefix="rg-rc"), metrics)
    body = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}

    def ctx() -> RequestContext:
        return RequestContext(
            "r",
            Endpoint.chat,
            "m",
            body,
            {"x-oss-response-cache": "on"},
            tenant=Tenant(id="t", response_cache=True),
        )

    first = ctx()
    found = await cache.lookup(first)
    assert found is not None
    assert first.response_headers[CACHE_HEADER] == "miss"
    server.stop()
    await fail_until_open(guard)
    skipped = ctx()
    assert await cache.lookup(skipped) is None
    assert CACHE_HEADER not in skipped.response_headers
    _, _, plan = found
    assert plan is not None
    cache.store_json(plan, EngineJSON(200, {"choices": []}))  # not even attempted
    await cache.drain()
    assert sample(metrics, "oss_serving_redis_fallbacks_total", feature="response_cache") == 2


async def test_prefix_index_is_skipped(
    guard: RedisGuard, server: RedisServer, metrics: GatewayMetrics
) -> None:
    index = PrefixIndex(guard.client, RoutingConfig(key_prefix="rg-px"))
    assert index.available
    await index.record("m", "replica-a", ["h1", "h2"], "k:key")
    found = await index.lookup("m", ["h1", "h2"], "k:key")
    assert found.matched == {"replica-a": 2}
    server.stop()
    await fail_until_open(guard)
    assert not index.available
    started = time.perf_counter()
    nothing = await index.lookup("m", ["h1", "h2"], "k:key")
    assert nothing.matched == {}
    assert nothing.key_replica is None
    assert await index.record("m", "replica-a", ["h1"], None) == 0
    assert time.perf_counter() - started < 0.01
    assert sample(metrics, "oss_serving_redis_fallbacks_total", feature="prefix_index") == 2


async def test_gateway_health_reports_the_breaker(client: aioredis.Redis, server: RedisServer) -> None:
    from serving.gateway.build import build_gateway
    from tests.fakes import FakeEngine
    from tests.gateway import config_for

    cfg = config_for(["m"], redis={"url": server.url, "call_timeout_s": CALL_TIMEOUT_S})
    service = build_gateway(cfg, {"m": FakeEngine()}, client, {})
    await service.probe_once()
    report: dict[str, Any] = service.health_report()
    assert report["redis_breaker"] == "closed"
    assert report["status"] == "ok"
    guard = guard_of(service._limiter._redis)
    assert guard is not None
    server.stop()
    await fail_until_open(guard)
    report = service.health_report()
    assert report["redis_breaker"] == "open"
    assert report["status"] == "degraded"
    assert report["redis_breaker_since_unix"] <= time.time()
    await guard.aclose()
    await service.stop()
