"""Prompt caching on the real stack: vLLM's cached_tokens through the gateway, and the
response cache, on the session's stack (SmolLM2 and gpt-oss-tiny on vLLM CPU engines)."""

from __future__ import annotations

import json
import uuid

import httpx
import openai
import pytest

from tests.integration.conftest import GPT_OSS, SMOLLM, LiveStack

pytestmark = pytest.mark.integration


def long_system() -> str:
    """A system prompt of several hundred tokens, unique to the test (no earlier cache entry)."""
    tag = uuid.uuid4().hex
    return (
        f"[{tag}] You are the support assistant of the travel desk. " + "Policies apply to every trip. " * 80
    )


@pytest.fixture(scope="module")
def client(live_stack: LiveStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_stack.api, api_key="local", max_retries=0, timeout=180)


def _chat(client: openai.OpenAI, system: str, question: str) -> tuple[int, int]:
    reply = client.chat.completions.create(
        model=SMOLLM,
        temperature=0,
        max_tokens=4,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
    )
    assert reply.usage is not None
    details = reply.usage.prompt_tokens_details
    return reply.usage.prompt_tokens, (details.cached_tokens or 0) if details else 0


def test_cached_tokens_zero_then_above_zero_for_shared_prefix(client: openai.OpenAI) -> None:
    system = long_system()
    prompt1, cached1 = _chat(client, system, "Can I book a train?")
    prompt2, cached2 = _chat(client, system, "What about hotels?")
    assert prompt1 > 300
    assert cached1 == 0
    assert cached2 > 300  # the shared system prompt came from vLLM's prefix cache
    assert cached2 < prompt2


def test_cached_tokens_in_streaming_chat(client: openai.OpenAI) -> None:
    system = long_system()
    _chat(client, system, "first")
    stream = client.chat.completions.create(
        model=SMOLLM,
        temperature=0,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "second"}],
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert usage
    assert usage[-1].prompt_tokens_details is not None
    assert (usage[-1].prompt_tokens_details.cached_tokens or 0) > 300


def test_cached_tokens_in_completions(client: openai.OpenAI) -> None:
    prompt = long_system()
    first = client.completions.create(model=SMOLLM, prompt=prompt + " Q1", max_tokens=2, temperature=0)
    second = client.completions.create(model=SMOLLM, prompt=prompt + " Q2", max_tokens=2, temperature=0)
    assert first.usage is not None
    assert second.usage is not None
    first_cached = first.usage.prompt_tokens_details.cached_tokens if first.usage.prompt_tokens_details else 0
    assert (first_cached or 0) == 0
    assert second.usage.prompt_tokens_details is not None
    assert (second.usage.prompt_tokens_details.cached_tokens or 0) > 300


def test_cached_tokens_in_responses(client: openai.OpenAI) -> None:
    instructions = long_system()
    first = client.responses.create(
        model=GPT_OSS, instructions=instructions, input="one", max_output_tokens=16
    )
    second = client.responses.create(
        model=GPT_OSS, instructions=instructions, input="two", max_output_tokens=16
    )
    assert first.usage is not None
    assert second.usage is not None
    assert first.usage.input_tokens_details.cached_tokens == 0
    assert second.usage.input_tokens_details.cached_tokens > 100


def test_response_cache_through_the_gateway(live_stack: LiveStack) -> None:
    body = {
        "model": SMOLLM,
        "temperature": 0,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": f"Say hello to {uuid.uuid4().hex[:6]}."}],
    }
    on = {"X-OSS-Response-Cache": "on"}
    with httpx.Client(base_url=live_stack.api, timeout=120) as http:
        first = http.post("/chat/completions", json=body, headers=on)
        second = http.post("/chat/completions", json=body, headers=on)
        changed = http.post("/chat/completions", json={**body, "max_tokens": 9}, headers=on)
        hot = http.post("/chat/completions", json={**body, "temperature": 0.9}, headers=on)
        with http.stream("POST", "/chat/completions", json={**body, "stream": True}, headers=on) as resp:
            replay_header = resp.headers.get("x-oss-response-cache")
            events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert first.status_code == second.status_code == 200
    assert first.headers["x-oss-response-cache"] == "miss"
    assert second.headers["x-oss-response-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"]
    assert changed.headers["x-oss-response-cache"] == "miss"
    assert hot.headers["x-oss-response-cache"] == "skip"
    assert replay_header == "hit"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == first.json()["choices"][0]["message"]["content"]
