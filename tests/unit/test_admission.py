"""Admission ownership against the real Redis: ticket heartbeats, tenant concurrency while
queued, RENEW vs RELEASE, cancelled enqueue, the lease age limit and graceful stop.

Each test uses a key prefix of its own on the unit tests' Redis (conftest: 6379 or a private one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from serving.config import QueueConfig
from serving.gateway.admission import Admission, Lease
from serving.gateway.errors import OverloadedError, RateLimitError
from serving.gateway.tenants import Tenant, TenantLimits


@pytest.fixture
async def prefix(redis_client: aioredis.Redis) -> AsyncIterator[str]:
    name = f"tadm{uuid.uuid4().hex[:10]}"
    yield name
    keys = [k async for k in redis_client.scan_iter(match=f"*{name}*")]
    if keys:
        await redis_client.delete(*keys)


class Gateway:
    """One gateway's admission over the shared Redis, with the test's key prefix."""

    def __init__(self, client: aioredis.Redis, prefix: str, capacity: int = 1, **kw: Any) -> None:
        max_age = kw.pop("max_lease_age_s", None)
        self.config = QueueConfig(default_capacity=capacity, key_prefix=prefix, **kw)
        self.admission = Admission(client, self.config, ["m"], max_lease_age_s=max_age)
        self.client = client
        self.tag = f"{{{prefix}:q:m}}"
        self.prefix = prefix

    @property
    def queue(self) -> Any:
        assert self.admission.redis_queue is not None
        return self.admission.redis_queue

    async def wait_set(self) -> list[str]:
        return _strs(await self.client.zrange(f"{self.tag}:wait", 0, -1))

    async def leases(self) -> list[str]:
        return _strs(await self.client.zrange(f"{self.tag}:leases", 0, -1))

    async def tenant_active(self, tenant: str) -> list[str]:
        """The tenant's counted requests (entries not expired yet)."""
        key = f"{self.prefix}:t:{tenant}:active"
        now = int(time.time() * 1000)
        return _strs(await self.client.zrangebyscore(key, now, "+inf"))

    async def stat(self, name: str) -> int:
        return int(await self.client.hget(f"{self.tag}:stats", name) or 0)


def _strs(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


async def _until(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------ ticket heartbeats
async def test_a_dead_gateways_ticket_is_dropped_not_granted(
    redis_client: aioredis.Redis, prefix: str
) -> None:
    live = Gateway(redis_client, prefix, ticket_heartbeat_s=0.3, lease_ttl_s=10.0)
    dead = Gateway(redis_client, prefix, ticket_heartbeat_s=0.3, lease_ttl_s=10.0)
    holder = await live.admission.acquire("m", Tenant(id="a"), None)
    # The dead gateway queued a ticket and then stopped renewing it (as if SIGKILLed).
    ghost = dead.queue.new_ticket()
    assert await dead.queue.enqueue(ghost, "m", Tenant(id="g"), int(time.time() * 1000) + 60_000) == (0, 0)
    waiter = asyncio.create_task(live.admission.acquire("m", Tenant(id="b"), None))
    await _until(lambda: _len_is(live.wait_set(), 2))
    await asyncio.sleep(0.5)  # past the ghost's heartbeat; the live waiter checks (renews) itself
    await live.admission.release(holder)
    lease = await asyncio.wait_for(waiter, 2.0)
    assert lease.tenant == "b"  # the freed slot went to the live request, not the ghost
    assert ghost not in await live.leases()
    assert await live.wait_set() == []
    assert await live.stat("abandoned") == 1
    assert (await live.admission.snapshot("m")).abandoned_total == 1
    assert await redis_client.zcard(f"{live.tag}:hb") == 0
    await live.admission.release(lease)


async def _len_is(value: Any, n: int) -> bool:
    return len(await value) == n


async def test_the_maintenance_task_keeps_a_waiting_ticket_alive(
    redis_client: aioredis.Redis, prefix: str
) -> None:
    # No polling (a check renews the heartbeat too): only the maintenance task renews it.
    gw = Gateway(redis_client, prefix, ticket_heartbeat_s=0.3, lease_ttl_s=10.0, poll_interval_s=30.0)
    other = Gateway(redis_client, prefix, ticket_heartbeat_s=0.3, lease_ttl_s=10.0)
    await gw.admission.start()
    try:
        holder = await other.admission.acquire("m", Tenant(id="a"), None)
        waiter = asyncio.create_task(gw.admission.acquire("m", Tenant(id="b"), None))
        await _until(lambda: _len_is(gw.wait_set(), 1))
        assert [w.tenant for w in gw.admission.waiting()] == ["b"]
        await asyncio.sleep(1.2)  # four heartbeat timeouts
        assert len(await gw.wait_set()) == 1
        assert len(await gw.tenant_active("b")) == 1
        await other.admission.release(holder)  # its grant wakes the waiter (no poll)
        lease = await asyncio.wait_for(waiter, 2.0)
        assert lease.tenant == "b"
        assert await gw.stat("abandoned") == 0
        assert gw.admission.waiting() == []
        await gw.admission.release(lease)
    finally:
        await gw.admission.stop()


async def test_a_ticket_without_deadline_still_has_a_drop_time(
    redis_client: aioredis.Redis, prefix: str
) -> None:
    gw = Gateway(redis_client, prefix, max_wait_s=30.0)
    holder = await gw.admission.acquire("m", Tenant(id="a"), None)
    waiter = asyncio.create_task(gw.admission.acquire("m", Tenant(id="b"), None))
    await _until(lambda: _len_is(gw.wait_set(), 1))
    (ticket,) = await gw.wait_set()
    raw = await redis_client.hget(f"{gw.tag}:meta", ticket)
    assert raw is not None
    drop = json.loads(raw)["d"]
    assert abs(drop - (time.time() * 1000 + 30_000)) < 2_000  # now + max_wait_s
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert await gw.wait_set() == []
    await gw.admission.release(holder)


# ------------------------------------------------------------------ tenant concurrency
async def test_queued_requests_stay_within_the_tenant_concurrency_limit(
    redis_client: aioredis.Redis, prefix: str
) -> None:
    gw = Gateway(redis_client, prefix, lease_ttl_s=0.6, ticket_heartbeat_s=0.6, poll_interval_s=30.0)
    await gw.admission.start()
    capped = Tenant(id="capped", limits=TenantLimits(max_concurrent_requests=2))
    try:
        holder = await gw.admission.acquire("m", Tenant(id="x"), None)
        waiters = [asyncio.create_task(gw.admission.acquire("m", capped, None)) for _ in range(2)]
        await _until(lambda: _len_is(gw.wait_set(), 2))
        await asyncio.sleep(1.5)  # longer than the lease TTL and the heartbeat
        assert len(await gw.tenant_active("capped")) == 2
        with pytest.raises(RateLimitError):
            await gw.admission.acquire("m", capped, None)
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert await gw.tenant_active("capped") == []
        await gw.admission.release(holder)
    finally:
        await gw.admission.stop()


# ------------------------------------------------------------------ RENEW vs RELEASE
async def test_renew_sent_with_release_does_not_bring_the_lease_back(
    redis_client: aioredis.Redis, prefix: str
) -> None:
    gw = Gateway(redis_client, prefix, capacity=2)
    lease = await gw.admission.acquire("m", Tenant(id="a"), None)
    assert await gw.leases() == [lease.ticket]
    # The maintenance task takes its snapshot of the running leases and issues RENEW; in
    # the same loop turn the request releases its lease. RENEW's calls start one turn
    # later, so RELEASE goes out first and RENEW after it, in the same batch.
    snapshot = gw.admission.running()
    batches = gw.queue._scripts.batches
    renew = asyncio.create_task(gw.queue.renew(snapshot))
    release = asyncio.create_task(gw.admission.release(lease))
    await asyncio.gather(release, renew)
    assert gw.queue._scripts.batches == batches + 1  # one round trip: the race is real
    assert renew.result() == (1, 0)  # RELEASE ran first; RENEW skipped the released lease
    assert await gw.leases() == []  # no ghost lease
    assert await gw.tenant_active("a") == []
    assert (await gw.admission.snapshot("m")).in_use == 0
    # A renewal arriving later still finds the tombstone.
    assert await gw.queue.renew(snapshot) == (1, 0)
    assert await gw.leases() == []


async def test_renew_still_restores_a_lease_redis_lost(redis_client: aioredis.Redis, prefix: str) -> None:
    gw = Gateway(redis_client, prefix, capacity=2)
    lease = await gw.admission.acquire("m", Tenant(id="a"), None)
    await redis_client.delete(f"{gw.tag}:leases", f"{gw.tag}:lease_tenant")  # Redis lost its data
    assert await gw.queue.renew(gw.admission.running()) == (0, 0)
    assert await gw.leases() == [lease.ticket]  # capacity accounting is back
    await gw.admission.release(lease)
    assert await gw.leases() == []


async def test_a_release_that_redis_missed_goes_through_at_the_next_renewal(
    redis_client: aioredis.Redis, prefix: str
) -> None:
    gw = Gateway(redis_client, prefix, capacity=1, ticket_heartbeat_s=0.3, lease_ttl_s=30.0)
    await gw.admission.start()
    try:
        lease = await gw.admission.acquire("m", Tenant(id="a"), None)
        release = gw.queue.release
        failures = 1

        async def flaky(*args: Any) -> None:  # the release runs past its budget once
            nonlocal failures
            if failures:
                failures -= 1
                raise TimeoutError
            await release(*args)

        gw.queue.release = flaky
        await gw.admission.release(lease)
        assert lease.released
        assert gw.admission.running() == []
        assert await gw.leases() == [lease.ticket]  # Redis still holds it ...
        assert gw.admission.unreleased == 1
        await _until(lambda: _len_is(gw.leases(), 0), 3.0)  # ... until the next renewal
        assert gw.admission.unreleased == 0
        assert await gw.tenant_active("a") == []
        # The slot is free again without waiting for the lease to expire (30 s).
        other = await asyncio.wait_for(gw.admission.acquire("m", Tenant(id="b"), None), 2.0)
        await gw.admission.release(other)
    finally:
        await gw.admission.stop()


async def test_an_expired_lease_is_not_counted_in_use(redis_client: aioredis.Redis, prefix: str) -> None:
    gw = Gateway(redis_client, prefix, capacity=2, lease_ttl_s=0.2)
    await gw.admission.acquire("m", Tenant(id="a"), None)  # never renewed nor released
    assert (await gw.admission.snapshot("m")).in_use == 1
    await asyncio.sleep(0.3)
    # Still in the lease set until the next script reaps it, but no longer a slot in use.
    assert len(await gw.leases()) == 1
    assert (await gw.admission.snapshot("m")).in_use == 0
    assert await gw.queue.predicted_wait_s("m", Tenant(id="b").priority) == 0.0


# ------------------------------------------------------------------ cancelled enqueue
@pytest.mark.parametrize("full", [False, True], ids=["granted-at-once", "queued"])
async def test_a_cancel_during_enqueue_leaves_no_ticket(
    redis_client: aioredis.Redis, prefix: str, full: bool
) -> None:
    gw = Gateway(redis_client, prefix, capacity=1)
    holder = await gw.admission.acquire("m", Tenant(id="a"), None) if full else None
    queue = gw.queue
    enqueue = queue.enqueue
    sent = asyncio.Event()

    async def spy(*args: Any) -> tuple[int, int]:
        sent.set()
        return await enqueue(*args)  # type: ignore[no-any-return]

    queue.enqueue = spy
    task = asyncio.create_task(gw.admission.acquire("m", Tenant(id="b"), None))
    await sent.wait()  # the script call is in the batch: it runs whatever the caller does
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await gw.wait_set() == []
    assert await gw.leases() == ([holder.ticket] if holder else [])
    assert await gw.tenant_active("b") == []
    assert gw.admission.waiting() == []
    assert gw.admission.running() == ([holder] if holder else [])
    if holder is not None:
        await gw.admission.release(holder)
    await gw.admission.release(await asyncio.wait_for(gw.admission.acquire("m", Tenant(id="c"), None), 2))


# ------------------------------------------------------------------ lease age limit
async def test_a_leaked_lease_is_reclaimed_and_logged(
    redis_client: aioredis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    gw = Gateway(redis_client, prefix, capacity=1, ticket_heartbeat_s=0.3, max_lease_age_s=0.3)
    await gw.admission.start()
    try:
        leaked = await gw.admission.acquire("m", Tenant(id="a"), None, request_id="req-leaked-1")
        assert leaked.request_id == "req-leaked-1"
        with caplog.at_level(logging.WARNING, logger="oss_serving.admission"):
            # The capacity comes back: another request gets the only slot.
            lease = await asyncio.wait_for(gw.admission.acquire("m", Tenant(id="b"), None), 3.0)
        assert leaked.released
        assert gw.admission.reclaimed_total == 1
        assert (await gw.admission.snapshot("m")).reclaimed_total == 1
        assert any("req-leaked-1" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        assert await gw.leases() == [lease.ticket]
        await gw.admission.release(leaked)  # the owner's late release is a no-op
        assert await gw.leases() == [lease.ticket]
        await gw.admission.release(lease)
    finally:
        await gw.admission.stop()


async def test_a_leaked_local_lease_is_reclaimed() -> None:
    config = QueueConfig(default_capacity=1, ticket_heartbeat_s=0.3)
    admission = Admission(None, config, ["m"], max_lease_age_s=0.3)
    await admission.start()
    try:
        leaked = await admission.acquire("m", Tenant(id="a"), None, request_id="req-local")
        assert leaked.backend == "local"
        lease = await asyncio.wait_for(admission.acquire("m", Tenant(id="b"), None), 3.0)
        assert leaked.released
        assert admission.reclaimed_total == 1
        await admission.release(leaked)
        assert admission.local_queue.snapshot("m").in_use == 1  # the late release freed nothing
        await admission.release(lease)
    finally:
        await admission.stop()


# ------------------------------------------------------------------ graceful stop
async def test_stop_cancels_queued_tickets_and_releases_leases(
    redis_client: aioredis.Redis, prefix: str
) -> None:
    gw = Gateway(redis_client, prefix, capacity=1)
    other = Gateway(redis_client, prefix, capacity=1)
    await gw.admission.start()
    holder = await gw.admission.acquire("m", Tenant(id="a"), None)
    waiters = [asyncio.create_task(gw.admission.acquire("m", Tenant(id="a"), None)) for _ in range(3)]
    await _until(lambda: _len_is(gw.wait_set(), 3))
    behind = asyncio.create_task(other.admission.acquire("m", Tenant(id="b"), None))
    await _until(lambda: _len_is(gw.wait_set(), 4))
    assert len(gw.admission.waiting()) == 3
    started = time.monotonic()
    await gw.admission.stop()
    assert time.monotonic() - started < 1.0
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, OverloadedError) and r.code == "shutting_down" for r in results), results
    assert holder.released
    # The other gateway's request is next: the stopped gateway's tickets are gone.
    lease: Lease = await asyncio.wait_for(behind, 2.0)
    assert await gw.wait_set() == []
    assert await gw.leases() == [lease.ticket]
    assert await gw.tenant_active("a") == []
    with pytest.raises(OverloadedError) as err:
        await gw.admission.acquire("m", Tenant(id="a"), None)
    assert err.value.code == "shutting_down"
    await other.admission.release(lease)
    await other.admission.stop()


async def test_stop_fails_local_waiters() -> None:
    admission = Admission(None, QueueConfig(default_capacity=1), ["m"])
    await admission.start()
    holder = await admission.acquire("m", Tenant(id="a"), None)
    waiter = asyncio.create_task(admission.acquire("m", Tenant(id="b"), None))
    await asyncio.sleep(0.05)
    await admission.stop()
    with pytest.raises(OverloadedError) as err:
        await waiter
    assert err.value.code == "shutting_down"
    assert holder.released
    assert admission.local_queue.snapshot("m").in_use == 0


async def test_batch_lines_leave_a_share_of_the_capacity_to_other_requests(
    redis_client: aioredis.Redis, prefix: str
) -> None:
    """Capacity 4, ``batch_reserve_share`` 0.25: batch-priority requests fill 3 slots and
    wait for the fourth; an interactive request arriving then is admitted at once; with
    the share at 0 a batch takes every slot."""
    from serving.gateway.tenants import PriorityClass

    gw = Gateway(redis_client, prefix, capacity=4)
    batch = Tenant(id="bulk", priority=PriorityClass.batch)
    held = [await gw.admission.acquire("m", batch, None) for _ in range(3)]
    fourth = asyncio.create_task(gw.admission.acquire("m", batch, None))
    await asyncio.sleep(0.2)
    assert not fourth.done()  # the last slot is kept for the others
    assert len(await gw.leases()) == 3
    chat = await asyncio.wait_for(
        gw.admission.acquire("m", Tenant(id="chat", priority=PriorityClass.interactive), None), 1.0
    )
    assert chat.waited_s < 0.5
    await gw.admission.release(chat)
    await gw.admission.release(held.pop())  # a batch slot frees: the waiting line takes it
    lease = await asyncio.wait_for(fourth, 2.0)
    for lease_ in (*held, lease):
        await gw.admission.release(lease_)
    await gw.admission.stop()

    full = Gateway(redis_client, prefix + "x", capacity=4, batch_reserve_share=0.0)
    all_four = [await asyncio.wait_for(full.admission.acquire("m", batch, None), 1.0) for _ in range(4)]
    assert len(await full.leases()) == 4
    for lease_ in all_four:
        await full.admission.release(lease_)
    await full.admission.stop()
