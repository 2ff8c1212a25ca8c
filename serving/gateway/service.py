"""The gateway's policy: which engine answers, whether it is ready, what is measured.

Plain Python with async interfaces; no HTTP and no Ray here, so it is tested with a
fake :class:`~serving.engine.protocol.EngineClient`. The API layer validates the
request's shape, then calls :meth:`GatewayService.run`. Admission, routing, caching and
handoff plug in here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from serving.config import GatewayConfig
from serving.engine.protocol import EngineClient, EngineJSON, EngineSSE
from serving.gateway.context import RequestContext
from serving.gateway.errors import (
    EngineFailedError,
    EngineNotReadyError,
    GatewayTimeoutError,
    ModelNotFoundError,
)
from serving.metrics import GatewayMetrics

__all__ = ["GatewayService", "ModelHealth"]

log = logging.getLogger("oss_serving.gateway")

RedisPing = Callable[[], Awaitable[bool]]


@dataclass
class ModelHealth:
    """Readiness of one model's engines, as last probed."""

    ready: bool = False
    last_error: str | None = "not probed yet"
    last_probe: float | None = None
    ready_since: float | None = None
    unfinished_requests: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "last_error": self.last_error,
            "last_probe_unix": self.last_probe,
            "ready_since_unix": self.ready_since,
            "engine_unfinished_requests": self.unfinished_requests,
        }


@dataclass
class _Flight:
    model: str
    endpoint: str
    started: float
    status: int = 200
    first_chunk: float | None = None
    labels: dict[str, str] = field(default_factory=dict)


class GatewayService:
    """Serves validated OpenAI requests through the engines of the configured models."""

    def __init__(
        self,
        config: GatewayConfig,
        engines: Mapping[str, EngineClient],
        metrics: GatewayMetrics,
        *,
        redis_ping: RedisPing | None = None,
        created_unix: int | None = None,
    ) -> None:
        self._config = config
        self._engines = dict(engines)
        self._metrics = metrics
        self._redis_ping = redis_ping
        self._redis_ok: bool | None = None
        self._health = {name: ModelHealth() for name in self._engines}
        self._created = created_unix if created_unix is not None else int(time.time())
        self._probe_task: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start probing engine health in the background."""
        if self._probe_task is None:
            self._probe_task = asyncio.create_task(self._probe_forever(), name="oss-serving-health")

    async def stop(self) -> None:
        task, self._probe_task = self._probe_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _probe_forever(self) -> None:
        while True:
            await self.probe_once()
            await asyncio.sleep(self._config.health_check_interval_s)

    async def probe_once(self) -> None:
        """Probe every engine deployment (and Redis) once, concurrently."""
        await asyncio.gather(*(self._probe(name) for name in self._engines), self._probe_redis())

    async def _probe(self, name: str) -> None:
        health = self._health[name]
        engine = self._engines[name]
        now = time.time()
        try:
            await engine.check_health(self._config.health_check_timeout_s)
            stats = await engine.stats(self._config.health_check_timeout_s)
        except Exception as exc:  # any failure means "not ready"; the reason is kept
            if health.ready:
                log.warning("model %s became unready: %s", name, exc)
            health.ready = False
            health.ready_since = None
            health.last_error = _short(exc) or type(exc).__name__
        else:
            if not health.ready:
                log.info("model %s is ready", name)
                health.ready_since = now
            health.ready = True
            health.last_error = None
            health.unfinished_requests = stats.unfinished_requests
        health.last_probe = now
        self._metrics.model_ready.labels(model=name).set(1 if health.ready else 0)

    async def _probe_redis(self) -> None:
        if self._redis_ping is None:
            return
        try:
            self._redis_ok = await self._redis_ping()
        except Exception:
            self._redis_ok = False
        self._metrics.redis_up.set(1 if self._redis_ok else 0)

    # ----------------------------------------------------------------- queries
    def model_ids(self) -> list[str]:
        return list(self._engines)

    def model_card(self, name: str) -> dict[str, Any]:
        if name not in self._engines:
            raise ModelNotFoundError(name)
        return {"id": name, "object": "model", "created": self._created, "owned_by": "oss-serving"}

    def health(self) -> dict[str, Any]:
        """Liveness, readiness per model, and Redis reachability."""
        models = {name: h.as_dict() for name, h in self._health.items()}
        ready = all(h.ready for h in self._health.values())
        redis = "not configured" if self._redis_ping is None else _redis_word(self._redis_ok)
        return {
            "live": True,
            "ready": ready,
            "status": "ok"
            if ready
            else "starting"
            if not any(h.ready for h in self._health.values())
            else "degraded",
            "models": models,
            "redis": redis,
        }

    def is_ready(self, name: str) -> bool:
        return name in self._health and self._health[name].ready

    # ----------------------------------------------------------------- serving
    def check_model(self, name: str) -> EngineClient:
        """The engine client of ``name``; 404 if unknown, 503 if not ready."""
        engine = self._engines.get(name)
        if engine is None:
            raise ModelNotFoundError(name)
        if not self._health[name].ready:
            raise EngineNotReadyError(name, self._config.engine_ready_retry_after_s)
        return engine

    async def run(self, ctx: RequestContext) -> tuple[EngineJSON | None, AsyncIterator[str] | None]:
        """Start a request. Returns either a complete JSON answer, or an SSE text stream.

        Errors before the first byte raise :class:`GatewayError`; after it they are sent
        in-band by the stream. Metrics are recorded for both paths. Headers to add to the
        answer are left in ``ctx.response_headers``.
        """
        endpoint, model, body, request_id = ctx.endpoint, ctx.model, ctx.body, ctx.request_id
        engine = self.check_model(model)
        flight = _Flight(model=model, endpoint=endpoint.value, started=time.perf_counter())
        in_flight = self._metrics.in_flight.labels(model=model, endpoint=endpoint.value)
        in_flight.inc()
        headers = {"x-request-id": request_id}
        # vLLM needs ids unique among running requests; clients may reuse theirs.
        engine_body = {**body, "request_id": f"{request_id}-{uuid.uuid4().hex[:8]}"}
        stream = engine.generate(endpoint, engine_body, headers)
        try:
            first = await self._first(stream, flight)
        except BaseException:
            in_flight.dec()
            self._finish(flight)
            await _close(stream)
            raise
        if isinstance(first, EngineJSON):
            in_flight.dec()
            flight.status = first.status
            self._finish(flight)
            await _close(stream)
            return first, None
        flight.first_chunk = time.perf_counter()
        self._metrics.ttft.labels(model=model, endpoint=endpoint.value).observe(
            flight.first_chunk - flight.started
        )
        return None, self._relay(first, stream, flight, in_flight)

    async def _first(
        self, stream: AsyncIterator[EngineJSON | EngineSSE], flight: _Flight
    ) -> EngineJSON | EngineSSE:
        try:
            async with asyncio.timeout(self._config.request_timeout_s):
                return await anext(stream)
        except TimeoutError:
            flight.status = 504
            raise GatewayTimeoutError(
                f"the request did not start within {self._config.request_timeout_s:g} s", code="timeout"
            ) from None
        except StopAsyncIteration:
            flight.status = 502
            raise EngineFailedError("the engine closed the request without an answer") from None
        except asyncio.CancelledError:
            flight.status = 499
            raise
        except Exception as exc:
            flight.status = 502
            log.exception("engine failed before the first byte")
            raise EngineFailedError(f"the engine failed: {_short(exc)}") from exc

    async def _relay(
        self,
        first: EngineSSE,
        stream: AsyncIterator[EngineJSON | EngineSSE],
        flight: _Flight,
        in_flight: Any,
    ) -> AsyncIterator[str]:
        deadline = flight.started + self._config.request_timeout_s
        try:
            yield first.text
            while True:
                remaining = deadline - time.perf_counter()
                try:
                    async with asyncio.timeout(max(remaining, 0.0)):
                        item = await anext(stream)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    flight.status = 504
                    yield _in_band_error("the request ran past its time limit", "timeout")
                    break
                except Exception as exc:
                    flight.status = 502
                    log.exception("engine failed mid-stream")
                    yield _in_band_error(f"the engine failed: {_short(exc)}", "engine_error")
                    break
                if isinstance(item, EngineSSE):
                    yield item.text
                else:  # an error after the first byte: send it in-band
                    flight.status = item.status
                    yield f"data: {_json(item.body)}\n\n"
                    break
        except (asyncio.CancelledError, GeneratorExit):
            flight.status = 499  # client went away: the engine request is cancelled below
            raise
        finally:
            in_flight.dec()
            self._finish(flight)
            await _close(stream)

    def _finish(self, flight: _Flight) -> None:
        labels = {"model": flight.model, "endpoint": flight.endpoint}
        elapsed = time.perf_counter() - flight.started
        self._metrics.requests.labels(status=str(flight.status), **labels).inc()
        self._metrics.latency.labels(**labels).observe(elapsed)
        ttft = f" ttft={1000 * (flight.first_chunk - flight.started):.1f}ms" if flight.first_chunk else ""
        ms = 1000 * elapsed
        log.info("%s %s status=%d %.1fms%s", flight.endpoint, flight.model, flight.status, ms, ttft)


async def _close(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


def _json(body: dict[str, Any]) -> str:
    import json

    return json.dumps(body, separators=(",", ":"))


def _in_band_error(message: str, kind: str) -> str:
    return f"data: {_json({'error': {'message': message, 'type': kind, 'param': None, 'code': kind}})}\n\n"


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text[:limit]


def _redis_word(ok: bool | None) -> str:
    if ok is None:
        return "unknown"
    return "ok" if ok else "unreachable"
