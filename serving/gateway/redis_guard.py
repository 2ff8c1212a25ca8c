"""One Redis health policy per gateway replica: a circuit breaker that every Redis user shares.

A gateway replica calls Redis from several features on every request: the rate limiter,
the response cache, the prefix index, the upstream budget and admission. Without a shared
policy each of them waits out the client's socket timeout on every request while Redis is
down or stalled. :class:`RedisGuard` is that policy. ``build_gateway`` makes one per
replica and hands every Redis user its client, :attr:`RedisGuard.client`
(:class:`GuardedRedis`), so every command, script call and pipeline ``execute`` goes
through :meth:`RedisGuard.call`:

- **closed** (normal): each call has a short budget (``redis.call_timeout_s``, 250 ms by
  default). A call that fails to reach Redis (connection error, socket timeout) or runs
  past its budget is a failure. Redis answering with an error (``NOSCRIPT``, ``OOM``,
  a wrong type) is not: Redis is up.
- **open**: after ``redis.breaker_failures`` consecutive failures (3 by default). Every
  call fails at once with :class:`RedisUnavailable` and no network traffic, and each
  feature takes its fallback (below). A background probe sends ``PING`` (same budget)
  every :data:`PROBE_INTERVAL_S`.
- **half-open**: the first ``PING`` answered closes the breaker on probation: calls go to
  Redis again, the first success ends the probation, and a single failure during it opens
  the breaker again. Recovery needs no restart and takes about a second.

What each feature does while Redis cannot be reached (the breaker is open, or a call
failed). Each fallback is counted in ``oss_serving_redis_fallbacks_total{feature}``
(:data:`FEATURES`):

- **rate limits** (``rate_limit``), fail to a local share: each replica enforces its share
  of the tenant's limits in process, ``ceil(limit / gateway.num_replicas)`` per minute, in
  a token bucket that starts full. Back on Redis, the shared buckets count again.
- **upstream budget** (``upstream_budget``), fail closed: a handoff that needs the budget
  is declined and the request is served locally (``X-OSS-Serving-Handoff-Declined``).
  Nothing is counted in process, so the fleet can never spend more than the budget and a
  Redis blip never restarts the monthly cap. Usage corrections made meanwhile are lost
  (logged).
- **response cache** (``response_cache``), skipped: no lookup and no store. The request
  is served by the engine, and the answer carries no ``X-OSS-Response-Cache`` header.
- **prefix index** (``prefix_index``), skipped: no lookup and no update. The request
  carries no affinity hints, so the engine's router routes it by load.
- **admission** keeps its own local fallback (``admission.py``): this replica's share of
  the capacity, in process. Its calls fail fast too, so it switches at once, and it
  shares the queue again at its next renewal once the breaker has closed.
- **tenant keys** (``auth.py``): the last copy read stays in use.

Visible: ``/health`` reports ``redis_breaker`` (``closed`` or ``open``) and
``redis_breaker_since_unix``, and the gauge ``oss_serving_redis_breaker_open`` is 1
while the breaker is open. Each transition is logged once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import redis.exceptions

from serving.config import RedisConfig
from serving.metrics import GatewayMetrics
from serving.tasks import cancel_and_wait, raise_if_cancelling

__all__ = [
    "FEATURES",
    "PROBE_INTERVAL_S",
    "Feature",
    "GuardedRedis",
    "RedisGuard",
    "RedisSlow",
    "RedisUnavailable",
    "guard_of",
]

log = logging.getLogger("oss_serving.redis")

T = TypeVar("T")

Feature = Literal["rate_limit", "upstream_budget", "response_cache", "prefix_index"]
FEATURES: tuple[Feature, ...] = ("rate_limit", "upstream_budget", "response_cache", "prefix_index")
"""The ``feature`` label of ``oss_serving_redis_fallbacks_total``: a fixed word list."""

PROBE_INTERVAL_S = 0.5
"""How often an open breaker sends ``PING`` to Redis."""

BreakerState = Literal["closed", "open"]


class RedisUnavailable(redis.exceptions.ConnectionError):
    """Raised instead of calling Redis while the breaker is open (no network traffic)."""


class RedisSlow(redis.exceptions.TimeoutError):
    """A Redis call ran past its budget (``redis.call_timeout_s``); it was cancelled."""


_UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
"""Errors that mean Redis could not be reached. Any other ``RedisError`` is an answer."""


class RedisGuard:
    """The circuit breaker of one gateway replica's Redis client (see the module docstring)."""

    def __init__(
        self,
        redis: Any,
        config: RedisConfig | None = None,
        metrics: GatewayMetrics | None = None,
        *,
        probe_interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        config = config or RedisConfig()
        self._redis = redis
        self._metrics = metrics
        self.call_timeout_s = config.call_timeout_s
        """Budget of one call (and of one probe ``PING``)."""
        self.failures_to_open = config.breaker_failures
        """Consecutive failures that open the breaker."""
        self.probe_interval_s = probe_interval_s
        self._failures = 0
        self._open = False
        self._since_unix = time.time()
        self._opened_total = 0
        self._probe: asyncio.Task[None] | None = None
        self.client = GuardedRedis(redis, self)
        """The client every Redis user of the replica is given."""
        if metrics is not None:
            metrics.redis_breaker_open.set(0)
            for feature in FEATURES:
                metrics.redis_fallbacks.labels(feature=feature)

    # ----------------------------------------------------------------- state
    @property
    def state(self) -> BreakerState:
        return "open" if self._open else "closed"

    @property
    def is_open(self) -> bool:
        """True while calls fail fast and features take their fallbacks."""
        return self._open

    @property
    def since_unix(self) -> float:
        """When the breaker last changed state (or was created)."""
        return self._since_unix

    @property
    def opened_total(self) -> int:
        """How many times the breaker has opened."""
        return self._opened_total

    def report(self) -> dict[str, Any]:
        """For ``/health``: ``redis_breaker`` (closed or open) and since when."""
        return {"redis_breaker": self.state, "redis_breaker_since_unix": self._since_unix}

    def fallback(self, feature: Feature) -> None:
        """Count that ``feature`` took its fallback (Redis not reachable) for one call."""
        if self._metrics is not None:
            self._metrics.redis_fallbacks.labels(feature=feature).inc()

    # ----------------------------------------------------------------- calls
    async def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis call, ``make()``, within the per-call budget.

        Raises :class:`RedisUnavailable` at once (``make`` is not called) while the breaker
        is open, :class:`RedisSlow` when the call runs past its budget, and whatever the
        call raised otherwise.
        """
        if self._open:
            raise RedisUnavailable("Redis circuit breaker is open")
        timeout = asyncio.timeout(self.call_timeout_s)
        try:
            async with timeout:
                result = await make()
        except TimeoutError:  # the budget (or a socket timeout) ran out
            self._failed("no answer in time")
            if timeout.expired():
                raise RedisSlow(f"Redis did not answer within {self.call_timeout_s:g} s") from None
            raise
        except _UNREACHABLE as exc:
            self._failed(type(exc).__name__)
            raise
        except redis.exceptions.RedisError:
            self._succeeded()  # Redis answered, with an error: it is up
            raise
        self._succeeded()
        return result

    def _succeeded(self) -> None:
        self._failures = 0

    def _failed(self, why: str) -> None:
        self._failures += 1
        if not self._open and self._failures >= self.failures_to_open:
            self._trip(why)

    def _trip(self, why: str) -> None:
        self._open = True
        self._opened_total += 1
        self._since_unix = time.time()
        if self._metrics is not None:
            self._metrics.redis_breaker_open.set(1)
        log.warning(
            "Redis unreachable or slow (%d failed calls in a row, the last: %s): circuit breaker "
            "open; rate limits local, upstream budget closed, caches and prefix index skipped, "
            "admission local",
            self._failures,
            why,
        )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(
                self._probing(), name="oss-serving-redis-probe"
            )

    def _reset(self) -> None:
        self._open = False
        self._failures = self.failures_to_open - 1  # probation: one failure opens it again
        self._since_unix = time.time()
        if self._metrics is not None:
            self._metrics.redis_breaker_open.set(0)
        log.warning("Redis answers again: circuit breaker closed")

    async def _probing(self) -> None:
        while self._open:
            await asyncio.sleep(self.probe_interval_s)
            try:
                async with asyncio.timeout(self.call_timeout_s):
                    await self._redis.ping()
            except Exception:  # not yet: try again
                raise_if_cancelling()
                continue
            self._reset()

    async def aclose(self) -> None:
        """Stop the probe (if the breaker is open); the breaker itself keeps its state."""
        task, self._probe = self._probe, None
        await cancel_and_wait(task)


def guard_of(redis: Any) -> RedisGuard | None:
    """The guard of a client handed out by :attr:`RedisGuard.client`, else None."""
    return redis.guard if isinstance(redis, GuardedRedis) else None


class GuardedRedis:
    """An async Redis client whose every call goes through a :class:`RedisGuard`.

    Commands (``await client.hget(...)``), registered scripts and a pipeline's
    ``execute`` are guarded; building a pipeline is not (it is local). ``pubsub()`` fails
    at once while the breaker is open; the subscription itself is the caller's.
    """

    def __init__(self, redis: Any, guard: RedisGuard) -> None:
        self.raw = redis
        """The unguarded client."""
        self.guard = guard

    def register_script(self, script: str) -> GuardedScript:
        return GuardedScript(self.raw.register_script(script), self.guard)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> GuardedPipeline:
        return GuardedPipeline(self.raw.pipeline(transaction=transaction, shard_hint=shard_hint), self.guard)

    def pubsub(self, **kwargs: Any) -> Any:
        if self.guard.is_open:
            raise RedisUnavailable("Redis circuit breaker is open")
        return self.raw.pubsub(**kwargs)

    async def aclose(self) -> None:
        await self.raw.aclose()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.raw, name)
        if not callable(attribute):
            return attribute
        guard = self.guard

        async def command(*args: Any, **kwargs: Any) -> Any:
            return await guard.call(lambda: attribute(*args, **kwargs))

        return command


class GuardedScript:
    """A registered Lua script called through the guard."""

    def __init__(self, script: Any, guard: RedisGuard) -> None:
        self._script = script
        self._guard = guard

    async def __call__(self, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        return await self._guard.call(lambda: self._script(keys=keys, args=args, client=client))


class GuardedPipeline:
    """A pipeline whose ``execute`` goes through the guard (queuing commands is local)."""

    def __init__(self, pipe: Any, guard: RedisGuard) -> None:
        self._pipe = pipe
        self._guard = guard

    async def __aenter__(self) -> GuardedPipeline:
        await self._pipe.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._pipe.__aexit__(*exc_info)

    async def execute(self, raise_on_error: bool = True) -> Any:
        return await self._guard.call(lambda: self._pipe.execute(raise_on_error=raise_on_error))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)
