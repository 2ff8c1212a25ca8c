"""Health sees every engine replica, not only the one Ray's router sends its probe to."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from serving.config import GatewayConfig, QueueConfig
from serving.engine.protocol import EngineStats
from serving.gateway.admission import QueueSnapshot
from serving.gateway.health import EngineHealth
from serving.metrics import GatewayMetrics
from tests.fakes import FakeEngine


class TwoReplicas(FakeEngine):
    """Two replicas; a probe without ``only`` always lands on the idle one, as Ray's
    power-of-two router does with two replicas."""

    def __init__(self) -> None:
        super().__init__()
        self.busy = {"idle": 0, "busy": 7}
        self.gone: set[str] = set()
        self.only_calls: list[str] = []

    def _of(self, rid: str) -> EngineStats:
        return EngineStats(unfinished_requests=self.busy[rid], replica_id=rid, max_num_seqs=16, pid=1)

    async def stats(self, timeout_s: float) -> EngineStats:
        return self._of("idle")

    async def probe(
        self, timeout_s: float, *, only: str | None = None, avoid: Sequence[str] = ()
    ) -> EngineStats:
        if only is None:
            return self._of("idle")
        self.only_calls.append(only)
        if only in self.gone:
            raise TimeoutError(only)
        return self._of(only)


class Queue:
    def __init__(self) -> None:
        self.capacity: dict[str, int] = {}

    @property
    def degraded(self) -> bool:
        return False

    def set_capacity(self, model: str, capacity: int) -> None:
        self.capacity[model] = capacity

    async def snapshot(self, model: str) -> QueueSnapshot:
        return QueueSnapshot(depth={}, in_use=0, capacity=self.capacity.get(model, 0))


def _health(engine: TwoReplicas, queue: Queue) -> EngineHealth:
    metrics = GatewayMetrics(["m"], [1.0])
    return EngineHealth(GatewayConfig(), QueueConfig(), {"m": engine}, metrics, queue)


async def test_a_busy_replica_stays_in_the_capacity_and_the_unfinished_count() -> None:
    engine, queue = TwoReplicas(), Queue()
    health = _health(engine, queue)
    # the busy replica answered once (e.g. before it became the busier one) ...
    health._record("m", engine._of("busy"))
    # ... and from now on the model's probe always reaches the idle replica
    await health.probe_once()
    await health.probe_once()
    model = health.report()["models"]["m"]
    assert model["engine_unfinished_requests"] == 7
    assert model["replicas"]["busy"]["unfinished_requests"] == 7
    assert model["replicas"]["idle"]["unfinished_requests"] == 0
    assert queue.capacity["m"] == 32  # both replicas' max_num_seqs
    assert engine.only_calls == ["busy", "busy"]


async def test_a_replica_that_stops_answering_ages_out_without_making_the_model_unready(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine, queue = TwoReplicas(), Queue()
    health = _health(engine, queue)
    health._record("m", engine._of("busy"))
    engine.gone.add("busy")
    await health.probe_once()
    assert health.is_ready("m")
    # past the horizon the silent replica no longer counts
    import serving.gateway.health as mod

    real = mod.time.monotonic
    monkeypatch.setattr(mod.time, "monotonic", lambda: real() + 3600)
    await health.probe_once()
    model = health.report()["models"]["m"]
    assert model["engine_unfinished_requests"] == 0
    assert "busy" not in model["replicas"]
    assert queue.capacity["m"] == 16
