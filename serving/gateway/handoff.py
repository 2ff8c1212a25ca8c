"""Handoff: local first, an upstream (a stronger cloud model) when policy says so.

Three policies, evaluated by the gateway after authentication and before admission:

- **overflow**: the local model has no ready replica, or its predicted queue wait exceeds
  the request's deadline or ``handoff.overflow.max_predicted_wait_s``;
- **escalation**: the client named a virtual model (``auto``): its rule picks a local
  model by reasoning effort, or the upstream when the client marks the request
  (``X-Oss-Escalate: 1``) or when the prompt cannot fit the local context;
- **failover**: the local engine failed before the first token.

Governance comes first: a tenant with ``handoff: never`` is never handed off, one with
``overflow-only`` only for overflow and failover (the local fleet could not serve it),
one with ``allowed`` for all three. A request that may not, or cannot, be handed off
(budget spent, upstream busy, no upstream model) is served locally, and the answer says
so in ``X-OSS-Serving-Handoff-Declined``: never a silent handoff, never a silent refusal.

Every answer names its backend (``X-OSS-Serving-Backend``: ``local`` or the upstream) and
the model that produced it (``X-OSS-Serving-Model``); a handed-off answer keeps the
``model`` field the client asked for. Upstream answers pass through in OpenAI's shapes
(reasoning fields, tool calls, Responses events); only ``model`` is rewritten and usage
is read for the budget.

Plain async Python: no HTTP (the upstream is an :class:`EngineClient`) and no Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from serving.config import HandoffConfig, ModelConfig, UpstreamConfig, VirtualModelConfig
from serving.engine.protocol import Endpoint, EngineClient, EngineJSON, EngineSSE
from serving.engine.upstream import UpstreamError, upstream_error_body
from serving.gateway.context import RequestContext
from serving.gateway.limits import UsageText, fan_out, output_limit, prompt_tokens
from serving.gateway.tenants import HandoffRight, PriorityClass
from serving.metrics import HandoffMetrics
from serving.wire import (
    BACKEND_HEADER,
    DECLINED_HEADER,
    HANDOFF_HEADER,
    MODEL_HEADER,
    REQUEST_ID_HEADER,
    aclose_quietly,
    usage_pair,
)

__all__ = [
    "Counters",
    "HandoffPolicy",
    "HandoffReason",
    "MemoryCounters",
    "NoHandoff",
    "RedisCounters",
    "Upstream",
    "UpstreamBudget",
]

log = logging.getLogger("oss_serving.handoff")

_MARKED = frozenset({"1", "true", "yes", "cloud"})

Answer = tuple[EngineJSON | None, AsyncIterator[str] | None]
PredictedWait = Callable[[str, PriorityClass], Awaitable[float]]
"""Seconds a new request for a model, of a priority class, would wait in the queue now."""
IsReady = Callable[[str], bool]


class HandoffReason(StrEnum):
    """Why a request goes upstream (the ``reason`` metric label)."""

    overflow = "overflow"
    not_ready = "not_ready"
    escalation = "escalation"
    context_length = "context_length"
    failover = "failover"

    @property
    def capacity(self) -> bool:
        """The local fleet could not serve it (allowed for ``overflow-only`` tenants)."""
        return self in (HandoffReason.overflow, HandoffReason.not_ready, HandoffReason.failover)


def permitted(right: HandoffRight, reason: HandoffReason) -> bool:
    """Whether a tenant with ``right`` may be handed off for ``reason``."""
    if right is HandoffRight.allowed:
        return True
    return right is HandoffRight.overflow_only and reason.capacity


# --------------------------------------------------------------------------- budget
class Counters(Protocol):
    """Counters shared by the gateway replicas (Redis), or local to one (memory)."""

    async def try_add(self, adds: Sequence[tuple[str, int, int | None, int]]) -> bool:
        """Add every ``(key, amount, limit, ttl_s)`` if none would exceed its limit; else none."""

    async def add(self, key: str, amount: int, ttl_s: int) -> None:
        """Add ``amount`` (may be negative) to ``key``."""

    async def get_many(self, keys: Sequence[str]) -> list[int]:
        """Current values (0 for missing keys)."""


class MemoryCounters:
    """Counters in this process (a single gateway, or Redis unreachable)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._values: dict[str, tuple[int, float]] = {}
        self._clock = clock

    def _get(self, key: str) -> int:
        value, expires = self._values.get(key, (0, math.inf))
        if expires <= self._clock():
            self._values.pop(key, None)
            return 0
        return value

    async def try_add(self, adds: Sequence[tuple[str, int, int | None, int]]) -> bool:
        if any(limit is not None and self._get(key) + amount > limit for key, amount, limit, _ in adds):
            return False
        for key, amount, _, ttl in adds:
            await self.add(key, amount, ttl)
        return True

    async def add(self, key: str, amount: int, ttl_s: int) -> None:
        current = self._get(key)
        expires = self._values.get(key, (0, self._clock() + ttl_s))[1]
        self._values[key] = (current + amount, expires)

    async def get_many(self, keys: Sequence[str]) -> list[int]:
        return [self._get(k) for k in keys]


_TRY_ADD = """
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[3 * i - 1])
  if limit >= 0 and (tonumber(redis.call('GET', key) or '0') + tonumber(ARGV[3 * i - 2])) > limit then
    return 0
  end
end
for i, key in ipairs(KEYS) do
  redis.call('INCRBY', key, ARGV[3 * i - 2])
  if redis.call('TTL', key) < 0 then redis.call('EXPIRE', key, ARGV[3 * i]) end
end
return 1
"""


class RedisCounters:
    """Counters in Redis, checked and added atomically (one Lua script); every gateway
    replica shares them.

    Fail closed: while Redis cannot be reached (the gateway's Redis circuit breaker is
    open, or a call failed or ran past its budget; ``redis_guard.py``) :meth:`try_add`
    adds nothing and answers False, so a handoff that needs the budget is declined and
    served locally. Nothing is counted in process: the replicas together never spend more
    than the budget, and a Redis blip never restarts the monthly cap. :meth:`add` (a
    usage correction) is dropped and logged; :meth:`get_many` answers the values last
    read. :attr:`reachable` says whether the last call reached Redis (read it right after
    the call, before any ``await``: it tells a spent budget from an unreachable one).
    """

    LAST_READ_KEYS = 256
    """Values kept for :meth:`get_many` to answer while Redis is away."""

    def __init__(self, redis: Any) -> None:
        from serving.gateway.redis_guard import guard_of

        self._redis = redis
        self._script = redis.register_script(_TRY_ADD)
        self._guard = guard_of(redis)
        self._last: dict[str, int] = {}
        self.reachable = True
        """Whether the last call reached Redis."""

    def _unreachable(self, what: str, exc: Exception) -> None:
        if self.reachable:
            log.warning("handoff budget: Redis unreachable (%s); %s", type(exc).__name__, what)
        self.reachable = False
        if self._guard is not None:
            self._guard.fallback("upstream_budget")

    async def try_add(self, adds: Sequence[tuple[str, int, int | None, int]]) -> bool:
        args: list[int] = []
        for _, amount, limit, ttl in adds:
            args += [amount, -1 if limit is None else limit, ttl]
        try:
            added = bool(await self._script(keys=[k for k, *_ in adds], args=args))
        except Exception as exc:
            self._unreachable("handoffs that need the budget are declined", exc)
            return False
        self.reachable = True
        return added

    async def add(self, key: str, amount: int, ttl_s: int) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incrby(key, amount)
                pipe.expire(key, ttl_s, nx=True)
                await pipe.execute()
        except Exception as exc:
            self._unreachable(f"a correction of {amount} to {key} is lost", exc)
            return
        self.reachable = True

    async def get_many(self, keys: Sequence[str]) -> list[int]:
        try:
            values = await self._redis.mget(list(keys))
        except Exception as exc:
            self._unreachable("budget gauges show the values last read", exc)
            return [self._last.get(k, 0) for k in keys]
        self.reachable = True
        found = [int(v) if v is not None else 0 for v in values]
        for key, value in zip(keys, found, strict=True):
            self._last.pop(key, None)
            self._last[key] = value
        while len(self._last) > self.LAST_READ_KEYS:
            self._last.pop(next(iter(self._last)))
        return found


@dataclass(frozen=True)
class Reservation:
    """What one handoff charged to the budget before it ran."""

    minute: str
    month: str
    tokens: int


class UpstreamBudget:
    """Requests and tokens per calendar minute, tokens per calendar month (UTC).

    A handoff reserves one request and its estimated tokens up front (so concurrent
    requests cannot overspend together), then :meth:`settle` corrects the tokens to the
    upstream's reported usage.
    """

    MINUTE_TTL_S = 120
    MONTH_TTL_S = 32 * 24 * 3600

    def __init__(
        self,
        config: UpstreamConfig,
        counters: Counters,
        *,
        key_prefix: str = "oss",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._counters = counters
        self._prefix = f"{key_prefix}:handoff:{config.name}"
        self._clock = clock

    def _windows(self) -> tuple[str, str]:
        now = datetime.fromtimestamp(self._clock(), tz=UTC)
        return now.strftime("%Y%m%d%H%M"), now.strftime("%Y%m")

    def _keys(self, minute: str, month: str) -> tuple[str, str, str]:
        p = self._prefix
        return f"{p}:req:{minute}", f"{p}:tok:{minute}", f"{p}:month:{month}"

    async def reserve(self, tokens: int) -> Reservation | None:
        """Charge one request and ``tokens``; None when a budget would be exceeded."""
        c = self.config
        minute, month = self._windows()
        req, tok, mon = self._keys(minute, month)
        ok = await self._counters.try_add(
            [
                (req, 1, c.requests_per_minute, self.MINUTE_TTL_S),
                (tok, tokens, c.tokens_per_minute, self.MINUTE_TTL_S),
                (mon, tokens, c.monthly_token_cap, self.MONTH_TTL_S),
            ]
        )
        return Reservation(minute, month, tokens) if ok else None

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Correct the reservation to the tokens the upstream reported."""
        delta = used_tokens - reservation.tokens
        if delta:
            _, tok, mon = self._keys(reservation.minute, reservation.month)
            await self._counters.add(tok, delta, self.MINUTE_TTL_S)
            await self._counters.add(mon, delta, self.MONTH_TTL_S)

    @property
    def available(self) -> bool:
        """False when the last budget call could not reach Redis (the budget fails closed)."""
        return bool(getattr(self._counters, "reachable", True))

    async def used(self) -> dict[str, int]:
        """This minute's requests and tokens, this month's tokens."""
        values = await self._counters.get_many(self._keys(*self._windows()))
        return dict(zip(("minute_requests", "minute_tokens", "month_tokens"), values, strict=True))

    def limits(self) -> dict[str, int | None]:
        c = self.config
        return {
            "minute_requests": c.requests_per_minute,
            "minute_tokens": c.tokens_per_minute,
            "month_tokens": c.monthly_token_cap,
        }


# --------------------------------------------------------------------------- policy
@dataclass
class Upstream:
    """One configured upstream: its client and its budget."""

    config: UpstreamConfig
    client: EngineClient
    budget: UpstreamBudget

    @property
    def name(self) -> str:
        return self.config.name

    def has_capacity(self) -> bool:
        check = getattr(self.client, "has_capacity", None)
        return bool(check()) if check is not None else True


@dataclass
class _Trip:
    """One handoff on its way: for the relay's accounting and the log line."""

    ctx: RequestContext
    upstream: Upstream
    reason: HandoffReason
    client_model: str
    upstream_model: str
    reservation: Reservation
    started: float
    strip_usage: bool
    status: int = 200
    usage: tuple[int, int] | None = None
    billed: bool = False
    """The upstream may have billed it (it was sent, and not answered with an error): without
    usage, the reservation stays charged to the budget."""
    first_byte: float | None = None
    done: bool = False
    labels: dict[str, str] = field(default_factory=dict)


class HandoffPolicy:
    """Decides, per request, local or upstream; runs the upstream leg.

    ``is_ready`` and ``predicted_wait`` come from the gateway (engine health, admission);
    ``tenant_label`` bounds the tenant metric label.
    """

    def __init__(
        self,
        config: HandoffConfig,
        upstreams: Sequence[Upstream],
        models: Mapping[str, ModelConfig],
        metrics: HandoffMetrics,
        *,
        is_ready: IsReady,
        predicted_wait: PredictedWait | None = None,
        request_timeout_s: float = 600.0,
        tenant_label: Callable[[str], str] = lambda tenant: tenant,
    ) -> None:
        self._config = config
        self._upstreams = {u.name: u for u in upstreams}
        self._models = dict(models)
        self._virtual = {v.name: v for v in config.virtual_models}
        self._metrics = metrics
        self._is_ready = is_ready
        self._predicted_wait = predicted_wait
        self._request_timeout_s = request_timeout_s
        self._tenant_label = tenant_label
        for u in upstreams:
            for window, limit in u.budget.limits().items():
                if limit is not None:
                    metrics.budget_limit.labels(upstream=u.name, window=window).set(limit)

    @property
    def virtual_models(self) -> list[str]:
        return list(self._virtual)

    async def aclose(self) -> None:
        for u in self._upstreams.values():
            aclose = getattr(u.client, "aclose", None)
            if aclose is not None:
                await aclose()

    # ------------------------------------------------------------ gateway hooks
    def resolve(self, ctx: RequestContext) -> None:
        """A virtual model becomes the local model its rule picks (by reasoning effort).

        Called before authentication and the model lookup; the escalation itself is
        decided in :meth:`before_admission`, once the tenant is known.
        """
        rule = self._virtual.get(ctx.model)
        if rule is None:
            return
        target = getattr(rule, _effort(ctx, rule))
        ctx.virtual_model = ctx.model
        ctx.model = target
        ctx.body = {**ctx.body, "model": target}

    async def before_admission(self, ctx: RequestContext) -> Answer | None:
        """Escalation and overflow. Returns the upstream's answer, or None to serve locally."""
        ctx.response_headers[BACKEND_HEADER] = "local"
        ctx.response_headers[MODEL_HEADER] = ctx.model
        if ctx.model not in self._models:
            return None  # unknown models get their 404 from the gateway
        decision = self._escalation(ctx) or await self._overflow(ctx)
        if decision is None:
            return None
        reason, upstream = decision
        return await self._hand_off(
            ctx, reason, upstream, fall_back=reason.capacity and reason is not HandoffReason.failover
        )

    async def failover(self, ctx: RequestContext) -> Answer | None:
        """The local engine failed before the first token: the upstream's answer, or None."""
        if not self._config.failover or ctx.backend != "local":
            return None
        upstream = self._config.upstream
        if upstream is None:
            return None
        return await self._hand_off(ctx, HandoffReason.failover, upstream, fall_back=True)

    # ------------------------------------------------------------ decisions
    def _escalation(self, ctx: RequestContext) -> tuple[HandoffReason, str] | None:
        rule = self._virtual.get(ctx.virtual_model or "")
        if rule is None:
            return None
        upstream = rule.upstream or self._config.upstream
        if upstream is None:
            return None
        if ctx.headers.get(self._config.escalate_header, "").strip().lower() in _MARKED:
            return HandoffReason.escalation, upstream
        context = rule.context_tokens or self._models[ctx.model].context_tokens
        if context and self._context_tokens(ctx.body) > int(context):
            return HandoffReason.context_length, upstream
        return None

    async def _overflow(self, ctx: RequestContext) -> tuple[HandoffReason, str] | None:
        overflow = self._config.overflow
        upstream = self._config.upstream
        if not overflow.enabled or upstream is None:
            return None
        if not self._is_ready(ctx.model):
            return (HandoffReason.not_ready, upstream) if overflow.when_not_ready else None
        if self._predicted_wait is None:
            return None
        limits = [x for x in (overflow.max_predicted_wait_s, self._time_left_s(ctx)) if x is not None]
        if not limits:
            return None
        try:
            wait = await self._predicted_wait(ctx.model, ctx.tenant.priority)
        except Exception as exc:  # no prediction, no overflow: the queue decides
            log.warning("handoff: no queue wait prediction for %s: %s", ctx.model, type(exc).__name__)
            return None
        return (HandoffReason.overflow, upstream) if wait > min(limits) else None

    def _time_left_s(self, ctx: RequestContext) -> float | None:
        """Seconds until the request's start deadline (the pipeline parsed it into ``ctx``)."""
        if ctx.deadline is not None:
            return ctx.deadline - time.monotonic()
        return None

    def estimate_tokens(self, body: Mapping[str, Any]) -> int:
        """The budget's reservation: prompt tokens estimated from characters, plus the output
        limit (the gateway filled it in when the client named none) times the sequences the
        request runs (``max(n, best_of) x prompts``)."""
        choices, prompts = fan_out(body)
        output = (output_limit(body) or 0) * choices * prompts
        return prompt_tokens(body, self._config.chars_per_token) + output

    def _context_tokens(self, body: Mapping[str, Any]) -> int:
        """What one sequence needs of a context: the prompt plus its output limit."""
        return prompt_tokens(body, self._config.chars_per_token) + (output_limit(body) or 0)

    # ------------------------------------------------------------ the upstream leg
    def _decline(self, ctx: RequestContext, reason: HandoffReason, upstream: str, cause: str) -> None:
        tenant = self._tenant_label(ctx.tenant.id)
        self._metrics.declined.labels(
            reason=reason.value, upstream=upstream, tenant=tenant, cause=cause
        ).inc()
        ctx.response_headers[DECLINED_HEADER] = f"{reason.value}; {cause}"
        log.info(
            "handoff declined: tenant=%s reason=%s upstream=%s cause=%s",
            ctx.tenant.id,
            reason,
            upstream,
            cause,
        )

    async def _hand_off(
        self, ctx: RequestContext, reason: HandoffReason, name: str, *, fall_back: bool
    ) -> Answer | None:
        """Send the request upstream. None: serve it locally (declined, or failed and
        ``fall_back``); otherwise the answer, an upstream error included."""
        if not permitted(ctx.tenant.handoff, reason):
            self._decline(ctx, reason, name, "tenant-policy")
            return None
        upstream = self._upstreams[name]
        client_model = ctx.virtual_model or ctx.model
        upstream_model = upstream.config.models.get(client_model) or upstream.config.upstream_model(ctx.model)
        if upstream_model is None:
            self._decline(ctx, reason, name, "no-upstream-model")
            return None
        if not upstream.has_capacity():
            self._decline(ctx, reason, name, "upstream-busy")
            return None
        reservation = await upstream.budget.reserve(self.estimate_tokens(ctx.body))
        if reservation is None:
            cause = "budget" if upstream.budget.available else "budget-unavailable"
            self._decline(ctx, reason, name, cause)
            if upstream.budget.available:
                await self._record_budget(upstream)
            return None
        body, strip_usage = _upstream_body(ctx.endpoint, ctx.body, upstream_model)
        trip = _Trip(
            ctx=ctx,
            upstream=upstream,
            reason=reason,
            client_model=client_model,
            upstream_model=upstream_model,
            reservation=reservation,
            started=time.perf_counter(),
            strip_usage=strip_usage,
            labels={"upstream": name, "tenant": self._tenant_label(ctx.tenant.id)},
        )
        self._metrics.in_flight.labels(upstream=name).inc()
        stream = upstream.client.generate(ctx.endpoint, body, {REQUEST_ID_HEADER: ctx.request_id})
        try:
            first = await anext(stream)
        except (UpstreamError, StopAsyncIteration) as exc:
            failure = exc if isinstance(exc, UpstreamError) else None
            kind = failure.code if failure is not None else "empty"
            await aclose_quietly(stream)
            trip.status = failure.status if failure is not None else 502
            trip.billed = failure is not None and failure.billable  # e.g. timed out once sent
            await self._end(trip, error_kind=kind)
            if fall_back:
                self._decline(ctx, reason, name, "upstream-error")
                return None
            answer = failure.as_engine_json() if failure is not None else _empty_answer(name)
            return self._mark(ctx, trip, answer), None
        except BaseException:
            await aclose_quietly(stream)
            trip.status, trip.billed = 499, True  # it may be running upstream already
            await self._end(trip, error_kind="cancelled")
            raise
        trip.first_byte = time.perf_counter()
        trip.billed = not (isinstance(first, EngineJSON) and first.status >= 400)
        self._metrics.time_to_first_byte.labels(upstream=name).observe(trip.first_byte - trip.started)
        if isinstance(first, EngineJSON):
            await aclose_quietly(stream)
            trip.status = first.status
            if first.status >= 400:
                await self._end(trip, error_kind=f"status_{first.status // 100}xx")
                if fall_back and (first.status >= 500 or first.status == 429):
                    self._decline(ctx, reason, name, "upstream-error")
                    return None
                return self._mark(ctx, trip, first), None
            trip.usage = usage_pair(first.body.get("usage"))
            body_out = _rewrite_model(first.body, client_model)
            await self._end(trip)
            return self._mark(ctx, trip, EngineJSON(first.status, body_out)), None
        self._mark(ctx, trip, None)
        return None, self._relay(trip, first, stream)

    def _mark(self, ctx: RequestContext, trip: _Trip, answer: EngineJSON | None) -> EngineJSON | None:
        ctx.backend = trip.upstream.name
        ctx.response_headers.pop(DECLINED_HEADER, None)
        ctx.response_headers[BACKEND_HEADER] = trip.upstream.name
        ctx.response_headers[MODEL_HEADER] = trip.upstream_model
        ctx.response_headers[HANDOFF_HEADER] = trip.reason.value
        return answer

    async def _relay(
        self, trip: _Trip, first: EngineSSE, stream: AsyncIterator[EngineJSON | EngineSSE]
    ) -> AsyncIterator[str]:
        deadline = trip.started + self._request_timeout_s
        error_kind: str | None = None
        try:
            yield self._rewrite_events(trip, first.text)
            while True:
                try:
                    async with asyncio.timeout(max(deadline - time.perf_counter(), 0.0)):
                        item = await anext(stream)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    trip.status, error_kind = 504, "timeout"
                    body = upstream_error_body(
                        trip.upstream.name, None, "the request ran past its time limit", code="timeout"
                    )
                    yield f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
                    break
                if isinstance(item, EngineJSON):  # contract: not after the first event
                    trip.status, error_kind = item.status, "stream"
                    yield f"data: {json.dumps(item.body, separators=(',', ':'))}\n\n"
                    break
                text = self._rewrite_events(trip, item.text)
                if '"upstream_status"' in text and '"error"' in text:
                    trip.status, error_kind = 502, "stream"
                if text or isinstance(text, UsageText):
                    yield text
        except (asyncio.CancelledError, GeneratorExit):
            trip.status, error_kind = 499, "cancelled"
            raise
        finally:
            await aclose_quietly(stream)
            await self._end(trip, error_kind=error_kind)

    def _rewrite_events(self, trip: _Trip, text: str) -> str:
        """``model`` becomes the client's; usage is read (and dropped if we asked for it: the
        text then carries it for the gateway's accounting, as a :class:`UsageText`)."""
        out: list[str] = []
        stripped: tuple[int, int] | None = None
        for event in text.split("\n\n"):
            if not event.strip():
                continue
            lines = event.split("\n")
            for i, line in enumerate(lines):
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                try:
                    data = json.loads(line[5:])
                except ValueError:
                    continue
                if not isinstance(data, dict):
                    continue
                usage = usage_pair(data.get("usage")) or usage_pair((data.get("response") or {}).get("usage"))
                if usage is not None:
                    trip.usage = usage
                    if trip.strip_usage:
                        stripped = usage
                        if data.get("choices") == []:
                            lines = []  # the usage-only chunk we asked for on the client's behalf
                            break
                        data.pop("usage", None)
                data = _rewrite_model(data, trip.client_model)
                lines[i] = "data: " + json.dumps(data, separators=(",", ":"))
            if lines:
                out.append("\n".join(lines) + "\n\n")
        return UsageText("".join(out), stripped) if stripped is not None else "".join(out)

    async def _end(self, trip: _Trip, *, error_kind: str | None = None) -> None:
        """Account for one handoff once: metrics, budget, log line."""
        if trip.done:
            return
        trip.done = True
        m, name = self._metrics, trip.upstream.name
        m.in_flight.labels(upstream=name).dec()
        elapsed = time.perf_counter() - trip.started
        m.requests.labels(upstream=name, endpoint=trip.ctx.endpoint.value, status=str(trip.status)).inc()
        m.latency.labels(upstream=name).observe(elapsed)
        if error_kind is not None:
            m.errors.labels(upstream=name, kind=error_kind).inc()
        else:
            m.handoffs.labels(reason=trip.reason.value, **trip.labels).inc()
        prompt, completion = trip.usage or (0, 0)
        if trip.usage is not None:
            m.tokens.labels(kind="prompt", **trip.labels).inc(prompt)
            m.tokens.labels(kind="completion", **trip.labels).inc(completion)
        # What the upstream billed: its usage; without it the reservation, once it may have
        # run (sent and not refused, even when we gave up waiting); nothing otherwise.
        billed = prompt + completion
        if trip.usage is None:
            billed = trip.reservation.tokens if trip.billed else 0
        with contextlib.suppress(Exception):
            settle = trip.upstream.budget.settle(trip.reservation, billed)
            await asyncio.shield(settle)
            await self._record_budget(trip.upstream)
        log.info(
            "handoff tenant=%s reason=%s upstream=%s model=%s status=%d prompt_tokens=%d "
            "completion_tokens=%d %.1fms",
            trip.ctx.tenant.id,
            trip.reason,
            name,
            trip.upstream_model,
            trip.status,
            prompt,
            completion,
            1000 * elapsed,
        )

    async def _record_budget(self, upstream: Upstream) -> None:
        for window, used in (await upstream.budget.used()).items():
            self._metrics.budget_used.labels(upstream=upstream.name, window=window).set(used)


class NoHandoff:
    """Handoff turned off (no upstream, no virtual model): every request is served locally."""

    def resolve(self, ctx: RequestContext) -> None:
        return None

    async def before_admission(self, ctx: RequestContext) -> Answer | None:
        return None

    async def failover(self, ctx: RequestContext) -> Answer | None:
        return None

    async def aclose(self) -> None:
        return None


# --------------------------------------------------------------------------- helpers
def _effort(ctx: RequestContext, rule: VirtualModelConfig) -> str:
    if ctx.endpoint is Endpoint.responses:
        reasoning = ctx.body.get("reasoning")
        raw = reasoning.get("effort") if isinstance(reasoning, dict) else None
    else:
        raw = ctx.body.get("reasoning_effort")
    effort = str(raw).lower() if raw is not None else rule.default_effort
    if effort in ("minimal", "none"):
        return "low"
    return effort if effort in ("low", "medium", "high") else rule.default_effort


def _upstream_body(endpoint: Endpoint, body: Mapping[str, Any], model: str) -> tuple[dict[str, Any], bool]:
    """The body for the upstream; asks streamed chat/completions for usage (stripped later
    unless the client asked for it too)."""
    out = {**body, "model": model}
    strip = False
    if endpoint is not Endpoint.responses and body.get("stream"):
        options = dict(body.get("stream_options") or {})
        if not options.get("include_usage"):
            options["include_usage"] = True
            out["stream_options"] = options
            strip = True
    return out, strip


def _rewrite_model(data: dict[str, Any], model: str) -> dict[str, Any]:
    if "model" in data:
        data = {**data, "model": model}
    response = data.get("response")
    if isinstance(response, dict) and "model" in response:
        data = {**data, "response": {**response, "model": model}}
    return data


def _empty_answer(upstream: str) -> EngineJSON:
    return EngineJSON(
        502, upstream_error_body(upstream, None, "the upstream closed the request without an answer")
    )
