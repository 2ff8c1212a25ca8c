"""The handoff decisions: per request, the local fleet or an upstream, and why.

:class:`HandoffPolicy` maps a virtual model to a local model by reasoning effort
(:meth:`~HandoffPolicy.resolve`), picks escalation, overflow or failover (and the
upstream) for a request, applies the tenant's handoff right, the upstream's model map,
its capacity and its budget, and declines out loud (``X-OSS-Serving-Handoff-Declined``).
The trip itself is :class:`~serving.gateway.handoff.relay.Relay`'s. :class:`NoHandoff`
serves everything locally.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from enum import StrEnum
from typing import Any

from serving.config import HandoffConfig, ModelConfig, VirtualModelConfig
from serving.engine.protocol import Endpoint
from serving.gateway.context import RequestContext
from serving.gateway.handoff.relay import Answer, Relay, Upstream
from serving.gateway.limits import fan_out, output_limit, prompt_tokens
from serving.gateway.tenants import HandoffRight, PriorityClass
from serving.metrics import HandoffMetrics
from serving.wire import BACKEND_HEADER, DECLINED_HEADER, MODEL_HEADER

__all__ = ["HandoffPolicy", "HandoffReason", "IsReady", "NoHandoff", "PredictedWait", "permitted"]

log = logging.getLogger("oss_serving.handoff")

_MARKED = frozenset({"1", "true", "yes", "cloud"})

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


class HandoffPolicy:
    """Decides, per request, local or upstream; its :class:`Relay` runs the upstream leg.

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
        self._tenant_label = tenant_label
        self._relay = Relay(metrics, request_timeout_s=request_timeout_s, tenant_label=tenant_label)
        for u in upstreams:
            for window, limit in u.budget.limits().items():
                if limit is not None:
                    metrics.budget_limit.labels(upstream=u.name, window=window).set(limit)

    @property
    def virtual_models(self) -> list[str]:
        return list(self._virtual)

    async def aclose(self) -> None:
        for u in self._upstreams.values():
            await u.aclose()

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

    # ------------------------------------------------------------ handing off (or declining)
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
                await self._relay.record_budget(upstream)
            return None
        answer = await self._relay.send(
            ctx,
            upstream,
            reason.value,
            client_model=client_model,
            upstream_model=upstream_model,
            reservation=reservation,
            fall_back=fall_back,
        )
        if answer is None:  # failed before the first byte, and may fall back
            self._decline(ctx, reason, name, "upstream-error")
        return answer


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
