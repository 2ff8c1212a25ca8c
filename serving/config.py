"""The one configuration object of oss-serving.

Every part of the stack takes its slice of :class:`ServingConfig`: the gateway reads
``gateway``, the engine builder reads ``models``, the local mode reads ``local`` and
``ray``. The configuration is loaded from one YAML file (``load_config``); the Helm
chart renders the same YAML into a ConfigMap and ``oss-serve up`` writes it from its
defaults. Unknown keys are rejected everywhere so that a typo fails loudly instead of
being ignored.

Nothing in this module reads the environment at import time.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "BUILTIN_SOURCES",
    "UPSTREAM_API_KEY_ENV",
    "AuthConfig",
    "BatchConfig",
    "ConfigError",
    "FilesConfig",
    "GatewayConfig",
    "HandoffConfig",
    "LocalConfig",
    "MetricsConfig",
    "ModelConfig",
    "ModelFamily",
    "OverflowConfig",
    "QueueConfig",
    "RayConfig",
    "RedisConfig",
    "RedisTLSConfig",
    "ResponseCacheConfig",
    "ResponsesConfig",
    "RoutingConfig",
    "S3Config",
    "ServingConfig",
    "TenantSeed",
    "TopologyConfig",
    "UpstreamConfig",
    "VirtualModelConfig",
    "default_config",
    "load_config",
]

#: Built-in model sources that need no network: ``builtin:<name>``.
BUILTIN_SOURCES = ("smollm2-135m-instruct", "gpt-oss-tiny")


class ConfigError(ValueError):
    """A configuration file is missing, is not YAML, or does not validate.

    ``key`` is the dotted path of the offending key when one can be named.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


class ModelFamily(StrEnum):
    """Which chat format and parsers a model needs."""

    auto = "auto"
    gpt_oss = "gpt-oss"
    generic = "generic"


class TopologyConfig(_Strict):
    """How one model's engines are laid out over accelerators."""

    kind: Literal["replicas", "expert_parallel"] = "replicas"
    """``replicas``: independent engines, each over ``tensor_parallel_size`` devices of one
    node, scaled by Ray Serve. ``expert_parallel``: one data-parallel group of
    ``data_parallel_size`` ranks with expert parallelism (gpt-oss MoE layers)."""

    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    """Devices per engine (vLLM ``tensor_parallel_size``)."""

    data_parallel_size: int = Field(default=1, ge=1, le=1024)
    """Ranks of the data-parallel group; only for ``expert_parallel``."""

    all2all_backend: str | None = None
    """vLLM all-to-all backend for expert parallelism (e.g. ``deepep_low_latency``)."""

    min_replicas: int = Field(default=1, ge=0)
    """Fewest engine replicas (or data-parallel groups) Ray Serve keeps."""

    max_replicas: int = Field(default=1, ge=1)
    """Most engine replicas Ray Serve scales to."""

    target_ongoing_requests: int = Field(default=32, ge=1)
    """Ray Serve autoscaling target of ongoing requests per replica."""

    max_ongoing_requests: int = Field(default=256, ge=1)
    """Requests one engine replica accepts at once; more wait in the gateway."""

    accelerator: Literal["cpu", "gpu"] = "cpu"
    """What one engine worker is placed on."""

    cpus_per_worker: float = Field(default=1.0, gt=0)
    """Logical CPUs reserved per engine worker in its placement group."""

    upscale_delay_s: float = Field(default=30.0, ge=0)
    """Ray Serve autoscaling: how long demand must stay above target before adding replicas."""

    downscale_delay_s: float = Field(default=600.0, ge=0)
    """Ray Serve autoscaling: how long demand must stay below target before removing replicas
    (long: a gpt-oss replica takes minutes to start again)."""

    gpu_type: str | None = None
    """GPU model the engines run on, for the memory budget check (``serving.engine.budget``;
    e.g. ``H100-80GB``, ``H200-141GB``). ``None`` skips the check."""

    @model_validator(mode="after")
    def _check(self) -> TopologyConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.kind == "replicas" and self.data_parallel_size != 1:
            raise ValueError("data_parallel_size > 1 needs kind: expert_parallel")
        return self


class StreamingConfig(_Strict):
    """How an engine replica batches the chunks of streamed answers
    (``serving.engine.server.StreamPacer``): every chunk costs CPU on two Ray hops, so the
    replica spends a budget of chunks per second over all its streams. The first token and
    anything after a pause always go out at once."""

    min_interval_ms: float = Field(default=20.0, ge=0)
    """Shortest time between two sends of one stream (one stream alone: about per token)."""

    max_interval_ms: float = Field(default=200.0, ge=0)
    """Longest a ready chunk waits, however many streams run."""

    items_per_s: float = Field(default=100.0, gt=0)
    """Sends per second one replica aims at over all its streams: with ``n`` streams each
    sends every ``n / items_per_s`` seconds (within the two bounds above)."""


class FailoverConfig(_Strict):
    """What the gateway does when one of the model's engine replicas fails or stalls
    (``serving.gateway.failover``)."""

    retry_attempts: int = Field(default=2, ge=0, le=8)
    """Other local replicas tried when a request fails before its first byte (the engine
    produced nothing, so a retry is safe). Then cloud failover (``handoff.failover``), then
    an error."""

    retry_budget_s: float = Field(default=30.0, gt=0)
    """Longest all the retries of one request before its first byte may take together."""

    migrate_streams: bool = True
    """Continue a chat or completions stream on another replica when its replica dies or
    stalls mid-stream: the rendered prompt and the tokens already streamed are sent as a raw
    continuation and the new tokens are spliced into the same response."""

    max_migrations: int = Field(default=2, ge=0, le=8)
    """Migrations one stream may make."""

    idle_timeout_s: float = Field(default=60.0, gt=0)
    """Longest an engine may go without sending anything in a stream, before its first item
    or between two: then it is taken for stalled, like a dead one (retry or migration), and
    its replica is kept out of routing until it answers a probe again. (A non-streamed
    answer comes whole after its generation: it is bounded by
    ``gateway.request_timeout_s`` only.)"""

    quarantine_s: float = Field(default=60.0, gt=0)
    """Longest a failed or stalled replica is kept out of routing when it answers no probe
    (Ray Serve replaces a dead replica meanwhile)."""

    announce_migration: bool = False
    """Add ``"oss_serving": {"migrations": n}`` to the last chunk of a migrated stream (off by
    default: strict clients may reject an unknown field)."""


class ModelConfig(_Strict):
    """One served model."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
    """The model id clients send in ``model``."""

    source: str
    """Where the weights come from: ``builtin:smollm2-135m-instruct``,
    ``builtin:gpt-oss-tiny``, a local Hugging Face folder, or a hub id (cluster only)."""

    family: ModelFamily = ModelFamily.auto
    """Chat format; ``auto`` detects gpt-oss from the name or source."""

    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """vLLM engine arguments passed through as given (e.g. ``max_model_len``)."""

    engine_env: dict[str, str] = Field(default_factory=dict)
    """Environment variables of the engine workers (e.g. ``VLLM_CPU_KVCACHE_SPACE``)."""

    topology: TopologyConfig = Field(default_factory=TopologyConfig)
    """Engine layout and scaling."""

    streaming: StreamingConfig = Field(default_factory=StreamingConfig)
    """How streamed chunks are batched on their way out of the engine replica."""

    failover: FailoverConfig = Field(default_factory=FailoverConfig)
    """Retries, stream migration and stall detection when an engine replica fails."""

    default_max_tokens: int = Field(default=4096, ge=1)
    """Output tokens a request gets when it names no limit (``max_tokens``,
    ``max_completion_tokens``, ``max_output_tokens``) and its tenant has no
    ``max_output_tokens``: the gateway fills it in, so every request's output, token charge
    and upstream budget are bounded. Bounded in turn by what the context
    (``engine_kwargs.max_model_len``) leaves after the prompt."""

    @property
    def context_tokens(self) -> int | None:
        """The engine's context length (``engine_kwargs.max_model_len``), when configured."""
        value = self.engine_kwargs.get("max_model_len")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        return int(value) if isinstance(value, str) and value.isdigit() else None

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        if value.startswith("builtin:") and value.removeprefix("builtin:") not in BUILTIN_SOURCES:
            raise ValueError(f"unknown built-in model {value!r}; built-ins: {', '.join(BUILTIN_SOURCES)}")
        return value

    @property
    def resolved_family(self) -> ModelFamily:
        """The family after ``auto`` detection."""
        if self.family is not ModelFamily.auto:
            return self.family
        text = f"{self.name} {self.source}".lower()
        return ModelFamily.gpt_oss if "gpt-oss" in text or "gpt_oss" in text else ModelFamily.generic

    def effective_engine_kwargs(self) -> dict[str, Any]:
        """Engine arguments with the family's defaults filled in (explicit keys win)."""
        defaults: dict[str, Any] = {}
        if self.resolved_family is ModelFamily.gpt_oss:
            defaults = {
                "tool_call_parser": "openai",
                "enable_auto_tool_choice": True,
                "reasoning_parser": "openai_gptoss",
            }
        topo = self.topology
        defaults["tensor_parallel_size"] = topo.tensor_parallel_size
        # Prompt caching: reuse KV of shared prefixes, and report it in
        # usage.prompt_tokens_details.cached_tokens (OpenAI's semantics).
        defaults["enable_prefix_caching"] = True
        defaults["enable_prompt_tokens_details"] = True
        if topo.kind == "expert_parallel":
            defaults["data_parallel_size"] = topo.data_parallel_size
            defaults["enable_expert_parallel"] = True
            if topo.all2all_backend:
                defaults["all2all_backend"] = topo.all2all_backend
        return {**defaults, **self.engine_kwargs}


class GatewayConfig(_Strict):
    """The OpenAI-compatible HTTP front."""

    host: str = "127.0.0.1"
    """Address the HTTP proxy binds."""

    port: int = Field(default=8000, ge=1, le=65535)
    """Port of the OpenAI API."""

    num_replicas: int = Field(default=1, ge=1)
    """Gateway (ingress) replicas."""

    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest accepted request body; larger ones get 413."""

    request_timeout_s: float = Field(default=600.0, gt=0)
    """Longest a request may run end to end before the gateway aborts it."""

    engine_ready_retry_after_s: int = Field(default=10, ge=1)
    """Retry-After sent with 503 while a model's engines are not ready."""

    health_check_interval_s: float = Field(default=2.0, gt=0)
    """How often the gateway probes each engine deployment's health."""

    health_check_timeout_s: float = Field(default=10.0, gt=0)
    """How long one engine health probe may take before it counts as failed."""

    unready_after_failures: int = Field(default=3, ge=1)
    """Consecutive failed probes before a ready model is taken for unready (one slow probe
    under load, or one stalled replica, does not turn traffic away)."""

    max_error_message_chars: int = Field(default=2000, ge=100)
    """Error messages returned to clients are cut to this length."""

    max_json_depth: int = Field(default=64, ge=2, le=512)
    """Deepest nesting of arrays and objects a request body may have (the body itself is
    level 1; a chat message's content part is level 4, a tool's JSON schema adds two levels
    per nested property). Deeper bodies get 400 ``nesting_too_deep`` before they are parsed."""

    max_array_items: int = Field(default=262_144, ge=1024)
    """Most items one JSON array of a request body may have: room for token-id prompts of
    256k tokens (longer than gpt-oss's 131,072-token context), long chat histories and
    vLLM's 1,024-prompt completion lists. Longer arrays get 400 ``array_too_long``."""


class RedisTLSConfig(_Strict):
    """TLS to Redis, for a ``rediss://`` URL (every client: gateways, the CLI, ``oss-serve up``)."""

    ca_file: Path | None = None
    """CA bundle (PEM) that signed the server's certificate (default: the system's)."""

    cert_file: Path | None = None
    """Client certificate (PEM), for a Redis that requires one (``tls-auth-clients yes``)."""

    key_file: Path | None = None
    """The client certificate's private key (PEM), unless ``cert_file`` holds it."""

    verify: bool = True
    """Verify the server's certificate and host name. Off only for a test Redis."""

    @model_validator(mode="after")
    def _key_needs_cert(self) -> RedisTLSConfig:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("redis.tls.key_file needs redis.tls.cert_file")
        return self


class RedisConfig(_Strict):
    """The Redis server shared by every gateway replica."""

    url: str = "redis://127.0.0.1:6379/0"
    """Redis URL (``redis://``, or ``rediss://`` for TLS, see ``tls``); the password comes
    from ``OSS_SERVING_REDIS_PASSWORD`` (a Secret the chart mounts), not the URL."""

    tls: RedisTLSConfig = Field(default_factory=RedisTLSConfig)
    """TLS settings, used when ``url`` is ``rediss://``."""

    connect_timeout_s: float = Field(default=1.0, gt=0)
    """Connection and command timeout."""

    call_timeout_s: float = Field(default=0.25, gt=0)
    """Budget of one Redis call of a gateway (limits, caches, prefix index, upstream budget,
    admission): a call that takes longer is cancelled and counts as a failure of the
    gateway's Redis circuit breaker (``serving/gateway/redis_guard.py``)."""

    breaker_failures: int = Field(default=3, ge=1)
    """Consecutive failed or slow Redis calls that open a gateway's circuit breaker: while it
    is open no feature waits for Redis (each takes its documented fallback), and a ``PING``
    every 0.5 s closes it again once Redis answers."""

    @property
    def uses_tls(self) -> bool:
        return self.url.lower().startswith("rediss://")

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> RedisConfig:
        if not self.uses_tls and self.tls != RedisTLSConfig():
            raise ValueError("redis.tls is set but redis.url is not a rediss:// URL")
        return self


class AuthConfig(_Strict):
    """API keys and tenants."""

    required: bool = True
    """Require an API key on every request. ``oss-serve up``'s built-in configuration turns it
    off (local mode: every request is the tenant ``local``) and says so at start."""

    tenants_file: Path | None = None
    """YAML file of tenants with plaintext API keys (``tenants: [{id, api_keys: [...], ...}]``),
    typically a mounted Secret; seeded into Redis (keys hashed) at start."""

    refresh_s: float = Field(default=2.0, gt=0)
    """How often each gateway re-reads keys and tenants from Redis: a revoked key stops
    working within this time."""

    cache_groups: dict[str, list[str]] = Field(default_factory=dict)
    """Tenants that share prompt caches: group name -> tenant ids. By default every tenant
    has caches of its own: the engines' prefix cache (a per-tenant ``cache_salt``), the
    prefix index and affinity keys, and the response cache are never shared between
    tenants, so one tenant cannot learn what another sent. Tenants in one group (one
    team with several tenant ids) share the engines' prefix cache and the routing index."""

    cache_salt_secret_env: str = Field(default="OSS_SERVING_CACHE_SALT_SECRET", pattern=r"^[A-Z_][A-Z0-9_]*$")
    """Environment variable holding the secret the per-tenant cache salts are derived from
    (HMAC-SHA256 of the tenant's cache group). Unset: a fixed value; the salts stay
    per tenant (clients can never send their own), only guessable by a reader of Redis."""

    admin_key_sha256: list[str] = Field(default_factory=list)
    """SHA-256 (hex) of operator keys that may read ``/metrics`` and the detailed
    ``/health`` on the public port while ``required`` is on (``Authorization: Bearer``);
    hashed like a tenant's ``api_key_sha256``. Probes use ``/health/live`` and
    ``/health/ready``, which say only live / ready."""


class TenantSeed(_Strict):
    """A tenant from the configuration (seeded into Redis at gateway start)."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    """Tenant id."""

    weight: float = Field(default=1.0, gt=0, le=1000)
    """Fair-share weight."""

    priority: Literal["interactive", "standard", "batch"] = "standard"
    """Admission lane."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    """Rate limit on requests."""

    tokens_per_minute: int | None = Field(default=None, ge=1)
    """Rate limit on tokens."""

    max_concurrent_requests: int | None = Field(default=None, ge=1)
    """Requests queued or running at once."""

    max_output_tokens: int | None = Field(default=None, ge=1)
    """Cap on a request's output tokens."""

    max_n: int | None = Field(default=8, ge=1)
    """Most sequences one prompt may ask for (``n``, ``best_of``); ``None``: no cap."""

    max_prompts: int | None = Field(default=64, ge=1)
    """Most prompts in one ``/v1/completions`` request (a list of prompts); ``None``: no cap."""

    allow_min_tokens: bool = True
    """Whether requests may set ``min_tokens`` (at most their output cap in any case)."""

    allow_ignore_eos: bool = True
    """Whether requests may set ``ignore_eos`` (generate up to the output cap)."""

    models: list[str] = Field(default_factory=lambda: ["*"])
    """Models the tenant may use (``*``: all)."""

    handoff: Literal["never", "overflow-only", "allowed"] = "never"
    """Whether requests may leave the cluster through a handoff."""

    response_cache: bool = False
    """Whether the tenant's deterministic requests may be answered from the response cache
    (each request still opts in)."""

    api_key_sha256: list[str] = Field(default_factory=list)
    """sha256 hex digests of the tenant's API keys (never the keys themselves)."""


class QueueConfig(_Strict):
    """Admission: the Redis queue shared by every gateway replica."""

    enabled: bool = True
    """Admit through the queue (off: every validated request goes straight to the engines)."""

    capacity_per_replica: int | None = Field(default=None, ge=1)
    """Concurrent sequences one engine replica runs well. ``None``: the engine's own
    ``max_num_seqs`` as it reports it."""

    default_capacity: int = Field(default=8, ge=1)
    """Capacity of a model until its engines have reported their stats."""

    lease_ttl_s: float = Field(default=15.0, gt=0)
    """A granted request's lease lives this long unless its gateway renews it (every third
    of it): a crashed gateway's capacity returns within this time."""

    ticket_heartbeat_s: float = Field(default=5.0, gt=0)
    """A waiting request's ticket lives this long unless its gateway renews it (every third
    of it, for all of its waiting requests in one round trip); the queue drops a ticket
    whose heartbeat expired instead of granting it. The capacity a dead gateway's queued
    requests would take is available again within this timeout plus one check period of
    the requests still waiting (at most 1 s): 6 s by default."""

    default_deadline_s: float | None = Field(default=None, gt=0)
    """Deadline to start a request that sends none (``X-Oss-Deadline-Ms``); ``None``: wait
    up to ``max_wait_s``."""

    max_wait_s: float = Field(default=600.0, gt=0)
    """Longest a request waits in the queue before it is rejected with 503."""

    max_grants_per_release: int = Field(default=32, ge=1)
    """Waiting requests granted together when capacity frees (batched admission)."""

    batch_reserve_share: float = Field(default=0.25, ge=0.0, lt=1.0)
    """Share of each model's capacity that ``batch``-priority requests (batch lines) never
    take, at least one slot when the capacity is 2 or more (0: none kept). A batch then
    fills the rest of the capacity, and an interactive or standard request that arrives
    meanwhile finds a free slot at once instead of waiting for a batch line to end."""

    poll_interval_s: float = Field(default=0.05, gt=0)
    """How often a waiting request re-checks its ticket besides the grant notifications."""

    key_prefix: str = Field(default="oss", pattern=r"^[A-Za-z0-9_:-]{1,32}$")
    """Prefix of every Redis key oss-serving writes."""


class RoutingConfig(_Strict):
    """Prefix-affinity routing: send requests that share a prompt prefix to the engine replica
    that most likely still holds that prefix in vLLM's prefix cache, balanced against load.

    The prefix index lives in Redis, shared by every gateway replica: chained hashes of
    fixed-size text blocks of the rendered prompt -> the replicas that served them, per
    model, with a TTL and a per-replica LRU bound that tracks the engine's own eviction
    roughly. The engine deployment's request router (``serving.engine.router``) makes the
    final choice with Ray Serve's live queue lengths."""

    enabled: bool = True
    """Route by prefix affinity (off: Ray Serve's default power-of-two-choices router)."""

    strategy: Literal["prefix", "power_of_two", "round_robin"] = "prefix"
    """``prefix``: affinity balanced with load. ``power_of_two``: Ray Serve's default.
    ``round_robin``: strict rotation (a baseline for benchmarks)."""

    block_chars: int = Field(default=256, ge=16, le=65536)
    """Characters of rendered prompt per index block (about 64 tokens of English)."""

    max_blocks: int = Field(default=256, ge=1, le=4096)
    """Blocks of one prompt looked up and recorded (longer prompts: their first blocks)."""

    index_ttl_s: float = Field(default=900.0, gt=0)
    """How long an index entry lives without being used again."""

    replica_capacity_blocks: int = Field(default=50_000, ge=1)
    """Blocks remembered per engine replica; beyond it the least recently used are dropped
    (set it near the replica's KV cache size in blocks of ``block_chars``)."""

    imbalance_threshold: int = Field(default=8, ge=0)
    """Load wins over affinity when the affine replica has more than this many requests
    more than the least busy replica."""

    min_match_blocks: int = Field(default=1, ge=1)
    """Fewest matched leading blocks that count as an affinity hit."""

    session_headers: list[str] = Field(default_factory=lambda: ["x-session-id"])
    """Headers used as the affinity key when the request has no ``prompt_cache_key``
    (checked after these, the body's ``user``)."""

    key_prefix: str = Field(default="oss:prefix", min_length=1)
    """Redis key prefix of the index."""

    decision_headers: bool = False
    """Add the routing decision to every answer: ``x-oss-serving-replica`` (the engine replica
    that served it), ``x-oss-serving-route`` (why: ``affinity``, ``load``, ``fallback`` or
    ``round_robin``) and ``x-oss-serving-gateway`` (the gateway replica). For debugging
    placement and for tests; off by default, replica ids being internal."""


class ResponseCacheConfig(_Strict):
    """Exact-match response cache in Redis for deterministic requests (temperature 0 or a
    fixed seed; no tools that act on the world). Used only when it is enabled here, the
    tenant opted in (``Tenant.response_cache``) and the request asks for it with the
    ``X-OSS-Response-Cache: on`` header."""

    enabled: bool = False
    """Serve and store cached answers."""

    ttl_s: float = Field(default=3600.0, gt=0)
    """How long a cached answer lives."""

    max_entry_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Answers larger than this are not stored."""

    max_total_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    """Memory bound of the whole cache; the oldest entries are evicted beyond it."""

    key_prefix: str = Field(default="oss:rc", min_length=1)
    """Redis key prefix of the cache."""


class S3Config(_Strict):
    """An S3-compatible object store for the Files API's contents (``files.backend: s3``):
    AWS S3 or the enterprise's own (MinIO, Ceph RGW, ...). Requests are signed with AWS
    Signature Version 4; the keys come from the environment variables named here (on a
    cluster: a Secret, ``secrets.s3`` in the chart), never from this file."""

    endpoint_url: str = Field(default="", pattern=r"^(https?://[^/?#\s]+(/[^?#\s]*)?)?$")
    """The store's URL, e.g. ``http://minio.storage:9000`` or
    ``https://rgw.example.internal``; empty: AWS S3 of ``region``
    (``https://s3.<region>.amazonaws.com``)."""

    bucket: str = Field(default="", pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,254})?$")
    """The bucket (it must exist; the gateway does not create it). Required with
    ``files.backend: s3``."""

    region: str = Field(default="us-east-1", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """The region requests are signed for (MinIO and Ceph RGW accept ``us-east-1`` unless
    configured otherwise)."""

    prefix: str = Field(default="", pattern=r"^[^\\\x00]*$")
    """Key prefix of every object the gateway writes (e.g. ``oss-serving/files``, to share a
    bucket); empty: none. Leading and trailing ``/`` are dropped."""

    addressing: Literal["path", "virtual"] = "path"
    """``path``: ``<endpoint>/<bucket>/<key>`` (MinIO, Ceph RGW and most stores);
    ``virtual``: ``<bucket>.<endpoint host>/<key>`` (AWS's virtual-hosted style; the
    bucket name must then be a valid host name label)."""

    timeout_s: float = Field(default=30.0, gt=0)
    """Timeout of each phase of one request to the store (connecting, sending a chunk,
    waiting for the next chunk of the answer), not of the whole transfer."""

    ca_file: Path | None = None
    """CA bundle (PEM) to verify the store's TLS certificate with, for a store behind an
    internal CA; ``None``: the default bundle (certifi's)."""

    access_key_env: str = Field(default="AWS_ACCESS_KEY_ID", pattern=_ENV_NAME)
    """Environment variable holding the access key id."""

    secret_key_env: str = Field(default="AWS_SECRET_ACCESS_KEY", pattern=_ENV_NAME)
    """Environment variable holding the secret access key."""

    session_token_env: str = Field(default="AWS_SESSION_TOKEN", pattern=_ENV_NAME)
    """Environment variable holding a session token (temporary credentials); unset or
    empty: none is sent."""

    @field_validator("prefix")
    @classmethod
    def _strip_slashes(cls, value: str) -> str:
        prefix = value.strip("/")
        if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
            raise ValueError("files.s3.prefix may not have empty, '.' or '..' segments")
        return prefix

    @field_validator("ca_file")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None


class FilesConfig(_Strict):
    """The Files API (``/v1/files``): the input files of batches and the output and error
    files the gateway writes for them. Metadata (name, size, owner) lives in Redis, per
    tenant; contents in a blob store every gateway replica shares (off without Redis)."""

    backend: Literal["local", "s3"] = "local"
    """``local``: a directory (``dir``) every gateway replica must share: on one machine
    any directory, on a cluster a volume every gateway pod mounts (ReadWriteMany).
    ``s3``: an S3-compatible object store (``s3``): AWS S3, MinIO, Ceph RGW."""

    dir: Path | None = None
    """The ``local`` backend's directory; ``None``: ``files`` under ``local.state_dir``."""

    s3: S3Config = Field(default_factory=S3Config)
    """The ``s3`` backend's store (``bucket`` is required with it)."""

    max_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    """Largest file an upload may have (OpenAI's limit for batch files is 200 MB); larger
    uploads get 413 ``file_too_large``."""

    key_prefix: str = Field(default="oss:files", min_length=1)
    """Redis key prefix of the file metadata."""

    @field_validator("dir")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @model_validator(mode="after")
    def _backend_settings(self) -> FilesConfig:
        if self.backend == "s3":
            if not self.s3.bucket:
                raise ValueError(
                    "files.backend is s3 but files.s3.bucket is empty: name the bucket that "
                    "keeps the file contents"
                )
            if self.dir is not None:
                raise ValueError("files.dir is the local backend's directory, but files.backend is s3")
        elif self.s3 != S3Config():
            raise ValueError("files.s3 is set but files.backend is not s3")
        return self


class BatchConfig(_Strict):
    """The Batch API (``/v1/batches``): a file of requests run at the lowest admission
    priority (``batch``) by a worker in every gateway replica, its lines shared through a
    Redis stream (off without Redis)."""

    enabled: bool = True
    """Serve ``/v1/files`` and ``/v1/batches`` and run the batch worker (with Redis)."""

    concurrency_per_replica: int = Field(default=8, ge=1, le=1024)
    """Batch lines one gateway replica runs at once. They are admitted at priority
    ``batch``, so interactive and standard requests always go first."""

    max_lines: int = Field(default=50_000, ge=1)
    """Most requests one batch file may have (OpenAI's limit: 50,000); more: the batch
    fails validation (``too_many_tasks``)."""

    completion_window_s: float = Field(default=24 * 3600.0, gt=0)
    """How long a batch may run (the ``24h`` completion window): lines not done by then
    go to the error file with ``batch_expired`` and the batch is ``expired``."""

    claim_idle_s: float = Field(default=60.0, gt=0)
    """A line whose replica stopped renewing its claim for this long (it died) is taken
    over by another replica. Claims are renewed every third of it."""

    poll_interval_s: float = Field(default=0.5, gt=0)
    """How often an idle worker looks for new lines."""

    key_prefix: str = Field(default="oss:batch", min_length=1)
    """Redis key prefix of batches, their lines and results."""


class ResponsesConfig(_Strict):
    """Stored Responses (``/v1/responses`` with ``store``, OpenAI's default): the gateway
    keeps each answer and its input in Redis, per tenant, so that ``GET`` / ``DELETE
    /v1/responses/{id}``, ``/input_items`` and ``previous_response_id`` work through any
    gateway replica, any engine replica and across handoff (the stored items are replayed
    to whichever backend serves the next turn; engines and upstreams are asked not to
    store anything themselves)."""

    store: bool = True
    """Keep responses (when off, ``store`` is ignored and ``previous_response_id`` is 400)."""

    ttl_s: float = Field(default=30 * 24 * 3600.0, gt=0)
    """How long a stored response lives (OpenAI keeps them 30 days)."""

    max_stored_per_tenant: int = Field(default=10_000, ge=1)
    """Live stored responses per tenant; a request that would store one more gets a 429
    ``storage_quota_exceeded`` (send ``store: false``, delete some, or wait for the TTL)."""

    max_response_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """A response whose stored form (answer plus input) is larger is not stored (logged);
    the client still gets its answer."""

    key_prefix: str = Field(default="oss:resp", min_length=1)
    """Redis key prefix of the store."""

    background: bool = True
    """Accept ``background: true`` (it needs the store): the request is answered at once with
    a ``queued`` response and runs in the gateway replica that took it, through the same
    admission as any other; ``GET`` shows its status, ``POST .../cancel`` aborts it, and its
    events can be streamed (and resumed with ``starting_after``) through any replica."""

    max_background_per_tenant: int = Field(default=100, ge=1)
    """Background responses a tenant may have queued or in progress at once; one more gets
    a 429 ``too_many_background_responses``."""

    background_queue_timeout_s: float = Field(default=600.0, gt=0)
    """How long a background response may keep getting 429 (the tenant's rate limits) or 503
    (no engine ready, the queue full) before it fails; until then it is tried again with
    backoff, and stays ``queued``."""

    background_orphan_after_s: float = Field(default=30.0, ge=1.0)
    """A background response whose gateway replica stopped sending heartbeats (it died) for
    this long is marked ``failed`` by another replica. Heartbeats go every sixth of this."""

    background_drain_s: float = Field(default=10.0, ge=0)
    """A gateway replica stopping gracefully gives its running background responses this
    long to finish before it fails them; its queued ones (not at an engine yet) are run by
    another replica."""

    background_events_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    """How long a background response's stream events are kept (for ``starting_after``)
    after the last one was written."""


class MetricsConfig(_Strict):
    """Prometheus metrics of the gateway."""

    enabled: bool = True
    """Serve ``/metrics`` on the gateway."""

    ray_export: bool = False
    """Also export the metrics through Ray's metrics agent (``serving.metrics.export_through_ray``):
    on a cluster each gateway replica is then its own series (tagged ``deployment``,
    ``replica``, ``application``), scraped from the metrics port of the pod it runs in.
    The Helm chart turns this on."""

    ttft_buckets_s: list[float] = Field(
        default_factory=lambda: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
    )
    """Histogram buckets (seconds) for time to first token and latency."""


#: Environment variable the Helm chart fills from a Secret with the upstream API key.
UPSTREAM_API_KEY_ENV = "OSS_SERVING_UPSTREAM_API_KEY"

_UPSTREAM_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class UpstreamConfig(_Strict):
    """An OpenAI-compatible API outside the cluster that requests may be handed off to."""

    name: str = Field(pattern=_UPSTREAM_NAME)
    """Name of the upstream: the value of ``X-OSS-Serving-Backend`` and the ``upstream``
    metric label."""

    base_url: str = Field(pattern=r"^https?://")
    """Base URL of its OpenAI API, ``/v1`` included (e.g. ``https://api.openai.com/v1``)."""

    api_key_env: str | None = Field(default=UPSTREAM_API_KEY_ENV, pattern=_ENV_NAME)
    """Environment variable holding the API key (the Helm chart sets it from a Secret); the
    key itself never appears in this file. ``None``: send no key."""

    models: dict[str, str] = Field(default_factory=dict)
    """Model names as clients send them (a local or a virtual model) -> the upstream's model."""

    default_model: str | None = None
    """Upstream model for requests whose model ``models`` does not list; ``None``: such
    requests are never handed off to this upstream."""

    connect_timeout_s: float = Field(default=5.0, gt=0)
    """Longest wait for a connection to the upstream."""

    first_byte_timeout_s: float = Field(default=60.0, gt=0)
    """Longest wait, from sending a streamed request, for the upstream's headers and first
    event; past it the handoff fails with 504. A non-streamed request is bounded by
    ``total_timeout_s`` instead: OpenAI-compatible servers send its headers only once the
    whole answer is generated, so its first byte comes at the end."""

    read_timeout_s: float = Field(default=60.0, gt=0)
    """Longest gap between two chunks of an answer once it has begun (two events of a
    stream, two reads of a non-streamed body); past it a stream ends with an in-band error
    event, a non-streamed answer fails with 504."""

    total_timeout_s: float = Field(default=600.0, gt=0)
    """Longest one upstream request may take from sending to its last byte; past it a
    stream ends with an in-band error event, a non-streamed answer fails with 504. What the
    upstream billed (its usage, else the reservation) stays charged to the budget when the
    gateway gives up after sending."""

    max_concurrent_requests: int = Field(default=32, ge=1)
    """Requests one gateway replica sends to this upstream at once; beyond it, requests are
    not handed off (they stay local)."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    """Budget: requests handed off per calendar minute, over all gateway replicas."""

    tokens_per_minute: int | None = Field(default=None, ge=1)
    """Budget: upstream tokens (prompt plus output) per calendar minute."""

    monthly_token_cap: int | None = Field(default=None, ge=1)
    """Budget: upstream tokens per calendar month (UTC); once spent, nothing is handed off."""

    def upstream_model(self, model: str) -> str | None:
        """The upstream's model for a request naming ``model``, or None."""
        return self.models.get(model, self.default_model)


class OverflowConfig(_Strict):
    """Overflow: hand off what the local engines cannot start in time."""

    enabled: bool = True
    """Apply the overflow policy."""

    max_predicted_wait_s: float | None = Field(default=None, gt=0)
    """Hand off when the predicted queue wait exceeds this many seconds; ``None``: only when
    it exceeds the time left to the request's deadline."""

    when_not_ready: bool = True
    """Hand off when no local engine replica of the model is ready."""


class VirtualModelConfig(_Strict):
    """A model name that no engine serves; a rule picks the backend per request."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
    """The name clients send in ``model`` (e.g. ``auto``)."""

    low: str
    """Local model for ``reasoning_effort: low`` (and ``minimal``)."""

    medium: str
    """Local model for ``reasoning_effort: medium``."""

    high: str
    """Local model for ``reasoning_effort: high``."""

    default_effort: Literal["low", "medium", "high"] = "medium"
    """Effort assumed when the request names none."""

    upstream: str | None = None
    """Upstream for requests the client marks or that exceed the local context; ``None``:
    ``handoff.upstream``."""

    context_tokens: int | None = Field(default=None, ge=1)
    """Context length of the local target; ``None``: its ``engine_kwargs.max_model_len``."""


class HandoffConfig(_Strict):
    """Handoff: which requests go to an upstream instead of the local engines."""

    upstream: str | None = None
    """Upstream for overflow and failover (and virtual models without their own); ``None``
    with no virtual model upstream: handoff is off."""

    overflow: OverflowConfig = Field(default_factory=OverflowConfig)
    """Overflow policy."""

    failover: bool = True
    """Hand off when the local engine fails before the first token."""

    virtual_models: list[VirtualModelConfig] = Field(default_factory=list)
    """Escalation rules."""

    escalate_header: str = Field(default="x-oss-escalate", pattern=r"^[a-z0-9-]{1,64}$")
    """Request header (lower case) by which a client marks a virtual-model request for the
    upstream (``1``, ``true``, ``yes`` or ``cloud``)."""

    chars_per_token: float = Field(default=3.0, gt=0)
    """Characters per token in the gateway's prompt-length estimate (no tokenizer in the
    gateway); low values over-estimate, sending borderline requests upstream rather than
    into a local context-length error."""


class RayConfig(_Strict):
    """How the local mode starts Ray (the cluster's RayService ignores this)."""

    num_cpus: int = Field(default=6, ge=1)
    """Logical CPUs of the local Ray node: above the real cores so that the controller,
    proxy, gateway and engine replicas can all be placed on a small machine."""

    metrics_export_port: int | None = Field(default=None, ge=1, le=65535)
    """Port of the local Ray node's Prometheus endpoint (its metrics agent), where the
    gateway's metrics appear per replica when ``metrics.ray_export`` is on (as in the
    cluster, where every Ray pod exports on 8080). None: a port Ray picks."""

    include_dashboard: bool = False
    """Start Ray's dashboard."""

    high_throughput: bool = True
    """Ray Serve's high-throughput mode (what Ray recommends for production, and what the
    Helm chart sets with ``ray.serve.highThroughput``): HAProxy takes the gateway port in
    place of Serve's Python HTTP proxy and hands each request straight to a gateway
    replica's own HTTP server, and deployments call each other over gRPC
    (``RAY_SERVE_ENABLE_HA_PROXY``, ``RAY_SERVE_THROUGHPUT_OPTIMIZED``). Off: every request
    crosses the Python proxy actor first."""


class LocalConfig(_Strict):
    """`oss-serve up` on one machine."""

    state_dir: Path = Field(default=Path("~/.cache/oss-serving/run"), validate_default=True)
    """Where ``up`` records what it started, for ``down`` and ``status``."""

    cache_dir: Path = Field(default=Path("~/.cache/oss-serving/models"), validate_default=True)
    """Where built-in models are converted to Hugging Face folders, once."""

    start_redis: bool = True
    """Start a local ``redis-server`` when none answers at ``redis.url``."""

    ready_timeout_s: float = Field(default=900.0, gt=0)
    """How long ``up`` waits for every model to become ready."""

    @field_validator("state_dir", "cache_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()


class ServingConfig(_Strict):
    """Everything oss-serving needs to run."""

    models: list[ModelConfig] = Field(min_length=1)
    """Served models; each becomes one Ray Serve engine deployment."""

    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    """HTTP front."""

    redis: RedisConfig = Field(default_factory=RedisConfig)
    """Shared Redis."""

    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    """Prometheus metrics."""

    auth: AuthConfig = Field(default_factory=AuthConfig)
    """API keys."""

    tenants: list[TenantSeed] = Field(default_factory=list)
    """Tenants seeded from the configuration."""

    queue: QueueConfig = Field(default_factory=QueueConfig)
    """Admission queue."""

    ray: RayConfig = Field(default_factory=RayConfig)
    """Local Ray start-up."""

    local: LocalConfig = Field(default_factory=LocalConfig)
    """Local mode."""

    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    """Prefix-affinity routing."""

    response_cache: ResponseCacheConfig = Field(default_factory=ResponseCacheConfig)
    """Exact-match response cache."""

    responses: ResponsesConfig = Field(default_factory=ResponsesConfig)
    """Stored Responses API objects (``store``, ``previous_response_id``)."""

    files: FilesConfig = Field(default_factory=FilesConfig)
    """The Files API: where file contents live, size limit."""

    batch: BatchConfig = Field(default_factory=BatchConfig)
    """The Batch API: worker concurrency, limits, completion window."""

    upstreams: list[UpstreamConfig] = Field(default_factory=list)
    """OpenAI-compatible APIs outside the cluster that requests may be handed off to."""

    handoff: HandoffConfig = Field(default_factory=HandoffConfig)
    """Handoff policy (off unless an upstream is named)."""

    @model_validator(mode="after")
    def _unique_names(self) -> ServingConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _check_handoff(self) -> ServingConfig:
        ups = [u.name for u in self.upstreams]
        if len(set(ups)) != len(ups):
            raise ValueError("upstream names must be unique")
        models = {m.name for m in self.models}
        named = [("handoff.upstream", self.handoff.upstream)]
        for v in self.handoff.virtual_models:
            if v.name in models:
                raise ValueError(f"virtual model {v.name!r} is also a served model")
            for effort in ("low", "medium", "high"):
                if getattr(v, effort) not in models:
                    raise ValueError(f"virtual model {v.name!r}: {effort} names no served model")
            named.append((f"virtual model {v.name!r} upstream", v.upstream))
        for where, name in named:
            if name is not None and name not in ups:
                raise ValueError(f"{where}: no upstream named {name!r}")
        return self

    def upstream(self, name: str) -> UpstreamConfig | None:
        """The upstream named ``name``, or None."""
        return next((u for u in self.upstreams if u.name == name), None)

    def model(self, name: str) -> ModelConfig | None:
        """The model named ``name``, or None."""
        return next((m for m in self.models if m.name == name), None)

    def to_yaml(self) -> str:
        """The effective configuration as YAML (loadable by :func:`load_config`)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def default_config() -> ServingConfig:
    """What ``oss-serve up`` serves with no file: SmolLM2-135M-Instruct on the vLLM CPU engine."""
    return ServingConfig(
        models=[
            ModelConfig(
                name="smollm2-135m-instruct",
                source="builtin:smollm2-135m-instruct",
                engine_kwargs={"max_model_len": 2048, "dtype": "bfloat16"},
                engine_env={"VLLM_CPU_KVCACHE_SPACE": "1"},
            )
        ],
        auth=AuthConfig(required=False),
    )


def _error_key(exc: ValidationError) -> tuple[str, str]:
    first = exc.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    return key, f"{key}: {first['msg']}" if key else first["msg"]


def parse_config(data: Any, origin: str = "configuration") -> ServingConfig:
    """Validate an already-parsed mapping; errors name the offending key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping")
    try:
        return ServingConfig.model_validate(data)
    except ValidationError as exc:
        key, text = _error_key(exc)
        count = len(exc.errors())
        more = f" (and {count - 1} more problem{'s' if count > 2 else ''})" if count > 1 else ""
        raise ConfigError(f"{origin}: {text}{more}", key=key) from exc


def load_config(path: str | Path | None) -> ServingConfig:
    """Load and validate a YAML file; ``None`` gives :func:`default_config`."""
    if path is None:
        return default_config()
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {file}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
    return parse_config(data, origin=str(file))
