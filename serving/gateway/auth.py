"""API keys -> tenants, stored in Redis (keys hashed), managed by ``oss-serve tenants``.

Redis layout (prefix ``oss``):

- ``oss:tenants``  HASH tenant id -> tenant JSON (weight, priority, limits, models, handoff);
- ``oss:keys``     HASH sha256(key) -> JSON {tenant, hint, created}; ``hint`` is the key's
  first characters, so ``list`` can show which key is which without storing it.

Each gateway keeps a copy of both hashes and refreshes it every ``auth.refresh_s``, so
authentication costs no Redis round trip, a revoked key stops working within that time,
and a gateway keeps authenticating from its last copy while Redis is away. Tenants from
the configuration (and from ``auth.tenants_file``) are seeded into Redis at start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from redis.exceptions import RedisError

from serving.config import AuthConfig, TenantSeed
from serving.gateway.errors import ForbiddenError, UnauthorizedError
from serving.gateway.tenants import (
    HandoffRight,
    PriorityClass,
    Tenant,
    TenantLimits,
    hash_key,
    local_tenant,
    new_api_key,
)
from serving.tasks import cancel_and_wait, raise_if_cancelling

__all__ = ["IssuedKey", "TenantDirectory", "TenantStore", "tenant_from_seed"]

log = logging.getLogger("oss_serving.auth")


def tenant_from_seed(seed: TenantSeed) -> Tenant:
    return Tenant(
        id=seed.id,
        weight=seed.weight,
        priority=PriorityClass(seed.priority),
        limits=TenantLimits(
            requests_per_minute=seed.requests_per_minute,
            tokens_per_minute=seed.tokens_per_minute,
            max_concurrent_requests=seed.max_concurrent_requests,
            max_output_tokens=seed.max_output_tokens,
        ),
        models=list(seed.models),
        handoff=HandoffRight(seed.handoff),
        response_cache=seed.response_cache,
    )


@dataclass(frozen=True)
class IssuedKey:
    tenant: str
    api_key: str
    """Shown once; only its hash is stored."""


class TenantStore:
    """Tenants and hashed keys in Redis (used by the gateway and the admin command)."""

    def __init__(self, redis: Any, key_prefix: str = "oss") -> None:
        self._redis = redis
        self.tenants_key = f"{key_prefix}:tenants"
        self.keys_key = f"{key_prefix}:keys"

    async def put_tenant(self, tenant: Tenant) -> None:
        await self._redis.hset(self.tenants_key, tenant.id, tenant.model_dump_json())

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        raw = await self._redis.hget(self.tenants_key, tenant_id)
        return Tenant.model_validate_json(raw) if raw else None

    async def add_key(
        self, tenant_id: str, api_key: str | None = None, *, key_hash: str | None = None
    ) -> IssuedKey:
        key = api_key or (new_api_key() if key_hash is None else "")
        digest = key_hash or hash_key(key)
        record = {
            "tenant": tenant_id,
            "hint": key[:10] + "…" if key else digest[:10],
            "created": int(time.time()),
        }
        await self._redis.hset(self.keys_key, digest, json.dumps(record))
        return IssuedKey(tenant=tenant_id, api_key=key)

    async def add(self, tenant: Tenant) -> IssuedKey:
        """Create (or update) a tenant and issue it a new key."""
        await self.put_tenant(tenant)
        return await self.add_key(tenant.id)

    async def revoke_key(self, api_key_or_hint: str) -> int:
        """Revoke a key given in full, or by its hint (the first characters)."""
        digest = hash_key(api_key_or_hint)
        if await self._redis.hdel(self.keys_key, digest):
            return 1
        removed = 0
        for digest_b, raw in (await self._redis.hgetall(self.keys_key)).items():
            hint = json.loads(raw)["hint"].rstrip("…")
            if hint and api_key_or_hint.startswith(hint):
                removed += await self._redis.hdel(self.keys_key, digest_b)
        return removed

    async def revoke_tenant(self, tenant_id: str) -> int:
        """Revoke every key of a tenant and remove the tenant."""
        removed = 0
        for digest, raw in (await self._redis.hgetall(self.keys_key)).items():
            if json.loads(raw)["tenant"] == tenant_id:
                removed += await self._redis.hdel(self.keys_key, digest)
        await self._redis.hdel(self.tenants_key, tenant_id)
        return removed

    async def rotate(self, tenant_id: str) -> IssuedKey:
        """Issue a new key and revoke the tenant's old ones."""
        if await self.get_tenant(tenant_id) is None:
            raise KeyError(tenant_id)
        old = [
            d
            for d, raw in (await self._redis.hgetall(self.keys_key)).items()
            if json.loads(raw)["tenant"] == tenant_id
        ]
        issued = await self.add_key(tenant_id)
        if old:
            await self._redis.hdel(self.keys_key, *old)
        return issued

    async def snapshot(self) -> tuple[dict[str, Tenant], dict[str, str], dict[str, list[str]]]:
        """(tenants by id, tenant id by key hash, key hints by tenant id)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.tenants_key)
            pipe.hgetall(self.keys_key)
            raw_tenants, raw_keys = await pipe.execute()
        tenants = {_s(k): Tenant.model_validate_json(v) for k, v in raw_tenants.items()}
        keys: dict[str, str] = {}
        hints: dict[str, list[str]] = {}
        for digest, raw in raw_keys.items():
            record = json.loads(raw)
            keys[_s(digest)] = record["tenant"]
            hints.setdefault(record["tenant"], []).append(record["hint"])
        return tenants, keys, hints


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _load_tenants_file(path: Path) -> list[tuple[TenantSeed, list[str]]]:
    data = yaml.safe_load(path.read_text()) or {}
    out = []
    for item in data.get("tenants", []):
        keys = list(item.pop("api_keys", []) or [])
        out.append((TenantSeed.model_validate(item), keys))
    return out


class TenantDirectory:
    """A gateway's view of tenants and keys: authenticate without a Redis round trip."""

    def __init__(
        self,
        store: TenantStore | None,
        config: AuthConfig,
        seeds: list[TenantSeed],
        *,
        tenants_file: Path | None = None,
    ) -> None:
        self._store = store
        self._config = config
        self._seeds = list(seeds)
        self._tenants_file = tenants_file or config.tenants_file
        self._tenants: dict[str, Tenant] = {}
        self._keys: dict[str, str] = {}
        self._file_keys: list[tuple[str, str]] = []
        self._task: asyncio.Task[None] | None = None
        self._seeded = False
        self._load_seeds()

    def _load_seeds(self) -> None:
        for seed in self._seeds:
            self._tenants[seed.id] = tenant_from_seed(seed)
            for digest in seed.api_key_sha256:
                self._keys[digest] = seed.id
        if self._tenants_file is not None:
            for seed, keys in _load_tenants_file(Path(self._tenants_file)):
                self._tenants[seed.id] = tenant_from_seed(seed)
                for key in keys:
                    self._keys[hash_key(key)] = seed.id
                    self._file_keys.append((seed.id, key))

    @property
    def required(self) -> bool:
        return self._config.required

    def tenant_ids(self) -> list[str]:
        return sorted(self._tenants)

    async def seed(self) -> None:
        """Write configured tenants and keys to Redis (hashed), once."""
        if self._store is None or self._seeded:
            return
        for tenant in {t.id: t for t in self._tenants.values()}.values():
            await self._store.put_tenant(tenant)
        for digest, tenant_id in list(self._keys.items()):
            await self._store.add_key(tenant_id, key_hash=digest)
        self._seeded = True

    async def refresh(self) -> None:
        if self._store is None:
            return
        try:
            await self.seed()
            tenants, keys, _hints = await self._store.snapshot()
        except (RedisError, OSError) as exc:
            log.debug("tenant refresh failed (keeping the last copy): %s", exc)
            return
        self._tenants = tenants
        self._keys = keys

    async def start(self) -> None:
        await self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="oss-serving-tenants")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.refresh_s)
            await self.refresh()
            raise_if_cancelling()  # refresh keeps going on Redis errors, a hidden cancel among them

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of an ``Authorization: Bearer <key>`` header; 401 otherwise."""
        if not self._config.required:
            return local_tenant()
        if not authorization:
            raise UnauthorizedError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
            )
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise UnauthorizedError("The Authorization header must be 'Bearer YOUR_KEY'.")
        tenant_id = self._keys.get(hash_key(key.strip()))
        tenant = self._tenants.get(tenant_id) if tenant_id else None
        if tenant is None:
            shown = key.strip()[:6] + "…" if len(key.strip()) > 6 else "…"
            raise UnauthorizedError(f"Incorrect API key provided: {shown}. It is unknown or was revoked.")
        return tenant

    @staticmethod
    def authorize(tenant: Tenant, model: str) -> None:
        if not tenant.may_use(model):
            raise ForbiddenError(
                f"Tenant '{tenant.id}' may not use the model '{model}'.",
                param="model",
                code="model_not_allowed",
            )
