"""The Ray Serve application: the gateway ingress bound to one engine deployment per model.

``build_app`` is an application builder, usable from Python (``oss-serve up``) and from a
Serve config file or a KubeRay RayService ``serveConfigV2``::

    applications:
      - name: oss-serving
        route_prefix: /
        import_path: serving.serve_app:build_app
        args:
          config_path: /etc/oss-serving/config.yaml
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray import serve

from serving.config import ServingConfig, load_config, parse_config

__all__ = ["APP_NAME", "GATEWAY_DEPLOYMENT", "Gateway", "build_app", "build_serve_app"]

APP_NAME = "oss-serving"
GATEWAY_DEPLOYMENT = "gateway"


@serve.ingress()
class Gateway:
    """One gateway replica: the OpenAI API over the engine deployments' handles."""

    def __init__(self, config: dict[str, Any], **engine_handles: Any) -> None:
        from serving.engine.ray_client import RayEngineClient
        from serving.gateway.handoff import build_handoff
        from serving.gateway.prefix_caching import PromptCaching
        from serving.gateway.service import GatewayService
        from serving.metrics import GatewayMetrics

        cfg = parse_config(config)
        self._config = cfg
        self._metrics = GatewayMetrics([m.name for m in cfg.models], cfg.metrics.ttft_buckets_s)
        handles = {m.name: engine_handles[_kwarg(m.name)] for m in cfg.models}
        self._redis = _redis_client(cfg)
        self._service = GatewayService(
            cfg.gateway,
            {name: RayEngineClient(handle) for name, handle in handles.items()},
            self._metrics,
            redis_ping=self._ping_redis,
            **policy_components(cfg, self._redis),
            prompt_caching=PromptCaching(cfg.routing, cfg.response_cache, self._metrics, self._redis),
            scale_from_zero=frozenset(m.name for m in cfg.models if m.topology.min_replicas == 0),
            handoff=build_handoff(
                cfg,
                self._redis,
                self._metrics.handoff,
                is_ready=lambda model: self._service.is_ready(model),
                predicted_wait=self._predicted_wait,
                tenant_label=lambda tenant: self._service.tenant_label(tenant),
            ),
        )
        _configure_logging()

    async def _predicted_wait(self, model: str, priority: Any) -> float:
        """The admission queue's predicted wait, for the handoff overflow policy."""
        admission = self._service.admission
        return 0.0 if admission is None else await admission.predicted_wait_s(model, priority)

    async def _ping_redis(self) -> bool:
        assert self._redis is not None
        return bool(await self._redis.ping())

    async def __serve_build_asgi_app__(self) -> Any:
        from serving.api.app import create_app

        await self._service.start()
        metrics = self._metrics if self._config.metrics.enabled else None
        return create_app(self._service, self._config.gateway, metrics, echo_request_id=False)

    async def check_health(self) -> None:
        """The gateway itself is healthy while its event loop answers."""
        return


REDIS_PASSWORD_ENV = "OSS_SERVING_REDIS_PASSWORD"
TENANTS_FILE_ENV = "OSS_SERVING_TENANTS_FILE"


def policy_components(cfg: ServingConfig, redis: Any) -> dict[str, Any]:
    """Authentication, rate limits and admission of one gateway replica, over ``redis``."""
    import os

    from serving.gateway.admission import Admission
    from serving.gateway.auth import TenantDirectory, TenantStore
    from serving.gateway.ratelimit import RateLimiter

    prefix = cfg.queue.key_prefix
    env_file = os.environ.get(TENANTS_FILE_ENV)
    tenants_file = cfg.auth.tenants_file or (Path(env_file) if env_file else None)
    models = [m.name for m in cfg.models]
    return {
        "auth": TenantDirectory(TenantStore(redis, prefix), cfg.auth, cfg.tenants, tenants_file=tenants_file),
        "limiter": RateLimiter(redis, prefix),
        "admission": Admission(redis, cfg.queue, models, local_share=cfg.gateway.num_replicas)
        if cfg.queue.enabled
        else None,
        "queue": cfg.queue,
    }


def _redis_client(cfg: ServingConfig) -> Any:
    """Async Redis client; the password comes from a Secret-backed variable, never the URL."""
    import os

    import redis.asyncio as aioredis

    extra: dict[str, Any] = {}
    password = os.environ.get(REDIS_PASSWORD_ENV)
    if password:
        extra["password"] = password
    return aioredis.Redis.from_url(
        cfg.redis.url,
        socket_connect_timeout=cfg.redis.connect_timeout_s,
        socket_timeout=cfg.redis.connect_timeout_s,
        **extra,
    )


def _configure_logging() -> None:
    """Our log lines carry the request id: ``... [req-id] message``.

    They go to the process's real stderr (``sys.__stderr__``), which Ray keeps in the
    worker's log file and forwards to the driver (``oss-serve up``'s log). Serve's
    throughput-optimized mode replaces ``sys.stderr`` in replicas with a logger whose
    records are buffered (1,000 at a time) into the replica's Serve log: written there, a
    request's line could appear minutes later, or be lost with the process.
    """
    import sys

    from serving.api.middleware import RequestIdLogFilter

    logger = logging.getLogger("oss_serving")
    if any(getattr(h, "oss_serving", False) for h in logger.handlers):
        return
    handler: logging.Handler = logging.StreamHandler(sys.__stderr__ or sys.stderr)
    handler.addFilter(RequestIdLogFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    handler.oss_serving = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _kwarg(model_name: str) -> str:
    return "engine_" + "".join(c if c.isalnum() else "_" for c in model_name)


def build_serve_app(cfg: ServingConfig) -> Any:
    """Bind the gateway and every model's engine deployment into one application."""
    from serving.engine.budget import check_config
    from serving.engine.builder import build_engine_deployment

    check_config(cfg)  # a layout that cannot fit fails here, before any GPU is claimed
    engines = {
        _kwarg(m.name): build_engine_deployment(m, cfg.local.cache_dir, cfg.routing) for m in cfg.models
    }
    gateway = serve.deployment(
        Gateway,
        name=GATEWAY_DEPLOYMENT,
        num_replicas=cfg.gateway.num_replicas,
        max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0.5},
    )
    return gateway.bind(cfg.model_dump(mode="json"), **engines)


def build_app(args: dict[str, Any]) -> Any:
    """Serve application builder: ``args`` has ``config_path`` (a YAML file) or ``config``."""
    if "config" in args:
        cfg = parse_config(args["config"], origin="args.config")
    else:
        path = args.get("config_path")
        cfg = load_config(Path(path) if path else None)
    return build_serve_app(cfg)
