"""The prefix index shared by every gateway replica: which engine replica served which prompt prefix.

A prompt is rendered to canonical text (:func:`render_prompt`), cut into fixed-size
blocks of ``block_chars`` characters, and each full block gets a chained hash
(:func:`block_hashes`: block ``i``'s hash covers blocks ``0..i``, as vLLM's own block
hashes do), so one lookup per block answers "who holds this prompt's first ``i``
blocks". Text blocks instead of token blocks: the gateway has no tokenizer, and a
shared text prefix of the rendered prompt is a shared token prefix up to the last block
boundary.

Redis layout, per model (one hash tag per model, so the scripts run on one slot of a
Redis Cluster too)::

    {P:model}:b:<hash>   HASH  replica id -> last use (unix s)      TTL index_ttl_s
    {P:model}:r:<rid>    ZSET  block hash -> last use (unix s)      TTL index_ttl_s
    {P:model}:k:<key>    STRING replica id (prompt_cache_key/user)  TTL index_ttl_s

The per-replica sorted set is an LRU of what that replica was sent: when it holds more
than ``replica_capacity_blocks`` blocks the least recently used are dropped from the
index too. This tracks vLLM's LRU eviction roughly, unlike an index that assumes no
eviction. Lookups and updates are one Lua script call each (one round trip).

While Redis cannot be reached (the gateway's Redis circuit breaker is open;
``redis_guard.py``) the index is skipped: a lookup finds nothing without asking Redis, so
the request carries no affinity hints and is routed by load, and updates are dropped.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from serving.config import RoutingConfig
from serving.engine.protocol import Endpoint
from serving.gateway.redis_guard import guard_of

__all__ = ["AffinityLookup", "PrefixIndex", "block_hashes", "render_prompt"]

_SEP_MSG = "\x1e"
_SEP_FIELD = "\x1f"

# KEYS: block keys in prompt order, then the affinity-key key (or "" for none).
# ARGV: now, ttl.
# Returns {replica, matched leading blocks, ...} and the key's replica as the last item.
_LOOKUP = """
local n = #KEYS - 1
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local alive = nil
local depth = {}
for i = 1, n do
  local flat = redis.call('HGETALL', KEYS[i])
  local here = {}
  local any = false
  for j = 1, #flat, 2 do
    if now - tonumber(flat[j + 1]) <= ttl then
      here[flat[j]] = true
      any = true
    end
  end
  if alive == nil then
    alive = here
  else
    local next_alive = {}
    local left = false
    for rid, _ in pairs(alive) do
      if here[rid] then next_alive[rid] = true; left = true end
    end
    alive = next_alive
    any = left
  end
  if not any then break end
  for rid, _ in pairs(alive) do depth[rid] = i end
end
local out = {}
for rid, d in pairs(depth) do
  out[#out + 1] = rid
  out[#out + 1] = d
end
local key_replica = ''
if KEYS[#KEYS] ~= '' then
  key_replica = redis.call('GET', KEYS[#KEYS]) or ''
end
out[#out + 1] = key_replica
return out
"""

# KEYS: replica LRU zset, affinity-key key (or ""), block keys...
# ARGV: replica id, now, ttl, capacity, block-key prefix, block hashes...
# Returns the number of blocks evicted from this replica's LRU.
_RECORD = """
local zkey = KEYS[1]
local rid = ARGV[1]
local now = tonumber(ARGV[2])
local ttl = math.ceil(tonumber(ARGV[3]))
local cap = tonumber(ARGV[4])
local bprefix = ARGV[5]
for i = 3, #KEYS do
  redis.call('HSET', KEYS[i], rid, now)
  redis.call('EXPIRE', KEYS[i], ttl)
  redis.call('ZADD', zkey, now, ARGV[i + 3])
end
redis.call('EXPIRE', zkey, ttl)
if KEYS[2] ~= '' then
  redis.call('SET', KEYS[2], rid, 'EX', ttl)
end
local over = redis.call('ZCARD', zkey) - cap
local evicted = 0
if over > 0 then
  local old = redis.call('ZPOPMIN', zkey, over)
  for j = 1, #old, 2 do
    redis.call('HDEL', bprefix .. old[j], rid)
    evicted = evicted + 1
  end
end
return evicted
"""


def _text(value: Any) -> str:
    """Text of a content value: a string, a list of parts, or anything else as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text(part) for part in value)
    if isinstance(value, dict):
        if isinstance(value.get("text"), str):
            return str(value["text"])
        if "content" in value:
            return _text(value["content"])
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def render_prompt(endpoint: Endpoint, body: Mapping[str, Any]) -> str:
    """Canonical text of what the engine will see first, for prefix hashing.

    Not the chat template, but prefix-monotonic like it: two requests whose rendered
    prompts share a prefix share (most of) it in the engine's tokens too. What precedes
    the messages in the real prompt (tools, reasoning effort) comes first here as well.
    """
    head = {
        k: body[k]
        for k in ("tools", "reasoning_effort", "chat_template_kwargs", "instructions")
        if body.get(k) is not None
    }
    parts = [json.dumps(head, sort_keys=True, separators=(",", ":"))] if head else []
    if endpoint is Endpoint.chat:
        for message in body.get("messages") or []:
            if isinstance(message, Mapping):
                parts.append(f"{message.get('role', '')}{_SEP_FIELD}{_text(message.get('content'))}")
            else:
                parts.append(_text(message))
    elif endpoint is Endpoint.completions:
        parts.append(_text(body.get("prompt")))
    else:
        value = body.get("input")
        if isinstance(value, list):
            for item in value:
                if isinstance(item, Mapping):
                    role = item.get("role", item.get("type", ""))
                    parts.append(f"{role}{_SEP_FIELD}{_text(item.get('content', item))}")
                else:
                    parts.append(_text(item))
        else:
            parts.append(_text(value))
    return _SEP_MSG.join(parts)


def block_hashes(text: str, block_chars: int, max_blocks: int, scope: str = "") -> list[str]:
    """Chained hashes (hex) of the full ``block_chars`` blocks of ``text``, at most ``max_blocks``.

    ``scope`` (a tenant's cache salt) starts the chain: two scopes never share a hash."""
    out: list[str] = []
    previous = scope.encode()
    for i in range(min(len(text) // block_chars, max_blocks)):
        chunk = text[i * block_chars : (i + 1) * block_chars].encode("utf-8", "surrogatepass")
        digest = hashlib.blake2b(previous + chunk, digest_size=10).digest()
        out.append(digest.hex())
        previous = digest
    return out


@dataclass(frozen=True)
class AffinityLookup:
    """What the index knows about one prompt."""

    blocks: int
    """Full blocks of the prompt that were looked up."""

    matched: dict[str, int] = field(default_factory=dict)
    """Replica id -> leading blocks of this prompt it was last sent (only those > 0)."""

    key_replica: str | None = None
    """Replica that last served the request's affinity key (``prompt_cache_key``, session)."""

    @property
    def best_blocks(self) -> int:
        return max(self.matched.values(), default=0)


class PrefixIndex:
    """The Redis-backed prefix index of all models (see the module docstring)."""

    def __init__(self, redis: Any, config: RoutingConfig) -> None:
        self._redis = redis
        self._config = config
        self._lookup = redis.register_script(_LOOKUP)
        self._record = redis.register_script(_RECORD)
        self._guard = guard_of(redis)

    @property
    def available(self) -> bool:
        """False while the gateway's Redis circuit breaker is open (the index is skipped)."""
        return self._guard is None or not self._guard.is_open

    def _skipped(self) -> bool:
        if self.available:
            return False
        self._failed()
        return True

    def _failed(self) -> None:
        if self._guard is not None:
            self._guard.fallback("prefix_index")

    def _base(self, model: str) -> str:
        return "{" + f"{self._config.key_prefix}:{model}" + "}"

    def _key_key(self, model: str, affinity_key: str | None) -> str:
        if not affinity_key:
            return ""
        digest = hashlib.sha256(affinity_key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return f"{self._base(model)}:k:{digest}"

    async def lookup(
        self, model: str, hashes: Sequence[str], affinity_key: str | None, now: float | None = None
    ) -> AffinityLookup:
        """Longest cached prefix per replica, and the replica of the affinity key.

        Nothing is found (and Redis is not asked) while the breaker is open."""
        if self._skipped():
            return AffinityLookup(blocks=0)
        base = self._base(model)
        keys = [f"{base}:b:{h}" for h in hashes] + [self._key_key(model, affinity_key)]
        stamp = time.time() if now is None else now
        try:
            raw = await self._lookup(keys=keys, args=[stamp, self._config.index_ttl_s])
        except (RedisError, OSError):
            self._failed()
            raise
        items = [x.decode() if isinstance(x, bytes) else str(x) for x in raw]
        key_replica = items[-1] or None
        pairs = items[:-1]
        matched = {pairs[i]: int(pairs[i + 1]) for i in range(0, len(pairs), 2)}
        return AffinityLookup(blocks=len(hashes), matched=matched, key_replica=key_replica)

    async def record(
        self,
        model: str,
        replica: str,
        hashes: Sequence[str],
        affinity_key: str | None,
        now: float | None = None,
    ) -> int:
        """Note that ``replica`` was sent this prompt; returns blocks evicted from its LRU.

        Dropped (0) while the breaker is open."""
        if self._skipped():
            return 0
        base = self._base(model)
        keys = [f"{base}:r:{replica}", self._key_key(model, affinity_key)]
        keys += [f"{base}:b:{h}" for h in hashes]
        stamp = time.time() if now is None else now
        args: list[Any] = [
            replica,
            stamp,
            self._config.index_ttl_s,
            self._config.replica_capacity_blocks,
            f"{base}:b:",
            *hashes,
        ]
        try:
            return int(await self._record(keys=keys, args=args))
        except (RedisError, OSError):
            self._failed()
            raise
