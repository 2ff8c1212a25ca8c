"""The prefix index: prompt rendering, chained block hashes, and the Redis index scripts.

Uses the unit tests' Redis (conftest: 6379 or a private one) under a key prefix of its own
(deleted afterwards).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from serving.config import RoutingConfig
from serving.engine.protocol import Endpoint
from serving.gateway.prefix import PrefixIndex, block_hashes, render_prompt

SYSTEM = "You are a careful assistant for the accounting team. " * 20


def chat(system: str, question: str) -> dict[str, object]:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}


@pytest.fixture
async def config(redis_client: aioredis.Redis) -> AsyncIterator[RoutingConfig]:
    prefix = f"test-prefix-{uuid.uuid4().hex[:8]}"
    yield RoutingConfig(key_prefix=prefix, block_chars=64, index_ttl_s=60, replica_capacity_blocks=1000)
    keys = [k async for k in redis_client.scan_iter(match="{" + prefix + "*")]
    if keys:
        await redis_client.delete(*keys)


def test_render_is_prefix_monotonic_across_questions() -> None:
    a = render_prompt(Endpoint.chat, chat(SYSTEM, "What is VAT?"))
    b = render_prompt(Endpoint.chat, chat(SYSTEM, "How do I file expenses?"))
    common = len(SYSTEM)
    assert a[:common] == b[:common]
    assert a != b


def test_render_puts_tools_and_reasoning_effort_first() -> None:
    plain = render_prompt(Endpoint.chat, chat(SYSTEM, "q"))
    with_effort = render_prompt(Endpoint.chat, {**chat(SYSTEM, "q"), "reasoning_effort": "high"})
    assert with_effort.endswith(plain)
    assert not with_effort.startswith(plain[:20])


def test_render_completions_and_responses() -> None:
    assert render_prompt(Endpoint.completions, {"prompt": "abc"}) == "abc"
    text = render_prompt(Endpoint.responses, {"instructions": "be brief", "input": "hello"})
    assert "be brief" in text
    assert text.endswith("hello")


def test_block_hashes_are_chained_and_only_full_blocks() -> None:
    a = block_hashes("x" * 64 + "y" * 64 + "z" * 10, 64, 100)
    b = block_hashes("w" * 64 + "y" * 64, 64, 100)
    assert len(a) == 2  # the trailing 10 characters are no full block
    assert a[1] != b[1]  # same second block, different first: different chain hash
    assert block_hashes("x" * 64 + "y" * 64, 64, 100) == a
    assert len(block_hashes("x" * 6400, 64, 5)) == 5


async def test_lookup_finds_longest_prefix_per_replica(
    redis_client: aioredis.Redis, config: RoutingConfig
) -> None:
    index = PrefixIndex(redis_client, config)
    long_prompt = render_prompt(Endpoint.chat, chat(SYSTEM, "What is VAT? " * 10))
    hashes = block_hashes(long_prompt, config.block_chars, config.max_blocks)
    assert len(hashes) > 10
    await index.record("m", "replica-a", hashes, None)
    await index.record("m", "replica-b", hashes[:3], None)
    other = render_prompt(Endpoint.chat, chat(SYSTEM, "Where is the office? " * 10))
    found = await index.lookup("m", block_hashes(other, config.block_chars, config.max_blocks), None)
    shared = len(SYSTEM) // config.block_chars  # blocks entirely inside the system prompt
    assert found.matched["replica-a"] >= shared - 1
    assert found.matched["replica-b"] == 3
    assert found.key_replica is None
    # Another model's index is separate.
    assert (await index.lookup("other-model", hashes, None)).matched == {}


async def test_unrelated_prompt_matches_nothing(redis_client: aioredis.Redis, config: RoutingConfig) -> None:
    index = PrefixIndex(redis_client, config)
    await index.record("m", "replica-a", block_hashes("a" * 640, 64, 100), None)
    found = await index.lookup("m", block_hashes("b" * 640, 64, 100), None)
    assert found.matched == {}
    assert found.best_blocks == 0


async def test_affinity_key_maps_to_last_replica(redis_client: aioredis.Redis, config: RoutingConfig) -> None:
    index = PrefixIndex(redis_client, config)
    await index.record("m", "replica-a", [], "k:conversation-1")
    await index.record("m", "replica-b", [], "k:conversation-1")
    found = await index.lookup("m", [], "k:conversation-1")
    assert found.key_replica == "replica-b"
    assert (await index.lookup("m", [], "k:conversation-2")).key_replica is None


async def test_entries_older_than_ttl_do_not_match(
    redis_client: aioredis.Redis, config: RoutingConfig
) -> None:
    index = PrefixIndex(redis_client, config)
    hashes = block_hashes("a" * 640, 64, 100)
    await index.record("m", "replica-a", hashes, None, now=1000.0)
    assert (await index.lookup("m", hashes, None, now=1000.0 + 30)).matched == {"replica-a": 10}
    assert (await index.lookup("m", hashes, None, now=1000.0 + 61)).matched == {}


async def test_replica_lru_bound_evicts_least_recent_blocks(redis_client: aioredis.Redis) -> None:
    prefix = f"test-prefix-{uuid.uuid4().hex[:8]}"
    config = RoutingConfig(key_prefix=prefix, block_chars=64, replica_capacity_blocks=10)
    index = PrefixIndex(redis_client, config)
    try:
        old = block_hashes("a" * 640, 64, 100)
        new = block_hashes("b" * 640, 64, 100)
        await index.record("m", "replica-a", old, None, now=100.0)
        evicted = await index.record("m", "replica-a", new, None, now=200.0)
        assert evicted == 10
        assert (await index.lookup("m", new, None, now=201.0)).matched == {"replica-a": 10}
        assert (await index.lookup("m", old, None, now=201.0)).matched == {}
        assert await redis_client.zcard("{" + prefix + ":m}:r:replica-a") == 10
    finally:
        keys = [k async for k in redis_client.scan_iter(match="{" + prefix + "*")]
        if keys:
            await redis_client.delete(*keys)
