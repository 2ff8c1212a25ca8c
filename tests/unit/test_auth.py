"""The tenant directory: revocations that last, bad records skipped, Redis that lost its data.

Against the unit tests' Redis (conftest: 6379 or a private one), each test under a key prefix of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner
from redis.exceptions import RedisError

from serving.cli import main as cli
from serving.config import AuthConfig, TenantSeed
from serving.gateway.auth import TenantDirectory, TenantStore, parse_directory
from serving.gateway.errors import UnauthorizedError
from serving.gateway.tenants import Tenant, hash_key
from serving.metrics import GatewayMetrics

AUTH = AuthConfig(required=True, refresh_s=0.05)
SEEDS = [
    TenantSeed(id="alpha", api_key_sha256=[hash_key("key-alpha")]),
    TenantSeed(id="beta", api_key_sha256=[hash_key("key-beta"), hash_key("key-beta2")]),
]


@pytest.fixture
async def prefix(redis_client: aioredis.Redis) -> AsyncIterator[str]:
    name = f"authtest-{uuid.uuid4().hex[:8]}"
    yield name
    found = [k async for k in redis_client.scan_iter(match=f"{name}:*")]
    if found:
        await redis_client.delete(*found)


@pytest.fixture
def tenants_file(tmp_path: Path) -> Path:
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants:\n  - id: filed\n    api_keys: [key-file]\n")
    return path


def _directory(
    redis_client: aioredis.Redis, prefix: str, tenants_file: Path | None = None, **kw: Any
) -> TenantDirectory:
    return TenantDirectory(TenantStore(redis_client, prefix), AUTH, SEEDS, tenants_file=tenants_file, **kw)


def _ok(directory: TenantDirectory, key: str) -> bool:
    try:
        directory.authenticate(f"Bearer {key}")
    except UnauthorizedError:
        return False
    return True


async def test_revoked_seeded_keys_stay_revoked_across_restarts(
    redis_client: aioredis.Redis, prefix: str, tenants_file: Path
) -> None:
    first = _directory(redis_client, prefix, tenants_file)
    await first.refresh()
    assert _ok(first, "key-alpha")
    assert _ok(first, "key-file")
    store = TenantStore(redis_client, prefix)
    assert await store.revoke_key("key-alpha") == 1
    assert await store.revoke_key("key-file") == 1
    await first.refresh()
    assert not _ok(first, "key-alpha")
    # A restart (a new replica, a rollout): seeding writes the configured keys again...
    for _ in range(2):
        restarted = _directory(redis_client, prefix, tenants_file)
        await restarted.refresh()
        assert not _ok(restarted, "key-alpha")
        assert not _ok(restarted, "key-file")
        assert _ok(restarted, "key-beta")
    # ...but never a tombstoned hash, and the key is gone from the listing too.
    assert hash_key("key-alpha") not in await redis_client.hgetall(f"{prefix}:keys")
    assert hash_key("key-alpha") not in (await store.snapshot())[1]


async def test_revoking_by_hint_and_by_tenant_and_rotating_last(
    redis_client: aioredis.Redis, prefix: str
) -> None:
    store = TenantStore(redis_client, prefix)
    await _directory(redis_client, prefix).refresh()
    # a seeded key's hint is the start of its hash
    assert await store.revoke_key(hash_key("key-beta2")[:10]) == 1
    issued = await store.rotate("alpha")
    assert await store.revoke_tenant("beta") == 1  # key-beta (key-beta2 was already revoked)
    restarted = _directory(redis_client, prefix)
    await restarted.refresh()
    assert not _ok(restarted, "key-alpha")  # rotated away
    assert _ok(restarted, issued.api_key)
    assert not _ok(restarted, "key-beta")
    assert not _ok(restarted, "key-beta2")
    assert "beta" not in restarted.tenant_ids()  # a revoked tenant is not seeded again
    # `tenants add` brings the tenant back deliberately, with a new key; the old ones stay revoked
    fresh = await store.add(Tenant(id="beta"))
    again = _directory(redis_client, prefix)
    await again.refresh()
    assert _ok(again, fresh.api_key)
    assert not _ok(again, "key-beta")
    with pytest.raises(ValueError, match="revoked"):
        await store.add_key("beta", "key-beta")


async def test_bad_records_are_skipped_counted_and_logged_once(
    redis_client: aioredis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="oss_serving.auth")
    metrics = GatewayMetrics(["m"], [1.0])
    directory = _directory(redis_client, prefix, metrics=metrics)
    await directory.start()
    try:
        tenants, keys = f"{prefix}:tenants", f"{prefix}:keys"
        await redis_client.hset(tenants, "broken", "{not json")
        await redis_client.hset(tenants, "typed", json.dumps({"id": "typed", "weight": "heavy"}))
        newer = {"id": "newer", "weight": 2, "limits": {"burst": 3}, "from_a_newer_version": True}
        await redis_client.hset(tenants, "newer", json.dumps(newer))
        await redis_client.hset(keys, hash_key("key-newer"), json.dumps({"tenant": "newer", "x": 1}))
        await redis_client.hset(keys, hash_key("key-bad"), json.dumps({"tenant": 5}))
        for _ in range(3):
            await directory.refresh()
        skipped = [r for r in caplog.records if "does not parse" in r.getMessage()]
        assert len(skipped) == 3  # each bad record once, not once per refresh
        assert (
            metrics.registry.get_sample_value("oss_serving_tenant_records_invalid_total", {"kind": "tenant"})
            == 2
        )
        assert (
            metrics.registry.get_sample_value("oss_serving_tenant_records_invalid_total", {"kind": "key"})
            == 1
        )
        assert directory.health()["invalid_records"] == 3
        assert directory.authenticate("Bearer key-newer").weight == 2  # unknown fields ignored
        assert _ok(directory, "key-alpha")
        # the loop still refreshes: a revocation made now takes effect
        assert await TenantStore(redis_client, prefix).revoke_key("key-alpha") == 1
        await asyncio.sleep(0.3)
        assert not _ok(directory, "key-alpha")
        # a fresh replica starts
        fresh = _directory(redis_client, prefix)
        await fresh.start()
        await fresh.stop()
        assert _ok(fresh, "key-beta")
        assert fresh.health()["source"] == "redis"
        # fixed, the record counts no more
        await redis_client.hdel(tenants, "broken", "typed")
        await directory.refresh()
        assert directory.health()["invalid_records"] == 1
    finally:
        await directory.stop()


def test_parse_directory_never_raises_on_a_record() -> None:
    snap = parse_directory(
        b"1700000000-abcd",
        {
            b"ok": b'{"id": "ok"}',
            b"liar": b'{"id": "other"}',  # its id is not its field
            b"\xff": b"\xff\xfe",
            b"null": b"null",
            b"list": b"[1, 2]",
        },
        {b"h1": b'{"tenant": "ok"}', b"h2": b"", b"h3": b'{"hint": "x"}', b"h4": b'{"tenant": "gone"}'},
        {b"h4"},
        set(),
    )
    assert list(snap.tenants) == ["ok"]
    assert snap.keys == {"h1": "ok"}
    assert list(snap.key_records) == ["h1"]
    assert snap.seeded
    assert snap.epoch == "1700000000-abcd"
    assert not parse_directory(None, {}, {}, set(), set()).seeded
    assert sorted(r.name for r in snap.invalid) == ["h2", "h3", "liar", "list", "null", "\ufffd"]


async def test_the_refresh_loop_survives_any_error(redis_client: aioredis.Redis, prefix: str) -> None:
    directory = _directory(redis_client, prefix)
    store = directory._store
    assert store is not None
    real = store.read
    calls = 0

    async def flaky() -> Any:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("a bug")
        return await real()

    store.read = flaky  # type: ignore[method-assign]
    await directory.start()  # the first refresh fails: the replica still starts
    try:
        assert directory.health()["source"] == "configuration"
        await TenantStore(redis_client, prefix).revoke_key("key-alpha")
        await asyncio.sleep(0.4)
        assert calls > 3
        assert not _ok(directory, "key-alpha")
        assert directory.health()["source"] == "redis"
    finally:
        await directory.stop()


async def _flush(redis_client: aioredis.Redis, prefix: str) -> None:
    """Redis loses everything under the prefix (FLUSHALL, restarted empty, an empty replica)."""
    await redis_client.delete(*[k async for k in redis_client.scan_iter(match=f"{prefix}:*")])


async def test_redis_that_lost_the_directory_gets_the_last_good_copy_back(
    redis_client: aioredis.Redis, prefix: str, tenants_file: Path
) -> None:
    directory = _directory(redis_client, prefix, tenants_file)
    store = TenantStore(redis_client, prefix)
    await directory.refresh()
    issued = await store.add(Tenant(id="cli", weight=3))  # `oss-serve tenants add`: only in Redis
    revoked = await store.add_key("cli")
    assert await store.revoke_key(revoked.api_key) == 1  # a CLI key, revoked
    await store.revoke_key("key-beta2")  # a seeded key, revoked
    await directory.refresh()
    before = directory.health()
    assert before["source"] == "redis"
    assert before["reseeds"] == 0
    assert (before["tenants"], before["keys"], before["revoked_keys"]) == (4, 4, 2)
    assert before["directory"]["records"] == 4 + 4 + 2
    hints = await redis_client.hgetall(f"{prefix}:keys")

    await _flush(redis_client, prefix)
    await directory.refresh()
    after = directory.health()
    assert after["source"] == "redis"
    assert after["reseeds"] == 1
    assert after["last_reseed_unix"] is not None
    assert after["directory"]["restores"] == 1
    assert after["directory"]["restored_at_unix"] is not None
    assert after["directory"]["restored_records"] == 8  # 4 tenants, 4 keys
    assert after["directory"]["restore_pending"] is False
    assert (after["tenants"], after["keys"], after["revoked_keys"]) == (4, 4, 2)
    for key in ("key-alpha", "key-beta", "key-file", issued.api_key):
        assert _ok(directory, key), key
    assert directory.authenticate(f"Bearer {issued.api_key}").weight == 3  # the tenant as it was
    for key in ("key-beta2", revoked.api_key):  # tombstones written back: still revoked
        assert not _ok(directory, key), key
        assert await redis_client.sismember(f"{prefix}:keys:revoked", hash_key(key))
    # every record came back as it was (hints and creation times of CLI keys included)
    assert await redis_client.hgetall(f"{prefix}:keys") == hints
    # a replica started now reads the same directory, and nothing is lost again
    fresh = _directory(redis_client, prefix, tenants_file)
    await fresh.refresh()
    assert _ok(fresh, issued.api_key)
    assert not _ok(fresh, revoked.api_key)
    assert fresh.health()["reseeds"] == 0
    await directory.refresh()
    assert directory.health()["reseeds"] == 1

    # The write-back fails (Redis answers reads, refuses scripts): the last good copy serves
    await _flush(redis_client, prefix)

    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RedisError("READONLY You can't write against a read only replica.")

    real = store_of(directory).restore
    store_of(directory).restore = refuse  # type: ignore[method-assign]
    await directory.refresh()
    stuck = directory.health()
    assert stuck["source"] == "last good copy"
    assert "READONLY" in stuck["last_error"]
    assert stuck["directory"]["restore_pending"] is True
    assert _ok(directory, "key-alpha")
    assert _ok(directory, issued.api_key)
    assert not _ok(directory, revoked.api_key)
    store_of(directory).restore = real  # type: ignore[method-assign]
    await directory.refresh()
    assert directory.health()["source"] == "redis"
    assert directory.health()["directory"]["restore_pending"] is False
    assert _ok(directory, issued.api_key)
    assert not _ok(directory, revoked.api_key)


def store_of(directory: TenantDirectory) -> TenantStore:
    assert directory._store is not None
    return directory._store


async def test_replicas_that_race_to_write_back_agree(
    redis_client: aioredis.Redis, prefix: str, tenants_file: Path
) -> None:
    store = TenantStore(redis_client, prefix)
    first = _directory(redis_client, prefix, tenants_file)
    await first.refresh()
    early = await store.add(Tenant(id="early"))
    await first.refresh()
    second = _directory(redis_client, prefix, tenants_file)
    late = await store.add(Tenant(id="late"))  # the first replica has not seen it yet
    assert await store.revoke_key("key-alpha") == 1
    await second.refresh()  # the second one has, and the revocation too
    await _flush(redis_client, prefix)
    await asyncio.gather(first.refresh(), second.refresh())
    # the union of what they knew, and the revocation stays (tombstones beat records)
    for directory in (first, second):
        await directory.refresh()
        assert _ok(directory, early.api_key)
        assert _ok(directory, late.api_key)
        assert not _ok(directory, "key-alpha")
        assert _ok(directory, "key-file")
        assert directory.health()["source"] == "redis"
    assert len({await redis_client.get(f"{prefix}:tenants:seeded")}) == 1


async def test_a_late_write_back_never_undoes_a_change_made_since(
    redis_client: aioredis.Redis, prefix: str
) -> None:
    store = TenantStore(redis_client, prefix)
    first, second = _directory(redis_client, prefix), _directory(redis_client, prefix)
    await first.refresh()
    cli = await store.add(Tenant(id="cli", weight=1))
    await asyncio.gather(first.refresh(), second.refresh())
    await _flush(redis_client, prefix)
    await first.refresh()  # writes its copy back
    await store.put_tenant(Tenant(id="cli", weight=7))  # `tenants add cli --weight 7` since
    await second.refresh()  # another epoch: writes its (older) copy back, only where Redis has nothing
    assert second.health()["reseeds"] == 1
    assert second.authenticate(f"Bearer {cli.api_key}").weight == 7
    assert (await store.get_tenant("cli")) == Tenant(id="cli", weight=7)


async def test_a_replica_that_seeded_the_empty_redis_first_does_not_lose_cli_keys(
    redis_client: aioredis.Redis, prefix: str
) -> None:
    old = _directory(redis_client, prefix)
    store = TenantStore(redis_client, prefix)
    await old.refresh()
    issued = await store.add(Tenant(id="cli"))
    revoked = await store.add_key("cli")
    await store.revoke_key(revoked.api_key)
    await old.refresh()
    epoch = old.health()["directory"]["epoch"]
    await _flush(redis_client, prefix)
    # A new replica starts before the old one refreshes: it seeds the configuration only
    new = _directory(redis_client, prefix)
    await new.refresh()
    assert new.health()["reseeds"] == 0
    assert not _ok(new, issued.api_key)
    # the old one sees another epoch: Redis lost the directory; it writes its copy back
    await old.refresh()
    assert old.health()["reseeds"] == 1
    assert old.health()["directory"]["epoch"] != epoch
    await new.refresh()
    for directory in (old, new):
        assert _ok(directory, issued.api_key)
        assert not _ok(directory, revoked.api_key)
        assert _ok(directory, "key-alpha")


async def test_a_fresh_replica_seeds_an_empty_redis_from_the_configuration(
    redis_client: aioredis.Redis, prefix: str, tenants_file: Path
) -> None:
    directory = _directory(redis_client, prefix, tenants_file)
    await directory.refresh()
    health = directory.health()
    assert health["source"] == "redis"
    assert health["reseeds"] == 0
    assert (health["tenants"], health["keys"]) == (3, 4)
    assert health["directory"]["epoch"] == _s(await redis_client.get(f"{prefix}:tenants:seeded"))
    for key in ("key-alpha", "key-beta", "key-beta2", "key-file"):
        assert _ok(directory, key), key
    # Redis empties before it ever read anything back: the configuration is seeded again
    empty = TenantDirectory(TenantStore(redis_client, prefix), AUTH, SEEDS)
    await _flush(redis_client, prefix)
    empty._seeded = True  # started (seeded) before the loss, never read Redis since
    await empty.refresh()
    assert _ok(empty, "key-alpha")
    assert empty.health()["reseeds"] == 1
    assert await redis_client.hexists(f"{prefix}:keys", hash_key("key-alpha"))


def _s(value: bytes | None) -> str | None:
    return value.decode() if value is not None else None


def test_revoke_and_rotate_help_state_the_rule() -> None:
    for command in ("revoke", "rotate"):
        text = " ".join(CliRunner().invoke(cli, ["tenants", command, "--help"]).output.split())
        assert "stays revoked even if the configuration or the tenants file still lists it" in text
        assert "remove it there too" in text
