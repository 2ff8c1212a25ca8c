"""Durable keys: revocations survive restarts, bad records do not stop refreshes, and
Redis restarted empty costs no valid key a 401.

Gateways in process (``TestGateway``, built by ``build_gateway``) over a private
redis-server; the client is the OpenAI SDK or plain HTTP; the admin is ``oss-serve tenants``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from serving.cli import main as cli
from serving.config import ServingConfig
from serving.gateway.auth import TenantDirectory, TenantStore
from serving.gateway.tenants import Tenant, hash_key
from serving.redis_conn import redis_client
from tests.fakes import FakeEngine
from tests.gateway import TestGateway, config_for
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration
MODEL = "smol"
MSG = [{"role": "user", "content": "hi"}]


def _config(url: str, tenants_file: Path) -> ServingConfig:
    return config_for(
        [MODEL],
        redis={"url": url},
        auth={"required": True, "refresh_s": 0.2, "tenants_file": str(tenants_file)},
        tenants=[
            {"id": "alpha", "api_key_sha256": [hash_key("key-alpha")]},
            {"id": "beta", "api_key_sha256": [hash_key("key-beta"), hash_key("key-beta2")]},
        ],
    )


@pytest.fixture
def tenants_file(tmp_path: Path) -> Path:
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants:\n  - id: filed\n    api_keys: [key-file, key-file2]\n")
    return path


class Gateway(TestGateway):
    """A replica with a Redis client of its own (closed with it)."""

    def __init__(self, cfg: ServingConfig) -> None:
        self.redis = redis_client(cfg, {}, timeout_s=0.5)  # the gateways' own client builder
        super().__init__(cfg, {MODEL: FakeEngine()}, self.redis)

    @property
    def directory(self) -> TenantDirectory:
        auth: TenantDirectory = self.service._auth
        return auth

    async def status(self, key: str) -> int:
        resp = await self.http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": MSG},
            headers={"Authorization": f"Bearer {key}"},
        )
        return resp.status_code

    async def close(self) -> None:
        await super().close()
        await self.redis.aclose()


@contextlib.asynccontextmanager
async def running(cfg: ServingConfig) -> AsyncIterator[Gateway]:
    gw = Gateway(cfg)
    await gw.service.start()
    await gw.service.probe_once()
    try:
        yield gw
    finally:
        await gw.close()


def _tenants(server: RedisServer, *args: str) -> Any:
    """``oss-serve tenants ARGS`` against ``server`` (in a thread: the command runs its own loop)."""
    return CliRunner().invoke(cli, ["tenants", *args, "--redis-url", server.url])


async def _refreshed() -> None:
    await asyncio.sleep(0.5)  # two directory refreshes


async def test_revoked_seeded_keys_stay_revoked_after_a_restart(
    server: RedisServer, tenants_file: Path
) -> None:
    cfg = _config(server.url, tenants_file)
    async with running(cfg) as gw:
        for key in ("key-alpha", "key-beta", "key-beta2", "key-file", "key-file2"):
            assert await gw.status(key) == 200, key
        for key in ("key-alpha", "key-file"):  # one from `tenants:`, one from the tenants file
            done = await asyncio.to_thread(_tenants, server, "revoke", key)
            assert done.exit_code == 0, done.output
        rotated = await asyncio.to_thread(_tenants, server, "rotate", "beta")  # key-beta, key-beta2 go
        assert rotated.exit_code == 0, rotated.output
        new_beta = rotated.output.strip().splitlines()[-1]
        await _refreshed()
        assert await gw.status("key-alpha") == 401
        assert await gw.status("key-file") == 401
        assert await gw.status("key-beta") == 401
        assert await gw.status(new_beta) == 200
    # A restart (or a rollout, a new replica) seeds the configuration and the tenants file again
    for _ in range(2):
        async with running(cfg) as gw:
            assert await gw.status("key-alpha") == 401
            assert await gw.status("key-file") == 401
            assert await gw.status("key-beta") == 401
            assert await gw.status("key-beta2") == 401
            assert await gw.status("key-file2") == 200
            assert await gw.status(new_beta) == 200
            await _refreshed()
            assert await gw.status("key-alpha") == 401
    # and the whole tenant: revoked with --tenant, it is not seeded again
    assert (await asyncio.to_thread(_tenants, server, "revoke", "filed", "--tenant")).exit_code == 0
    async with running(cfg) as gw:
        assert await gw.status("key-file2") == 401
        assert "filed" not in gw.directory.tenant_ids()
        assert await gw.status(new_beta) == 200


async def test_corrupt_records_do_not_stop_the_directory(server: RedisServer, tenants_file: Path) -> None:
    cfg = _config(server.url, tenants_file)
    async with running(cfg) as gw:
        tenants, keys = "oss:tenants", "oss:keys"
        await gw.redis.hset(tenants, "broken", "{this is not json")
        await gw.redis.hset(tenants, "typed", json.dumps({"id": "typed", "priority": "urgent"}))
        await gw.redis.hset(keys, hash_key("key-typed"), json.dumps({"tenant": "typed"}))
        newer = {"id": "newer", "limits": {"max_output_tokens": 64, "burst": 9}, "region": "eu"}
        await gw.redis.hset(tenants, "newer", json.dumps(newer))
        await gw.redis.hset(keys, hash_key("key-newer"), json.dumps({"tenant": "newer", "scopes": ["all"]}))
        await gw.redis.hset(keys, hash_key("key-junk"), b"\x00\xff")
        await _refreshed()
        assert await gw.status("key-alpha") == 200
        assert await gw.status("key-newer") == 200  # unknown fields (a newer version's) are ignored
        assert await gw.status("key-typed") == 401
        # the refresh goes on: a tenant added now is served, a key revoked now is refused
        store = TenantStore(gw.redis)
        later = await store.add(Tenant(id="later"))
        assert await store.revoke_key("key-beta") == 1
        await _refreshed()
        assert await gw.status(later.api_key) == 200
        assert await gw.status("key-beta") == 401
        # counted once each, however many refreshes saw them
        assert gw.metric("oss_serving_tenant_records_invalid_total", kind="tenant") == 2
        assert gw.metric("oss_serving_tenant_records_invalid_total", kind="key") == 1
        health = gw.directory.health()
        assert health["invalid_records"] == 3
        assert health["source"] == "redis"
        # a new replica starts, with the same directory
        async with running(cfg) as fresh:
            assert await fresh.status("key-alpha") == 200
            assert await fresh.status(later.api_key) == 200
            assert await fresh.status("key-beta") == 401
            assert fresh.metric("oss_serving_tenant_records_invalid_total", kind="tenant") == 2
        listed = await asyncio.to_thread(_tenants, server, "list")
        assert listed.exit_code == 0, listed.output
        assert "skipped 3 record(s)" in listed.output


async def test_redis_restarted_empty_costs_no_valid_key_a_401(tmp_path: Path, tenants_file: Path) -> None:
    srv = RedisServer(tmp_path / "redis").start()
    cfg = _config(srv.url, tenants_file)
    statuses: dict[str, list[int]] = {"key-alpha": [], "key-file": [], "key-beta2": []}
    stop = asyncio.Event()
    try:
        async with running(cfg) as gw:
            store = TenantStore(gw.redis)
            assert await store.revoke_key("key-beta2") == 1
            cli_key = (await store.add(Tenant(id="cli"))).api_key  # lives only in Redis
            cli_revoked = (await store.add_key("cli")).api_key
            assert await store.revoke_key(cli_revoked) == 1
            statuses[cli_key], statuses[cli_revoked] = [], []
            await _refreshed()

            async def ask(key: str) -> None:
                while not stop.is_set():
                    try:
                        statuses[key].append(await gw.status(key))
                    except httpx.HTTPError:
                        statuses[key].append(0)
                    await asyncio.sleep(0.02)

            askers = [asyncio.create_task(ask(k)) for k in statuses]
            await asyncio.sleep(0.5)
            srv.stop()
            await asyncio.sleep(1.0)  # refreshes fail: the last good copy serves
            assert gw.directory.health()["source"] == "last good copy"
            srv.start()  # the same port, no data
            for _ in range(200):  # the first refresh that reaches it finds no seed marker, writes back
                if gw.directory.health()["reseeds"]:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # and several refreshes after the re-seed
            stop.set()
            await asyncio.gather(*askers)

            for key in ("key-alpha", "key-file", cli_key):  # the CLI's key too: written back
                assert len(statuses[key]) > 20, statuses[key]
                assert 401 not in statuses[key], (key, statuses[key])
                assert set(statuses[key]) == {200}, (key, sorted(set(statuses[key])))
            # the revocation this gateway knew was written back with the re-seed
            assert set(statuses["key-beta2"]) == {401}
            assert set(statuses[cli_revoked]) == {401}
            for _ in range(100):  # a refresh slowed past its Redis budget keeps the last good copy
                if gw.directory.health()["source"] == "redis":
                    break
                await asyncio.sleep(0.1)
            health = gw.directory.health()
            assert health["source"] == "redis"
            assert health["reseeds"] == 1
            assert health["last_reseed_unix"] is not None
            assert (health["tenants"], health["keys"], health["revoked_keys"]) == (4, 5, 2)
            assert health["directory"]["restores"] == 1
            stored = await gw.redis.hgetall("oss:keys")
            for key in ("key-alpha", "key-beta", "key-file", "key-file2", cli_key):
                assert hash_key(key).encode() in stored, key
            assert await gw.redis.exists("oss:tenants:seeded")
            assert await gw.redis.sismember("oss:keys:revoked", hash_key("key-beta2"))
            # a replica started now finds the directory as it was
            async with running(cfg) as fresh:
                assert await fresh.status("key-alpha") == 200
                assert await fresh.status("key-beta2") == 401
                assert await fresh.status(cli_key) == 200
                assert await fresh.status(cli_revoked) == 401
                assert fresh.directory.health()["reseeds"] == 0
    finally:
        stop.set()
        srv.stop()
