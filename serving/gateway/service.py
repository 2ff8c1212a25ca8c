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
from dataclasses import dataclass
from typing import Any

from serving.config import GatewayConfig, QueueConfig
from serving.engine.protocol import EngineClient, EngineJSON, EngineSSE, EngineStats
from serving.gateway.admission import Admission, Lease
from serving.gateway.auth import TenantDirectory
from serving.gateway.context import RequestContext
from serving.gateway.errors import (
    EngineFailedError,
    EngineNotReadyError,
    GatewayError,
    GatewayTimeoutError,
    InvalidRequestError,
    ModelNotFoundError,
    RateLimitError,
)
from serving.gateway.handoff import HandoffPolicy
from serving.gateway.prefix_caching import PromptCaching
from serving.gateway.ratelimit import RateLimiter
from serving.metrics import GatewayMetrics
from serving.tasks import cancel_and_wait, raise_if_cancelling

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
    ctx: RequestContext | None = None
    lease: Lease | None = None
    in_flight: Any = None
    estimated_tokens: int = 0
    usage: tuple[int, int] | None = None
    finished: bool = False


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
        auth: TenantDirectory | None = None,
        limiter: RateLimiter | None = None,
        admission: Admission | None = None,
        queue: QueueConfig | None = None,
        prompt_caching: PromptCaching | None = None,
        handoff: HandoffPolicy | None = None,
        scale_from_zero: frozenset[str] = frozenset(),
    ) -> None:
        self._config = config
        self._engines = dict(engines)
        self._metrics = metrics
        self._redis_ping = redis_ping
        self._auth = auth
        self._limiter = limiter
        self._admission = admission
        self._queue_config = queue or QueueConfig()
        self._prompt_caching = prompt_caching
        self._handoff = handoff
        self._replicas: dict[str, dict[str, tuple[int, float]]] = {name: {} for name in self._engines}
        self._expired_seen: dict[str, int] = {}
        self._redis_ok: bool | None = None
        self._health = {name: ModelHealth() for name in self._engines}
        # Models that may scale to zero are never probed (a probe through the handle would
        # wake them) and never refused as "not ready": their requests wait in admission and
        # at the deployment handle while Ray Serve starts a replica.
        self._scale_from_zero = frozenset(scale_from_zero) & set(self._engines)
        for name in self._scale_from_zero:
            self._health[name] = ModelHealth(ready=True, last_error=None)
        self._created = created_unix if created_unix is not None else int(time.time())
        self._probe_task: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start probing engine health, renewing leases and refreshing tenants in the background."""
        if self._auth is not None:
            await self._auth.start()
        if self._admission is not None:
            await self._admission.start()
        if self._probe_task is None:
            self._probe_task = asyncio.create_task(self._probe_forever(), name="oss-serving-health")

    async def stop(self) -> None:
        task, self._probe_task = self._probe_task, None
        await cancel_and_wait(task)
        if self._admission is not None:
            await self._admission.stop()
        if self._auth is not None:
            await self._auth.stop()

    @property
    def admission(self) -> Admission | None:
        return self._admission

    async def _probe_forever(self) -> None:
        while True:
            await self.probe_once()
            raise_if_cancelling()  # probes treat any error as "not ready", a hidden cancel among them
            await asyncio.sleep(self._config.health_check_interval_s)

    async def probe_once(self) -> None:
        """Probe every engine deployment (and Redis) once, concurrently; refresh queue gauges."""
        await asyncio.gather(*(self._probe(name) for name in self._engines), self._probe_redis())
        if self._admission is not None:
            await self._record_queue()

    def _update_capacity(self, name: str, stats: EngineStats) -> None:
        """Capacity = what each engine replica seen lately runs well, summed over replicas."""
        assert self._admission is not None
        seen = self._replicas[name]
        now = time.monotonic()
        replica = str(stats.extra.get("replica_id") or "replica")
        engine_max = int(stats.extra.get("max_num_seqs") or 0)
        candidates = [x for x in (self._queue_config.capacity_per_replica, engine_max) if x]
        if candidates:
            seen[replica] = (min(candidates), now)
        horizon = max(30.0, 5 * self._config.health_check_interval_s)
        for key in [k for k, (_, t) in seen.items() if now - t > horizon]:
            del seen[key]
        if seen:
            self._admission.set_capacity(name, sum(cap for cap, _ in seen.values()))

    async def _record_queue(self) -> None:
        assert self._admission is not None
        m = self._metrics
        m.queue_degraded.set(1 if self._admission.degraded else 0)
        for name in self._engines:
            snap = await self._admission.snapshot(name)
            for priority, depth in snap.depth.items():
                m.queue_depth.labels(model=name, priority=priority).set(depth)
            m.queue_in_use.labels(model=name).set(snap.in_use)
            m.queue_capacity.labels(model=name).set(snap.capacity)
            previous = self._expired_seen.get(name)
            if previous is not None and snap.expired_total > previous:
                m.leases_expired.labels(model=name).inc(snap.expired_total - previous)
            self._expired_seen[name] = snap.expired_total

    async def _probe(self, name: str) -> None:
        health = self._health[name]
        engine = self._engines[name]
        now = time.time()
        if name in self._scale_from_zero:
            health.last_probe = now
            self._metrics.model_ready.labels(model=name).set(1)
            return
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
            if self._admission is not None:
                self._update_capacity(name, stats)
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
        models = {
            name: {**h.as_dict(), "scales_from_zero": name in self._scale_from_zero}
            for name, h in self._health.items()
        }
        ready = all(h.ready for h in self._health.values())
        redis = "not configured" if self._redis_ping is None else _redis_word(self._redis_ok)
        queue_degraded = self._admission is not None and self._admission.degraded
        if not any(h.ready for h in self._health.values()):
            status = "starting"
        elif not ready or queue_degraded:
            status = "degraded"
        else:
            status = "ok"
        admission = (
            "off" if self._admission is None else "local (Redis unreachable)" if queue_degraded else "redis"
        )
        return {
            "live": True,
            "ready": ready,
            "status": status,
            "models": models,
            "redis": redis,
            "admission": admission,
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

        Steps: resolve a virtual model, authenticate and authorize the tenant, hand off
        (escalation, overflow) if the policy says so, check the model, apply the tenant's
        limits, answer from the response cache if it may, wait for admission, route by
        prefix affinity, call the engine (failing over to an upstream if it fails before
        the first token). Errors before the first byte
        raise :class:`GatewayError`; after it they are sent in-band by the stream. Metrics
        are recorded for both paths. Headers for the answer are left in
        ``ctx.response_headers``.
        """
        if self._handoff is not None:
            self._handoff.resolve(ctx)  # a virtual model (``auto``) becomes the local model its rule picks
        endpoint, model, body, request_id = ctx.endpoint, ctx.model, ctx.body, ctx.request_id
        flight = _Flight(model=model, endpoint=endpoint.value, started=time.perf_counter(), ctx=ctx)
        try:
            if self._auth is not None:
                ctx.tenant = self._auth.authenticate(ctx.headers.get("authorization"))
                self._auth.authorize(ctx.tenant, model)
            handed = await self._handoff.before_admission(ctx) if self._handoff is not None else None
            if handed is not None:
                return handed  # escalation or overflow: an upstream answered
            engine = self.check_model(model)
            _check_output_cap(ctx)
            if self._limiter is not None:
                estimate = _estimate_tokens(body)
                ctx.response_headers.update(await self._limiter.check(ctx.tenant, estimate))
                flight.estimated_tokens = estimate
        except GatewayError as exc:
            label = self._metrics.model_label(model)
            self._metrics.requests.labels(model=label, endpoint=endpoint.value, status=str(exc.status)).inc()
            if isinstance(exc, RateLimitError):
                self._metrics.rejections.labels(model=label, reason=exc.code or "rate_limit").inc()
            raise
        caching = self._prompt_caching.begin(ctx) if self._prompt_caching is not None else None
        if caching is not None and (hit := await caching.lookup()) is not None:
            return hit  # response cache: no admission, no engine
        in_flight = self._metrics.in_flight.labels(model=model, endpoint=endpoint.value)
        in_flight.inc()
        flight.in_flight = in_flight
        try:
            if self._admission is not None:
                flight.lease = await self._admit(ctx)
        except BaseException as exc:
            flight.status = getattr(exc, "status", 499)
            await self._finish(flight)
            raise
        headers = {"x-request-id": request_id}
        # vLLM needs ids unique among running requests; clients may reuse theirs.
        engine_body = {**body, "request_id": f"{request_id}-{uuid.uuid4().hex[:8]}"}
        if caching is not None:
            await caching.route(headers)  # prefix-affinity hints for the engine's router
        stream = engine.generate(endpoint, engine_body, headers)
        try:
            first = await self._first(stream, flight)
        except EngineFailedError:
            await self._finish(flight)
            await _close(stream)
            if self._handoff is not None and (handed := await self._handoff.failover(ctx)) is not None:
                return handed
            raise
        except BaseException:
            await self._finish(flight)
            await _close(stream)
            raise
        if caching is not None:
            caching.routed(headers)
        if isinstance(first, EngineJSON):
            flight.status = first.status
            flight.usage = _usage_from_body(first.body)
            await self._finish(flight)
            await _close(stream)
            handed = await self._handoff.failover(ctx) if first.status >= 500 and self._handoff else None
            if handed is not None:
                return handed
            return (caching.answer(first) if caching is not None else first), None
        flight.first_chunk = time.perf_counter()
        self._metrics.ttft.labels(model=model, endpoint=endpoint.value).observe(
            flight.first_chunk - flight.started
        )
        relay = self._relay(first, stream, flight)
        return None, (caching.stream(relay) if caching is not None else relay)

    async def _admit(self, ctx: RequestContext) -> Lease:
        assert self._admission is not None
        priority = ctx.tenant.priority.value
        deadline_s = _deadline_s(ctx, self._queue_config)
        try:
            lease = await self._admission.acquire(ctx.model, ctx.tenant, deadline_s)
        except GatewayError as exc:
            reason = exc.code or type(exc).__name__
            self._metrics.rejections.labels(model=ctx.model, reason=reason).inc()
            raise
        self._metrics.admissions.labels(model=ctx.model, priority=priority).inc()
        self._metrics.queue_wait.labels(model=ctx.model, priority=priority).observe(lease.waited_s)
        return lease

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
        self, first: EngineSSE, stream: AsyncIterator[EngineJSON | EngineSSE], flight: _Flight
    ) -> AsyncIterator[str]:
        deadline = flight.started + self._config.request_timeout_s
        try:
            _note_usage(flight, first.text)
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
                    _note_usage(flight, item.text)
                    yield item.text
                else:  # an error after the first byte: send it in-band
                    flight.status = item.status
                    yield f"data: {_json(item.body)}\n\n"
                    break
        except (asyncio.CancelledError, GeneratorExit):
            flight.status = 499  # client went away: the engine request is cancelled below
            raise
        finally:
            await self._finish(flight)
            await _close(stream)

    def tenant_label(self, tenant_id: str) -> str:
        """The tenant as a metric label: bounded by the known tenants, else ``other``."""
        if self._auth is None or not self._auth.required:
            return tenant_id
        known = self._auth.tenant_ids()[:MAX_TENANT_LABELS]
        return tenant_id if tenant_id in known else "other"

    async def _finish(self, flight: _Flight) -> None:
        """Account for a request once: metrics, lease, tenant usage, token correction."""
        if flight.finished:
            return
        flight.finished = True
        if flight.in_flight is not None:
            flight.in_flight.dec()
        if flight.lease is not None and self._admission is not None:
            await asyncio.shield(self._admission.release(flight.lease))
        if flight.ctx is not None:
            tenant = flight.ctx.tenant
            label = self.tenant_label(tenant.id)
            self._metrics.tenant_requests.labels(tenant=label, model=flight.model).inc()
            if flight.usage is not None:
                prompt, completion = flight.usage
                self._metrics.output_tokens.labels(model=flight.model).inc(completion)
                if flight.first_chunk is not None and completion > 1 and flight.status < 400:
                    tpot = (time.perf_counter() - flight.first_chunk) / (completion - 1)
                    self._metrics.tpot.labels(model=flight.model).observe(tpot)
                self._metrics.tenant_tokens.labels(tenant=label, model=flight.model, kind="prompt").inc(
                    prompt
                )
                self._metrics.tenant_tokens.labels(tenant=label, model=flight.model, kind="completion").inc(
                    completion
                )
            if self._limiter is not None and flight.estimated_tokens:
                used = sum(flight.usage) if flight.usage is not None and flight.status < 400 else 0
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._limiter.correct_tokens(tenant, used - flight.estimated_tokens))
        labels = {"model": flight.model, "endpoint": flight.endpoint}
        elapsed = time.perf_counter() - flight.started
        self._metrics.requests.labels(status=str(flight.status), **labels).inc()
        self._metrics.latency.labels(**labels).observe(elapsed)
        ttft = f" ttft={1000 * (flight.first_chunk - flight.started):.1f}ms" if flight.first_chunk else ""
        ms = 1000 * elapsed
        log.info("%s %s status=%d %.1fms%s", flight.endpoint, flight.model, flight.status, ms, ttft)


MAX_TENANT_LABELS = 200
DEADLINE_HEADER = "x-oss-deadline-ms"
_OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def _deadline_s(ctx: RequestContext, queue: QueueConfig) -> float | None:
    """The request's start deadline: header ``X-Oss-Deadline-Ms``, else the configured default."""
    raw = ctx.headers.get(DEADLINE_HEADER)
    if raw is None:
        return queue.default_deadline_s
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequestError(
            f"{DEADLINE_HEADER} must be a number of milliseconds", param=DEADLINE_HEADER, code="invalid_value"
        ) from None
    if not 0 < value <= 86_400_000:
        raise InvalidRequestError(
            f"{DEADLINE_HEADER} must be between 1 and 86400000", param=DEADLINE_HEADER, code="invalid_value"
        )
    return value / 1000


def _check_output_cap(ctx: RequestContext) -> None:
    """The tenant's ``max_output_tokens``: fill it in when absent, reject a larger ask."""
    cap = ctx.tenant.limits.max_output_tokens
    if cap is None:
        return
    present = [f for f in _OUTPUT_FIELDS if ctx.body.get(f) is not None]
    for name in present:
        if int(ctx.body[name]) > cap:
            raise InvalidRequestError(
                f"{name} is {ctx.body[name]}, above this tenant's limit of {cap} output tokens",
                param=name,
                code="max_tokens_over_limit",
            )
    if not present:
        field_name = "max_output_tokens" if ctx.endpoint.value == "responses" else "max_tokens"
        ctx.body[field_name] = cap


def _estimate_tokens(body: dict[str, Any]) -> int:
    """Prompt estimate (4 characters a token) plus the output cap, for the tokens-per-minute charge."""
    prompt_chars = sum(len(_json(body[k])) for k in ("messages", "prompt", "input") if k in body)
    output = next((int(body[f]) for f in _OUTPUT_FIELDS if body.get(f) is not None), 256)
    return prompt_chars // 4 + output


def _usage_pair(usage: Any) -> tuple[int, int] | None:
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    if prompt is None or completion is None:
        return None
    return int(prompt), int(completion)


def _usage_from_body(body: dict[str, Any]) -> tuple[int, int] | None:
    return _usage_pair(body.get("usage"))


def _note_usage(flight: _Flight, text: str) -> None:
    """Pick up usage from a streamed chunk (chat/completions final chunk, responses' final event)."""
    if '"usage"' not in text:
        return
    import json

    for line in text.splitlines():
        if not line.startswith("data: {"):
            continue
        try:
            event = json.loads(line[6:])
        except ValueError:
            continue
        found = _usage_pair(event.get("usage")) or _usage_pair((event.get("response") or {}).get("usage"))
        if found is not None:
            flight.usage = found


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
