"""Handoff through the whole gateway, with a real OpenAI-compatible upstream on loopback.

The gateway (``GatewayService`` + the FastAPI app) runs in-process and is driven by the
OpenAI SDK; the upstream is the simulated engine served over HTTP on a free loopback
port (``serve_in_thread``), reached by the real :class:`UpstreamClient`. Local engines
are :class:`FakeEngine` (or, for failover, a second simulated engine that is stopped).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest

from loadtest.sim import EngineProfile
from loadtest.sim.background import serve_in_thread
from loadtest.sim.server import SimEngine
from serving.config import (
    AuthConfig,
    GatewayConfig,
    HandoffConfig,
    ModelConfig,
    QueueConfig,
    ServingConfig,
    TenantSeed,
    UpstreamConfig,
)
from serving.engine.protocol import EngineClient
from serving.engine.upstream import UpstreamClient
from serving.gateway.handoff import HandoffPolicy
from serving.gateway.limits import prompt_tokens
from serving.gateway.tenants import hash_key
from tests.fakes import FakeEngine
from tests.gateway import TestGateway

SMALL, BIG = "gpt-oss-20b", "gpt-oss-120b"
CLOUD_MODEL = "gpt-cloud-large"
MSG = [{"role": "user", "content": "What is the capital of France?"}]
TENANTS = {"open": "allowed", "ovf": "overflow-only", "closed": "never"}
SIM_PROFILE = EngineProfile(step_base_s=0.0005, step_per_seq_s=0, prefill_per_token_s=0, default_max_tokens=6)


def key(tenant: str) -> str:
    return f"key-{tenant}"


@pytest.fixture(scope="module")
def cloud() -> Iterator[tuple[SimEngine, str]]:
    """The upstream: a real OpenAI-compatible server on a loopback port."""
    engine = SimEngine(SIM_PROFILE, "sim-cloud")
    with serve_in_thread(engine) as url:
        yield engine, url + "/v1"


@pytest.fixture(autouse=True)
def _reset_faults(cloud: tuple[SimEngine, str]) -> None:
    engine = cloud[0]
    engine.faults.status, engine.faults.delay_s, engine.faults.api_key = None, 0.0, None
    engine.faults.bodies.clear()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


class Stack:
    """The gateway with handoff, its tenants, the OpenAI SDK per tenant."""

    def __init__(
        self,
        upstream_url: str,
        *,
        handoff: dict[str, Any] | None = None,
        upstream: dict[str, Any] | None = None,
        engines: dict[str, EngineClient] | None = None,
        queue: dict[str, Any] | None = None,
        redis: Any | None = None,
        environ: dict[str, str] | None = None,
        request_timeout_s: float = 30.0,
        tenants: list[dict[str, Any]] | None = None,
    ) -> None:
        models = [
            ModelConfig(name=SMALL, source="openai/gpt-oss-20b", engine_kwargs={"max_model_len": 4096}),
            ModelConfig(name=BIG, source="openai/gpt-oss-120b", engine_kwargs={"max_model_len": 8192}),
        ]
        up = {
            "name": "cloud",
            "base_url": upstream_url,
            "models": {"auto": CLOUD_MODEL},
            "default_model": CLOUD_MODEL,
            "first_byte_timeout_s": 5.0,
            "read_timeout_s": 5.0,
            **(upstream or {}),
        }
        policy = {
            "upstream": "cloud",
            "overflow": {"max_predicted_wait_s": 0.5},
            "virtual_models": [{"name": "auto", "low": SMALL, "medium": BIG, "high": BIG}],
            **(handoff or {}),
        }
        self.config = ServingConfig(
            models=models,
            upstreams=[UpstreamConfig.model_validate(up)],
            handoff=HandoffConfig.model_validate(policy),
            tenants=[
                TenantSeed(id=t, handoff=right, api_key_sha256=[hash_key(key(t))])  # type: ignore[arg-type]
                for t, right in TENANTS.items()
            ]
            + [
                TenantSeed.model_validate({**t, "api_key_sha256": [hash_key(key(t["id"]))]})
                for t in tenants or ()
            ],
        )
        self.engines: dict[str, EngineClient] = engines or {SMALL: FakeEngine(), BIG: FakeEngine()}
        self.config = self.config.model_copy(
            update={
                "gateway": GatewayConfig(request_timeout_s=request_timeout_s, engine_ready_retry_after_s=3),
                "auth": AuthConfig(required=True, admin_key_sha256=[hash_key("key-ops")]),
                "queue": QueueConfig.model_validate(queue or {}),
            }
        )
        self.gateway = TestGateway(self.config, self.engines, redis, environ=environ or {})
        self.service = self.gateway.service
        self.metrics = self.gateway.metrics
        self.http = self.gateway.http
        self.policy: HandoffPolicy = self.service._handoff  # type: ignore[assignment]
        self.budget = self.policy._upstreams["cloud"].budget

    def sdk(self, tenant: str = "open") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url="http://gw/v1", api_key=key(tenant), http_client=self.http, max_retries=0
        )

    async def post(self, tenant: str, body: dict[str, Any], **headers: str) -> httpx.Response:
        path = "/v1/responses" if "input" in body else "/v1/chat/completions"
        auth = {"authorization": f"Bearer {key(tenant)}", **headers}
        return await self.http.post(path, json=body, headers=auth)

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def close(self) -> None:
        await self.gateway.close()


@pytest.fixture
async def stack(cloud: tuple[SimEngine, str]) -> AsyncIterator[Stack]:
    s = Stack(cloud[1])
    await s.service.probe_once()
    yield s
    await s.close()


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MSG, "max_tokens": 6, **extra}


# ------------------------------------------------------------------ escalation
async def test_auto_picks_local_model_by_reasoning_effort(stack: Stack, cloud: tuple[SimEngine, str]) -> None:
    low = await stack.post("open", chat("auto", reasoning_effort="low"))
    high = await stack.post("open", chat("auto", reasoning_effort="high"))
    default = await stack.post("open", chat("auto"))
    assert low.status_code == high.status_code == default.status_code == 200
    assert (low.headers["x-oss-serving-backend"], low.headers["x-oss-serving-model"]) == ("local", SMALL)
    assert (high.headers["x-oss-serving-backend"], high.headers["x-oss-serving-model"]) == ("local", BIG)
    assert default.headers["x-oss-serving-model"] == BIG  # default effort: medium
    assert low.json()["model"] == SMALL  # the local engine was asked for the picked model
    assert len(stack.engines[SMALL].calls) == 1  # type: ignore[attr-defined]
    assert len(stack.engines[BIG].calls) == 2  # type: ignore[attr-defined]
    assert list(cloud[0].faults.bodies) == []


async def test_marked_request_escalates_to_upstream(stack: Stack, cloud: tuple[SimEngine, str]) -> None:
    sdk = stack.sdk("open")
    raw = await sdk.chat.completions.with_raw_response.create(
        model="auto",
        messages=MSG,
        max_tokens=6,
        extra_headers={"X-Oss-Escalate": "1"},  # type: ignore[arg-type]
    )
    reply = raw.parse()
    assert raw.headers["x-oss-serving-backend"] == "cloud"
    assert raw.headers["x-oss-serving-handoff"] == "escalation"
    assert raw.headers["x-oss-serving-model"] == CLOUD_MODEL
    assert reply.model == "auto"  # the model the client asked for, not the upstream's
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 6
    assert cloud[0].faults.bodies[-1]["model"] == CLOUD_MODEL  # mapped on the way out
    assert "request_id" not in cloud[0].faults.bodies[-1]  # nothing vLLM-specific leaks upstream
    assert stack.engines[BIG].calls == []  # type: ignore[attr-defined]
    labels = {"reason": "escalation", "upstream": "cloud", "tenant": "open"}
    assert stack.metric("oss_serving_handoffs_total", **labels) == 1
    assert (
        stack.metric("oss_serving_upstream_tokens_total", upstream="cloud", tenant="open", kind="completion")
        == 6
    )


async def test_prompt_over_local_context_escalates(stack: Stack) -> None:
    long_prompt = [{"role": "user", "content": "word " * 4000}]  # ~20k chars > 4096 tokens of gpt-oss-20b
    resp = await stack.post("open", {"model": "auto", "messages": long_prompt, "reasoning_effort": "low"})
    assert resp.status_code == 200
    assert resp.headers["x-oss-serving-handoff"] == "context_length"
    assert resp.json()["model"] == "auto"
    assert stack.engines[SMALL].calls == []  # type: ignore[attr-defined]


async def test_overflow_only_tenant_is_not_escalated(stack: Stack, cloud: tuple[SimEngine, str]) -> None:
    resp = await stack.post("ovf", chat("auto"), **{"x-oss-escalate": "true"})
    assert resp.status_code == 200
    assert resp.headers["x-oss-serving-backend"] == "local"
    assert resp.headers["x-oss-serving-handoff-declined"] == "escalation; tenant-policy"
    assert list(cloud[0].faults.bodies) == []


# ------------------------------------------------------------------ governance
async def test_tenant_never_is_refused_handoff_and_served_locally(
    stack: Stack, cloud: tuple[SimEngine, str]
) -> None:
    resp = await stack.post("closed", chat("auto"), **{"x-oss-escalate": "1"})
    assert resp.status_code == 200
    assert resp.headers["x-oss-serving-backend"] == "local"
    assert resp.headers["x-oss-serving-handoff-declined"] == "escalation; tenant-policy"
    assert resp.json()["choices"][0]["message"]["content"] == "The capital of France is Paris."
    assert list(cloud[0].faults.bodies) == []  # nothing left the cluster
    labels = {"reason": "escalation", "upstream": "cloud", "tenant": "closed", "cause": "tenant-policy"}
    assert stack.metric("oss_serving_handoff_declined_total", **labels) == 1
    assert (
        stack.metric("oss_serving_handoffs_total", reason="escalation", upstream="cloud", tenant="closed")
        == 0
    )


async def test_tenant_never_gets_the_local_error_when_nothing_is_ready(
    cloud: tuple[SimEngine, str],
) -> None:
    s = Stack(cloud[1], engines={SMALL: FakeEngine(healthy=False), BIG: FakeEngine(healthy=False)})
    await s.service.probe_once()
    try:
        closed = await s.post("closed", chat(BIG))
        assert closed.status_code == 503
        assert closed.json()["error"]["code"] == "model_not_ready"
        assert list(cloud[0].faults.bodies) == []
        ovf = await s.post("ovf", chat(BIG))  # overflow-only may leave when nothing local is ready
        assert ovf.status_code == 200
        assert ovf.headers["x-oss-serving-handoff"] == "not_ready"
        assert ovf.json()["model"] == BIG
        labels = {"reason": "not_ready", "upstream": "cloud", "tenant": "ovf"}
        assert s.metric("oss_serving_handoffs_total", **labels) == 1
    finally:
        await s.close()


# ------------------------------------------------------------------ overflow
async def test_overflow_under_a_forced_full_queue(cloud: tuple[SimEngine, str]) -> None:
    """The real admission queue (its local mode: no Redis here) is held full."""
    s = Stack(cloud[1], queue={"default_capacity": 1})
    admission = s.service.admission
    await s.service.probe_once()
    tenant = s.service._auth.authenticate(f"Bearer {key('open')}")
    try:
        free = await s.post("open", chat(BIG))
        assert free.headers["x-oss-serving-backend"] == "local"  # an empty queue predicts no wait
        held = await admission.acquire(BIG, tenant, None)  # the one slot is taken
        assert await admission.predicted_wait_s(BIG) > 0.5
        full = await s.post("open", chat(BIG))
        assert full.status_code == 200
        assert full.headers["x-oss-serving-backend"] == "cloud"
        assert full.headers["x-oss-serving-handoff"] == "overflow"
        assert full.json()["model"] == BIG
        closed = await s.post("closed", chat(SMALL))  # other model: its queue is empty
        assert closed.headers["x-oss-serving-backend"] == "local"
        await admission.release(held)
        after = await s.post("open", chat(BIG))
        assert after.headers["x-oss-serving-backend"] == "local"
        assert s.metric("oss_serving_handoffs_total", reason="overflow", upstream="cloud", tenant="open") == 1
    finally:
        await s.close()


async def test_overflow_by_request_deadline(cloud: tuple[SimEngine, str]) -> None:
    s = Stack(cloud[1], queue={"default_capacity": 1}, handoff={"overflow": {"max_predicted_wait_s": None}})
    admission = s.service.admission
    await s.service.probe_once()
    tenant = s.service._auth.authenticate(f"Bearer {key('open')}")
    try:
        free = await s.post("ovf", chat(BIG), **{"x-oss-deadline-ms": "100"})
        assert free.headers["x-oss-serving-backend"] == "local"  # nothing to wait for
        no_deadline = await s.post("ovf", chat(BIG))
        assert no_deadline.headers["x-oss-serving-backend"] == "local"
        held = await admission.acquire(BIG, tenant, None)
        tight = await s.post("ovf", chat(BIG), **{"x-oss-deadline-ms": "100"})  # 1 s predicted > 0.1 s
        assert tight.headers["x-oss-serving-handoff"] == "overflow"
        await admission.release(held)
    finally:
        await s.close()


# ------------------------------------------------------------------ budget
async def test_budget_exhausted_keeps_requests_local(cloud: tuple[SimEngine, str]) -> None:
    s = Stack(cloud[1], upstream={"requests_per_minute": 1})
    await s.service.probe_once()
    try:
        first = await s.post("open", chat("auto"), **{"x-oss-escalate": "1"})
        second = await s.post("open", chat("auto"), **{"x-oss-escalate": "1"})
        assert first.headers["x-oss-serving-backend"] == "cloud"
        assert second.status_code == 200
        assert second.headers["x-oss-serving-backend"] == "local"
        assert second.headers["x-oss-serving-handoff-declined"] == "escalation; budget"
        assert len(cloud[0].faults.bodies) == 1
        labels = {"reason": "escalation", "upstream": "cloud", "tenant": "open", "cause": "budget"}
        assert s.metric("oss_serving_handoff_declined_total", **labels) == 1
        assert s.metric("oss_serving_upstream_budget_used", upstream="cloud", window="minute_requests") == 1
        assert s.metric("oss_serving_upstream_budget_limit", upstream="cloud", window="minute_requests") == 1
    finally:
        await s.close()


async def test_monthly_token_cap_counts_reported_usage(cloud: tuple[SimEngine, str]) -> None:
    s = Stack(cloud[1], upstream={"monthly_token_cap": 60})
    await s.service.probe_once()
    try:
        backends = []
        for _ in range(4):
            r = await s.post("open", chat("auto", max_tokens=6), **{"x-oss-escalate": "1"})
            backends.append(r.headers["x-oss-serving-backend"])
        used = (await s.budget.used())["month_tokens"]
        # each answer reports its usage; the reservation (estimate) was corrected to it
        assert used == sum(
            b["max_tokens"] + len(" ".join(m["content"] for m in b["messages"]).split())
            for b in cloud[0].faults.bodies
        )
        assert backends[0] == "cloud"
        assert backends[-1] == "local"  # the cap is spent
        assert s.metric("oss_serving_upstream_budget_used", upstream="cloud", window="month_tokens") == used
    finally:
        await s.close()


# ------------------------------------------------------------------ upstream failures
async def test_upstream_down_escalation_is_a_mapped_502(stack: Stack) -> None:
    s = Stack(_closed_port_url())
    await s.service.probe_once()
    try:
        resp = await s.post("open", chat("auto"), **{"x-oss-escalate": "1"})
        assert resp.status_code == 502
        error = resp.json()["error"]
        assert error["code"] == "upstream_unavailable"
        assert error["upstream"] == "cloud"
        assert error["upstream_status"] is None
        assert error["request_id"] == resp.headers["x-request-id"]
        assert resp.headers["x-oss-serving-backend"] == "cloud"
        assert (
            s.metric("oss_serving_upstream_errors_total", upstream="cloud", kind="upstream_unavailable") == 1
        )
    finally:
        await s.close()


async def test_upstream_down_overflow_falls_back_to_local(cloud: tuple[SimEngine, str]) -> None:
    s = Stack(_closed_port_url(), engines={SMALL: FakeEngine(), BIG: FakeEngine(healthy=False)})
    await s.service.probe_once()
    try:
        resp = await s.post("open", chat(BIG))
        # not ready locally, upstream down: the local error, and the answer says why
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "model_not_ready"
        ok = await s.post("open", chat(SMALL))
        assert ok.headers["x-oss-serving-backend"] == "local"
        assert (
            s.metric("oss_serving_upstream_errors_total", upstream="cloud", kind="upstream_unavailable") == 1
        )
    finally:
        await s.close()


async def test_upstream_5xx_maps_to_our_error_with_its_status(
    stack: Stack, cloud: tuple[SimEngine, str]
) -> None:
    cloud[0].faults.status = 500
    with pytest.raises(openai.APIStatusError) as err:
        await stack.sdk("open").chat.completions.create(
            model="auto",
            messages=MSG,
            extra_headers={"x-oss-escalate": "1"},  # type: ignore[arg-type]
        )
    assert err.value.status_code == 502
    body = err.value.body
    assert isinstance(body, dict)
    assert body["upstream_status"] == 500
    assert body["upstream"] == "cloud"
    assert (body["type"], body["code"]) == ("server_error", "upstream_error")
    assert "simulated failure" not in body["message"]  # the upstream's own text stays in the log
    assert stack.metric("oss_serving_upstream_errors_total", upstream="cloud", kind="status_5xx") == 1


async def test_upstream_client_error_passes_through(stack: Stack, cloud: tuple[SimEngine, str]) -> None:
    cloud[0].faults.status = 400
    resp = await stack.post("open", chat("auto"), **{"x-oss-escalate": "1"})
    assert resp.status_code == 400
    assert resp.json()["error"]["upstream_status"] == 400


async def test_an_upstream_429_keeps_its_own_text_from_the_client(
    stack: Stack, cloud: tuple[SimEngine, str]
) -> None:
    """An upstream's rate-limit text can name its organization and limits: the client gets
    our 429 (OpenAI's type and code, our request id), the upstream's text goes to the log."""
    cloud[0].faults.status = 429
    resp = await stack.post("open", chat("auto"), **{"x-oss-escalate": "1"})
    assert resp.status_code == 429
    err = resp.json()["error"]
    assert (err["type"], err["code"], err["upstream_status"]) == ("requests", "rate_limit_exceeded", 429)
    assert "simulated failure" not in err["message"]
    assert "'cloud'" in err["message"]
    assert err["request_id"] == resp.headers["x-request-id"]


async def test_upstream_key_comes_from_the_environment(cloud: tuple[SimEngine, str]) -> None:
    cloud[0].faults.api_key = "sk-upstream-secret"
    good = Stack(cloud[1], environ={"OSS_SERVING_UPSTREAM_API_KEY": "sk-upstream-secret"})
    bad = Stack(cloud[1], environ={})
    for s in (good, bad):
        await s.service.probe_once()
    try:
        ok = await good.post("open", chat("auto"), **{"x-oss-escalate": "1"})
        assert ok.status_code == 200
        assert ok.headers["x-oss-serving-backend"] == "cloud"
        denied = await bad.post("open", chat("auto"), **{"x-oss-escalate": "1"})
        assert denied.status_code == 502  # the gateway's key is wrong, not the client's
        assert denied.json()["error"]["upstream_status"] == 401
        assert "sk-upstream-secret" not in good.config.to_yaml()
    finally:
        await good.close()
        await bad.close()


async def test_slow_upstream_times_out_instead_of_hanging(cloud: tuple[SimEngine, str]) -> None:
    """A stream must begin within ``first_byte_timeout_s``; a non-streamed answer (whose
    headers come when it is complete) within ``total_timeout_s``."""
    cloud[0].faults.delay_s = 2.0
    s = Stack(cloud[1], upstream={"first_byte_timeout_s": 0.2, "total_timeout_s": 0.4})
    await s.service.probe_once()
    try:
        resp = await s.post("open", chat("auto"), **{"x-oss-escalate": "1"})
        assert resp.status_code == 504
        assert resp.json()["error"]["code"] == "upstream_timeout"
        streamed = await s.post("open", chat("auto", stream=True), **{"x-oss-escalate": "1"})
        assert streamed.status_code == 504
        assert s.metric("oss_serving_upstream_errors_total", upstream="cloud", kind="upstream_timeout") == 2
    finally:
        await s.close()


# ------------------------------------------------------------------ failover
async def test_failover_when_the_local_engine_is_stopped(cloud: tuple[SimEngine, str]) -> None:
    """The local 120b is a second real server, reached over HTTP; it is stopped mid-test."""
    local_engine = SimEngine(SIM_PROFILE, BIG)
    local_cfg = UpstreamConfig(name="local-120b", base_url="http://127.0.0.1:1/v1", api_key_env=None)
    with serve_in_thread(local_engine) as url:
        local = UpstreamClient(local_cfg.model_copy(update={"base_url": url + "/v1"}), None)
        s = Stack(cloud[1], engines={SMALL: FakeEngine(), BIG: local})
        await s.service.probe_once()
        before = await s.post("ovf", chat(BIG))
        assert before.headers["x-oss-serving-backend"] == "local"
        assert before.json()["model"] == BIG
    try:
        # stopped: the gateway has not probed since, so it still counts the model ready
        closed = await s.post("closed", chat(BIG))
        assert closed.status_code == 502  # tenant never: the local error
        error = closed.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "engine_error")
        assert "ConnectError" not in error["message"]  # transport exception text stays in the log
        after = await s.post("ovf", chat(BIG))
        assert after.status_code == 200
        assert after.headers["x-oss-serving-backend"] == "cloud"
        assert after.headers["x-oss-serving-handoff"] == "failover"
        assert after.json()["model"] == BIG
        assert s.metric("oss_serving_handoffs_total", reason="failover", upstream="cloud", tenant="ovf") == 1
    finally:
        await local.aclose()
        await s.close()


# ------------------------------------------------------------------ protocol
async def test_streaming_through_a_handoff(stack: Stack) -> None:
    sdk = stack.sdk("open")
    stream = await sdk.chat.completions.create(
        model="auto",
        messages=MSG,
        max_tokens=6,
        reasoning_effort="medium",
        stream=True,
        extra_headers={"x-oss-escalate": "1"},
    )
    chunks = [c async for c in stream]
    assert {c.model for c in chunks} == {"auto"}
    assert all(c.choices for c in chunks)  # the usage chunk we asked for is not shown
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(reasoning.split()) == 3
    assert len(content.split()) == 3
    assert chunks[-1].choices[0].finish_reason == "length"
    # usage was still read for the budget and the metrics
    assert (
        stack.metric("oss_serving_upstream_tokens_total", upstream="cloud", tenant="open", kind="completion")
        == 6
    )


async def test_streaming_usage_kept_when_the_client_asks(stack: Stack) -> None:
    async with stack.http.stream(
        "POST",
        "/v1/chat/completions",
        json=chat("auto", stream=True, stream_options={"include_usage": True}),
        headers={"authorization": f"Bearer {key('open')}", "x-oss-escalate": "1"},
    ) as resp:
        assert resp.headers["x-oss-serving-backend"] == "cloud"
        lines = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 6
    assert last["model"] == "auto"


async def test_tool_calls_pass_through(stack: Stack) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    sdk = stack.sdk("open")
    reply = await sdk.chat.completions.create(
        model="auto",
        messages=MSG,
        tools=tools,
        extra_headers={"x-oss-escalate": "1"},  # type: ignore[arg-type]
    )
    call = reply.choices[0].message.tool_calls
    assert call is not None
    assert call[0].function.name == "get_weather"
    assert reply.choices[0].finish_reason == "tool_calls"
    stream = await sdk.chat.completions.create(
        model="auto",
        messages=MSG,
        tools=tools,
        stream=True,
        extra_headers={"x-oss-escalate": "1"},  # type: ignore[arg-type]
    )
    deltas = [c.choices[0] async for c in stream if c.choices]
    calls = [d.delta.tool_calls for d in deltas if d.delta.tool_calls]
    assert calls[0][0].function.name == "get_weather"  # type: ignore[index, union-attr]
    assert deltas[-1].finish_reason == "tool_calls"


async def test_responses_api_through_a_handoff(stack: Stack) -> None:
    sdk = stack.sdk("open")
    raw = await sdk.responses.with_raw_response.create(
        model="auto", input="hello there", reasoning={"effort": "high"}, extra_headers={"x-oss-escalate": "1"}
    )
    reply = raw.parse()
    assert raw.headers["x-oss-serving-backend"] == "cloud"
    assert reply.model == "auto"
    assert [item.type for item in reply.output] == ["reasoning", "message"]
    assert reply.output_text.strip()
    async with sdk.responses.stream(
        model="auto", input="hello there", extra_headers={"x-oss-escalate": "1"}
    ) as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert final.model == "auto"
    assert "".join(deltas) == final.output_text
    assert (
        stack.metric(
            "oss_serving_upstream_requests_total", upstream="cloud", endpoint="responses", status="200"
        )
        == 2
    )


async def test_metrics_endpoint_shows_handoffs(stack: Stack) -> None:
    await stack.post("open", chat("auto"), **{"x-oss-escalate": "1"})
    assert (await stack.http.get("/metrics")).status_code == 401  # tenants' keys are not enough
    text = (await stack.http.get("/metrics", headers={"authorization": "Bearer key-ops"})).text
    assert 'oss_serving_handoffs_total{reason="escalation",tenant="open",upstream="cloud"} 1.0' in text
    assert 'oss_serving_upstream_latency_seconds_count{upstream="cloud"} 1.0' in text
    assert 'oss_serving_upstream_requests_in_flight{upstream="cloud"} 0.0' in text


# ------------------------------------------------------------------ tenant limits on a handoff
class ChargeLog:
    """The tenant's tokens-per-minute charges: the pre-charge, then the flight's correction."""

    def __init__(self, stack: Stack) -> None:
        self.estimates: list[int] = []
        self.deltas: list[int] = []
        limiter = stack.service._limiter
        check, correct = limiter.check, limiter.correct_tokens

        async def checked(tenant: Any, estimate: int) -> dict[str, str]:
            self.estimates.append(estimate)
            return await check(tenant, estimate)

        async def corrected(tenant: Any, delta: int) -> None:
            self.deltas.append(delta)
            await correct(tenant, delta)

        limiter.check = checked  # type: ignore[method-assign]
        limiter.correct_tokens = corrected  # type: ignore[method-assign]

    @property
    def charged(self) -> int:
        return sum(self.estimates) + sum(self.deltas)


async def test_escalation_obeys_the_tenants_rate_limit_and_output_cap(cloud: tuple[SimEngine, str]) -> None:
    """Stage 3 (caps and rate limits) runs before the handoff: the upstream sees one request,
    with an explicit output limit within the tenant's cap; the rest get the local 429."""
    capped = {"id": "capped", "handoff": "allowed", "requests_per_minute": 1, "max_output_tokens": 4}
    s = Stack(cloud[1], tenants=[capped])
    await s.service.probe_once()
    try:
        body = {"model": "auto", "messages": MSG}  # no max_tokens: the gateway fills it in
        answers = [await s.post("capped", dict(body), **{"x-oss-escalate": "1"}) for _ in range(5)]
        assert [a.status_code for a in answers] == [200, 429, 429, 429, 429]
        assert answers[0].headers["x-oss-serving-backend"] == "cloud"
        assert (answers[1].json()["error"]["type"], answers[1].json()["error"]["code"]) == (
            "requests",
            "rate_limit_exceeded",
        )
        assert len(cloud[0].faults.bodies) == 1
        sent = cloud[0].faults.bodies[0]
        assert sent["max_tokens"] is not None
        assert sent["max_tokens"] <= 4
        over = await s.post("capped", {**body, "max_tokens": 5}, **{"x-oss-escalate": "1"})
        assert over.status_code == 400  # above the cap: refused before any handoff
        assert len(cloud[0].faults.bodies) == 1
    finally:
        await s.close()


async def test_missing_output_limit_is_filled_in_for_the_upstream(
    stack: Stack, cloud: tuple[SimEngine, str]
) -> None:
    """No output limit: the picked model's ``default_max_tokens`` (4096), bounded by what
    its context leaves after the prompt; and a request that fits is not escalated for it."""
    resp = await stack.post("open", {"model": "auto", "messages": MSG}, **{"x-oss-escalate": "1"})
    assert resp.headers["x-oss-serving-backend"] == "cloud"
    assert cloud[0].faults.bodies[-1]["max_tokens"] == 4096  # gpt-oss-120b: 8192 of context
    responses = await stack.post("open", {"model": "auto", "input": "hi"}, **{"x-oss-escalate": "1"})
    assert responses.status_code == 200
    assert cloud[0].faults.bodies[-1]["max_output_tokens"] == 4096
    small = await stack.post("open", {"model": "auto", "messages": MSG, "reasoning_effort": "low"})
    assert small.headers["x-oss-serving-backend"] == "local"  # 4096 of context: fits, stays
    body = stack.engines[SMALL].calls[-1][1]  # type: ignore[attr-defined]
    assert body["max_tokens"] == 4096 - prompt_tokens(body, 3.0)
    assert len(cloud[0].faults.bodies) == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_a_handed_off_request_is_charged_to_the_tenant_like_a_local_one(
    cloud: tuple[SimEngine, str], stream: bool
) -> None:
    """The tenant's tokens per minute end charged with the upstream's own usage, streamed
    (the usage chunk the gateway asked for is not shown to the client) or not."""
    metered = {"id": "metered", "handoff": "allowed", "tokens_per_minute": 100_000}
    s = Stack(cloud[1], tenants=[metered])
    log = ChargeLog(s)
    await s.service.probe_once()
    try:
        async with s.http.stream(
            "POST",
            "/v1/chat/completions",
            json=chat("auto", stream=stream, max_tokens=6),
            headers={"authorization": f"Bearer {key('metered')}", "x-oss-escalate": "1"},
        ) as resp:
            assert resp.headers["x-oss-serving-backend"] == "cloud"
            text = (await resp.aread()).decode()
        assert '"usage"' not in text if stream else '"usage"' in text
        labels = {"upstream": "cloud", "tenant": "metered"}
        used = s.metric("oss_serving_upstream_tokens_total", kind="prompt", **labels) + s.metric(
            "oss_serving_upstream_tokens_total", kind="completion", **labels
        )
        assert used > 0
        assert len(log.estimates) == 1
        assert log.charged == used  # corrected from the upstream's usage
    finally:
        await s.close()


async def test_budget_reservation_counts_every_sequence(cloud: tuple[SimEngine, str]) -> None:
    s = Stack(cloud[1], upstream={"tokens_per_minute": 40})
    await s.service.probe_once()
    try:
        one = s.policy.estimate_tokens({"messages": MSG, "max_tokens": 6})
        assert s.policy.estimate_tokens({"messages": MSG, "max_tokens": 6, "n": 3}) == one + 2 * 6
        # 8 sequences of 6 tokens do not fit a budget of 40 tokens a minute: kept local
        resp = await s.post("open", chat("auto", n=8), **{"x-oss-escalate": "1"})
        assert resp.status_code == 200
        assert resp.headers["x-oss-serving-backend"] == "local"
        assert resp.headers["x-oss-serving-handoff-declined"] == "escalation; budget"
        assert list(cloud[0].faults.bodies) == []
    finally:
        await s.close()


async def test_a_timeout_after_sending_keeps_the_reservation_charged(cloud: tuple[SimEngine, str]) -> None:
    """The upstream bills a request the gateway stopped waiting for: its reservation stays
    in the budget. A request it refused (an HTTP error) or never received is refunded."""
    cloud[0].faults.delay_s = 1.0
    s = Stack(cloud[1], upstream={"first_byte_timeout_s": 0.2})
    down = Stack(_closed_port_url())
    await s.service.probe_once()
    await down.service.probe_once()
    try:
        timed_out = await s.post("open", chat("auto", stream=True), **{"x-oss-escalate": "1"})
        assert timed_out.status_code == 504
        reserved = s.policy.estimate_tokens({"messages": MSG, "max_tokens": 6})
        assert (await s.budget.used())["month_tokens"] == reserved
        cloud[0].faults.delay_s, cloud[0].faults.status = 0.0, 500
        refused = await s.post("open", chat("auto"), **{"x-oss-escalate": "1"})
        assert refused.status_code == 502
        assert (await s.budget.used())["month_tokens"] == reserved  # not billed: refunded
        unreachable = await down.post("open", chat("auto"), **{"x-oss-escalate": "1"})
        assert unreachable.status_code == 502
        assert (await down.budget.used())["month_tokens"] == 0
    finally:
        await s.close()
        await down.close()


async def test_handoffs_count_against_the_tenants_concurrency_limit(
    cloud: tuple[SimEngine, str], redis_client: Any
) -> None:
    """Concurrency is a stage-3 limit too: a tenant at its limit of 1 with a handoff open
    gets the 429 for a second handoff and for a local request, before anything is sent
    upstream; when the first ends its slot is free again, and nothing stays counted."""
    prefix = f"hold-{uuid.uuid4().hex[:8]}"
    one = {"id": "one", "handoff": "allowed", "max_concurrent_requests": 1}
    s = Stack(cloud[1], tenants=[one], redis=redis_client, queue={"key_prefix": prefix})
    await s.service.probe_once()
    await s.service.admission.start()
    try:
        cloud[0].faults.delay_s = 1.0  # the first handoff stays open a while
        escalate = {"x-oss-escalate": "1"}
        first = asyncio.create_task(s.post("one", {"model": "auto", "messages": MSG}, **escalate))
        active = f"{prefix}:t:one:active"
        for _ in range(200):
            if await redis_client.zcard(active) == 1:
                break
            await asyncio.sleep(0.01)
        assert await redis_client.zcard(active) == 1
        second = await s.post("one", {"model": "auto", "messages": MSG}, **escalate)
        local = await s.post("one", {"model": SMALL, "messages": MSG})
        for refused in (second, local):
            assert refused.status_code == 429
            assert "concurrency limit" in refused.json()["error"]["message"]
        assert len(cloud[0].faults.bodies) == 1  # the refused one never went upstream
        assert (await first).status_code == 200
        cloud[0].faults.delay_s = 0.0
        again = await s.post("one", {"model": "auto", "messages": MSG}, **escalate)
        assert again.status_code == 200
        assert (await s.post("one", {"model": SMALL, "messages": MSG})).status_code == 200
        assert await redis_client.zcount(active, int(time.time() * 1000), "+inf") == 0
        assert s.service.admission.holding() == []  # type: ignore[attr-defined]
    finally:
        cloud[0].faults.delay_s = 0.0
        await s.close()
