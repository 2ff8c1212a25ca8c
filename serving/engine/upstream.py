"""An upstream OpenAI-compatible API (a cloud model) as one more :class:`EngineClient`.

The handoff policy (``serving.gateway.handoff``) sends requests here instead of to the
local engines. This module is transport only: HTTP with httpx (async, streaming), the
upstream's API key, its timeouts and its own concurrency limit, and the mapping of the
upstream's HTTP errors to our OpenAI error body. It follows the streaming contract of
:mod:`serving.engine.protocol`: one :class:`EngineJSON` (an answer, or an error before
any token), or :class:`EngineSSE` events ending in-band on errors after the first one.

Raised before the first byte, when there is no HTTP answer to map::

    UpstreamError (upstream, code, status, billable)
    ├── UpstreamBusyError         502  its concurrency limit is reached; nothing was sent
    ├── UpstreamUnavailableError  502  no connection, or it broke before an answer
    └── UpstreamTimeoutError      504  a timeout (below) ran out before the answer

``billable`` says whether the request may have reached the upstream (it was sent): the
handoff then keeps the budget's reservation charged, as the upstream bills it whether or
not the gateway waited for the answer.

Timeouts, each meaning what it says (``UpstreamConfig``):

- ``connect_timeout_s``: to open a connection (or get one from the pool); nothing was sent;
- ``first_byte_timeout_s``: from sending a *streamed* request to its headers and first
  event. A non-streamed request is bounded by the total instead: OpenAI-compatible
  servers send its headers once the whole answer is generated;
- ``read_timeout_s``: the longest gap between two chunks once the answer has begun (two
  events of a stream, two reads of a body);
- ``total_timeout_s``: from sending to the last byte.

Past one of them before the answer began (or in a non-streamed body), the request fails
with :class:`UpstreamTimeoutError`; in a stream, the stream ends with an in-band error
event (code ``upstream_timeout``).

An upstream HTTP error (any status >= 400) comes back as one :class:`EngineJSON` whose
body is our error body with ``error.upstream`` (its name) and ``error.upstream_status``
(its status) added; :func:`map_status` gives the status we answer with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any, Literal, TypeVar

import httpx

from serving.config import UpstreamConfig
from serving.engine.protocol import Endpoint, EngineClient, EngineJSON, EngineSSE, EngineStats
from serving.wire import REQUEST_ID_HEADER, error_body

__all__ = [
    "UpstreamBusyError",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
    "map_status",
    "upstream_error_body",
]

_PATHS = {
    Endpoint.chat: "/chat/completions",
    Endpoint.completions: "/completions",
    Endpoint.responses: "/responses",
}
#: Client errors the client should see as they are; anything else is the gateway's problem.
_PASS_THROUGH = frozenset({400, 404, 409, 413, 415, 422, 429})
_MAX_ERROR_BODY = 16 * 1024
_T = TypeVar("_T")
_Phase = Literal["first_byte", "read", "total"]
_MAX_MESSAGE = 1000


class UpstreamError(Exception):
    """The upstream gave no HTTP answer; ``status`` is what the gateway answers with."""

    status = 502
    code = "upstream_error"

    def __init__(self, upstream: str, message: str, *, billable: bool = False) -> None:
        super().__init__(message)
        self.upstream = upstream
        self.message = message
        self.billable = billable
        """The request was sent: the upstream may have run (and billed) it."""

    def as_engine_json(self) -> EngineJSON:
        """This error as our OpenAI error body (``upstream_status`` is null: no answer)."""
        return EngineJSON(self.status, upstream_error_body(self.upstream, None, self.message, code=self.code))


class UpstreamBusyError(UpstreamError):
    code = "upstream_busy"


class UpstreamUnavailableError(UpstreamError):
    code = "upstream_unavailable"


class UpstreamTimeoutError(UpstreamError):
    status = 504
    code = "upstream_timeout"


def map_status(upstream_status: int) -> int:
    """Our status for an upstream error status: client errors pass, the rest is 502/504.

    401 and 403 are not passed: they concern the gateway's key, not the client's.
    """
    if upstream_status in _PASS_THROUGH:
        return upstream_status
    if upstream_status == 504:
        return 504
    return 502


def upstream_error_body(
    upstream: str,
    upstream_status: int | None,
    message: str,
    *,
    kind: str = "upstream_error",
    param: str | None = None,
    code: str | None = "upstream_error",
) -> dict[str, Any]:
    """Our OpenAI error body for an upstream failure, with the upstream and its status."""
    return error_body(
        message[:_MAX_MESSAGE],
        kind,
        param=param,
        code=code,
        upstream=upstream,
        upstream_status=upstream_status,
    )


def _mapped_error(upstream: str, status: int, raw: bytes) -> EngineJSON:
    """An upstream HTTP error as our error body; the upstream's own fields are kept when sane."""
    message, kind, param, code = f"the upstream answered {status}", "upstream_error", None, "upstream_error"
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        data = json.loads(raw)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            if isinstance(err.get("message"), str):
                message = f"the upstream answered {status}: {err['message']}"
            if status in _PASS_THROUGH and isinstance(err.get("type"), str):
                kind = err["type"]
            if isinstance(err.get("param"), str):
                param = err["param"]
            if isinstance(err.get("code"), str):
                code = err["code"]
    body = upstream_error_body(upstream, status, message, kind=kind, param=param, code=code)
    return EngineJSON(map_status(status), body)


def _in_band(upstream: str, message: str, code: str) -> EngineSSE:
    body = upstream_error_body(upstream, None, message, code=code)
    return EngineSSE(f"data: {json.dumps(body, separators=(',', ':'))}\n\n")


class UpstreamClient(EngineClient):
    """One upstream API over one pooled httpx client.

    ``api_key`` is given by the caller (see :meth:`from_config`, which reads the variable
    named by ``api_key_env`` when the gateway starts, never at import).
    """

    def __init__(
        self,
        config: UpstreamConfig,
        api_key: str | None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        headers = {"Accept": "application/json, text/event-stream"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        limit = config.max_concurrent_requests
        self._http = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/"),
            headers=headers,
            # Reads are bounded per phase in ``_generate`` (first byte, gaps, total).
            timeout=httpx.Timeout(
                connect=config.connect_timeout_s,
                read=None,
                write=config.read_timeout_s,
                pool=config.connect_timeout_s,
            ),
            limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
            transport=transport,
            trust_env=False,
        )
        self.in_flight = 0

    @classmethod
    def from_config(cls, config: UpstreamConfig, environ: Mapping[str, str] | None = None) -> UpstreamClient:
        """A client whose key comes from the environment variable ``config.api_key_env``."""
        env = os.environ if environ is None else environ
        key = env.get(config.api_key_env) if config.api_key_env else None
        return cls(config, key or None)

    def has_capacity(self) -> bool:
        """Whether a request sent now stays within ``max_concurrent_requests``."""
        return self.in_flight < self.config.max_concurrent_requests

    async def aclose(self) -> None:
        await self._http.aclose()

    async def generate(
        self, endpoint: Endpoint, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncIterator[EngineJSON | EngineSSE]:
        if not self.has_capacity():
            raise UpstreamBusyError(self.name, f"the upstream {self.name!r} is at its concurrency limit")
        self.in_flight += 1
        try:
            async for item in self._generate(endpoint, body, headers):
                yield item
        finally:
            self.in_flight -= 1

    async def _generate(
        self, endpoint: Endpoint, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncIterator[EngineJSON | EngineSSE]:
        extra = {REQUEST_ID_HEADER: headers[REQUEST_ID_HEADER]} if REQUEST_ID_HEADER in headers else {}
        request = self._http.build_request("POST", _PATHS[endpoint], json=body, headers=extra)
        streaming = bool(body.get("stream"))
        clock = _Clock(self.config)
        response: httpx.Response | None = None
        try:
            try:
                # Until the answer begins: a stream's headers and first event within the
                # first-byte timeout; a non-streamed answer's headers within the total.
                first_byte: _Phase = "first_byte" if streaming else "total"
                response = await clock.within(self._http.send(request, stream=True), first_byte)
                if response.status_code >= 400:
                    raw = await self._read_body(response, clock, _MAX_ERROR_BODY)
                    yield _mapped_error(self.name, response.status_code, raw)
                    return
                if not streaming:
                    raw = await self._read_body(response, clock, None)
                else:
                    lines = response.aiter_lines()
                    first = await clock.within(_next_event(lines), first_byte)
            except _Expired as exc:
                raise UpstreamTimeoutError(self.name, exc.describe(self.name), billable=True) from None
            except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                raise UpstreamTimeoutError(
                    self.name, f"the upstream {self.name!r} timed out connecting: {type(exc).__name__}"
                ) from None
            except httpx.TimeoutException as exc:
                raise UpstreamTimeoutError(
                    self.name, f"the upstream {self.name!r} timed out: {type(exc).__name__}", billable=True
                ) from None
            except httpx.HTTPError as exc:
                raise UpstreamUnavailableError(
                    self.name,
                    f"the upstream {self.name!r} is unreachable: {type(exc).__name__}",
                    billable=not isinstance(exc, httpx.ConnectError),
                ) from None
            if not streaming:
                try:
                    answer = json.loads(raw)
                except ValueError:
                    answer = None
                if not isinstance(answer, dict):
                    raise UpstreamUnavailableError(
                        self.name, f"the upstream {self.name!r} sent no JSON object", billable=True
                    )
                yield EngineJSON(response.status_code, answer)
                return
            if first is None:
                raise UpstreamUnavailableError(
                    self.name, f"the upstream {self.name!r} closed the stream at once", billable=True
                )
            yield EngineSSE(first)
            while True:
                try:
                    event = await clock.within(_next_event(lines), "read")
                except _Expired as exc:
                    yield _in_band(self.name, exc.describe(self.name), "upstream_timeout")
                    return
                except httpx.TimeoutException:
                    yield _in_band(self.name, f"the upstream {self.name!r} timed out", "upstream_timeout")
                    return
                except httpx.HTTPError as exc:
                    yield _in_band(
                        self.name,
                        f"the upstream {self.name!r} broke off: {type(exc).__name__}",
                        "upstream_error",
                    )
                    return
                if event is None:
                    return
                yield EngineSSE(event)
        finally:
            if response is not None:
                await response.aclose()

    async def _read_body(self, response: httpx.Response, clock: _Clock, limit: int | None) -> bytes:
        """The body (its first ``limit`` bytes), each read within the gap timeout and all of
        it within the total."""
        chunks: list[bytes] = []
        size = 0
        reads = response.aiter_bytes()
        while limit is None or size < limit:
            chunk = await clock.within(anext(reads, None), "read")
            if chunk is None:
                break
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
        return data if limit is None else data[:limit]

    async def check_health(self, timeout_s: float) -> None:
        """The upstream answers ``GET /models`` with 2xx."""
        started = time.monotonic()
        response = await self._http.get("/models", timeout=timeout_s)
        if response.status_code >= 300:
            raise RuntimeError(
                f"upstream {self.name!r} answered {response.status_code} after "
                f"{time.monotonic() - started:.1f} s"
            )

    async def stats(self, timeout_s: float) -> EngineStats:
        return EngineStats(unfinished_requests=self.in_flight)


class _Expired(Exception):
    """A timeout of one request ran out: ``which`` (first byte, gap, total) after ``limit_s``."""

    def __init__(self, which: str, limit_s: float) -> None:
        super().__init__(which)
        self.which = which
        self.limit_s = limit_s

    def describe(self, upstream: str) -> str:
        what = {
            "first_byte": "did not begin its answer within",
            "read": "sent nothing for",
            "total": "did not finish its answer within",
        }[self.which]
        return f"the upstream {upstream!r} {what} {self.limit_s:g} s"


class _Clock:
    """The deadlines of one upstream request: each wait is bounded by its phase's timeout
    and by what is left of the total."""

    def __init__(self, config: UpstreamConfig) -> None:
        self._loop = asyncio.get_running_loop()
        started = self._loop.time()
        self._config = config
        self._deadline = started + config.total_timeout_s
        self._first_byte_at = started + config.first_byte_timeout_s

    async def within(self, work: Awaitable[_T], phase: _Phase) -> _T:
        """``work``, bounded by ``phase`` (``first_byte``: counted from the start of the
        request; ``read``: a gap, from now; ``total``: nothing more) and by the total;
        raises :class:`_Expired` naming the bound that ran out."""
        c = self._config
        bounds = [("total", self._deadline, c.total_timeout_s)]
        if phase == "first_byte":
            bounds.append(("first_byte", self._first_byte_at, c.first_byte_timeout_s))
        elif phase == "read":
            bounds.append(("read", self._loop.time() + c.read_timeout_s, c.read_timeout_s))
        which, at, limit_s = min(bounds, key=lambda b: b[1])
        try:
            async with asyncio.timeout_at(at):
                return await work
        except TimeoutError:
            raise _Expired(which, limit_s) from None


async def _next_event(lines: AsyncIterator[str]) -> str | None:
    """The next server-sent event (its lines and the blank line after), or None at the end."""
    buf: list[str] = []
    async for line in lines:
        if line:
            buf.append(line)
        elif buf:
            return "\n".join(buf) + "\n\n"
    return "\n".join(buf) + "\n\n" if buf else None
