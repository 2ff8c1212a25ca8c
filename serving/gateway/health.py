"""Engine readiness, capacity and the queue's gauges, probed in the background.

One :class:`EngineHealth` per gateway replica probes every model's engines (health check,
then stats) every ``health_check_interval_s``, keeps each model's :class:`ModelHealth`,
feeds admission the capacity of the replicas seen lately, and records the queue gauges.
Models that may scale to zero are never probed (a probe would wake them) and are always
"ready": their requests wait in admission while Ray Serve starts a replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from serving.config import GatewayConfig, QueueConfig
from serving.engine.protocol import EngineClient, EngineStats
from serving.gateway.admission import QueueSnapshot
from serving.metrics import GatewayMetrics
from serving.tasks import cancel_and_wait, raise_if_cancelling

__all__ = ["BreakerView", "EngineHealth", "ModelHealth", "QueueView", "RedisPing"]

log = logging.getLogger("oss_serving.gateway")

RedisPing = Callable[[], Awaitable[bool]]


class BreakerView(Protocol):
    """What health needs of the Redis circuit breaker (``redis_guard.RedisGuard``)."""

    @property
    def is_open(self) -> bool: ...

    def report(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


class QueueView(Protocol):
    """What health needs of admission."""

    @property
    def degraded(self) -> bool: ...

    def set_capacity(self, model: str, capacity: int) -> None: ...

    async def snapshot(self, model: str) -> QueueSnapshot: ...


@dataclass
class ModelHealth:
    """Readiness of one model's engines, as last probed."""

    ready: bool = False
    last_error: str | None = "not probed yet"
    last_probe: float | None = None
    ready_since: float | None = None
    unfinished_requests: int | None = None
    failures: int = 0
    """Consecutive failed probes."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "last_error": self.last_error,
            "last_probe_unix": self.last_probe,
            "ready_since_unix": self.ready_since,
            "engine_unfinished_requests": self.unfinished_requests,
        }


class EngineHealth:
    """Probes engines and Redis; answers readiness; keeps queue gauges current."""

    def __init__(
        self,
        config: GatewayConfig,
        queue_config: QueueConfig,
        engines: Mapping[str, EngineClient],
        metrics: GatewayMetrics,
        queue: QueueView | None,
        *,
        redis_ping: RedisPing | None = None,
        scale_from_zero: frozenset[str] = frozenset(),
        on_tick: Callable[[], Awaitable[Any]] | None = None,
        breaker: BreakerView | None = None,
        avoided: Callable[[str], list[str]] = lambda model: [],
    ) -> None:
        self._avoided = avoided
        self._breaker = breaker
        self._config = config
        self._queue_config = queue_config
        self._engines = dict(engines)
        self._metrics = metrics
        self._queue = queue
        self._redis_ping = redis_ping
        self._on_tick = on_tick
        self._replicas: dict[str, dict[str, tuple[int, float]]] = {name: {} for name in self._engines}
        self._seen: dict[str, dict[str, tuple[int | None, float]]] = {name: {} for name in self._engines}
        """Replicas the probes reached lately: their process id and when."""
        self._unfinished: dict[str, dict[str, int]] = {name: {} for name in self._engines}
        """Requests each replica was generating at its last probe."""
        self._expired_seen: dict[str, int] = {}
        self._reclaimed_seen: dict[str, int] = {}
        self._abandoned_seen: dict[str, int] = {}
        self._redis_ok: bool | None = None
        self._health = {name: ModelHealth() for name in self._engines}
        self._scale_from_zero = frozenset(scale_from_zero) & set(self._engines)
        for name in self._scale_from_zero:
            self._health[name] = ModelHealth(ready=True, last_error=None)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._forever(), name="oss-serving-health")

    async def stop(self) -> None:
        """Stop probing (the breaker's own Redis probe too)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._breaker is not None:
            await self._breaker.aclose()

    async def _forever(self) -> None:
        while True:
            await self.probe_once()
            if self._on_tick is not None:
                try:
                    await self._on_tick()
                except Exception:
                    log.exception("gateway maintenance failed")
            raise_if_cancelling()  # probes treat any error as "not ready", a hidden cancel among them
            await asyncio.sleep(self._config.health_check_interval_s)

    async def probe_once(self) -> None:
        """Probe every engine deployment (and Redis) once, concurrently; refresh queue gauges."""
        await asyncio.gather(*(self._probe(name) for name in self._engines), self._probe_redis())
        if self._queue is not None:
            try:
                await self._record_queue(self._queue)
            except Exception as exc:  # gauges stay as they were; readiness is unaffected
                log.warning("queue gauges not updated: %s", type(exc).__name__)

    def is_ready(self, name: str) -> bool:
        return name in self._health and self._health[name].ready

    def _update_capacity(self, name: str, stats: EngineStats) -> None:
        """Capacity = what each engine replica seen lately runs well, summed over replicas."""
        assert self._queue is not None
        seen = self._replicas[name]
        now = time.monotonic()
        candidates = [x for x in (self._queue_config.capacity_per_replica, stats.max_num_seqs) if x]
        if candidates:
            seen[stats.replica_id or "replica"] = (min(candidates), now)
        for key in [k for k, (_, t) in seen.items() if now - t > self._horizon]:
            del seen[key]
        if seen:
            self._queue.set_capacity(name, sum(cap for cap, _ in seen.values()))

    async def _record_queue(self, queue: QueueView) -> None:
        m = self._metrics
        m.queue_degraded.set(1 if queue.degraded else 0)
        for name in self._engines:
            snap = await queue.snapshot(name)
            for priority, depth in snap.depth.items():
                m.queue_depth.labels(model=name, priority=priority).set(depth)
            m.queue_in_use.labels(model=name).set(snap.in_use)
            m.queue_capacity.labels(model=name).set(snap.capacity)
            _count_growth(self._expired_seen, name, snap.expired_total, m.leases_expired.labels(model=name))
            reclaimed = m.leases_reclaimed.labels(model=name)
            _count_growth(self._reclaimed_seen, name, snap.reclaimed_total, reclaimed)
            _count_growth(
                self._abandoned_seen, name, snap.abandoned_total, m.tickets_abandoned.labels(model=name)
            )

    async def _probe(self, name: str) -> None:
        health = self._health[name]
        engine = self._engines[name]
        now = time.time()
        if name in self._scale_from_zero:
            health.last_probe = now
            self._metrics.model_ready.labels(model=name).set(1)
            return
        avoided = self._avoided(name)
        try:
            if avoided:  # a replica kept out of routing must not make the model look down
                stats = await engine.probe(self._config.health_check_timeout_s, avoid=avoided)
            else:
                await engine.check_health(self._config.health_check_timeout_s)
                stats = await engine.stats(self._config.health_check_timeout_s)
        except Exception as exc:  # failures make it "not ready"; the reason is kept (for the log)
            health.failures += 1
            health.last_error = type(exc).__name__
            if health.ready and health.failures >= self._config.unready_after_failures:
                log.warning("model %s became unready: %s", name, exc)
                health.ready = False
                health.ready_since = None
        else:
            health.failures = 0
            if not health.ready:
                log.info("model %s is ready", name)
                health.ready_since = now
            health.ready = True
            health.last_error = None
            self._record(name, stats)
            await self._refresh_others(name, engine, stats.replica_id, set(avoided))
            health.unfinished_requests = self._unfinished_total(name, stats)
        health.last_probe = now
        self._metrics.model_ready.labels(model=name).set(1 if health.ready else 0)

    def _record(self, name: str, stats: EngineStats) -> None:
        if stats.replica_id:
            self._seen[name][stats.replica_id] = (stats.pid, time.monotonic())
            self._unfinished[name][stats.replica_id] = stats.unfinished_requests
        if self._queue is not None:
            self._update_capacity(name, stats)

    async def _refresh_others(
        self, name: str, engine: EngineClient, probed: str | None, avoided: set[str]
    ) -> None:
        """Ask each other replica seen lately for its own stats. The model's probe goes to
        whichever replica Ray's router picks (the least busy one), so without this a busy
        replica could drop out of the capacity sum and of ``engine_unfinished_requests``.
        A replica that does not answer is left to age out; readiness is not affected."""
        now = time.monotonic()
        others = [
            rid
            for rid, (_, at) in self._seen[name].items()
            if rid != probed and rid not in avoided and now - at <= self._horizon
        ]

        async def one(rid: str) -> None:
            try:
                stats = await engine.probe(self._config.health_check_timeout_s, only=rid)
            except Exception as exc:  # gone or stalled: it ages out of the sums
                log.debug("replica %s of %s did not answer its probe: %s", rid, name, type(exc).__name__)
                return
            if stats.replica_id == rid:
                self._record(name, stats)

        await asyncio.gather(*(one(rid) for rid in others))

    def _unfinished_total(self, name: str, stats: EngineStats) -> int:
        """Requests the engines are generating, summed over the replicas seen lately."""
        if not stats.replica_id:
            return stats.unfinished_requests
        now = time.monotonic()
        seen = self._seen[name]
        return sum(
            n
            for rid, n in self._unfinished[name].items()
            if rid in seen and now - seen[rid][1] <= self._horizon
        )

    @property
    def _horizon(self) -> float:
        """How long a replica counts after its last answer to a probe."""
        return max(30.0, 5 * self._config.health_check_interval_s)

    async def _probe_redis(self) -> None:
        if self._redis_ping is None:
            return
        try:
            self._redis_ok = await self._redis_ping()
        except Exception:
            self._redis_ok = False
        self._metrics.redis_up.set(1 if self._redis_ok else 0)

    def _replicas_seen(self, name: str) -> dict[str, dict[str, Any]]:
        """Replicas the probes reached lately, each with its own unfinished requests."""
        now = time.monotonic()
        return {
            rid: {
                "pid": pid,
                "seen_s_ago": round(now - at, 1),
                "unfinished_requests": self._unfinished.get(name, {}).get(rid),
            }
            for rid, (pid, at) in sorted(self._seen.get(name, {}).items())
            if now - at <= self._horizon
        }

    def report(self) -> dict[str, Any]:
        """Liveness, readiness per model, Redis reachability, the Redis circuit breaker
        (``redis_breaker``: closed or open, and ``redis_breaker_since_unix``) and the
        admission mode. An open breaker makes the status ``degraded``."""
        models = {
            name: {
                **h.as_dict(),
                "scales_from_zero": name in self._scale_from_zero,
                "replicas": self._replicas_seen(name),
                "replicas_avoided": self._avoided(name),
            }
            for name, h in self._health.items()
        }
        ready = all(h.ready for h in self._health.values())
        redis = "not configured" if self._redis_ping is None else _redis_word(self._redis_ok)
        queue_degraded = self._queue is not None and self._queue.degraded
        breaker_open = self._breaker is not None and self._breaker.is_open
        if not any(h.ready for h in self._health.values()):
            status = "starting"
        elif not ready or queue_degraded or breaker_open:
            status = "degraded"
        else:
            status = "ok"
        admission = (
            "off" if self._queue is None else "local (Redis unreachable)" if queue_degraded else "redis"
        )
        return {
            "live": True,
            "ready": ready,
            "status": status,
            "models": models,
            "redis": redis,
            **(self._breaker.report() if self._breaker is not None else {"redis_breaker": "not configured"}),
            "admission": admission,
        }


def _count_growth(seen: dict[str, int], name: str, total: int, counter: Any) -> None:
    """Turn a shared running total into this gateway's counter increments."""
    previous = seen.get(name)
    if previous is not None and total > previous:
        counter.inc(total - previous)
    seen[name] = total


def _redis_word(ok: bool | None) -> str:
    if ok is None:
        return "unknown"
    return "ok" if ok else "unreachable"
