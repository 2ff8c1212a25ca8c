"""The upstream client's four timeouts, each on a real loopback server.

- connect: a listener whose accept backlog is full (the handshake never completes);
- first byte: the simulated engine holding its headers (``faults.delay_s``), and a server
  that sends headers at once but its first event late;
- gap (``read_timeout_s``) and total: a server that sends a body, or a stream, in pieces
  with scripted pauses.

A non-streamed answer is not bounded by the first-byte timeout (OpenAI-compatible servers
send its headers once it is complete), only by the gap between reads and the total. A
timeout after the request was sent says ``billable`` (the upstream may bill it).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from loadtest.sim import EngineProfile
from loadtest.sim.background import serve_in_thread
from loadtest.sim.server import SimEngine
from serving.config import UpstreamConfig
from serving.engine.protocol import Endpoint, EngineJSON, EngineSSE
from serving.engine.upstream import UpstreamClient, UpstreamTimeoutError

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "x" * 200}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
}


@dataclass
class Pacing:
    """How the scripted server answers the next request: pauses before each piece."""

    headers_after_s: float = 0.0
    """Pause before the headers."""
    pieces: int = 4
    pauses_s: list[float] = field(default_factory=lambda: [0.0])
    """Pause before piece i (the last value repeats); piece 0 comes after the headers."""

    def pause(self, i: int) -> float:
        return self.pauses_s[min(i, len(self.pauses_s) - 1)]


def _paced_app(pacing: Pacing) -> Starlette:
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        await asyncio.sleep(pacing.headers_after_s)
        if body.get("stream"):

            async def events() -> AsyncIterator[bytes]:
                for i in range(pacing.pieces):
                    await asyncio.sleep(pacing.pause(i))
                    chunk = {"choices": [{"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        raw = json.dumps(ANSWER).encode()
        size = -(-len(raw) // pacing.pieces)

        async def body_pieces() -> AsyncIterator[bytes]:
            for i in range(pacing.pieces):
                await asyncio.sleep(pacing.pause(i))
                yield raw[i * size : (i + 1) * size]

        return StreamingResponse(body_pieces(), media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@contextmanager
def _serve(app: Starlette) -> Iterator[str]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    try:
        while not server.started:
            assert time.monotonic() < deadline, "the paced server did not start"
            assert thread.is_alive(), "the paced server stopped"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def paced() -> Iterator[tuple[Pacing, str]]:
    pacing = Pacing()
    with _serve(_paced_app(pacing)) as url:
        yield pacing, url


@pytest.fixture(autouse=True)
def _reset_pacing(paced: tuple[Pacing, str]) -> None:
    paced[0].headers_after_s, paced[0].pieces, paced[0].pauses_s = 0.0, 4, [0.0]


@pytest.fixture(scope="module")
def sim() -> Iterator[tuple[SimEngine, str]]:
    profile = EngineProfile(step_base_s=0.0005, step_per_seq_s=0, prefill_per_token_s=0, default_max_tokens=4)
    engine = SimEngine(profile, "sim-cloud")
    with serve_in_thread(engine) as url:
        yield engine, url + "/v1"


@pytest.fixture(autouse=True)
def _reset_sim(sim: tuple[SimEngine, str]) -> None:
    sim[0].faults.delay_s = 0.0


def _client(url: str, **timeouts: float) -> UpstreamClient:
    return UpstreamClient(UpstreamConfig(name="cloud", base_url=url, **timeouts), None)  # type: ignore[arg-type]


async def _collect(client: UpstreamClient, body: dict[str, Any]) -> list[EngineJSON | EngineSSE]:
    try:
        return [item async for item in client.generate(Endpoint.chat, dict(body), {"x-request-id": "t"})]
    finally:
        await client.aclose()


async def _times_out(client: UpstreamClient, body: dict[str, Any]) -> tuple[UpstreamTimeoutError, float]:
    started = time.monotonic()
    with pytest.raises(UpstreamTimeoutError) as err:
        await _collect(client, body)
    assert client.in_flight == 0
    return err.value, time.monotonic() - started


def _in_band_error(items: list[EngineJSON | EngineSSE]) -> dict[str, Any]:
    last = items[-1]
    assert isinstance(last, EngineSSE)
    error: dict[str, Any] = json.loads(last.text.removeprefix("data: "))["error"]
    return error


# ------------------------------------------------------------------ connect
async def test_connect_timeout_is_a_504_that_was_never_sent() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # fill the accept backlog: the next handshake never completes
            filler = socket.socket()
            filler.setblocking(False)
            with suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        await asyncio.sleep(0.05)
        client = _client(f"http://127.0.0.1:{port}/v1", connect_timeout_s=0.2, first_byte_timeout_s=5)
        error, took = await _times_out(client, BODY)
        assert took < 2.0
        assert (error.status, error.code) == (504, "upstream_timeout")
        assert "connecting" in error.message
        assert not error.billable  # nothing reached the upstream
    finally:
        for s in fillers:
            s.close()
        listener.close()


# ------------------------------------------------------------------ first byte
async def test_first_byte_timeout_bounds_a_streams_headers(sim: tuple[SimEngine, str]) -> None:
    sim[0].faults.delay_s = 1.0
    error, took = await _times_out(_client(sim[1], first_byte_timeout_s=0.2), {**BODY, "stream": True})
    assert took < 2.0  # not the 1 s the upstream takes, give or take a loaded machine
    assert "did not begin its answer within 0.2 s" in error.message
    assert error.billable  # it was sent: the upstream may bill it


async def test_first_byte_timeout_bounds_a_streams_first_event(paced: tuple[Pacing, str]) -> None:
    """Headers after 0.2 s, the first event 0.2 s later: each in time on its own, but the
    first byte of the answer (its first event) comes after 0.4 s > 0.3 s. The headers do not
    restart the clock."""
    paced[0].headers_after_s, paced[0].pauses_s = 0.2, [0.2]
    error, took = await _times_out(_client(paced[1], first_byte_timeout_s=0.3), {**BODY, "stream": True})
    assert took < 2.0
    assert "did not begin its answer within 0.3 s" in error.message
    paced[0].pauses_s = [0.0]  # its first event with the headers: in time, served
    items = await _collect(_client(paced[1], first_byte_timeout_s=1.5), {**BODY, "stream": True})
    assert [isinstance(i, EngineSSE) and "error" not in i.text for i in items] == [True] * 5


async def test_first_byte_timeout_does_not_bound_a_non_streamed_answer(sim: tuple[SimEngine, str]) -> None:
    """The simulated engine (like OpenAI) sends a non-streamed answer's headers when it is
    complete: a long answer is not a 504 while it keeps within the total."""
    sim[0].faults.delay_s = 0.6
    items = await _collect(_client(sim[1], first_byte_timeout_s=0.1, total_timeout_s=5), BODY)
    assert len(items) == 1
    assert isinstance(items[0], EngineJSON)
    assert items[0].status == 200
    assert items[0].body["usage"]["completion_tokens"] == 4


async def test_a_slow_body_is_read_while_its_gaps_are_short(paced: tuple[Pacing, str]) -> None:
    """Headers at once, then the body in five reads 0.15 s apart (0.75 s): longer than the
    first-byte timeout, every gap within the read timeout."""
    paced[0].pieces, paced[0].pauses_s = 5, [0.15]
    started = time.monotonic()
    client = _client(paced[1], first_byte_timeout_s=0.2, read_timeout_s=0.5, total_timeout_s=5)
    items = await _collect(client, BODY)
    assert time.monotonic() - started > 0.6
    assert isinstance(items[0], EngineJSON)
    assert items[0].body == ANSWER


# ------------------------------------------------------------------ gaps
async def test_a_gap_in_a_non_streamed_body_is_a_504(paced: tuple[Pacing, str]) -> None:
    paced[0].pauses_s = [0.0, 0.0, 0.8]
    client = _client(paced[1], first_byte_timeout_s=5, read_timeout_s=0.2, total_timeout_s=5)
    error, took = await _times_out(client, BODY)
    assert took < 2.0
    assert "sent nothing for 0.2 s" in error.message
    assert error.billable


async def test_a_gap_in_a_stream_ends_it_in_band(paced: tuple[Pacing, str]) -> None:
    paced[0].pauses_s = [0.0, 0.0, 0.8]
    started = time.monotonic()
    items = await _collect(
        _client(paced[1], first_byte_timeout_s=5, read_timeout_s=0.2), {**BODY, "stream": True}
    )
    assert time.monotonic() - started < 2.0
    assert [i.text.count(" w") for i in items[:-1] if isinstance(i, EngineSSE)] == [1, 1]
    error = _in_band_error(items)
    assert (error["code"], error["upstream"]) == ("upstream_timeout", "cloud")
    assert "sent nothing for 0.2 s" in error["message"]


# ------------------------------------------------------------------ total
async def test_total_timeout_bounds_a_steady_non_streamed_body(paced: tuple[Pacing, str]) -> None:
    paced[0].pieces, paced[0].pauses_s = 10, [0.1]  # 1 s in all, no gap above 0.1 s
    client = _client(paced[1], first_byte_timeout_s=5, read_timeout_s=0.5, total_timeout_s=0.4)
    error, took = await _times_out(client, BODY)
    assert 0.35 < took < 2.0
    assert "did not finish its answer within 0.4 s" in error.message
    assert error.billable


async def test_total_timeout_ends_a_steady_stream_in_band(paced: tuple[Pacing, str]) -> None:
    paced[0].pieces, paced[0].pauses_s = 20, [0.1]  # 2 s of events, 0.1 s apart
    started = time.monotonic()
    client = _client(paced[1], first_byte_timeout_s=5, read_timeout_s=0.5, total_timeout_s=0.5)
    items = await _collect(client, {**BODY, "stream": True})
    assert 0.45 < time.monotonic() - started < 2.0
    assert 1 <= len(items) - 1 < 20  # some events, then the error
    error = _in_band_error(items)
    assert error["code"] == "upstream_timeout"
    assert "did not finish its answer within 0.5 s" in error["message"]
