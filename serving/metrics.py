"""Gateway metrics: one registry per gateway, every name prefixed ``oss_serving_``.

Labels are bounded: ``model`` is one of the configured models or ``unknown``,
``endpoint`` one of the OpenAI routes, ``status`` an HTTP status code. Never a raw
user-supplied string.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "UNKNOWN_MODEL", "GatewayMetrics"]

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

    def model_label(self, model: str | None) -> str:
        """``model`` if configured, else ``unknown`` (keeps the label set bounded)."""
        return model if model in self._models else UNKNOWN_MODEL

    def render(self) -> bytes:
        """Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
