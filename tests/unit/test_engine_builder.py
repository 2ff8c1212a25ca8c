"""How a model configuration becomes Ray Serve LLM arguments, and stream batching."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from serving.config import ModelConfig
from serving.engine.builder import deployment_name, llm_config_kwargs
from serving.engine.server import first_fast_batches


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


async def test_first_chunk_is_not_held_back() -> None:
    gen = first_fast_batches(_source(1, 10.0), interval_ms=5_000)
    first = await asyncio.wait_for(gen.__anext__(), timeout=1.0)
    assert first == [0]
    await gen.aclose()


async def test_rest_is_batched_in_order() -> None:
    batches = [b async for b in first_fast_batches(_source(20, 0.0), interval_ms=50)]
    assert batches[0] == [0]
    assert [i for b in batches for i in b] == list(range(20))
    assert len(batches) < 20


async def test_empty_stream_yields_nothing() -> None:
    assert [b async for b in first_fast_batches(_source(0, 0.0), interval_ms=10)] == []
