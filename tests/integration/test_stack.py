"""The whole stack with real parts: OpenAI SDK -> Ray Serve gateway -> vLLM CPU engines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import GPT_OSS, MAX_BODY, SMOLLM, LiveStack

pytestmark = pytest.mark.integration

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
QUESTION = {"role": "user", "content": "What is the capital of France?"}
WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
"""The JSON schema of the ``get_weather`` tool the tool-call tests declare."""


@pytest.fixture(scope="module")
def client(live_stack: LiveStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_stack.api, api_key="local", max_retries=0, timeout=120)


def test_models_lists_both(client: openai.OpenAI) -> None:
    assert {m.id for m in client.models.list().data} == {SMOLLM, GPT_OSS}


def test_smollm2_answers_paris(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=SMOLLM, temperature=0, max_tokens=32, messages=[SYSTEM, QUESTION]
    )
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.usage is not None
    assert reply.usage.completion_tokens > 0


def test_completions_endpoint(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=SMOLLM, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert reply.choices[0].text
    assert reply.usage is not None
    assert reply.usage.completion_tokens <= 8


def test_streaming_is_ordered_and_ends_with_done_and_usage(live_stack: LiveStack) -> None:
    body = {
        "model": SMOLLM,
        "temperature": 0,
        "max_tokens": 24,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [SYSTEM, QUESTION],
    }
    with httpx.stream("POST", live_stack.api + "/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["x-request-id"]
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1  # one completion, chunks in one order
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage["completion_tokens"] > 0
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "Paris" in text
    finish = [
        c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]
    ]
    assert finish
    assert finish[-1] in ("stop", "length")


def test_sdk_streaming(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=SMOLLM,
        temperature=0,
        max_tokens=24,
        stream=True,
        messages=[SYSTEM, QUESTION],
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_gpt_oss_accepts_reasoning_effort(client: openai.OpenAI, effort: str) -> None:
    reply = client.chat.completions.create(
        model=GPT_OSS,
        max_tokens=16,
        reasoning_effort=effort,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "hi"}],
    )
    message = reply.model_dump()["choices"][0]["message"]
    # The harmony path parses reasoning apart from the answer: the field is always there.
    assert "reasoning" in message or "reasoning_content" in message
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 20


def test_gpt_oss_rejects_unknown_reasoning_effort(live_stack: LiveStack) -> None:
    resp = httpx.post(
        live_stack.api + "/chat/completions",
        json={
            "model": GPT_OSS,
            "reasoning_effort": "extreme",
            "messages": [{"role": "user", "content": "hi"}],
        },
        timeout=30,
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "reasoning_effort"


def test_gpt_oss_responses_api(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=GPT_OSS, input="hi", max_output_tokens=16, reasoning={"effort": "low"}
    )
    assert response.object == "response"
    assert response.model == GPT_OSS
    assert response.usage is not None
    assert response.usage.input_tokens > 0


def test_gpt_oss_responses_api_streaming(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=GPT_OSS, input="hi", max_output_tokens=16, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created"
    assert kinds[-1] in ("response.completed", "response.incomplete")


def test_gpt_oss_conversation_with_a_function_call_goes_on_from_its_stored_turns(
    client: openai.OpenAI,
) -> None:
    """Stored responses on the harmony path: a turn whose input carries a function call and
    its output, then two turns that follow it by ``previous_response_id`` (streamed and
    not): the replayed conversation, the call and its output included, is accepted by
    vLLM's harmony conversion on every turn."""
    tools: list[Any] = [
        {
            "type": "function",
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": WEATHER_PARAMETERS,
        }
    ]
    first = client.responses.create(
        model=GPT_OSS,
        tools=tools,
        max_output_tokens=8,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city": "Paris"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": '{"sky": "clear", "c": 21}'},
        ],
    )
    assert first.status in ("completed", "incomplete")
    assert [i.type for i in client.responses.input_items.list(first.id, order="asc")] == [
        "message",
        "function_call",
        "function_call_output",
    ]
    events = list(
        client.responses.create(
            model=GPT_OSS,
            tools=tools,
            max_output_tokens=8,
            input="And tomorrow?",
            previous_response_id=first.id,
            stream=True,
        )
    )
    final = events[-1]
    assert final.type in ("response.completed", "response.incomplete")
    second_id = final.response.id
    assert final.response.previous_response_id == first.id
    third = client.responses.create(
        model=GPT_OSS, tools=tools, max_output_tokens=8, input="Thanks.", previous_response_id=second_id
    )
    assert third.status in ("completed", "incomplete")
    assert client.responses.retrieve(second_id).id == second_id


def test_gpt_oss_tool_call_request_is_accepted(client: openai.OpenAI) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": WEATHER_PARAMETERS,
            },
        }
    ]
    reply = client.chat.completions.create(
        model=GPT_OSS,
        max_tokens=16,
        tools=tools,
        tool_choice="auto",  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    )
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-5", messages=[QUESTION])
    assert isinstance(err.value.body, dict)
    assert err.value.body["param"] == "model"
    assert err.value.request_id


def test_request_log_lines_carry_the_request_id(live_stack: LiveStack) -> None:
    """The gateway logs every request with its id, and the line reaches ``up``'s log soon
    (not held in a buffer until a thousand more have come)."""
    rid = f"log-{time.time_ns()}"
    resp = httpx.post(
        live_stack.api + "/chat/completions",
        json={"model": SMOLLM, "max_tokens": 2, "messages": [QUESTION]},
        headers={"X-Request-Id": rid},
        timeout=120,
    )
    assert resp.status_code == 200
    deadline = time.monotonic() + 30
    lines: list[str] = []
    while time.monotonic() < deadline and not lines:
        text = live_stack.log_file.read_text(errors="replace")
        lines = [line for line in text.splitlines() if f"[{rid}]" in line]
        time.sleep(0.5)
    assert lines, f"no log line with [{rid}] in {live_stack.log_file}"
    assert "status=200" in lines[0]
    assert "oss_serving" in lines[0]


def test_invalid_json_and_parameters_are_400(live_stack: LiveStack) -> None:
    bad_json = httpx.post(live_stack.api + "/chat/completions", content=b"{nope", timeout=30)
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["type"] == "invalid_request_error"
    bad_param = httpx.post(
        live_stack.api + "/chat/completions",
        json={"model": SMOLLM, "max_tokens": -3, "messages": [QUESTION]},
        headers={"X-Request-Id": "test-bad-param"},
        timeout=30,
    )
    assert bad_param.status_code == 400
    error = bad_param.json()["error"]
    assert error["param"] == "max_tokens"
    assert error["request_id"] == "test-bad-param"
    assert bad_param.headers["x-request-id"] == "test-bad-param"


def test_body_over_limit_is_413(live_stack: LiveStack) -> None:
    huge = {"role": "user", "content": "x" * (MAX_BODY + 1)}
    resp = httpx.post(
        live_stack.api + "/chat/completions", json={"model": SMOLLM, "messages": [huge]}, timeout=30
    )
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"


def _engine_unfinished(live_stack: LiveStack) -> int:
    report = httpx.get(live_stack.base_url + "/health", timeout=10).json()
    return int(report["models"][SMOLLM]["engine_unfinished_requests"] or 0)


def test_client_disconnect_cancels_engine_request(live_stack: LiveStack) -> None:
    body = {
        "model": SMOLLM,
        "max_tokens": 1500,
        "stream": True,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": "Count to ten thousand."}],
    }
    with httpx.stream("POST", live_stack.api + "/chat/completions", json=body, timeout=120) as resp:
        # Keep the line iterator referenced: dropping it mid-stream closes the connection
        # (the disconnect this test makes on purpose, but only when the block ends).
        lines = resp.iter_lines()
        seen = 0
        for line in lines:
            seen += line.startswith("data: ")
            if seen >= 5:
                break
        deadline = time.monotonic() + 15
        while _engine_unfinished(live_stack) < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _engine_unfinished(live_stack) >= 1, "the engine should be generating while the client reads"
    # The client is gone: the engine must stop within a few health-probe intervals, long
    # before 1,500 tokens could have been generated.
    deadline = time.monotonic() + 20
    while _engine_unfinished(live_stack) > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _engine_unfinished(live_stack) == 0


def test_a_cancelled_background_response_aborts_its_engine_request(
    live_stack: LiveStack, client: openai.OpenAI
) -> None:
    """``background: true`` on real vLLM (one SmolLM2 replica: the engine's count of
    unfinished requests is exact): running in the engine, then cancelled, and the engine
    request is aborted long before its 1,500 tokens."""
    created = client.responses.create(
        model=SMOLLM,
        input="Count to ten thousand.",
        max_output_tokens=1500,
        background=True,
        extra_body={"ignore_eos": True},
    )
    assert created.status == "queued"
    deadline = time.monotonic() + 60
    while _engine_unfinished(live_stack) < 1:
        assert time.monotonic() < deadline, "the engine never ran the background response"
        time.sleep(0.25)
    assert client.responses.retrieve(created.id).status == "in_progress"
    assert client.responses.cancel(created.id).status == "cancelled"
    cancelled_at = time.monotonic()
    deadline = time.monotonic() + 20
    while _engine_unfinished(live_stack) > 0 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert _engine_unfinished(live_stack) == 0, "the engine request was not aborted"
    print(f"\nthe engine was idle {time.monotonic() - cancelled_at:.1f} s after the cancel")
    assert client.responses.retrieve(created.id).status == "cancelled"


def test_health_and_metrics(live_stack: LiveStack) -> None:
    health = httpx.get(live_stack.base_url + "/health", timeout=10)
    assert health.status_code == 200
    report = health.json()
    assert report["ready"] is True
    assert report["redis"] == "ok"
    assert set(report["models"]) == {SMOLLM, GPT_OSS}
    metrics = httpx.get(live_stack.base_url + "/metrics", timeout=10).text
    assert f'oss_serving_requests_total{{endpoint="chat",model="{SMOLLM}",status="200"}}' in metrics
    assert "oss_serving_time_to_first_token_seconds_bucket" in metrics
    assert f'oss_serving_model_ready{{model="{GPT_OSS}"}} 1.0' in metrics


def test_status_command(live_stack: LiveStack) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "status", "--config", str(live_stack.config_file)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert SMOLLM in out.stdout
    assert GPT_OSS in out.stdout
    assert "running" in out.stdout


def test_gateway_metrics_reach_rays_exporter_under_the_names_the_chart_scrapes(
    client: openai.OpenAI, live_stack: LiveStack
) -> None:
    """With ``metrics.ray_export`` (the chart's setting) the gateway's metrics come out of
    the real Ray metrics agent, one series per gateway replica, under exactly the names the
    chart's relabeling and alert rules are written for (``tests/chart/test_blockers.py``
    derives them; here real Ray shows they hold)."""
    from serving.metrics import GatewayMetrics
    from tests.chart.test_blockers import _exported_by_ray

    client.chat.completions.create(model=SMOLLM, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    wanted = {"ray_oss_serving_requests_total", "ray_oss_serving_time_to_first_token_seconds_bucket"}
    deadline = time.monotonic() + 90
    text = ""
    while time.monotonic() < deadline:  # Ray's agent collects every few seconds
        text = httpx.get(live_stack.ray_metrics_url, timeout=10).text
        if all(f"{name}{{" in text for name in wanted):
            break
        time.sleep(2)
    exported = {line.split("{")[0] for line in text.splitlines() if line.startswith("ray_oss_serving")}
    assert wanted <= exported, exported
    predicted = _exported_by_ray(GatewayMetrics([SMOLLM, GPT_OSS], [0.1, 1.0]))
    assert exported <= predicted, exported - predicted
    series = [line for line in text.splitlines() if line.startswith("ray_oss_serving_requests_total{")]
    assert series
    assert all('replica="' in line and 'deployment="' in line for line in series)  # each replica its own
