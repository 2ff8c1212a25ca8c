"""The upstream client against a real OpenAI-compatible server on loopback (the simulated engine)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from loadtest.sim import EngineProfile
from loadtest.sim.background import serve_in_thread
from loadtest.sim.server import SimEngine
from serving.config import ConfigError, UpstreamConfig, parse_config
from serving.engine.protocol import Endpoint, EngineJSON, EngineSSE
from serving.engine.upstream import (
    UpstreamBusyError,
    UpstreamClient,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    map_status,
)

PROFILE = EngineProfile(step_base_s=0.0005, step_per_seq_s=0, prefill_per_token_s=0, default_max_tokens=4)
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[SimEngine, str]]:
    engine = SimEngine(PROFILE, "sim-cloud")
    with serve_in_thread(engine) as url:
        yield engine, url + "/v1"


@pytest.fixture(autouse=True)
def _reset(server: tuple[SimEngine, str]) -> None:
    server[0].faults.status, server[0].faults.delay_s, server[0].faults.api_key = None, 0.0, None


@pytest.fixture
async def client(server: tuple[SimEngine, str]) -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient(UpstreamConfig(name="cloud", base_url=server[1], first_byte_timeout_s=5), "sk-test")
    yield c
    await c.aclose()


async def _collect(
    client: UpstreamClient, body: dict[str, object], endpoint: Endpoint = Endpoint.chat
) -> list[object]:
    return [item async for item in client.generate(endpoint, dict(body), {"x-request-id": "r1"})]


async def test_non_streaming_answer_is_one_engine_json(client: UpstreamClient) -> None:
    items = await _collect(client, BODY)
    assert len(items) == 1
    assert isinstance(items[0], EngineJSON)
    assert items[0].status == 200
    assert items[0].body["usage"]["completion_tokens"] == 4
    assert client.in_flight == 0


async def test_stream_is_verbatim_events_ending_with_done(client: UpstreamClient) -> None:
    items = await _collect(client, {**BODY, "stream": True})
    assert all(isinstance(i, EngineSSE) for i in items)
    texts = [i.text for i in items if isinstance(i, EngineSSE)]
    assert all(t.startswith("data: ") and t.endswith("\n\n") for t in texts)
    assert texts[-1] == "data: [DONE]\n\n"
    content = "".join(
        json.loads(t[6:])["choices"][0]["delta"].get("content", "")
        for t in texts[:-1]
        if json.loads(t[6:])["choices"]
    )
    assert len(content.split()) == 4


async def test_responses_stream_keeps_event_lines(client: UpstreamClient) -> None:
    items = await _collect(client, {"model": "m", "input": "hi", "stream": True}, Endpoint.responses)
    texts = [i.text for i in items if isinstance(i, EngineSSE)]
    assert texts[0].startswith("event: response.created\ndata: {")
    assert texts[-1].startswith("event: response.completed\n")


async def test_api_key_is_sent(server: tuple[SimEngine, str], client: UpstreamClient) -> None:
    server[0].faults.api_key = "sk-test"
    items = await _collect(client, BODY)
    assert isinstance(items[0], EngineJSON)
    assert items[0].status == 200


def test_api_key_read_from_the_named_variable(server: tuple[SimEngine, str]) -> None:
    cfg = UpstreamConfig(name="cloud", base_url=server[1], api_key_env="MY_UPSTREAM_KEY")
    client = UpstreamClient.from_config(cfg, {"MY_UPSTREAM_KEY": "sk-from-env"})
    assert client._http.headers["authorization"] == "Bearer sk-from-env"
    none = UpstreamClient.from_config(cfg.model_copy(update={"api_key_env": None}), {"MY_UPSTREAM_KEY": "x"})
    assert "authorization" not in none._http.headers


@pytest.mark.parametrize(
    ("upstream", "ours"),
    [(400, 400), (404, 404), (429, 429), (401, 502), (403, 502), (500, 502), (503, 502), (504, 504)],
    ids=lambda v: str(v),
)
def test_status_mapping(upstream: int, ours: int) -> None:
    assert map_status(upstream) == ours


async def test_http_error_is_mapped_with_the_upstream_status(
    server: tuple[SimEngine, str], client: UpstreamClient
) -> None:
    server[0].faults.status = 503
    for body in (BODY, {**BODY, "stream": True}):
        (item,) = await _collect(client, body)
        assert isinstance(item, EngineJSON)
        assert item.status == 502
        error = item.body["error"]
        assert (error["upstream"], error["upstream_status"], error["type"]) == (
            "cloud",
            503,
            "upstream_error",
        )
        assert "simulated failure 503" in error["message"]


async def test_unreachable_upstream_raises_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = UpstreamClient(UpstreamConfig(name="down", base_url=f"http://127.0.0.1:{port}/v1"), None)
    try:
        with pytest.raises(UpstreamUnavailableError) as err:
            await _collect(client, BODY)
        assert err.value.as_engine_json().status == 502
        assert err.value.as_engine_json().body["error"]["code"] == "upstream_unavailable"
    finally:
        await client.aclose()


async def test_slow_upstream_raises_timeout(server: tuple[SimEngine, str]) -> None:
    server[0].faults.delay_s = 2.0
    cfg = UpstreamConfig(name="slow", base_url=server[1], first_byte_timeout_s=0.1)
    client = UpstreamClient(cfg, None)
    try:
        with pytest.raises(UpstreamTimeoutError) as err:
            await _collect(client, {**BODY, "stream": True})
        assert err.value.status == 504
        assert client.in_flight == 0
    finally:
        await client.aclose()


async def test_concurrency_limit_refuses_without_sending(server: tuple[SimEngine, str]) -> None:
    cfg = UpstreamConfig(name="one", base_url=server[1], max_concurrent_requests=1)
    client = UpstreamClient(cfg, None)
    try:
        first = client.generate(Endpoint.chat, {**BODY, "stream": True}, {})
        await anext(first)  # holds the only slot while streaming
        assert not client.has_capacity()
        with pytest.raises(UpstreamBusyError):
            await _collect(client, BODY)
        await first.aclose()  # closing the stream frees the slot
        assert client.has_capacity()
    finally:
        await client.aclose()


def test_config_names_must_resolve() -> None:
    base = {"models": [{"name": "a", "source": "x"}]}
    parse_config(base)  # no upstreams, no handoff: still valid
    with pytest.raises(ConfigError, match="no upstream named 'cloud'"):
        parse_config({**base, "handoff": {"upstream": "cloud"}})
    rule = {"name": "auto", "low": "a", "medium": "a", "high": "b"}
    with pytest.raises(ConfigError, match="high names no served model"):
        parse_config({**base, "handoff": {"virtual_models": [rule]}})
    with pytest.raises(ConfigError, match="api_key"):
        parse_config({**base, "upstreams": [{"name": "c", "base_url": "http://x", "api_key": "sk-1"}]})
