"""Gateway metrics: one registry per gateway, every name prefixed ``oss_serving_``.

Labels are bounded: ``model`` is one of the configured models or ``unknown``,
``endpoint`` one of the OpenAI routes, ``status`` an HTTP status code. Never a raw
user-supplied string.

The registry is served at the gateway's own ``/metrics``. On a cluster,
:func:`export_through_ray` also mirrors every metric into a Ray metric
(``ray.serve.metrics``): Ray's metrics agent on the node exports it as ``ray_<name>``
with the replica's ``deployment``, ``replica`` and ``application`` tags, so each gateway
replica is its own series, scraped from the metrics port of the pod it runs in (the
Helm chart's PodMonitor renames them back to ``oss_serving_*``). Through the
load-balanced HTTP port instead, each scrape would reach any replica and the series
would mix them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase

__all__ = [
    "CONTENT_TYPE_LATEST",
    "UNKNOWN_MODEL",
    "GatewayMetrics",
    "HandoffMetrics",
    "Kind",
    "RayMetricFactory",
    "export_through_ray",
]

UNKNOWN_MODEL = "unknown"
PREFIX = "oss_serving_"


class GatewayMetrics:
    """The gateway's Prometheus metrics, in a registry of its own."""

    def __init__(self, models: Sequence[str], buckets_s: Sequence[float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._models = frozenset(models)
        self.requests = Counter(
            PREFIX + "requests",
            "Requests answered by the gateway, by model, endpoint and HTTP status.",
            ["model", "endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            PREFIX + "request_latency_seconds",
            "Time from request arrival at the gateway to the last byte sent.",
            ["model", "endpoint"],
            buckets=buckets_s,
            registry=self.registry,
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from request arrival at the gateway to the first streamed chunk from the engine.",
            ["model", "endpoint"],
            buckets=buckets_s,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            PREFIX + "requests_in_flight",
            "Requests the gateway is serving right now.",
            ["model", "endpoint"],
            registry=self.registry,
        )
        self.model_ready = Gauge(
            PREFIX + "model_ready",
            "1 when at least one engine replica of the model answers its health check.",
            ["model"],
            registry=self.registry,
        )
        self.redis_up = Gauge(
            PREFIX + "redis_up",
            "1 when the gateway reaches Redis.",
            registry=self.registry,
        )
        self.redis_breaker_open = Gauge(
            PREFIX + "redis_breaker_open",
            "1 while this gateway's Redis circuit breaker is open: no feature calls Redis, each "
            "takes its fallback (see serving/gateway/redis_guard.py).",
            registry=self.registry,
        )
        self.redis_fallbacks = Counter(
            PREFIX + "redis_fallbacks",
            "Calls for which a feature took its fallback because Redis was unreachable, slow or "
            "its breaker open, by feature (rate_limit, upstream_budget, response_cache, prefix_index).",
            ["feature"],
            registry=self.registry,
        )
        # Prompt caching (prefix-affinity routing, response cache).
        self.prefix_affinity = Counter(
            PREFIX + "prefix_affinity",
            "Prefix index lookups: hit when a replica holds a prefix of the prompt or its affinity key.",
            ["model", "result"],
            registry=self.registry,
        )
        self.prefix_index_errors = Counter(
            PREFIX + "prefix_index_errors",
            "Prefix index lookups or updates that failed (Redis unreachable); routing fell back to load.",
            registry=self.registry,
        )
        self.routing_decisions = Counter(
            PREFIX + "routing_decisions",
            "Engine replica choices by reason: affinity, load (load beat affinity), fallback, round_robin.",
            ["model", "reason"],
            registry=self.registry,
        )
        self.response_cache = Counter(
            PREFIX + "response_cache_lookups",
            "Response cache lookups by result: hit, miss, skip (asked for but not deterministic).",
            ["model", "result"],
            registry=self.registry,
        )
        self.response_cache_hits = Counter(
            PREFIX + "response_cache_hits",
            "Requests answered from the response cache.",
            ["model"],
            registry=self.registry,
        )
        self.response_cache_bytes = Gauge(
            PREFIX + "response_cache_bytes",
            "Bytes held by the response cache, as last seen by this gateway.",
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens",
            "Prompt tokens of answered requests, from the engine's usage.",
            ["model"],
            registry=self.registry,
        )
        self.cached_prompt_tokens = Counter(
            PREFIX + "prompt_cached_tokens",
            "Prompt tokens the engine served from its prefix cache "
            "(usage.prompt_tokens_details.cached_tokens).",
            ["model"],
            registry=self.registry,
        )

        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Time per output token after the first, as the gateway sees the stream (streams with usage).",
            ["model"],
            buckets=[0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1],
            registry=self.registry,
        )
        self.output_tokens = Counter(
            PREFIX + "output_tokens",
            "Output tokens served, by model (from the engines' usage).",
            ["model"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            PREFIX + "queue_depth",
            "Requests waiting for admission, by model and priority class (the shared Redis queue).",
            ["model", "priority"],
            registry=self.registry,
        )
        self.queue_in_use = Gauge(
            PREFIX + "queue_leases",
            "Granted leases (requests running on the engines), by model.",
            ["model"],
            registry=self.registry,
        )
        self.queue_capacity = Gauge(
            PREFIX + "queue_capacity",
            "Concurrent requests the model's engines are given, by model.",
            ["model"],
            registry=self.registry,
        )
        self.queue_degraded = Gauge(
            PREFIX + "queue_degraded",
            "1 while Redis is unreachable and this gateway admits with its local queue.",
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            PREFIX + "queue_wait_seconds",
            "Time from arrival to admission.",
            ["model", "priority"],
            buckets=[0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
            registry=self.registry,
        )
        self.admissions = Counter(
            PREFIX + "admissions",
            "Requests admitted, by model and priority class.",
            ["model", "priority"],
            registry=self.registry,
        )
        self.rejections = Counter(
            PREFIX + "rejections",
            "Requests rejected by admission or limits, by model and reason.",
            ["model", "reason"],
            registry=self.registry,
        )
        self.leases_expired = Counter(
            PREFIX + "leases_expired",
            "Leases that expired without being released (their gateway died), by model.",
            ["model"],
            registry=self.registry,
        )
        self.requests_reclaimed = Counter(
            PREFIX + "requests_reclaimed",
            "Requests still open past every time limit (a leak): the safety net closed them and "
            "released their lease, by model. Anything but 0 is a bug to report.",
            ["model"],
            registry=self.registry,
        )
        self.engine_retries = Counter(
            PREFIX + "engine_retries",
            "Requests sent again to another engine replica after a failure before their first byte, "
            "by model and cause (engine_error, stalled).",
            ["model", "cause"],
            registry=self.registry,
        )
        self.stream_migrations = Counter(
            PREFIX + "stream_migrations",
            "Streams continued on another engine replica after theirs died or stalled mid-stream, by "
            "model, cause (engine_error, stalled) and outcome (continued, not_possible, exhausted).",
            ["model", "cause", "outcome"],
            registry=self.registry,
        )
        self.replicas_quarantined = Gauge(
            PREFIX + "replicas_quarantined",
            "Engine replicas this gateway keeps out of routing after they failed or stalled, by model.",
            ["model"],
            registry=self.registry,
        )
        self.leases_reclaimed = Counter(
            PREFIX + "leases_reclaimed",
            "Admission leases held past every time limit that the queue's safety net released, by model.",
            ["model"],
            registry=self.registry,
        )
        self.tickets_abandoned = Counter(
            PREFIX + "queue_tickets_abandoned",
            "Waiting tickets dropped because their gateway stopped renewing them (it died), by model.",
            ["model"],
            registry=self.registry,
        )
        self.tenant_requests = Counter(
            PREFIX + "tenant_requests",
            "Requests by tenant (bounded by the known tenants; others count as 'other') and model.",
            ["tenant", "model"],
            registry=self.registry,
        )
        self.tenant_tokens_charged = Counter(
            PREFIX + "tenant_tokens_charged",
            "Tokens charged to tenants' tokens-per-minute limits once their requests ended (usage, or "
            "prompt estimate plus the tokens a cut stream delivered), by tenant and model.",
            ["tenant", "model"],
            registry=self.registry,
        )
        self.tenant_tokens = Counter(
            PREFIX + "tenant_tokens",
            "Tokens by tenant, model and kind (prompt or completion), from the engines' usage.",
            ["tenant", "model", "kind"],
            registry=self.registry,
        )
        self.tenant_records_invalid = Counter(
            PREFIX + "tenant_records_invalid",
            "Tenant or key records in Redis that did not parse and were skipped, each counted once, "
            "by kind (tenant, key).",
            ["kind"],
            registry=self.registry,
        )

        # The Batch API (serving/gateway/batches.py).
        self.batches = Gauge(
            PREFIX + "batches",
            "Batches by status (validating, in_progress, finalizing, completed, failed, expired, "
            "cancelling, cancelled), over all gateways, as last seen by this one.",
            ["status"],
            registry=self.registry,
        )
        self.batch_lines = Counter(
            PREFIX + "batch_lines",
            "Batch lines this gateway finished, by outcome: completed (2xx answer), failed (an error "
            "answer), invalid (refused at validation), cancelled, expired (skipped), retried (429 or "
            "503: run again later), duplicate (a line run twice, answered once).",
            ["outcome"],
            registry=self.registry,
        )
        self.batch_oldest_line_age = Gauge(
            PREFIX + "batch_oldest_line_age_seconds",
            "Age of the oldest batch line not done yet (0: none waiting), over all gateways.",
            registry=self.registry,
        )

        # Background responses (serving/gateway/background.py).
        self.background = Counter(
            PREFIX + "background_responses",
            "Background responses this gateway ran, by outcome: completed, incomplete, failed, "
            "cancelled, lost (its replica died mid-generation: failed by this one's sweeper), adopted "
            "(queued on a replica that died or stopped: run here), refused (429 at creation).",
            ["outcome"],
            registry=self.registry,
        )

        self.handoff = HandoffMetrics(self.registry, buckets_s)

    def model_label(self, model: str | None) -> str:
        """``model`` if configured, else ``unknown`` (keeps the label set bounded)."""
        return model if model in self._models else UNKNOWN_MODEL

    def render(self) -> bytes:
        """Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


class HandoffMetrics:
    """Handoff to upstream APIs. ``upstream`` and ``tenant`` are bounded by configuration;
    ``reason``, ``cause``, ``kind`` and ``window`` are fixed word lists."""

    def __init__(self, registry: CollectorRegistry, buckets_s: Sequence[float]) -> None:
        self.handoffs = Counter(
            PREFIX + "handoffs",
            "Requests answered by an upstream, by reason (overflow, not_ready, escalation, "
            "context_length, failover), upstream and tenant.",
            ["reason", "upstream", "tenant"],
            registry=registry,
        )
        self.declined = Counter(
            PREFIX + "handoff_declined",
            "Handoffs the policy wanted that did not happen, by cause (tenant-policy, budget, "
            "upstream-busy, no-upstream-model, upstream-error, budget-unavailable: Redis unreachable, "
            "the budget fails closed); the request was served locally.",
            ["reason", "upstream", "tenant", "cause"],
            registry=registry,
        )
        self.requests = Counter(
            PREFIX + "upstream_requests",
            "Requests sent to an upstream, by upstream, endpoint and the status answered to the client.",
            ["upstream", "endpoint", "status"],
            registry=registry,
        )
        self.errors = Counter(
            PREFIX + "upstream_errors",
            "Upstream failures by kind (upstream_timeout, upstream_unavailable, upstream_busy, "
            "status_4xx, status_5xx, stream, timeout, cancelled, empty).",
            ["upstream", "kind"],
            registry=registry,
        )
        self.latency = Histogram(
            PREFIX + "upstream_latency_seconds",
            "Time from sending a request upstream to its last byte.",
            ["upstream"],
            buckets=buckets_s,
            registry=registry,
        )
        self.time_to_first_byte = Histogram(
            PREFIX + "upstream_time_to_first_byte_seconds",
            "Time from sending a request upstream to its first event (or whole answer).",
            ["upstream"],
            buckets=buckets_s,
            registry=registry,
        )
        self.in_flight = Gauge(
            PREFIX + "upstream_requests_in_flight",
            "Requests this gateway has at an upstream right now.",
            ["upstream"],
            registry=registry,
        )
        self.tokens = Counter(
            PREFIX + "upstream_tokens",
            "Tokens used at an upstream (its usage), by upstream, tenant and kind (prompt, completion).",
            ["upstream", "tenant", "kind"],
            registry=registry,
        )
        self.budget_used = Gauge(
            PREFIX + "upstream_budget_used",
            "Budget spent at an upstream in the current window (minute_requests, minute_tokens, "
            "month_tokens), over all gateways.",
            ["upstream", "window"],
            registry=registry,
        )
        self.budget_limit = Gauge(
            PREFIX + "upstream_budget_limit",
            "Configured budget of an upstream per window (absent: unlimited).",
            ["upstream", "window"],
            registry=registry,
        )


Kind = Literal["counter", "gauge", "histogram"]
#: Builds the Ray mirror of one metric: (kind, name, description, tag keys, bucket
#: bounds or None) -> an object with ``inc``/``set``/``observe(value, tags=...)``.
RayMetricFactory = Callable[[Kind, str, str, tuple[str, ...], "tuple[float, ...] | None"], Any]


class _MirroredChild:
    """One label set: updates the prometheus_client child, then its Ray mirror."""

    __slots__ = ("_kind", "_prom", "_ray", "_tags")

    def __init__(self, kind: Kind, prom: Any, ray: Any, tags: dict[str, str]) -> None:
        self._kind = kind
        self._prom = prom
        self._ray = ray
        self._tags = tags

    def inc(self, amount: float = 1.0) -> None:
        self._prom.inc(amount)
        if self._kind == "gauge":
            self._ray.set(self._prom._value.get(), tags=self._tags)
        elif amount > 0:  # Ray counters refuse 0
            self._ray.inc(amount, tags=self._tags)

    def dec(self, amount: float = 1.0) -> None:
        self._prom.dec(amount)
        self._ray.set(self._prom._value.get(), tags=self._tags)

    def set(self, value: float) -> None:
        self._prom.set(value)
        self._ray.set(float(value), tags=self._tags)

    def observe(self, value: float) -> None:
        self._prom.observe(value)
        self._ray.observe(value, tags=self._tags)


class _Mirrored:
    """A gateway metric and its Ray mirror, used like the prometheus_client metric
    (``.labels(...).inc()``, ``.set()``, ``.dec()``, ``.observe()``; the same calls
    directly on a metric without labels)."""

    def __init__(self, prom: MetricWrapperBase, factory: RayMetricFactory) -> None:
        # prometheus_client keeps a metric's definition in these attributes (a test reads
        # every gateway metric through them, so a change there fails loudly).
        meta: Any = prom
        self.prom = prom
        self.kind: Kind = meta._type
        self.labelnames: tuple[str, ...] = tuple(meta._labelnames)
        bounds = getattr(meta, "_upper_bounds", None)
        self.buckets = tuple(b for b in bounds if b != float("inf")) if bounds else None
        self.name: str = meta._name
        self.ray = factory(self.kind, self.name, meta._documentation, self.labelnames, self.buckets)
        self._children: dict[tuple[str, ...], _MirroredChild] = {}
        if self.kind == "gauge":
            # Values set before the export (prometheus_client keeps its children).
            for values, child in list(getattr(prom, "_metrics", {}).items()):
                self.ray.set(child._value.get(), tags=dict(zip(self.labelnames, values, strict=True)))

    def labels(self, *values: Any, **labels: Any) -> _MirroredChild:
        key = tuple(str(v) for v in values) if values else tuple(str(labels[n]) for n in self.labelnames)
        child = self._children.get(key)
        if child is None:
            prom = self.prom.labels(*key) if self.labelnames else self.prom
            child = _MirroredChild(self.kind, prom, self.ray, dict(zip(self.labelnames, key, strict=True)))
            self._children[key] = child
        return child

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self.labels().dec(amount)

    def set(self, value: float) -> None:
        self.labels().set(value)

    def observe(self, value: float) -> None:
        self.labels().observe(value)


def _ray_serve_metric(
    kind: Kind, name: str, description: str, tag_keys: tuple[str, ...], buckets: tuple[float, ...] | None
) -> Any:
    """A ``ray.serve.metrics`` metric: inside a Serve replica it carries the replica's
    ``deployment``, ``replica`` and ``application`` tags by itself."""
    from ray.serve import metrics as serve_metrics

    if kind == "counter":
        return serve_metrics.Counter(name, description=description, tag_keys=tag_keys)
    if kind == "gauge":
        return serve_metrics.Gauge(name, description=description, tag_keys=tag_keys)
    return serve_metrics.Histogram(
        name, description=description, boundaries=list(buckets or ()), tag_keys=tag_keys
    )


def export_through_ray(metrics: GatewayMetrics, factory: RayMetricFactory | None = None) -> list[str]:
    """Mirror every metric of ``metrics`` (its handoff metrics included) into Ray's
    metrics, in place; returns the names mirrored. See the module doc.

    Call it once per gateway replica, inside the replica (its constructor), right after
    the :class:`GatewayMetrics` is built, when ``metrics.ray_export`` is configured. The
    attributes keep their names and calls; the registry and ``/metrics`` keep working.
    ``factory`` builds the Ray objects (tests pass their own); by default
    ``ray.serve.metrics``. Calling it again changes nothing.
    """
    make = factory or _ray_serve_metric
    names = []
    for owner in (metrics, metrics.handoff):
        for attribute, value in list(vars(owner).items()):
            if isinstance(value, MetricWrapperBase):
                mirrored = _Mirrored(value, make)
                setattr(owner, attribute, mirrored)
                names.append(mirrored.name)
    return names
