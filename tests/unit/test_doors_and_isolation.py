"""Closed doors and tenant isolation, in process.

With authentication on, ``/metrics`` and the detailed ``/health`` need an operator key,
probes get only live/ready, ``/v1/models`` needs a key and lists only the tenant's
models. Every engine request carries the tenant's ``cache_salt`` (the client's own is
replaced), and the prefix index hashes and affinity keys are scoped by it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from serving.config import RoutingConfig
from serving.gateway.context import RequestContext
from serving.gateway.isolation import CacheIsolation
from serving.gateway.prefix import block_hashes
from serving.gateway.routing import affinity_key
from serving.gateway.tenants import Tenant, hash_key
from serving.wire import Endpoint
from tests.fakes import FakeEngine
from tests.gateway import TestGateway, config_for

MODEL, OTHER = "m", "other"
MSG = [{"role": "user", "content": "hi"}]
KEY = {t: f"key-{t}" for t in ("a", "b", "c", "narrow")}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
async def gw() -> AsyncIterator[TestGateway]:
    cfg = config_for(
        [MODEL, OTHER],
        auth={
            "required": True,
            "admin_key_sha256": [hash_key("key-ops")],
            "cache_groups": {"team-x": ["b", "c"]},
        },
        tenants=[
            {"id": "a", "api_key_sha256": [hash_key(KEY["a"])]},
            {"id": "b", "api_key_sha256": [hash_key(KEY["b"])]},
            {"id": "c", "api_key_sha256": [hash_key(KEY["c"])]},
            {"id": "narrow", "api_key_sha256": [hash_key(KEY["narrow"])], "models": [MODEL]},
        ],
    )
    g = TestGateway(
        cfg, {MODEL: FakeEngine(), OTHER: FakeEngine()}, environ={"OSS_SERVING_CACHE_SALT_SECRET": "s3"}
    )
    await g.service.probe_once()
    yield g
    await g.close()


async def test_metrics_need_an_operator_key(gw: TestGateway) -> None:
    assert (await gw.http.get("/metrics")).status_code == 401
    tenant = await gw.http.get("/metrics", headers=bearer(KEY["a"]))
    assert tenant.status_code == 401
    assert tenant.json()["error"]["code"] == "invalid_api_key"
    ops = await gw.http.get("/metrics", headers=bearer("key-ops"))
    assert ops.status_code == 200
    assert "oss_serving_requests_total" in ops.text


async def test_health_details_only_for_operators(gw: TestGateway) -> None:
    public = (await gw.http.get("/health")).json()
    assert set(public) == {"live", "ready", "status"}
    assert set((await gw.http.get("/health", headers=bearer(KEY["a"]))).json()) == {"live", "ready", "status"}
    detailed = (await gw.http.get("/health", headers=bearer("key-ops"))).json()
    assert {"models", "redis", "admission"} <= set(detailed)
    ready = await gw.http.get("/health/ready")
    assert ready.status_code == 200
    assert set(ready.json()) == {"ready", "status"}
    assert (await gw.http.get("/health/live")).json() == {"live": True}


async def test_models_need_a_key_and_are_filtered(gw: TestGateway) -> None:
    missing = await gw.http.get("/v1/models")
    assert missing.status_code == 401
    everything = (await gw.http.get("/v1/models", headers=bearer(KEY["a"]))).json()
    assert sorted(m["id"] for m in everything["data"]) == [MODEL, OTHER]
    narrow = gw.sdk(KEY["narrow"])
    assert [m.id for m in (await narrow.models.list()).data] == [MODEL]
    hidden = await gw.http.get(f"/v1/models/{OTHER}", headers=bearer(KEY["narrow"]))
    assert hidden.status_code == 404  # as if it did not exist
    assert hidden.json()["error"]["code"] == "model_not_found"


async def test_open_doors_without_authentication() -> None:
    g = TestGateway(config_for([MODEL]), {MODEL: FakeEngine()})
    try:
        await g.service.probe_once()
        assert (await g.http.get("/metrics")).status_code == 200
        assert "models" in (await g.http.get("/health")).json()
        assert (await g.http.get("/v1/models")).status_code == 200
    finally:
        await g.close()


async def test_every_engine_request_carries_the_tenants_salt(gw: TestGateway) -> None:
    engine = gw.engines[MODEL]
    assert isinstance(engine, FakeEngine)
    for tenant in ("a", "a", "b", "c"):
        body = {"model": MODEL, "messages": MSG, "cache_salt": "chosen-by-the-client"}
        resp = await gw.http.post("/v1/chat/completions", json=body, headers=bearer(KEY[tenant]))
        assert resp.status_code == 200
    salts = [body["cache_salt"] for _, body, _ in engine.calls]
    assert "chosen-by-the-client" not in salts
    assert salts[0] == salts[1]  # the same tenant: the same salt (cache hits stay possible)
    assert salts[0] != salts[2]  # another tenant: another salt
    assert salts[2] == salts[3]  # b and c share the group team-x


def test_salts_come_from_the_secret_and_the_group() -> None:
    one = CacheIsolation({"g": ["x", "y"]}, "secret-1")
    two = CacheIsolation({"g": ["x", "y"]}, "secret-2")
    assert one.salt("x") == one.salt("y") != one.salt("z")
    assert one.salt("x") != two.salt("x")
    assert len(one.salt("z")) == 32


def test_prefix_hashes_and_affinity_keys_are_scoped() -> None:
    text = "You are the payroll assistant. " * 40
    assert block_hashes(text, 64, 8, "salt-a")[0] != block_hashes(text, 64, 8, "salt-b")[0]
    assert block_hashes(text, 64, 8, "salt-a") == block_hashes(text, 64, 8, "salt-a")
    cfg = RoutingConfig()
    ctx_a = RequestContext("r", Endpoint.chat, MODEL, {"prompt_cache_key": "k1"}, tenant=Tenant(id="a"))
    ctx_b = RequestContext("r", Endpoint.chat, MODEL, {"prompt_cache_key": "k1"}, tenant=Tenant(id="b"))
    ctx_a.cache_scope, ctx_b.cache_scope = "salt-a", "salt-b"
    assert affinity_key(ctx_a, cfg) != affinity_key(ctx_b, cfg)


async def test_operators_see_where_the_tenant_directory_comes_from(gw: TestGateway) -> None:
    detailed = (await gw.http.get("/health", headers=bearer("key-ops"))).json()
    assert detailed["tenants"]["tenants"] == 4
    assert detailed["tenants"]["source"] in ("configuration", "redis", "last good copy")
    assert "tenants" not in (await gw.http.get("/health")).json()
