"""Nothing leaks: a request's lease, gauge and engine request are given back on every path.

The gateway runs in process (built by ``build_gateway``, admission in its local mode with
capacity 1, so one leaked lease blocks every later request). Each test cuts a request at
a different await and then checks that the slot is free (a new request is admitted at
once), that ``requests_in_flight`` and the queue's leases are back to 0, and that the
engine runs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from serving.engine.protocol import Endpoint
from serving.gateway.context import RequestContext
from serving.gateway.errors import GatewayError
from tests.fakes import FakeEngine
from tests.gateway import TestGateway, ask, config_for

MODEL = "m"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}


@pytest.fixture
async def gw() -> AsyncIterator[TestGateway]:
    engine = FakeEngine("one two three four five six seven eight")
    engine.chunk_delay_s = 0.01
    cfg = config_for(
        [MODEL],
        queue={"default_capacity": 1, "max_wait_s": 2},
        routing={"enabled": True, "strategy": "prefix"},
    )
    g = TestGateway(cfg, {MODEL: engine})
    await g.service.probe_once()
    yield g
    await g.close()


def engine_of(gw: TestGateway) -> FakeEngine:
    engine = gw.engines[MODEL]
    assert isinstance(engine, FakeEngine)
    return engine


async def assert_nothing_held(gw: TestGateway) -> None:
    """Every slot free, every gauge back to 0, no engine request running."""
    for _ in range(100):  # closes run shielded; let them finish
        if gw.service.flights.open_count == 0 and engine_of(gw).running == 0:
            break
        await asyncio.sleep(0.01)
    snap = await gw.service.admission.snapshot(MODEL)
    assert snap.in_use == 0
    assert gw.metric("oss_serving_requests_in_flight", model=MODEL, endpoint="chat") == 0
    assert gw.service.flights.open_count == 0
    assert engine_of(gw).running == 0
    # capacity 1: a request is admitted at once only if no lease leaked
    _, status, _ = await asyncio.wait_for(ask(gw.service, dict(CHAT)), 1.0)
    assert status == 200


async def test_cancel_during_the_prefix_lookup_releases_the_lease(gw: TestGateway) -> None:
    entered = asyncio.Event()

    async def slow_route(headers: dict[str, str]) -> None:
        entered.set()
        await asyncio.sleep(10)  # a Redis that stalls

    caching = gw.service._prompt_caching
    begin = caching.begin

    def begin_slow(ctx: RequestContext) -> Any:
        req = begin(ctx)
        req.route = slow_route  # type: ignore[method-assign]
        return req

    caching.begin = begin_slow  # type: ignore[method-assign]
    task = asyncio.create_task(ask(gw.service, dict(CHAT)))
    await asyncio.wait_for(entered.wait(), 1)
    assert (await gw.service.admission.snapshot(MODEL)).in_use == 1  # granted, then stuck
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    caching.begin = begin  # type: ignore[method-assign]
    await assert_nothing_held(gw)
    assert gw.metric("oss_serving_requests_total", model=MODEL, endpoint="chat", status="499") == 1


async def test_stream_that_is_never_iterated_is_closed(gw: TestGateway) -> None:
    ctx = RequestContext("never-read", Endpoint.chat, MODEL, dict(STREAM))
    answer = await gw.service.run(ctx, gw.service.open("never-read", Endpoint.chat))
    assert answer.stream is not None
    assert (await gw.service.admission.snapshot(MODEL)).in_use == 1
    await answer.stream.aclose()  # what SSEResponse does however the response ended
    await assert_nothing_held(gw)
    assert engine_of(gw).cancelled == 1


async def _asgi_request(
    gw: TestGateway, body: bytes, *, disconnect_after: float | None, spec: str = "2.3"
) -> list[dict[str, Any]]:
    """Call the ASGI app directly; the client disconnects ``disconnect_after`` s after sending."""
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        if disconnect_after is None:
            await asyncio.sleep(3600)
        else:
            await asyncio.sleep(disconnect_after)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"gw")],
        "client": ("127.0.0.1", 1),
        "server": ("gw", 80),
    }
    await gw.app(scope, receive, send)
    return sent


async def test_client_gone_before_the_body_iterator_starts(gw: TestGateway) -> None:
    """The disconnect is already queued when the response starts (Starlette then cancels
    the body iterator before its first step: a plain generator's ``finally`` never runs)."""
    import json

    sent = await _asgi_request(gw, json.dumps(STREAM).encode(), disconnect_after=0)
    assert sent == [] or sent[0]["type"] == "http.response.start"
    await assert_nothing_held(gw)


async def test_client_gone_mid_stream(gw: TestGateway) -> None:
    import json

    sent = await _asgi_request(gw, json.dumps(STREAM).encode(), disconnect_after=0.03)
    assert sent[0]["type"] == "http.response.start"
    await assert_nothing_held(gw)
    assert engine_of(gw).cancelled >= 1


async def test_random_disconnects_leave_nothing_behind(gw: TestGateway) -> None:
    """Many clients, each cut at a random moment (before headers, right after, mid-stream),
    or never reading at all; then the slot is free and nothing is counted in flight."""
    import json

    rng = random.Random(7)
    body = json.dumps(STREAM).encode()

    async def one() -> None:
        choice = rng.random()
        if choice < 0.3:  # cut the whole request (ASGI task cancelled) at a random point
            task = asyncio.create_task(_asgi_request(gw, body, disconnect_after=None))
            await asyncio.sleep(rng.uniform(0, 0.08))
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        else:
            await _asgi_request(gw, body, disconnect_after=rng.uniform(0, 0.08))

    await asyncio.gather(*(one() for _ in range(60)))
    await assert_nothing_held(gw)


async def test_leaked_flight_is_reclaimed_and_reported(
    gw: TestGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream dropped without being closed (a bug) is found by the safety net."""
    ctx = RequestContext("leaky-1", Endpoint.chat, MODEL, dict(STREAM))
    answer = await gw.service.run(ctx, gw.service.open("leaky-1", Endpoint.chat))
    assert answer.stream is not None
    assert (await gw.service.admission.snapshot(MODEL)).in_use == 1
    gw.service.flights.max_age_s = 0.0
    with caplog.at_level(logging.WARNING, logger="oss_serving.gateway"):
        assert await gw.service.flights.reap() == 1
    assert any("leaky-1" in r.getMessage() for r in caplog.records)
    assert gw.metric("oss_serving_requests_reclaimed_total", model=MODEL) == 1
    gw.service.flights.max_age_s = 3600.0
    await assert_nothing_held(gw)


async def test_shutdown_closes_what_is_open(gw: TestGateway) -> None:
    ctx = RequestContext("open-at-stop", Endpoint.chat, MODEL, dict(STREAM))
    answer = await gw.service.run(ctx, gw.service.open("open-at-stop", Endpoint.chat))
    assert answer.stream is not None
    await gw.service.flights.close_all()
    assert gw.service.flights.open_count == 0
    assert (await gw.service.admission.snapshot(MODEL)).in_use == 0
    assert engine_of(gw).running == 0


async def test_engine_failure_mid_stream_is_in_band_and_releases(gw: TestGateway) -> None:
    engine = engine_of(gw)

    async def broken(*_args: Any) -> AsyncIterator[Any]:
        from serving.engine.protocol import EngineSSE

        yield EngineSSE('data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n')
        raise RuntimeError("CUDA error: an illegal memory access at /opt/vllm/worker.py:123")

    engine.generate = broken  # type: ignore[method-assign]
    _ctx, status, text = await ask(gw.service, dict(STREAM), request_id="mid-1")
    assert status == 502
    event = [line for line in text.split("\n") if line.startswith("data: {") and "error" in line][-1]
    import json

    error = json.loads(event[6:])["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}
    assert (error["type"], error["code"], error["request_id"]) == ("server_error", "engine_error", "mid-1")
    assert "CUDA" not in error["message"]
    assert "/opt/" not in error["message"]
    del engine.generate
    await assert_nothing_held(gw)


# ------------------------------------------------ errors before the first byte, shutdown
@pytest.fixture
async def short_gw() -> AsyncIterator[TestGateway]:
    """As ``gw``, with a request time limit short enough to wait out."""
    cfg = config_for(
        [MODEL],
        gateway={"request_timeout_s": 0.3},
        queue={"default_capacity": 1, "max_wait_s": 2},
        routing={"enabled": True, "strategy": "prefix"},
    )
    g = TestGateway(cfg, {MODEL: FakeEngine("one two three")})
    await g.service.probe_once()
    yield g
    await g.close()


def _failing(engine: FakeEngine, mode: str) -> Any:
    """A ``generate`` that fails before its first item, counted in ``engine.running``."""

    async def generate(*_args: Any) -> AsyncIterator[Any]:
        from serving.engine.protocol import EngineJSON

        engine.running += 1
        try:
            if mode == "hang":
                await asyncio.sleep(30)
            if mode == "raise":
                raise RuntimeError("worker died")
            status = {"json502": 502, "json500": 500, "json400": 400}[mode]
            kind = "BadRequestError" if status < 500 else "InternalServerError"
            yield EngineJSON(status, {"error": {"message": "no", "type": kind, "param": None, "code": None}})
        except asyncio.CancelledError:
            engine.cancelled += 1
            raise
        finally:
            engine.running -= 1

    return generate


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    ("mode", "status"),
    [("json502", 502), ("json500", 500), ("raise", 502), ("hang", 504), ("json400", 400)],
)
async def test_error_before_the_first_byte_releases(
    short_gw: TestGateway, mode: str, status: int, stream: bool
) -> None:
    """The engine answers an error (5xx, 4xx), fails, or never answers (the time limit):
    the answer is a JSON error, and the slot, the gauge and the engine request are freed."""
    gw = short_gw
    engine = engine_of(gw)
    engine.generate = _failing(engine, mode)  # type: ignore[method-assign]
    rid = f"early-{mode}-{stream}"
    try:  # an error answer, or an error the API layer turns into one
        _ctx, got, body = await asyncio.wait_for(
            ask(gw.service, dict(STREAM if stream else CHAT), request_id=rid), 5.0
        )
    except GatewayError as exc:
        got, body = exc.status, exc.body(rid)
    finally:
        del engine.generate
    assert got == status
    assert isinstance(body, dict)
    assert body["error"]["request_id"] == rid
    if mode == "hang":
        assert body["error"]["code"] == "timeout"
    count = gw.metric("oss_serving_requests_total", model=MODEL, endpoint="chat", status=str(status))
    assert count == 1  # closed once
    await assert_nothing_held(gw)


async def test_the_replica_shutdown_closes_flights_and_releases_leases(gw: TestGateway) -> None:
    """Serve's shutdown path (``serve_app.Gateway.__del__`` -> ``GatewayService.stop``)
    with a stream half read and a request queued behind it (capacity 1): the queued one
    gets 503 ``shutting_down``, the stream's flight is closed (503), its lease released,
    its engine request cancelled, the gauges back to 0."""
    from serving import serve_app
    from serving.gateway.errors import OverloadedError

    engine = engine_of(gw)
    engine.chunk_delay_s = 0.2
    ctx = RequestContext("open-at-stop", Endpoint.chat, MODEL, dict(STREAM))
    answer = await gw.service.run(ctx, gw.service.open("open-at-stop", Endpoint.chat))
    assert answer.stream is not None
    assert (await anext(answer.stream)).startswith("data: ")
    queued = asyncio.create_task(ask(gw.service, dict(CHAT), request_id="queued-at-stop"))
    for _ in range(100):
        if sum((await gw.service.admission.snapshot(MODEL)).depth.values()) == 1:
            break
        await asyncio.sleep(0.01)
    assert sum((await gw.service.admission.snapshot(MODEL)).depth.values()) == 1
    assert gw.metric("oss_serving_requests_in_flight", model=MODEL, endpoint="chat") == 2

    class _Redis:
        closed = False

        async def aclose(self) -> None:
            self.closed = True

    # The user class under Serve's ingress wrapper: its destructor, as Serve calls it.
    user_class = next(c for c in serve_app.Gateway.__mro__[1:] if c.__module__ == serve_app.__name__)
    # (on a stand-in for the replica: a real instance's own garbage collection would call
    # the async destructor again, unawaited)
    replica = SimpleNamespace(_service=gw.service, _redis=_Redis())
    await user_class.__del__(replica)

    with pytest.raises(OverloadedError) as refused:
        await queued
    assert refused.value.code == "shutting_down"
    assert replica._redis.closed
    assert gw.service.flights.open_count == 0
    snap = await gw.service.admission.snapshot(MODEL)
    assert (snap.in_use, sum(snap.depth.values())) == (0, 0)
    assert gw.metric("oss_serving_requests_in_flight", model=MODEL, endpoint="chat") == 0
    for _ in range(100):
        if engine.running == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.running == 0
    assert engine.cancelled == 1
    await answer.stream.aclose()  # the response ends afterwards: nothing counted twice
    assert gw.metric("oss_serving_requests_total", model=MODEL, endpoint="chat", status="503") == 2
