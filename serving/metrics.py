"""Gateway metrics: one registry per gateway, every name prefixed ``oss_serving_``.

Labels are bounded: ``model`` is one of the configured models or ``unknown``,
``endpoint`` one of the OpenAI routes, ``status`` an HTTP status code. Never a raw
user-supplied string.

Every metric is a :class:`Metric`: a ``prometheus_client`` metric in the gateway's own
registry (served at the gateway's ``/metrics``), used as ``.labels(...).inc()``,
``.set()``, ``.dec()`` or ``.observe()``. On a cluster, :func:`export_through_ray` also
mirrors each one into a Ray metric (``ray.serve.metrics``): Ray's metrics agent on the
node then exports it as ``ray_<name>`` with the replica's ``deployment``, ``replica``
and ``application`` tags, so every gateway replica is its own series, scraped from the
metrics port of the pod it runs in (the chart's PodMonitor renames them back to
``oss_serving_*``). Through a load-balanced HTTP port each scrape would reach any
replica, and the series would mix them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = [
    "CONTENT_TYPE_LATEST",
    "UNKNOWN_MODEL",
    "GatewayMetrics",
    "HandoffMetrics",
    "Kind",
    "Metric",
    "RayMetricFactory",
    "export_through_ray",
]

UNKNOWN_MODEL = "unknown"
PREFIX = "oss_serving_"

Kind = Literal["counter", "gauge", "histogram"]
#: Builds the Ray mirror of a metric: (kind, name, description, tag keys, buckets) -> a
#: ray.util.metrics-like object with inc/set/observe(value, tags=...).
RayMetricFactory = Callable[[Kind, str, str, tuple[str, ...], Sequence[float] | None], Any]


class _Child:
    """One label set of a :class:`Metric`: updates the registry and the Ray mirror."""

    __slots__ = ("_metric", "_prom", "_tags", "_value")

    def __init__(self, metric: Metric, prom: Any, tags: dict[str, str]) -> None:
        self._metric = metric
        self._prom = prom
        self._tags = tags
        self._value = 0.0  # gauges: Ray gauges only take set(), so inc/dec are tracked here

    def inc(self, amount: float = 1.0) -> None:
        self._prom.inc(amount)
        mirror = self._metric._mirror
        if self._metric.kind == "gauge":
            self._value += amount
            if mirror is not None:
                mirror.set(self._value, tags=self._tags)
        elif mirror is not None and amount > 0:  # Ray counters refuse 0
            mirror.inc(amount, tags=self._tags)

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)

    def set(self, value: float) -> None:
        self._prom.set(value)
        self._value = float(value)
        if self._metric._mirror is not None:
            self._metric._mirror.set(self._value, tags=self._tags)

    def observe(self, value: float) -> None:
        self._prom.observe(value)
        if self._metric._mirror is not None:
            self._metric._mirror.observe(value, tags=self._tags)


class Metric:
    """A gateway metric: a prometheus_client metric plus, once exported, its Ray mirror."""

    def __init__(
        self,
        kind: Kind,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
        buckets: Sequence[float] | None = None,
    ) -> None:
        self.kind: Kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(buckets) if buckets is not None else None
        self._mirror: Any = None
        self._children: dict[tuple[str, ...], _Child] = {}
        if kind == "counter":
            self._prom: Any = Counter(name, documentation, self.labelnames, registry=registry)
        elif kind == "gauge":
            self._prom = Gauge(name, documentation, self.labelnames, registry=registry)
        else:
            assert buckets is not None
            self._prom = Histogram(name, documentation, self.labelnames, buckets=buckets, registry=registry)

    def labels(self, *values: str, **labels: str) -> _Child:
        key = tuple(str(v) for v in values) if values else tuple(str(labels[n]) for n in self.labelnames)
        child = self._children.get(key)
        if child is None:
            prom = self._prom.labels(*key) if self.labelnames else self._prom
            child = _Child(self, prom, dict(zip(self.labelnames, key, strict=True)))
            self._children[key] = child
        return child

    # A metric without labels is used directly: metrics.redis_up.set(1).
    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self.labels().dec(amount)

    def set(self, value: float) -> None:
        self.labels().set(value)

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def mirror_into(self, factory: RayMetricFactory) -> None:
        """Create the Ray mirror; the values recorded so far are carried over."""
        if self._mirror is not None:
            return
        self._mirror = factory(self.kind, self.name, self.documentation, self.labelnames, self.buckets)
        for child in self._children.values():
            if self.kind == "gauge":
                self._mirror.set(child._value, tags=child._tags)


class _Metrics:
    """Builds :class:`Metric` objects in one registry and remembers them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._all: list[Metric] = []

    def _add(self, metric: Metric) -> Metric:
        self._all.append(metric)
        return metric

    def _counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Metric:
        return self._add(Metric("counter", name, documentation, labelnames, registry=self._registry))

    def _gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Metric:
        return self._add(Metric("gauge", name, documentation, labelnames, registry=self._registry))

    def _histogram(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> Metric:
        return self._add(
            Metric("histogram", name, documentation, labelnames, registry=self._registry, buckets=buckets)
        )

    def metrics(self) -> Iterator[Metric]:
        """Every metric of this set."""
        yield from self._all


class GatewayMetrics(_Metrics):
    """The gateway's Prometheus metrics, in a registry of its own."""

    def __init__(self, models: Sequence[str], buckets_s: Sequence[float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        super().__init__(self.registry)
        self._models = frozenset(models)
        self.requests = self._counter(
            PREFIX + "requests",
            "Requests answered by the gateway, by model, endpoint and HTTP status.",
            ["model", "endpoint", "status"],
        )
        self.latency = self._histogram(
            PREFIX + "request_latency_seconds",
            "Time from request arrival at the gateway to the last byte sent.",
            ["model", "endpoint"],
            buckets_s,
        )
        self.ttft = self._histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from request arrival at the gateway to the first streamed chunk from the engine.",
            ["model", "endpoint"],
            buckets_s,
        )
        self.in_flight = self._gauge(
            PREFIX + "requests_in_flight",
            "Requests the gateway is serving right now.",
            ["model", "endpoint"],
        )
        self.model_ready = self._gauge(
            PREFIX + "model_ready",
            "1 when at least one engine replica of the model answers its health check.",
            ["model"],
        )
        self.redis_up = self._gauge(
            PREFIX + "redis_up",
            "1 when the gateway reaches Redis.",
        )
        # Prompt caching (prefix-affinity routing, response cache).
        self.prefix_affinity = self._counter(
            PREFIX + "prefix_affinity",
            "Prefix index lookups: hit when a replica holds a prefix of the prompt or its affinity key.",
            ["model", "result"],
        )
        self.prefix_index_errors = self._counter(
            PREFIX + "prefix_index_errors",
            "Prefix index lookups or updates that failed (Redis unreachable); routing fell back to load.",
        )
        self.routing_decisions = self._counter(
            PREFIX + "routing_decisions",
            "Engine replica choices by reason: affinity, load (load beat affinity), fallback, round_robin.",
            ["model", "reason"],
        )
        self.response_cache = self._counter(
            PREFIX + "response_cache_lookups",
            "Response cache lookups by result: hit, miss, skip (asked for but not deterministic).",
            ["model", "result"],
        )
        self.response_cache_hits = self._counter(
            PREFIX + "response_cache_hits",
            "Requests answered from the response cache.",
            ["model"],
        )
        self.response_cache_bytes = self._gauge(
            PREFIX + "response_cache_bytes",
            "Bytes held by the response cache, as last seen by this gateway.",
        )
        self.prompt_tokens = self._counter(
            PREFIX + "prompt_tokens",
            "Prompt tokens of answered requests, from the engine's usage.",
            ["model"],
        )
        self.cached_prompt_tokens = self._counter(
            PREFIX + "prompt_cached_tokens",
            "Prompt tokens the engine served from its prefix cache "
            "(usage.prompt_tokens_details.cached_tokens).",
            ["model"],
        )

        self.tpot = self._histogram(
            PREFIX + "time_per_output_token_seconds",
            "Time per output token after the first, as the gateway sees the stream (streams with usage).",
            ["model"],
            [0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1],
        )
        self.output_tokens = self._counter(
            PREFIX + "output_tokens",
            "Output tokens served, by model (from the engines' usage).",
            ["model"],
        )
        self.queue_depth = self._gauge(
            PREFIX + "queue_depth",
            "Requests waiting for admission, by model and priority class (the shared Redis queue).",
            ["model", "priority"],
        )
        self.queue_in_use = self._gauge(
            PREFIX + "queue_leases",
            "Granted leases (requests running on the engines), by model.",
            ["model"],
        )
        self.queue_capacity = self._gauge(
            PREFIX + "queue_capacity",
            "Concurrent requests the model's engines are given, by model.",
            ["model"],
        )
        self.queue_degraded = self._gauge(
            PREFIX + "queue_degraded",
            "1 while Redis is unreachable and this gateway admits with its local queue.",
        )
        self.queue_wait = self._histogram(
            PREFIX + "queue_wait_seconds",
            "Time from arrival to admission.",
            ["model", "priority"],
            [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
        )
        self.admissions = self._counter(
            PREFIX + "admissions",
            "Requests admitted, by model and priority class.",
            ["model", "priority"],
        )
        self.rejections = self._counter(
            PREFIX + "rejections",
            "Requests rejected by admission or limits, by model and reason.",
            ["model", "reason"],
        )
        self.leases_expired = self._counter(
            PREFIX + "leases_expired",
            "Leases that expired without being released (their gateway died), by model.",
            ["model"],
        )
        self.tenant_requests = self._counter(
            PREFIX + "tenant_requests",
            "Requests by tenant (bounded by the known tenants; others count as 'other') and model.",
            ["tenant", "model"],
        )
        self.tenant_tokens = self._counter(
            PREFIX + "tenant_tokens",
            "Tokens by tenant, model and kind (prompt or completion), from the engines' usage.",
            ["tenant", "model", "kind"],
        )

        self.handoff = HandoffMetrics(self.registry, buckets_s)

    def model_label(self, model: str | None) -> str:
        """``model`` if configured, else ``unknown`` (keeps the label set bounded)."""
        return model if model in self._models else UNKNOWN_MODEL

    def render(self) -> bytes:
        """Prometheus text exposition of this registry."""
        return generate_latest(self.registry)

    def metrics(self) -> Iterator[Metric]:
        """Every metric of the gateway, the handoff's included."""
        yield from super().metrics()
        yield from self.handoff.metrics()


class HandoffMetrics(_Metrics):
    """Handoff to upstream APIs. ``upstream`` and ``tenant`` are bounded by configuration;
    ``reason``, ``cause``, ``kind`` and ``window`` are fixed word lists."""

    def __init__(self, registry: CollectorRegistry, buckets_s: Sequence[float]) -> None:
        super().__init__(registry)
        self.handoffs = self._counter(
            PREFIX + "handoffs",
            "Requests answered by an upstream, by reason (overflow, not_ready, escalation, "
            "context_length, failover), upstream and tenant.",
            ["reason", "upstream", "tenant"],
        )
        self.declined = self._counter(
            PREFIX + "handoff_declined",
            "Handoffs the policy wanted that did not happen, by cause (tenant-policy, budget, "
            "upstream-busy, no-upstream-model, upstream-error); the request was served locally.",
            ["reason", "upstream", "tenant", "cause"],
        )
        self.requests = self._counter(
            PREFIX + "upstream_requests",
            "Requests sent to an upstream, by upstream, endpoint and the status answered to the client.",
            ["upstream", "endpoint", "status"],
        )
        self.errors = self._counter(
            PREFIX + "upstream_errors",
            "Upstream failures by kind (upstream_timeout, upstream_unavailable, upstream_busy, "
            "status_4xx, status_5xx, stream, timeout, cancelled, empty).",
            ["upstream", "kind"],
        )
        self.latency = self._histogram(
            PREFIX + "upstream_latency_seconds",
            "Time from sending a request upstream to its last byte.",
            ["upstream"],
            buckets_s,
        )
        self.time_to_first_byte = self._histogram(
            PREFIX + "upstream_time_to_first_byte_seconds",
            "Time from sending a request upstream to its first event (or whole answer).",
            ["upstream"],
            buckets_s,
        )
        self.in_flight = self._gauge(
            PREFIX + "upstream_requests_in_flight",
            "Requests this gateway has at an upstream right now.",
            ["upstream"],
        )
        self.tokens = self._counter(
            PREFIX + "upstream_tokens",
            "Tokens used at an upstream (its usage), by upstream, tenant and kind (prompt, completion).",
            ["upstream", "tenant", "kind"],
        )
        self.budget_used = self._gauge(
            PREFIX + "upstream_budget_used",
            "Budget spent at an upstream in the current window (minute_requests, minute_tokens, "
            "month_tokens), over all gateways.",
            ["upstream", "window"],
        )
        self.budget_limit = self._gauge(
            PREFIX + "upstream_budget_limit",
            "Configured budget of an upstream per window (absent: unlimited).",
            ["upstream", "window"],
        )


def _ray_serve_metric(
    kind: Kind, name: str, description: str, tag_keys: tuple[str, ...], buckets: Sequence[float] | None
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


def export_through_ray(metrics: GatewayMetrics, factory: RayMetricFactory | None = None) -> None:
    """Mirror every gateway metric into Ray's metrics (per replica; see the module doc).

    Call it once per gateway replica, inside the replica (its constructor), after the
    :class:`GatewayMetrics` is built, when ``metrics.ray_export`` is configured. The
    gateway's own registry and ``/metrics`` keep working as before. ``factory`` builds
    the Ray objects (tests pass their own); by default ``ray.serve.metrics``.
    """
    make = factory or _ray_serve_metric
    for metric in metrics.metrics():
        metric.mirror_into(make)
