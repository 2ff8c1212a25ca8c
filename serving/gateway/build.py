"""The composition root: one function builds a gateway replica from the configuration.

The Ray Serve deployment (``serving.serve_app``), the local mode and every test call
:func:`build_gateway`; nothing else wires the gateway's parts together. Optional features
that are off become do-nothing objects (:class:`~serving.gateway.service.Unlimited`
admission, :class:`~serving.gateway.handoff.NoHandoff`), so the pipeline has no ``None``
checks. The environment is read here, at build time, from the mapping passed in (never
at import): the tenants file, the upstreams' API keys, the S3 blob store's keys; the
Redis client (and its password) comes from :mod:`serving.redis_conn`, re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from serving.config import ServingConfig
from serving.engine.protocol import EngineClient
from serving.engine.upstream import UpstreamClient
from serving.gateway.admission import Admission
from serving.gateway.auth import TenantDirectory, TenantStore
from serving.gateway.background import Background
from serving.gateway.batches import Batches, BatchesPort, BatchWorker
from serving.gateway.blobs import BlobStore, LocalBlobStore
from serving.gateway.failover import Failover
from serving.gateway.files import Files, FilesOff, FilesPort
from serving.gateway.flight import Flights
from serving.gateway.handoff import (
    Counters,
    HandoffPolicy,
    MemoryCounters,
    NoHandoff,
    RedisCounters,
    Upstream,
    UpstreamBudget,
)
from serving.gateway.health import EngineHealth
from serving.gateway.isolation import CacheIsolation
from serving.gateway.limits import RequestLimits
from serving.gateway.prefix_caching import PromptCaching
from serving.gateway.ratelimit import RateLimiter
from serving.gateway.redis_guard import RedisGuard
from serving.gateway.responses import Conversations, NoStore, RedisResponseStore, ResponseStore
from serving.gateway.s3_blobs import S3BlobStore
from serving.gateway.service import AdmissionPort, GatewayService, HandoffPort, Unlimited
from serving.gateway.tenants import hash_key
from serving.metrics import GatewayMetrics, export_through_ray
from serving.redis_conn import REDIS_PASSWORD_ENV, redis_client

__all__ = [
    "LEAK_MARGIN_S",
    "OPERATOR_KEY_ENV",
    "REDIS_PASSWORD_ENV",
    "TENANTS_FILE_ENV",
    "build_gateway",
    "operator_keys",
    "redis_client",
]

OPERATOR_KEY_ENV = "OSS_SERVING_OPERATOR_KEY"
"""An operator key (from a Secret) that may read ``/metrics`` and the detailed ``/health``,
besides the hashes in ``auth.admin_key_sha256``: the chart sets it to its admin key."""
TENANTS_FILE_ENV = "OSS_SERVING_TENANTS_FILE"
LEAK_MARGIN_S = 60.0
"""How long past every time limit a request (or lease) may stay open before the safety
net calls it leaked and releases it."""


def operator_keys(cfg: ServingConfig, environ: Mapping[str, str]) -> frozenset[str]:
    """The hashes of the operator keys: the configuration's and ``OSS_SERVING_OPERATOR_KEY``'s."""
    keys = set(cfg.auth.admin_key_sha256)
    if key := environ.get(OPERATOR_KEY_ENV, "").strip():
        keys.add(hash_key(key))
    return frozenset(keys)


def build_gateway(
    cfg: ServingConfig,
    engines: Mapping[str, EngineClient],
    redis: Any | None,
    environ: Mapping[str, str] | None = None,
    *,
    metrics: GatewayMetrics | None = None,
    upstream_clients: Mapping[str, EngineClient] | None = None,
    created_unix: int | None = None,
) -> GatewayService:
    """One gateway replica's :class:`GatewayService`, every part wired.

    ``engines``: an :class:`EngineClient` per configured model (Ray handles in Serve,
    fakes in tests). ``redis``: the shared Redis client, or None (then admission, limits
    and budgets are local to this replica). ``upstream_clients`` replaces the HTTP client
    of named upstreams (tests); the others are built from the configuration and
    ``environ``.
    """
    env = os.environ if environ is None else environ
    models = [m.name for m in cfg.models]
    if metrics is None:
        metrics = GatewayMetrics(models, cfg.metrics.ttft_buckets_s)
        if cfg.metrics.ray_export:  # in the cluster: each replica its own series (see metrics.py)
            export_through_ray(metrics)
    prefix = cfg.queue.key_prefix
    # One Redis health policy per replica: every Redis user gets the guarded client.
    guard = RedisGuard(redis, cfg.redis, metrics) if redis is not None else None
    shared = guard.client if guard is not None else None

    env_file = env.get(TENANTS_FILE_ENV)
    tenants_file = cfg.auth.tenants_file or (Path(env_file) if env_file else None)
    store = TenantStore(shared, prefix) if shared is not None else None
    auth = TenantDirectory(store, cfg.auth, cfg.tenants, tenants_file=tenants_file, metrics=metrics)
    limiter = RateLimiter(shared, prefix, local_share=cfg.gateway.num_replicas)

    request_limit_s = cfg.gateway.request_timeout_s
    queue: Admission | None = (
        Admission(
            shared,
            cfg.queue,
            models,
            local_share=cfg.gateway.num_replicas,
            max_lease_age_s=request_limit_s + LEAK_MARGIN_S,
        )
        if cfg.queue.enabled
        else None
    )
    admission: AdmissionPort = queue if queue is not None else Unlimited()

    def tenant_label(tenant_id: str) -> str:
        if not auth.required:
            return tenant_id
        return tenant_id if tenant_id in auth.tenant_ids()[:MAX_TENANT_LABELS] else "other"

    flights = Flights(
        metrics,
        admission=admission,
        limiter=limiter,
        tenant_label=tenant_label,
        max_age_s=cfg.queue.max_wait_s + request_limit_s + LEAK_MARGIN_S,
    )

    failover = Failover(cfg.models, metrics)

    async def maintain() -> None:
        await flights.reap()
        await failover.probe(engines, cfg.gateway.health_check_timeout_s)

    async def ping() -> bool:
        assert redis is not None
        return bool(await redis.ping())

    health = EngineHealth(
        cfg.gateway,
        cfg.queue,
        engines,
        metrics,
        queue,
        redis_ping=ping if redis is not None else None,
        scale_from_zero=frozenset(m.name for m in cfg.models if m.topology.min_replicas == 0),
        on_tick=maintain,
        breaker=guard,
        avoided=failover.quarantine.avoided,
    )
    handoff = _handoff(cfg, shared, metrics, health, admission, tenant_label, env, upstream_clients or {})
    caching = PromptCaching(cfg.routing, cfg.response_cache, metrics, shared)

    files, batches = _batch_api(cfg, shared, metrics, env)
    conversations = _conversations(cfg, shared)
    service = GatewayService(
        cfg.gateway,
        cfg.queue,
        engines,
        metrics,
        auth=auth,
        limiter=limiter,
        admission=admission,
        prompt_caching=caching,
        handoff=handoff,
        health=health,
        flights=flights,
        isolation=CacheIsolation(cfg.auth.cache_groups, env.get(cfg.auth.cache_salt_secret_env)),
        admin_keys=operator_keys(cfg, env),
        limits=RequestLimits(cfg.models, chars_per_token=cfg.handoff.chars_per_token),
        failover=failover,
        conversations=conversations,
        files=files,
        batches=batches,
        created_unix=created_unix,
    )
    if isinstance(files, Files):
        service.attach(files)  # closes the blob store at shutdown
    if isinstance(batches, Batches):  # every replica runs lines of every batch
        service.attach(BatchWorker(batches, service.submit, auth.tenant))
    if shared is not None and conversations.enabled and cfg.responses.background:
        background = Background(
            shared,
            RedisResponseStore(shared, cfg.responses),
            conversations,
            cfg.responses,
            metrics,
            service.submit,
            auth.tenant,
            owner=service.gateway_id,
        )
        service.background = background
        service.attach(background)  # watches cancels, heartbeats, sweeps orphans
    return service


def _batch_api(
    cfg: ServingConfig, redis: Any | None, metrics: GatewayMetrics, environ: Mapping[str, str]
) -> tuple[FilesPort, BatchesPort | None]:
    """The Files and Batch APIs, over the shared Redis and blob store (off without Redis:
    nothing else every replica sees). The ``s3`` backend's keys are read from ``environ``."""
    if redis is None or not cfg.batch.enabled:
        return FilesOff(cfg.files), None
    blobs: BlobStore
    if cfg.files.backend == "s3":
        blobs = S3BlobStore.from_config(cfg.files.s3, environ)
    else:
        blobs = LocalBlobStore(cfg.files.dir or cfg.local.state_dir / "files")
    files = Files(redis, blobs, cfg.files)
    return files, Batches(redis, files, cfg.batch, cfg.gateway, metrics)


def _conversations(cfg: ServingConfig, redis: Any | None) -> Conversations:
    """Stored responses, in the shared Redis (off without one: nothing else every replica sees)."""
    enabled = cfg.responses.store and redis is not None
    store: ResponseStore = RedisResponseStore(redis, cfg.responses) if enabled else NoStore()
    return Conversations(store, cfg.responses, enabled=enabled)


MAX_TENANT_LABELS = 200


def _handoff(
    cfg: ServingConfig,
    redis: Any | None,
    metrics: GatewayMetrics,
    health: EngineHealth,
    admission: AdmissionPort,
    tenant_label: Any,
    environ: Mapping[str, str],
    clients: Mapping[str, EngineClient],
) -> HandoffPort:
    """The handoff policy; :class:`NoHandoff` when no upstream and no virtual model is set.

    Budgets are counted in ``redis`` (shared by every replica), or in this process when
    there is none. Upstream keys are read from ``environ`` here, at gateway start."""
    h = cfg.handoff
    if h.upstream is None and not h.virtual_models:
        return NoHandoff()
    counters: Counters = RedisCounters(redis) if redis is not None else MemoryCounters()
    upstreams = [
        Upstream(
            u,
            clients.get(u.name) or UpstreamClient.from_config(u, environ),
            UpstreamBudget(u, counters, key_prefix=cfg.queue.key_prefix),
        )
        for u in cfg.upstreams
    ]
    return HandoffPolicy(
        h,
        upstreams,
        {m.name: m for m in cfg.models},
        metrics.handoff,
        is_ready=health.is_ready,
        predicted_wait=admission.predicted_wait_s,
        request_timeout_s=cfg.gateway.request_timeout_s,
        tenant_label=tenant_label,
    )
