"""The gateway's request pipeline: explicit stages in one order, one owner per request.

Plain Python with async interfaces; no HTTP and no Ray, so it is tested with a fake
:class:`~serving.engine.protocol.EngineClient`. The API opens a :class:`Flight` for every
request, asks :meth:`GatewayService.authenticate` (401 before anything about the body),
validates the body, and hands both to :meth:`GatewayService.run`, whose stages are::

    1 resolve     a virtual model (``auto``) becomes the local model its rule picks
    2 model       unknown model -> 404; tenant may not use it -> 403
    3 limits      deadline header, the tenant's output cap, requests and tokens per minute
    4 handoff     escalation or overflow to an upstream (charged like a local request)
    5 ready       no ready engine replica -> 503
    6 cache       a stored answer of a deterministic request (no admission, no engine)
    7 admission   the shared queue: a lease, held by the flight
    8 routing     prefix-affinity hints for the engine's request router
    9 engine      the first item (timeout); failover to an upstream before the first byte
   10 relay       the stream, errors in-band, to the client

Every stage either passes or raises :class:`GatewayError`; whatever it acquires, the
flight holds and :meth:`Flight.close` gives back exactly once, on every path.
Optional collaborators (admission, handoff) are do-nothing objects when off, never
``None`` checks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from serving.config import FilesConfig, GatewayConfig, QueueConfig, ResponsesConfig
from serving.engine.protocol import EngineClient, EngineJSON, EngineSSE
from serving.engine.request_errors import clean_message
from serving.engine.routing_hints import ROUTED_REPLICA
from serving.gateway.admission import Lease, QueueSnapshot
from serving.gateway.auth import TenantDirectory
from serving.gateway.background import BackgroundOff, BackgroundPort
from serving.gateway.batches import BatchesOff, BatchesPort
from serving.gateway.context import RequestContext
from serving.gateway.errors import (
    EngineFailedError,
    EngineNotReadyError,
    GatewayError,
    GatewayTimeoutError,
    ModelNotFoundError,
)
from serving.gateway.failover import Failover, StreamSplice
from serving.gateway.files import FilesOff, FilesPort
from serving.gateway.flight import Flight, Flights
from serving.gateway.health import EngineHealth
from serving.gateway.isolation import CacheIsolation
from serving.gateway.limits import RequestLimits, UsageText, deadline_of, strip_usage, wants_usage
from serving.gateway.prefix_caching import PromptCaching
from serving.gateway.ratelimit import RateLimiter
from serving.gateway.responses import Conversations, NoStore, Turn
from serving.gateway.tenants import PriorityClass, Tenant, hash_key
from serving.gateway.validation import preload, validate_request
from serving.metrics import GatewayMetrics
from serving.wire import (
    REQUEST_ID_HEADER,
    RETRIES_HEADER,
    Endpoint,
    aclose_stream,
    dumps,
    error_body,
    error_event,
    error_fields,
    sse_data_events,
    usage_pair,
)

__all__ = ["Answer", "GatewayService", "ResponseStream", "Unlimited"]

log = logging.getLogger("oss_serving.gateway")


# ------------------------------------------------------------------ collaborators
class AdmissionPort(Protocol):
    """The admission queue as the pipeline uses it (``Admission``, or :class:`Unlimited`)."""

    @property
    def degraded(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def acquire(
        self,
        model: str,
        tenant: Tenant,
        deadline_s: float | None,
        request_id: str = "-",
        *,
        weight: int = 1,
    ) -> Lease: ...

    async def hold(self, model: str, tenant: Tenant, request_id: str = "-") -> Lease: ...

    async def release(self, lease: Lease) -> None: ...

    async def predicted_wait_s(
        self, model: str, priority: PriorityClass = PriorityClass.standard
    ) -> float: ...

    def set_capacity(self, model: str, capacity: int) -> None: ...

    async def snapshot(self, model: str) -> QueueSnapshot: ...


class Companion(Protocol):
    """A background part started and stopped with the service (the batch worker)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Unlimited:
    """Admission turned off: every request starts at once (the engines queue them)."""

    degraded = False

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def acquire(
        self,
        model: str,
        tenant: Tenant,
        deadline_s: float | None,
        request_id: str = "-",
        *,
        weight: int = 1,
    ) -> Lease:
        now = time.monotonic()
        return Lease("unlimited", model, tenant.id, tenant.priority, now, 0.0, "local")

    async def hold(self, model: str, tenant: Tenant, request_id: str = "-") -> Lease:
        now = time.monotonic()
        return Lease("unlimited", model, tenant.id, tenant.priority, now, 0.0, "hold", released=True)

    async def release(self, lease: Lease) -> None:
        return None

    async def predicted_wait_s(self, model: str, priority: PriorityClass = PriorityClass.standard) -> float:
        return 0.0

    def set_capacity(self, model: str, capacity: int) -> None:
        return None

    async def snapshot(self, model: str) -> QueueSnapshot:
        return QueueSnapshot()


UpstreamAnswer = tuple[EngineJSON | None, AsyncIterator[str] | None]


class HandoffPort(Protocol):
    """The handoff policy as the pipeline uses it (``HandoffPolicy``, or ``NoHandoff``)."""

    def resolve(self, ctx: RequestContext) -> None: ...

    async def before_admission(self, ctx: RequestContext) -> UpstreamAnswer | None: ...

    async def failover(self, ctx: RequestContext) -> UpstreamAnswer | None: ...

    async def aclose(self) -> None: ...


# ------------------------------------------------------------------ answers
class ResponseStream:
    """The SSE text of one answer; owns its flight.

    :meth:`aclose` closes the flight (lease, gauges, engine request, accounting) whether
    the stream was iterated to the end, stopped half-way, or never started at all: the
    API calls it in a ``finally`` around sending the response.
    """

    def __init__(self, chunks: AsyncIterator[str], flight: Flight) -> None:
        self._chunks = chunks
        self._flight = flight
        self._ended = False

    def __aiter__(self) -> ResponseStream:
        return self

    def pipe(self, through: Callable[[AsyncIterator[str]], AsyncIterator[str]]) -> None:
        """Pass the chunks through ``through`` (which closes what it was given)."""
        self._chunks = through(self._chunks)

    async def __anext__(self) -> str:
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            self._ended = True
            raise

    async def aclose(self) -> None:
        flight = self._flight
        try:
            await asyncio.shield(aclose_stream(self._chunks))
        except Exception:
            log.exception("request_id=%s: closing the stream failed", flight.request_id)
        finally:
            if not self._ended and flight.status < 400:
                flight.status = 499  # the client went away before the end
            await flight.close()


@dataclass
class Answer:
    """What :meth:`GatewayService.run` returns: a JSON answer, or a stream (one of them)."""

    json: EngineJSON | None = None
    stream: ResponseStream | None = None


# ------------------------------------------------------------------ the service
class GatewayService:
    """Serves validated OpenAI requests through the engines of the configured models.

    Built by :func:`serving.gateway.build.build_gateway`, which wires every collaborator.
    """

    def __init__(
        self,
        config: GatewayConfig,
        queue_config: QueueConfig,
        engines: Mapping[str, EngineClient],
        metrics: GatewayMetrics,
        *,
        auth: TenantDirectory,
        limiter: RateLimiter,
        admission: AdmissionPort,
        prompt_caching: PromptCaching,
        handoff: HandoffPort,
        health: EngineHealth,
        flights: Flights,
        isolation: CacheIsolation,
        admin_keys: frozenset[str] = frozenset(),
        limits: RequestLimits | None = None,
        failover: Failover | None = None,
        conversations: Conversations | None = None,
        files: FilesPort | None = None,
        batches: BatchesPort | None = None,
        created_unix: int | None = None,
    ) -> None:
        self.files: FilesPort = files or FilesOff(FilesConfig())
        self.batches: BatchesPort = batches or BatchesOff()
        self._companions: list[Companion] = []
        self._failover = failover or Failover([], metrics)
        self.conversations = conversations or Conversations(NoStore(), ResponsesConfig(), enabled=False)
        self.background: BackgroundPort = BackgroundOff(self.conversations)
        """Background responses; ``build.py`` sets :class:`~serving.gateway.background.Background`."""
        self._config = config
        self._queue_config = queue_config
        self._engines = dict(engines)
        self.metrics = metrics
        self._auth = auth
        self._limiter = limiter
        self.admission = admission
        self._prompt_caching = prompt_caching
        self._handoff = handoff
        self.health = health
        self.flights = flights
        self._isolation = isolation
        self._admin_keys = admin_keys
        self._limits = limits or RequestLimits()
        self._created = created_unix if created_unix is not None else int(time.time())
        self._started = False

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Import vLLM's request models, refresh tenants, start admission's maintenance
        and the health probes."""
        if self._started:
            return
        self._started = True
        await asyncio.to_thread(preload)  # vLLM's request models: not on the first request
        await self._auth.start()
        await self.admission.start()
        await self.health.start()
        for companion in self._companions:
            await companion.start()

    def attach(self, companion: Companion) -> None:
        """Start and stop ``companion`` with the service."""
        self._companions.append(companion)

    async def stop(self) -> None:
        """Graceful shutdown: stop the companions (batch lines handed back), stop probing,
        cancel queued tickets, close what is open."""
        for companion in reversed(self._companions):
            await companion.stop()
        await self.health.stop()
        await self.admission.stop()
        await self.flights.close_all()
        await self._auth.stop()
        await self._prompt_caching.stop()
        await self._handoff.aclose()

    async def probe_once(self) -> None:
        await self.health.probe_once()

    # ----------------------------------------------------------------- queries
    def model_ids(self) -> list[str]:
        return list(self._engines)

    def model_card(self, name: str) -> dict[str, Any]:
        if name not in self._engines:
            raise ModelNotFoundError(name)
        return {"id": name, "object": "model", "created": self._created, "owned_by": "oss-serving"}

    def health_report(self) -> dict[str, Any]:
        """Engines, Redis, admission, and where the tenant directory comes from (Redis, or
        the last good copy while Redis lost its data and is re-seeded)."""
        report = self.health.report()
        report["tenants"] = self._auth.health()
        return report

    def is_ready(self, name: str) -> bool:
        return self.health.is_ready(name)

    def tenant_label(self, tenant_id: str) -> str:
        """The tenant as a metric label: bounded by the known tenants, else ``other``."""
        return self.flights.tenant_label(tenant_id)

    # ----------------------------------------------------------------- serving
    def open(self, request_id: str, endpoint: Endpoint) -> Flight:
        """Open the flight of a request that just arrived (the API does, first thing)."""
        return self.flights.open(request_id, endpoint.value)

    def authenticate(self, headers: Mapping[str, str]) -> Tenant:
        """The tenant of the request's API key; 401 (before the body is even read)."""
        return self._auth.authenticate(headers.get("authorization"))

    @property
    def open_doors(self) -> bool:
        """No authentication: ``/metrics`` and the detailed ``/health`` are open too."""
        return not self._auth.required

    def is_operator(self, headers: Mapping[str, str]) -> bool:
        """Whether the request carries an operator key (``auth.admin_key_sha256``)."""
        scheme, _, key = (headers.get("authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and bool(key.strip()) and hash_key(key.strip()) in self._admin_keys

    def models_for(self, tenant: Tenant) -> list[str]:
        """The models a tenant may use (``/v1/models`` lists only these)."""
        return [m for m in self._engines if tenant.may_use(m)]

    async def run(self, ctx: RequestContext, flight: Flight) -> Answer:
        """Serve one authenticated, validated request (see the module docstring).

        A returned JSON answer has closed its flight; a returned stream owns it. Any
        exception closes the flight (with the error's status, or 499 if cancelled)
        before it propagates.
        """
        try:
            answer = await self._run(ctx, flight)
            if ctx.turn is not None:
                await self._finish_turn(ctx.turn, ctx, answer)
            return answer
        except GatewayError as exc:
            if exc.status in (429, 503) and exc.reason:
                self.metrics.rejections.labels(
                    model=self.metrics.model_label(ctx.model), reason=exc.reason
                ).inc()
            await flight.close(exc.status, detail=exc.message)
            raise
        except asyncio.CancelledError:
            await flight.close(499)
            raise
        except BaseException:
            await flight.close(500, detail="internal error")
            raise

    async def submit(
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        tenant: Tenant,
        request_id: str,
        *,
        headers: Mapping[str, str] | None = None,
        turn: Turn | None = None,
    ) -> Answer:
        """A request the gateway makes itself (a background response, a batch line),
        through the same pipeline as one from HTTP: validated, limited, admitted at the
        priority of ``tenant``; ``turn``, a Responses turn already read (a background
        response's). Raises :class:`GatewayError` as :meth:`run` does; a returned stream
        is the caller's to close."""
        flight = self.open(request_id, endpoint)
        flight.tenant = tenant
        try:
            model = validate_request(endpoint, body, self._config.max_error_message_chars)
        except GatewayError as exc:
            await flight.close(exc.status, detail=exc.message)
            raise
        except BaseException:
            await flight.close(500, detail="internal error")
            raise
        ctx = RequestContext(
            request_id=request_id,
            endpoint=endpoint,
            model=model,
            body=body,
            headers={k.lower(): v for k, v in (headers or {}).items()},
            tenant=tenant,
            turn=turn,
        )
        return await self.run(ctx, flight)

    async def _run(self, ctx: RequestContext, flight: Flight) -> Answer:
        flight.tenant = ctx.tenant
        # 1-2: the model, and whether this tenant may use it
        self._handoff.resolve(ctx)
        flight.model = ctx.model
        engine = self._engines.get(ctx.model)
        if engine is None:
            raise ModelNotFoundError(ctx.virtual_model or ctx.model)
        self._auth.authorize(ctx.tenant, ctx.model)
        ctx.cache_scope = self._isolation.salt(ctx.tenant.id)
        if self.background.wants(ctx):  # stored as queued and answered now; runs as a task
            return await self._background(ctx, flight)
        # the previous response's conversation replayed into the input (stored responses)
        ctx.turn = await self.conversations.prepare(ctx)
        # 3: the tenant's limits, before anything may spend capacity (local or upstream)
        deadline_s = deadline_of(ctx, self._queue_config)
        if deadline_s is not None:
            ctx.deadline = ctx.arrived + deadline_s
        cost = self._limits.apply(ctx)  # fan-out caps, the output cap (filled in when absent)
        ctx.response_headers.update(await self._limiter.check(ctx.tenant, cost.tokens))
        if ctx.tenant.limits.tokens_per_minute:
            flight.charged(cost.tokens, output=cost.output_tokens)
        # The tenant's concurrency limit, for a request served anywhere: held in the
        # tenant's active set until the queue counts it (stage 7) or the request ends.
        flight.hold_lease(await self.admission.hold(ctx.model, ctx.tenant, ctx.request_id))
        # 4: escalation or overflow
        handed = await self._handoff.before_admission(ctx)
        if handed is not None:
            return await self._upstream_answer(handed, ctx, flight)
        # 5: a ready engine
        if not self.health.is_ready(ctx.model):
            raise EngineNotReadyError(ctx.model, self._config.engine_ready_retry_after_s)
        # 6: the response cache
        caching = self._prompt_caching.begin(ctx)
        hit = await caching.lookup()
        if hit is not None:
            flight.cache_hit = True
            return await self._cached_answer(hit, ctx, flight)
        # 7: admission (which counts the request for its tenant from now on)
        flight.enter()
        await flight.release_lease()
        lease = await self.admission.acquire(
            ctx.model, ctx.tenant, deadline_s, ctx.request_id, weight=cost.sequences
        )
        flight.hold_lease(lease)
        priority = ctx.tenant.priority.value
        self.metrics.admissions.labels(model=ctx.model, priority=priority).inc()
        self.metrics.queue_wait.labels(model=ctx.model, priority=priority).observe(lease.waited_s)
        granted = time.perf_counter()
        # 8-9: routing hints, and the engine's first item, retried on another replica
        # when the engine failed or stalled before producing anything
        run = await self._start_engine(engine, ctx, flight, caching, granted)
        if run.first is None or (isinstance(run.first, EngineJSON) and run.first.status >= 500):
            failed_over = await self._handoff.failover(ctx)  # every local attempt failed
            if failed_over is not None:
                return await self._upstream_answer(failed_over, ctx, flight)
            if run.first is None:
                raise EngineFailedError()
        first = run.first
        if isinstance(first, EngineJSON):
            flight.usage = usage_pair(first.body.get("usage"))
            answer = caching.answer(first) if first.status < 400 else self._error_answer(first, ctx)
            await flight.close(answer.status)
            return Answer(json=answer)
        flight.note_chunk(first.text)
        self.metrics.ttft.labels(model=ctx.model, endpoint=ctx.endpoint.value).observe(
            time.perf_counter() - flight.started
        )
        relay = self._relay(first, run, flight, ctx, granted, engine)
        return Answer(stream=ResponseStream(caching.stream(relay), flight))

    def identity_headers(self) -> dict[str, str]:
        """This gateway replica's name (``routing.decision_headers``), for answers that
        reach no engine: stored and background responses."""
        return self._prompt_caching.identity_headers()

    @property
    def gateway_id(self) -> str:
        return self._prompt_caching.gateway_id

    async def _background(self, ctx: RequestContext, flight: Flight) -> Answer:
        """A background response: the queued response (JSON), or its event stream."""
        ctx.response_headers.update(self.identity_headers())
        created = await self.background.create(ctx)
        if isinstance(created, dict):
            await flight.close(200)
            return Answer(json=EngineJSON(200, created))
        return Answer(stream=ResponseStream(created, flight))

    async def _finish_turn(self, turn: Turn, ctx: RequestContext, answer: Answer) -> None:
        """A Responses answer as the client's request would have it, stored (when asked)
        before the client has it whole."""
        tenant = ctx.tenant.id
        if answer.json is not None:
            body = await self.conversations.answer(turn, tenant, answer.json.status, answer.json.body)
            answer.json = EngineJSON(answer.json.status, body)
        elif answer.stream is not None:
            answer.stream.pipe(lambda chunks: self.conversations.stream(turn, tenant, chunks))

    # ----------------------------------------------------------------- stages' helpers
    async def _start_engine(
        self,
        engine: EngineClient,
        ctx: RequestContext,
        flight: Flight,
        caching: Any,
        granted: float,
    ) -> _EngineRun:
        """The engine's first item, its stream, its splice and routing headers.

        A failure before the first byte (an exception, a 5xx answer, or nothing within the
        idle timeout) is safe to retry: the replica is quarantined and the request goes to
        another one, up to ``failover.retry_attempts`` times within ``retry_budget_s``.
        When every attempt failed the run's ``first`` is None (or the last 5xx answer) and
        the lease is given back."""
        policy = self._failover.config(ctx.model)
        # A non-streamed answer comes whole, after the entire generation: only a stream's
        # first item is expected within the idle timeout.
        idle_s = policy.idle_timeout_s if ctx.body.get("stream") else math.inf
        started = time.monotonic()
        attempt = 0
        while True:
            headers = {REQUEST_ID_HEADER: ctx.request_id}
            await caching.route(headers)
            self._failover.quarantine.route(ctx.model, headers)
            # vLLM needs ids unique among running requests (and the tenant's cache salt: a
            # client's own salt never crosses tenants)
            engine_body = {
                **ctx.body,
                "request_id": f"{ctx.request_id}-{uuid.uuid4().hex[:8]}",
                "cache_salt": ctx.cache_scope,
            }
            if _strips_usage(ctx):  # the tenant is charged the engine's count, not an estimate
                asked = ctx.body.get("stream_options")
                options = {**(asked if isinstance(asked, dict) else {}), "include_usage": True}
                engine_body["stream_options"] = options
            splice = self._failover.splice(ctx.model, ctx.endpoint, ctx.body, engine_body)
            stream = engine.generate(ctx.endpoint, engine_body, headers)
            flight.hold_stream(stream)
            cause: str | None = None
            first: EngineJSON | EngineSSE | None = None
            try:
                first = await self._first(stream, granted, idle_s)
            except _Stalled:
                cause, flight.detail = "stalled", "no answer within the idle timeout"
            except EngineFailedError as exc:
                cause, flight.detail = "engine_error", exc.message
            if isinstance(first, EngineJSON) and first.status >= 500:
                cause, flight.detail = "engine_error", _engine_message(first)
            if cause is None:
                caching.routed(headers)
                return _EngineRun(first, stream, splice, headers)
            self._failover.failed(ctx.model, headers.get(ROUTED_REPLICA), cause)
            out_of_time = time.monotonic() - started > policy.retry_budget_s
            if attempt >= policy.retry_attempts or out_of_time:
                await flight.leave_engine()  # the lease goes back before any failover
                return _EngineRun(first, stream, None, headers)
            await flight.drop_stream()
            attempt += 1
            self._failover.retried(ctx.model, cause, ctx.request_id, attempt)
            ctx.response_headers[RETRIES_HEADER] = str(attempt)

    async def _first(
        self, stream: AsyncIterator[EngineJSON | EngineSSE], granted: float, idle_s: float
    ) -> EngineJSON | EngineSSE:
        loop = asyncio.get_running_loop()
        left = self._config.request_timeout_s - (time.perf_counter() - granted)
        stall = idle_s < left
        try:
            async with asyncio.timeout_at(loop.time() + max(min(idle_s, left), 0.0)):
                return await anext(stream)
        except TimeoutError:
            if stall:
                raise _Stalled() from None
            raise GatewayTimeoutError(
                f"The request did not start within {self._config.request_timeout_s:g} s.", code="timeout"
            ) from None
        except StopAsyncIteration:
            raise EngineFailedError() from None
        except (GatewayError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.warning("engine failed before the first byte: %s: %s", type(exc).__name__, _first_line(exc))
            raise EngineFailedError() from exc

    async def _relay(
        self,
        first: EngineSSE,
        run: _EngineRun,
        flight: Flight,
        ctx: RequestContext,
        granted: float,
        engine: EngineClient,
    ) -> AsyncIterator[str]:
        """The engine's events to the client, verbatim; a replica that dies or stalls
        mid-stream is replaced by a continuation on another one (``run.splice``); other
        errors become our in-band error."""
        deadline = granted + self._config.request_timeout_s
        idle_s = self._failover.config(ctx.model).idle_timeout_s
        splice, stream = run.splice, run.stream
        strip = _strips_usage(ctx)
        item: EngineJSON | EngineSSE = first
        noted = True  # the first item was noted when it came (its time is the TTFT)
        while True:
            cause: str | None = None
            failure: EngineJSON | None = None
            if isinstance(item, EngineJSON):  # an error after the first byte
                failure = item
                cause = "engine_error" if item.status >= 500 else None
            else:
                raw = item.text if splice is None else splice.relay(item.text)
                if splice is not None:
                    raw, failure = _split_engine_error(raw, min_status=500)
                    cause = "engine_error" if failure is not None else None
                text, ended = self._in_band(raw, flight, ctx)
                if strip:
                    text = strip_usage(text)
                if (text or isinstance(text, UsageText)) and not noted:
                    flight.note_chunk(text)
                noted = False
                if text:
                    yield text
                if ended:
                    return
            if cause is not None and splice is not None:
                moved = await self._migrate(engine, ctx, flight, splice, cause, run)
                if moved:
                    failure = cause = None
            if failure is not None:
                answer = self._error_answer(failure, ctx)
                flight.status = answer.status
                yield error_event(answer.body, endpoint=ctx.endpoint)
                return
            if cause is not None:
                flight.status = 502
                yield self._error_event(EngineFailedError(), ctx)
                return
            stream = run.stream
            while True:  # the next item (a stalled or failed engine may be migrated meanwhile)
                left = deadline - time.perf_counter()
                try:
                    async with asyncio.timeout(max(min(idle_s, left), 0.0)):
                        item = await anext(stream)
                    break
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if left <= idle_s:
                        flight.status = 504
                        yield self._error_event(
                            GatewayTimeoutError("The request ran past its time limit.", code="timeout"), ctx
                        )
                        return
                    cause, flight.detail = "stalled", "no token within the idle timeout"
                except Exception as exc:
                    cause, flight.detail = "engine_error", f"{type(exc).__name__}: {_first_line(exc)}"
                    log.warning("request_id=%s: engine failed mid-stream: %s", ctx.request_id, flight.detail)
                if splice is None or not await self._migrate(engine, ctx, flight, splice, cause, run):
                    flight.status = 502
                    yield self._error_event(EngineFailedError(), ctx)
                    return
                stream = run.stream

    async def _migrate(
        self,
        engine: EngineClient,
        ctx: RequestContext,
        flight: Flight,
        splice: StreamSplice,
        cause: str,
        run: _EngineRun,
    ) -> bool:
        """Continue ``splice``'s stream on another replica (``run`` gets its stream and
        routing headers); False when it cannot be."""
        self._failover.failed(ctx.model, run.headers.get(ROUTED_REPLICA), cause)
        streamed = len(splice.generated)
        body = None
        outcome = "not_possible"
        if splice.migrations >= self._failover.config(ctx.model).max_migrations:
            outcome = "exhausted"
        elif splice.can_migrate:
            body = splice.continuation()
        if body is None:
            self._failover.migrated(ctx.model, cause, outcome, ctx.request_id, streamed)
            return False
        await flight.drop_stream()
        body["request_id"] = f"{ctx.request_id}-{uuid.uuid4().hex[:8]}"
        run.headers = {REQUEST_ID_HEADER: ctx.request_id}
        self._failover.quarantine.route(ctx.model, run.headers)
        run.stream = engine.generate(Endpoint.completions, body, run.headers)
        flight.hold_stream(run.stream)
        self._failover.migrated(ctx.model, cause, "continued", ctx.request_id, streamed)
        return True

    def _in_band(self, text: str, flight: Flight, ctx: RequestContext) -> tuple[str, bool]:
        """``text`` with any engine error event rewritten to our error body; True if it had one."""
        before, failure = _split_engine_error(text)
        if failure is None:
            return text, False
        answer = self._error_answer(failure, ctx)
        flight.status = answer.status
        return before + error_event(answer.body, endpoint=ctx.endpoint), True

    def _error_answer(self, answer: EngineJSON, ctx: RequestContext) -> EngineJSON:
        """An engine's or upstream's error as our error body: client errors keep their message,
        server errors get ours (theirs goes to the log)."""
        fields = error_fields(answer.body) or ("", "server_error", None, None)
        message, kind, param, code = fields
        status = answer.status if answer.status >= 400 else 502
        raw = answer.body.get("error")
        err: dict[str, Any] = raw if isinstance(raw, dict) else {}
        extra = {k: err[k] for k in ("upstream", "upstream_status") if k in err}
        if status >= 500:
            log.warning("request_id=%s: engine error %d: %s", ctx.request_id, status, message[:300])
            message = _SERVER_MESSAGES.get(code or "", _SERVER_MESSAGES["engine_error"])
            if "upstream" in extra:
                message = f"The upstream {extra['upstream']!r} failed: {message}"
            kind, code, param = "server_error", code or "engine_error", None
        elif status == 429 and "upstream" in extra:
            # The upstream's own text can name its organization, project or limits: ours only.
            log.warning("request_id=%s: upstream 429: %s", ctx.request_id, message[:300])
            message = f"The upstream {extra['upstream']!r} is rate limiting requests; retry later."
            kind, code, param = "requests", "rate_limit_exceeded", None
        else:
            message = clean_message(message)  # vLLM's own 4xx text, without exception detail
            if kind in ("server_error", "error", "BadRequestError", "NotFoundError"):
                kind = "invalid_request_error"
        limit = self._config.max_error_message_chars
        return EngineJSON(
            status,
            error_body(message[:limit], kind, param=param, code=code, request_id=ctx.request_id, **extra),
        )

    def _error_event(self, exc: GatewayError, ctx: RequestContext) -> str:
        return error_event(
            exc.body(ctx.request_id, self._config.max_error_message_chars), endpoint=ctx.endpoint
        )

    async def _upstream_answer(self, handed: UpstreamAnswer, ctx: RequestContext, flight: Flight) -> Answer:
        """An upstream's answer (handoff or failover), under the same flight."""
        flight.backend = ctx.backend
        answer, stream = handed
        if answer is not None:
            flight.usage = usage_pair(answer.body.get("usage"))
            out = answer if answer.status < 400 else self._error_answer(answer, ctx)
            await flight.close(out.status)
            return Answer(json=out)
        assert stream is not None
        return Answer(stream=ResponseStream(self._observe(stream, flight, ctx), flight))

    async def _cached_answer(self, hit: UpstreamAnswer, ctx: RequestContext, flight: Flight) -> Answer:
        answer, stream = hit
        if answer is not None:
            await flight.close(answer.status)
            return Answer(json=answer)
        assert stream is not None
        return Answer(stream=ResponseStream(self._observe(stream, flight, ctx), flight))

    async def _observe(
        self, stream: AsyncIterator[str], flight: Flight, ctx: RequestContext
    ) -> AsyncIterator[str]:
        """Relay an upstream or cached stream, noting usage and rewriting error events."""
        try:
            async for text in stream:
                out, ended = self._in_band(text, flight, ctx)
                flight.note_chunk(out)
                yield out
                if ended:
                    return
        finally:
            await aclose_stream(stream)


def _strips_usage(ctx: RequestContext) -> bool:
    """A chat/completions stream whose client did not ask for usage: the engine is asked
    for it all the same, and it is taken out of what the client gets."""
    return (
        ctx.endpoint is not Endpoint.responses and bool(ctx.body.get("stream")) and not wants_usage(ctx.body)
    )


_SERVER_MESSAGES = {
    "engine_error": "The engine failed while processing your request.",
    "timeout": "The request ran past its time limit.",
    "upstream_error": "The upstream failed while processing your request.",
    "upstream_timeout": "The upstream did not answer in time.",
    "upstream_unavailable": "The upstream could not be reached.",
    "upstream_busy": "The upstream is at its concurrency limit.",
}


def _status_of(event: Mapping[str, Any]) -> int:
    """The HTTP status an in-band engine error stands for (502 when it does not say)."""
    err = event.get("error") if isinstance(event.get("error"), Mapping) else event
    for key in ("status", "code"):
        value = err.get(key) if isinstance(err, Mapping) else None
        if isinstance(value, int) and 400 <= value < 600:
            return value
    return 502


def _split_engine_error(text: str, min_status: int = 400) -> tuple[str, EngineJSON | None]:
    """``text`` up to its first in-band engine error of at least ``min_status``, and that
    error (None, with ``text`` whole, when it has none)."""
    if '"error"' not in text:
        return text, None
    kept: list[str] = []
    for event in text.split("\n\n"):
        if not event.strip():
            continue
        data = sse_data_events(event)
        is_error = bool(data) and ("error" in data[0] or data[0].get("type") == "error")
        if is_error and error_fields(data[0]) is not None and _status_of(data[0]) >= min_status:
            return "".join(kept), EngineJSON(_status_of(data[0]), data[0])
        kept.append(event + "\n\n")
    return text, None


class _Stalled(Exception):
    """The engine sent nothing within the model's idle timeout."""


@dataclass
class _EngineRun:
    """The engine request that serves a stream now (replaced when the stream migrates)."""

    first: EngineJSON | EngineSSE | None
    stream: AsyncIterator[EngineJSON | EngineSSE]
    splice: StreamSplice | None
    headers: dict[str, str]
    """Its routing headers: the router wrote the replica it chose into them."""


def _engine_message(answer: EngineJSON) -> str:
    fields = error_fields(answer.body)
    return fields[0] if fields else dumps(answer.body)[:300]


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
