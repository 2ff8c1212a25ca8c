"""Engine failover in the pipeline: retry before the first byte, stream migration with token
ids, stall detection, quarantine of failed replicas, harmony channels across a splice.

The engine here is a scripted pair of replicas behind one client (a real engine cannot be
killed in a unit test: the integration test ``test_replicas.py`` kills real vLLM replicas).
It routes like the engine deployment's router (``avoiding`` the quarantined replicas,
writing the replica it chose into the headers), and its continuation follows the prompt
token ids it is given, so a wrong splice shows as repeated or missing words.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from serving.config import ModelFamily
from serving.engine.protocol import EngineClient, EngineJSON, EngineSSE, EngineStats
from serving.engine.routing_hints import HINT_AVOID, HINT_ONLY, ROUTED_REPLICA, avoiding
from serving.gateway.failover import (
    HARMONY_CHANNEL,
    HARMONY_END,
    HARMONY_MESSAGE,
    HARMONY_START,
    HarmonyText,
    Quarantine,
)
from serving.wire import Endpoint
from tests.gateway import TestGateway, ask, config_for

MODEL = "m"
PROMPT_IDS = [101, 102, 103]
WORDS = 10


def word(token: int) -> str:
    return f"w{token} "


class Replicas(EngineClient):
    """Two replicas of one model. ``faults[replica]``: ``("die" | "stall" | "fail" | "hang", after)``:
    die (raise) or stall (stop sending) after ``after`` tokens, or fail (raise) or hang
    before the first item."""

    def __init__(self, faults: dict[str, tuple[str, int]] | None = None, tokens: list[int] | None = None):
        self.faults = dict(faults or {})
        self.tokens = tokens if tokens is not None else list(range(WORDS))
        self.calls: list[tuple[str, Endpoint, dict[str, Any], dict[str, str]]] = []
        self.probes: list[str] = []
        self.down: set[str] = set()

    def _choose(self, headers: dict[str, str]) -> str:
        replica = avoiding(["a", "b"], headers)[0]
        headers[ROUTED_REPLICA] = replica
        return replica

    def generate(
        self, endpoint: Endpoint, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncIterator[EngineJSON | EngineSSE]:
        replica = self._choose(headers)
        self.calls.append((replica, endpoint, dict(body), dict(headers)))
        return self._run(replica, endpoint, body)

    async def _run(self, replica: str, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[Any]:
        kind, after = self.faults.get(replica, ("ok", 0))
        if kind == "fail":
            raise RuntimeError("replica died before its first token")
        if kind == "hang":
            await asyncio.sleep(3600)
        if kind == "slow":
            await asyncio.sleep(after)
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(word(t) for t in self.tokens)}
            choice = {"index": 0, "message": message, "finish_reason": "length"}
            usage = {"prompt_tokens": 3, "completion_tokens": len(self.tokens), "total_tokens": 0}
            yield EngineJSON(200, {"id": "chatcmpl-1", "choices": [choice], "usage": usage})
            return
        if isinstance(body.get("prompt"), list):  # a continuation: what follows its prompt
            done = len(body["prompt"]) - len(PROMPT_IDS)
            assert body["prompt"][: len(PROMPT_IDS)] == PROMPT_IDS
            assert body["prompt"][len(PROMPT_IDS) :] == self.tokens[:done]
            rest = self.tokens[done : done + int(body.get("max_tokens", 10**6))]
            for i, t in enumerate(rest):
                if kind == "die" and i == after:
                    raise RuntimeError("ActorDiedError: the replica was killed")
                finish = "length" if i == len(rest) - 1 else None
                chunk = {
                    "id": "cmpl-other",
                    "object": "text_completion",
                    "created": 2,
                    "model": MODEL,
                    "choices": [{"index": 0, "text": word(t), "token_ids": [t], "finish_reason": finish}],
                }
                yield EngineSSE(f"data: {json.dumps(chunk)}\n\n")
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(rest), "total_tokens": 0}
            yield EngineSSE(
                f"data: {json.dumps({'id': 'cmpl-other', 'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"
            )
            return
        head: dict[str, Any] = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": MODEL,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
        }
        if body.get("return_token_ids") and endpoint is Endpoint.chat:
            head["prompt_token_ids"] = PROMPT_IDS
        elif body.get("return_token_ids"):  # completions streams carry them in the choice
            head["choices"] = [{"index": 0, "text": "", "prompt_token_ids": PROMPT_IDS}]
        yield EngineSSE(f"data: {json.dumps(head)}\n\n")
        limit = int(body.get("max_tokens") or len(self.tokens))
        for i, t in enumerate(self.tokens[:limit]):
            if kind in ("die", "stall") and i == after:
                if kind == "die":
                    raise RuntimeError("ActorDiedError: the replica was killed")
                await asyncio.sleep(3600)
            choice: dict[str, Any] = {"index": 0, "delta": {"content": word(t)}, "finish_reason": None}
            if i == min(limit, len(self.tokens)) - 1:
                choice["finish_reason"] = "length" if limit <= len(self.tokens) else "stop"
            if body.get("return_token_ids"):
                choice["token_ids"] = [t]
            chunk = {**head, "choices": [choice]}
            chunk.pop("prompt_token_ids", None)
            yield EngineSSE(f"data: {json.dumps(chunk)}\n\n")
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            usage = {"prompt_tokens": 3, "completion_tokens": limit, "total_tokens": 3 + limit}
            yield EngineSSE(f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n")
        yield EngineSSE("data: [DONE]\n\n")

    async def check_health(self, timeout_s: float) -> None:
        return None

    async def stats(self, timeout_s: float) -> EngineStats:
        return EngineStats(unfinished_requests=0, replica_id="a", max_num_seqs=8)

    async def probe(self, timeout_s: float, *, only: str | None = None, avoid: Any = ()) -> EngineStats:
        if only is not None:
            self.probes.append(only)
            if only in self.down:
                raise TimeoutError
        return await self.stats(timeout_s)


def _events(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def _content(events: list[dict[str, Any]], key: str = "content") -> str:
    return "".join(
        str((c.get("delta") or {}).get(key) or c.get("text") or "")
        if key == "content"
        else str((c.get("delta") or {}).get(key) or "")
        for e in events
        for c in e.get("choices") or []
    )


async def _gateway(engine: Replicas, **failover: Any) -> TestGateway:
    cfg = config_for([MODEL], queue={"enabled": False})
    cfg.models[0].failover = cfg.models[0].failover.model_copy(update={"idle_timeout_s": 0.3, **failover})
    g = TestGateway(cfg, {MODEL: engine})
    await g.service.probe_once()
    return g


JSON_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "count"}], "max_tokens": WORDS}
EXPECTED = "".join(word(t) for t in range(WORDS))
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "count"}],
    "max_tokens": WORDS,
    "stream": True,
    "stream_options": {"include_usage": True},
}


# ------------------------------------------------------------------ mid-stream migration
@pytest.mark.parametrize("fault", ["die", "stall"])
async def test_a_stream_whose_replica_dies_or_stalls_continues_on_the_other_one(fault: str) -> None:
    engine = Replicas({"a": (fault, 4)})
    g = await _gateway(engine)
    try:
        _, status, text = await ask(g.service, dict(BODY))
        events = _events(text)
        assert status == 200
        assert _content(events) == EXPECTED  # no word repeated or missing at the splice
        assert {e["id"] for e in events} == {"chatcmpl-1"}  # one response id
        assert {e["created"] for e in events} == {1}
        finishes = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
        assert finishes == ["length"]
        usage = [e["usage"] for e in events if e.get("usage")]
        assert usage == [{"prompt_tokens": 3, "completion_tokens": WORDS, "total_tokens": 3 + WORDS}]
        assert "token_ids" not in text  # asked of the engine, never shown to a client that did not
        assert text.endswith("data: [DONE]\n\n")
        assert '"error"' not in text
        # The continuation: the other replica, a raw prompt of the prompt and the tokens
        # streamed before the failure, the output budget left, the same sampling.
        (first, *_), (second, endpoint, cont, headers) = engine.calls
        assert (first, second) == ("a", "b")
        assert endpoint is Endpoint.completions
        assert cont["prompt"] == PROMPT_IDS + list(range(4))
        assert cont["max_tokens"] == WORDS - 4
        assert headers[HINT_AVOID] == "a"
        cause = "engine_error" if fault == "die" else "stalled"
        labels = {"model": MODEL, "cause": cause, "outcome": "continued"}
        assert g.metric("oss_serving_stream_migrations_total", **labels) == 1
        assert g.metric("oss_serving_replicas_quarantined", model=MODEL) == 1
        # Later requests avoid the failed replica.
        await ask(g.service, {**BODY, "stream": False})
        assert engine.calls[-1][0] == "b"
        assert engine.calls[-1][3][HINT_AVOID] == "a"
    finally:
        await g.close()


async def test_a_client_that_asked_for_token_ids_gets_every_one_once() -> None:
    engine = Replicas({"a": ("die", 3)})
    g = await _gateway(engine)
    try:
        _, status, text = await ask(g.service, {**BODY, "return_token_ids": True})
        assert status == 200
        events = _events(text)
        ids = [t for e in events for c in e["choices"] for t in c.get("token_ids") or []]
        assert ids == list(range(WORDS))
        assert events[0]["prompt_token_ids"] == PROMPT_IDS
    finally:
        await g.close()


async def test_completions_streams_migrate_too() -> None:
    engine = Replicas({"a": ("die", 5)})
    g = await _gateway(engine)
    try:
        body = {"model": MODEL, "prompt": "count", "max_tokens": WORDS, "stream": True}
        _, status, text = await ask(g.service, body, endpoint=Endpoint.completions)
        assert status == 200
        # (the fake answers a completions request in the chat shape before the failure)
        assert _content(_events(text)) == EXPECTED
        assert "prompt_token_ids" not in text
        assert engine.calls[1][2]["prompt"] == PROMPT_IDS + list(range(5))
    finally:
        await g.close()


async def test_a_stream_that_runs_out_of_migrations_ends_with_one_clear_error() -> None:
    engine = Replicas({"a": ("die", 2), "b": ("die", 0)})
    g = await _gateway(engine, max_migrations=1)
    try:
        _, status, text = await ask(g.service, dict(BODY))
        assert status == 502
        errors = [e for e in _events(text) if "error" in e]
        assert len(errors) == 1
        assert errors[0]["error"]["type"] == "server_error"
        assert errors[0]["error"]["request_id"] == "r"
        labels = {"model": MODEL, "cause": "engine_error", "outcome": "exhausted"}
        assert g.metric("oss_serving_stream_migrations_total", **labels) == 1
    finally:
        await g.close()


@pytest.mark.parametrize(
    "extra",
    [{"n": 2}, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}],
    ids=["n", "tools"],
)
async def test_what_cannot_be_spliced_is_not_migrated(extra: dict[str, Any]) -> None:
    engine = Replicas({"a": ("die", 3)})
    g = await _gateway(engine)
    try:
        _, status, text = await ask(g.service, {**BODY, **extra})
        assert status == 502
        assert '"error"' in text
        assert not engine.calls[0][2].get("return_token_ids")  # the engine was not asked for ids
        assert len(engine.calls) == 1
    finally:
        await g.close()


async def test_migration_off_leaves_the_stream_verbatim() -> None:
    engine = Replicas()
    g = await _gateway(engine, migrate_streams=False)
    try:
        _, status, text = await ask(g.service, dict(BODY))
        assert status == 200
        assert _content(_events(text)) == EXPECTED
        assert not engine.calls[0][2].get("return_token_ids")
    finally:
        await g.close()


# ------------------------------------------------------------------ before the first byte
async def test_a_failure_before_the_first_byte_is_retried_on_the_other_replica() -> None:
    engine = Replicas({"a": ("fail", 0)})
    g = await _gateway(engine)
    try:
        response = await g.http.post("/v1/chat/completions", json=JSON_BODY)
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == EXPECTED
        assert response.headers["x-oss-engine-retries"] == "1"
        assert [c[0] for c in engine.calls] == ["a", "b"]
        assert g.metric("oss_serving_engine_retries_total", model=MODEL, cause="engine_error") == 1
    finally:
        await g.close()


async def test_a_stall_before_the_first_byte_is_retried_too() -> None:
    engine = Replicas({"a": ("hang", 0)})
    g = await _gateway(engine)
    try:
        _, status, text = await ask(g.service, dict(BODY))
        assert status == 200
        assert _content(_events(text)) == EXPECTED
        assert g.metric("oss_serving_engine_retries_total", model=MODEL, cause="stalled") == 1
    finally:
        await g.close()


async def test_a_long_non_streamed_generation_is_not_taken_for_a_stall() -> None:
    engine = Replicas({"a": ("slow", 1)})  # a whole answer after 1 s; idle timeout 0.3 s
    g = await _gateway(engine)
    try:
        response = await g.http.post("/v1/chat/completions", json=JSON_BODY)
        assert response.status_code == 200
        assert len(engine.calls) == 1
    finally:
        await g.close()


async def test_when_every_replica_fails_the_client_gets_one_error_not_a_hang() -> None:
    engine = Replicas({"a": ("fail", 0), "b": ("fail", 0)})
    g = await _gateway(engine, retry_attempts=2)
    try:
        response = await asyncio.wait_for(g.http.post("/v1/chat/completions", json=JSON_BODY), 10)
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["code"] == "engine_error"
        assert error["type"] == "server_error"
        assert len(engine.calls) == 3  # the first try and two retries
    finally:
        await g.close()


# ------------------------------------------------------------------ quarantine
async def test_a_quarantined_replica_comes_back_when_a_probe_reaches_it() -> None:
    engine = Replicas()
    clock = [0.0]
    q = Quarantine({}, clock=lambda: clock[0])
    q.add(MODEL, "a", "stalled")
    engine.down.add("a")

    async def probe(model: str, replica: str) -> None:
        await engine.probe(1.0, only=replica)

    await q.probe_all(probe)
    assert q.avoided(MODEL) == ["a"]  # still silent
    engine.down.clear()
    await q.probe_all(probe)
    assert q.avoided(MODEL) == []
    assert engine.probes == ["a", "a"]
    # Unanswered, it comes back after quarantine_s anyway (Serve replaced it meanwhile).
    q.add(MODEL, "b", "engine_error")
    clock[0] += 61
    assert q.avoided(MODEL) == []


def test_the_router_rule_avoids_but_never_leaves_nothing() -> None:
    assert avoiding(["a", "b"], {HINT_AVOID: "a"}) == ["b"]
    assert avoiding(["a", "b"], {HINT_AVOID: "a,b"}) == ["a", "b"]
    assert avoiding(["a", "b"], {HINT_ONLY: "b"}) == ["b"]
    assert avoiding(["a"], {HINT_ONLY: "gone"}) == []


# ------------------------------------------------------------------ harmony
def test_harmony_text_follows_channels() -> None:
    h = HarmonyText(channel="analysis")
    pieces = h.feed("more thinking.<|end|><|start|>assistant<|chan")
    pieces += h.feed("nel|>final<|message|>The answer")
    pieces += h.feed(" is 4.")
    assert pieces == [("analysis", "more thinking."), ("final", "The answer"), ("final", " is 4.")]


async def test_a_harmony_stream_keeps_reasoning_and_content_apart_across_the_splice() -> None:
    # analysis message, then the final message: special tokens carry no text of their own
    thinking, answer = [1, 2, 3], [4, 5, 6]
    final_header = [HARMONY_END, HARMONY_START, 7, HARMONY_CHANNEL, 8, HARMONY_MESSAGE]
    tokens = [HARMONY_CHANNEL, 9, HARMONY_MESSAGE, *thinking, *final_header, *answer]
    texts = {1: "I ", 2: "think ", 3: "so.", 4: "It ", 5: "is ", 6: "four."}
    specials = {
        HARMONY_CHANNEL: "<|channel|>",
        HARMONY_MESSAGE: "<|message|>",
        HARMONY_END: "<|end|>",
        HARMONY_START: "<|start|>",
        7: "assistant",
        8: "final",
        9: "analysis",
    }

    class Harmony(Replicas):
        async def _run(self, replica: str, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[Any]:
            if isinstance(body.get("prompt"), list):
                assert body["skip_special_tokens"] is False
                done = len(body["prompt"]) - len(PROMPT_IDS)
                for t in tokens[done:]:
                    text = texts.get(t) or specials[t]
                    chunk = {"choices": [{"index": 0, "text": text, "token_ids": [t], "finish_reason": None}]}
                    yield EngineSSE(f"data: {json.dumps(chunk)}\n\n")
                yield EngineSSE('data: {"choices":[{"index":0,"text":"","finish_reason":"stop"}]}\n\n')
                yield EngineSSE("data: [DONE]\n\n")
                return
            head = {"id": "chatcmpl-h", "created": 5, "model": MODEL, "object": "chat.completion.chunk"}
            role = {"index": 0, "delta": {"role": "assistant"}}
            yield EngineSSE(
                f"data: {json.dumps({**head, 'prompt_token_ids': PROMPT_IDS, 'choices': [role]})}\n\n"
            )
            kind, after = self.faults.get(replica, ("ok", 0))
            for i, t in enumerate(tokens):
                if kind == "die" and i == after:
                    raise RuntimeError("killed")
                delta = (
                    {"reasoning": texts[t]} if t in thinking else {"content": texts[t]} if t in answer else {}
                )
                chunk = {**head, "choices": [{"index": 0, "delta": delta, "token_ids": [t]}]}
                yield EngineSSE(f"data: {json.dumps(chunk)}\n\n")
            stop = {"index": 0, "delta": {}, "finish_reason": "stop"}
            yield EngineSSE(f"data: {json.dumps({**head, 'choices': [stop]})}\n\n")
            yield EngineSSE("data: [DONE]\n\n")

    cfg = config_for([MODEL], queue={"enabled": False})
    cfg.models[0].family = ModelFamily.gpt_oss
    body = {"model": MODEL, "messages": [{"role": "user", "content": "2+2?"}], "stream": True}
    whole: dict[int, tuple[str, str]] = {}
    for cut in [None, 4, 7, 10, 12, 13]:  # in the reasoning, between, in the header, in the answer
        engine = Harmony({"a": ("die", cut)} if cut is not None else {})
        g = TestGateway(cfg, {MODEL: engine})
        await g.service.probe_once()
        try:
            _, status, text = await ask(g.service, dict(body))
        finally:
            await g.close()
        events = _events(text)
        assert status == 200, text
        whole[cut or 0] = (_content(events, "reasoning"), _content(events, "content"))
    assert set(whole.values()) == {("I think so.", "It is four.")}, whole


async def test_one_failed_probe_does_not_turn_traffic_away() -> None:
    engine = Replicas()
    g = await _gateway(engine)
    try:
        assert g.service.health.is_ready(MODEL)
        healthy = engine.check_health

        async def slow(timeout_s: float) -> None:
            raise TimeoutError  # a probe stuck behind a stalled replica

        engine.check_health = slow  # type: ignore[method-assign]
        for _ in range(g.config.gateway.unready_after_failures - 1):
            await g.service.health.probe_once()
        assert g.service.health.is_ready(MODEL)
        await g.service.health.probe_once()
        assert not g.service.health.is_ready(MODEL)
        engine.check_health = healthy  # type: ignore[method-assign]
        await g.service.health.probe_once()
        assert g.service.health.is_ready(MODEL)
    finally:
        await g.close()


async def test_a_harmony_stream_without_any_message_header_ends_with_its_raw_text() -> None:
    """A model that never writes a harmony header (gpt-oss-tiny's random weights): vLLM
    sends nothing while it streams and the raw text as ``content`` at the end."""
    texts = {1: "noise ", 2: "more ", 3: "noise"}

    class Headerless(Replicas):
        async def _run(self, replica: str, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[Any]:
            if isinstance(body.get("prompt"), list):
                done = len(body["prompt"]) - len(PROMPT_IDS)
                for t in [1, 2, 3][done:]:
                    chunk = {
                        "choices": [{"index": 0, "text": texts[t], "token_ids": [t], "finish_reason": None}]
                    }
                    yield EngineSSE(f"data: {json.dumps(chunk)}\n\n")
                yield EngineSSE('data: {"choices":[{"index":0,"text":"","finish_reason":"length"}]}\n\n')
                yield EngineSSE("data: [DONE]\n\n")
                return
            head = {"id": "chatcmpl-n", "created": 5, "model": MODEL, "object": "chat.completion.chunk"}
            opening = {**head, "prompt_token_ids": PROMPT_IDS, "choices": [{"index": 0, "delta": {}}]}
            yield EngineSSE(f"data: {json.dumps(opening)}\n\n")
            kind, after = self.faults.get(replica, ("ok", 0))
            for i, t in enumerate([1, 2, 3]):
                if kind == "die" and i == after:
                    raise RuntimeError("killed")
                chunk = {**head, "choices": [{"index": 0, "delta": {}, "token_ids": [t]}]}
                yield EngineSSE(f"data: {json.dumps(chunk)}\n\n")
            flush = {"index": 0, "delta": {"content": "noise more noise"}, "finish_reason": "length"}
            yield EngineSSE(f"data: {json.dumps({**head, 'choices': [flush]})}\n\n")
            yield EngineSSE("data: [DONE]\n\n")

    cfg = config_for([MODEL], queue={"enabled": False})
    cfg.models[0].family = ModelFamily.gpt_oss
    body = {"model": MODEL, "messages": [{"role": "user", "content": "?"}], "stream": True}
    seen = []
    for cut in (None, 2):
        g = TestGateway(cfg, {MODEL: Headerless({"a": ("die", cut)} if cut is not None else {})})
        await g.service.probe_once()
        try:
            _, status, text = await ask(g.service, dict(body))
        finally:
            await g.close()
        assert status == 200, text
        seen.append((_content(_events(text), "reasoning"), _content(_events(text))))
    assert seen == [("", "noise more noise")] * 2
