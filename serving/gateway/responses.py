"""Stored Responses: ``store``, ``previous_response_id``, retrieve, delete, input items.

vLLM keeps its Responses store in one engine process (and without bound), so behind a
router a ``previous_response_id`` lands on a replica that never saw it. Here the gateway
keeps the conversation instead, in the shared Redis, per tenant:

- A request with ``store`` (OpenAI's default) is answered as usual, then its answer and
  its input are kept for ``responses.ttl_s``: the stored answer is what the client got,
  saved before the client has it whole (before the JSON answer is returned, before the
  stream's ``response.completed`` event is sent), so the next turn can follow at once
  through any gateway replica.
- A request with ``previous_response_id`` gets that response's context replayed: the
  items before it, its own input and its output items (messages, reasoning, function
  calls) become the head of ``input``. Whichever backend serves the turn (any engine
  replica, or an upstream after handoff) receives the whole conversation and
  ``store: false``: nothing depends on state kept by an engine or a provider. As with
  OpenAI, ``instructions`` are not carried over.
- A tenant sees only its own responses: another tenant's id is a 404, as if it did not
  exist (the keys carry the tenant id). Each tenant keeps at most
  ``responses.max_stored_per_tenant`` live responses: beyond it a request that would store
  one more gets a 429 ``storage_quota_exceeded`` before any work.

Redis trouble: reading a previous response fails closed (503 ``store_unavailable``: the
conversation cannot be rebuilt); saving fails open (the answer is sent, a warning logged).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.exceptions import RedisError

from serving.config import ResponsesConfig
from serving.gateway.context import RequestContext
from serving.gateway.errors import GatewayError, InvalidRequestError, RateLimitError
from serving.wire import Endpoint, aclose_stream, dumps

__all__ = [
    "Conversations",
    "NoStore",
    "RedisResponseStore",
    "ResponseNotFoundError",
    "ResponseStore",
    "StoredResponse",
    "Turn",
]

log = logging.getLogger("oss_serving.responses")

REDIS_DOWN = (RedisError, OSError, asyncio.TimeoutError)

_FINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")
_STORED_STATUSES = frozenset({"completed", "incomplete", "failed"})
_OWN_ID_ROLES = frozenset({"user", "system", "developer"})
"""Input messages whose ``id`` the gateway gave them (for ``input_items``): not sent on."""


class ResponseNotFoundError(GatewayError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, response_id: str, *, param: str | None = None) -> None:
        what = "Previous response" if param == "previous_response_id" else "Response"
        super().__init__(
            f"{what} with id '{response_id[:200]}' not found.",
            param=param,
            code="previous_response_not_found" if param else "response_not_found",
        )


class StoreUnavailableError(GatewayError):
    status = 503
    type = "server_error"

    def __init__(self) -> None:
        super().__init__(
            "The response store is unavailable; retry shortly.",
            code="store_unavailable",
            headers={"Retry-After": "1"},
        )


@dataclass
class StoredResponse:
    """One stored response: the answer as the client got it, this turn's own input items,
    and the items that came before them in the conversation."""

    response: dict[str, Any]
    input: list[dict[str, Any]]
    context: list[dict[str, Any]] = field(default_factory=list)

    def encode(self) -> str:
        return dumps({"response": self.response, "input": self.input, "context": self.context})

    @classmethod
    def decode(cls, raw: str | bytes) -> StoredResponse | None:
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("response"), dict):
            return None
        items = [data.get(k) for k in ("input", "context")]
        if not all(isinstance(v, list) for v in items):
            return None
        return cls(data["response"], list(data["input"]), list(data["context"]))

    def conversation(self) -> list[dict[str, Any]]:
        """Every item of the conversation up to and including this response's output."""
        return [*self.context, *self.input, *output_as_input(self.response.get("output"))]


class ResponseStore(Protocol):
    async def get(self, tenant: str, response_id: str) -> StoredResponse | None: ...

    async def put(self, tenant: str, stored: StoredResponse) -> bool: ...

    async def delete(self, tenant: str, response_id: str) -> bool: ...

    async def count(self, tenant: str) -> int: ...


class NoStore:
    """The store turned off (``responses.store: false``) or no Redis: nothing is kept."""

    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        return None

    async def put(self, tenant: str, stored: StoredResponse) -> bool:
        return False

    async def delete(self, tenant: str, response_id: str) -> bool:
        return False

    async def count(self, tenant: str) -> int:
        return 0


class RedisResponseStore:
    """``<prefix>:<tenant>:<id>`` holds one response (JSON, with the TTL);
    ``<prefix>:<tenant>`` is the tenant's index (id -> expiry ms) the quota counts."""

    def __init__(self, redis: Any, config: ResponsesConfig) -> None:
        self._redis = redis
        self._config = config

    def key(self, tenant: str, response_id: str) -> str:
        return f"{self._config.key_prefix}:{tenant}:{response_id}"

    def index(self, tenant: str) -> str:
        return f"{self._config.key_prefix}:{tenant}"

    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        raw = await self._redis.get(self.key(tenant, response_id))
        return StoredResponse.decode(raw) if raw is not None else None

    async def put(self, tenant: str, stored: StoredResponse) -> bool:
        response_id = str(stored.response.get("id") or "")
        if not response_id:
            return False
        raw = stored.encode()
        if len(raw) > self._config.max_response_bytes:
            log.warning(
                "response %s of tenant %s not stored: %d bytes, more than responses.max_response_bytes",
                response_id,
                tenant,
                len(raw),
            )
            return False
        ttl_ms = int(self._config.ttl_s * 1000)
        now = int(time.time() * 1000)
        index = self.index(tenant)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self.key(tenant, response_id), raw, px=ttl_ms)
            pipe.zadd(index, {response_id: now + ttl_ms})
            pipe.zremrangebyscore(index, "-inf", now)
            pipe.pexpire(index, ttl_ms)
            await pipe.execute()
        return True

    async def delete(self, tenant: str, response_id: str) -> bool:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.key(tenant, response_id))
            pipe.zrem(self.index(tenant), response_id)
            deleted, _ = await pipe.execute()
        return bool(deleted)

    async def count(self, tenant: str) -> int:
        return int(await self._redis.zcount(self.index(tenant), int(time.time() * 1000), "+inf"))


@dataclass
class Turn:
    """One Responses request as the store sees it."""

    store: bool
    """Whether its answer is kept."""
    client_store: bool
    """The client's ``store`` (shown in the answer: the backend was sent ``false``)."""
    previous_response_id: str | None
    context: list[dict[str, Any]]
    """The conversation before this turn (replayed at the head of ``input``)."""
    input: list[dict[str, Any]]
    """This turn's own input items, with ids."""
    response_id: str | None = None
    """The id the answer is shown with (a background response's, given at creation)."""
    background: bool = False
    """A background response: stored by its runner (``background.py``), not here."""


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def input_items(raw: Any) -> list[dict[str, Any]]:
    """A request's ``input`` as a list of items, each with an id (as OpenAI lists them)."""
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": raw}]}]
    items: list[dict[str, Any]] = []
    for item in raw if isinstance(raw, list) else ():
        if not isinstance(item, dict):
            continue
        out = dict(item)
        if "role" in out and "type" not in out:
            out["type"] = "message"
        if isinstance(out.get("content"), str) and out.get("type") == "message":
            kind = "output_text" if out.get("role") == "assistant" else "input_text"
            out["content"] = [{"type": kind, "text": out["content"]}]
        out.setdefault("id", _item_id("msg" if out.get("type") == "message" else "item"))
        items.append(out)
    return items


def output_as_input(output: Any) -> list[dict[str, Any]]:
    """A response's output items as input items of the next turn (``None`` fields out)."""
    items: list[dict[str, Any]] = []
    for item in output if isinstance(output, list) else ():
        if isinstance(item, dict) and item.get("type"):
            items.append({k: v for k, v in item.items() if v is not None})
    return items


def for_backend(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items as sent to an engine or upstream: without the ids the gateway gave them."""
    out = []
    for item in items:
        if item.get("type") == "message" and item.get("role") in _OWN_ID_ROLES:
            item = {k: v for k, v in item.items() if k != "id"}
        out.append(item)
    return out


class Conversations:
    """The store's policy in the pipeline (see the module docstring)."""

    def __init__(self, store: ResponseStore, config: ResponsesConfig, *, enabled: bool) -> None:
        self._store = store
        self._config = config
        self.enabled = enabled

    # ------------------------------------------------------------ before the request runs
    async def prepare(self, ctx: RequestContext) -> Turn | None:
        """Replay the previous response's conversation into ``ctx.body``, check the quota;
        the request's :class:`Turn`, or None when the store has nothing to do with it.
        A turn already set on ``ctx`` (a background response's) is replayed as it is."""
        if ctx.endpoint is not Endpoint.responses:
            return None
        turn = ctx.turn if isinstance(ctx.turn, Turn) else await self.turn(ctx)
        if turn is None:
            return None
        engine_body = {k: v for k, v in ctx.body.items() if k not in ("previous_response_id", "background")}
        if turn.previous_response_id or turn.client_store:
            engine_body["input"] = for_backend([*turn.context, *turn.input])
        engine_body["store"] = False  # the gateway keeps it; no engine or provider does
        ctx.body = engine_body
        return turn

    async def turn(self, ctx: RequestContext) -> Turn | None:
        """The request's :class:`Turn`: its previous response read (404 when the tenant has
        none by that id), the storage quota checked; None when the store is off and the
        request does not need it."""
        body = ctx.body
        client_store = body.get("store") is not False
        previous = body.get("previous_response_id")
        if previous is not None and not isinstance(previous, str):
            raise InvalidRequestError(
                "'previous_response_id' must be a string.", param="previous_response_id", code="invalid_type"
            )
        if not self.enabled:
            if previous:
                raise InvalidRequestError(
                    "'previous_response_id' needs stored responses, which are off on this "
                    "deployment (responses.store).",
                    param="previous_response_id",
                    code="unsupported_parameter",
                )
            return None
        tenant = ctx.tenant.id
        context: list[dict[str, Any]] = []
        try:
            if previous:
                stored = await self._store.get(tenant, previous)
                if stored is None:
                    raise ResponseNotFoundError(previous, param="previous_response_id")
                context = stored.conversation()
            if client_store and await self._store.count(tenant) >= self._config.max_stored_per_tenant:
                raise _quota_exceeded(tenant, self._config.max_stored_per_tenant)
        except REDIS_DOWN:
            raise StoreUnavailableError() from None
        own = input_items(body.get("input"))
        return Turn(client_store, client_store, previous or None, context, own)

    # ------------------------------------------------------------ after it ran
    def present(self, turn: Turn, response: dict[str, Any]) -> dict[str, Any]:
        """The response as the client's request would have it (``store``, the previous id)."""
        shown = {**response, "store": turn.client_store, "previous_response_id": turn.previous_response_id}
        if turn.response_id is not None:
            shown["id"] = turn.response_id
        if turn.background:
            shown["background"] = True
        return shown

    async def keep(self, turn: Turn, tenant: str, response: Mapping[str, Any]) -> None:
        """Store the answer (fails open: a Redis error is logged, the answer still goes out)."""
        if not turn.store or turn.background or response.get("status") not in _STORED_STATUSES:
            return
        try:
            await self._store.put(tenant, StoredResponse(dict(response), turn.input, turn.context))
        except REDIS_DOWN as exc:
            log.warning("response %s of tenant %s not stored (Redis: %s)", response.get("id"), tenant, exc)

    async def answer(self, turn: Turn, tenant: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
        """A JSON answer: presented, and stored before the client has it."""
        if status != 200 or body.get("object") != "response":
            return body
        shown = self.present(turn, body)
        await self.keep(turn, tenant, shown)
        return shown

    async def stream(self, turn: Turn, tenant: str, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """A stream: each event's response object presented; the final one stored before
        the event that carries it is sent."""
        try:
            async for text in chunks:
                if '"response"' in text:
                    text = await self._events(turn, tenant, text)
                yield text
        finally:
            await aclose_stream(chunks)

    async def _events(self, turn: Turn, tenant: str, text: str) -> str:
        out: list[str] = []
        for event in text.split("\n\n"):
            if not event.strip():
                continue
            lines = event.split("\n")
            for i, line in enumerate(lines):
                if not line.startswith("data:") or '"response"' not in line:
                    continue
                try:
                    data = json.loads(line[5:])
                except ValueError:
                    continue
                if not isinstance(data, dict) or not isinstance(data.get("response"), dict):
                    continue
                data["response"] = self.present(turn, data["response"])
                if data.get("type") in _FINAL_EVENTS:
                    await self.keep(turn, tenant, data["response"])
                lines[i] = "data: " + dumps(data)
            out.append("\n".join(lines) + "\n\n")
        return "".join(out)

    # ------------------------------------------------------------ the stored objects
    async def retrieve(self, tenant: str, response_id: str) -> dict[str, Any]:
        return (await self._stored(tenant, response_id)).response

    async def delete(self, tenant: str, response_id: str) -> dict[str, Any]:
        try:
            deleted = self.enabled and await self._store.delete(tenant, response_id)
        except REDIS_DOWN:
            raise StoreUnavailableError() from None
        if not deleted:
            raise ResponseNotFoundError(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    async def input_items(
        self,
        tenant: str,
        response_id: str,
        *,
        limit: int = 20,
        order: str = "desc",
        after: str | None = None,
    ) -> dict[str, Any]:
        """OpenAI's list object of the response's own input items (cursor ``after``)."""
        items = list((await self._stored(tenant, response_id)).input)
        if order == "desc":
            items.reverse()
        if after is not None:
            ids = [str(i.get("id")) for i in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        page = items[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0].get("id") if page else None,
            "last_id": page[-1].get("id") if page else None,
            "has_more": len(items) > len(page),
        }

    async def _stored(self, tenant: str, response_id: str) -> StoredResponse:
        try:
            stored = await self._store.get(tenant, response_id) if self.enabled else None
        except REDIS_DOWN:
            raise StoreUnavailableError() from None
        if stored is None:
            raise ResponseNotFoundError(response_id)
        return stored


def limit_error(message: str, code: str, kind: str = "requests") -> GatewayError:
    """A 429 for a tenant over one of the store's bounds (``code`` says which)."""
    error = RateLimitError(message, limit="requests")
    error.code = code
    error.type = kind
    return error


def _quota_exceeded(tenant: str, limit: int) -> GatewayError:
    return limit_error(
        f"Tenant '{tenant}' already stores {limit} responses (responses.max_stored_per_tenant): "
        "delete some, wait for them to expire, or send 'store': false.",
        "storage_quota_exceeded",
        "storage",
    )
