"""The Redis admission queue with a real Redis: capacity, fairness, priority, leases, fallback."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from serving.config import QueueConfig
from serving.gateway.admission import Admission, Lease
from serving.gateway.errors import OverloadedError, RateLimitError
from serving.gateway.tenants import PriorityClass, Tenant, TenantLimits
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _admission(client: aioredis.Redis, capacity: int, **kw: float) -> Admission:
    return Admission(client, QueueConfig(default_capacity=capacity, **kw), ["m"])  # type: ignore[arg-type]


def test_two_gateway_processes_never_exceed_capacity(server: RedisServer) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tests.integration.queue_worker", server.url, "load", "40"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env) for _ in range(2)]
    assert [p.wait(120) for p in procs] == [0, 0]
    probe = redis.Redis.from_url(server.url)
    assert int(probe.get("probe:done") or 0) == 80  # every request admitted, none lost
    assert int(probe.get("probe:max") or 0) == 3  # capacity reached, never exceeded
    assert int(probe.get("probe:cur") or 0) == 0


async def _flood(
    admission: Admission,
    tenant: Tenant,
    workers: int,
    service_s: float,
    stop: asyncio.Event,
    counts: collections.Counter[str],
) -> None:
    async def worker() -> None:
        while not stop.is_set():
            lease = await admission.acquire("m", tenant, None)
            if stop.is_set():
                await admission.release(lease)
                return
            counts[tenant.id] += 1
            await asyncio.sleep(service_s)
            await admission.release(lease)

    await asyncio.gather(*(worker() for _ in range(workers)))


async def _overload(
    admission: Admission, tenants: list[tuple[Tenant, int]], seconds: float
) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_flood(admission, t, w, 0.01, stop, counts)) for t, w in tenants]
    await asyncio.sleep(0.5)  # reach steady overload before counting
    counts.clear()
    await asyncio.sleep(seconds)
    stop.set()
    snapshot = dict(counts)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    return collections.Counter(snapshot)


async def test_equal_weights_share_equally_under_overload(client: aioredis.Redis) -> None:
    admission = _admission(client, 4)
    counts = await _overload(admission, [(Tenant(id="a"), 24), (Tenant(id="b"), 24)], 3.0)
    share_b = counts["b"] / (counts["a"] + counts["b"])
    assert abs(share_b - 0.5) <= 0.05, counts  # within 10% of the fair share


async def test_weights_three_to_one(client: aioredis.Redis) -> None:
    admission = _admission(client, 4)
    counts = await _overload(admission, [(Tenant(id="a", weight=3), 24), (Tenant(id="b", weight=1), 24)], 3.0)
    share_a = counts["a"] / (counts["a"] + counts["b"])
    assert abs(share_a - 0.75) <= 0.075, counts


async def test_modest_tenant_gets_what_it_asks_while_another_floods(client: aioredis.Redis) -> None:
    admission = _admission(client, 4)
    counts: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()
    flood = asyncio.create_task(_flood(admission, Tenant(id="a"), 40, 0.02, stop, counts))
    await asyncio.sleep(0.3)
    b = Tenant(id="b")
    waits: list[float] = []
    sent = 0

    async def one() -> None:
        lease = await admission.acquire("m", b, None)
        waits.append(lease.waited_s)
        await asyncio.sleep(0.02)
        await admission.release(lease)

    pending = []
    for _ in range(40):  # 20 requests/s: a fifth of the capacity (4 slots / 20 ms = 200/s)
        sent += 1
        pending.append(asyncio.create_task(one()))
        await asyncio.sleep(0.05)
    await asyncio.gather(*pending)
    stop.set()
    await asyncio.wait_for(flood, 30)
    # B's fair share (half the capacity, 100/s) is more than it asks (20/s): max-min
    # fairness gives it everything it asks, at once. Under plain FIFO each B request would
    # wait behind A's backlog of about 36 requests: 36 / 4 slots x 20 ms = 0.18 s.
    assert len(waits) == sent
    median = sorted(waits)[len(waits) // 2]
    assert median < 0.18 / 2, f"B waited {median:.3f} s (median)"
    assert sum(w < 0.18 for w in waits) >= 0.9 * sent


async def test_interactive_overtakes_waiting_batch(client: aioredis.Redis) -> None:
    admission = _admission(client, 1)
    holder = await admission.acquire("m", Tenant(id="x"), None)
    order: list[str] = []

    async def one(tenant: Tenant) -> None:
        lease = await admission.acquire("m", tenant, None)
        order.append(tenant.id)
        await asyncio.sleep(0.01)
        await admission.release(lease)

    batch = [asyncio.create_task(one(Tenant(id=f"batch{i}", priority=PriorityClass.batch))) for i in range(3)]
    await asyncio.sleep(0.1)
    interactive = asyncio.create_task(one(Tenant(id="chat", priority=PriorityClass.interactive)))
    await asyncio.sleep(0.1)
    snap = await admission.snapshot("m")
    assert snap.depth == {"interactive": 1, "standard": 0, "batch": 3}
    await admission.release(holder)
    await asyncio.gather(interactive, *batch)
    assert order[0] == "chat"


async def test_tenant_concurrency_limit_is_429(client: aioredis.Redis) -> None:
    admission = _admission(client, 10)
    tenant = Tenant(id="capped", limits=TenantLimits(max_concurrent_requests=2))
    leases = [await admission.acquire("m", tenant, None) for _ in range(2)]
    with pytest.raises(RateLimitError) as err:
        await admission.acquire("m", tenant, None)
    assert err.value.status == 429
    assert (err.value.type, err.value.code) == ("requests", "rate_limit_exceeded")
    assert err.value.reason == "concurrency_limit_exceeded"
    assert err.value.headers["Retry-After"] == "1"
    await admission.release(leases[0])
    await admission.release(await admission.acquire("m", tenant, None))  # a slot came back


async def test_unreachable_deadline_is_rejected_early_with_retry_after(client: aioredis.Redis) -> None:
    admission = _admission(client, 1)
    lease = await admission.acquire("m", Tenant(id="x"), None)
    await client.hset("{oss:q:m}:stats", "ewma_ms", 2000)  # requests take about 2 s
    started = time.monotonic()
    with pytest.raises(OverloadedError) as err:
        await admission.acquire("m", Tenant(id="y"), 0.5)
    assert time.monotonic() - started < 0.5  # rejected before waiting in vain
    assert err.value.status == 503
    assert err.value.code == "deadline_unreachable"
    assert int(err.value.headers["Retry-After"]) >= 2
    assert (await admission.snapshot("m")).depth["standard"] == 0  # never queued
    await admission.release(lease)


async def test_deadline_passing_while_queued_is_503(client: aioredis.Redis) -> None:
    admission = _admission(client, 1)
    lease = await admission.acquire("m", Tenant(id="x"), None)  # no service time known: predicted 1 s
    with pytest.raises(OverloadedError) as err:
        await admission.acquire("m", Tenant(id="y"), 1.5)
    assert err.value.code == "queue_timeout"
    assert (await admission.snapshot("m")).depth["standard"] == 0  # its ticket was taken out
    await admission.release(lease)


async def test_killed_gateway_capacity_returns_within_lease_ttl(
    server: RedisServer, client: aioredis.Redis
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.integration.queue_worker", server.url, "hold", "3",
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 60)).startswith(b"held 3")
    admission = _admission(client, 3, lease_ttl_s=1.5)
    assert (await admission.snapshot("m")).in_use == 3
    await asyncio.sleep(2.0)  # the holder renews every 0.5 s: its leases stay
    assert (await admission.snapshot("m")).in_use == 3
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    killed = time.monotonic()
    lease: Lease = await asyncio.wait_for(admission.acquire("m", Tenant(id="n"), None), 10)
    assert time.monotonic() - killed <= 1.5 + 0.5  # within the lease TTL (plus one poll)
    snap = await admission.snapshot("m")
    assert snap.expired_total == 3
    await admission.release(lease)


async def test_killed_gateway_queued_tickets_are_dropped_within_heartbeat(
    server: RedisServer, client: aioredis.Redis
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.integration.queue_worker", server.url, "queue", "5",
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    # The worker holds the whole capacity (3 leases) and queued 5 more requests; its
    # leases live 1.5 s and its tickets' heartbeat 1 s unless it renews them.
    assert (await asyncio.wait_for(proc.stdout.readline(), 60)).startswith(b"queued 5")
    # A lease this gateway grants lives 10 s: a ghost granted by mistake would hold its
    # slot that long, and the request below would wait behind ghosts for tens of seconds.
    admission = _admission(client, 3, lease_ttl_s=10.0)
    behind = asyncio.create_task(admission.acquire("m", Tenant(id="n"), None))
    for _ in range(200):
        if (await admission.snapshot("m")).depth["standard"] == 6:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(1.5)  # the live worker keeps its tickets: nothing is dropped
    snap = await admission.snapshot("m")
    assert (snap.depth["standard"], snap.in_use, snap.abandoned_total) == (6, 3, 0)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    killed = time.monotonic()
    gone: list[float] = []

    async def watch() -> None:  # when the ghosts leave the wait set
        for _ in range(1000):
            if await client.zcard("{oss:q:m}:wait") <= 1:
                gone.append(time.monotonic() - killed)
                return
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    lease: Lease = await asyncio.wait_for(behind, 15)
    took = time.monotonic() - killed
    await asyncio.wait_for(watcher, 1)
    print(f"killed gateway with 5 queued requests: tickets gone after {gone[0]:.2f} s, "
          f"capacity back after {took:.2f} s")  # fmt: skip
    # The worker's tickets expire 1 s after its last renewal and its leases 1.5 s after;
    # the waiting request checks its ticket at least every second (each check drops the
    # expired tickets and grants). Ghosts granted would hold 10 s each.
    assert gone[0] <= 1.0 + 2.0
    assert took <= 1.5 + 2.0
    snap = await admission.snapshot("m")
    assert snap.abandoned_total == 5  # dropped, never granted
    assert snap.expired_total == 3
    assert snap.in_use == 1
    assert await client.zcard("{oss:q:m}:wait") == 0
    assert await client.hlen("{oss:q:m}:meta") == 0
    assert await client.zcard("{oss:q:m}:hb") == 0
    now_ms = int(time.time() * 1000)
    assert await client.zcount("oss:t:t:active", now_ms, "+inf") == 0  # nothing counted for it
    await admission.release(lease)


async def _queued_http(http: httpx.AsyncClient, stream: bool) -> None:
    """One chat request through the gateway process; it ends when that process dies."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    with contextlib.suppress(httpx.HTTPError):
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            async for _ in response.aiter_bytes():
                pass


async def test_a_killed_gateway_process_leaves_no_ticket_behind(
    server: RedisServer, client: aioredis.Redis
) -> None:
    """A real gateway (``build_gateway`` + the FastAPI app under uvicorn, over a fake engine
    that streams a word a second) holds its capacity (2) with two open streams and queues 5
    more HTTP requests in the shared Redis; a second gateway queues one behind them. The
    first is killed with SIGKILL: its tickets are dropped (never granted) within the
    default ticket heartbeat plus one check period, and the request behind them starts
    once the dead gateway's two running leases expired."""
    # The default heartbeat (5 s). The lease TTL is shortened from 15 s to 8 s only to keep
    # the test short: it bounds how long the dead gateway's two *running* streams hold
    # their slots, not its tickets. It stays above the heartbeat plus one renewal period
    # (min(8, 5)/3 s), so the running leases outlive every ticket: a ghost ticket granted
    # instead of dropped would show in the abandoned counter and the leases below.
    heartbeat_s = QueueConfig().ticket_heartbeat_s
    assert heartbeat_s == 5.0
    lease_ttl_s = 8.0
    queue = {"default_capacity": 2, "capacity_per_replica": 2, "lease_ttl_s": lease_ttl_s}
    config = {
        "models": [{"name": "m", "source": "/x"}],
        "auth": {"required": False},
        "redis": {"url": server.url},
        "queue": queue,
    }
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.integration.gateway_process", json.dumps(config),
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    admission = Admission(client, QueueConfig(**queue), ["m"])  # type: ignore[arg-type]
    await admission.start()  # the second gateway's admission, renewing what it holds
    http = None
    tasks: list[asyncio.Task[None]] = []
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        while line and not line.startswith(b"listening "):  # vLLM's import logs to stdout first
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.startswith(b"listening "), line
        base = f"http://127.0.0.1:{int(line.split()[1])}"
        http = httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(60, read=None))
        keys = ("{oss:q:m}:wait", "{oss:q:m}:meta", "{oss:q:m}:hb", "{oss:q:m}:leases")

        async def counts() -> tuple[int, ...]:
            wait, meta, hb, leases = keys
            return (await client.zcard(wait), await client.hlen(meta), await client.zcard(hb),
                    await client.zcard(leases))  # fmt: skip

        async def until(want: tuple[int, ...], timeout_s: float) -> None:
            deadline = time.monotonic() + timeout_s
            while (got := await counts()) != want:
                assert time.monotonic() < deadline, f"wait, meta, hb, leases: {got}, not {want}"
                await asyncio.sleep(0.02)

        tasks += [asyncio.create_task(_queued_http(http, stream=True)) for _ in range(2)]
        await until((0, 0, 0, 2), 20)  # the two streams run: the capacity is full
        tasks += [asyncio.create_task(_queued_http(http, stream=i % 2 == 0)) for i in range(5)]
        await until((5, 5, 5, 2), 10)  # five requests of the gateway wait in Redis
        ghosts = [t.decode() for t in await client.zrange(keys[0], 0, -1)]
        behind = asyncio.create_task(admission.acquire("m", Tenant(id="n"), None))
        await until((6, 6, 6, 2), 5)
        # The live gateway renews its tickets' heartbeats (every min(TTL, heartbeat)/3 s).
        first = await client.zmscore(keys[2], ghosts)
        await asyncio.sleep(2.0)
        later = await client.zmscore(keys[2], ghosts)
        assert all(b > a for a, b in zip(first, later, strict=True)), (first, later)
        snap = await admission.snapshot("m")
        assert (snap.depth["standard"], snap.in_use, snap.abandoned_total) == (6, 2, 0)

        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        killed = time.monotonic()
        await until((1, 1, 1, 2), heartbeat_s + 3)  # only the request behind waits
        gone = time.monotonic() - killed
        lease: Lease = await asyncio.wait_for(behind, lease_ttl_s + 3)
        took = time.monotonic() - killed
        print(f"killed gateway process with 5 queued requests: tickets gone after {gone:.2f} s "
              f"(heartbeat {heartbeat_s:.0f} s), the request behind them admitted after "
              f"{took:.2f} s (lease TTL {lease_ttl_s:.0f} s)")  # fmt: skip
        # A waiting request checks its ticket at least every second; each check drops the
        # expired tickets. Bound: heartbeat + one check period (+ a margin for the poll).
        assert gone <= heartbeat_s + 1.0 + 1.0
        assert took <= lease_ttl_s + 1.0 + 1.0
        snap = await admission.snapshot("m")
        assert snap.abandoned_total == 5  # dropped, never granted
        assert snap.expired_total == 2  # its two running streams' leases
        assert snap.in_use == 1
        assert await counts() == (0, 0, 0, 1)
        assert await client.zrange(keys[3], 0, -1) == [lease.ticket.encode()]
        now_ms = int(time.time() * 1000)
        actives = [k async for k in client.scan_iter("oss:t:*:active")]
        assert actives  # the tenant entries were written: they must not count any more
        for key in actives:
            for ticket in ghosts:
                score = await client.zscore(key, ticket)
                assert score is None or score <= now_ms, (key, ticket, score)
        await admission.release(lease)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if http is not None:
            await http.aclose()
        await admission.stop()


async def test_redis_outage_falls_back_locally_and_recovers(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path / "r").start()
    client = aioredis.Redis.from_url(srv.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    admission = _admission(client, 2, lease_ttl_s=1.5)
    await admission.start()
    try:
        running = await admission.acquire("m", Tenant(id="a"), None)
        assert running.backend == "redis"
        srv.stop()
        local = await admission.acquire("m", Tenant(id="a"), None)
        assert local.backend == "local"
        assert admission.degraded
        srv.start()
        for _ in range(40):
            if not admission.degraded:
                break
            await asyncio.sleep(0.1)
        assert not admission.degraded
        # Both running requests are back in the shared accounting after the restart.
        assert (await admission.snapshot("m")).in_use == 2
        await admission.release(running)
        await admission.release(local)
        assert (await admission.snapshot("m")).in_use == 0
    finally:
        await admission.stop()
        await client.aclose()
        srv.stop()


# ------------------------------------------------------------------ lease weights
async def test_a_weight_4_request_on_capacity_4_runs_alone(client: aioredis.Redis) -> None:
    """It waits until 4 slots are free, nothing overtakes it meanwhile, and while it runs
    nothing else does; its release frees all 4."""
    admission = _admission(client, 4)
    tenant = Tenant(id="a")
    held = await admission.acquire("m", tenant, None)
    heavy = asyncio.create_task(admission.acquire("m", tenant, None, weight=4))
    await asyncio.sleep(0.1)
    light = asyncio.create_task(admission.acquire("m", tenant, None))  # behind the heavy one
    await asyncio.sleep(0.2)
    snap = await admission.snapshot("m")
    assert (heavy.done(), light.done(), snap.in_use, snap.depth["standard"]) == (False, False, 1, 2)
    await admission.release(held)
    lease = await asyncio.wait_for(heavy, 5)
    assert lease.weight == 4
    assert (await admission.snapshot("m")).in_use == 4
    await asyncio.sleep(0.2)
    assert not light.done()  # nothing runs beside it
    assert await client.hget("{oss:q:m}:lease_weight", lease.ticket) == b"4"
    await admission.release(lease)
    other = await asyncio.wait_for(light, 5)
    snap = await admission.snapshot("m")
    assert (snap.in_use, await client.hlen("{oss:q:m}:lease_weight")) == (1, 0)
    await admission.release(other)


async def test_heavier_than_the_capacity_is_capped_at_it(client: aioredis.Redis) -> None:
    admission = _admission(client, 3)
    lease = await admission.acquire("m", Tenant(id="a"), None, weight=4096)
    assert lease.weight == 3
    assert (await admission.snapshot("m")).in_use == 3
    blocked = asyncio.create_task(admission.acquire("m", Tenant(id="b"), None))
    await asyncio.sleep(0.2)
    assert not blocked.done()
    await admission.release(lease)
    await admission.release(await asyncio.wait_for(blocked, 5))
    assert (await admission.snapshot("m")).in_use == 0


async def test_weights_are_charged_to_the_fair_share(client: aioredis.Redis) -> None:
    """Equal tenant weights, one sending 2-slot requests, one 1-slot: each gets half of the
    slots (the heavy one half as many requests), within 10%."""
    admission = _admission(client, 4)
    counts: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()

    async def worker(tenant: Tenant, weight: int) -> None:
        while not stop.is_set():
            lease = await admission.acquire("m", tenant, None, weight=weight)
            if not stop.is_set():
                counts[tenant.id] += weight
            await asyncio.sleep(0.01)
            await admission.release(lease)

    tasks = [asyncio.create_task(worker(Tenant(id="heavy"), 2)) for _ in range(16)]
    tasks += [asyncio.create_task(worker(Tenant(id="light"), 1)) for _ in range(16)]
    await asyncio.sleep(0.5)
    counts.clear()
    await asyncio.sleep(3.0)
    stop.set()
    snapshot = dict(counts)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    share = snapshot["heavy"] / (snapshot["heavy"] + snapshot["light"])
    assert abs(share - 0.5) <= 0.05, snapshot


async def test_cancel_and_renew_handle_every_slot(client: aioredis.Redis) -> None:
    admission = _admission(client, 4)
    queue = admission.redis_queue
    assert queue is not None
    lease = await admission.acquire("m", Tenant(id="a"), None, weight=3)
    # Redis lost the lease (restart): the renewal brings it back with its weight
    await client.delete("{oss:q:m}:leases", "{oss:q:m}:lease_weight")
    assert (await admission.snapshot("m")).in_use == 0
    assert await queue.renew([lease]) == (0, 0)
    assert (await admission.snapshot("m")).in_use == 3
    # a granted ticket cancelled (its client left as it was granted) frees all 3 slots
    assert await queue.cancel(lease.ticket, "m", "a") == 2
    assert (await admission.snapshot("m")).in_use == 0
    assert await client.hlen("{oss:q:m}:lease_weight") == 0
    await admission.release(lease)  # its own release later is harmless
    assert (await admission.snapshot("m")).in_use == 0


async def test_an_expired_heavy_lease_returns_all_its_slots(client: aioredis.Redis) -> None:
    holder = _admission(client, 4, lease_ttl_s=0.5)  # never renewed: no maintenance task
    await holder.acquire("m", Tenant(id="a"), None, weight=4)
    admission = _admission(client, 4)
    lease = await asyncio.wait_for(admission.acquire("m", Tenant(id="b"), None, weight=4), 5)
    snap = await admission.snapshot("m")
    assert (snap.in_use, snap.expired_total) == (4, 1)
    await admission.release(lease)


async def test_a_heavy_head_that_leaves_lets_the_others_in(client: aioredis.Redis) -> None:
    admission = _admission(client, 4)
    tenant = Tenant(id="a")
    held = await admission.acquire("m", tenant, None)
    heavy = asyncio.create_task(admission.acquire("m", tenant, None, weight=4))
    await asyncio.sleep(0.1)
    light = asyncio.create_task(admission.acquire("m", tenant, None))
    await asyncio.sleep(0.3)
    assert not light.done()
    heavy.cancel()  # its client went away: the cancel grants what waited behind it
    started = time.monotonic()
    lease = await asyncio.wait_for(light, 5)
    assert time.monotonic() - started < 0.5
    assert (await admission.snapshot("m")).in_use == 2
    await admission.release(lease)
    await admission.release(held)
