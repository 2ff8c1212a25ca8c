"""The HTTP API over the gateway policy, driven by the real OpenAI SDK in-process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from serving.engine.protocol import Endpoint, EngineSSE
from serving.gateway.context import RequestContext
from tests.fakes import FakeEngine
from tests.gateway import TestGateway, config_for

MODEL = "smollm2-135m-instruct"


class Stack(TestGateway):
    def __init__(self, engines: dict[str, FakeEngine], **gateway: Any) -> None:
        super().__init__(config_for(list(engines), gateway=gateway), engines)
        self.engines: dict[str, FakeEngine] = engines  # type: ignore[assignment]
        self.sdk = self.sdk_client = openai.AsyncOpenAI(
            base_url="http://gw/v1", api_key="x", http_client=self.http, max_retries=0
        )


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    engines = {MODEL: FakeEngine(), "gpt-oss-tiny": FakeEngine(healthy=False)}
    s = Stack(engines, max_body_bytes=2048, engine_ready_retry_after_s=7)
    await s.service.probe_once()
    yield s
    await s.close()


async def test_chat_non_streaming_through_sdk(stack: Stack) -> None:
    reply = await stack.sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "The capital of France is Paris."
    endpoint, body, headers = stack.engines[MODEL].calls[0]
    assert endpoint.value == "chat"
    assert body["request_id"].startswith(headers["x-request-id"])


@pytest.mark.parametrize("usage", [True, False])
async def test_chat_streaming_ends_with_done(stack: Stack, usage: bool) -> None:
    """The usage chunk comes when the client asks for it (as from OpenAI), not otherwise,
    although the gateway always asks the engine for it (for the tenant's charge)."""
    body: dict[str, object] = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    if usage:
        body["stream_options"] = {"include_usage": True}
    async with stack.http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"])
    assert text == "The capital of France is Paris."
    if usage:
        assert chunks[-1]["usage"]["completion_tokens"] == 6
    else:
        assert all("usage" not in c for c in chunks)
    assert stack.engines[MODEL].calls[-1][1]["stream_options"]["include_usage"] is True  # type: ignore[attr-defined]


async def test_sdk_stream_collects_in_order(stack: Stack) -> None:
    stream = await stack.sdk.chat.completions.create(
        model=MODEL, stream=True, messages=[{"role": "user", "content": "hi"}]
    )
    parts = [c.choices[0].delta.content async for c in stream if c.choices]
    assert "".join(p or "" for p in parts) == "The capital of France is Paris."


async def test_models_lists_every_configured_model(stack: Stack) -> None:
    models = await stack.sdk.models.list()
    assert sorted(m.id for m in models.data) == sorted([MODEL, "gpt-oss-tiny"])
    assert (await stack.sdk.models.retrieve(MODEL)).id == MODEL


async def test_unknown_model_is_404_with_openai_body(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        await stack.sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    body = err.value.body
    assert isinstance(body, dict)
    assert body["param"] == "model"
    assert body["code"] == "model_not_found"
    assert body["type"] == "invalid_request_error"


async def test_invalid_parameter_is_400_naming_param(stack: Stack) -> None:
    resp = await stack.http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "temperature": "hot", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "temperature"
    assert error["type"] == "invalid_request_error"
    assert error["request_id"] == resp.headers["x-request-id"]
    assert stack.engines[MODEL].calls == []  # rejected before any engine work


async def test_invalid_nested_parameter_names_its_path(stack: Stack) -> None:
    resp = await stack.http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": 5}]}
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["param"].startswith("messages[0]")


async def test_invalid_json_is_400(stack: Stack) -> None:
    resp = await stack.http.post(
        "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_json"


async def test_missing_model_is_400(stack: Stack) -> None:
    resp = await stack.http.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "model"


async def test_body_over_limit_is_413(stack: Stack) -> None:
    big = "x" * 4096
    resp = await stack.http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": big}]}
    )
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"


async def test_chunked_body_over_limit_is_413(stack: Stack) -> None:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 512

    resp = await stack.http.post("/v1/chat/completions", content=body())
    assert resp.status_code == 413


async def test_engine_not_ready_is_503_with_retry_after(stack: Stack) -> None:
    resp = await stack.http.post(
        "/v1/chat/completions",
        json={"model": "gpt-oss-tiny", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "7"
    assert resp.json()["error"]["code"] == "model_not_ready"
    health = await stack.http.get("/health")
    assert health.status_code == 503
    assert health.json()["models"]["gpt-oss-tiny"]["ready"] is False
    assert health.json()["models"][MODEL]["ready"] is True
    stack.engines["gpt-oss-tiny"].healthy = True
    await stack.service.probe_once()
    assert (await stack.http.get("/health")).status_code == 200


async def test_request_id_is_taken_or_generated(stack: Stack) -> None:
    given = await stack.http.get("/v1/models", headers={"X-Request-Id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = await stack.http.get("/v1/models")
    assert made.headers["x-request-id"].startswith("req-")
    unsafe = await stack.http.get("/v1/models", headers={"X-Request-Id": "a b"})
    assert unsafe.headers["x-request-id"] != "a b"


async def test_metrics_count_requests_by_model_endpoint_status(stack: Stack) -> None:
    await stack.sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    await stack.http.post("/v1/chat/completions", json={"model": "nope", "messages": []})
    text = (await stack.http.get("/metrics")).text
    assert f'oss_serving_requests_total{{endpoint="chat",model="{MODEL}",status="200"}} 1.0' in text
    assert "oss_serving_requests_in_flight" in text
    assert 'oss_serving_model_ready{model="gpt-oss-tiny"} 0.0' in text


async def test_stream_records_ttft_and_releases_in_flight(stack: Stack) -> None:
    stream = await stack.sdk.chat.completions.create(
        model=MODEL, stream=True, messages=[{"role": "user", "content": "hi"}]
    )
    async for _ in stream:
        pass
    ttft = stack.metrics.registry.get_sample_value(
        "oss_serving_time_to_first_token_seconds_count", {"model": MODEL, "endpoint": "chat"}
    )
    assert ttft == 1.0
    assert (
        stack.metrics.registry.get_sample_value(
            "oss_serving_requests_in_flight", {"model": MODEL, "endpoint": "chat"}
        )
        == 0.0
    )


async def test_closing_a_stream_cancels_the_engine_request(stack: Stack) -> None:
    engine = stack.engines[MODEL]
    engine.chunk_delay_s = 0.05
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ctx = RequestContext(request_id="rid-1", endpoint=Endpoint.chat, model=MODEL, body=body)
    answer = await stack.service.run(ctx, stack.service.open("rid-1", Endpoint.chat))
    assert answer.json is None
    stream = answer.stream
    assert stream is not None
    first = await anext(stream)
    assert first.startswith("data: ")
    assert engine.running == 1
    await stream.aclose()  # what the HTTP layer does when the client goes away
    assert engine.running == 0
    assert engine.cancelled == 1
    assert (
        stack.metrics.registry.get_sample_value(
            "oss_serving_requests_total", {"model": MODEL, "endpoint": "chat", "status": "499"}
        )
        == 1.0
    )


async def test_request_that_does_not_start_in_time_is_504() -> None:
    engine = FakeEngine()
    s = Stack({MODEL: engine}, request_timeout_s=0.2)
    await s.service.probe_once()

    async def never(*_args: object) -> AsyncIterator[EngineSSE]:
        await asyncio.sleep(5)
        yield EngineSSE("data: {}\n\n")

    engine.generate = never  # type: ignore[method-assign]
    resp = await s.http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    )
    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "timeout"
    await s.close()


async def test_scale_from_zero_model_is_held_not_refused() -> None:
    class Sleeping(FakeEngine):
        probes = 0

        async def check_health(self, timeout_s: float) -> None:
            self.probes += 1
            raise RuntimeError("no replica")

    engine = Sleeping()
    cfg = config_for([MODEL])
    cfg.models[0].topology.min_replicas = 0
    gw = TestGateway(cfg, {MODEL: engine})
    service, http = gw.service, gw.http
    async with http:
        await service.probe_once()
        assert engine.probes == 0  # a probe through the handle would wake the deployment
        health = (await http.get("/health")).json()
        assert health["models"][MODEL]["scales_from_zero"] is True
        assert health["ready"] is True
        resp = await http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        )
        assert resp.status_code == 200  # held until the engine answered, not refused with 503
