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
        from serving.gateway.build import build_gateway
        from serving.redis_conn import redis_client

        cfg = parse_config(config)
        self._config = cfg
        engines = {m.name: RayEngineClient(engine_handles[_kwarg(m.name)]) for m in cfg.models}
        self._redis = redis_client(cfg)
        self._service = build_gateway(cfg, engines, self._redis)
        _configure_logging()

    async def __serve_build_asgi_app__(self) -> Any:
        from serving.api.app import create_app

        await self._service.start()
        metrics = self._service.metrics if self._config.metrics.enabled else None
        return create_app(self._service, self._config.gateway, metrics, echo_request_id=False)

    async def check_health(self) -> None:
        """The gateway itself is healthy while its event loop answers."""
        return

    async def __del__(self) -> None:
        """Graceful shutdown (Serve calls it once the replica drained): queued tickets are
        cancelled in Redis and what is still open is closed, so nothing waits for a TTL."""
        await self._service.stop()
        await self._redis.aclose()


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
