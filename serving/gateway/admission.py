"""Admission: one queue in Redis shared by every gateway replica, with a local fallback.

A request asks :meth:`Admission.acquire` for a :class:`Lease` before it may use an engine.
Over capacity it waits, ordered by priority class, then weighted fair share between
tenants (start-time fair queuing), then arrival (``queue_scripts`` has the data model).
Every state change is one Lua script, so two gateways never admit past capacity.

A lease weighs as many capacity slots as its request runs sequences (``n x prompts``,
priced by ``limits.py``): it is granted only when that many slots are free, and nothing
overtakes it meanwhile. A request heavier than the model's whole capacity is capped at the
capacity (it runs alone) rather than rejected: the capacity is summed over the engine
replicas the gateway has heard from and changes with them, so a 400 would depend on the
fleet's size of the moment (the tenant's ``max_n`` / ``max_prompts`` are the fixed caps).

Ownership: a granted request's lease has a TTL (``lease_ttl_s``) and a waiting request's
ticket a heartbeat (``ticket_heartbeat_s``); one background task per gateway renews all of
its leases and heartbeats in one round trip, so a crashed gateway's leases expire and its
queued tickets are dropped instead of granted: its capacity returns. The same task
releases, logs and counts (:attr:`Admission.reclaimed_total`) a lease held longer than
``max_lease_age_s``, the safety net for a request that never released its lease.

When Redis is unreachable the gateway falls back to :class:`LocalQueue`, the same policy
in process with this replica's share of the capacity, reports itself degraded, and goes
back to Redis as soon as Redis answers. Leases granted meanwhile are written to Redis by
the renewal task then, so accounting comes back with Redis; running requests never depend
on Redis to finish.

:meth:`Admission.stop` is the graceful shutdown: the waiting requests get a 503
``shutting_down`` and their tickets are cancelled in Redis, and the held leases are
released, in one bounded round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from serving.config import QueueConfig
from serving.gateway import queue_scripts as lua
from serving.gateway.errors import OverloadedError, RateLimitError
from serving.gateway.redis_batch import ScriptPipeline
from serving.gateway.tenants import PriorityClass, Tenant
from serving.tasks import cancel_and_wait, raise_if_cancelling

__all__ = ["Admission", "Lease", "LocalQueue", "QueueSnapshot", "RedisQueue", "Waiter"]

log = logging.getLogger("oss_serving.admission")

REDIS_DOWN = (RedisError, OSError, asyncio.TimeoutError)

CLEANUP_TIMEOUT_S = 5.0
"""Longest a ticket's cancellation (after a cancelled wait, at stop) may take."""

ABORTED = -4
"""``wait_granted``: the wait was aborted (the gateway stops)."""


@dataclass
class Lease:
    """The right to run one request on a model's engines."""

    ticket: str
    model: str
    tenant: str
    priority: PriorityClass
    granted_at: float
    waited_s: float
    backend: str
    """``redis`` or ``local`` (granted while Redis was away)."""
    released: bool = False
    request_id: str = "-"
    """The request that holds it (for the logs)."""
    weight: int = 1
    """Capacity slots it holds: the sequences its request runs (``n x prompts``), at most
    the model's capacity."""


@dataclass
class Waiter:
    """A request of this gateway waiting in the shared queue: its ticket's heartbeat is renewed."""

    ticket: str
    model: str
    tenant: str
    request_id: str
    since: float
    """When it arrived (``time.monotonic()``)."""
    aborted: bool = False
    """Set by :meth:`Admission.stop`: the request gets an error, its ticket is cancelled."""


@dataclass
class QueueSnapshot:
    """A model's queue as one gateway sees it (for metrics and health)."""

    depth: dict[str, int] = field(default_factory=dict)
    in_use: int = 0
    capacity: int = 0
    expired_total: int = 0
    """Leases that expired un-released (all gateways)."""
    service_s: float | None = None
    abandoned_total: int = 0
    """Waiting tickets dropped because their heartbeat expired (all gateways)."""
    reclaimed_total: int = 0
    """The model's leases this gateway released because they were held longer than
    ``max_lease_age_s``."""


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Keys:
    def __init__(self, prefix: str, model: str) -> None:
        tag = f"{{{prefix}:q:{model}}}"
        self.wait = f"{tag}:wait"
        self.meta = f"{tag}:meta"
        self.leases = f"{tag}:leases"
        self.lease_tenant = f"{tag}:lease_tenant"
        self.vt = f"{tag}:vt"
        self.rejected = f"{tag}:rejected"
        self.stats = f"{tag}:stats"
        self.hb = f"{tag}:hb"
        self.released = f"{tag}:released"
        self.lease_weight = f"{tag}:lease_weight"
        self.channel = f"{prefix}:q:{model}:grants"
        self.prefix = prefix

    def tenant_active(self, tenant: str) -> str:
        return f"{self.prefix}:t:{tenant}:active"

    def all(self, tenant: str) -> list[str]:
        return [
            self.wait,
            self.meta,
            self.leases,
            self.lease_tenant,
            self.vt,
            self.rejected,
            self.stats,
            self.tenant_active(tenant),
            self.hb,
            self.released,
            self.lease_weight,
        ]

    def renewal(self, tenant: str) -> list[str]:
        return [
            self.leases,
            self.lease_tenant,
            self.tenant_active(tenant),
            self.wait,
            self.hb,
            self.released,
            self.lease_weight,
        ]


class RedisQueue:
    """The shared queue: scripts, grant notifications, waiting."""

    def __init__(self, redis: Any, config: QueueConfig, capacity: Callable[[str], int]) -> None:
        self._redis = redis
        self._config = config
        self._capacity = capacity
        self._keys: dict[str, _Keys] = {}
        self._waiters: dict[str, asyncio.Event] = {}
        self._listener: asyncio.Task[None] | None = None
        self._listener_lock = asyncio.Lock()
        self._pubsub: Any = None
        self._seq = itertools.count()
        self._gateway_id = uuid.uuid4().hex[:8]
        # Every script call goes through one auto-pipeline: the calls of one loop turn
        # share a round trip (see ``redis_batch``).
        self._scripts = ScriptPipeline(
            redis,
            {
                "enqueue": lua.ENQUEUE,
                "check": lua.CHECK,
                "release": lua.RELEASE,
                "cancel": lua.CANCEL,
                "renew": lua.RENEW,
                "hold": lua.HOLD,
            },
        )

    def keys(self, model: str) -> _Keys:
        if model not in self._keys:
            self._keys[model] = _Keys(self._config.key_prefix, model)
        return self._keys[model]

    @property
    def ttl_ms(self) -> int:
        return int(self._config.lease_ttl_s * 1000)

    @property
    def heartbeat_ms(self) -> int:
        return int(self._config.ticket_heartbeat_s * 1000)

    def new_ticket(self) -> str:
        # Sorts by arrival (time, then a per-gateway counter) among equal scores.
        return f"{_now_ms():014d}-{next(self._seq):08d}-{self._gateway_id}"

    # --------------------------------------------------------------- grant notifications
    async def ensure_listener(self, models: list[str]) -> None:
        if self._listener is not None and not self._listener.done():
            return
        async with self._listener_lock:  # one listener, however many requests arrive at once
            if self._listener is not None and not self._listener.done():
                return
            if self._pubsub is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._pubsub.aclose(), 2.0)
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            await pubsub.subscribe(*(self.keys(m).channel for m in models))
            self._pubsub = pubsub
            self._listener = asyncio.create_task(self._listen(pubsub), name="oss-serving-grants")

    async def _listen(self, pubsub: Any) -> None:
        try:
            async for message in pubsub.listen():
                data = message.get("data")
                if isinstance(data, bytes):
                    data = data.decode()
                if not isinstance(data, str):
                    continue
                for ticket in data.split():
                    self.wake(ticket)
        except REDIS_DOWN:
            pass  # waiters fall back to polling; the listener is rebuilt on the next acquire

    def wake(self, ticket: str) -> None:
        """Make the request waiting for ``ticket`` (if any) look at it now."""
        event = self._waiters.get(ticket)
        if event is not None:
            event.set()

    async def close(self) -> None:
        """Stop listening for grants. Bounded: a pub/sub read that does not notice its
        cancellation is cut off by closing its connection."""
        task, self._listener = self._listener, None
        pubsub, self._pubsub = self._pubsub, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=2.0)
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pubsub.aclose(), 2.0)
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=2.0)
        await self._scripts.drain()

    # --------------------------------------------------------------- operations
    def _common(self, model: str) -> list[Any]:
        return [
            self._capacity(model),
            self.ttl_ms,
            self._config.max_grants_per_release,
            self.keys(model).channel,
        ]

    async def predicted_wait_s(self, model: str, priority: PriorityClass) -> float:
        keys = self.keys(model)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcount(keys.wait, "-inf", f"({(priority.rank + 1) * lua.LANE}")
            pipe.zcount(keys.leases, _now_ms(), "+inf")
            pipe.hvals(keys.lease_weight)
            pipe.hget(keys.stats, "ewma_ms")
            ahead, leases, heavy, ewma = await pipe.execute()
        capacity = self._capacity(model)
        in_use = _slots(leases, heavy)
        if in_use < capacity and int(ahead) == 0:
            return 0.0
        service_s = float(ewma) / 1000 if ewma is not None else 1.0
        return math.ceil((int(ahead) + 1) / capacity) * service_s

    async def enqueue(
        self, ticket: str, model: str, tenant: Tenant, drop_ms: int, weight: int = 1
    ) -> tuple[int, int]:
        """Queue ``ticket`` of ``weight`` slots (dropped at ``drop_ms`` if not granted by
        then): 1 granted, 0 waiting, -1 tenant concurrency limit; and its position."""
        keys = self.keys(model)
        limit = tenant.limits.max_concurrent_requests or 0
        status, position, _depth = await self._scripts.call(
            "enqueue",
            keys.all(tenant.id),
            [
                ticket,
                tenant.id,
                tenant.priority.rank,
                tenant.weight,
                drop_ms,
                _now_ms(),
                self._capacity(model),
                self.ttl_ms,
                self._config.max_grants_per_release,
                limit,
                keys.channel,
                lua.LANE,
                self.heartbeat_ms,
                max(1, weight),
                self._batch_limit(model) if tenant.priority is PriorityClass.batch else 0,
            ],
        )
        return int(status), int(position)

    def _batch_limit(self, model: str) -> int:
        """The slots of ``model`` that batch-priority requests may fill (``batch_reserve_share``)."""
        capacity = self._capacity(model)
        share = self._config.batch_reserve_share
        if capacity < 2 or share <= 0:
            return capacity
        return capacity - max(1, math.floor(capacity * share))

    async def check(self, ticket: str, model: str, tenant: str) -> int:
        return int(
            await self._scripts.call(
                "check",
                self.keys(model).all(tenant),
                [ticket, _now_ms(), *self._common(model), self.heartbeat_ms],
            )
        )

    async def release(self, lease: Lease, service_ms: int) -> None:
        await self._scripts.call(
            "release",
            self.keys(lease.model).all(lease.tenant),
            [lease.ticket, _now_ms(), *self._common(lease.model), service_ms],
        )

    async def cancel(self, ticket: str, model: str, tenant: str) -> int:
        return int(
            await self._scripts.call(
                "cancel", self.keys(model).all(tenant), [ticket, _now_ms(), *self._common(model)]
            )
        )

    async def hold(self, ticket: str, model: str, tenant: Tenant) -> bool:
        """Count ``ticket`` in its tenant's active set (see ``HOLD``); False at the limit."""
        limit = tenant.limits.max_concurrent_requests or 0
        key = self.keys(model).tenant_active(tenant.id)
        return int(await self._scripts.call("hold", [key], [ticket, _now_ms(), self.ttl_ms, limit])) == 1

    async def unhold(self, lease: Lease) -> None:
        await self._redis.zrem(self.keys(lease.model).tenant_active(lease.tenant), lease.ticket)

    async def renew_holds(self, holds: list[Lease]) -> None:
        """Push out the expiry of held entries that are still there (``XX``: a hold that
        Redis lost is not re-added; its request ends soon enough)."""
        if not holds:
            return
        expiry = _now_ms() + self.ttl_ms
        async with self._redis.pipeline(transaction=False) as pipe:
            for h in holds:
                pipe.zadd(self.keys(h.model).tenant_active(h.tenant), {h.ticket: expiry}, xx=True)
            await pipe.execute()

    async def renew(self, leases: list[Lease], waiters: list[Waiter] | None = None) -> tuple[int, int]:
        """Renew ``leases`` (re-adding lost ones, never released ones) and the heartbeats of
        ``waiters``: one script call per model and tenant, all in one round trip.

        Returns the number of leases skipped because they had been released meanwhile,
        and of waiters whose ticket no longer waits (granted, dropped or lost)."""
        groups: dict[tuple[str, str], tuple[list[tuple[str, int]], list[str]]] = {}
        for lease in leases:
            groups.setdefault((lease.model, lease.tenant), ([], []))[0].append((lease.ticket, lease.weight))
        for waiter in waiters or ():
            groups.setdefault((waiter.model, waiter.tenant), ([], []))[1].append(waiter.ticket)
        if not groups:
            return 0, 0
        now = _now_ms()
        key_ttl = max(self.ttl_ms, self.heartbeat_ms) * 4
        calls: list[Awaitable[Any]] = []
        for (model, tenant), (held, waiting) in groups.items():
            keys = self.keys(model).renewal(tenant)
            tickets: list[tuple[str, int | None]] = [*held, *((t, None) for t in waiting)]
            for i in range(0, len(tickets), lua.RENEW_BATCH):
                chunk = tickets[i : i + lua.RENEW_BATCH]
                chunk_held = [(t, w) for t, w in chunk if w is not None]
                chunk_waiting = [t for t, w in chunk if w is None]
                args = [tenant, now + self.ttl_ms, now + self.heartbeat_ms, key_ttl, len(chunk_held)]
                args += [t for t, _ in chunk_held] + [w for _, w in chunk_held]
                calls.append(self._scripts.call("renew", keys, [*args, *chunk_waiting]))
        results = await asyncio.gather(*calls)  # one round trip: the calls share a batch
        skipped = sum(int(r[1]) for r in results)
        unknown = sum(int(r[3]) for r in results)
        return skipped, unknown

    async def wait_granted(
        self,
        ticket: str,
        model: str,
        tenant: str,
        timeout_s: float,
        aborted: Callable[[], bool] | None = None,
    ) -> int:
        """Wait for ``ticket``: 1 granted, -2 dropped (deadline), -3 lost, ``ABORTED`` when
        ``aborted()`` turned true (checked at every wake-up, see :meth:`wake`); raises
        TimeoutError."""
        event = asyncio.Event()
        self._waiters[ticket] = event
        interval = self._config.poll_interval_s
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(event.wait(), interval)
                    event.clear()
                    if aborted is not None and aborted():
                        return ABORTED
                    state = await self.check(ticket, model, tenant)
                    if state != 0:
                        return state
                    interval = min(interval * 2, 1.0)  # notifications are the fast path
        finally:
            self._waiters.pop(ticket, None)

    async def snapshot(self, model: str) -> QueueSnapshot:
        keys = self.keys(model)
        async with self._redis.pipeline(transaction=False) as pipe:
            for p in PriorityClass:
                pipe.zcount(keys.wait, p.rank * lua.LANE, f"({(p.rank + 1) * lua.LANE}")
            pipe.zcount(keys.leases, _now_ms(), "+inf")  # expired ones are reaped by the next script
            pipe.hvals(keys.lease_weight)
            pipe.hmget(keys.stats, ["expired", "ewma_ms", "abandoned"])
            *depths, leases, heavy, (expired, ewma, abandoned) = await pipe.execute()
        return QueueSnapshot(
            depth={p.value: int(d) for p, d in zip(PriorityClass, depths, strict=True)},
            in_use=_slots(leases, heavy),
            capacity=self._capacity(model),
            expired_total=int(expired or 0),
            service_s=float(ewma) / 1000 if ewma is not None else None,
            abandoned_total=int(abandoned or 0),
        )


class LocalQueue:
    """The same policy in process: used per gateway replica while Redis is away.

    A request of weight ``k`` (the sequences it runs) is granted only when ``k`` slots are
    free (``k`` at most the capacity: a heavier one runs alone), and costs its tenant ``k``
    turns of its fair share; nothing overtakes the head of the queue while it waits for
    its slots.
    """

    def __init__(self, capacity: Callable[[str], int]) -> None:
        self._capacity = capacity
        self._heaps: dict[str, list[tuple[int, float, int, str]]] = {}
        self._running: dict[str, dict[str, int]] = {}
        """model -> granted ticket -> slots it holds."""
        self._weights: dict[str, int] = {}
        """Waiting ticket -> slots it asks for."""
        self._vnow: dict[tuple[str, int], float] = {}
        self._last: dict[tuple[str, str, int], float] = {}
        self._futures: dict[str, asyncio.Future[None]] = {}
        self._seq = itertools.count()

    def _admit(self, model: str) -> None:
        heap = self._heaps.setdefault(model, [])
        running = self._running.setdefault(model, {})
        capacity = self._capacity(model)
        used = sum(running.values())
        while heap:
            rank, start, _seq, ticket = heap[0]
            future = self._futures.get(ticket)
            if future is None or future.done():  # gone while it waited
                heapq.heappop(heap)
                self._futures.pop(ticket, None)
                self._weights.pop(ticket, None)
                continue
            weight = min(self._weights.get(ticket, 1), capacity)
            if used + weight > capacity:
                break  # the head waits for its slots; nothing overtakes it
            heapq.heappop(heap)
            del self._futures[ticket]
            self._weights.pop(ticket, None)
            running[ticket] = weight
            used += weight
            self._vnow[(model, rank)] = max(self._vnow.get((model, rank), 0.0), start)
            future.set_result(None)

    async def acquire(
        self, ticket: str, model: str, tenant: Tenant, timeout_s: float, weight: int = 1
    ) -> int:
        """Wait until ``ticket`` holds ``weight`` slots (at most the capacity); how many."""
        rank = tenant.priority.rank
        weight = max(1, min(weight, self._capacity(model)))
        start = max(self._vnow.get((model, rank), 0.0), self._last.get((model, tenant.id, rank), 0.0))
        self._last[(model, tenant.id, rank)] = start + weight / tenant.weight
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futures[ticket] = future
        self._weights[ticket] = weight
        heapq.heappush(self._heaps.setdefault(model, []), (rank, start, next(self._seq), ticket))
        self._admit(model)
        try:
            async with asyncio.timeout(timeout_s):
                await future
        except BaseException:
            self._futures.pop(ticket, None)
            self._weights.pop(ticket, None)
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(ticket, model)  # granted, but its request went away
            else:
                self._admit(model)  # a heavy head that left may have held up lighter ones
            raise
        return self._running.get(model, {}).get(ticket, weight)

    def abort_waiting(self, error: Callable[[], BaseException]) -> int:
        """Fail every waiting request with ``error()`` (the gateway stops); how many."""
        futures = [f for f in self._futures.values() if not f.done()]
        self._futures.clear()
        self._weights.clear()
        for future in futures:
            future.set_exception(error())
        return len(futures)

    def release(self, ticket: str, model: str) -> None:
        self._running.setdefault(model, {}).pop(ticket, None)
        self._admit(model)

    def snapshot(self, model: str) -> QueueSnapshot:
        depth = {p.value: 0 for p in PriorityClass}
        for rank, _start, _seq, ticket in self._heaps.get(model, []):
            future = self._futures.get(ticket)
            if future is not None and not future.done():
                depth[list(PriorityClass)[rank].value] += 1
        return QueueSnapshot(
            depth=depth,
            in_use=sum(self._running.get(model, {}).values()),
            capacity=self._capacity(model),
        )


class Admission:
    """The gateway's admission: Redis when it answers, the local queue when it does not.

    ``max_lease_age_s``: a lease held longer than this is released by the maintenance
    task, with a warning naming its request, and counted in :attr:`reclaimed_total` (a
    request that never released its lease would otherwise hold its slot until the gateway
    restarts). ``None``: never.
    """

    def __init__(
        self,
        redis: Any,
        config: QueueConfig,
        models: list[str],
        *,
        local_share: int = 1,
        max_lease_age_s: float | None = None,
    ) -> None:
        self._config = config
        self._models = list(models)
        self._capacity: dict[str, int] = dict.fromkeys(models, config.default_capacity)
        self._local_share = max(local_share, 1)
        self.redis_queue = RedisQueue(redis, config, self.capacity) if redis is not None else None
        self.local_queue = LocalQueue(self.local_capacity)
        self._leases: dict[str, Lease] = {}
        self._unreleased: dict[str, tuple[Lease, int]] = {}
        """Leases given back here whose Redis release failed (Redis away or slow): released
        in Redis again at every renewal until it answers (``RELEASE`` is idempotent), so a
        blip never leaves a slot held until the lease expires and a script reaps it."""
        self._waiting: dict[str, Waiter] = {}
        self._holds: dict[str, Lease] = {}
        """Requests running elsewhere (handed off) counted against their tenant's
        concurrency limit (:meth:`hold`): renewed with the leases, released like them."""
        self._degraded = redis is None
        self._task: asyncio.Task[None] | None = None
        self._redis = redis
        self._max_lease_age_s = max_lease_age_s
        self._closing = False
        self._cleanups: set[asyncio.Task[Any]] = set()
        self.reclaimed_total = 0
        """Leases released because they were held longer than ``max_lease_age_s`` (every model)."""
        self._reclaimed: dict[str, int] = {}

    # --------------------------------------------------------------- capacity & state
    def capacity(self, model: str) -> int:
        return self._capacity.get(model, self._config.default_capacity)

    def local_capacity(self, model: str) -> int:
        return max(1, math.ceil(self.capacity(model) / self._local_share))

    def set_capacity(self, model: str, capacity: int) -> None:
        self._capacity[model] = max(1, int(capacity))

    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable and admission is local to this gateway."""
        return self._degraded and self.redis_queue is not None

    def running(self) -> list[Lease]:
        return list(self._leases.values())

    def holding(self) -> list[Lease]:
        """This gateway's handed-off requests counted against their tenant's concurrency."""
        return list(self._holds.values())

    def waiting(self) -> list[Waiter]:
        """This gateway's requests waiting in the shared queue."""
        return list(self._waiting.values())

    # --------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._closing = False
        if self._task is None:
            self._task = asyncio.create_task(self._maintain(), name="oss-serving-admission")

    async def stop(self, *, release_leases: bool = True) -> None:
        """Graceful shutdown: renewal stops, new requests and waiting ones get a 503
        ``shutting_down``, the waiting ones' tickets are cancelled in Redis and (with
        ``release_leases``) the held leases are released, all in one round trip bounded by
        ``CLEANUP_TIMEOUT_S``. A request still running afterwards is no longer counted; its
        own release is a no-op. Without ``release_leases`` the held leases are left to
        their owners, or to expire within ``lease_ttl_s`` (nothing renews them any more).
        """
        self._closing = True
        task, self._task = self._task, None
        await cancel_and_wait(task)
        waiters = list(self._waiting.values())
        for waiter in waiters:
            waiter.aborted = True  # before any await: a waiter granted from now on gives up
            if self.redis_queue is not None:
                self.redis_queue.wake(waiter.ticket)
        self.local_queue.abort_waiting(_shutting_down)
        cleanup: list[Awaitable[Any]] = [self._cancel_ticket(w) for w in waiters]
        if release_leases:
            cleanup += [self.release(lease) for lease in [*self.running(), *self.holding()]]
            cleanup.append(self._release_again())
        if cleanup:
            log.info("admission stops: cancelling %d queued requests", len(waiters))
            await self._shielded(asyncio.gather(*cleanup, return_exceptions=True))
        if self.redis_queue is not None:
            await self.redis_queue.close()

    async def _maintain(self) -> None:
        """Every third of the shorter of lease TTL and ticket heartbeat: release leases held
        too long, renew every running lease (re-adding lost ones) and every waiting ticket's
        heartbeat in one round trip, and watch for Redis coming back."""
        period = min(self._config.lease_ttl_s, self._config.ticket_heartbeat_s) / 3
        while True:
            await asyncio.sleep(min(period, 1.0) if self._degraded else period)
            await self._reclaim_old_leases()
            if self.redis_queue is None:
                continue
            try:
                await self._release_again()
                await self.redis_queue.renew(self.running(), self.waiting())
                await self.redis_queue.renew_holds(self.holding())
                if self._degraded:
                    log.warning("Redis answers again: admission is shared again")
                self._degraded = False
            except REDIS_DOWN as exc:
                if not self._degraded:
                    log.warning("Redis unreachable (%s): admitting locally", exc)
                self._degraded = True
            raise_if_cancelling()  # renewal keeps going on Redis errors, a hidden cancel among them

    async def _release_again(self) -> None:
        """Release in Redis the leases whose release failed earlier (see ``_unreleased``)."""
        queue = self.redis_queue
        if queue is None or not self._unreleased:
            return
        pending = list(self._unreleased.values())
        await asyncio.gather(*(queue.release(lease, service_ms) for lease, service_ms in pending))
        for lease, _ in pending:
            self._unreleased.pop(lease.ticket, None)
        log.info("released %d leases in Redis that an earlier Redis error had left held", len(pending))

    @property
    def unreleased(self) -> int:
        """Leases released here whose Redis release has not gone through yet."""
        return len(self._unreleased)

    async def _reclaim_old_leases(self) -> None:
        if self._max_lease_age_s is None:
            return
        now = time.monotonic()
        held = [*self._leases.values(), *self._holds.values()]
        old = [lease for lease in held if now - lease.granted_at > self._max_lease_age_s]
        for lease in old:
            self.reclaimed_total += 1
            self._reclaimed[lease.model] = self._reclaimed.get(lease.model, 0) + 1
            log.warning(
                "request %s held its lease (model %s, tenant %s) for %.0f s, longer than %g s: "
                "released (it never released it itself)",
                lease.request_id,
                lease.model,
                lease.tenant,
                now - lease.granted_at,
                self._max_lease_age_s,
            )
        if old:
            await asyncio.gather(*(self.release(lease) for lease in old))

    # --------------------------------------------------------------- requests
    async def predicted_wait_s(self, model: str, priority: PriorityClass = PriorityClass.standard) -> float:
        """Seconds a new request of ``priority`` would wait now (0 when capacity is free)."""
        if self.redis_queue is not None and not self._degraded:
            try:
                return await self.redis_queue.predicted_wait_s(model, priority)
            except REDIS_DOWN:
                self._degraded = True
        snap = self.local_queue.snapshot(model)
        waiting = sum(snap.depth.values())
        return 0.0 if snap.in_use < snap.capacity and waiting == 0 else float(waiting + 1) / snap.capacity

    async def acquire(
        self,
        model: str,
        tenant: Tenant,
        deadline_s: float | None,
        request_id: str = "-",
        *,
        weight: int = 1,
    ) -> Lease:
        """Wait for a lease of ``weight`` slots (the sequences the request runs; a request
        heavier than the model's whole capacity is capped at it and runs alone); raise
        RateLimitError (tenant concurrency) or OverloadedError."""
        if self._closing:
            raise _shutting_down()
        budget = deadline_s if deadline_s is not None else self._config.max_wait_s
        arrived = time.monotonic()
        if self.redis_queue is not None and not self._degraded:
            try:
                return await self._acquire_redis(
                    model,
                    tenant,
                    budget,
                    deadline_s is not None,
                    arrived,
                    request_id,
                    max(1, min(weight, self.capacity(model))),
                )
            except REDIS_DOWN as exc:
                log.warning("Redis unreachable (%s): admitting locally", exc)
                self._degraded = True
        return await self._acquire_local(model, tenant, budget, arrived, request_id, weight)

    async def hold(self, model: str, tenant: Tenant, request_id: str = "-") -> Lease:
        """Count a request that runs elsewhere (handed off upstream) against its tenant's
        concurrency limit, as queued and running local requests are, without taking any of
        ``model``'s engine capacity: raise RateLimitError at the limit. Release it with
        :meth:`release` like a lease. While Redis is away the hold is granted (each
        replica's local admission does not count tenants either)."""
        if self._closing:
            raise _shutting_down()
        queue = self.redis_queue
        ticket = f"hold-{uuid.uuid4().hex}"
        lease = Lease(ticket, model, tenant.id, tenant.priority, time.monotonic(), 0.0, "hold",
                      request_id=request_id, weight=0)  # fmt: skip
        if not tenant.limits.max_concurrent_requests or queue is None or self._degraded:
            lease.released = True  # nothing to count, nothing to give back
            return lease
        try:
            held = await queue.hold(ticket, model, tenant)
        except REDIS_DOWN as exc:
            log.warning("Redis unreachable (%s): handoff not counted for tenant concurrency", exc)
            self._degraded = True
            lease.released = True
            return lease
        if not held:
            raise _concurrency_limit(tenant)
        self._holds[ticket] = lease
        return lease

    async def _acquire_redis(
        self,
        model: str,
        tenant: Tenant,
        budget: float,
        has_deadline: bool,
        arrived: float,
        request_id: str,
        weight: int,
    ) -> Lease:
        queue = self.redis_queue
        assert queue is not None
        await queue.ensure_listener(self._models)
        if has_deadline:
            predicted = await queue.predicted_wait_s(model, tenant.priority)
            if predicted > budget:
                raise OverloadedError(
                    f"the request cannot start within its deadline of {budget:g} s "
                    f"(predicted wait {predicted:.1f} s)",
                    code="deadline_unreachable",
                    headers={"Retry-After": str(max(1, math.ceil(predicted)))},
                )
        if self._closing:  # stop() came while this request looked at the queue
            raise _shutting_down()
        ticket = queue.new_ticket()
        # Always a finite drop time: without a deadline, the longest queue wait.
        drop_ms = _now_ms() + int(budget * 1000)
        waiter = Waiter(ticket, model, tenant.id, request_id, arrived)
        self._waiting[ticket] = waiter  # heartbeated from now on
        try:
            status = await self._enqueue(queue, waiter, tenant, drop_ms, weight)
            if waiter.aborted:  # stop() came meanwhile; its cancel may have run before the enqueue
                await self._cancel_ticket(waiter)
                raise _shutting_down()
            if status == -1:
                raise _concurrency_limit(tenant)
            if status == 0:
                try:
                    state = await queue.wait_granted(
                        ticket, model, tenant.id, budget, aborted=lambda: waiter.aborted
                    )
                except BaseException as exc:
                    # Timed out or the client went away: take the ticket out (or give the
                    # lease back if it was granted in the meantime).
                    await self._cancel_ticket(waiter)
                    if isinstance(exc, TimeoutError):
                        raise _waited_too_long(budget, has_deadline) from None
                    raise
                if state == ABORTED or waiter.aborted:
                    raise _shutting_down()  # stop() cancels its ticket, or gives its lease back
                if state == -2:
                    raise _waited_too_long(budget, has_deadline)
                if state == -3:  # Redis lost our ticket (restart): queue again locally
                    raise RedisError("ticket lost")
            # No await from here on: the lease is in ``_leases`` before the waiter leaves.
            return self._hold(ticket, model, tenant, arrived, "redis", request_id, weight)
        finally:
            self._waiting.pop(ticket, None)

    async def _enqueue(
        self, queue: RedisQueue, waiter: Waiter, tenant: Tenant, drop_ms: int, weight: int = 1
    ) -> int:
        """ENQUEUE; when the caller is cancelled meanwhile, the script runs all the same (its
        call is in a batch already): once it has, the ticket is cancelled again, shielded."""
        call = asyncio.ensure_future(queue.enqueue(waiter.ticket, waiter.model, tenant, drop_ms, weight))
        try:
            status, _position = await asyncio.shield(call)
        except asyncio.CancelledError:

            async def cancel_when_enqueued() -> None:
                with contextlib.suppress(Exception):
                    await call
                await self._cancel_ticket(waiter)

            await self._shielded(cancel_when_enqueued())
            raise
        return status

    async def _cancel_ticket(self, waiter: Waiter) -> None:
        """Cancel ``waiter``'s ticket in Redis (or give back its lease, if granted): shielded
        from the caller's cancellation, bounded, and quiet when Redis is away (the ticket's
        heartbeat then expires by itself)."""
        queue = self.redis_queue
        if queue is None:
            return
        await self._shielded(queue.cancel(waiter.ticket, waiter.model, waiter.tenant))

    async def _shielded(self, work: Awaitable[Any]) -> None:
        """Wait for ``work``, which runs to its end even if the caller is cancelled meanwhile
        (the cancellation reaches the caller at once, the work goes on); bounded by
        ``CLEANUP_TIMEOUT_S``; its errors are logged, not raised."""
        task = asyncio.ensure_future(_bounded(work, CLEANUP_TIMEOUT_S))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        await asyncio.shield(task)

    async def _acquire_local(
        self, model: str, tenant: Tenant, budget: float, arrived: float, request_id: str, weight: int = 1
    ) -> Lease:
        if self._closing:
            raise _shutting_down()
        ticket = f"local-{uuid.uuid4().hex}"
        try:
            slots = await self.local_queue.acquire(ticket, model, tenant, budget, weight)
        except TimeoutError:
            raise _waited_too_long(budget, False) from None
        return self._hold(ticket, model, tenant, arrived, "local", request_id, slots)

    def _hold(
        self,
        ticket: str,
        model: str,
        tenant: Tenant,
        arrived: float,
        backend: str,
        request_id: str,
        weight: int,
    ) -> Lease:
        """The granted lease, kept (renewed, reclaimed, released) from now on."""
        now = time.monotonic()
        lease = Lease(
            ticket,
            model,
            tenant.id,
            tenant.priority,
            now,
            now - arrived,
            backend,
            request_id=request_id,
            weight=weight,
        )
        self._leases[ticket] = lease
        return lease

    async def release(self, lease: Lease) -> None:
        """Give the capacity back (idempotent); grants waiting requests together."""
        if lease.released:
            return
        lease.released = True
        if lease.backend == "hold":
            await self._unhold(lease)
            return
        self._leases.pop(lease.ticket, None)
        service_ms = int((time.monotonic() - lease.granted_at) * 1000)
        if lease.backend == "local":
            self.local_queue.release(lease.ticket, lease.model)
        if self.redis_queue is None:
            return
        service_ms = service_ms if lease.backend == "redis" else -1
        try:
            # A locally granted lease may have been written to Redis by the renewal task.
            await self.redis_queue.release(lease, service_ms)
        except REDIS_DOWN:
            self._degraded = True
            # Released again at the next renewal that reaches Redis (or, if this gateway
            # dies first, its Redis lease expires by itself: nothing renews it any more).
            self._unreleased[lease.ticket] = (lease, service_ms)

    async def _unhold(self, lease: Lease) -> None:
        self._holds.pop(lease.ticket, None)
        if self.redis_queue is None:
            return
        try:
            await self.redis_queue.unhold(lease)
        except REDIS_DOWN:
            self._degraded = True  # the entry expires within the lease TTL: nothing renews it

    async def snapshot(self, model: str) -> QueueSnapshot:
        snap: QueueSnapshot | None = None
        if self.redis_queue is not None and not self._degraded:
            try:
                snap = await self.redis_queue.snapshot(model)
            except REDIS_DOWN:
                self._degraded = True
        if snap is None:
            snap = self.local_queue.snapshot(model)
        snap.reclaimed_total = self._reclaimed.get(model, 0)
        return snap


def _slots(leases: Any, heavy: Any) -> int:
    """Slots in use: one per lease, plus ``weight - 1`` per heavier lease (``lease_weight``)."""
    return int(leases) + sum(max(int(w) - 1, 0) for w in heavy or ())


async def _bounded(work: Awaitable[Any], timeout_s: float) -> None:
    try:
        await asyncio.wait_for(work, timeout_s)
    except REDIS_DOWN as exc:
        log.debug("admission clean-up did not reach Redis (%s)", exc)
    except Exception:
        log.exception("admission clean-up failed")


def _concurrency_limit(tenant: Tenant) -> RateLimitError:
    return RateLimitError(
        f"tenant concurrency limit of {tenant.limits.max_concurrent_requests} requests reached",
        limit="concurrency",
        headers={"Retry-After": "1"},
    )


def _shutting_down() -> OverloadedError:
    return OverloadedError(
        "the gateway is shutting down; retry the request",
        code="shutting_down",
        headers={"Retry-After": "1"},
    )


def _waited_too_long(budget: float, has_deadline: bool) -> OverloadedError:
    what = "its deadline" if has_deadline else "the longest queue wait"
    return OverloadedError(
        f"the request could not start within {what} of {budget:g} s; the model is overloaded",
        code="queue_timeout",
        headers={"Retry-After": str(max(1, math.ceil(min(budget, 30))))},
    )
