"""API keys -> tenants, stored in Redis (keys hashed), managed by ``oss-serve tenants``.

Redis layout (prefix ``oss``):

- ``oss:tenants``          HASH tenant id -> tenant JSON (weight, priority, limits, models, handoff);
- ``oss:keys``             HASH sha256(key) -> JSON {tenant, hint, created}; ``hint`` is the key's
  first characters, so ``list`` can show which key is which without storing it;
- ``oss:keys:revoked``     SET of revoked key hashes (tombstones);
- ``oss:tenants:revoked``  SET of revoked tenant ids (tombstones);
- ``oss:tenants:seeded``   STRING, the seed marker: the directory's epoch, written (only if absent)
  by the first seeding of an empty Redis.

Each gateway keeps a copy of the directory and refreshes it every ``auth.refresh_s``, so
authentication costs no Redis round trip, a revoked key stops working within that time,
and a gateway keeps authenticating from its last copy while Redis is away.

**Revocations are tombstones.** Tenants from the configuration (and from
``auth.tenants_file``) are seeded into Redis when a gateway starts; seeding (one Lua
script) never writes back a key hash or a tenant that has a tombstone, and
:meth:`TenantDirectory.authenticate` rejects a tombstoned key whatever else says. So a
revoked key stays revoked across restarts, rollouts and re-seeding, even while the
configuration still lists it.

**Bad records are skipped.** Records are parsed one at a time and unknown fields are
ignored (a newer version may add some); a record that does not parse is left out,
logged once and counted (``oss_serving_tenant_records_invalid_total``); the rest of the
directory still refreshes.

**Redis that lost its data.** A missing seed marker (Redis restarted empty, FLUSHALL,
failover to an empty replica), a marker with another epoch than the one this gateway
last read (another gateway or a new replica seeded the empty Redis first), or a directory
with no record at all where this gateway's last copy had some, means Redis lost the
directory. The gateway that notices keeps authenticating from its last good copy and
writes it back: every tenant, every key record (keys issued with ``tenants add`` and
``rotate`` included) and every tombstone, then the configuration's seeds, then a new
epoch. The write-back (one Lua script) only fills what is absent (``HSETNX``) and never
writes a tombstoned key or tenant, so gateways that race write the union of what they
knew and a revoked key stays revoked. ``health()["directory"]`` says when it happened and
how many records came back. Revocations made in the last ``auth.refresh_s`` before the loss
may be missing from every copy; if every gateway restarted too, the configuration is the
whole source of truth (keys issued with the CLI are gone; run Redis with persistence).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict
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

if TYPE_CHECKING:
    from serving.metrics import GatewayMetrics

__all__ = [
    "DirectorySnapshot",
    "InvalidRecord",
    "IssuedKey",
    "KeyRecord",
    "TenantDirectory",
    "TenantStore",
    "Written",
    "tenant_from_seed",
]

log = logging.getLogger("oss_serving.auth")

Source = Literal["configuration", "redis", "last good copy"]


def tenant_from_seed(seed: TenantSeed) -> Tenant:
    return Tenant(
        id=seed.id,
        weight=seed.weight,
        priority=PriorityClass(seed.priority),
        limits=TenantLimits.model_validate(seed.model_dump(include=set(TenantLimits.model_fields))),
        models=list(seed.models),
        handoff=HandoffRight(seed.handoff),
        response_cache=seed.response_cache,
    )


@dataclass(frozen=True)
class IssuedKey:
    tenant: str
    api_key: str
    """Shown once; only its hash is stored."""


class KeyRecord(BaseModel):
    """The stored record of one key hash (unknown fields, from a newer version, are ignored)."""

    model_config = ConfigDict(extra="ignore")

    tenant: str
    hint: str = ""
    created: int = 0


@dataclass(frozen=True)
class InvalidRecord:
    """A record in Redis that does not parse (skipped)."""

    kind: Literal["tenant", "key"]
    name: str
    """Its hash field: the tenant id, or the key hash."""
    fingerprint: str
    """A digest of its raw value: a record fixed, then broken again, is a new one."""
    reason: str

    @property
    def ident(self) -> tuple[str, str, str]:
        return (self.kind, self.name, self.fingerprint)


@dataclass
class DirectorySnapshot:
    """What Redis holds, parsed record by record; tombstoned keys and tenants left out."""

    epoch: str | None
    """The seed marker's value (None: no marker, Redis lost the directory)."""
    tenants: dict[str, Tenant] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    """Tenant id by key hash."""
    hints: dict[str, list[str]] = field(default_factory=dict)
    """Key hints by tenant id."""
    revoked_keys: frozenset[str] = frozenset()
    revoked_tenants: frozenset[str] = frozenset()
    invalid: list[InvalidRecord] = field(default_factory=list)
    key_records: dict[str, KeyRecord] = field(default_factory=dict)
    """Every key record that parses and has no tombstone (its own or its tenant's), by hash."""

    @property
    def seeded(self) -> bool:
        """The seed marker is there: Redis has not lost the directory since it was seeded."""
        return self.epoch is not None

    @property
    def empty(self) -> bool:
        """No record at all: no tenant, key or tombstone, not even one that does not parse."""
        return not (
            self.tenants or self.key_records or self.revoked_keys or self.revoked_tenants or self.invalid
        )

    @property
    def records(self) -> int:
        """Tenants, key records and tombstones."""
        return len(self.tenants) + len(self.key_records) + len(self.revoked_keys) + len(self.revoked_tenants)


@dataclass(frozen=True)
class Written:
    """What one seeding or write-back wrote."""

    tenants: int
    keys: int
    epoch: str
    """The seed marker after it (a new epoch only if there was none)."""


# Seeding and write-back, atomically: write back the tombstones the caller knows, then
# every tenant and key record that has no tombstone, then the seed marker if there is
# none. Seeding at start overwrites the records it writes (the configuration is newer);
# a write-back after a data loss only fills absent fields (HSETNX), so gateways that race
# write the union of what they knew and never undo a change made since.
# KEYS: tenants, keys, revoked keys, revoked tenants, seed marker.
# ARGV: new epoch, mode ('overwrite' or 'absent'), then four counted groups: revoked key
# hashes; revoked tenant ids; (tenant id, tenant JSON) pairs; (key hash, tenant id, key
# JSON) triples. Returns {tenants written, keys written, the marker}.
_SEED = """
local overwrite = ARGV[2] == 'overwrite'
local i = 3
local function count()
  local n = tonumber(ARGV[i])
  i = i + 1
  return n
end
local function put(key, name, value)
  if overwrite then
    redis.call('HSET', key, name, value)
    return 1
  end
  return redis.call('HSETNX', key, name, value)
end
for _ = 1, count() do
  redis.call('SADD', KEYS[3], ARGV[i])
  i = i + 1
end
for _ = 1, count() do
  redis.call('SADD', KEYS[4], ARGV[i])
  i = i + 1
end
local tenants, keys = 0, 0
for _ = 1, count() do
  if redis.call('SISMEMBER', KEYS[4], ARGV[i]) == 0 then
    tenants = tenants + put(KEYS[1], ARGV[i], ARGV[i + 1])
  end
  i = i + 2
end
for _ = 1, count() do
  local revoked = redis.call('SISMEMBER', KEYS[3], ARGV[i]) == 1
  if not revoked and redis.call('SISMEMBER', KEYS[4], ARGV[i + 1]) == 0 then
    keys = keys + put(KEYS[2], ARGV[i], ARGV[i + 2])
  end
  i = i + 3
end
redis.call('SET', KEYS[5], ARGV[1], 'NX')
return {tenants, keys, redis.call('GET', KEYS[5])}
"""


def _new_epoch() -> str:
    return f"{int(time.time())}-{secrets.token_hex(4)}"


class TenantStore:
    """Tenants and hashed keys in Redis (used by the gateway and the admin command)."""

    def __init__(self, redis: Any, key_prefix: str = "oss") -> None:
        self._redis = redis
        self.tenants_key = f"{key_prefix}:tenants"
        self.keys_key = f"{key_prefix}:keys"
        self.revoked_keys_key = f"{key_prefix}:keys:revoked"
        self.revoked_tenants_key = f"{key_prefix}:tenants:revoked"
        self.seed_marker_key = f"{key_prefix}:tenants:seeded"
        self._seed_script = redis.register_script(_SEED)

    async def put_tenant(self, tenant: Tenant) -> None:
        """Create or update a tenant; a revoked tenant is brought back (its old keys stay revoked)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.srem(self.revoked_tenants_key, tenant.id)
            pipe.hset(self.tenants_key, tenant.id, tenant.model_dump_json())
            await pipe.execute()

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        raw = await self._redis.hget(self.tenants_key, tenant_id)
        return Tenant.model_validate_json(raw) if raw else None

    async def add_key(
        self, tenant_id: str, api_key: str | None = None, *, key_hash: str | None = None
    ) -> IssuedKey:
        """Store a key for ``tenant_id`` (a new random one unless given). A revoked key hash
        stays revoked: giving one raises ValueError."""
        key = api_key or (new_api_key() if key_hash is None else "")
        digest = key_hash or hash_key(key)
        if await self._redis.sismember(self.revoked_keys_key, digest):
            raise ValueError("this key was revoked; a revoked key cannot be added again")
        hint = key[:10] + "…" if key else digest[:10]
        record = KeyRecord(tenant=tenant_id, hint=hint, created=int(time.time()))
        await self._redis.hset(self.keys_key, digest, record.model_dump_json())
        return IssuedKey(tenant=tenant_id, api_key=key)

    async def add(self, tenant: Tenant) -> IssuedKey:
        """Create (or update) a tenant and issue it a new key."""
        await self.put_tenant(tenant)
        return await self.add_key(tenant.id)

    async def _key_records(self) -> dict[str, KeyRecord]:
        """Every key record that parses, by key hash."""
        out: dict[str, KeyRecord] = {}
        for digest, raw in (await self._redis.hgetall(self.keys_key)).items():
            try:
                out[_s(digest)] = KeyRecord.model_validate_json(raw)
            except ValueError:
                continue
        return out

    async def _tombstone(self, digests: list[str], tenant_id: str | None = None) -> int:
        """Revoke key hashes (and a tenant): tombstones first, then the records, in one transaction."""
        async with self._redis.pipeline(transaction=True) as pipe:
            if tenant_id is not None:
                pipe.sadd(self.revoked_tenants_key, tenant_id)
            if digests:
                pipe.sadd(self.revoked_keys_key, *digests)
                pipe.hdel(self.keys_key, *digests)
            if tenant_id is not None:
                pipe.hdel(self.tenants_key, tenant_id)
            results = await pipe.execute()
        return int(results[2 if tenant_id is not None else 1]) if digests else 0

    async def revoke_key(self, api_key_or_hint: str) -> int:
        """Revoke a key given in full, or by its hint (the first characters; a seeded key's
        hint is the start of its hash). The key stays revoked even if it is seeded again."""
        digest = hash_key(api_key_or_hint)
        if await self._redis.hexists(self.keys_key, digest):
            return await self._tombstone([digest])
        matches = [
            d
            for d, record in (await self._key_records()).items()
            if (hint := record.hint.rstrip("…")) and api_key_or_hint.startswith(hint)
        ]
        return await self._tombstone(matches)

    async def revoke_tenant(self, tenant_id: str) -> int:
        """Revoke every key of a tenant and remove the tenant; neither is seeded again."""
        digests = [d for d, record in (await self._key_records()).items() if record.tenant == tenant_id]
        return await self._tombstone(digests, tenant_id)

    async def rotate(self, tenant_id: str) -> IssuedKey:
        """Issue a new key and revoke the tenant's old ones (for good, see :meth:`revoke_key`)."""
        if not await self._redis.hexists(self.tenants_key, tenant_id):
            raise KeyError(tenant_id)
        old = [d for d, record in (await self._key_records()).items() if record.tenant == tenant_id]
        issued = await self.add_key(tenant_id)
        await self._tombstone(old)
        return issued

    async def seed(
        self,
        tenants: list[Tenant],
        keys: dict[str, str],
        *,
        revoked_keys: frozenset[str] = frozenset(),
        revoked_tenants: frozenset[str] = frozenset(),
    ) -> Written:
        """Write tenants and key hashes (tenant id by hash) that have no tombstone, after
        writing back ``revoked_keys`` and ``revoked_tenants``; then the seed marker, if
        there is none. Atomic."""
        now = int(time.time())
        records = {d: KeyRecord(tenant=t, hint=d[:10], created=now) for d, t in keys.items()}
        return await self._write(tenants, records, revoked_keys, revoked_tenants, overwrite=True)

    async def restore(
        self, last_good: DirectorySnapshot | None, tenants: list[Tenant], keys: dict[str, str]
    ) -> Written:
        """After a data loss: write back ``last_good`` (every tenant, key record and
        tombstone), then the seeds (``tenants``, ``keys``), where Redis has nothing;
        nothing tombstoned. Atomic and idempotent: replicas may race."""
        now = int(time.time())
        all_tenants = dict(last_good.tenants) if last_good is not None else {}
        for tenant in tenants:
            all_tenants.setdefault(tenant.id, tenant)
        records = dict(last_good.key_records) if last_good is not None else {}
        for digest, tenant_id in keys.items():
            records.setdefault(digest, KeyRecord(tenant=tenant_id, hint=digest[:10], created=now))
        return await self._write(
            list(all_tenants.values()),
            records,
            last_good.revoked_keys if last_good is not None else frozenset(),
            last_good.revoked_tenants if last_good is not None else frozenset(),
            overwrite=False,
        )

    async def _write(
        self,
        tenants: list[Tenant],
        records: dict[str, KeyRecord],
        revoked_keys: frozenset[str],
        revoked_tenants: frozenset[str],
        *,
        overwrite: bool,
    ) -> Written:
        args: list[str | int] = [_new_epoch(), "overwrite" if overwrite else "absent"]
        args += [len(revoked_keys), *sorted(revoked_keys)]
        args += [len(revoked_tenants), *sorted(revoked_tenants), len(tenants)]
        for tenant in tenants:
            args += [tenant.id, tenant.model_dump_json()]
        args.append(len(records))
        for digest, record in records.items():
            args += [digest, record.tenant, record.model_dump_json()]
        written = await self._seed_script(
            keys=[
                self.tenants_key,
                self.keys_key,
                self.revoked_keys_key,
                self.revoked_tenants_key,
                self.seed_marker_key,
            ],
            args=args,
        )
        return Written(int(written[0]), int(written[1]), _s(written[2]))

    async def read(self) -> DirectorySnapshot:
        """The directory as Redis holds it (one transaction), parsed record by record."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(self.seed_marker_key)
            pipe.hgetall(self.tenants_key)
            pipe.hgetall(self.keys_key)
            pipe.smembers(self.revoked_keys_key)
            pipe.smembers(self.revoked_tenants_key)
            marker, raw_tenants, raw_keys, raw_revoked_keys, raw_revoked_tenants = await pipe.execute()
        return parse_directory(marker, raw_tenants, raw_keys, raw_revoked_keys, raw_revoked_tenants)

    async def snapshot(self) -> tuple[dict[str, Tenant], dict[str, str], dict[str, list[str]]]:
        """(tenants by id, tenant id by key hash, key hints by tenant id)."""
        snap = await self.read()
        return snap.tenants, snap.keys, snap.hints


def _s(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _fingerprint(raw: bytes | str) -> str:
    data = raw if isinstance(raw, bytes) else raw.encode(errors="replace")
    return hashlib.sha256(data).hexdigest()[:16]


def _reason(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "record"
            return f"{where}: {first.get('msg', exc)}"
        except Exception:
            pass
    return f"{type(exc).__name__}: {exc}"


def parse_directory(
    marker: bytes | str | None,
    raw_tenants: dict[Any, Any],
    raw_keys: dict[Any, Any],
    raw_revoked_keys: set[Any],
    raw_revoked_tenants: set[Any],
) -> DirectorySnapshot:
    """A snapshot from Redis's raw answers. Never raises on a record: a record that does
    not parse is listed in ``invalid`` and left out."""
    revoked_keys = frozenset(_s(d) for d in raw_revoked_keys)
    revoked_tenants = frozenset(_s(t) for t in raw_revoked_tenants)
    epoch = None if marker is None else _s(marker)
    snap = DirectorySnapshot(epoch=epoch, revoked_keys=revoked_keys, revoked_tenants=revoked_tenants)
    for name, raw in raw_tenants.items():
        tenant_id = _s(name)
        try:
            tenant = Tenant.model_validate_json(raw)
            if tenant.id != tenant_id:
                raise ValueError(f"its id {tenant.id!r} is not its field {tenant_id!r}")
        except Exception as exc:
            snap.invalid.append(InvalidRecord("tenant", tenant_id, _fingerprint(raw), _reason(exc)))
            continue
        if tenant_id not in revoked_tenants:
            snap.tenants[tenant_id] = tenant
    for name, raw in raw_keys.items():
        digest = _s(name)
        try:
            record = KeyRecord.model_validate_json(raw)
        except Exception as exc:
            snap.invalid.append(InvalidRecord("key", digest, _fingerprint(raw), _reason(exc)))
            continue
        if digest in revoked_keys or record.tenant in revoked_tenants:
            continue
        snap.key_records[digest] = record
        snap.keys[digest] = record.tenant
        snap.hints.setdefault(record.tenant, []).append(record.hint)
    return snap


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
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._store = store
        self._config = config
        self._metrics = metrics
        self._tenants_file = tenants_file or config.tenants_file
        # What the configuration and the tenants file seed (kept for re-seeding).
        self._seed_tenants: dict[str, Tenant] = {}
        self._seed_keys: dict[str, str] = {}
        self._load_seeds(list(seeds))
        # The directory in use: the seeds until Redis answers, then Redis's last good copy.
        self._tenants: dict[str, Tenant] = dict(self._seed_tenants)
        self._keys: dict[str, str] = dict(self._seed_keys)
        self._revoked_keys: frozenset[str] = frozenset()
        self._revoked_tenants: frozenset[str] = frozenset()
        self._invalid: dict[tuple[str, str, str], InvalidRecord] = {}
        self._source: Source = "configuration"
        self._last_ok: float | None = None
        self._last_error: str | None = None
        self._failing = False
        self._reseeds = 0
        self._last_reseed: float | None = None
        self._last_good: DirectorySnapshot | None = None
        """The last directory read from Redis (what a write-back after a data loss restores)."""
        self._restored_records = 0
        self._restore_pending = False
        self._task: asyncio.Task[None] | None = None
        self._seeded = False

    def _load_seeds(self, seeds: list[TenantSeed]) -> None:
        for seed in seeds:
            self._seed_tenants[seed.id] = tenant_from_seed(seed)
            for digest in seed.api_key_sha256:
                self._seed_keys[digest] = seed.id
        if self._tenants_file is not None:
            for seed, keys in _load_tenants_file(Path(self._tenants_file)):
                self._seed_tenants[seed.id] = tenant_from_seed(seed)
                for key in keys:
                    self._seed_keys[hash_key(key)] = seed.id

    @property
    def required(self) -> bool:
        return self._config.required

    def tenant_ids(self) -> list[str]:
        return sorted(self._tenants)

    def health(self) -> dict[str, Any]:
        """Where the directory comes from and how fresh it is (for ``/health``).

        ``source``: ``redis`` (the last refresh read it), ``last good copy`` (the last
        refresh failed, or Redis lost the directory and the write-back has not succeeded
        yet: this gateway authenticates from its last copy) or ``configuration`` (Redis not
        read yet, or none). ``reseeds``: how often this gateway found that Redis had lost
        the directory and wrote it back. ``directory``: ``epoch`` (the seed marker read
        last), ``records`` (tenants, keys and tombstones of the last good copy),
        ``restores`` and ``restored_at_unix`` (the last write-back), ``restored_records``
        (records it wrote: those Redis lacked), ``restore_pending`` (a loss seen, its
        write-back not done yet).
        """
        last = self._last_good
        return {
            "tenants": len(self._tenants),
            "keys": len(self._keys),
            "source": self._source,
            "last_refresh_ok_unix": self._last_ok,
            "invalid_records": len(self._invalid),
            "revoked_keys": len(self._revoked_keys),
            "reseeds": self._reseeds,
            "last_reseed_unix": self._last_reseed,
            "last_error": self._last_error,
            "directory": {
                "epoch": last.epoch if last is not None else None,
                "records": last.records if last is not None else 0,
                "restores": self._reseeds,
                "restored_at_unix": self._last_reseed,
                "restored_records": self._restored_records,
                "restore_pending": self._restore_pending,
            },
        }

    async def _seed(self, store: TenantStore) -> Written:
        return await store.seed(
            list(self._seed_tenants.values()),
            self._seed_keys,
            revoked_keys=self._revoked_keys,
            revoked_tenants=self._revoked_tenants,
        )

    async def seed(self) -> None:
        """Write configured tenants and keys to Redis (hashed, tombstones respected), once."""
        if self._store is None or self._seeded:
            return
        await self._seed(self._store)
        self._seeded = True

    async def refresh(self) -> None:
        """Read the directory from Redis; on any Redis error keep the last good copy. When
        Redis lost the directory, write the last good copy back first (see the module)."""
        store = self._store
        if store is None:
            return
        try:
            await self.seed()
            snap = await store.read()
            if self._lost(snap):
                snap = await self._restore(store, snap)
        except (RedisError, OSError) as exc:
            self._refresh_failed(exc)
            return
        self._apply(snap)

    def _lost(self, snap: DirectorySnapshot) -> bool:
        """Redis lost the directory since this gateway last read it."""
        if not snap.seeded:
            return True
        last = self._last_good
        if last is None:
            return False  # nothing to compare with: what Redis holds is the directory
        return snap.epoch != last.epoch or (snap.empty and not last.empty)

    async def _restore(self, store: TenantStore, snap: DirectorySnapshot) -> DirectorySnapshot:
        """Write back the last good copy and the seeds where Redis has nothing; read again."""
        last = self._last_good
        self._restore_pending = True
        log.warning(
            "Redis has lost the tenant directory (seed marker %s, this gateway last read %s): writing "
            "back the last good copy (%d records) and the configuration's seeds; authenticating from "
            "the last good copy (%d tenants, %d keys) meanwhile",
            "gone" if snap.epoch is None else f"{snap.epoch!r}",
            repr(last.epoch) if last is not None else "none",
            last.records if last is not None else 0,
            len(self._tenants),
            len(self._keys),
        )
        written = await store.restore(last, list(self._seed_tenants.values()), self._seed_keys)
        again = await store.read()
        if not again.seeded:
            raise RedisError("the seed marker is missing right after the write-back")
        self._reseeds += 1
        self._last_reseed = time.time()
        self._restored_records = written.tenants + written.keys
        self._restore_pending = False
        log.warning(
            "tenant directory written back: %d tenants and %d keys Redis lacked (epoch %s)",
            written.tenants,
            written.keys,
            written.epoch,
        )
        return again

    def _apply(self, snap: DirectorySnapshot) -> None:
        self._note_invalid(snap.invalid)
        self._last_good = snap
        self._tenants = snap.tenants
        self._keys = {digest: tid for digest, tid in snap.keys.items() if tid in snap.tenants}
        self._revoked_keys = snap.revoked_keys
        self._revoked_tenants = snap.revoked_tenants
        self._source = "redis"
        self._last_ok = time.time()
        self._last_error = None
        if self._failing:
            log.info("tenant refresh works again: %d tenants, %d keys", len(self._tenants), len(self._keys))
        self._failing = False

    def _note_invalid(self, records: list[InvalidRecord]) -> None:
        """Count and log each invalid record once (until it changes or goes away)."""
        current: dict[tuple[str, str, str], InvalidRecord] = {r.ident: r for r in records}
        for ident, record in current.items():
            if ident in self._invalid:
                continue
            log.warning(
                "skipping a %s record in Redis that does not parse (%s %r): %s",
                record.kind,
                "tenant" if record.kind == "tenant" else "key hash",
                record.name[:64] if record.kind == "tenant" else record.name[:12] + "…",
                record.reason,
            )
            if self._metrics is not None:
                self._metrics.tenant_records_invalid.labels(kind=record.kind).inc()
        self._invalid = current

    def _refresh_failed(self, exc: BaseException, *, unexpected: bool = False) -> None:
        if self._source == "redis":
            self._source = "last good copy"
        self._last_error = f"{type(exc).__name__}: {exc}"
        if self._failing:
            log.debug("tenant refresh still fails (keeping the last copy): %s", exc)
        else:
            log.warning(
                "tenant refresh failed; authenticating from the %s (%d tenants, %d keys): %s",
                self._source,
                len(self._tenants),
                len(self._keys),
                exc,
                exc_info=unexpected,
            )
        self._failing = True

    async def _refresh_guarded(self) -> None:
        """:meth:`refresh`, and any error it did not expect logged (never raised)."""
        try:
            await self.refresh()
        except Exception as exc:
            self._refresh_failed(exc, unexpected=True)

    async def start(self) -> None:
        await self._refresh_guarded()
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="oss-serving-tenants")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.refresh_s)
            await self._refresh_guarded()  # survives anything but cancellation
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
        digest = hash_key(key.strip())
        tenant_id = None if digest in self._revoked_keys else self._keys.get(digest)
        tenant = (
            self._tenants.get(tenant_id) if tenant_id and tenant_id not in self._revoked_tenants else None
        )
        if tenant is None:
            shown = key.strip()[:6] + "…" if len(key.strip()) > 6 else "…"
            raise UnauthorizedError(f"Incorrect API key provided: {shown}. It is unknown or was revoked.")
        return tenant

    def tenant(self, tenant_id: str) -> Tenant | None:
        """The tenant ``tenant_id`` as the directory knows it now (None: unknown or revoked);
        for work the gateway does on a tenant's behalf later (batch lines)."""
        if not self._config.required:
            return local_tenant() if tenant_id == local_tenant().id else None
        if tenant_id in self._revoked_tenants:
            return None
        return self._tenants.get(tenant_id)

    @staticmethod
    def authorize(tenant: Tenant, model: str) -> None:
        if not tenant.may_use(model):
            raise ForbiddenError(
                f"Tenant '{tenant.id}' may not use the model '{model}'.",
                param="model",
                code="model_not_allowed",
            )
