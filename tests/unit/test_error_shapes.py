"""Every error status the gateway can produce: one OpenAI body shape, the request id, no
internal text, and exactly one log line with the request id, the status and the tenant.

The gateway runs in process (``build_gateway`` + the FastAPI app) with authentication on,
a fake engine that fails in the ways engines fail, and the OpenAI error body checked for
each status: ``{"error": {"message", "type", "param", "code", "request_id"}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from loadtest.sim import EngineProfile
from loadtest.sim.background import serve_in_thread
from loadtest.sim.server import SimEngine
from serving.engine.protocol import EngineJSON, EngineSSE
from serving.gateway.tenants import hash_key
from tests.fakes import FakeEngine
from tests.gateway import TestGateway, config_for

MODEL, OTHER = "m", "other"
MSG = [{"role": "user", "content": "hi"}]
KEYS = {"team": "key-team", "slow": "key-slow", "narrow": "key-narrow"}
LEAKS = re.compile(r"Traceback|File \"|/opt/|site-packages|Error\(|RuntimeError|KeyError|secret-internal")


class Failing(FakeEngine):
    """Fails as told: ``mode`` is read by every call."""

    mode = "ok"

    async def generate(
        self, endpoint: Any, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncIterator[Any]:
        if self.mode == "raise":
            raise RuntimeError("secret-internal: worker died at /opt/vllm/worker.py:99")
        if self.mode == "json500":
            yield EngineJSON(
                500, {"error": {"message": "secret-internal KeyError('x')", "type": "InternalServerError"}}
            )
            return
        if self.mode == "json400":
            yield EngineJSON(
                400,
                {
                    "error": {
                        "message": "This model's maximum context length is 2048 tokens.",
                        "type": "BadRequestError",
                        "param": "messages",
                        "code": None,
                    }
                },
            )
            return
        if self.mode == "hang":
            await asyncio.sleep(30)
        if self.mode == "slow_stream":
            yield EngineSSE('data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n')
            await asyncio.sleep(30)
        async for item in super().generate(endpoint, body, headers):
            yield item


@pytest.fixture
async def gw() -> AsyncIterator[TestGateway]:
    cfg = config_for(
        [MODEL, OTHER],
        auth={"required": True},
        gateway={"max_body_bytes": 4096, "request_timeout_s": 0.3, "engine_ready_retry_after_s": 5},
        queue={"default_capacity": 1, "max_wait_s": 0.2},
        tenants=[
            {"id": "team", "api_key_sha256": [hash_key(KEYS["team"])], "max_output_tokens": 64},
            {"id": "slow", "api_key_sha256": [hash_key(KEYS["slow"])], "requests_per_minute": 1},
            {"id": "narrow", "api_key_sha256": [hash_key(KEYS["narrow"])], "models": [MODEL]},
        ],
    )
    engines = {MODEL: Failing(), OTHER: FakeEngine(healthy=False)}
    g = TestGateway(cfg, engines)
    # a bug in the gateway must answer 500, not crash the test client
    g.http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=g.app, raise_app_exceptions=False), base_url="http://gw"
    )
    await g.service.probe_once()
    yield g
    await g.close()


def engine(gw: TestGateway) -> Failing:
    e = gw.engines[MODEL]
    assert isinstance(e, Failing)
    return e


async def post(
    gw: TestGateway,
    rid: str,
    body: Any,
    *,
    tenant: str | None = "team",
    path: str = "/v1/chat/completions",
    **headers: str,
) -> httpx.Response:
    h = {"x-request-id": rid, **headers}
    if tenant is not None:
        h["authorization"] = f"Bearer {KEYS[tenant]}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await gw.http.post(path, content=content, headers={"content-type": "application/json", **h})


def check_body(error: dict[str, Any], rid: str, kind: str, code: str | None) -> None:
    assert set(error) >= {"message", "type", "param", "code", "request_id"}
    assert (error["type"], error["code"], error["request_id"]) == (kind, code, rid)
    assert isinstance(error["message"], str)
    assert error["message"]
    assert not LEAKS.search(error["message"]), error["message"]


def one_log_line(caplog: pytest.LogCaptureFixture, rid: str, status: int) -> str:
    lines = [
        r.getMessage()
        for r in caplog.records
        if f"request_id={rid}" in r.getMessage() and f"status={status}" in r.getMessage()
    ]
    assert len(lines) == 1, lines
    return lines[0]


CASES: list[tuple[str, int, str, str | None, Callable[[TestGateway, str], Any]]] = [
    (
        "bad-param",
        400,
        "invalid_request_error",
        "invalid_value",
        lambda g, r: post(g, r, {"model": MODEL, "messages": MSG, "temperature": "hot"}),
    ),
    ("bad-json", 400, "invalid_request_error", "invalid_json", lambda g, r: post(g, r, b'{"model": ')),
    (
        "bad-deadline",
        400,
        "invalid_request_error",
        "invalid_value",
        lambda g, r: post(g, r, {"model": MODEL, "messages": MSG}, **{"x-oss-deadline-ms": "soon"}),
    ),
    (
        "over-cap",
        400,
        "invalid_request_error",
        "max_tokens_over_limit",
        lambda g, r: post(g, r, {"model": MODEL, "messages": MSG, "max_tokens": 1000}),
    ),
    (
        "engine-400",
        400,
        "invalid_request_error",
        None,
        lambda g, r: _mode(g, "json400", post(g, r, {"model": MODEL, "messages": MSG})),
    ),
    (
        "no-key",
        401,
        "invalid_request_error",
        "invalid_api_key",
        lambda g, r: post(g, r, {"model": MODEL, "messages": MSG}, tenant=None),
    ),
    (
        "no-key-bad-body",
        401,
        "invalid_request_error",
        "invalid_api_key",
        lambda g, r: post(g, r, b"{not json", tenant=None),
    ),
    (
        "forbidden",
        403,
        "permission_error",
        "model_not_allowed",
        lambda g, r: post(g, r, {"model": OTHER, "messages": MSG}, tenant="narrow"),
    ),
    (
        "no-model",
        404,
        "invalid_request_error",
        "model_not_found",
        lambda g, r: post(g, r, {"model": "nope", "messages": MSG}),
    ),
    (
        "no-route",
        404,
        "invalid_request_error",
        "unknown_url",
        lambda g, r: post(g, r, {}, path="/v1/nothing"),
    ),
    (
        "too-big",
        413,
        "invalid_request_error",
        "request_too_large",
        lambda g, r: post(g, r, {"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}),
    ),
    ("rate", 429, "requests", "rate_limit_exceeded", lambda g, r: _twice(g, r)),
    ("bug", 500, "server_error", "internal_error", lambda g, r: _bug(g, r)),
    (
        "engine-raises",
        502,
        "server_error",
        "engine_error",
        lambda g, r: _mode(g, "raise", post(g, r, {"model": MODEL, "messages": MSG})),
    ),
    (
        "engine-500",
        500,
        "server_error",
        "engine_error",
        lambda g, r: _mode(g, "json500", post(g, r, {"model": MODEL, "messages": MSG})),
    ),
    (
        "not-ready",
        503,
        "server_error",
        "model_not_ready",
        lambda g, r: post(g, r, {"model": OTHER, "messages": MSG}),
    ),
    ("queue-full", 503, "server_error", "queue_timeout", lambda g, r: _queue_full(g, r)),
    (
        "no-start",
        504,
        "server_error",
        "timeout",
        lambda g, r: _mode(g, "hang", post(g, r, {"model": MODEL, "messages": MSG})),
    ),
]


async def _mode(gw: TestGateway, mode: str, request: Any) -> httpx.Response:
    engine(gw).mode = mode
    try:
        resp: httpx.Response = await request
        return resp
    finally:
        engine(gw).mode = "ok"


async def _twice(gw: TestGateway, rid: str) -> httpx.Response:
    first = await post(gw, rid + "-first", {"model": MODEL, "messages": MSG}, tenant="slow")
    assert first.status_code == 200
    return await post(gw, rid, {"model": MODEL, "messages": MSG}, tenant="slow")


async def _bug(gw: TestGateway, rid: str) -> httpx.Response:
    caching = gw.service._prompt_caching
    original = caching.begin

    def broken(ctx: Any) -> Any:
        raise KeyError("secret-internal")

    caching.begin = broken  # type: ignore[method-assign]
    try:
        return await post(gw, rid, {"model": MODEL, "messages": MSG})
    finally:
        caching.begin = original  # type: ignore[method-assign]


async def _queue_full(gw: TestGateway, rid: str) -> httpx.Response:
    engine(gw).mode = "slow_stream"
    holder = asyncio.create_task(post(gw, rid + "-holder", {"model": MODEL, "messages": MSG, "stream": True}))
    await asyncio.sleep(0.05)
    engine(gw).mode = "ok"
    try:
        return await post(gw, rid, {"model": MODEL, "messages": MSG})
    finally:
        await asyncio.gather(holder, return_exceptions=True)


@pytest.mark.parametrize(("rid", "status", "kind", "code", "send"), CASES, ids=[c[0] for c in CASES])
async def test_every_error_status_has_the_openai_body(
    gw: TestGateway,
    caplog: pytest.LogCaptureFixture,
    rid: str,
    status: int,
    kind: str,
    code: str | None,
    send: Callable[[TestGateway, str], Any],
) -> None:
    with caplog.at_level(logging.INFO, logger="oss_serving"):
        resp = await send(gw, rid)
    assert resp.status_code == status, resp.text
    assert resp.headers["x-request-id"] == rid
    check_body(resp.json()["error"], rid, kind, code)
    line = one_log_line(caplog, rid, status)
    if rid not in ("no-key", "no-key-bad-body", "no-route"):
        assert "tenant=" in line, line
        assert "tenant=-" not in line, line


async def test_headers_on_limited_and_unavailable_answers(gw: TestGateway) -> None:
    await post(gw, "h1", {"model": MODEL, "messages": MSG}, tenant="slow")
    limited = await post(gw, "h2", {"model": MODEL, "messages": MSG}, tenant="slow")
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["x-ratelimit-limit-requests"] == "1"
    missing = await post(gw, "h3", {"model": MODEL, "messages": MSG}, tenant=None)
    assert missing.headers["www-authenticate"] == "Bearer"
    busy = await post(gw, "h4", {"model": OTHER, "messages": MSG})
    assert busy.headers["retry-after"] == "5"


async def test_method_not_allowed_has_the_body(gw: TestGateway) -> None:
    resp = await gw.http.get("/v1/chat/completions", headers={"x-request-id": "get-1"})
    assert resp.status_code == 405
    check_body(resp.json()["error"], "get-1", "invalid_request_error", "method_not_allowed")


async def test_in_band_errors_have_the_same_shape(gw: TestGateway, caplog: pytest.LogCaptureFixture) -> None:
    """Mid-stream: the time limit passes (504) after the first chunk; the error is an SSE
    event with the same body, and the request is logged once with its final status."""
    engine(gw).mode = "slow_stream"
    with caplog.at_level(logging.INFO, logger="oss_serving"):
        async with gw.http.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": MODEL, "messages": MSG, "stream": True},
            headers={"authorization": f"Bearer {KEYS['team']}", "x-request-id": "inband-1"},
        ) as resp:
            assert resp.status_code == 200
            lines = [line async for line in resp.aiter_lines() if line.startswith("data: {")]
    engine(gw).mode = "ok"
    error = json.loads(lines[-1][6:])["error"]
    check_body(error, "inband-1", "server_error", "timeout")
    one_log_line(caplog, "inband-1", 504)


# ------------------------------------------------ limits, the queue, shutdown, upstreams
def check_answer(resp: httpx.Response, rid: str, status: int, kind: str, code: str | None) -> dict[str, Any]:
    """The status, the request id echoed in the header and the body, and the body's shape."""
    assert resp.status_code == status, resp.text
    assert resp.headers["x-request-id"] == rid
    error: dict[str, Any] = resp.json()["error"]
    check_body(error, rid, kind, code)
    return error


async def test_tokens_limit_is_a_tokens_429(caplog: pytest.LogCaptureFixture) -> None:
    """A request bigger than the tenant's whole token minute; type ``tokens`` as OpenAI."""
    cfg = config_for(
        [MODEL],
        auth={"required": True},
        tenants=[{"id": "team", "api_key_sha256": [hash_key(KEYS["team"])], "tokens_per_minute": 10}],
    )
    g = TestGateway(cfg, {MODEL: Failing()})
    await g.service.probe_once()
    try:
        with caplog.at_level(logging.INFO, logger="oss_serving"):
            resp = await post(g, "tok-1", {"model": MODEL, "messages": MSG, "max_tokens": 64})
        check_answer(resp, "tok-1", 429, "tokens", "rate_limit_exceeded")
        assert "tenant=team" in one_log_line(caplog, "tok-1", 429)
        reason = "tokens_limit_exceeded"
        assert g.metric("oss_serving_rejections_total", model=MODEL, reason=reason) == 1
    finally:
        await g.close()


async def test_shutting_down_is_a_503(gw: TestGateway, caplog: pytest.LogCaptureFixture) -> None:
    await gw.service.admission.stop()
    with caplog.at_level(logging.INFO, logger="oss_serving"):
        resp = await post(gw, "stopping-1", {"model": MODEL, "messages": MSG})
    check_answer(resp, "stopping-1", 503, "server_error", "shutting_down")
    assert resp.headers["retry-after"] == "1"
    one_log_line(caplog, "stopping-1", 503)


@pytest.fixture
async def redis_gw(redis_client: Any) -> AsyncIterator[TestGateway]:
    """Admission over Redis (capacity 1): tenant concurrency and deadline prediction live there."""
    prefix = f"errshape{uuid.uuid4().hex[:8]}"
    cfg = config_for(
        [MODEL],
        auth={"required": True},
        gateway={"request_timeout_s": 5.0},
        queue={"default_capacity": 1, "max_wait_s": 2.0, "key_prefix": prefix},
        tenants=[
            {"id": "team", "api_key_sha256": [hash_key(KEYS["team"])]},
            {"id": "narrow", "api_key_sha256": [hash_key(KEYS["narrow"])], "max_concurrent_requests": 1},
        ],
    )
    g = TestGateway(cfg, {MODEL: Failing()}, redis_client)
    await g.service.probe_once()
    yield g
    await g.close()
    keys = [k async for k in redis_client.scan_iter(match=f"*{prefix}*")]
    if keys:
        await redis_client.delete(*keys)


async def _holding(gw: TestGateway, rid: str, tenant: str) -> asyncio.Task[httpx.Response]:
    """A stream that holds its lease (the engine stalls after one chunk) until cancelled."""
    engine(gw).mode = "slow_stream"
    holder = asyncio.create_task(
        post(gw, rid, {"model": MODEL, "messages": MSG, "stream": True}, tenant=tenant)
    )
    for _ in range(200):
        if (await gw.service.admission.snapshot(MODEL)).in_use == 1:
            break
        await asyncio.sleep(0.01)
    engine(gw).mode = "ok"
    return holder


@pytest.mark.parametrize(
    ("rid", "tenant", "headers", "status", "kind", "code", "reason"),
    [
        ("conc-1", "narrow", {}, 429, "requests", "rate_limit_exceeded", "concurrency_limit_exceeded"),
        (
            "deadline-1",
            "team",
            {"x-oss-deadline-ms": "100"},
            503,
            "server_error",
            "deadline_unreachable",
            "deadline_unreachable",
        ),
    ],
    ids=["concurrency", "deadline-unreachable"],
)
async def test_queue_refusals_have_the_openai_body(
    redis_gw: TestGateway,
    caplog: pytest.LogCaptureFixture,
    rid: str,
    tenant: str,
    headers: dict[str, str],
    status: int,
    kind: str,
    code: str,
    reason: str,
) -> None:
    holder = await _holding(redis_gw, rid + "-holder", tenant)
    try:
        with caplog.at_level(logging.INFO, logger="oss_serving"):
            resp = await post(redis_gw, rid, {"model": MODEL, "messages": MSG}, tenant=tenant, **headers)
        check_answer(resp, rid, status, kind, code)
        assert int(resp.headers["retry-after"]) >= 1
        assert f"tenant={tenant}" in one_log_line(caplog, rid, status)
        assert redis_gw.metric("oss_serving_rejections_total", model=MODEL, reason=reason) == 1
    finally:
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)


@pytest.fixture(scope="module")
def cloud() -> Iterator[tuple[SimEngine, str]]:
    """An OpenAI-compatible upstream on a loopback port (the simulated engine)."""
    sim = SimEngine(EngineProfile(step_base_s=0.0005, step_per_seq_s=0, prefill_per_token_s=0), "sim-cloud")
    with serve_in_thread(sim) as url:
        yield sim, url + "/v1"


@pytest.fixture
async def handoff_gw(cloud: tuple[SimEngine, str]) -> AsyncIterator[TestGateway]:
    sim, url = cloud
    sim.faults.status, sim.faults.delay_s = None, 0.0
    cfg = config_for(
        [MODEL],
        auth={"required": True},
        tenants=[{"id": "team", "api_key_sha256": [hash_key(KEYS["team"])], "handoff": "allowed"}],
        upstreams=[
            {
                "name": "cloud",
                "base_url": url,
                "models": {"auto": "gpt-cloud"},
                "default_model": "gpt-cloud",
                "first_byte_timeout_s": 0.3,
                "read_timeout_s": 0.3,
                "total_timeout_s": 0.5,
            }
        ],
        handoff={
            "upstream": "cloud",
            "virtual_models": [{"name": "auto", "low": MODEL, "medium": MODEL, "high": MODEL}],
        },
    )
    g = TestGateway(cfg, {MODEL: Failing()})
    await g.service.probe_once()
    yield g
    await g.close()
    sim.faults.status, sim.faults.delay_s = None, 0.0


@pytest.mark.parametrize(
    ("upstream_status", "delay_s", "status", "code"),
    [(502, 0.0, 502, "upstream_error"), (503, 0.0, 502, "upstream_error"), (504, 0.0, 504, "upstream_error"),
     (None, 2.0, 504, "upstream_timeout")],
    ids=["upstream-502", "upstream-503", "upstream-504", "upstream-timeout"],
)  # fmt: skip
async def test_upstream_failures_have_the_openai_body(
    handoff_gw: TestGateway,
    cloud: tuple[SimEngine, str],
    caplog: pytest.LogCaptureFixture,
    upstream_status: int | None,
    delay_s: float,
    status: int,
    code: str,
) -> None:
    """Escalated to the upstream, which fails: its 503 is our 502 (the upstream is a
    backend of ours, not the client's), a 504 stays 504; its own text stays in the log."""
    cloud[0].faults.status, cloud[0].faults.delay_s = upstream_status, delay_s
    rid = f"up-{upstream_status}-{delay_s}"
    with caplog.at_level(logging.INFO, logger="oss_serving"):
        resp = await post(handoff_gw, rid, {"model": "auto", "messages": MSG}, **{"x-oss-escalate": "1"})
    error = check_answer(resp, rid, status, "server_error", code)
    assert (error["upstream"], error["upstream_status"]) == ("cloud", upstream_status)
    assert "simulated failure" not in error["message"]
    assert resp.headers["x-oss-serving-backend"] == "cloud"
    one_log_line(caplog, rid, status)
