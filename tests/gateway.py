"""A gateway replica for tests, built by the same composition root as in production.

``TestGateway`` = :func:`serving.gateway.build.build_gateway` + the FastAPI app + an
in-process HTTP client and the real OpenAI SDK over it. ``ask`` drives the pipeline in
process, the way the API does (open a flight, run, read the stream to its end).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import openai

from serving.api.app import create_app
from serving.config import ServingConfig
from serving.engine.protocol import EngineClient
from serving.gateway.build import build_gateway
from serving.gateway.context import RequestContext
from serving.gateway.service import GatewayService
from serving.gateway.tenants import Tenant
from serving.metrics import GatewayMetrics
from serving.wire import Endpoint

__all__ = ["TestGateway", "ask", "config_for"]


def config_for(models: list[str], **sections: Any) -> ServingConfig:
    """A configuration serving ``models`` (fake sources) plus the given sections."""
    data: dict[str, Any] = {"models": [{"name": m, "source": "/x"} for m in models]}
    data.setdefault("auth", {"required": False})
    data.update(sections)
    return ServingConfig.model_validate(data)


class TestGateway:
    """One gateway replica over ``engines``, reached through HTTP in process."""

    __test__ = False  # not a test class

    def __init__(
        self,
        cfg: ServingConfig,
        engines: Mapping[str, EngineClient],
        redis: Any | None = None,
        *,
        upstream_clients: Mapping[str, EngineClient] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = cfg
        self.engines = dict(engines)
        self.service: GatewayService = build_gateway(
            cfg, engines, redis, environ or {}, upstream_clients=upstream_clients
        )
        self.metrics: GatewayMetrics = self.service.metrics
        self.app = create_app(self.service, cfg.gateway, self.metrics)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://gw")

    def sdk(self, key: str = "x") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url="http://gw/v1", api_key=key, http_client=self.http, max_retries=0)

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def close(self) -> None:
        await self.http.aclose()
        await self.service.stop()


async def ask(
    service: GatewayService,
    body: dict[str, Any],
    *,
    endpoint: Endpoint = Endpoint.chat,
    headers: Mapping[str, str] | None = None,
    tenant: Tenant | None = None,
    request_id: str = "r",
) -> tuple[RequestContext, int, Any]:
    """Run one request through the pipeline in process.

    Returns the context, the status, and the JSON body or the whole streamed text.
    """
    ctx = RequestContext(request_id, endpoint, body["model"], body, dict(headers or {}))
    if tenant is not None:
        ctx.tenant = tenant
    flight = service.open(request_id, endpoint)
    answer = await service.run(ctx, flight)
    if answer.stream is not None:
        try:
            text = "".join([part async for part in answer.stream])
        finally:
            await answer.stream.aclose()
        return ctx, flight.status, text
    assert answer.json is not None
    return ctx, answer.json.status, answer.json.body
