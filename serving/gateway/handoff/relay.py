"""The upstream leg of a handoff: send the request, relay the answer, account for the trip.

:class:`Relay` sends a request the policy has decided to hand off (and reserved budget
for) to the upstream's :class:`EngineClient`, rewrites ``model`` in the answer (JSON, or
SSE events as they pass) back to the one the client asked for, reads the upstream's
usage, and accounts for each trip once (metrics, budget settlement, log line), on every
path: an answer, an upstream error, a time limit, a client that went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from serving.config import UpstreamConfig
from serving.engine.protocol import Endpoint, EngineClient, EngineJSON, EngineSSE
from serving.engine.upstream import UpstreamError, upstream_error_body
from serving.gateway.context import RequestContext
from serving.gateway.handoff.budget import Reservation, UpstreamBudget
from serving.gateway.limits import UsageText
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

__all__ = ["Answer", "Relay", "Upstream"]

log = logging.getLogger("oss_serving.handoff")

Answer = tuple[EngineJSON | None, AsyncIterator[str] | None]
"""A JSON answer, or a stream of SSE text (exactly one of the two is set)."""


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

    async def aclose(self) -> None:
        """Close the client (its HTTP connections), if it has anything to close."""
        aclose = getattr(self.client, "aclose", None)
        if aclose is not None:
            await aclose()


@dataclass
class _Trip:
    """One handoff on its way: for the relay's accounting and the log line."""

    ctx: RequestContext
    upstream: Upstream
    reason: str
    """Why it went upstream (the ``reason`` metric label, a ``HandoffReason`` value)."""
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


class Relay:
    """Runs the upstream leg of the handoffs the policy decided on.

    ``tenant_label`` bounds the tenant metric label; ``request_timeout_s`` limits a
    streamed answer from its start.
    """

    def __init__(
        self,
        metrics: HandoffMetrics,
        *,
        request_timeout_s: float = 600.0,
        tenant_label: Callable[[str], str] = lambda tenant: tenant,
    ) -> None:
        self._metrics = metrics
        self._request_timeout_s = request_timeout_s
        self._tenant_label = tenant_label

    async def send(
        self,
        ctx: RequestContext,
        upstream: Upstream,
        reason: str,
        *,
        client_model: str,
        upstream_model: str,
        reservation: Reservation,
        fall_back: bool,
    ) -> Answer | None:
        """Send the request upstream (its budget already reserved). None: it failed before
        the first byte and ``fall_back`` (the caller serves it locally); otherwise the
        answer, an upstream error included."""
        name = upstream.name
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
        ctx.response_headers[HANDOFF_HEADER] = trip.reason
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
            m.handoffs.labels(reason=trip.reason, **trip.labels).inc()
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
            await self.record_budget(trip.upstream)
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

    async def record_budget(self, upstream: Upstream) -> None:
        """Set the budget gauges to what the upstream's budget has used."""
        for window, used in (await upstream.budget.used()).items():
            self._metrics.budget_used.labels(upstream=upstream.name, window=window).set(used)


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
