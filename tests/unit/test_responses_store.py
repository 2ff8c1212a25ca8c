"""Stored responses (``serving/gateway/responses.py``), in process, on a real Redis.

Two gateway replicas share one Redis: a response stored through one is retrieved and
continued (``previous_response_id``) through the other; the engine gets the whole
conversation and ``store: false``; another tenant gets 404 for everything; the quota and
the store's Redis failures have their errors; the OpenAI SDK's calls work unchanged.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from serving.engine.protocol import EngineJSON, EngineSSE
from serving.gateway.tenants import hash_key
from serving.wire import Endpoint
from tests.fakes import FakeEngine
from tests.gateway import TestGateway, config_for

MODEL = "m"
KEYS = {"a": "key-a", "b": "key-b"}


class ResponsesEngine(FakeEngine):
    """A Responses-speaking engine: answers with the turn number, records every body."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict[str, Any]] = []

    async def generate(
        self, endpoint: Endpoint, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncIterator[EngineJSON | EngineSSE]:
        assert endpoint is Endpoint.responses
        self.bodies.append(body)
        turn = len(self.bodies)
        response = {
            "id": f"resp_{uuid.uuid4().hex}",
            "object": "response",
            "created_at": 1,
            "model": body["model"],
            "status": "completed",
            "store": body.get("store"),
            "previous_response_id": body.get("previous_response_id"),
            "output": [
                {"id": f"rs_{turn}", "type": "reasoning", "summary": [], "status": None,
                 "content": [{"type": "reasoning_text", "text": f"thinking {turn}"}]},
                {"id": f"msg_out_{turn}", "type": "message", "role": "assistant", "status": "completed",
                 "content": [{"type": "output_text", "text": f"answer {turn}", "annotations": []}]},
            ],
            "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7},
        }  # fmt: skip
        if not body.get("stream"):
            yield EngineJSON(200, response)
            return
        events = [
            {
                "type": "response.created",
                "sequence_number": 0,
                "response": {**response, "status": "in_progress"},
            },
            {"type": "response.output_text.delta", "sequence_number": 1, "delta": f"answer {turn}"},
            {"type": "response.completed", "sequence_number": 2, "response": response},
        ]
        for event in events:
            yield EngineSSE(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n")


def _config(prefix: str, **responses: Any) -> Any:
    return config_for(
        [MODEL],
        auth={"required": True},
        tenants=[{"id": t, "api_key_sha256": [hash_key(k)]} for t, k in KEYS.items()],
        responses={"key_prefix": prefix, **responses},
        queue={"key_prefix": prefix},
    )


@pytest.fixture
async def pair(redis_client: Any) -> AsyncIterator[tuple[TestGateway, TestGateway, ResponsesEngine]]:
    """Two gateway replicas over one engine and one Redis."""
    engine = ResponsesEngine()
    cfg = _config(f"rs-{uuid.uuid4().hex[:8]}")
    one, two = (
        TestGateway(cfg, {MODEL: engine}, redis_client),
        TestGateway(cfg, {MODEL: engine}, redis_client),
    )
    for g in (one, two):
        await g.service.probe_once()
    yield one, two, engine
    for g in (one, two):
        await g.close()


def auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


async def test_stored_on_one_replica_retrieved_and_continued_on_the_other(
    pair: tuple[TestGateway, TestGateway, ResponsesEngine],
) -> None:
    one, two, engine = pair
    first = await one.http.post("/v1/responses", json={"model": MODEL, "input": "hello"}, headers=auth("a"))
    assert first.status_code == 200
    body = first.json()
    assert body["store"] is True  # as the client asked (OpenAI's default) ...
    assert engine.bodies[-1]["store"] is False  # ... though the engine keeps nothing
    got = await two.http.get(f"/v1/responses/{body['id']}", headers=auth("a"))
    assert got.status_code == 200
    assert got.json() == body
    second = await two.http.post(
        "/v1/responses",
        json={
            "model": MODEL,
            "input": "and then?",
            "previous_response_id": body["id"],
            "instructions": "be brief",
        },
        headers=auth("a"),
    )
    assert second.status_code == 200
    assert second.json()["previous_response_id"] == body["id"]
    sent = engine.bodies[-1]
    assert "previous_response_id" not in sent
    assert sent["store"] is False
    assert sent["instructions"] == "be brief"
    kinds = [(i.get("type"), i.get("role")) for i in sent["input"]]
    assert kinds == [("message", "user"), ("reasoning", None), ("message", "assistant"), ("message", "user")]
    assert sent["input"][0]["content"] == [{"type": "input_text", "text": "hello"}]
    assert "id" not in sent["input"][0]  # the ids the gateway gave its own items stay here
    assert "status" not in sent["input"][1]  # None fields of output items are left out
    assert sent["input"][2]["content"][0]["text"] == "answer 1"
    # a third turn, back on the first replica, carries the whole conversation
    follow = {"previous_response_id": second.json()["id"]}
    third = await one.http.post(
        "/v1/responses",
        json={"model": MODEL, "input": [{"role": "user", "content": "last"}], **follow},
        headers=auth("a"),
    )
    assert third.status_code == 200
    texts = [json.dumps(i["content"]) for i in engine.bodies[-1]["input"] if i.get("type") == "message"]
    assert [
        ("hello" in t, "answer 1" in t, "and then?" in t, "answer 2" in t, "last" in t) for t in texts
    ] == [
        (True, False, False, False, False),
        (False, True, False, False, False),
        (False, False, True, False, False),
        (False, False, False, True, False),
        (False, False, False, False, True),
    ]


async def test_another_tenant_gets_404_for_everything(
    pair: tuple[TestGateway, TestGateway, ResponsesEngine],
) -> None:
    one, two, engine = pair
    rid = (
        await one.http.post("/v1/responses", json={"model": MODEL, "input": "x"}, headers=auth("a"))
    ).json()["id"]
    calls = len(engine.bodies)
    for method, path in (
        ("GET", f"/v1/responses/{rid}"),
        ("GET", f"/v1/responses/{rid}/input_items"),
        ("DELETE", f"/v1/responses/{rid}"),
        ("POST", f"/v1/responses/{rid}/cancel"),
    ):
        resp = await two.http.request(method, path, headers=auth("b"))
        assert resp.status_code == 404, (method, path)
        err = resp.json()["error"]
        assert (err["code"], err["request_id"]) == ("response_not_found", resp.headers["x-request-id"])
    cont = await two.http.post(
        "/v1/responses", json={"model": MODEL, "input": "y", "previous_response_id": rid}, headers=auth("b")
    )
    assert cont.status_code == 404
    assert cont.json()["error"]["code"] == "previous_response_not_found"
    assert cont.json()["error"]["param"] == "previous_response_id"
    assert len(engine.bodies) == calls  # refused before any engine work
    assert (await one.http.get(f"/v1/responses/{rid}", headers=auth("a"))).status_code == 200  # still there
    assert (await one.http.get(f"/v1/responses/{rid}")).status_code == 401  # and no key: 401


async def test_delete_and_input_items(pair: tuple[TestGateway, TestGateway, ResponsesEngine]) -> None:
    one, two, _ = pair
    items = [{"role": "user", "content": f"part {i}"} for i in range(5)]
    rid = (
        await one.http.post("/v1/responses", json={"model": MODEL, "input": items}, headers=auth("a"))
    ).json()["id"]
    page = (await two.http.get(f"/v1/responses/{rid}/input_items?limit=2", headers=auth("a"))).json()
    assert page["object"] == "list"
    assert [i["content"][0]["text"] for i in page["data"]] == ["part 4", "part 3"]  # newest first
    assert page["has_more"] is True
    rest = (
        await two.http.get(
            f"/v1/responses/{rid}/input_items?limit=10&after={page['last_id']}", headers=auth("a")
        )
    ).json()
    assert [i["content"][0]["text"] for i in rest["data"]] == ["part 2", "part 1", "part 0"]
    assert rest["has_more"] is False
    asc = (await two.http.get(f"/v1/responses/{rid}/input_items?order=asc", headers=auth("a"))).json()
    assert asc["data"][0]["content"][0]["text"] == "part 0"
    for bad in ("limit=0", "limit=x", "order=up"):
        assert (
            await one.http.get(f"/v1/responses/{rid}/input_items?{bad}", headers=auth("a"))
        ).status_code == 400
    deleted = await two.http.delete(f"/v1/responses/{rid}", headers=auth("a"))
    assert deleted.json() == {"id": rid, "object": "response", "deleted": True}
    assert (await one.http.get(f"/v1/responses/{rid}", headers=auth("a"))).status_code == 404
    assert (await one.http.delete(f"/v1/responses/{rid}", headers=auth("a"))).status_code == 404
    cont = await one.http.post(
        "/v1/responses", json={"model": MODEL, "input": "y", "previous_response_id": rid}, headers=auth("a")
    )
    assert cont.status_code == 404


async def test_a_streamed_response_is_stored_before_its_last_event_is_sent(
    pair: tuple[TestGateway, TestGateway, ResponsesEngine],
) -> None:
    one, two, engine = pair
    async with one.http.stream(
        "POST", "/v1/responses", json={"model": MODEL, "input": "hi", "stream": True}, headers=auth("a")
    ) as resp:
        events = []
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            events.append(event)
            if event["type"] == "response.completed":  # already stored: the other replica has it
                rid = event["response"]["id"]
                got = await two.http.get(f"/v1/responses/{rid}", headers=auth("a"))
                assert got.status_code == 200
                assert got.json() == event["response"]
    assert [e["type"] for e in events] == [
        "response.created",
        "response.output_text.delta",
        "response.completed",
    ]
    assert all(e["response"]["store"] is True for e in events if "response" in e)
    assert engine.bodies[-1]["store"] is False


async def test_store_false_keeps_nothing_and_the_quota_refuses_one_more(redis_client: Any) -> None:
    engine = ResponsesEngine()
    g = TestGateway(
        _config(f"rq-{uuid.uuid4().hex[:8]}", max_stored_per_tenant=2), {MODEL: engine}, redis_client
    )
    await g.service.probe_once()
    try:
        unstored = await g.http.post(
            "/v1/responses", json={"model": MODEL, "input": "x", "store": False}, headers=auth("a")
        )
        assert unstored.json()["store"] is False
        assert (
            await g.http.get(f"/v1/responses/{unstored.json()['id']}", headers=auth("a"))
        ).status_code == 404
        for _ in range(2):
            assert (
                await g.http.post("/v1/responses", json={"model": MODEL, "input": "x"}, headers=auth("a"))
            ).status_code == 200
        calls = len(engine.bodies)
        over = await g.http.post("/v1/responses", json={"model": MODEL, "input": "x"}, headers=auth("a"))
        assert over.status_code == 429
        assert over.json()["error"]["code"] == "storage_quota_exceeded"
        assert len(engine.bodies) == calls
        other = await g.http.post("/v1/responses", json={"model": MODEL, "input": "x"}, headers=auth("b"))
        assert other.status_code == 200  # the quota is per tenant
        still = await g.http.post(
            "/v1/responses", json={"model": MODEL, "input": "x", "store": False}, headers=auth("a")
        )
        assert still.status_code == 200  # what stores nothing is not refused
    finally:
        await g.close()


async def test_redis_away_continuing_is_a_503_and_storing_fails_open(redis_client: Any) -> None:
    engine = ResponsesEngine()
    g = TestGateway(_config(f"rd-{uuid.uuid4().hex[:8]}"), {MODEL: engine}, redis_client)
    await g.service.probe_once()
    try:
        rid = (
            await g.http.post(
                "/v1/responses", json={"model": MODEL, "input": "x", "store": False}, headers=auth("a")
            )
        ).json()["id"]
        store = g.service.conversations._store  # type: ignore[attr-defined]

        async def down(*_: Any) -> Any:
            raise ConnectionError("Redis is away")

        store.get = store.put = store.count = down
        cont = await g.http.post(
            "/v1/responses",
            json={"model": MODEL, "input": "y", "previous_response_id": rid},
            headers=auth("a"),
        )
        assert cont.status_code == 503
        assert cont.json()["error"]["code"] == "store_unavailable"
        assert "Redis" not in cont.json()["error"]["message"]
        assert (await g.http.get(f"/v1/responses/{rid}", headers=auth("a"))).status_code == 503
    finally:
        await g.close()


async def test_the_openai_sdk_calls_work_unchanged(
    pair: tuple[TestGateway, TestGateway, ResponsesEngine],
) -> None:
    one, two, _ = pair
    a1, a2 = one.sdk(KEYS["a"]), two.sdk(KEYS["a"])
    first = await a1.responses.create(model=MODEL, input="hello")
    assert first.output_text == "answer 1" or "answer" in first.output_text
    again = await a2.responses.retrieve(first.id)
    assert again.id == first.id
    nxt = await a2.responses.create(model=MODEL, input="more", previous_response_id=first.id)
    assert nxt.previous_response_id == first.id
    items = [i async for i in a1.responses.input_items.list(nxt.id)]
    assert len(items) == 1
    await a2.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await a1.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        await two.sdk(KEYS["b"]).responses.retrieve(nxt.id)
