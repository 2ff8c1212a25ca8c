"""Per-tenant rate limits (requests and tokens per minute), shared through Redis.

Each limit is a token bucket that holds one minute's allowance and refills continuously,
checked and charged by one Lua script, so every gateway replica draws from the same
bucket. Tokens are charged up front at the request's estimate (prompt estimate plus its
output cap) and corrected with the real usage when the answer reports it.

While Redis cannot be reached (the gateway's Redis circuit breaker is open, or a call
failed; ``redis_guard.py``) each replica enforces its share of every limit in process:
``ceil(limit / gateway.num_replicas)`` per minute, in a bucket of that size that starts
full (a request costing more than the share passes a full bucket, up to the whole limit).
Back on Redis, the shared buckets count again; what was charged locally is not copied.

Answers carry OpenAI's headers: ``x-ratelimit-limit-requests``,
``x-ratelimit-remaining-requests``, ``x-ratelimit-reset-requests`` and the same for tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

from redis.exceptions import RedisError

from serving.gateway.errors import RateLimitError
from serving.gateway.redis_guard import guard_of
from serving.gateway.tenants import Tenant

__all__ = ["BucketResult", "RateLimiter", "format_reset"]

# KEYS: bucket;  ARGV: capacity, refill per ms, cost, now_ms, commit (1/0)
# -> {allowed 1/0, remaining (floor), ms until `cost` would fit (0 if allowed), ms to full}
_BUCKET = """
local cap, rate, cost, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 'level', 'ts')
local level = tonumber(b[1] or cap)
local ts = tonumber(b[2] or now)
level = math.min(cap, level + math.max(0, now - ts) * rate)
local allowed = 0
local wait = 0
if cost <= level or ARGV[5] == '2' then
  allowed = 1
  level = math.min(cap, level - cost)
elseif cost > cap then
  wait = -1
else
  wait = math.ceil((cost - level) / rate)
end
if allowed == 1 or ARGV[5] == '2' then
  redis.call('HSET', KEYS[1], 'level', level, 'ts', now)
  redis.call('PEXPIRE', KEYS[1], math.ceil(cap / rate) + 1000)
end
return {allowed, math.floor(math.max(level, 0)), wait, math.ceil((cap - level) / rate)}
"""


@dataclass
class BucketResult:
    allowed: bool
    remaining: int
    retry_after_ms: int
    reset_ms: int


def format_reset(ms: int) -> str:
    """OpenAI's duration format for ``x-ratelimit-reset-*``: ``20ms``, ``1s``, ``6m0s``."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"


class _LocalBucket:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.level = float(capacity)
        self.ts = time.monotonic() * 1000


class RateLimiter:
    """Token buckets per tenant: requests per minute and tokens per minute.

    ``redis`` None: the buckets are local to this process, each of ``local_share`` replicas
    enforcing ``ceil(limit / local_share)``, as while Redis cannot be reached.
    """

    def __init__(self, redis: Any, key_prefix: str, *, local_share: int = 1) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self._script = redis.register_script(_BUCKET) if redis is not None else None
        self._guard = guard_of(redis)
        self._local_share = max(1, local_share)
        self._local: dict[str, _LocalBucket] = {}

    def _key(self, tenant: str, kind: str) -> str:
        return f"{self._prefix}:rl:{tenant}:{kind}"

    async def _take(self, key: str, capacity: int, cost: float, mode: int) -> BucketResult:
        rate = capacity / 60_000.0
        now = int(time.time() * 1000)
        if self._script is not None:
            try:
                allowed, remaining, wait, reset = await self._script(
                    keys=[key], args=[capacity, rate, cost, now, mode]
                )
                return BucketResult(bool(allowed), int(remaining), int(wait), int(reset))
            except (RedisError, OSError):
                if self._guard is not None:  # Redis is away: this replica's share, in process
                    self._guard.fallback("rate_limit")
        return self._take_local(key, capacity, cost, mode)

    def _take_local(self, key: str, limit: int, cost: float, mode: int) -> BucketResult:
        """The bucket in process: this replica's share of ``limit``."""
        share = math.ceil(limit / self._local_share)
        rate = share / 60_000.0
        bucket = self._local.get(key)
        if bucket is None or bucket.capacity != share:
            bucket = self._local[key] = _LocalBucket(share)
        mono = time.monotonic() * 1000
        bucket.level = min(share, bucket.level + (mono - bucket.ts) * rate)
        bucket.ts = mono
        fits = cost <= bucket.level or (cost <= limit and bucket.level >= share)
        if fits or mode == 2:
            bucket.level = min(share, bucket.level - cost)
            return BucketResult(True, int(max(bucket.level, 0)), 0, math.ceil((share - bucket.level) / rate))
        wait = -1 if cost > limit else math.ceil((min(cost, share) - bucket.level) / rate)
        return BucketResult(False, int(max(bucket.level, 0)), wait, math.ceil((share - bucket.level) / rate))

    async def check(self, tenant: Tenant, estimated_tokens: int) -> dict[str, str]:
        """Charge one request and its token estimate; 429 if a bucket cannot pay.

        Returns the ``x-ratelimit-*`` headers for the answer.
        """
        headers: dict[str, str] = {}
        limits = tenant.limits
        if limits.requests_per_minute:
            result = await self._take(self._key(tenant.id, "req"), limits.requests_per_minute, 1, 1)
            headers |= _headers("requests", limits.requests_per_minute, result)
            if not result.allowed:
                raise _limited("requests", limits.requests_per_minute, result, headers)
        if limits.tokens_per_minute:
            result = await self._take(
                self._key(tenant.id, "tok"), limits.tokens_per_minute, estimated_tokens, 1
            )
            headers |= _headers("tokens", limits.tokens_per_minute, result)
            if not result.allowed:
                if limits.requests_per_minute:  # give the request back: it did not run
                    await self._take(self._key(tenant.id, "req"), limits.requests_per_minute, -1, 2)
                raise _limited("tokens", limits.tokens_per_minute, result, headers)
        return headers

    async def correct_tokens(self, tenant: Tenant, delta: int) -> None:
        """Charge (``delta`` > 0) or refund (< 0) the difference between estimate and usage."""
        if tenant.limits.tokens_per_minute and delta:
            await self._take(self._key(tenant.id, "tok"), tenant.limits.tokens_per_minute, delta, 2)


def _headers(kind: str, limit: int, result: BucketResult) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(result.remaining, 0)),
        f"x-ratelimit-reset-{kind}": format_reset(result.reset_ms),
    }


def _limited(
    kind: Literal["requests", "tokens"], limit: int, result: BucketResult, headers: dict[str, str]
) -> RateLimitError:
    if result.retry_after_ms < 0:
        return RateLimitError(
            f"this request needs more {kind} than the tenant's whole limit of {limit} per minute",
            limit=kind,
            headers=headers,
        )
    retry = max(1, math.ceil(result.retry_after_ms / 1000))
    return RateLimitError(
        f"rate limit reached: {limit} {kind} per minute; retry in {retry} s",
        limit=kind,
        headers={**headers, "Retry-After": str(retry)},
    )
