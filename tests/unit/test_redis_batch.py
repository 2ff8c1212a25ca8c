"""The admission scripts' auto-pipeline, against the real Redis."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from serving.gateway.redis_batch import ScriptPipeline


def _scripts() -> dict[str, str]:
    # A comment unique to the test: the scripts are not loaded in Redis yet (NOSCRIPT path).
    tag = uuid.uuid4().hex
    return {
        "incr": f"-- {tag}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])",
        "fail": f"-- {tag}\nreturn redis.error_reply('bad input ' .. ARGV[1])",
    }


async def test_calls_of_one_loop_turn_share_one_round_trip(redis_client: aioredis.Redis) -> None:
    key = f"test:batch:{uuid.uuid4().hex}"
    pipeline = ScriptPipeline(redis_client, _scripts())
    try:
        replies = await asyncio.gather(*(pipeline.call("incr", [key], [i]) for i in range(1, 51)))
        # Each caller gets its own reply, in the order Redis ran them.
        assert sorted(replies) == sorted(sum(range(1, i + 1)) for i in range(1, 51))
        assert int(await redis_client.get(key) or 0) == sum(range(1, 51))
        assert pipeline.batches == 1
        # Calls made one after the other are not held back waiting for company.
        assert await pipeline.call("incr", [key], [1]) == sum(range(1, 51)) + 1
        assert pipeline.batches == 2
    finally:
        await redis_client.delete(key)


async def test_an_error_reaches_only_its_own_caller(redis_client: aioredis.Redis) -> None:
    key = f"test:batch:{uuid.uuid4().hex}"
    pipeline = ScriptPipeline(redis_client, _scripts())
    try:
        good, bad = await asyncio.gather(
            pipeline.call("incr", [key], [2]), pipeline.call("fail", [key], ["x"]), return_exceptions=True
        )
        assert good == 2
        assert isinstance(bad, ResponseError)
        assert "bad input x" in str(bad)
    finally:
        await redis_client.delete(key)


async def test_scripts_are_loaded_again_after_redis_forgot_them(redis_client: aioredis.Redis) -> None:
    key = f"test:batch:{uuid.uuid4().hex}"
    scripts = _scripts()
    pipeline = ScriptPipeline(redis_client, scripts)
    try:
        # Never loaded: Redis answers NOSCRIPT, the pipeline loads them and re-sends.
        assert await pipeline.call("incr", [key], [5]) == 5
        assert await redis_client.script_exists(*[pipeline._sha[name] for name in scripts]) == [True, True]
    finally:
        await redis_client.delete(key)


async def test_a_connection_error_fails_every_call_of_the_batch() -> None:
    client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    pipeline = ScriptPipeline(client, _scripts())
    try:
        results = await asyncio.gather(
            *(pipeline.call("incr", ["k"], [1]) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, (RedisError, OSError)) for r in results), results
        await pipeline.drain()
    finally:
        await client.aclose()


@pytest.mark.parametrize("callers", [1, 8])
async def test_a_cancelled_caller_does_not_break_the_others(
    redis_client: aioredis.Redis, callers: int
) -> None:
    key = f"test:batch:{uuid.uuid4().hex}"
    pipeline = ScriptPipeline(redis_client, _scripts())
    try:
        doomed = asyncio.ensure_future(pipeline.call("incr", [key], [100]))
        others = [asyncio.ensure_future(pipeline.call("incr", [key], [1])) for _ in range(callers)]
        await asyncio.sleep(0)
        doomed.cancel()
        # The others get their replies; the script of the cancelled call ran all the same.
        assert sorted(await asyncio.gather(*others))[-1] == callers + 100
        await pipeline.drain()
        with pytest.raises(asyncio.CancelledError):
            await doomed
    finally:
        await redis_client.delete(key)
