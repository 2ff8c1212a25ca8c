"""Handoff with a real Redis: budgets shared by gateway replicas, overflow from the Redis queue."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from loadtest.sim import EngineProfile
from loadtest.sim.background import serve_in_thread
from loadtest.sim.server import SimEngine
from serving.config import ServingConfig
from serving.gateway.build import build_gateway
from serving.gateway.handoff import RedisCounters, UpstreamBudget
from tests.fakes import FakeEngine
from tests.redis_server import RedisServer
from tests.unit.test_handoff import BIG, SMALL, Stack, chat, key

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cloud() -> Iterator[tuple[SimEngine, str]]:
    engine = SimEngine(EngineProfile(step_base_s=0.0005, step_per_seq_s=0, default_max_tokens=6), "sim-cloud")
    with serve_in_thread(engine) as url:
        yield engine, url + "/v1"


def _config(**upstream: int) -> ServingConfig:
    return ServingConfig.model_validate(
        {
            "models": [{"name": "m", "source": "x"}],
            "upstreams": [
                {"name": "cloud", "base_url": "http://127.0.0.1:9/v1", "default_model": "c", **upstream}
            ],
            "handoff": {"upstream": "cloud"},
        }
    )


async def test_two_replicas_share_one_budget(client: aioredis.Redis) -> None:
    cfg = _config(requests_per_minute=3, monthly_token_cap=1000)
    replicas = [UpstreamBudget(cfg.upstreams[0], RedisCounters(client)) for _ in range(2)]
    granted = [await replicas[i % 2].reserve(100) for i in range(5)]
    assert [g is not None for g in granted] == [True, True, True, False, False]
    first = granted[0]
    assert first is not None
    await replicas[1].settle(first, 40)  # the upstream reported fewer tokens than reserved
    used = await replicas[0].used()
    assert used == {"minute_requests": 3, "minute_tokens": 240, "month_tokens": 240}


async def test_budget_fails_closed_when_redis_is_down(server: RedisServer, client: aioredis.Redis) -> None:
    """No per-process counting: an outage can never overspend the budget or restart the
    monthly cap (each replica would otherwise start from zero)."""
    cfg = _config(requests_per_minute=5)
    counters = RedisCounters(client)
    budget = UpstreamBudget(cfg.upstreams[0], counters)
    server.stop()
    assert await budget.reserve(10) is None  # declined: nothing counted in process
    assert not counters.reachable


async def test_build_gateway_shares_the_budget_in_redis(client: aioredis.Redis) -> None:
    cfg = _config(requests_per_minute=1)
    service = build_gateway(cfg, {"m": FakeEngine()}, client, {})
    assert await UpstreamBudget(cfg.upstreams[0], RedisCounters(client)).reserve(1) is not None
    # the gateway's budget sees the reservation made through another object: it is shared
    upstream = service._handoff._upstreams["cloud"]  # type: ignore[attr-defined]
    assert await upstream.budget.reserve(1) is None
    await service._handoff.aclose()


async def test_overflow_under_a_full_redis_queue(
    client: aioredis.Redis, cloud: tuple[SimEngine, str]
) -> None:
    s = Stack(cloud[1], queue={"default_capacity": 1}, redis=client)
    admission = s.service.admission
    await s.service.probe_once()
    tenant = s.service._auth.authenticate(f"Bearer {key('open')}")  # type: ignore[union-attr]
    try:
        assert (await s.post("open", chat(SMALL))).headers["x-oss-serving-backend"] == "local"
        held = await admission.acquire(BIG, tenant, None)
        assert not admission.degraded  # the shared Redis queue, not the local fallback
        # no service time measured yet for BIG: the queue assumes 1 s per request
        assert await admission.predicted_wait_s(BIG) > 0.5
        full = await s.post("open", chat(BIG))
        assert full.headers["x-oss-serving-handoff"] == "overflow"
        assert full.headers["x-oss-serving-backend"] == "cloud"
        await admission.release(held)
        assert (await s.post("open", chat(BIG))).headers["x-oss-serving-backend"] == "local"
    finally:
        await s.close()
