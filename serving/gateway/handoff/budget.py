"""The handoff budget: requests and tokens per minute, tokens per month, per upstream.

:class:`UpstreamBudget` reserves before a handoff and settles to the upstream's usage
after it, on :class:`Counters` that live in Redis (:class:`RedisCounters`, shared by the
gateway replicas, failing closed) or in this process (:class:`MemoryCounters`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from serving.config import UpstreamConfig

__all__ = ["Counters", "MemoryCounters", "RedisCounters", "Reservation", "UpstreamBudget"]

log = logging.getLogger("oss_serving.handoff")


class Counters(Protocol):
    """Counters shared by the gateway replicas (Redis), or local to one (memory)."""

    async def try_add(self, adds: Sequence[tuple[str, int, int | None, int]]) -> bool:
        """Add every ``(key, amount, limit, ttl_s)`` if none would exceed its limit; else none."""

    async def add(self, key: str, amount: int, ttl_s: int) -> None:
        """Add ``amount`` (may be negative) to ``key``."""

    async def get_many(self, keys: Sequence[str]) -> list[int]:
        """Current values (0 for missing keys)."""


class MemoryCounters:
    """Counters in this process (a single gateway, or Redis unreachable)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._values: dict[str, tuple[int, float]] = {}
        self._clock = clock

    def _get(self, key: str) -> int:
        value, expires = self._values.get(key, (0, math.inf))
        if expires <= self._clock():
            self._values.pop(key, None)
            return 0
        return value

    async def try_add(self, adds: Sequence[tuple[str, int, int | None, int]]) -> bool:
        if any(limit is not None and self._get(key) + amount > limit for key, amount, limit, _ in adds):
            return False
        for key, amount, _, ttl in adds:
            await self.add(key, amount, ttl)
        return True

    async def add(self, key: str, amount: int, ttl_s: int) -> None:
        current = self._get(key)
        expires = self._values.get(key, (0, self._clock() + ttl_s))[1]
        self._values[key] = (current + amount, expires)

    async def get_many(self, keys: Sequence[str]) -> list[int]:
        return [self._get(k) for k in keys]


_TRY_ADD = """
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[3 * i - 1])
  if limit >= 0 and (tonumber(redis.call('GET', key) or '0') + tonumber(ARGV[3 * i - 2])) > limit then
    return 0
  end
end
for i, key in ipairs(KEYS) do
  redis.call('INCRBY', key, ARGV[3 * i - 2])
  if redis.call('TTL', key) < 0 then redis.call('EXPIRE', key, ARGV[3 * i]) end
end
return 1
"""


class RedisCounters:
    """Counters in Redis, checked and added atomically (one Lua script); every gateway
    replica shares them.

    Fail closed: while Redis cannot be reached (the gateway's Redis circuit breaker is
    open, or a call failed or ran past its budget; ``redis_guard.py``) :meth:`try_add`
    adds nothing and answers False, so a handoff that needs the budget is declined and
    served locally. Nothing is counted in process: the replicas together never spend more
    than the budget, and a Redis blip never restarts the monthly cap. :meth:`add` (a
    usage correction) is dropped and logged; :meth:`get_many` answers the values last
    read. :attr:`reachable` says whether the last call reached Redis (read it right after
    the call, before any ``await``: it tells a spent budget from an unreachable one).
    """

    LAST_READ_KEYS = 256
    """Values kept for :meth:`get_many` to answer while Redis is away."""

    def __init__(self, redis: Any) -> None:
        from serving.gateway.redis_guard import guard_of

        self._redis = redis
        self._script = redis.register_script(_TRY_ADD)
        self._guard = guard_of(redis)
        self._last: dict[str, int] = {}
        self.reachable = True
        """Whether the last call reached Redis."""

    def _unreachable(self, what: str, exc: Exception) -> None:
        if self.reachable:
            log.warning("handoff budget: Redis unreachable (%s); %s", type(exc).__name__, what)
        self.reachable = False
        if self._guard is not None:
            self._guard.fallback("upstream_budget")

    async def try_add(self, adds: Sequence[tuple[str, int, int | None, int]]) -> bool:
        args: list[int] = []
        for _, amount, limit, ttl in adds:
            args += [amount, -1 if limit is None else limit, ttl]
        try:
            added = bool(await self._script(keys=[k for k, *_ in adds], args=args))
        except Exception as exc:
            self._unreachable("handoffs that need the budget are declined", exc)
            return False
        self.reachable = True
        return added

    async def add(self, key: str, amount: int, ttl_s: int) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incrby(key, amount)
                pipe.expire(key, ttl_s, nx=True)
                await pipe.execute()
        except Exception as exc:
            self._unreachable(f"a correction of {amount} to {key} is lost", exc)
            return
        self.reachable = True

    async def get_many(self, keys: Sequence[str]) -> list[int]:
        try:
            values = await self._redis.mget(list(keys))
        except Exception as exc:
            self._unreachable("budget gauges show the values last read", exc)
            return [self._last.get(k, 0) for k in keys]
        self.reachable = True
        found = [int(v) if v is not None else 0 for v in values]
        for key, value in zip(keys, found, strict=True):
            self._last.pop(key, None)
            self._last[key] = value
        while len(self._last) > self.LAST_READ_KEYS:
            self._last.pop(next(iter(self._last)))
        return found


@dataclass(frozen=True)
class Reservation:
    """What one handoff charged to the budget before it ran."""

    minute: str
    month: str
    tokens: int


class UpstreamBudget:
    """Requests and tokens per calendar minute, tokens per calendar month (UTC).

    A handoff reserves one request and its estimated tokens up front (so concurrent
    requests cannot overspend together), then :meth:`settle` corrects the tokens to the
    upstream's reported usage.
    """

    MINUTE_TTL_S = 120
    MONTH_TTL_S = 32 * 24 * 3600

    def __init__(
        self,
        config: UpstreamConfig,
        counters: Counters,
        *,
        key_prefix: str = "oss",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._counters = counters
        self._prefix = f"{key_prefix}:handoff:{config.name}"
        self._clock = clock

    def _windows(self) -> tuple[str, str]:
        now = datetime.fromtimestamp(self._clock(), tz=UTC)
        return now.strftime("%Y%m%d%H%M"), now.strftime("%Y%m")

    def _keys(self, minute: str, month: str) -> tuple[str, str, str]:
        p = self._prefix
        return f"{p}:req:{minute}", f"{p}:tok:{minute}", f"{p}:month:{month}"

    async def reserve(self, tokens: int) -> Reservation | None:
        """Charge one request and ``tokens``; None when a budget would be exceeded."""
        c = self.config
        minute, month = self._windows()
        req, tok, mon = self._keys(minute, month)
        ok = await self._counters.try_add(
            [
                (req, 1, c.requests_per_minute, self.MINUTE_TTL_S),
                (tok, tokens, c.tokens_per_minute, self.MINUTE_TTL_S),
                (mon, tokens, c.monthly_token_cap, self.MONTH_TTL_S),
            ]
        )
        return Reservation(minute, month, tokens) if ok else None

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Correct the reservation to the tokens the upstream reported."""
        delta = used_tokens - reservation.tokens
        if delta:
            _, tok, mon = self._keys(reservation.minute, reservation.month)
            await self._counters.add(tok, delta, self.MINUTE_TTL_S)
            await self._counters.add(mon, delta, self.MONTH_TTL_S)

    @property
    def available(self) -> bool:
        """False when the last budget call could not reach Redis (the budget fails closed)."""
        return bool(getattr(self._counters, "reachable", True))

    async def used(self) -> dict[str, int]:
        """This minute's requests and tokens, this month's tokens."""
        values = await self._counters.get_many(self._keys(*self._windows()))
        return dict(zip(("minute_requests", "minute_tokens", "month_tokens"), values, strict=True))

    def limits(self) -> dict[str, int | None]:
        c = self.config
        return {
            "minute_requests": c.requests_per_minute,
            "minute_tokens": c.tokens_per_minute,
            "month_tokens": c.monthly_token_cap,
        }
