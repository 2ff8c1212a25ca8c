"""How a model configuration becomes Ray Serve LLM arguments, and stream batching."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from serving.config import ModelConfig
from serving.engine.builder import deployment_name, llm_config_kwargs
from serving.engine.server import StreamPacer, paced_batches


def test_cpu_model_kwargs() -> None:
    model = ModelConfig(
        name="smollm2-135m-instruct",
        source="builtin:smollm2-135m-instruct",
        engine_kwargs={"max_model_len": 2048},
        engine_env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    kw = llm_config_kwargs(model, "/models/smol", {"A": "b"})
    assert kw["model_loading_config"] == {"model_id": "smollm2-135m-instruct", "model_source": "/models/smol"}
    assert kw["engine_kwargs"]["max_model_len"] == 2048
    assert kw["runtime_env"]["env_vars"] == {"HF_HUB_OFFLINE": "1", "A": "b", "VLLM_CPU_KVCACHE_SPACE": "1"}
    assert kw["placement_group_config"] == {"bundles": [{"CPU": 1.0}]}
    assert kw["deployment_config"]["autoscaling_config"]["min_replicas"] == 1


def test_gpu_tensor_parallel_bundles_and_autoscaling() -> None:
    model = ModelConfig.model_validate(
        {
            "name": "gpt-oss-120b",
            "source": "openai/gpt-oss-120b",
            "topology": {
                "accelerator": "gpu",
                "tensor_parallel_size": 2,
                "min_replicas": 2,
                "max_replicas": 8,
            },
        }
    )
    kw = llm_config_kwargs(model, "openai/gpt-oss-120b", {})
    assert kw["placement_group_config"] == {"bundles": [{"GPU": 1.0}, {"GPU": 1.0}]}
    assert kw["engine_kwargs"]["tensor_parallel_size"] == 2
    assert kw["engine_kwargs"]["reasoning_parser"] == "openai_gptoss"
    auto = kw["deployment_config"]["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (2, 8)
    assert "ray_actor_options" not in kw["deployment_config"]
    assert "HF_HUB_OFFLINE" not in kw["runtime_env"]["env_vars"]  # a hub id may download
    assert auto["downscale_delay_s"] == 600.0


def test_deployment_name_is_serve_safe() -> None:
    assert deployment_name(ModelConfig(name="org/m.1", source="/x")) == "engine-org--m_1"


async def _source(n: int, delay_s: float) -> AsyncIterator[int]:
    for i in range(n):
        yield i
        await asyncio.sleep(delay_s)


def _pacer(min_ms: float = 50, max_ms: float = 200, items_per_s: float = 100) -> StreamPacer:
    return StreamPacer(min_ms, max_ms, items_per_s)


async def test_first_chunk_is_not_held_back() -> None:
    gen = paced_batches(_source(1, 10.0), _pacer(min_ms=5_000, max_ms=5_000))
    first = await asyncio.wait_for(gen.__anext__(), timeout=1.0)
    assert first == [0]
    await gen.aclose()


async def test_items_of_one_engine_step_go_out_together_at_once() -> None:
    async def step() -> AsyncIterator[str]:
        yield "role"
        yield "first token"  # vLLM yields both from one engine output, back to back
        await asyncio.sleep(10.0)
        yield "later"

    gen = paced_batches(step(), _pacer(min_ms=5_000, max_ms=5_000))
    assert await asyncio.wait_for(gen.__anext__(), timeout=1.0) == ["role", "first token"]
    await gen.aclose()


async def test_rest_is_batched_in_order() -> None:
    pacer = _pacer(min_ms=50)
    batches = [b async for b in paced_batches(_source(20, 0.005), pacer)]
    assert [i for b in batches for i in b] == list(range(20))
    assert 2 <= len(batches) < 10  # ~100 ms of items in batches of 50 ms
    assert pacer.active == 0


async def test_a_chunk_after_a_pause_is_sent_at_once() -> None:
    async def paused() -> AsyncIterator[int]:
        yield 0
        await asyncio.sleep(0.3)
        yield 1

    loop = asyncio.get_running_loop()
    started = loop.time()
    gen = paced_batches(paused(), _pacer(min_ms=100, max_ms=100))
    assert await gen.__anext__() == [0]
    assert await gen.__anext__() == [1]
    # Sent when it came (0.3 s), not held for another interval.
    assert loop.time() - started < 0.38
    await gen.aclose()


def test_interval_grows_with_streams_within_bounds() -> None:
    pacer = _pacer(min_ms=20, max_ms=200, items_per_s=100)
    pacer.active = 1
    assert pacer.interval_s() == 0.02
    pacer.active = 8
    assert abs(pacer.interval_s() - 0.08) < 1e-9
    pacer.active = 100
    assert pacer.interval_s() == 0.2


async def test_an_error_comes_after_the_items_before_it() -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        await asyncio.sleep(0.01)
        raise RuntimeError("engine died")

    seen: list[int] = []
    pacer = _pacer(min_ms=10)

    async def consume() -> None:
        async for batch in paced_batches(failing(), pacer):
            seen.extend(batch)

    with pytest.raises(RuntimeError, match="engine died"):
        await consume()
    assert seen == [1]
    assert pacer.active == 0


async def test_empty_stream_yields_nothing() -> None:
    assert [b async for b in paced_batches(_source(0, 0.0), _pacer())] == []
