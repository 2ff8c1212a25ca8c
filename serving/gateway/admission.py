"""Admission: one queue in Redis shared by every gateway replica, with a local fallback.

A request asks :meth:`Admission.acquire` for a :class:`Lease` before it may use an engine.
Over capacity it waits, ordered by priority class, then weighted fair share between
tenants (start-time fair queuing), then arrival (``queue_scripts`` has the data model).
Every state change is one Lua script, so two gateways never admit past capacity. A
granted request's lease has a TTL; one background task per gateway renews all of its
leases, so a crashed gateway's leases expire and their capacity returns.

When Redis is unreachable the gateway falls back to :class:`LocalQueue`, the same policy
in process with this replica's share of the capacity, reports itself degraded, and goes
back to Redis as soon as Redis answers. Leases granted meanwhile are written to Redis by
the renewal task then, so accounting comes back with Redis; running requests never depend
on Redis to finish.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from serving.config import QueueConfig
from serving.gateway import queue_scripts as lua
from serving.gateway.errors import OverloadedError, RateLimitError
from serving.gateway.redis_batch import ScriptPipeline
from serving.gateway.tenants import PriorityClass, Tenant
from serving.tasks import cancel_and_wait, raise_if_cancelling

__all__ = ["Admission", "Lease", "LocalQueue", "QueueSnapshot", "RedisQueue"]

log = logging.getLogger("oss_serving.admission")

REDIS_DOWN = (RedisError, OSError, asyncio.TimeoutError)


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


@dataclass
class QueueSnapshot:
    """A model's queue as one gateway sees it (for metrics and health)."""

    depth: dict[str, int] = field(default_factory=dict)
    in_use: int = 0
    capacity: int = 0
    expired_total: int = 0
    service_s: float | None = None


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
            },
        )

    def keys(self, model: str) -> _Keys:
        if model not in self._keys:
            self._keys[model] = _Keys(self._config.key_prefix, model)
        return self._keys[model]

    @property
    def ttl_ms(self) -> int:
        return int(self._config.lease_ttl_s * 1000)

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
                    event = self._waiters.get(ticket)
                    if event is not None:
                        event.set()
        except REDIS_DOWN:
            pass  # waiters fall back to polling; the listener is rebuilt on the next acquire

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
            pipe.zcard(keys.leases)
            pipe.hget(keys.stats, "ewma_ms")
            ahead, in_use, ewma = await pipe.execute()
        capacity = self._capacity(model)
        if int(in_use) < capacity and int(ahead) == 0:
            return 0.0
        service_s = float(ewma) / 1000 if ewma is not None else 1.0
        return math.ceil((int(ahead) + 1) / capacity) * service_s

    async def enqueue(self, ticket: str, model: str, tenant: Tenant, deadline_ms: int) -> tuple[int, int]:
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
                deadline_ms,
                _now_ms(),
                self._capacity(model),
                self.ttl_ms,
                self._config.max_grants_per_release,
                limit,
                keys.channel,
                lua.LANE,
            ],
        )
        return int(status), int(position)

    async def check(self, ticket: str, model: str, tenant: str) -> int:
        return int(
            await self._scripts.call(
                "check", self.keys(model).all(tenant), [ticket, _now_ms(), *self._common(model)]
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

    async def renew(self, leases: list[Lease]) -> None:
        if not leases:
            return
        expiry = _now_ms() + self.ttl_ms
        renewals = []
        for lease in leases:
            keys = self.keys(lease.model)
            renewals.append(
                self._scripts.call(
                    "renew",
                    [keys.leases, keys.lease_tenant, keys.tenant_active(lease.tenant)],
                    [lease.ticket, lease.tenant, expiry, self.ttl_ms],
                )
            )
        await asyncio.gather(*renewals)  # one round trip: the calls share a batch

    async def wait_granted(self, ticket: str, model: str, tenant: str, timeout_s: float) -> int:
        """Wait for ``ticket``: 1 granted, -2 dropped (deadline), -3 lost; raises TimeoutError."""
        event = asyncio.Event()
        self._waiters[ticket] = event
        interval = self._config.poll_interval_s
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(event.wait(), interval)
                    event.clear()
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
            pipe.zcard(keys.leases)
            pipe.hget(keys.stats, "expired")
            pipe.hget(keys.stats, "ewma_ms")
            *depths, in_use, expired, ewma = await pipe.execute()
        return QueueSnapshot(
            depth={p.value: int(d) for p, d in zip(PriorityClass, depths, strict=True)},
            in_use=int(in_use),
            capacity=self._capacity(model),
            expired_total=int(expired or 0),
            service_s=float(ewma) / 1000 if ewma is not None else None,
        )


class LocalQueue:
    """The same policy in process: used per gateway replica while Redis is away."""

    def __init__(self, capacity: Callable[[str], int]) -> None:
        self._capacity = capacity
        self._heaps: dict[str, list[tuple[int, float, int, str]]] = {}
        self._running: dict[str, set[str]] = {}
        self._vnow: dict[tuple[str, int], float] = {}
        self._last: dict[tuple[str, str, int], float] = {}
        self._futures: dict[str, asyncio.Future[None]] = {}
        self._seq = itertools.count()

    def _admit(self, model: str) -> None:
        heap = self._heaps.setdefault(model, [])
        running = self._running.setdefault(model, set())
        while heap and len(running) < self._capacity(model):
            rank, start, _seq, ticket = heapq.heappop(heap)
            future = self._futures.pop(ticket, None)
            if future is None or future.done():
                continue
            running.add(ticket)
            self._vnow[(model, rank)] = max(self._vnow.get((model, rank), 0.0), start)
            future.set_result(None)

    async def acquire(self, ticket: str, model: str, tenant: Tenant, timeout_s: float) -> None:
        rank = tenant.priority.rank
        start = max(self._vnow.get((model, rank), 0.0), self._last.get((model, tenant.id, rank), 0.0))
        self._last[(model, tenant.id, rank)] = start + 1.0 / tenant.weight
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futures[ticket] = future
        heapq.heappush(self._heaps.setdefault(model, []), (rank, start, next(self._seq), ticket))
        self._admit(model)
        try:
            async with asyncio.timeout(timeout_s):
                await future
        except BaseException:
            self._futures.pop(ticket, None)
            if future.done() and not future.cancelled():
                self.release(ticket, model)
            raise

    def release(self, ticket: str, model: str) -> None:
        self._running.setdefault(model, set()).discard(ticket)
        self._admit(model)

    def snapshot(self, model: str) -> QueueSnapshot:
        depth = {p.value: 0 for p in PriorityClass}
        for rank, *_ in self._heaps.get(model, []):
            depth[list(PriorityClass)[rank].value] += 1
        return QueueSnapshot(
            depth=depth, in_use=len(self._running.get(model, ())), capacity=self._capacity(model)
        )


class Admission:
    """The gateway's admission: Redis when it answers, the local queue when it does not."""

    def __init__(self, redis: Any, config: QueueConfig, models: list[str], *, local_share: int = 1) -> None:
        self._config = config
        self._models = list(models)
        self._capacity: dict[str, int] = dict.fromkeys(models, config.default_capacity)
        self._local_share = max(local_share, 1)
        self.redis_queue = RedisQueue(redis, config, self.capacity) if redis is not None else None
        self.local_queue = LocalQueue(self.local_capacity)
        self._leases: dict[str, Lease] = {}
        self._degraded = redis is None
        self._task: asyncio.Task[None] | None = None
        self._redis = redis

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

    # --------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._maintain(), name="oss-serving-admission")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self.redis_queue is not None:
            await self.redis_queue.close()

    async def _maintain(self) -> None:
        """Renew every running lease (re-adding lost ones) and watch for Redis coming back."""
        period = self._config.lease_ttl_s / 3
        while True:
            await asyncio.sleep(min(period, 1.0) if self._degraded else period)
            if self.redis_queue is None:
                continue
            try:
                await self.redis_queue.renew(self.running())
                if self._degraded:
                    log.warning("Redis answers again: admission is shared again")
                self._degraded = False
            except REDIS_DOWN as exc:
                if not self._degraded:
                    log.warning("Redis unreachable (%s): admitting locally", exc)
                self._degraded = True
            raise_if_cancelling()  # renewal keeps going on Redis errors, a hidden cancel among them

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

    async def acquire(self, model: str, tenant: Tenant, deadline_s: float | None) -> Lease:
        """Wait for a lease; raise RateLimitError (tenant concurrency) or OverloadedError."""
        budget = deadline_s if deadline_s is not None else self._config.max_wait_s
        arrived = time.monotonic()
        if self.redis_queue is not None and not self._degraded:
            try:
                return await self._acquire_redis(model, tenant, budget, deadline_s is not None, arrived)
            except REDIS_DOWN as exc:
                log.warning("Redis unreachable (%s): admitting locally", exc)
                self._degraded = True
        return await self._acquire_local(model, tenant, budget, arrived)

    async def _acquire_redis(
        self, model: str, tenant: Tenant, budget: float, has_deadline: bool, arrived: float
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
        ticket = queue.new_ticket()
        deadline_ms = _now_ms() + int(budget * 1000) if has_deadline else 0
        status, _position = await queue.enqueue(ticket, model, tenant, deadline_ms)
        if status == -1:
            raise RateLimitError(
                f"tenant concurrency limit of {tenant.limits.max_concurrent_requests} requests reached",
                code="concurrency_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        if status == 0:
            try:
                state = await queue.wait_granted(ticket, model, tenant.id, budget)
            except BaseException as exc:
                # Timed out or the client went away: take the ticket out (or give the lease
                # back if it was granted in the meantime).
                with contextlib.suppress(*REDIS_DOWN):
                    await asyncio.shield(queue.cancel(ticket, model, tenant.id))
                if isinstance(exc, TimeoutError):
                    raise _waited_too_long(budget, has_deadline) from None
                raise
            if state == -2:
                raise _waited_too_long(budget, has_deadline)
            if state == -3:  # Redis lost our ticket (restart): queue again locally
                raise RedisError("ticket lost")
        lease = Lease(
            ticket, model, tenant.id, tenant.priority, time.monotonic(), time.monotonic() - arrived, "redis"
        )
        self._leases[ticket] = lease
        return lease

    async def _acquire_local(self, model: str, tenant: Tenant, budget: float, arrived: float) -> Lease:
        ticket = f"local-{uuid.uuid4().hex}"
        try:
            await self.local_queue.acquire(ticket, model, tenant, budget)
        except TimeoutError:
            raise _waited_too_long(budget, False) from None
        lease = Lease(
            ticket, model, tenant.id, tenant.priority, time.monotonic(), time.monotonic() - arrived, "local"
        )
        self._leases[ticket] = lease
        return lease

    async def release(self, lease: Lease) -> None:
        """Give the capacity back (idempotent); grants waiting requests together."""
        if lease.released:
            return
        lease.released = True
        self._leases.pop(lease.ticket, None)
        service_ms = int((time.monotonic() - lease.granted_at) * 1000)
        if lease.backend == "local":
            self.local_queue.release(lease.ticket, lease.model)
        if self.redis_queue is None:
            return
        try:
            # A locally granted lease may have been written to Redis by the renewal task.
            await self.redis_queue.release(lease, service_ms if lease.backend == "redis" else -1)
        except REDIS_DOWN:
            self._degraded = True  # its Redis lease, if any, expires by itself

    async def snapshot(self, model: str) -> QueueSnapshot:
        if self.redis_queue is not None and not self._degraded:
            try:
                return await self.redis_queue.snapshot(model)
            except REDIS_DOWN:
                self._degraded = True
        return self.local_queue.snapshot(model)


def _waited_too_long(budget: float, has_deadline: bool) -> OverloadedError:
    what = "its deadline" if has_deadline else "the longest queue wait"
    return OverloadedError(
        f"the request could not start within {what} of {budget:g} s; the model is overloaded",
        code="queue_timeout",
        headers={"Retry-After": str(max(1, math.ceil(min(budget, 30))))},
    )
