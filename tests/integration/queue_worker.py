"""A stand-in gateway process for the queue tests: admits through the shared Redis queue.

    python -m tests.integration.queue_worker URL MODE [N]

``load``: N concurrent requests each hold a lease for 20 ms; while holding, they count
themselves in Redis (``probe:cur``) and record the highest count seen (``probe:max``).
``hold``: take N leases, print ``held``, and sleep until killed.
``queue``: fill the capacity (3) with held leases, then queue N more requests that wait,
print ``queued N``, and sleep until killed (its tickets' heartbeat lasts 1 s).
"""

from __future__ import annotations

import asyncio
import sys

import redis.asyncio as aioredis

from serving.config import QueueConfig
from serving.gateway.admission import Admission
from serving.gateway.tenants import Tenant

TRACK = """
local cur = redis.call('INCRBY', KEYS[1], ARGV[1])
local max = tonumber(redis.call('GET', KEYS[2]) or '0')
if cur > max then redis.call('SET', KEYS[2], cur) end
return cur
"""


async def main(url: str, mode: str, n: int) -> None:
    client = aioredis.Redis.from_url(url)
    config = QueueConfig(default_capacity=3, lease_ttl_s=1.5, ticket_heartbeat_s=1.0)
    admission = Admission(client, config, ["m"])
    await admission.start()
    tenant = Tenant(id="t")
    track = client.register_script(TRACK)
    if mode == "hold":
        leases = [await admission.acquire("m", tenant, None) for _ in range(n)]
        print("held", len(leases), flush=True)
        await asyncio.sleep(3600)
        return
    if mode == "queue":
        held = [await admission.acquire("m", tenant, None) for _ in range(config.default_capacity)]
        waiting = [asyncio.create_task(admission.acquire("m", tenant, None)) for _ in range(n)]
        for _ in range(1000):  # every ticket queued in Redis
            if len(admission.waiting()) == n and (await admission.snapshot("m")).depth["standard"] == n:
                break
            await asyncio.sleep(0.01)
        print("queued", len(waiting), "behind", len(held), flush=True)
        await asyncio.sleep(3600)
        return

    async def one() -> None:
        lease = await admission.acquire("m", tenant, None)
        try:
            await track(keys=["probe:cur", "probe:max"], args=[1])
            await asyncio.sleep(0.02)
            await track(keys=["probe:cur", "probe:max"], args=[-1])
        finally:
            await admission.release(lease)
        await client.incr("probe:done")

    await asyncio.gather(*(one() for _ in range(n)))
    await admission.stop()
    await client.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 40))
