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

The package, by responsibility:

- :mod:`~serving.gateway.handoff.budget`: the upstream budgets (:class:`UpstreamBudget`)
  and the counters they live on (:class:`RedisCounters`, :class:`MemoryCounters`);
- :mod:`~serving.gateway.handoff.policy`: the decisions (:class:`HandoffPolicy`: virtual
  models, escalation, overflow, failover, tenant rights, declines) and :class:`NoHandoff`;
- :mod:`~serving.gateway.handoff.relay`: the upstream leg (:class:`Relay`: sending, the
  stream's ``model`` and usage rewriting, the accounting of one trip) and :class:`Upstream`.

The gateway builder (``serving/gateway/build.py``) wires them.

Plain async Python: no HTTP (the upstream is an :class:`EngineClient`) and no Ray.
"""

from __future__ import annotations

from serving.gateway.handoff.budget import (
    Counters,
    MemoryCounters,
    RedisCounters,
    Reservation,
    UpstreamBudget,
)
from serving.gateway.handoff.policy import HandoffPolicy, HandoffReason, NoHandoff, permitted
from serving.gateway.handoff.relay import Answer, Relay, Upstream

__all__ = [
    "Answer",
    "Counters",
    "HandoffPolicy",
    "HandoffReason",
    "MemoryCounters",
    "NoHandoff",
    "RedisCounters",
    "Relay",
    "Reservation",
    "Upstream",
    "UpstreamBudget",
    "permitted",
]
