"""The response cache through the gateway's request path (fake engine, real Redis under its own prefix)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from serving.config import ResponseCacheConfig
from serving.engine.protocol import Endpoint
from serving.gateway.build import build_gateway
from serving.gateway.context import RequestContext
from serving.gateway.response_cache import cache_key, is_deterministic, sse_from_json
from serving.gateway.tenants import Tenant
from serving.wire import CACHE_HEADER
from tests.fakes import FakeEngine
from tests.gateway import ask, config_for

MODEL = "m"
ON = {"x-oss-response-cache": "on"}
BODY: dict[str, Any] = {"model": MODEL, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("endpoint", "body", "expected"),
    [
        (Endpoint.chat, {"temperature": 0}, True),
        (Endpoint.chat, {"temperature": 0.7, "seed": 4}, True),
        (Endpoint.chat, {"temperature": 0.7}, False),
        (Endpoint.chat, {}, False),
        (Endpoint.chat, {"temperature": 0.7, "seed": True}, False),
        (Endpoint.chat, {"temperature": 0, "tools": [{"type": "function", "function": {"name": "f"}}]}, True),
        (Endpoint.responses, {"temperature": 0, "store": False}, True),
        (Endpoint.responses, {"temperature": 0}, False),
        (Endpoint.responses, {"temperature": 0, "store": False, "tools": [{"type": "web_search"}]}, False),
        (Endpoint.responses, {"temperature": 0, "store": False, "previous_response_id": "r1"}, False),
    ],
    ids=[
        "temp0",
        "seed",
        "temp-no-seed",
        "default-temp",
        "bool-seed",
        "function-tool",
        "responses-no-store",
        "responses-stored",
        "web-search",
        "stateful",
    ],
)
def test_deterministic_requests_only(endpoint: Endpoint, body: dict[str, Any], expected: bool) -> None:
    assert is_deterministic(endpoint, body) is expected


def test_key_changes_with_any_field_but_not_stream() -> None:
    key = cache_key("t", Endpoint.chat, BODY)
    assert (
        cache_key("t", Endpoint.chat, {**BODY, "stream": True, "stream_options": {"include_usage": True}})
        == key
    )
    assert cache_key("t", Endpoint.chat, {**BODY, "max_tokens": 5}) != key
    assert cache_key("t", Endpoint.chat, {**BODY, "messages": [{"role": "user", "content": "hi!"}]}) != key
    assert cache_key("other-tenant", Endpoint.chat, BODY) != key
    assert cache_key("t", Endpoint.completions, BODY) != key
    assert cache_key("t", Endpoint.chat, dict(reversed(list(BODY.items())))) == key


def test_stream_synthesized_from_json_answer() -> None:
    answer = {
        "id": "c1",
        "created": 1,
        "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    text = sse_from_json(Endpoint.chat, answer, {"stream_options": {"include_usage": True}})
    assert text is not None
    events = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"]["content"] == "Paris."
    assert events[1]["choices"][0]["finish_reason"] == "stop"
    assert events[2]["usage"]["total_tokens"] == 5
    assert text.endswith("data: [DONE]\n\n")


class Gateway:
    def __init__(self, redis: Any, cfg: ResponseCacheConfig) -> None:
        self.engine = FakeEngine()
        config = config_for(
            [MODEL], routing={"enabled": False}, response_cache=cfg.model_dump(), queue={"enabled": False}
        )
        self.service = build_gateway(config, {MODEL: self.engine}, redis, {})
        self.metrics = self.service.metrics
        self.caching = self.service._prompt_caching

    async def ask(
        self, body: dict[str, Any], headers: dict[str, str] | None = None, tenant: Tenant | None = None
    ) -> tuple[RequestContext, Any]:
        ctx, _status, out = await ask(
            self.service,
            body,
            headers=ON if headers is None else headers,
            tenant=tenant or Tenant(id="team-a", response_cache=True),
        )
        await self.caching.drain()
        return ctx, out


@pytest.fixture
async def gw(redis_client: aioredis.Redis) -> AsyncIterator[Gateway]:
    prefix = f"test-rc-{uuid.uuid4().hex[:8]}"
    g = Gateway(redis_client, ResponseCacheConfig(enabled=True, key_prefix=prefix))
    await g.service.probe_once()
    yield g
    keys = [k async for k in redis_client.scan_iter(match="{" + prefix + "}*")]
    if keys:
        await redis_client.delete(*keys)


async def test_identical_deterministic_request_hits(gw: Gateway) -> None:
    ctx1, first = await gw.ask(BODY)
    ctx2, second = await gw.ask(dict(BODY))
    assert ctx1.response_headers[CACHE_HEADER] == "miss"
    assert ctx2.response_headers[CACHE_HEADER] == "hit"
    assert second == first
    assert len(gw.engine.calls) == 1
    text = gw.metrics.render().decode()
    assert 'oss_serving_response_cache_lookups_total{model="m",result="hit"} 1.0' in text
    assert 'oss_serving_response_cache_hits_total{model="m"} 1.0' in text
    assert "oss_serving_response_cache_bytes " in text
    assert "oss_serving_response_cache_bytes 0.0" not in text


async def test_any_changed_field_misses(gw: Gateway) -> None:
    await gw.ask(BODY)
    for change in ({"max_tokens": 7}, {"seed": 1}, {"messages": [{"role": "user", "content": "hello"}]}):
        ctx, _ = await gw.ask({**BODY, **change})
        assert ctx.response_headers[CACHE_HEADER] == "miss", change
    assert len(gw.engine.calls) == 4


async def test_never_for_temperature_above_zero_without_seed(gw: Gateway) -> None:
    body = {**BODY, "temperature": 0.8}
    for _ in range(2):
        ctx, _ = await gw.ask(body)
        assert ctx.response_headers[CACHE_HEADER] == "skip"
    assert len(gw.engine.calls) == 2
    # With a seed it is deterministic: cached.
    await gw.ask({**body, "seed": 11})
    ctx, _ = await gw.ask({**body, "seed": 11})
    assert ctx.response_headers[CACHE_HEADER] == "hit"


async def test_opt_in_per_tenant_and_per_request(gw: Gateway) -> None:
    await gw.ask(BODY)
    ctx, _ = await gw.ask(BODY, headers={})  # the request does not ask
    assert CACHE_HEADER not in ctx.response_headers
    ctx, _ = await gw.ask(BODY, tenant=Tenant(id="team-a"))  # the tenant did not opt in
    assert CACHE_HEADER not in ctx.response_headers
    assert len(gw.engine.calls) == 3


async def test_streaming_replay_matches_the_original_stream(gw: Gateway) -> None:
    body = {**BODY, "stream": True}
    ctx1, original = await gw.ask(body)
    ctx2, replay = await gw.ask(dict(body))
    assert ctx1.response_headers[CACHE_HEADER] == "miss"
    assert ctx2.response_headers[CACHE_HEADER] == "hit"
    assert replay == original
    assert original.endswith("data: [DONE]\n\n")
    assert len(gw.engine.calls) == 1


async def test_streaming_request_replays_a_json_answer(gw: Gateway) -> None:
    _, answer = await gw.ask(BODY)
    ctx, text = await gw.ask({**BODY, "stream": True})
    assert ctx.response_headers[CACHE_HEADER] == "hit"
    content = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        for line in text.split("\n")
        if line.startswith("data: {")
    )
    assert content == answer["choices"][0]["message"]["content"]
    assert len(gw.engine.calls) == 1


async def test_memory_bound_evicts_oldest(redis_client: aioredis.Redis) -> None:
    prefix = f"test-rc-{uuid.uuid4().hex[:8]}"
    g = Gateway(redis_client, ResponseCacheConfig(enabled=True, key_prefix=prefix, max_total_bytes=1024))
    await g.service.probe_once()
    try:
        for i in range(6):  # each answer is about 300 bytes: at most 3 fit
            await g.ask({**BODY, "max_tokens": 10 + i})
        total = int(await redis_client.get("{" + prefix + "}:bytes") or 0)
        assert 0 < total <= 1024
        assert await redis_client.zcard("{" + prefix + "}:lru") < 6
        ctx, _ = await g.ask({**BODY, "max_tokens": 10})  # the oldest was evicted
        assert ctx.response_headers[CACHE_HEADER] == "miss"
        ctx, _ = await g.ask({**BODY, "max_tokens": 15})  # the newest is still there
        assert ctx.response_headers[CACHE_HEADER] == "hit"
    finally:
        keys = [k async for k in redis_client.scan_iter(match="{" + prefix + "}*")]
        if keys:
            await redis_client.delete(*keys)
