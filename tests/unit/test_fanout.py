"""Fan-out is priced, and a tenant pays for what was delivered.

In process (``TestGateway``, authentication on, admission in its local mode, a
``FakeEngine``): the tenant's caps on ``n`` / ``best_of`` / prompt lists / ``min_tokens`` /
``ignore_eos`` (400 before anything is charged); the output limit filled in when absent;
the token estimate counting every sequence; a lease weighing as many slots as its
request runs sequences; and the tokens-per-minute charge of streams cut short.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

import pytest

from serving.config import QueueConfig, ServingConfig
from serving.engine.protocol import Endpoint
from serving.gateway.admission import Admission
from serving.gateway.context import RequestContext
from serving.gateway.errors import GatewayError
from serving.gateway.limits import estimate_tokens, prompt_tokens, streamed_tokens
from serving.gateway.tenants import Tenant, hash_key
from serving.wire import Endpoint as WireEndpoint
from tests.fakes import FakeEngine
from tests.gateway import TestGateway

MODEL = "m"
MSG = [{"role": "user", "content": "hi"}]
LONG_TEXT = " ".join(f"w{i}" for i in range(900))


def key(tenant: str) -> str:
    return f"key-{tenant}"


def make_gateway(
    *tenants: dict[str, Any],
    capacity: int = 8,
    engine: FakeEngine | None = None,
    model: dict[str, Any] | None = None,
) -> TestGateway:
    cfg = ServingConfig.model_validate(
        {
            "models": [{"name": MODEL, "source": "/x", **(model or {})}],
            "auth": {"required": True},
            "tenants": [{**t, "api_key_sha256": [hash_key(key(t["id"]))]} for t in tenants],
            "queue": {"default_capacity": capacity, "max_wait_s": 5},
        }
    )
    return TestGateway(cfg, {MODEL: engine or FakeEngine()})


@pytest.fixture
async def gw() -> AsyncIterator[TestGateway]:
    g = make_gateway({"id": "t", "tokens_per_minute": 10_000}, {"id": "strict", "allow_min_tokens": False,
                     "allow_ignore_eos": False, "max_n": 2, "max_prompts": 3})  # fmt: skip
    await g.service.probe_once()
    yield g
    await g.close()


def engine_of(gw: TestGateway) -> FakeEngine:
    engine = gw.engines[MODEL]
    assert isinstance(engine, FakeEngine)
    return engine


async def post(gw: TestGateway, tenant: str, body: dict[str, Any], path: str = "/v1/chat/completions") -> Any:
    return await gw.http.post(
        path, json={"model": MODEL, **body}, headers={"authorization": f"Bearer {key(tenant)}"}
    )


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MSG, **extra}


# ------------------------------------------------------------------ caps
async def test_n_4096_is_rejected_and_never_charged(gw: TestGateway) -> None:
    resp = await post(gw, "t", chat(n=4096, max_tokens=1000))
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (
        "fan_out_over_limit",
        "n",
        "invalid_request_error",
    )
    assert "8" in error["message"]  # the tenant's limit is named
    assert engine_of(gw).calls == []
    # the bucket was never charged: the next request finds it full
    ok = await post(gw, "t", chat(max_tokens=10))
    assert ok.status_code == 200
    expected = 10_000 - estimate_tokens({"messages": MSG, "max_tokens": 10})
    assert int(ok.headers["x-ratelimit-remaining-tokens"]) == expected


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        ("/v1/chat/completions", chat(n=3), "n", "fan_out_over_limit"),
        ("/v1/completions", {"prompt": "a", "best_of": 3, "n": 1}, "best_of", "fan_out_over_limit"),
        ("/v1/completions", {"prompt": ["a", "b", "c", "d"]}, "prompt", "fan_out_over_limit"),
        ("/v1/chat/completions", chat(min_tokens=5, max_tokens=10), "min_tokens", "parameter_not_allowed"),
        ("/v1/chat/completions", chat(ignore_eos=True), "ignore_eos", "parameter_not_allowed"),
    ],
)
async def test_caps_are_a_400_naming_the_parameter(
    gw: TestGateway, path: str, body: dict[str, Any], param: str, code: str
) -> None:
    resp = await post(gw, "strict", body, path)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert engine_of(gw).calls == []


async def test_within_the_caps_is_served(gw: TestGateway) -> None:
    assert (await post(gw, "strict", chat(n=2, max_tokens=4))).status_code == 200
    assert (
        await post(gw, "strict", {"prompt": ["a", "b", "c"], "max_tokens": 4}, "/v1/completions")
    ).status_code == 200
    assert (
        await post(gw, "strict", {"prompt": [1, 2, 3, 4, 5], "max_tokens": 4}, "/v1/completions")
    ).status_code == 200
    assert (await post(gw, "strict", chat(ignore_eos=False, min_tokens=0))).status_code == 200
    # defaults (max_n 8, max_prompts 64, both flags allowed): normal use is untouched
    assert (await post(gw, "t", chat(n=8, ignore_eos=True, min_tokens=2, max_tokens=4))).status_code == 200


async def test_a_tenant_without_caps_pays_for_every_sequence() -> None:
    """``max_n: null``: n=4096 passes the cap, and its estimate (4096 x 1000 output tokens)
    is more than the tenant's whole minute: 429, nothing charged."""
    g = make_gateway({"id": "wide", "max_n": None, "tokens_per_minute": 2_000_000})
    await g.service.probe_once()
    try:
        resp = await post(g, "wide", chat(n=4096, max_tokens=1000))
        assert resp.status_code == 429
        assert (resp.json()["error"]["type"], resp.json()["error"]["code"]) == (
            "tokens",
            "rate_limit_exceeded",
        )
        assert "whole limit" in resp.json()["error"]["message"]
        ok = await post(g, "wide", chat(max_tokens=1))
        expected = 2_000_000 - estimate_tokens({"messages": MSG, "max_tokens": 1})
        assert int(ok.headers["x-ratelimit-remaining-tokens"]) == expected
    finally:
        await g.close()


# ------------------------------------------------------------------ pricing
async def test_estimate_counts_n_times_prompts(gw: TestGateway) -> None:
    body = {"prompt": ["one", "two", "three"], "n": 2, "max_tokens": 10}
    resp = await post(gw, "t", body, "/v1/completions")
    assert resp.status_code == 200
    estimate = prompt_tokens(body) + 10 * 2 * 3
    assert estimate == estimate_tokens(body)
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) == 10_000 - estimate


async def test_missing_output_limit_is_filled_in() -> None:
    """The tenant's cap, else the model's default bounded by its context after the prompt."""
    g = make_gateway(
        {"id": "t"},
        {"id": "short", "max_output_tokens": 16},
        model={"engine_kwargs": {"max_model_len": 2048}, "default_max_tokens": 4096},
    )
    await g.service.probe_once()
    calls = engine_of(g).calls
    try:
        assert (await post(g, "t", chat())).status_code == 200
        body = calls[-1][1]
        assert body["max_tokens"] == 2048 - prompt_tokens(body, 3.0)  # bounded by the context
        assert (await post(g, "short", chat())).status_code == 200
        assert calls[-1][1]["max_tokens"] == 16  # the tenant's cap
        assert (await post(g, "t", {"prompt": "hi"}, "/v1/completions")).status_code == 200
        assert calls[-1][1]["max_tokens"] < 2048
        assert (await post(g, "short", {"input": "hi"}, "/v1/responses")).status_code == 200
        assert calls[-1][1]["max_output_tokens"] == 16
        assert "max_tokens" not in calls[-1][1]
        assert (await post(g, "t", chat(max_completion_tokens=7))).status_code == 200
        assert "max_tokens" not in calls[-1][1]  # the client's own limit is kept as it is
    finally:
        await g.close()


def test_model_default_is_used_without_a_context() -> None:
    g = make_gateway({"id": "t"}, model={"default_max_tokens": 300})
    ctx = RequestContext("r", Endpoint.chat, MODEL, chat(n=2), tenant=Tenant(id="t"))
    cost = g.service._limits.apply(ctx)
    assert ctx.body["max_tokens"] == 300
    assert (cost.sequences, cost.output_tokens) == (2, 600)
    assert cost.tokens == prompt_tokens(ctx.body) + 600


# ------------------------------------------------------------------ lease weight
async def test_a_weight_4_request_on_capacity_4_runs_alone() -> None:
    engine = FakeEngine(" ".join(["w"] * 30))
    engine.chunk_delay_s = 0.01
    g = make_gateway({"id": "t"}, capacity=4, engine=engine)
    await g.service.probe_once()
    service = g.service
    tenant = service.authenticate({"authorization": f"Bearer {key('t')}"})
    started: list[str] = []

    async def one(name: str, n: int, hold: asyncio.Event | None = None) -> None:
        ctx = RequestContext(name, Endpoint.chat, MODEL, chat(n=n, max_tokens=4, stream=True), tenant=tenant)
        flight = service.open(name, WireEndpoint.chat)
        answer = await service.run(ctx, flight)
        started.append(name)
        assert answer.stream is not None
        try:
            async for _ in answer.stream:
                if hold is not None:
                    await hold.wait()
        finally:
            await answer.stream.aclose()

    try:
        hold = asyncio.Event()
        first = asyncio.create_task(one("first", 1, hold))
        for _ in range(100):
            if started:
                break
            await asyncio.sleep(0.01)
        heavy = asyncio.create_task(one("heavy", 4, hold))
        await asyncio.sleep(0.1)
        light = asyncio.create_task(one("light", 1))  # arrives after the heavy one
        await asyncio.sleep(0.2)
        snap = await service.admission.snapshot(MODEL)
        assert (started, snap.in_use) == (["first"], 1)  # 3 slots free: not enough for 4
        assert snap.depth["standard"] == 2  # and the light one does not overtake it
        hold.set()
        await first
        for _ in range(100):
            if "heavy" in started:
                break
            await asyncio.sleep(0.01)
        assert started[:2] == ["first", "heavy"]
        await asyncio.gather(heavy, light)
        assert started == ["first", "heavy", "light"]
        assert (await service.admission.snapshot(MODEL)).in_use == 0
    finally:
        await g.close()


async def test_heavier_than_the_capacity_is_capped_and_runs_alone() -> None:
    admission = Admission(None, QueueConfig(default_capacity=4), [MODEL])
    heavy = await admission.acquire(MODEL, Tenant(id="a"), None, weight=4096)
    assert heavy.weight == 4
    assert (await admission.snapshot(MODEL)).in_use == 4
    waiting = asyncio.create_task(admission.acquire(MODEL, Tenant(id="b"), None))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await admission.release(heavy)
    light = await asyncio.wait_for(waiting, 1)
    assert (await admission.snapshot(MODEL)).in_use == 1
    await admission.release(light)


async def test_a_waiting_heavy_request_that_leaves_unblocks_the_queue() -> None:
    admission = Admission(None, QueueConfig(default_capacity=4), [MODEL])
    held = await admission.acquire(MODEL, Tenant(id="a"), None)
    heavy = asyncio.create_task(admission.acquire(MODEL, Tenant(id="a"), None, weight=4))
    await asyncio.sleep(0.02)
    light = asyncio.create_task(admission.acquire(MODEL, Tenant(id="a"), None))
    await asyncio.sleep(0.02)
    assert not light.done()  # behind the heavy head (same tenant: its start tag is later)
    heavy.cancel()
    lease = await asyncio.wait_for(light, 1)
    assert (await admission.snapshot(MODEL)).in_use == 2
    await admission.release(lease)
    await admission.release(held)


async def test_local_queue_charges_fair_share_by_weight() -> None:
    """Two tenants of equal weight, one asking 2 slots a request, one 1: under overload each
    gets half of the slot-time (the heavy one half as many requests)."""
    admission = Admission(None, QueueConfig(default_capacity=4), [MODEL])
    counts: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()

    async def worker(tenant: Tenant, weight: int) -> None:
        while not stop.is_set():
            lease = await admission.acquire(MODEL, tenant, None, weight=weight)
            if not stop.is_set():
                counts[tenant.id] += weight
            await asyncio.sleep(0.005)
            await admission.release(lease)

    tasks = [asyncio.create_task(worker(Tenant(id="heavy"), 2)) for _ in range(12)]
    tasks += [asyncio.create_task(worker(Tenant(id="light"), 1)) for _ in range(12)]
    await asyncio.sleep(0.3)
    counts.clear()
    await asyncio.sleep(1.5)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    share = counts["heavy"] / (counts["heavy"] + counts["light"])
    assert abs(share - 0.5) <= 0.05, counts


# ------------------------------------------------------------------ honest accounting
async def _stream_and_cut(gw: TestGateway, tenant: Tenant, request_id: str, chunks: int) -> dict[str, str]:
    """A stream the client closes after ``chunks`` chunks; the answer's rate-limit headers."""
    body = chat(max_tokens=900, stream=True)
    ctx = RequestContext(request_id, Endpoint.chat, MODEL, body, tenant=tenant)
    flight = gw.service.open(request_id, WireEndpoint.chat)
    answer = await gw.service.run(ctx, flight)
    assert answer.stream is not None
    try:
        for _ in range(chunks):
            await anext(answer.stream)
    finally:
        await answer.stream.aclose()  # the client went away: 499
    assert flight.status == 499
    return ctx.response_headers


async def test_streams_cut_short_pay_for_what_they_streamed() -> None:
    """Six 900-token streams, each closed after 5 chunks, under 2,000 tokens a minute: each
    is pre-charged its whole estimate, then pays its prompt plus the 5 tokens it got. All
    six run (the unused reservation comes back), and the bucket is not left full."""
    engine = FakeEngine(LONG_TEXT)
    engine.chunk_delay_s = 0.001
    g = make_gateway({"id": "tpm", "tokens_per_minute": 2000}, engine=engine)
    await g.service.probe_once()
    tenant = g.service.authenticate({"authorization": f"Bearer {key('tpm')}"})
    loop = asyncio.get_running_loop()
    try:
        began = loop.time()
        for i in range(6):
            headers = await _stream_and_cut(g, tenant, f"cut-{i}", chunks=5)
            assert int(headers["x-ratelimit-remaining-tokens"]) < 2000 - 900  # pre-charged in full
        probe = chat(max_tokens=1)
        after = await post(g, "tpm", probe)
        elapsed = loop.time() - began
        remaining = int(after.headers["x-ratelimit-remaining-tokens"])
        prompt = prompt_tokens(chat(max_tokens=900))
        owed = 6 * (prompt + 5)  # the first chunk carries the first word: 5 tokens streamed
        refill = 2000 / 60 * elapsed + 1
        full = 2000 - estimate_tokens(probe)
        assert remaining < full  # charged, not refunded
        assert full - owed - 1 <= remaining <= full - owed + refill, (remaining, full, owed, refill)
        assert engine.cancelled == 6
    finally:
        await g.close()


async def test_usage_wins_and_nothing_delivered_is_refunded() -> None:
    engine = FakeEngine(LONG_TEXT)
    g = make_gateway({"id": "tpm", "tokens_per_minute": 100_000}, engine=engine)
    await g.service.probe_once()
    tenant = g.service.authenticate({"authorization": f"Bearer {key('tpm')}"})
    charges: list[int] = []
    limiter = g.service.flights.limiter
    correct = limiter.correct_tokens

    async def recorded(t: Tenant, delta: int) -> None:
        charges.append(delta)
        await correct(t, delta)

    limiter.correct_tokens = recorded  # type: ignore[method-assign]
    body = chat(max_tokens=2000, stream=True)
    estimate = estimate_tokens(body)
    try:
        # read to the end: the engine's usage chunk corrects the charge, up or down
        ctx = RequestContext("whole", Endpoint.chat, MODEL, dict(body), tenant=tenant)
        answer = await g.service.run(ctx, g.service.open("whole", WireEndpoint.chat))
        assert answer.stream is not None
        text = "".join([c async for c in answer.stream])
        await answer.stream.aclose()
        assert streamed_tokens(text) == 900
        assert charges[-1] == (5 + 900) - estimate  # FakeEngine's usage: 5 prompt tokens
        # the client did not ask for usage: the engine was asked all the same (the charge
        # above is its count), and the client's stream carries none
        assert engine.calls[-1][1]["stream_options"] == {"include_usage": True}
        assert '"usage"' not in text
        assert text.endswith("data: [DONE]\n\n")
        # the engine fails before its first byte: nothing delivered, all refunded
        engine.healthy = True

        async def broken(*_: Any) -> AsyncIterator[Any]:
            raise RuntimeError("engine down")
            yield  # pragma: no cover

        engine.generate = broken  # type: ignore[method-assign]
        ctx = RequestContext("failed", Endpoint.chat, MODEL, dict(body), tenant=tenant)
        with pytest.raises(GatewayError):
            await g.service.run(ctx, g.service.open("failed", WireEndpoint.chat))
        assert charges[-1] == -estimate

        # it fails mid-stream after 3 chunks: it pays its prompt and those 3 tokens
        async def mid(*_: Any) -> AsyncIterator[Any]:
            from serving.engine.protocol import EngineSSE

            for word in ("a", "b", "c"):
                yield EngineSSE(f'data: {{"choices":[{{"index":0,"delta":{{"content":"{word}"}}}}]}}\n\n')
            raise RuntimeError("lost the GPU")

        engine.generate = mid  # type: ignore[method-assign]
        ctx = RequestContext("mid", Endpoint.chat, MODEL, dict(body), tenant=tenant)
        flight = g.service.open("mid", WireEndpoint.chat)
        answer = await g.service.run(ctx, flight)
        assert answer.stream is not None
        _ = [c async for c in answer.stream]
        await answer.stream.aclose()
        assert flight.status == 502
        assert charges[-1] == (prompt_tokens(body) + 3) - estimate
    finally:
        await g.close()


def test_streamed_tokens_counts_deltas_of_each_shape() -> None:
    chat_chunk = (
        'data: {"choices":[{"index":0,"delta":{"content":"Par"}},'
        '{"index":1,"delta":{"reasoning_content":"x"}}]}'
    )
    role = 'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}'
    tool = 'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}'
    completion = 'data: {"choices":[{"index":0,"text":" is"}]}'
    responses = 'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"hi"}'
    usage = 'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":9}}'
    text = "\n\n".join([chat_chunk, role, tool, completion, responses, usage, "data: [DONE]"]) + "\n\n"
    assert streamed_tokens(text) == 2 + 0 + 1 + 1 + 1 + 0
