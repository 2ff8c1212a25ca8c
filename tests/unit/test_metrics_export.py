"""Gateway metrics mirrored into Ray's metrics (export_through_ray): every metric, with
its labels as tag keys, the registry unchanged, values carried over and kept in step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from serving.metrics import GatewayMetrics, Kind, export_through_ray


@dataclass
class FakeRayMetric:
    kind: Kind
    name: str
    tag_keys: tuple[str, ...]
    buckets: Sequence[float] | None
    calls: list[tuple[str, float, dict[str, str]]] = field(default_factory=list)

    def inc(self, value: float, tags: dict[str, str]) -> None:
        assert value > 0, "Ray counters refuse 0 and negative increments"
        assert set(tags) == set(self.tag_keys)
        self.calls.append(("inc", value, tags))

    def set(self, value: float, tags: dict[str, str]) -> None:
        assert set(tags) == set(self.tag_keys)
        self.calls.append(("set", value, tags))

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("observe", value, tags))


class FakeRay:
    def __init__(self) -> None:
        self.made: dict[str, FakeRayMetric] = {}

    def __call__(
        self, kind: Kind, name: str, description: str, tag_keys: tuple[str, ...], buckets: Any
    ) -> FakeRayMetric:
        assert description
        assert name not in self.made
        self.made[name] = FakeRayMetric(kind, name, tag_keys, buckets)
        return self.made[name]


def test_every_metric_is_mirrored_with_its_labels_as_tags() -> None:
    metrics = GatewayMetrics(["m"], [0.1, 1.0])
    ray = FakeRay()
    export_through_ray(metrics, ray)
    families = {f.name: f for f in metrics.registry.collect()}
    assert set(ray.made) == set(families)
    assert ray.made["oss_serving_requests"].kind == "counter"
    assert ray.made["oss_serving_requests"].tag_keys == ("model", "endpoint", "status")
    assert ray.made["oss_serving_queue_depth"].kind == "gauge"
    assert ray.made["oss_serving_queue_wait_seconds"].kind == "histogram"
    assert ray.made["oss_serving_time_to_first_token_seconds"].buckets == (0.1, 1.0)
    assert "oss_serving_upstream_requests" in ray.made  # the handoff's metrics too
    # Ray's replica tags are added by ray.serve.metrics; ours must not collide with them.
    for made in ray.made.values():
        assert not {"deployment", "replica", "application"} & set(made.tag_keys)


def test_updates_reach_the_registry_and_ray() -> None:
    metrics = GatewayMetrics(["m"], [0.1, 1.0])
    metrics.queue_depth.labels(model="m", priority="interactive").set(3)  # before the export
    ray = FakeRay()
    export_through_ray(metrics, ray)
    export_through_ray(metrics, ray)  # twice is once
    metrics.requests.labels(model="m", endpoint="chat", status="200").inc()
    metrics.prompt_tokens.labels(model="m").inc(0)  # nothing to add: not sent to Ray
    flight = metrics.in_flight.labels(model="m", endpoint="chat")
    flight.inc()
    flight.inc()
    flight.dec()
    metrics.redis_up.set(1)
    metrics.ttft.labels(model="m", endpoint="chat").observe(0.25)
    sample = metrics.registry.get_sample_value
    assert sample("oss_serving_requests_total", {"model": "m", "endpoint": "chat", "status": "200"}) == 1
    assert sample("oss_serving_requests_in_flight", {"model": "m", "endpoint": "chat"}) == 1
    assert ray.made["oss_serving_requests"].calls == [
        ("inc", 1.0, {"model": "m", "endpoint": "chat", "status": "200"})
    ]
    assert ray.made["oss_serving_prompt_tokens"].calls == []
    assert [c[1] for c in ray.made["oss_serving_requests_in_flight"].calls] == [1.0, 2.0, 1.0]
    assert ray.made["oss_serving_redis_up"].calls == [("set", 1.0, {})]
    # A gauge set before the export is carried over.
    assert ray.made["oss_serving_queue_depth"].calls[0] == (
        "set",
        3.0,
        {"model": "m", "priority": "interactive"},
    )
    assert ray.made["oss_serving_time_to_first_token_seconds"].calls == [
        ("observe", 0.25, {"model": "m", "endpoint": "chat"})
    ]


def test_real_ray_metrics_accept_every_gateway_metric() -> None:
    pytest.importorskip("ray.serve.metrics")
    metrics = GatewayMetrics(["m"], [0.1, 1.0])
    export_through_ray(metrics)  # ray.serve.metrics objects; outside a replica: no Serve tags
    metrics.requests.labels(model="m", endpoint="chat", status="200").inc()
    metrics.in_flight.labels(model="m", endpoint="chat").dec()
    metrics.queue_wait.labels(model="m", priority="batch").observe(0.5)
    metrics.prefix_index_errors.inc()
    assert metrics.registry.get_sample_value("oss_serving_prefix_index_errors_total") == 1
