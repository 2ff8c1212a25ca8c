"""Exact-match response cache in Redis, for deterministic requests only.

A request is served from (and stored in) the cache only when all of these hold:

- the cache is enabled (``response_cache.enabled``), the tenant opted in
  (``Tenant.response_cache``), and the request asks with ``X-OSS-Response-Cache: on``;
- it is deterministic: ``temperature`` is 0, or a fixed integer ``seed`` is set;
- it uses no tool that acts on the world: chat and completions function tools only
  propose calls (the client runs them), so they are allowed; on ``/v1/responses`` any
  built-in tool (web search, MCP, code interpreter, ...), and any stateful request
  (``store`` not false, ``previous_response_id``, ``background``, ``conversation``), is
  never cached.

The key is a hash of the tenant, the endpoint and the canonical request body (keys
sorted, compact JSON) without ``stream`` and ``stream_options``: any other changed
field is a different key. An entry keeps up to two forms of the answer: the JSON answer
(field ``json``) and the verbatim event stream (field ``sse:<stream_options>``). A
streaming request replays the recorded stream when there is one, else a stream
synthesized from the JSON answer (chat and completions); a non-streaming request needs
the JSON form. Answers say ``X-OSS-Response-Cache: hit`` (or ``miss``, or ``skip`` when
asked for but not deterministic).

Memory bound: a sorted set of entry keys by store time and a running byte total; a
store that takes the total above ``max_total_bytes`` evicts the oldest entries, in the
same Lua script. Entries also expire after ``ttl_s``.

While Redis cannot be reached (the gateway's Redis circuit breaker is open;
``redis_guard.py``) the cache is skipped: no lookup, no store, no
``X-OSS-Response-Cache`` header; the engine answers. A lookup that fails is skipped the
same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from serving.config import ResponseCacheConfig
from serving.engine.protocol import Endpoint, EngineJSON
from serving.gateway.context import RequestContext
from serving.gateway.redis_guard import guard_of
from serving.metrics import GatewayMetrics
from serving.wire import CACHE_HEADER, CACHE_REQUEST_HEADER, aclose_quietly

__all__ = [
    "ResponseCache",
    "cache_key",
    "is_deterministic",
    "sse_from_json",
]

log = logging.getLogger("oss_serving.response_cache")

_EXCLUDED = frozenset({"stream", "stream_options", "request_id"})
_STATEFUL = ("previous_response_id", "background", "conversation")

# KEYS: entry key, lru zset, sizes hash, total counter. ARGV: field, value, ttl, now, max total.
# Returns the total bytes after the store (and any eviction).
_STORE = """
local entry, lru, sizes, total = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local field, value = ARGV[1], ARGV[2]
local ttl, now, cap = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local old = tonumber(redis.call('HGET', sizes, entry) or '0')
if redis.call('EXISTS', entry) == 0 then old = 0 end
redis.call('HSET', entry, field, value)
redis.call('EXPIRE', entry, math.ceil(ttl))
local size = 0
for _, v in ipairs(redis.call('HVALS', entry)) do size = size + #v end
redis.call('HSET', sizes, entry, size)
redis.call('ZADD', lru, now, entry)
local t = redis.call('INCRBY', total, size - old)
while t > cap do
  local oldest = redis.call('ZPOPMIN', lru, 1)
  if #oldest == 0 then break end
  local k = oldest[1]
  local s = tonumber(redis.call('HGET', sizes, k) or '0')
  redis.call('HDEL', sizes, k)
  redis.call('DEL', k)
  t = redis.call('INCRBY', total, -s)
end
-- entries that expired on their own: drop their bookkeeping when they reach the front
local stale = redis.call('ZRANGEBYSCORE', lru, '-inf', now - ttl, 'LIMIT', 0, 64)
for _, k in ipairs(stale) do
  local s = tonumber(redis.call('HGET', sizes, k) or '0')
  redis.call('ZREM', lru, k)
  redis.call('HDEL', sizes, k)
  t = redis.call('INCRBY', total, -s)
end
if t < 0 then redis.call('SET', total, 0); t = 0 end
return t
"""


def is_deterministic(endpoint: Endpoint, body: Mapping[str, Any]) -> bool:
    """Temperature 0 or a fixed seed, and no tool or state that acts on the world."""
    temperature = body.get("temperature")
    seed = body.get("seed")
    fixed_seed = isinstance(seed, int) and not isinstance(seed, bool)
    if not (temperature == 0 or fixed_seed):
        return False
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        return False
    if endpoint is Endpoint.responses:
        if body.get("store", True) is not False or any(body.get(k) for k in _STATEFUL):
            return False
        return all(isinstance(t, Mapping) and t.get("type") == "function" for t in tools)
    return all(isinstance(t, Mapping) and t.get("type", "function") == "function" for t in tools)


def cache_key(tenant: str, endpoint: Endpoint, body: Mapping[str, Any]) -> str:
    """Hash of the tenant, endpoint and canonical body (without stream options)."""
    canonical = {k: v for k, v in body.items() if k not in _EXCLUDED}
    text = json.dumps([tenant, endpoint.value, canonical], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _sse_field(body: Mapping[str, Any]) -> str:
    options = body.get("stream_options")
    return "sse:" + json.dumps(options, sort_keys=True, separators=(",", ":"))


def sse_from_json(endpoint: Endpoint, answer: Mapping[str, Any], body: Mapping[str, Any]) -> str | None:
    """A chat/completions event stream equivalent to a JSON answer (None for responses)."""
    if endpoint is Endpoint.responses:
        return None
    chat = endpoint is Endpoint.chat
    base = {k: answer.get(k) for k in ("id", "created", "model", "system_fingerprint") if k in answer}
    base["object"] = "chat.completion.chunk" if chat else "text_completion"
    events: list[str] = []
    for choice in answer.get("choices") or []:
        index = choice.get("index", 0)
        if chat:
            message = dict(choice.get("message") or {})
            delta = {k: v for k, v in message.items() if v is not None}
            part: dict[str, Any] = {"index": index, "delta": delta, "logprobs": choice.get("logprobs")}
        else:
            part = {"index": index, "text": choice.get("text", ""), "logprobs": choice.get("logprobs")}
        events.append(json.dumps({**base, "choices": [{**part, "finish_reason": None}]}))
        done: dict[str, Any] = {"index": index, "finish_reason": choice.get("finish_reason")}
        if chat:
            done["delta"] = {}
        else:
            done["text"] = ""
        events.append(json.dumps({**base, "choices": [done]}))
    options = body.get("stream_options") or {}
    if isinstance(options, Mapping) and options.get("include_usage") and answer.get("usage"):
        events.append(json.dumps({**base, "choices": [], "usage": answer["usage"]}))
    return "".join(f"data: {e}\n\n" for e in events) + "data: [DONE]\n\n"


@dataclass
class CachePlan:
    """A request that may be stored once it has been answered."""

    key: str
    field: str
    model: str


class ResponseCache:
    """The gateway's response cache (see the module docstring)."""

    def __init__(self, redis: Any, config: ResponseCacheConfig, metrics: GatewayMetrics) -> None:
        self._redis = redis
        self._config = config
        self._metrics = metrics
        self._store = redis.register_script(_STORE)
        self._guard = guard_of(redis)
        self._tasks: set[asyncio.Task[None]] = set()
        base = "{" + config.key_prefix + "}"
        self._entry_prefix = base + ":e:"
        self._lru, self._sizes, self._total = base + ":lru", base + ":sizes", base + ":bytes"

    def _unavailable(self) -> bool:
        """The breaker is open: skip the cache (and count it)."""
        if self._guard is not None and self._guard.is_open:
            self._guard.fallback("response_cache")
            return True
        return False

    def wanted(self, ctx: RequestContext) -> bool:
        """Enabled, tenant opted in, and the request asks for it."""
        return (
            self._config.enabled
            and bool(getattr(ctx.tenant, "response_cache", False))
            and ctx.headers.get(CACHE_REQUEST_HEADER, "").strip().lower() == "on"
        )

    async def lookup(
        self, ctx: RequestContext
    ) -> tuple[EngineJSON | None, AsyncIterator[str] | None, CachePlan | None] | None:
        """A cached answer (JSON or replayed stream), or a plan to store the answer, or None.

        Returns ``(json, None, None)`` or ``(None, stream, None)`` on a hit,
        ``(None, None, plan)`` on a miss; None when the cache does not apply.
        Sets the response header in every case it applies.
        """
        if not self.wanted(ctx):
            return None
        model = ctx.model
        if not is_deterministic(ctx.endpoint, ctx.body):
            ctx.response_headers[CACHE_HEADER] = "skip"
            self._metrics.response_cache.labels(model=model, result="skip").inc()
            return None
        if self._unavailable():
            return None
        key = self._entry_prefix + cache_key(ctx.tenant.id, ctx.endpoint, ctx.body)
        streaming = bool(ctx.body.get("stream"))
        field = _sse_field(ctx.body) if streaming else "json"
        try:
            found = await self._redis.hmget(key, [field, "json"])
        except Exception as exc:  # Redis down: serve without the cache
            log.warning("response cache lookup failed: %s", exc)
            if self._guard is not None:
                self._guard.fallback("response_cache")
            return None
        recorded, as_json = (_str(v) for v in found)
        answer: EngineJSON | None = None
        stream_text: str | None = None
        if streaming and recorded is not None:
            stream_text = recorded
        elif as_json is not None:
            answer = EngineJSON(status=200, body=json.loads(as_json))
            if streaming:
                stream_text = sse_from_json(ctx.endpoint, answer.body, ctx.body)
                answer = None
        if answer is not None or stream_text is not None:
            ctx.response_headers[CACHE_HEADER] = "hit"
            self._metrics.response_cache.labels(model=model, result="hit").inc()
            self._metrics.response_cache_hits.labels(model=model).inc()
            return answer, (_replay(stream_text) if stream_text is not None else None), None
        ctx.response_headers[CACHE_HEADER] = "miss"
        self._metrics.response_cache.labels(model=model, result="miss").inc()
        return None, None, CachePlan(key=key, field=field, model=model)

    def store_json(self, plan: CachePlan, answer: EngineJSON) -> None:
        """Store a successful JSON answer (in the background)."""
        if answer.status != 200 or "error" in answer.body:
            return
        self._spawn(plan, json.dumps(answer.body, separators=(",", ":")))

    async def tee(self, plan: CachePlan, stream: AsyncIterator[str]) -> AsyncIterator[str]:
        """Relay ``stream`` and store it once it has ended normally with ``[DONE]``."""
        parts: list[str] = []
        size = 0
        complete = False
        try:
            async for text in stream:
                if size <= self._config.max_entry_bytes:
                    parts.append(text)
                    size += len(text)
                yield text
            joined = "".join(parts)
            complete = joined.rstrip().endswith("data: [DONE]") and '"error"' not in joined
        finally:
            await aclose_quietly(stream)
        if complete and size <= self._config.max_entry_bytes:
            self._spawn(plan, "".join(parts))

    def _spawn(self, plan: CachePlan, value: str) -> None:
        if len(value) > self._config.max_entry_bytes or self._unavailable():
            return
        task = asyncio.create_task(self._put(plan, value), name="oss-serving-response-cache")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _put(self, plan: CachePlan, value: str) -> None:
        import time

        cfg = self._config
        if self._unavailable():
            return
        try:
            total = await self._store(
                keys=[plan.key, self._lru, self._sizes, self._total],
                args=[plan.field, value, cfg.ttl_s, time.time(), cfg.max_total_bytes],
            )
            self._metrics.response_cache_bytes.set(int(total))
        except Exception as exc:
            log.warning("response cache store failed: %s", exc)
            if self._guard is not None:
                self._guard.fallback("response_cache")

    async def drain(self) -> None:
        """Wait for pending stores (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _str(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


async def _replay(text: str) -> AsyncIterator[str]:
    yield text
