"""Keys, tenants, limits and the queue through the HTTP API, with a real Redis.

The gateway runs in process, built by the same composition root as the Ray deployment
(``build_gateway``); the engine is the fake from ``tests/fakes.py``; the client is the
OpenAI SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner

from serving.cli import main as cli
from serving.config import RedisConfig, ServingConfig, TenantSeed
from serving.gateway.auth import TenantStore
from serving.gateway.tenants import Tenant, TenantLimits, hash_key
from serving.redis_conn import redis_client
from tests.fakes import FakeEngine
from tests.gateway import TestGateway
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration
MODEL = "smol"
MSG = [{"role": "user", "content": "hi"}]
OPS = {"Authorization": "Bearer key-ops"}  # the operator key: /metrics and the detailed /health


class Gateway(TestGateway):
    def __init__(self, cfg: ServingConfig, engine: FakeEngine) -> None:
        self.redis = redis_client(cfg, {}, timeout_s=0.5)  # the gateways' own client builder
        super().__init__(cfg, {MODEL: engine}, self.redis)
        self.engine = engine

    def sdk(self, key: str | None = None) -> openai.AsyncOpenAI:
        return super().sdk(key or "")


def _config(url: str, **extra: object) -> ServingConfig:
    data = {
        "models": [{"name": MODEL, "source": "/x"}],
        "redis": {"url": url},
        "auth": {"required": True, "refresh_s": 0.2, "admin_key_sha256": [hash_key("key-ops")]},
        "queue": {"default_capacity": 2, "lease_ttl_s": 3},
        "tenants": [
            {"id": "alpha", "api_key_sha256": [hash_key("key-alpha")], "models": [MODEL]},
            {"id": "beta", "api_key_sha256": [hash_key("key-beta")], "models": ["other-model"]},
            {"id": "slow", "api_key_sha256": [hash_key("key-slow")], "requests_per_minute": 2},
            {"id": "tok", "api_key_sha256": [hash_key("key-tok")], "tokens_per_minute": 300},
            {"id": "one", "api_key_sha256": [hash_key("key-one")], "max_concurrent_requests": 1},
            {"id": "short", "api_key_sha256": [hash_key("key-short")], "max_output_tokens": 16},
        ],
    }
    data.update(extra)
    return ServingConfig.model_validate(data)


@pytest.fixture
async def gateway(server: RedisServer) -> AsyncIterator[Gateway]:
    gw = Gateway(_config(server.url), FakeEngine())
    await gw.service.start()
    await gw.service.probe_once()
    yield gw
    await gw.close()


async def _chat(gw: Gateway, key: str | None, **kw: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("headers", {}))  # type: ignore[arg-type]
    return await gw.http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": MSG, **kw}, headers=headers
    )


async def test_valid_key_is_served(gateway: Gateway) -> None:
    reply = await gateway.sdk("key-alpha").chat.completions.create(model=MODEL, messages=MSG)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "The capital of France is Paris."
    text = (await gateway.http.get("/metrics", headers=OPS)).text
    assert 'oss_serving_tenant_requests_total{model="smol",tenant="alpha"} 1.0' in text
    assert 'oss_serving_tenant_tokens_total{kind="completion",model="smol",tenant="alpha"} 6.0' in text
    assert 'oss_serving_admissions_total{model="smol",priority="standard"} 1.0' in text


async def test_missing_and_wrong_key_are_401(gateway: Gateway) -> None:
    missing = await _chat(gateway, None)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError) as err:
        await gateway.sdk("key-wrong").chat.completions.create(model=MODEL, messages=MSG)  # type: ignore[arg-type]
    assert isinstance(err.value.body, dict)
    assert err.value.body["type"] == "invalid_request_error"
    assert "key-wrong" not in err.value.body["message"]  # the key is never echoed whole
    assert gateway.engine.calls == []


async def test_model_not_allowed_is_403(gateway: Gateway) -> None:
    resp = await _chat(gateway, "key-beta")
    assert resp.status_code == 403
    assert resp.json()["error"]["param"] == "model"
    assert resp.json()["error"]["code"] == "model_not_allowed"


async def test_revoked_key_stops_working(gateway: Gateway, server: RedisServer) -> None:
    store = TenantStore(gateway.redis)
    issued = await store.add(Tenant(id="gamma"))
    await asyncio.sleep(0.5)  # one directory refresh
    assert (await _chat(gateway, issued.api_key)).status_code == 200
    assert await store.revoke_key(issued.api_key) == 1
    await asyncio.sleep(0.5)
    resp = await _chat(gateway, issued.api_key)
    assert resp.status_code == 401
    assert "revoked" in resp.json()["error"]["message"]


async def test_request_rate_limit_is_429_with_headers(gateway: Gateway) -> None:
    first = await _chat(gateway, "key-slow")
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert (await _chat(gateway, "key-slow")).status_code == 200
    third = await _chat(gateway, "key-slow")
    assert third.status_code == 429
    assert third.json()["error"]["type"] == "requests"  # OpenAI: the limited resource
    assert third.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(third.headers["retry-after"]) <= 30  # one request refills in 30 s
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert third.headers["x-ratelimit-reset-requests"].endswith("s")


async def test_token_rate_limit_is_429(gateway: Gateway) -> None:
    ok = await _chat(gateway, "key-tok", max_tokens=200)
    assert ok.status_code == 200
    assert "x-ratelimit-remaining-tokens" in ok.headers
    again = await _chat(gateway, "key-tok", max_tokens=200)
    # The first request used 11 tokens, not its 200-token estimate: the difference was
    # refunded, so the second one fits.
    assert again.status_code == 200
    too_big = await _chat(gateway, "key-tok", max_tokens=1000)
    assert too_big.status_code == 429
    assert too_big.json()["error"]["type"] == "tokens"
    assert too_big.json()["error"]["code"] == "rate_limit_exceeded"


async def test_concurrency_limit_is_429(gateway: Gateway) -> None:
    gateway.engine.chunk_delay_s = 0.2
    slow = asyncio.create_task(_chat(gateway, "key-one", stream=True))
    await asyncio.sleep(0.15)
    second = await _chat(gateway, "key-one")
    assert second.status_code == 429
    assert second.json()["error"]["type"] == "requests"  # requests at once
    assert second.json()["error"]["code"] == "rate_limit_exceeded"
    assert second.headers["retry-after"] == "1"
    assert (await slow).status_code == 200


async def test_output_cap(gateway: Gateway) -> None:
    over = await _chat(gateway, "key-short", max_tokens=100)
    assert over.status_code == 400
    assert over.json()["error"]["param"] == "max_tokens"
    assert (await _chat(gateway, "key-short")).status_code == 200
    assert gateway.engine.calls[-1][1]["max_tokens"] == 16  # filled in from the tenant limit


async def test_deadline_header(gateway: Gateway) -> None:
    gateway.engine.chunk_delay_s = 0.3
    await gateway.redis.hset("{oss:q:smol}:stats", "ewma_ms", 3000)
    holders = [asyncio.create_task(_chat(gateway, "key-alpha", stream=True)) for _ in range(2)]
    await asyncio.sleep(0.2)
    resp = await _chat(gateway, "key-alpha", headers={"X-Oss-Deadline-Ms": "200"})
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "deadline_unreachable"
    assert int(resp.headers["retry-after"]) >= 3
    bad = await _chat(gateway, "key-alpha", headers={"X-Oss-Deadline-Ms": "soon"})
    assert bad.status_code == 400
    for h in holders:
        assert (await h).status_code == 200
    text = (await gateway.http.get("/metrics", headers=OPS)).text
    assert 'oss_serving_rejections_total{model="smol",reason="deadline_unreachable"} 1.0' in text


async def test_redis_outage_mid_load_loses_nothing(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path / "r").start()
    gw = Gateway(_config(srv.url, queue={"default_capacity": 3, "lease_ttl_s": 1.5}), FakeEngine())
    gw.engine.chunk_delay_s = 0.05
    await gw.service.start()
    await gw.service.probe_once()
    try:
        assert (await gw.http.get("/health", headers=OPS)).json()["status"] == "ok"
        requests = [asyncio.create_task(_chat(gw, "key-alpha", stream=True)) for _ in range(30)]
        await asyncio.sleep(0.3)
        srv.stop()
        await asyncio.sleep(0.8)
        await gw.service.probe_once()
        health = (await gw.http.get("/health", headers=OPS)).json()
        assert health["status"] == "degraded"
        assert health["redis"] == "unreachable"
        more = [asyncio.create_task(_chat(gw, "key-alpha", stream=True)) for _ in range(10)]
        srv.start()
        results = await asyncio.gather(*requests, *more)
        assert [r.status_code for r in results] == [200] * 40  # none lost
        assert all(r.text.rstrip().endswith("data: [DONE]") for r in results)
        for _ in range(40):
            await gw.service.probe_once()
            if (await gw.http.get("/health", headers=OPS)).json()["status"] == "ok":
                break
            await asyncio.sleep(0.1)
        assert (await gw.http.get("/health", headers=OPS)).json()["status"] == "ok"
    finally:
        with contextlib.suppress(Exception):
            await gw.close()
        srv.stop()


def test_tenants_admin_command(server: RedisServer) -> None:
    runner = CliRunner()
    added = runner.invoke(cli, ["tenants", "add", "team-a", "--rpm", "60", "--redis-url", server.url])
    assert added.exit_code == 0, added.output
    key = added.output.strip().splitlines()[-1]
    assert key.startswith("oss-")
    listed = runner.invoke(cli, ["tenants", "list", "--redis-url", server.url], env={"COLUMNS": "200"})
    assert "team-a" in listed.output
    assert key not in listed.output  # only a hint is shown
    assert key[:10] in listed.output
    rotated = runner.invoke(cli, ["tenants", "rotate", "team-a", "--redis-url", server.url])
    new_key = rotated.output.strip().splitlines()[-1]
    assert new_key != key

    async def keys() -> dict[str, str]:
        client = redis_client(RedisConfig(url=server.url), {})
        try:
            return (await TenantStore(client).snapshot())[1]
        finally:
            await client.aclose()

    stored = asyncio.run(keys())
    assert hash_key(new_key) in stored
    assert hash_key(key) not in stored  # rotation revoked the old key
    assert key not in str(stored)  # keys are stored hashed
    revoked = runner.invoke(cli, ["tenants", "revoke", new_key, "--redis-url", server.url])
    assert revoked.exit_code == 0
    assert hash_key(new_key) not in asyncio.run(keys())
    unknown = runner.invoke(cli, ["tenants", "revoke", "oss-nope", "--redis-url", server.url])
    assert unknown.exit_code == 1


def test_seeds_accept_the_chart_tenants_file(tmp_path: Path) -> None:
    from serving.gateway.auth import TenantDirectory

    path = tmp_path / "tenants.yaml"
    path.write_text("tenants:\n  - id: team-x\n    weight: 2\n    api_keys: [secret-x]\n")
    cfg = _config("redis://127.0.0.1:1/0")
    directory = TenantDirectory(None, cfg.auth, [TenantSeed(id="seeded")], tenants_file=path)
    tenant = directory.authenticate("Bearer secret-x")
    assert tenant.id == "team-x"
    assert tenant.weight == 2
    assert isinstance(tenant.limits, TenantLimits)
