"""Prefix-affinity routing: the decision rule, the engine deployment's router, and the
gateway's half over a shared Redis index (two gateways, fake engines with two replicas).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve._private.request_router.common import PendingRequest

from serving.config import ResponseCacheConfig, RoutingConfig
from serving.engine.protocol import Endpoint, EngineJSON, EngineSSE
from serving.engine.router import PrefixAffinityRouter
from serving.engine.routing_hints import (
    HINT_AFFINITY,
    HINT_AVOID,
    HINT_KEY_REPLICA,
    HINT_ONLY,
    HINT_STRATEGY,
    ROUTED_REASON,
    ROUTED_REPLICA,
    decide,
    format_affinity,
    parse_affinity,
)
from serving.gateway.build import build_gateway
from serving.gateway.context import RequestContext
from serving.gateway.prefix_caching import PromptCaching
from serving.gateway.routing import affinity_key
from serving.gateway.service import GatewayService
from serving.metrics import GatewayMetrics
from serving.wire import cached_tokens_in
from tests.fakes import FakeEngine
from tests.gateway import ask as run_request
from tests.gateway import config_for

MODEL = "m"


# ------------------------------------------------------------------ the decision rule
def test_longest_prefix_wins_when_load_is_balanced() -> None:
    d = decide({"a": 3, "b": 12}, None, {"a": 1, "b": 2}, imbalance_threshold=4)
    assert d.reason == "affinity"
    assert d.ranked[0] == "b"
    assert set(d.ranked) == {"a", "b"}


def test_load_wins_past_the_imbalance_threshold() -> None:
    d = decide({"b": 12}, None, {"a": 0, "b": 5}, imbalance_threshold=4)
    assert (d.ranked, d.reason) == (["a"], "load")
    d = decide({"b": 12}, None, {"a": 0, "b": 4}, imbalance_threshold=4)
    assert (d.ranked[0], d.reason) == ("b", "affinity")


def test_key_replica_breaks_ties_and_stands_in_without_prefix_match() -> None:
    assert decide({"a": 5, "b": 5}, "b", {"a": 0, "b": 0}, imbalance_threshold=4).ranked[0] == "b"
    assert decide({}, "a", {"a": 1, "b": 0}, imbalance_threshold=4).ranked[0] == "a"


def test_no_affinity_or_unavailable_replica_falls_back() -> None:
    assert decide({}, None, {"a": 0}, imbalance_threshold=4).reason == "fallback"
    # The affine replica is not among those that can take the request (full or gone).
    assert decide({"c": 9}, "c", {"a": 0, "b": 0}, imbalance_threshold=4).reason == "fallback"
    # Matches shorter than min_match_blocks do not count.
    assert (
        decide({"a": 1}, None, {"a": 0, "b": 0}, imbalance_threshold=4, min_match_blocks=2).reason
        == "fallback"
    )


def test_affinity_hint_round_trips() -> None:
    assert parse_affinity(format_affinity({"r1": 3, "r2": 10})) == {"r1": 3, "r2": 10}
    assert parse_affinity("r1=3,bad,=4,r2=x") == {"r1": 3}
    assert parse_affinity(None) == {}


def test_affinity_key_prefers_prompt_cache_key_then_session_then_user() -> None:
    cfg = RoutingConfig()
    base = {"model": MODEL, "messages": [], "user": "alice"}
    ctx = RequestContext(
        "r", Endpoint.chat, MODEL, {**base, "prompt_cache_key": "conv-1"}, {"x-session-id": "s"}
    )
    assert affinity_key(ctx, cfg) == "k:conv-1"
    assert affinity_key(RequestContext("r", Endpoint.chat, MODEL, base, {"x-session-id": "s"}), cfg) == "s:s"
    assert affinity_key(RequestContext("r", Endpoint.chat, MODEL, base), cfg) == "u:alice"
    assert affinity_key(RequestContext("r", Endpoint.chat, MODEL, {"messages": []}), cfg) is None


def test_cached_tokens_from_chat_and_responses_usage() -> None:
    assert cached_tokens_in({"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 8}}) == (10, 8)
    assert cached_tokens_in({"input_tokens": 7, "input_tokens_details": {"cached_tokens": 0}}) == (7, 0)
    assert cached_tokens_in({"prompt_tokens": 3, "prompt_tokens_details": None}) == (3, 0)
    assert cached_tokens_in(None) is None


# ------------------------------------------------------------------ the Ray Serve router
class FakeReplica:
    """What Ray Serve's router reads of a running replica (no actor behind it)."""

    def __init__(self, uid: str, queue_len: int = 0) -> None:
        self.replica_id = ReplicaID(unique_id=uid, deployment_id=DeploymentID(name="engine", app_name="app"))
        self.node_id = "node"
        self.availability_zone = None
        self.max_ongoing_requests = 10
        self.multiplexed_model_ids: set[str] = set()
        self.replica_metadata: dict[str, Any] = {}
        self.routing_stats: dict[str, Any] = {}
        self.queue_len = queue_len
        self.probes = 0

    async def get_queue_len(self, *, deadline_s: float) -> int:
        self.probes += 1
        return self.queue_len


def make_router(*replicas: FakeReplica, threshold: int = 2) -> PrefixAffinityRouter:
    router = PrefixAffinityRouter(
        deployment_id=DeploymentID(name="engine", app_name="app"),
        handle_source=DeploymentHandleSource.UNKNOWN,
        use_replica_queue_len_cache=True,
    )
    router.initialize_state(imbalance_threshold=threshold)
    router.update_replicas(list(replicas))
    return router


def pending(hints: dict[str, str]) -> PendingRequest:
    return PendingRequest(
        args=["chat", {}, hints], kwargs={}, metadata=RequestMetadata(request_id="1", internal_request_id="1")
    )


def ids(ranks: list[list[FakeReplica]]) -> list[list[str]]:
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


async def test_router_follows_affinity_when_balanced() -> None:
    a, b = FakeReplica("a", 1), FakeReplica("b", 2)
    router = make_router(a, b)
    hints = {HINT_STRATEGY: "prefix", HINT_AFFINITY: "b=7"}
    assert ids(await router.choose_replicas([a, b], pending(hints)))[0] == ["b"]
    assert hints[ROUTED_REASON] == "affinity"
    assert a.probes >= 1
    assert b.probes >= 1


async def test_router_lets_load_win_when_affine_replica_is_busy() -> None:
    a, b = FakeReplica("a", 0), FakeReplica("b", 6)
    router = make_router(a, b, threshold=2)
    hints = {HINT_STRATEGY: "prefix", HINT_AFFINITY: "b=7", HINT_KEY_REPLICA: "b"}
    assert ids(await router.choose_replicas([a, b], pending(hints))) == [["a"]]
    assert hints[ROUTED_REASON] == "load"


async def test_router_without_hints_is_power_of_two() -> None:
    a, b = FakeReplica("a"), FakeReplica("b")
    router = make_router(a, b)
    plain: dict[str, str] = {"x-request-id": "1"}
    ranks = ids(await router.choose_replicas([a, b], pending(plain)))
    assert sorted(ranks[0]) == ["a", "b"]  # two random choices, least loaded picked later
    assert ROUTED_REASON not in plain
    hinted = {HINT_STRATEGY: "prefix"}
    await router.choose_replicas([a, b], pending(hinted))
    assert hinted[ROUTED_REASON] == "fallback"


async def test_router_round_robin_rotates() -> None:
    a, b = FakeReplica("a"), FakeReplica("b")
    router = make_router(a, b)
    firsts = [
        ids(await router.choose_replicas([a, b], pending({HINT_STRATEGY: "round_robin"})))[0][0]
        for _ in range(4)
    ]
    assert firsts == ["a", "b", "a", "b"]


async def test_router_writes_chosen_replica_back_into_the_hints() -> None:
    a, b = FakeReplica("a"), FakeReplica("b")
    router = make_router(a, b)
    hints = {HINT_STRATEGY: "prefix"}
    router.on_request_routed(pending(hints), b.replica_id, None)
    assert hints[ROUTED_REPLICA] == "b"


async def test_router_avoids_quarantined_replicas_unless_none_would_be_left() -> None:
    a, b = FakeReplica("a"), FakeReplica("b")
    router = make_router(a, b)
    for _ in range(8):  # power of two would pick "a" about half the time
        assert ids(await router.choose_replicas([a, b], pending({HINT_AVOID: "a"})))[0] == ["b"]
    both = ids(await router.choose_replicas([a, b], pending({HINT_AVOID: "a,b"})))
    assert sorted(both[0]) == ["a", "b"]


def test_a_probe_of_a_gone_replica_backs_off_instead_of_spinning() -> None:
    """Ray's routing loop retries an empty choice at once unless told to back off; a spin
    there never yields the event loop (it once stalled a whole gateway replica). Run in a
    thread of its own, so a regression fails here instead of hanging the suite."""
    outcome: list[str] = []

    def probe() -> None:
        async def main() -> None:
            a = FakeReplica("a")
            router = make_router(a)
            request = PendingRequest(
                args=[{HINT_ONLY: "gone"}],
                kwargs={},
                metadata=RequestMetadata(request_id="p", internal_request_id="p"),
            )
            try:
                await asyncio.wait_for(router._choose_replica_for_request(request), 0.5)
            except TimeoutError:
                outcome.append("timed out")

        asyncio.run(main())

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(10)
    assert outcome == ["timed out"]


# ------------------------------------------------------------------ gateway half, two gateways
class ReplicatedFakeEngine(FakeEngine):
    """Two fake replicas behind one client; it plays the router with the same rule as Ray's."""

    def __init__(self, threshold: int = 2) -> None:
        super().__init__()
        self.load = {"replica-a": 0, "replica-b": 0}
        self.served: list[str] = []
        self.threshold = threshold

    async def generate(
        self, endpoint: Endpoint, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncIterator[EngineJSON | EngineSSE]:
        d = decide(
            parse_affinity(headers.get(HINT_AFFINITY)),
            headers.get(HINT_KEY_REPLICA),
            self.load,
            imbalance_threshold=self.threshold,
        )
        chosen = d.ranked[0] if d.ranked else min(self.load, key=lambda r: (self.load[r], r))
        headers[ROUTED_REASON] = d.reason
        headers[ROUTED_REPLICA] = chosen
        self.served.append(chosen)
        async for item in super().generate(endpoint, body, headers):
            yield item


@pytest.fixture
async def routing_config(redis_client: aioredis.Redis) -> AsyncIterator[RoutingConfig]:
    prefix = f"test-routing-{uuid.uuid4().hex[:8]}"
    yield RoutingConfig(key_prefix=prefix, block_chars=64)
    keys = [k async for k in redis_client.scan_iter(match="{" + prefix + "*")]
    if keys:
        await redis_client.delete(*keys)


def gateway(engine: FakeEngine, cfg: RoutingConfig, redis: Any) -> tuple[GatewayService, PromptCaching]:
    config = config_for([MODEL], routing=cfg.model_dump(), queue={"enabled": False})
    service = build_gateway(config, {MODEL: engine}, redis, {})
    return service, service._prompt_caching


async def ask(service: GatewayService, system: str, question: str, **extra: Any) -> RequestContext:
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
    }
    ctx, status, out = await run_request(service, {**body, **extra})
    assert status == 200
    assert isinstance(out, dict)
    return ctx


async def test_shared_prefix_sticks_to_one_replica_from_either_gateway(
    redis_client: aioredis.Redis, routing_config: RoutingConfig
) -> None:
    engine = ReplicatedFakeEngine()
    (gw1, pc1), (gw2, pc2) = (
        gateway(engine, routing_config, redis_client),
        gateway(engine, routing_config, redis_client),
    )
    for gw in (gw1, gw2):
        await gw.probe_once()
    system_a = "You answer questions about the travel policy. " * 12
    system_b = "You are a code reviewer for the payments service. " * 12
    await ask(gw1, system_a, "first question")
    await pc1.drain()
    engine.load["replica-a" if engine.served[0] == "replica-b" else "replica-b"] = 0
    first = engine.served[0]
    engine.load[first] = 1  # the first replica is now slightly busier: a new prefix goes elsewhere
    await ask(gw2, system_b, "unrelated")
    await pc2.drain()
    assert engine.served[1] != first
    for i in range(6):
        gw, pc = (gw1, pc1) if i % 2 else (gw2, pc2)
        await ask(gw, system_a, f"question {i}")
        await pc.drain()
    assert engine.served[2:] == [first] * 6
    text = gw2.metrics.render().decode()
    assert 'oss_serving_routing_decisions_total{model="m",reason="affinity"} 3.0' in text
    assert 'oss_serving_prefix_affinity_total{model="m",result="hit"} 3.0' in text


async def test_affine_replica_overloaded_load_wins(
    redis_client: aioredis.Redis, routing_config: RoutingConfig
) -> None:
    engine = ReplicatedFakeEngine(threshold=2)
    gw, pc = gateway(engine, routing_config, redis_client)
    await gw.probe_once()
    system = "You summarise incident reports for the SRE team. " * 12
    await ask(gw, system, "q0")
    await pc.drain()
    affine = engine.served[0]
    other = "replica-b" if affine == "replica-a" else "replica-a"
    engine.load[affine] = 5
    ctx = await ask(gw, system, "q1")
    assert engine.served[1] == other
    assert 'reason="load"' in gw.metrics.render().decode()
    assert ctx.response_headers == {}


async def test_prompt_cache_key_gives_affinity_without_shared_text(
    redis_client: aioredis.Redis, routing_config: RoutingConfig
) -> None:
    engine = ReplicatedFakeEngine()
    gw, pc = gateway(engine, routing_config, redis_client)
    await gw.probe_once()
    await ask(gw, "short", "a", prompt_cache_key="conversation-9")
    await pc.drain()
    first = engine.served[0]
    engine.load[first] = 1
    await ask(gw, "different", "b", prompt_cache_key="conversation-9")
    assert engine.served[1] == first


async def test_redis_down_routes_by_load_and_counts_the_error(routing_config: RoutingConfig) -> None:
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    engine = ReplicatedFakeEngine()
    gw, pc = gateway(engine, routing_config, dead)
    await gw.probe_once()
    await ask(gw, "You are helpful. " * 20, "q")
    await pc.drain()
    assert engine.served == ["replica-a"]
    # The lookup and the index update both failed; the request was served all the same.
    assert "oss_serving_prefix_index_errors_total 2.0" in gw.metrics.render().decode()
    await dead.aclose()


async def test_usage_cached_tokens_are_counted_from_streams(
    redis_client: aioredis.Redis, routing_config: RoutingConfig
) -> None:
    metrics = GatewayMetrics([MODEL], [0.1, 1])
    caching = PromptCaching(routing_config, ResponseCacheConfig(), metrics, redis_client)
    chunk = '{"choices":[],"usage":{"prompt_tokens":40,"prompt_tokens_details":{"cached_tokens":32}}}'
    caching.routing.observe_sse(MODEL, f"data: {chunk}\n\ndata: [DONE]\n\n")
    caching.routing.observe_answer(MODEL, {"usage": {"prompt_tokens": 10}})
    text = metrics.render().decode()
    assert 'oss_serving_prompt_cached_tokens_total{model="m"} 32.0' in text
    assert 'oss_serving_prompt_tokens_total{model="m"} 50.0' in text
