"""Background responses (``POST /v1/responses`` with ``background: true``), shared by every
gateway replica.

The request is checked as any other (the model, the tenant's rights, the previous
response, the storage quota), stored at once as a ``queued`` response, and answered with
it; the replica that took it then runs it as a task (:class:`Background`), through the
whole pipeline (:meth:`GatewayService.submit`: the tenant's limits, admission at its
priority, the engine, failover), as a stream. Everything another replica needs lives in
the shared Redis, per tenant (another tenant's id is a 404, as if it did not exist):

- the stored response (the store of :mod:`serving.gateway.responses`): ``GET`` shows
  ``queued``, then ``in_progress`` once the engine started it, then ``completed``,
  ``incomplete``, ``failed`` or ``cancelled``;
- its state (``status``, ``owner``): every change of status is one script that moves it
  only from the status its writer last saw, so a cancel and a finish racing each other
  end in exactly one of them;
- its stream events, each with OpenAI's ``sequence_number`` (0 is ``response.queued``),
  in a Redis stream: ``stream: true`` at creation, or ``GET /v1/responses/{id}?stream=true
  &starting_after=N`` through any replica, replays what was missed and follows live until
  the end. The events are appended by a script that refuses them once the response is
  over.

Cancel (``POST /v1/responses/{id}/cancel``, any replica) moves the state to
``cancelled``; the owner sees it (its next event is refused, or its watch finds it within
:data:`WATCH_S`) and cancels its task, which closes the engine stream: the engine request
is aborted. Deleting a running response cancels it first.

A replica that dies leaves its responses without heartbeats (``background_orphan_after_s``):
the sweeper of any other replica marks them ``failed`` (``server_error``), which ends their
streams. A replica stopped gracefully fails its running responses at once. 429 and 503
before the engine starts (rate limits, no ready engine, a full queue) are tried again with
backoff for ``background_queue_timeout_s``; the response stays ``queued`` meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from serving.config import ResponsesConfig
from serving.gateway.context import RequestContext
from serving.gateway.errors import GatewayError, InvalidRequestError
from serving.gateway.responses import (
    REDIS_DOWN,
    Conversations,
    RedisResponseStore,
    ResponseNotFoundError,
    StoredResponse,
    StoreUnavailableError,
    Turn,
    limit_error,
)
from serving.gateway.tenants import Tenant
from serving.metrics import GatewayMetrics
from serving.redis_conn import text
from serving.tasks import cancel_and_wait, raise_if_cancelling
from serving.wire import Endpoint, aclose_stream, dumps, error_event, error_fields, sse_data_events

if TYPE_CHECKING:
    from serving.gateway.service import Answer

__all__ = ["TERMINAL", "Background", "BackgroundOff", "BackgroundPort"]

log = logging.getLogger("oss_serving.background")

TERMINAL = frozenset({"completed", "incomplete", "failed", "cancelled"})
_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
WATCH_S = 0.25
"""How often a replica checks whether its running responses were cancelled elsewhere."""
POLL_S = 0.05
"""How often a stream reader looks for new events while there are none."""
APPEND_TRIES = 5
"""Tries of one append of events while Redis is slow or away (then they are lost for readers)."""
READER_REDIS_DOWN_S = 10.0
"""A stream reader that cannot reach Redis for this long ends with an error event (503)."""
SWEEP_EVERY = 2
"""The sweeper runs every this many heartbeats."""
RETRY_MAX_S = 10.0
STOPPED = "The gateway replica running this response stopped."
_RESPONSE_FIELDS = (
    "instructions",
    "max_output_tokens",
    "metadata",
    "parallel_tool_calls",
    "reasoning",
    "temperature",
    "text",
    "tool_choice",
    "tools",
    "top_p",
    "truncation",
    "user",
)
_DEFAULTS: dict[str, Any] = {"parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "metadata": {}}

# KEYS: state, record, index, events, live, active
# ARGV: expected status ('' when creating), new status, record, ttl ms, now ms, response id,
#       live member, events ttl ms, first event ('' for none), owner ('' keeps it),
#       the request to run ('' keeps it: what another replica needs to adopt it)
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if ARGV[1] == '' then
  if cur then return 0 end
elseif cur ~= ARGV[1] then
  return 0
end
local ttl = tonumber(ARGV[4])
local now = tonumber(ARGV[5])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ttl)
redis.call('ZADD', KEYS[3], now + ttl, ARGV[6])
redis.call('PEXPIRE', KEYS[3], ttl)
redis.call('HSET', KEYS[1], 'status', ARGV[2])
if ARGV[10] ~= '' then redis.call('HSET', KEYS[1], 'owner', ARGV[10]) end
if ARGV[11] and ARGV[11] ~= '' then redis.call('HSET', KEYS[1], 'request', ARGV[11]) end
redis.call('PEXPIRE', KEYS[1], ttl)
if ARGV[9] ~= '' then redis.call('XADD', KEYS[4], '0-1', 'data', ARGV[9]) end
local s = ARGV[2]
if s == 'completed' or s == 'incomplete' or s == 'failed' or s == 'cancelled' then
  redis.call('XADD', KEYS[4], '*', 'end', s)
  redis.call('ZREM', KEYS[5], ARGV[7])
  redis.call('ZREM', KEYS[6], ARGV[6])
else
  redis.call('ZADD', KEYS[5], now, ARGV[7])
  redis.call('ZADD', KEYS[6], now, ARGV[6])
  redis.call('PEXPIRE', KEYS[6], ttl)
end
redis.call('PEXPIRE', KEYS[4], ARGV[8])
return 1
"""

# KEYS: state, events; ARGV: events ttl ms, then (stream id, event) pairs
_APPEND = """
local cur = redis.call('HGET', KEYS[1], 'status')
if cur ~= 'queued' and cur ~= 'in_progress' then return 0 end
for i = 2, #ARGV, 2 do
  -- pcall: an id already there (a retry after a call that ran but timed out) is skipped
  redis.pcall('XADD', KEYS[2], ARGV[i], 'data', ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"""

# KEYS: state, live; ARGV: owner seen, new owner, live member, now ms
_ADOPT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
if (redis.call('HGET', KEYS[1], 'owner') or '') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
return 1
"""

Submit = Callable[..., Awaitable["Answer"]]
"""``GatewayService.submit``: ``(endpoint, body, tenant, request_id, *, turn=)``."""


class BackgroundPort(Protocol):
    """Background responses as the pipeline and the API use them."""

    def wants(self, ctx: RequestContext) -> bool: ...

    async def create(self, ctx: RequestContext) -> dict[str, Any] | AsyncIterator[str]: ...

    async def cancel(self, tenant: str, response_id: str) -> dict[str, Any]: ...

    async def delete(self, tenant: str, response_id: str) -> dict[str, Any]: ...

    async def events(self, tenant: str, response_id: str, starting_after: int) -> AsyncIterator[str]: ...


def _wants(ctx: RequestContext) -> bool:
    if ctx.endpoint is not Endpoint.responses or "background" not in ctx.body:
        return False
    value = ctx.body["background"]
    if value is not None and not isinstance(value, bool):
        raise InvalidRequestError("'background' must be a boolean.", param="background", code="invalid_type")
    return value is True


class BackgroundOff:
    """No store (no Redis, ``responses.store`` or ``responses.background`` off)."""

    def __init__(self, conversations: Conversations) -> None:
        self._conversations = conversations

    def wants(self, ctx: RequestContext) -> bool:
        if not _wants(ctx):
            return False
        raise InvalidRequestError(
            "Background responses are not enabled on this deployment (responses.background, "
            "which needs the response store); send the request without 'background'.",
            param="background",
            code="unsupported_parameter",
        )

    async def create(self, ctx: RequestContext) -> dict[str, Any] | AsyncIterator[str]:
        raise AssertionError("wants() refused it")

    async def cancel(self, tenant: str, response_id: str) -> dict[str, Any]:
        await self._conversations.retrieve(tenant, response_id)  # 404 if not its own
        raise _not_background()

    async def delete(self, tenant: str, response_id: str) -> dict[str, Any]:
        return await self._conversations.delete(tenant, response_id)

    async def events(self, tenant: str, response_id: str, starting_after: int) -> AsyncIterator[str]:
        await self._conversations.retrieve(tenant, response_id)
        raise _not_streamable()


def _not_background() -> InvalidRequestError:
    return InvalidRequestError(
        "Only responses created with background can be cancelled.", code="not_background"
    )


def _not_streamable() -> InvalidRequestError:
    return InvalidRequestError(
        "Only a background response can be streamed after its creation.",
        param="stream",
        code="unsupported_parameter",
    )


def _too_many(tenant: str, limit: int) -> GatewayError:
    return limit_error(
        f"Tenant '{tenant}' already has {limit} background responses queued or in progress "
        "(responses.max_background_per_tenant): wait for some to finish, or cancel some.",
        "too_many_background_responses",
    )


class _Keys:
    def __init__(self, store: RedisResponseStore, prefix: str) -> None:
        self._store = store
        self._prefix = f"{prefix}-bg"
        self.live = f"{self._prefix}:live"

    def record(self, tenant: str, response_id: str) -> str:
        return self._store.key(tenant, response_id)

    def index(self, tenant: str) -> str:
        return self._store.index(tenant)

    def state(self, tenant: str, response_id: str) -> str:
        return f"{self._prefix}:state:{tenant}:{response_id}"

    def events(self, tenant: str, response_id: str) -> str:
        return f"{self._prefix}:events:{tenant}:{response_id}"

    def active(self, tenant: str) -> str:
        return f"{self._prefix}:active:{tenant}"


def _member(tenant: str, response_id: str) -> str:
    return f"{tenant} {response_id}"  # response ids have no space: split at the last one


def _stream_id(sequence: int) -> str:
    return f"0-{sequence + 1}"


def _sse(data: Mapping[str, Any]) -> str:
    return f"event: {data.get('type', 'message')}\ndata: {dumps(data)}\n\n"


class _Run:
    """One background response running in this replica."""

    def __init__(self, tenant: Tenant, turn: Turn, stored: StoredResponse) -> None:
        self.tenant = tenant
        self.turn = turn
        self.stored = stored
        self.status = "queued"
        self.sequence = 0
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()

    @property
    def id(self) -> str:
        assert self.turn.response_id is not None
        return self.turn.response_id


class Background:
    """Background responses over the shared Redis (see the module docstring)."""

    def __init__(
        self,
        redis: Any,
        store: RedisResponseStore,
        conversations: Conversations,
        config: ResponsesConfig,
        metrics: GatewayMetrics,
        submit: Submit,
        tenant_of: Callable[[str], Tenant | None],
        *,
        owner: str | None = None,
    ) -> None:
        self._redis = redis
        self._tenant_of = tenant_of
        self._conversations = conversations
        self._config = config
        self._metrics = metrics
        self._submit = submit
        self._keys = _Keys(store, config.key_prefix)
        self._transition = redis.register_script(_TRANSITION)
        self._append = redis.register_script(_APPEND)
        self._adopt = redis.register_script(_ADOPT)
        self.owner = owner or uuid.uuid4().hex[:12]
        self._runs: dict[str, _Run] = {}
        self._loop_task: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._maintain(), name="background-responses")

    async def stop(self) -> None:
        """Graceful shutdown: the responses still waiting for the engine are handed to the
        other replicas (their heartbeat set to 0: the next sweep adopts them); the running
        ones get ``background_drain_s`` to finish, then fail (no replica would finish them)."""
        task, self._loop_task = self._loop_task, None
        await cancel_and_wait(task)
        queued = [run for run in self._runs.values() if run.status == "queued"]
        for run in queued:
            await cancel_and_wait(run.task)
        with contextlib.suppress(*REDIS_DOWN):
            if queued:
                await self._redis.zadd(
                    self._keys.live, {_member(r.tenant.id, r.id): 0 for r in queued}, xx=True
                )
        running = [run.task for run in self._runs.values() if run.task is not None and not run.task.done()]
        if running:
            await asyncio.wait(running, timeout=self._config.background_drain_s)
        left = [run for run in self._runs.values() if run not in queued]
        for run in left:
            await cancel_and_wait(run.task)
        for run in left:
            with contextlib.suppress(*REDIS_DOWN):
                await self._fail(run, "server_error", STOPPED, tries=1)
        self._runs.clear()

    @property
    def running(self) -> int:
        return len(self._runs)

    # ----------------------------------------------------------------- creation
    def wants(self, ctx: RequestContext) -> bool:
        return _wants(ctx)

    async def create(self, ctx: RequestContext) -> dict[str, Any] | AsyncIterator[str]:
        """Store ``ctx``'s request as a queued response and start it here; the queued
        response (JSON), or its event stream when the request asked for one."""
        if ctx.body.get("store") is False:
            raise InvalidRequestError(
                "Background responses must be stored: send 'store': true (the default) with 'background'.",
                param="store",
                code="invalid_value",
            )
        turn = await self._conversations.turn(ctx)
        assert turn is not None  # the store is on (else BackgroundOff)
        tenant = ctx.tenant
        now_ms = int(time.time() * 1000)
        try:
            active = await self._redis.zcount(
                self._keys.active(tenant.id), now_ms - self._orphan_ms(), "+inf"
            )
        except REDIS_DOWN:
            raise StoreUnavailableError() from None
        if active >= self._config.max_background_per_tenant:
            self._metrics.background.labels(outcome="refused").inc()
            raise _too_many(tenant.id, self._config.max_background_per_tenant)
        turn.response_id = f"resp_{uuid.uuid4().hex}"
        turn.background = True
        turn.store = False  # the runner stores it, through its state's transitions
        queued = self._conversations.present(turn, _queued_response(ctx.body, ctx.model))
        run = _Run(tenant, turn, StoredResponse(queued, turn.input, turn.context))
        event = {"type": "response.queued", "sequence_number": 0, "response": queued}
        body = {k: v for k, v in ctx.body.items() if k not in ("background", "previous_response_id")}
        body["stream"] = True
        request = dumps({"body": body, "request_id": ctx.request_id})
        try:
            created = await self._move(
                run, "", "queued", first_event=_sse(event), owner=self.owner, request=request
            )
        except REDIS_DOWN:
            raise StoreUnavailableError() from None
        if not created:  # an id collision: never in practice
            raise StoreUnavailableError()
        self._start(run, body, ctx.request_id)
        if ctx.body.get("stream") is True:
            return self._follow(tenant.id, run.id, -1)
        return queued

    def _start(self, run: _Run, body: dict[str, Any], request_id: str) -> None:
        self._runs[run.id] = run
        run.task = asyncio.create_task(self._run(run, body, request_id), name=f"background-{run.id}")

    # ----------------------------------------------------------------- the run
    async def _run(self, run: _Run, body: dict[str, Any], request_id: str) -> None:
        try:
            final = await self._generate(run, body, request_id)
            if final is not None:
                await self._finish(run, final)
        except asyncio.CancelledError:
            raise
        except GatewayError as exc:
            await self._fail(run, exc.code or exc.type, exc.message)
        except Exception:
            log.exception("background response %s failed", run.id)
            await self._fail(run, "server_error", "The response failed in the gateway.")
        finally:
            self._runs.pop(run.id, None)
            run.wake.set()

    async def _generate(self, run: _Run, body: dict[str, Any], request_id: str) -> dict[str, Any] | None:
        """Run the request, its events appended as they come; the final response, or None
        when it was cancelled or failed (already recorded)."""
        answer = await self._admitted(run, body, request_id)
        if answer is None:
            return None
        if answer.json is not None:
            payload = answer.json.body
            if answer.json.status < 400 and payload.get("object") == "response":
                return self._conversations.present(run.turn, payload)
            fields = error_fields(payload) or ("The request failed.", "server_error", None, None)
            await self._fail(run, fields[3] or fields[1], fields[0])
            return None
        stream = answer.stream
        assert stream is not None
        final: dict[str, Any] | None = None
        try:
            async for chunk in stream:
                events: list[dict[str, Any]] = []
                for data in sse_data_events(chunk):
                    if data.get("type") == "error" or ("error" in data and "type" not in data):
                        fields = error_fields(data) or ("The engine failed.", "server_error", None, None)
                        if not await self._append_events(run, events):
                            return None
                        await self._fail(run, fields[3] or fields[1], fields[0])
                        return None
                    run.sequence += 1
                    data["sequence_number"] = run.sequence
                    events.append(data)
                    if data.get("type") in _FINAL_EVENTS and isinstance(data.get("response"), dict):
                        final = data["response"]
                if run.status == "queued" and events and not await self._move(run, "queued", "in_progress"):
                    return None  # cancelled meanwhile
                if not await self._append_events(run, events):
                    return None
                if final is not None:
                    return final
        finally:
            await aclose_stream(stream)
        await self._fail(run, "server_error", "The engine's stream ended before the response was complete.")
        return None

    async def _admitted(self, run: _Run, body: dict[str, Any], request_id: str) -> Answer | None:
        """The pipeline's answer; 429 and 503 tried again with backoff (still queued)."""
        give_up = time.monotonic() + self._config.background_queue_timeout_s
        delay = 0.5
        while True:
            try:
                return await self._submit(
                    Endpoint.responses, dict(body), run.tenant, request_id, turn=run.turn
                )
            except GatewayError as exc:
                if exc.status not in (429, 503) or time.monotonic() >= give_up:
                    raise
                hint = _retry_after(exc)
                wait = min(max(hint or 0.0, delay) * random.uniform(0.8, 1.2), RETRY_MAX_S)
                log.info(
                    "background response %s: %d (%s); again in %.1f s", run.id, exc.status, exc.code, wait
                )
                await asyncio.sleep(min(wait, max(give_up - time.monotonic(), 0.0)))
                delay = min(delay * 2, RETRY_MAX_S)

    async def _append_events(self, run: _Run, events: list[dict[str, Any]]) -> bool:
        """Append ``events``; False when the response is over (cancelled elsewhere)."""
        if not events:
            return True
        args: list[Any] = [int(self._config.background_events_ttl_s * 1000)]
        for data in events:
            args += [_stream_id(int(data["sequence_number"])), _sse(data)]
        keys = [self._keys.state(run.tenant.id, run.id), self._keys.events(run.tenant.id, run.id)]
        delay = 0.05
        for attempt in range(APPEND_TRIES):
            try:
                appended = bool(await self._append(keys=keys, args=args))
                break
            except REDIS_DOWN as exc:  # (a slow call may have run: the script skips repeats)
                raise_if_cancelling()
                if attempt == APPEND_TRIES - 1:  # the events are lost for readers; the run goes on
                    log.warning("background response %s: events not kept (Redis: %s)", run.id, exc)
                    return True
                await asyncio.sleep(delay)
                delay *= 2
        run.wake.set()
        run.wake = asyncio.Event()
        return appended

    async def _finish(self, run: _Run, final: dict[str, Any]) -> None:
        status = str(final.get("status") or "completed")
        status = status if status in TERMINAL else "completed"
        run.stored = StoredResponse(final, run.turn.input, run.turn.context)
        if await self._move_retrying(run, status):
            self._metrics.background.labels(outcome=status).inc()

    async def _fail(self, run: _Run, code: str | None, message: str, *, tries: int = 8) -> None:
        response = {
            **run.stored.response,
            "status": "failed",
            "error": {"code": code or "server_error", "message": message},
        }
        run.stored = StoredResponse(response, run.turn.input, run.turn.context)
        if await self._move_retrying(run, "failed", tries):
            self._metrics.background.labels(outcome="failed").inc()

    async def _move_retrying(self, run: _Run, status: str, tries: int = 8) -> bool:
        """A final transition, tried again while Redis is down (the sweeper is the backstop)."""
        delay = 0.2
        for attempt in range(tries):
            try:
                return await self._move(run, run.status, status)
            except REDIS_DOWN as exc:
                if attempt == tries - 1:
                    raise
                raise_if_cancelling()
                log.warning("background response %s: %s not recorded yet (Redis: %s)", run.id, status, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        return False

    async def _move(
        self,
        run: _Run,
        expected: str,
        status: str,
        *,
        first_event: str = "",
        owner: str = "",
        request: str = "",
    ) -> bool:
        """Move ``run``'s state from ``expected`` to ``status`` with its stored response."""
        if status != "queued":
            run.stored.response["status"] = status
        tenant = run.tenant.id
        args = self._transition_args(tenant, run.id, expected, status, run.stored, first_event, owner)
        moved = await self._transition(keys=self._state_keys(tenant, run.id), args=[*args, request])
        if moved:
            run.status = status
        return bool(moved)

    def _state_keys(self, tenant: str, response_id: str) -> list[str]:
        k = self._keys
        return [
            k.state(tenant, response_id),
            k.record(tenant, response_id),
            k.index(tenant),
            k.events(tenant, response_id),
            k.live,
            k.active(tenant),
        ]

    def _transition_args(
        self,
        tenant: str,
        response_id: str,
        expected: str,
        status: str,
        stored: StoredResponse,
        first_event: str = "",
        owner: str = "",
    ) -> list[Any]:
        return [
            expected,
            status,
            stored.encode(),
            int(self._config.ttl_s * 1000),
            int(time.time() * 1000),
            response_id,
            _member(tenant, response_id),
            int(self._config.background_events_ttl_s * 1000),
            first_event,
            owner,
        ]

    # ----------------------------------------------------------------- other replicas' view
    async def cancel(self, tenant: str, response_id: str) -> dict[str, Any]:
        """Cancel a queued or running background response (through any replica): it is
        ``cancelled`` when this returns, and its engine request is being aborted. A
        response already over is returned as it is."""
        for _ in range(5):
            stored, status = await self._read(tenant, response_id)
            if stored.response.get("background") is not True:
                raise _not_background()
            if status in TERMINAL or status is None:
                return stored.response
            stored.response["status"] = "cancelled"
            try:
                moved = await self._transition(
                    keys=self._state_keys(tenant, response_id),
                    args=self._transition_args(tenant, response_id, status, "cancelled", stored),
                )
            except REDIS_DOWN:
                raise StoreUnavailableError() from None
            if moved:
                self._metrics.background.labels(outcome="cancelled").inc()
                run = self._runs.get(response_id)
                if run is not None and run.task is not None:
                    run.task.cancel()  # the owner is this replica: abort now
                return stored.response
        raise StoreUnavailableError()  # it kept changing under us: retry

    async def delete(self, tenant: str, response_id: str) -> dict[str, Any]:
        """Delete a stored response; a running background one is cancelled first."""
        try:
            status = await self._redis.hget(self._keys.state(tenant, response_id), "status")
        except REDIS_DOWN:
            raise StoreUnavailableError() from None
        if status is not None and text(status) not in TERMINAL:
            await self.cancel(tenant, response_id)
        deleted = await self._conversations.delete(tenant, response_id)
        with contextlib.suppress(*REDIS_DOWN):
            keys = self._keys
            await self._redis.delete(keys.state(tenant, response_id), keys.events(tenant, response_id))
        return deleted

    async def events(self, tenant: str, response_id: str, starting_after: int) -> AsyncIterator[str]:
        """A background response's events after ``starting_after`` (-1: from the first),
        then live until it ends (404 when it is not the tenant's; 400 when it is not a
        background response)."""
        stored, _ = await self._read(tenant, response_id)
        if stored.response.get("background") is not True:
            raise _not_streamable()
        return self._follow(tenant, response_id, starting_after)

    async def _follow(self, tenant: str, response_id: str, after: int) -> AsyncIterator[str]:
        key = self._keys.events(tenant, response_id)
        last = f"0-{after + 1}" if after >= 0 else "0-0"
        idle_since = time.monotonic()
        down_since: float | None = None
        while True:
            run = self._runs.get(response_id)
            wake = run.wake if run is not None else None  # taken before reading: no event missed
            try:
                entries = await self._redis.xrange(key, min=f"({last}", max="+", count=200)
                down_since = None
            except REDIS_DOWN:
                entries = None
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > READER_REDIS_DOWN_S:
                    yield error_event(StoreUnavailableError().body(None), endpoint=Endpoint.responses)
                    return
            for entry_id, fields in entries or ():
                last = text(entry_id)
                data = {text(k): v for k, v in fields.items()}
                if "end" in data:
                    return
                yield text(data.get("data", b""))
            if entries:
                idle_since = time.monotonic()
                continue
            if time.monotonic() - idle_since > 1.0:  # nothing for a while: is it still there?
                idle_since = time.monotonic()
                with contextlib.suppress(*REDIS_DOWN):
                    state = await self._redis.hget(self._keys.state(tenant, response_id), "status")
                    if state is None or (text(state) in TERMINAL and not await self._redis.exists(key)):
                        return
            if wake is not None:  # it runs here: woken by its next events
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await wake.wait()
            else:
                await asyncio.sleep(POLL_S)

    async def _read(self, tenant: str, response_id: str) -> tuple[StoredResponse, str | None]:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.get(self._keys.record(tenant, response_id))
                pipe.hget(self._keys.state(tenant, response_id), "status")
                raw, status = await pipe.execute()
        except REDIS_DOWN:
            raise StoreUnavailableError() from None
        stored = StoredResponse.decode(raw) if raw is not None else None
        if stored is None:
            raise ResponseNotFoundError(response_id)
        return stored, text(status) if status is not None else None

    # ----------------------------------------------------------------- upkeep
    def _orphan_ms(self) -> int:
        return int(self._config.background_orphan_after_s * 1000)

    async def _maintain(self) -> None:
        """Watch for cancels made elsewhere; heartbeats; the sweeper of orphans."""
        beat_every = max(1, round(self._config.background_orphan_after_s / 6 / WATCH_S))
        tick = 0
        while True:
            await asyncio.sleep(WATCH_S)
            tick += 1
            try:
                await self._watch()
                if tick % beat_every == 0:
                    await self._heartbeat()
                if tick % (beat_every * SWEEP_EVERY) == 0:
                    await self.sweep()
            except REDIS_DOWN as exc:
                raise_if_cancelling()
                log.debug("background upkeep: Redis: %s", exc)
            except Exception:
                log.exception("background upkeep failed")

    async def _watch(self) -> None:
        runs = list(self._runs.values())
        if not runs:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for run in runs:
                pipe.hget(self._keys.state(run.tenant.id, run.id), "status")
            statuses = await pipe.execute()
        for run, status in zip(runs, statuses, strict=True):
            if status is not None and text(status) in TERMINAL and run.task is not None:
                log.info("background response %s was %s elsewhere: stopping it", run.id, text(status))
                run.task.cancel()

    async def _heartbeat(self) -> None:
        runs = list(self._runs.values())
        if not runs:
            return
        now = int(time.time() * 1000)
        async with self._redis.pipeline(transaction=False) as pipe:
            for run in runs:
                pipe.zadd(self._keys.live, {_member(run.tenant.id, run.id): now}, xx=True)
                pipe.zadd(self._keys.active(run.tenant.id), {run.id: now}, xx=True)
            await pipe.execute()

    async def _adopted(self, tenant_id: str, response_id: str, stored: StoredResponse) -> bool:
        """Take over a queued response whose replica is gone (or handed it over at its
        stop): True when it runs here now."""
        state = self._keys.state(tenant_id, response_id)
        owner, raw = await self._redis.hmget(state, ["owner", "request"])
        tenant = self._tenant_of(tenant_id)
        if raw is None or tenant is None:
            return False  # nothing to run it with (or the tenant is gone): it fails
        try:
            request = json.loads(raw)
            body, request_id = dict(request["body"]), str(request["request_id"])
        except (ValueError, KeyError, TypeError):
            return False
        seen = text(owner) if owner is not None else ""
        member = _member(tenant_id, response_id)
        now = int(time.time() * 1000)
        if not await self._adopt(keys=[state, self._keys.live], args=[seen, self.owner, member, now]):
            return True  # another replica took it (or it moved on): not ours to fail
        response = stored.response
        turn = Turn(
            store=False,
            client_store=True,
            previous_response_id=response.get("previous_response_id"),
            context=stored.context,
            input=stored.input,
            response_id=response_id,
            background=True,
        )
        self._start(_Run(tenant, turn, stored), body, request_id)
        self._metrics.background.labels(outcome="adopted").inc()
        log.info("background response %s of tenant %s: adopted from replica %s", response_id, tenant_id, seen)
        return True

    async def sweep(self) -> int:
        """Fail the background responses whose replica stopped its heartbeats; how many."""
        cutoff = int(time.time() * 1000) - self._orphan_ms()
        members = await self._redis.zrangebyscore(self._keys.live, "-inf", cutoff, start=0, num=50)
        failed = 0
        for raw in members:
            member = text(raw)
            tenant, _, response_id = member.rpartition(" ")
            if response_id in self._runs:
                continue  # ours and alive (a heartbeat is late)
            try:
                stored, status = await self._read(tenant, response_id)
            except (ResponseNotFoundError, StoreUnavailableError):
                stored, status = None, None
            if stored is None or status is None or status in TERMINAL:
                await self._redis.zrem(self._keys.live, member)
                continue
            if status == "queued" and await self._adopted(tenant, response_id, stored):
                continue  # it had not reached an engine: it runs here now
            stored.response["status"] = "failed"
            stored.response["error"] = {
                "code": "server_error",
                "message": "The gateway replica running this response stopped before it finished.",
            }
            moved = await self._transition(
                keys=self._state_keys(tenant, response_id),
                args=self._transition_args(tenant, response_id, status, "failed", stored),
            )
            if moved:
                failed += 1
                self._metrics.background.labels(outcome="lost").inc()
                log.warning("background response %s of tenant %s: its replica was lost", response_id, tenant)
        return failed


def _queued_response(body: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The response object shown while the request waits (OpenAI's fields, as asked)."""
    response: dict[str, Any] = {
        "id": "",
        "object": "response",
        "created_at": int(time.time()),
        "status": "queued",
        "background": True,
        "model": body.get("model") or model,
        "output": [],
        "error": None,
        "incomplete_details": None,
        "usage": None,
    }
    for name in _RESPONSE_FIELDS:
        value = body.get(name)
        response[name] = value if value is not None else _DEFAULTS.get(name)
    return response


def _retry_after(exc: GatewayError) -> float | None:
    value = (exc.headers or {}).get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
