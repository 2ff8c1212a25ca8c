"""Turn a :class:`~serving.config.ModelConfig` into a Ray Serve LLM deployment.

``replicas`` topology: ``build_llm_deployment`` with :class:`OssLLMServer`, one vLLM
engine per replica over ``tensor_parallel_size`` devices, autoscaled by Ray Serve.
``expert_parallel`` topology: ``build_dp_deployment`` with :class:`OssDPServer`, one
data-parallel rank per replica, gang-scheduled by Ray Serve LLM.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.config import ModelConfig, RoutingConfig
from serving.engine.builtin_models import ensure_builtin_model

__all__ = ["ENGINE_DEPLOYMENT_PREFIX", "build_engine_deployment", "deployment_name", "llm_config_kwargs"]

ENGINE_DEPLOYMENT_PREFIX = "engine-"


PROBE_HEADROOM = 4
"""Calls an engine replica takes beyond ``topology.max_ongoing_requests``: room for probes."""


def deployment_name(model: ModelConfig) -> str:
    """Ray Serve deployment name of a model's engines."""
    return ENGINE_DEPLOYMENT_PREFIX + model.name.replace("/", "--").replace(".", "_")


def resolve_source(
    model: ModelConfig, cache_dir: Path, progress: Callable[[str, float], None] | None = None
) -> tuple[str, dict[str, str]]:
    """Model source for vLLM and the environment it needs (built-ins are built once)."""
    if model.source.startswith("builtin:"):
        built = ensure_builtin_model(model.source.removeprefix("builtin:"), cache_dir, progress)
        return str(built.path), built.engine_env
    return model.source, {}


def llm_config_kwargs(
    model: ModelConfig, source: str, extra_env: dict[str, str], routing: RoutingConfig | None = None
) -> dict[str, Any]:
    """Keyword arguments of ``ray.serve.llm.LLMConfig`` for ``model`` (pure, testable)."""
    topo = model.topology
    device = "GPU" if topo.accelerator == "gpu" else "CPU"
    bundle: dict[str, float] = {device: 1.0} if device == "GPU" else {"CPU": topo.cpus_per_worker}
    local = model.source.startswith("builtin:") or Path(source).is_dir()
    # Local weights must never be looked up on a hub; a hub id on a cluster without the
    # weight cache must be allowed to download.
    env = {**({"HF_HUB_OFFLINE": "1"} if local else {}), **extra_env, **model.engine_env}
    deployment: dict[str, Any] = {
        # Headroom above the requests' limit: the gateway's health probes (and its probes
        # of a quarantined replica) never wait behind a full replica.
        "max_ongoing_requests": topo.max_ongoing_requests + PROBE_HEADROOM,
        "autoscaling_config": {
            "min_replicas": topo.min_replicas,
            "max_replicas": topo.max_replicas,
            "initial_replicas": max(topo.min_replicas, 1),
            "target_ongoing_requests": topo.target_ongoing_requests,
            "upscale_delay_s": topo.upscale_delay_s,
            "downscale_delay_s": topo.downscale_delay_s,
        },
    }
    if topo.kind == "replicas" and topo.max_replicas > 1:
        # Our router (serving.engine.router): prefix affinity balanced with load when routing
        # is on, and always the failover hints (a quarantined replica is avoided). Without
        # hints it is Ray's default. One replica needs no router.
        from serving.engine.router import ROUTER_CLASS

        rules = routing or RoutingConfig()
        deployment["request_router_config"] = {
            "request_router_class": ROUTER_CLASS,
            "request_router_kwargs": {
                "imbalance_threshold": rules.imbalance_threshold,
                "min_match_blocks": rules.min_match_blocks,
            },
        }
    if device == "CPU":
        # The replica actor itself needs no core of its own: its engine worker has one.
        deployment["ray_actor_options"] = {"num_cpus": 0}
    return {
        "model_loading_config": {"model_id": model.name, "model_source": source},
        "engine_kwargs": model.effective_engine_kwargs(),
        "runtime_env": {"env_vars": env},
        "placement_group_config": {"bundles": [dict(bundle) for _ in range(topo.tensor_parallel_size)]},
        "deployment_config": deployment,
        # Read by OssLLMServer's StreamPacer (``stream_batching_interval_ms`` is also Ray's name).
        "experimental_configs": {
            "stream_batching_interval_ms": model.streaming.min_interval_ms,
            "stream_max_interval_ms": model.streaming.max_interval_ms,
            "stream_items_per_s": model.streaming.items_per_s,
        },
        "log_engine_metrics": True,
    }


def build_engine_deployment(model: ModelConfig, cache_dir: Path, routing: RoutingConfig | None = None) -> Any:
    """The bound Ray Serve application of ``model``'s engines."""
    from ray.serve.llm import LLMConfig, build_dp_deployment, build_llm_deployment

    from serving.engine.server import OssDPServer, OssLLMServer

    source, env = resolve_source(model, cache_dir)
    llm_config = LLMConfig(**llm_config_kwargs(model, source, env, routing))
    override = {"name": deployment_name(model)}
    if model.topology.kind == "expert_parallel":
        return build_dp_deployment(llm_config, override_serve_options=override, deployment_cls=OssDPServer)
    return build_llm_deployment(llm_config, override_serve_options=override, deployment_cls=OssLLMServer)
