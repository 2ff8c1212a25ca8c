"""Background responses (``serving/gateway/background.py``), in process, on a real Redis.

Two gateway replicas share one Redis and one scripted Responses engine that streams one
delta per tick and notes when its stream is closed (the engine request aborted). A
background response created through one replica is polled, streamed, resumed with
``starting_after``, cancelled and deleted through the other; another tenant gets 404 for
all of it; a replica that dies leaves its response to the other's sweeper; the limits
and bad input have their errors; the OpenAI SDK's calls work unchanged.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from serving.engine.protocol import EngineJSON, EngineSSE
from serving.gateway.background import Background
from serving.gateway.tenants import hash_key
from serving.wire import Endpoint
from tests.fakes import FakeEngine
from tests.gateway import TestGateway, config_for

MODEL = "m"
KEYS = {"a": "key-a", "b": "key-b"}


class SlowResponses(FakeEngine):
    """A Responses engine streaming ``words`` deltas, one per ``tick_s``; ``gate`` holds
    the first event back; ``closed`` counts streams closed before their end."""

    def __init__(self, words: int = 5, tick_s: float = 0.01) -> None:
        super().__init__()
        self.words = words
        self.tick_s = tick_s
        self.bodies: list[dict[str, Any]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self.closed = 0
        self.finished = 0

    async def generate(
        self, endpoint: Endpoint, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncIterator[EngineJSON | EngineSSE]:
        assert endpoint is Endpoint.responses
        self.bodies.append(body)
        text = " ".join(f"w{i}" for i in range(self.words))
        response = {
            "id": f"resp_engine_{uuid.uuid4().hex}",
            "object": "response",
            "created_at": 1,
            "model": body["model"],
            "status": "completed",
            "background": False,
            "output": [
                {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                 "content": [{"type": "output_text", "text": text, "annotations": []}]},
            ],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": 3, "output_tokens": self.words, "total_tokens": 3 + self.words},
        }  # fmt: skip
        if not body.get("stream"):
            yield EngineJSON(200, response)
            return
        done = False
        try:
            await self.gate.wait()
            created = {"type": "response.created", "sequence_number": 0,
                       "response": {**response, "status": "in_progress", "output": []}}  # fmt: skip
            yield EngineSSE(f"event: response.created\ndata: {json.dumps(created)}\n\n")
            self.started.set()
            for i in range(self.words):
                await asyncio.sleep(self.tick_s)
                delta = {"type": "response.output_text.delta", "sequence_number": i + 1, "delta": f" w{i}"}
                yield EngineSSE(f"event: response.output_text.delta\ndata: {json.dumps(delta)}\n\n")
            final = {"type": "response.completed", "sequence_number": self.words + 1, "response": response}
            done = True  # (the reader may close the stream as soon as it has the last event)
            self.finished += 1
            yield EngineSSE(f"event: response.completed\ndata: {json.dumps(final)}\n\n")
        finally:
            if not done:
                self.closed += 1


def _config(prefix: str, **responses: Any) -> Any:
    return config_for(
        [MODEL],
        auth={"required": True},
        tenants=[{"id": t, "api_key_sha256": [hash_key(k)]} for t, k in KEYS.items()],
        responses={"key_prefix": prefix, "background_orphan_after_s": 1.0, **responses},
        queue={"key_prefix": prefix},
    )


async def _pair(
    redis_client: Any, engine: SlowResponses, **responses: Any
) -> tuple[TestGateway, TestGateway]:
    cfg = _config(f"bg-{uuid.uuid4().hex[:8]}", **responses)
    one, two = (
        TestGateway(cfg, {MODEL: engine}, redis_client),
        TestGateway(cfg, {MODEL: engine}, redis_client),
    )
    for g in (one, two):
        await g.service.probe_once()
        await g.service.start()
    return one, two


@pytest.fixture
async def engine() -> SlowResponses:
    return SlowResponses()


@pytest.fixture
async def pair(redis_client: Any, engine: SlowResponses) -> AsyncIterator[tuple[TestGateway, TestGateway]]:
    one, two = await _pair(redis_client, engine)
    yield one, two
    for g in (one, two):
        await g.close()


def auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


BODY = {"model": MODEL, "input": "write", "background": True}


async def _poll(gw: TestGateway, rid: str, until: set[str], tenant: str = "a", timeout_s: float = 10) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = await gw.http.get(f"/v1/responses/{rid}", headers=auth(tenant))
        assert got.status_code == 200, got.text
        if got.json()["status"] in until:
            return got.json()
        assert time.monotonic() < deadline, f"still {got.json()['status']}"
        await asyncio.sleep(0.02)


def _events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


async def test_created_queued_and_polled_to_completion_through_the_other_replica(
    pair: tuple[TestGateway, TestGateway], engine: SlowResponses
) -> None:
    one, two = pair
    engine.gate.clear()  # held in the engine: the response stays queued until it starts
    created = await one.http.post("/v1/responses", json=BODY, headers=auth("a"))
    assert created.status_code == 200, created.text
    queued = created.json()
    assert (queued["status"], queued["background"], queued["store"]) == ("queued", True, True)
    assert queued["id"].startswith("resp_")
    assert queued["output"] == []
    assert (await _poll(two, queued["id"], {"queued"}))["id"] == queued["id"]
    engine.gate.set()
    await engine.started.wait()
    done = await _poll(two, queued["id"], {"completed"})
    assert done["id"] == queued["id"]  # the engine's own id never shows
    assert done["background"] is True
    assert done["output"][0]["content"][0]["text"] == "w0 w1 w2 w3 w4"
    sent = engine.bodies[-1]
    assert sent["store"] is False
    assert "background" not in sent
    assert sent["stream"] is True
    # continued like any stored response, through either replica
    nxt = await one.http.post(
        "/v1/responses",
        json={"model": MODEL, "input": "more", "previous_response_id": queued["id"]},
        headers=auth("a"),
    )
    assert nxt.status_code == 200
    assert [i.get("role") for i in engine.bodies[-1]["input"]] == ["user", "assistant", "user"]
    assert one.metric("oss_serving_background_responses_total", outcome="completed") == 1


async def test_the_stream_is_resumed_after_a_sequence_number_through_the_other_replica(
    pair: tuple[TestGateway, TestGateway],
) -> None:
    one, two = pair
    async with one.http.stream(
        "POST", "/v1/responses", json={**BODY, "stream": True}, headers=auth("a")
    ) as r:
        assert r.status_code == 200
        text = "".join([part async for part in r.aiter_text()])
    events = _events(text)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.queued"
    assert events[-1]["type"] == "response.completed"
    rid = events[0]["response"]["id"]
    assert {e["response"]["id"] for e in events if "response" in e} == {rid}
    resumed = await two.http.get(f"/v1/responses/{rid}?stream=true&starting_after=2", headers=auth("a"))
    assert resumed.status_code == 200
    assert _events(resumed.text) == events[3:]
    whole = await two.http.get(f"/v1/responses/{rid}?stream=true", headers=auth("a"))
    assert _events(whole.text) == events
    bad = await two.http.get(f"/v1/responses/{rid}?stream=true&starting_after=x", headers=auth("a"))
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "starting_after")


async def test_a_reader_on_the_other_replica_follows_the_live_stream_to_its_end(
    redis_client: Any,
) -> None:
    engine = SlowResponses(words=20, tick_s=0.03)
    one, two = await _pair(redis_client, engine)
    try:
        rid = (await one.http.post("/v1/responses", json=BODY, headers=auth("a"))).json()["id"]
        await engine.started.wait()
        live = await two.http.get(f"/v1/responses/{rid}?stream=true&starting_after=0", headers=auth("a"))
        events = _events(live.text)
        assert events[0]["sequence_number"] == 1
        assert events[-1]["type"] == "response.completed"
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert deltas.split() == [f"w{i}" for i in range(20)]
    finally:
        for g in (one, two):
            await g.close()


async def test_cancel_through_the_other_replica_aborts_the_engine_request(redis_client: Any) -> None:
    engine = SlowResponses(words=10_000, tick_s=0.01)
    one, two = await _pair(redis_client, engine)
    try:
        rid = (await one.http.post("/v1/responses", json=BODY, headers=auth("a"))).json()["id"]
        await engine.started.wait()
        await _poll(two, rid, {"in_progress"})
        cancelled = await two.http.post(f"/v1/responses/{rid}/cancel", headers=auth("a"))
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        deadline = time.monotonic() + 5
        while engine.closed == 0:  # the owner replica saw it and closed the engine stream
            assert time.monotonic() < deadline, "the engine request was not aborted"
            await asyncio.sleep(0.02)
        assert engine.finished == 0
        assert (await _poll(one, rid, {"cancelled"}))["status"] == "cancelled"
        assert one.service.background.running == 0  # type: ignore[attr-defined]
        # its stream ends; a second cancel returns it as it is
        assert (await one.http.get(f"/v1/responses/{rid}?stream=true", headers=auth("a"))).status_code == 200
        again = await one.http.post(f"/v1/responses/{rid}/cancel", headers=auth("a"))
        assert (again.status_code, again.json()["status"]) == (200, "cancelled")
        # the slot is free: the queue holds nothing for it
        snapshot = await one.service.admission.snapshot(MODEL)
        assert snapshot.in_use == 0
    finally:
        for g in (one, two):
            await g.close()


async def test_a_queued_response_cancelled_never_reaches_the_engine_answer(
    pair: tuple[TestGateway, TestGateway], engine: SlowResponses
) -> None:
    one, two = pair
    engine.gate.clear()
    rid = (await one.http.post("/v1/responses", json=BODY, headers=auth("a"))).json()["id"]
    cancelled = await two.http.post(f"/v1/responses/{rid}/cancel", headers=auth("a"))
    assert cancelled.json()["status"] == "cancelled"
    deadline = time.monotonic() + 5
    while one.service.background.running:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    engine.gate.set()
    await asyncio.sleep(0.1)
    assert engine.finished == 0
    assert (await _poll(one, rid, {"cancelled"}))["output"] == []


async def test_deleting_a_running_response_cancels_it(redis_client: Any) -> None:
    engine = SlowResponses(words=10_000, tick_s=0.01)
    one, two = await _pair(redis_client, engine)
    try:
        rid = (await one.http.post("/v1/responses", json=BODY, headers=auth("a"))).json()["id"]
        await engine.started.wait()
        deleted = await two.http.delete(f"/v1/responses/{rid}", headers=auth("a"))
        assert deleted.json() == {"id": rid, "object": "response", "deleted": True}
        deadline = time.monotonic() + 5
        while engine.closed == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert (await one.http.get(f"/v1/responses/{rid}", headers=auth("a"))).status_code == 404
    finally:
        for g in (one, two):
            await g.close()


async def test_another_tenant_gets_404_for_all_of_it(
    pair: tuple[TestGateway, TestGateway], engine: SlowResponses
) -> None:
    one, two = pair
    engine.gate.clear()
    rid = (await one.http.post("/v1/responses", json=BODY, headers=auth("a"))).json()["id"]
    for method, path in (
        ("GET", f"/v1/responses/{rid}"),
        ("GET", f"/v1/responses/{rid}?stream=true"),
        ("POST", f"/v1/responses/{rid}/cancel"),
        ("DELETE", f"/v1/responses/{rid}"),
        ("GET", f"/v1/responses/{rid}/input_items"),
    ):
        got = await two.http.request(method, path, headers=auth("b"))
        assert got.status_code == 404, (method, path, got.text)
        assert got.json()["error"]["code"] == "response_not_found"
    engine.gate.set()
    assert (await _poll(one, rid, {"completed"}))["status"] == "completed"


async def test_a_replica_that_dies_leaves_its_response_to_the_other_replicas_sweeper(
    redis_client: Any,
) -> None:
    engine = SlowResponses(words=10_000, tick_s=0.01)
    one, two = await _pair(redis_client, engine)
    try:
        rid = (
            await one.http.post("/v1/responses", json={**BODY, "stream": False}, headers=auth("a"))
        ).json()["id"]
        await engine.started.wait()
        dead = one.service.background
        assert isinstance(dead, Background)
        # the replica dies: its tasks stop without a word to Redis, its heartbeats stop
        for task in [dead._loop_task, *(r.task for r in dead._runs.values())]:
            assert task is not None
            task.cancel()
        await asyncio.sleep(0.05)
        survivor = two.service.background
        assert isinstance(survivor, Background)
        assert await survivor.sweep() == 0  # heartbeats are still fresh
        await asyncio.sleep(1.2)  # background_orphan_after_s
        # this sweep or the survivor's own upkeep loop (every 0.5 s here) fails it, once
        await survivor.sweep()
        failed = await _poll(two, rid, {"failed"})
        assert failed["error"]["code"] == "server_error"
        assert "stopped" in failed["error"]["message"]
        stream = await two.http.get(f"/v1/responses/{rid}?stream=true", headers=auth("a"))
        assert stream.status_code == 200  # the stream ends
        assert two.metric("oss_serving_background_responses_total", outcome="lost") == 1
    finally:
        for g in (one, two):
            await g.close()


async def test_a_replica_stopped_drains_then_fails_its_running_responses(redis_client: Any) -> None:
    """Stopped gracefully: a running response that ends within ``background_drain_s``
    completes; one that does not is failed at the end of the drain."""
    engine = SlowResponses(words=10_000, tick_s=0.01)
    one, two = await _pair(redis_client, engine, background_drain_s=0.5)
    try:
        long = (await one.http.post("/v1/responses", json=BODY, headers=auth("a"))).json()["id"]
        await engine.started.wait()
        engine.words = 20  # the next one ends in about 0.2 s
        engine.started.clear()
        short = (await one.http.post("/v1/responses", json=BODY, headers=auth("a"))).json()["id"]
        await engine.started.wait()
        started = time.monotonic()
        await one.service.stop()
        assert time.monotonic() - started < 3
        assert (await _poll(two, short, {"completed"}))["status"] == "completed"
        failed = await _poll(two, long, {"failed"})
        assert failed["error"]["code"] == "server_error"
        assert engine.closed == 1
    finally:
        await one.http.aclose()
        await two.close()


async def test_queued_responses_of_a_stopped_replica_run_on_another(redis_client: Any) -> None:
    """Still waiting for an engine when their replica stops gracefully: handed over, the
    other replica's next sweep adopts them and they complete there, once."""
    engine = SlowResponses()
    engine.gate.clear()
    one, two = await _pair(redis_client, engine)
    try:
        ids = [
            (await one.http.post("/v1/responses", json=BODY, headers=auth("a"))).json()["id"]
            for _ in range(3)
        ]
        await asyncio.sleep(0.1)
        await one.service.stop()
        for rid in ids:
            assert (await _poll(two, rid, {"queued"}))["status"] == "queued"
        engine.gate.set()
        survivor = two.service.background
        assert isinstance(survivor, Background)
        assert await survivor.sweep() == 0  # adopted, not failed
        for rid in ids:
            done = await _poll(two, rid, {"completed"})
            assert done["id"] == rid
        assert two.metric("oss_serving_background_responses_total", outcome="adopted") == 3
        assert engine.finished == 3
        whole = await two.http.get(f"/v1/responses/{ids[0]}?stream=true", headers=auth("a"))
        events = _events(whole.text)
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert events[0]["type"] == "response.queued"
        assert events[-1]["type"] == "response.completed"
    finally:
        await one.http.aclose()
        await two.close()


async def test_a_queued_response_of_a_dead_replica_is_adopted_after_its_heartbeats_stop(
    redis_client: Any,
) -> None:
    engine = SlowResponses()
    engine.gate.clear()
    one, two = await _pair(redis_client, engine)
    try:
        rid = (await one.http.post("/v1/responses", json=BODY, headers=auth("a"))).json()["id"]
        dead = one.service.background
        assert isinstance(dead, Background)
        for task in [dead._loop_task, *(r.task for r in dead._runs.values())]:  # killed: no word
            assert task is not None
            task.cancel()
        await asyncio.sleep(0.05)
        survivor = two.service.background
        assert isinstance(survivor, Background)
        await survivor.sweep()
        assert survivor.running == 0  # its heartbeats are still fresh
        engine.gate.set()
        await asyncio.sleep(1.2)  # background_orphan_after_s
        await survivor.sweep()
        assert (await _poll(two, rid, {"completed"}))["status"] == "completed"
    finally:
        for g in (one, two):
            await g.close()


async def test_bad_input_and_the_tenants_limit(redis_client: Any) -> None:
    engine = SlowResponses()
    engine.gate.clear()
    one, two = await _pair(redis_client, engine, max_background_per_tenant=2)
    try:
        no_store = await one.http.post("/v1/responses", json={**BODY, "store": False}, headers=auth("a"))
        assert no_store.status_code == 400
        assert "store" in no_store.json()["error"]["message"]
        wrong = await one.http.post("/v1/responses", json={**BODY, "background": "yes"}, headers=auth("a"))
        assert wrong.status_code == 400
        missing = await one.http.post(
            "/v1/responses", json={**BODY, "previous_response_id": "resp_nope"}, headers=auth("a")
        )
        assert (missing.status_code, missing.json()["error"]["code"]) == (404, "previous_response_not_found")
        for _ in range(2):
            assert (await one.http.post("/v1/responses", json=BODY, headers=auth("a"))).status_code == 200
        over = await two.http.post("/v1/responses", json=BODY, headers=auth("a"))
        assert (over.status_code, over.json()["error"]["code"]) == (429, "too_many_background_responses")
        assert (await two.http.post("/v1/responses", json=BODY, headers=auth("b"))).status_code == 200
        plain = await one.http.post("/v1/responses", json={"model": MODEL, "input": "x"}, headers=auth("a"))
        not_bg = await one.http.post(f"/v1/responses/{plain.json()['id']}/cancel", headers=auth("a"))
        assert (not_bg.status_code, not_bg.json()["error"]["code"]) == (400, "not_background")
        no_stream = await one.http.get(f"/v1/responses/{plain.json()['id']}?stream=true", headers=auth("a"))
        assert no_stream.status_code == 400
    finally:
        engine.gate.set()
        for g in (one, two):
            await g.close()


async def test_background_off_is_a_clear_400(redis_client: Any) -> None:
    engine = SlowResponses()
    one, two = await _pair(redis_client, engine, background=False)
    try:
        resp = await one.http.post("/v1/responses", json=BODY, headers=auth("a"))
        assert resp.status_code == 400
        assert (resp.json()["error"]["param"], resp.json()["error"]["code"]) == (
            "background",
            "unsupported_parameter",
        )
        assert engine.bodies == []
    finally:
        for g in (one, two):
            await g.close()


async def test_redis_down_at_creation_is_a_503(redis_client: Any) -> None:
    engine = SlowResponses()
    one, two = await _pair(redis_client, engine)
    try:
        background = one.service.background
        assert isinstance(background, Background)

        async def down(*args: Any, **kwargs: Any) -> Any:
            raise ConnectionError("Redis went away")

        background._transition = down
        resp = await one.http.post("/v1/responses", json=BODY, headers=auth("a"))
        assert (resp.status_code, resp.json()["error"]["code"]) == (503, "store_unavailable")
        assert engine.bodies == []
    finally:
        for g in (one, two):
            await g.close()


async def test_the_openai_sdk_calls_work_unchanged(redis_client: Any) -> None:
    engine = SlowResponses(words=10_000, tick_s=0.01)
    one, two = await _pair(redis_client, engine)
    try:
        a1, a2 = one.sdk(KEYS["a"]), two.sdk(KEYS["a"])
        created = await a1.responses.create(model=MODEL, input="write", background=True)
        assert created.status == "queued"
        assert created.background is True
        await engine.started.wait()
        assert (await a2.responses.retrieve(created.id)).status == "in_progress"
        cancelled = await a2.responses.cancel(created.id)
        assert cancelled.status == "cancelled"
        engine.words = 3
        streamed = await a1.responses.create(model=MODEL, input="write", background=True, stream=True)
        events = [event async for event in streamed]
        assert events[0].type == "response.queued"
        assert events[-1].type == "response.completed"
        assert [e.sequence_number for e in events] == list(range(len(events)))
        sid = events[0].response.id  # type: ignore[union-attr]
        resumed = await a2.responses.retrieve(sid, stream=True, starting_after=len(events) - 2)
        assert [event.type async for event in resumed] == ["response.completed"]
        assert (await a2.responses.retrieve(sid)).output_text == "w0 w1 w2"
        await a2.responses.delete(created.id)
        with pytest.raises(openai.NotFoundError):
            await a1.responses.retrieve(created.id)
    finally:
        for g in (one, two):
            await g.close()


async def test_a_reader_that_loses_redis_ends_with_a_503_event(
    pair: tuple[TestGateway, TestGateway], engine: SlowResponses, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, two = pair
    engine.gate.clear()
    rid = (await one.http.post("/v1/responses", json=BODY, headers=auth("a"))).json()["id"]
    reader = two.service.background
    assert isinstance(reader, Background)
    monkeypatch.setattr("serving.gateway.background.READER_REDIS_DOWN_S", 0.2)

    class Down:
        def __getattr__(self, name: str) -> Any:
            async def fail(*args: Any, **kwargs: Any) -> Any:
                raise ConnectionError("Redis went away")

            return fail

    events = await reader.events("a", rid, 0)
    reader._redis = Down()
    text = "".join([part async for part in events])
    assert "store_unavailable" in text
    assert text.startswith("event: error\n")
    engine.gate.set()


async def test_an_append_that_timed_out_after_it_ran_is_retried_without_duplicates(
    pair: tuple[TestGateway, TestGateway],
) -> None:
    """Redis ran the append but the answer came too late (the guard's call budget): the
    retry adds nothing twice, and the stream keeps every event once, in order."""
    one, two = pair
    background = one.service.background
    assert isinstance(background, Background)
    real = background._append
    calls = 0

    async def late(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        result = await real(*args, **kwargs)
        if calls % 2 == 1:
            raise TimeoutError("Redis did not answer within 0.25 s")
        return result

    background._append = late
    async with one.http.stream(
        "POST", "/v1/responses", json={**BODY, "stream": True}, headers=auth("a")
    ) as r:
        text = "".join([part async for part in r.aiter_text()])
    events = _events(text)
    assert calls > 2
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed"
    rid = events[0]["response"]["id"]
    again = await two.http.get(f"/v1/responses/{rid}?stream=true", headers=auth("a"))
    assert _events(again.text) == events
