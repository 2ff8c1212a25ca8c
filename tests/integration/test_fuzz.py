"""Fuzz the live stack with vLLM's own request schemas: no body may get a 5xx.

Schemathesis generates bodies for ``POST /v1/chat/completions``, ``/v1/completions`` and
``/v1/responses`` from the OpenAPI document of the installed vLLM (built from vLLM's own
routers, no engine started), with ``model`` pinned to the stack's two models and the
output lengths capped so that valid bodies reach the engines but stay cheap. Every
answer must be below 500, and every 4xx must carry OpenAI's error body with no Python
exception text in it. Bodies that bare vLLM answers with 400 and that once got 500/502
here are pinned below as regressions.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import httpx
import pytest

from tests.integration.conftest import GPT_OSS, MAX_BODY, SMOLLM, LiveStack

pytestmark = pytest.mark.integration

MODELS = [SMOLLM, GPT_OSS]
OPERATIONS = {
    "/v1/chat/completions": "ChatCompletionRequest",
    "/v1/completions": "CompletionRequest",
    "/v1/responses": "ResponsesRequest",
}
MAX_OUTPUT_TOKENS = 16
MAX_N = 2
MAX_LOGPROBS = 5
EXAMPLES_PER_RUN = 80
"""Examples per operation and generation mode (positive, negative): 480 in all at most."""
FUZZ_SECONDS = 100.0
"""Wall-clock budget of the fuzz, shared out evenly between the six runs."""
REQUEST_TIMEOUT_S = 60.0

# Python exception text that must never reach a client.
LEAKS = ("Traceback", "pydantic", "ValidationError", "Error(", 'File "', "site-packages")


def vllm_openapi() -> dict[str, Any]:
    """The OpenAPI document of the installed vLLM's chat, completions and responses routes.

    Built from vLLM's own FastAPI routers (what ``vllm serve`` mounts), without an engine.
    """
    from fastapi import FastAPI
    from vllm.entrypoints.openai.chat_completion.api_router import attach_router as chat
    from vllm.entrypoints.openai.completion.api_router import attach_router as completion
    from vllm.entrypoints.openai.responses.api_router import attach_router as responses

    app = FastAPI()
    for attach in (chat, completion, responses):
        attach(app)
    return app.openapi()


def _int_at_most(maximum: int, *, minimum: int | None = None, nullable: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer", "maximum": maximum}
    if minimum is not None:
        schema["minimum"] = minimum
    return {"anyOf": [schema, {"type": "null"}]} if nullable else schema


def fuzz_openapi(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` restricted to the three operations, with ``model`` pinned and costs capped.

    Output lengths are 1 to 16 tokens and required (the gateway fills in the model's
    ``default_max_tokens`` where a request names none), ``n`` 1 or 2, logprobs 0
    to 5 (``-1``, all of the vocabulary, would make each answer megabytes), and completions
    need a non-empty ``prompt``: so that positive examples reach the engines. Negative
    examples break these too; :func:`too_costly` skips those that would be expensive.
    """
    doc = copy.deepcopy(doc)
    doc["paths"] = {path: {"post": doc["paths"][path]["post"]} for path in OPERATIONS}
    doc["servers"] = [{"url": "/"}]
    schemas = doc["components"]["schemas"]
    for name in OPERATIONS.values():
        schema = schemas[name]
        props = schema["properties"]
        props["model"] = {"type": "string", "enum": MODELS}
        required = schema.setdefault("required", [])
        required.append("model")
        for key in ("n", "best_of"):
            if key in props:
                props[key] = _int_at_most(MAX_N, minimum=1, nullable=True)
        if "min_tokens" in props:
            props["min_tokens"] = _int_at_most(MAX_OUTPUT_TOKENS, minimum=0)
        for key in ("top_logprobs", "prompt_logprobs", "logprobs"):
            if key in props and '"integer"' in json.dumps(props[key]):
                props[key] = _int_at_most(MAX_LOGPROBS, minimum=0, nullable=True)
    chat = schemas["ChatCompletionRequest"]
    chat["properties"]["max_tokens"] = _int_at_most(MAX_OUTPUT_TOKENS, minimum=1, nullable=True)
    chat["properties"]["max_completion_tokens"] = _int_at_most(MAX_OUTPUT_TOKENS, minimum=1)
    chat["required"].append("max_completion_tokens")
    completion = schemas["CompletionRequest"]
    completion["properties"]["max_tokens"] = _int_at_most(MAX_OUTPUT_TOKENS, minimum=1)
    completion["required"].append("max_tokens")
    # Without a prompt nothing reaches the engine (vLLM's schema has it optional, its
    # validator requires it): the regressions below cover the missing prompt.
    prompt = completion["properties"]["prompt"]
    prompt["anyOf"] = [branch for branch in prompt["anyOf"] if branch.get("type") != "null"]
    for branch in prompt["anyOf"]:
        branch["minItems" if branch["type"] == "array" else "minLength"] = 1
    completion["required"].append("prompt")
    responses = schemas["ResponsesRequest"]
    responses["properties"]["max_output_tokens"] = _int_at_most(MAX_OUTPUT_TOKENS, minimum=1)
    responses["required"].append("max_output_tokens")
    return doc


def too_costly(path: str, body: Any) -> bool:
    """Whether a generated body (negative mode can break the caps) would ask for real work."""
    if not isinstance(body, dict):
        return False

    def over(key: str, limit: int) -> bool:
        value = body.get(key)
        return isinstance(value, int | float) and not isinstance(value, bool) and value > limit

    if any(over(k, MAX_OUTPUT_TOKENS) for k in ("max_tokens", "max_completion_tokens", "max_output_tokens")):
        return True
    if over("min_tokens", MAX_OUTPUT_TOKENS) or over("n", MAX_N) or over("best_of", MAX_N):
        return True
    if any(
        body.get(k) == -1 or over(k, MAX_LOGPROBS) for k in ("logprobs", "top_logprobs", "prompt_logprobs")
    ):
        return True
    # Without a limit the gateway fills in the model's default_max_tokens (thousands).
    if path.endswith("/chat/completions"):
        return body.get("max_completion_tokens") is None and body.get("max_tokens") is None
    if path.endswith("/responses"):
        return body.get("max_output_tokens") is None
    return body.get("max_tokens") is None


def problems(status: int, text: str) -> list[str]:
    """What is wrong with an answer: a 5xx, a 4xx without OpenAI's error body, leaked text,
    a stream that ends in a server error."""
    if status >= 500:
        return [f"status {status}"]
    if status < 400:
        return [f"in-band server error: {line[:300]}" for line in text.splitlines() if _server_error(line)]
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return [f"status {status} without an OpenAI error body"]
    found = []
    if not isinstance(error, dict) or not {"message", "type", "param", "code"} <= set(error):
        found.append(f"status {status}: error body lacks message/type/param/code")
    elif not isinstance(error["message"], str) or not isinstance(error["type"], str):
        found.append(f"status {status}: error message/type are not strings")
    else:
        found += [f"status {status}: message leaks {leak!r}" for leak in LEAKS if leak in error["message"]]
    return found


def encode(body: Any) -> bytes:
    """A generated body as sent: JSON, or the raw bytes negative mode sometimes makes."""
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    return json.dumps(body).encode()


def _server_error(line: str) -> bool:
    if not line.startswith("data: {") or '"error"' not in line:
        return False
    try:
        event = json.loads(line[6:])
    except ValueError:
        return False
    error = event.get("error") if isinstance(event, dict) else None
    if not isinstance(error, dict):
        return False
    code = error.get("code")
    return error.get("type") == "server_error" or (isinstance(code, int) and code >= 500)


def post(stack: LiveStack, path: str, content: bytes) -> httpx.Response:
    return httpx.post(
        stack.base_url + path,
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=REQUEST_TIMEOUT_S,
    )


def assert_openai_400(resp: httpx.Response, *, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == 400, resp.text
    assert not problems(resp.status_code, resp.text), resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    return error


# ---------------------------------------------------------------------------------------
# Regressions: bodies that bare vLLM answers with 400 and that got 500/502 here.


def test_deeply_nested_body_is_400(live_stack: LiveStack) -> None:
    started = time.monotonic()
    resp = post(live_stack, "/v1/chat/completions", b"[" * (MAX_BODY - 1))  # 65,535 levels
    error = assert_openai_400(resp)
    assert error["code"] == "nesting_too_deep"
    nested = b'{"model": "%s", "messages": ' % SMOLLM.encode() + b"[" * 5000 + b"]" * 5000 + b"}"
    assert assert_openai_400(post(live_stack, "/v1/chat/completions", nested))["code"] == "nesting_too_deep"
    assert time.monotonic() - started < 10


def test_completions_without_prompt_with_odd_response_format_is_400(live_stack: LiveStack) -> None:
    for response_format in ({"type": "json_schema"}, {"type": "structural_tag"}, "text", None):
        body = {"model": SMOLLM, "max_tokens": 4, "response_format": response_format}
        error = assert_openai_400(post(live_stack, "/v1/completions", json.dumps(body).encode()))
        assert error["param"] in ("prompt", "response_format"), error


def test_responses_with_null_background_is_400(live_stack: LiveStack) -> None:
    for stream in (False, True):
        body = {"model": GPT_OSS, "input": "hi", "max_output_tokens": 4, "background": None, "stream": stream}
        assert_openai_400(post(live_stack, "/v1/responses", json.dumps(body).encode()), param="background")


def test_non_finite_numbers_are_400(live_stack: LiveStack) -> None:
    messages = '[{"role": "user", "content": "hi"}]'
    for value in ("NaN", "Infinity", "-Infinity", "1e999"):
        body = f'{{"model": "{SMOLLM}", "messages": {messages}, "temperature": {value}}}'.encode()
        assert assert_openai_400(post(live_stack, "/v1/chat/completions", body))["code"] == "invalid_json"


def test_beam_search_with_extreme_length_penalty_is_400(live_stack: LiveStack) -> None:
    """vLLM divided by ``len ** -1e78`` (ZeroDivisionError): 502, or after 200 in a stream."""
    for stream in (False, True):
        body = {
            "model": SMOLLM,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "use_beam_search": True,
            "length_penalty": -1e78,
            "stream": stream,
        }
        resp = post(live_stack, "/v1/chat/completions", json.dumps(body).encode())
        assert_openai_400(resp, param="length_penalty")


def test_integer_beyond_64_bits_is_400(live_stack: LiveStack) -> None:
    """vLLM's engine core cannot receive it (msgpack): EngineGenerateError, 502."""
    body = {"model": GPT_OSS, "input": "hi", "max_output_tokens": 2, "kv_transfer_params": {"x": 2**70}}
    assert_openai_400(
        post(live_stack, "/v1/responses", json.dumps(body).encode()), param="kv_transfer_params"
    )


def test_unpaired_surrogate_is_400(live_stack: LiveStack) -> None:
    body = b'{"model": "%s", "max_tokens": 4, "prompt": "hi \\ud800"}' % SMOLLM.encode()
    assert assert_openai_400(post(live_stack, "/v1/completions", body))["code"] == "invalid_json"


# ---------------------------------------------------------------------------------------
# The fuzz


@pytest.fixture(scope="module")
def fuzz_schema() -> Any:
    import schemathesis

    return schemathesis.openapi.from_dict(fuzz_openapi(vllm_openapi()))


def test_fuzz_no_5xx(live_stack: LiveStack, fuzz_schema: Any) -> None:
    from schemathesis import GenerationMode

    failures: list[str] = []
    counts = {"sent": 0, "skipped": 0, "2xx": 0, "4xx": 0}
    runs = [
        (path, mode) for path in OPERATIONS for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ]
    started = time.monotonic()
    for index, (path, mode) in enumerate(runs):
        deadline = started + FUZZ_SECONDS * (index + 1) / len(runs)
        strategy = fuzz_schema[path]["POST"].as_strategy(generation_mode=mode)
        _fuzz_run(live_stack, path, strategy, deadline, failures, counts)()
    elapsed = time.monotonic() - started
    print(f"fuzz: {counts} in {elapsed:.0f} s")
    assert counts["sent"] >= 60, f"too few examples reached the gateway: {counts}"
    assert not failures, f"{len(failures)} bad answers ({counts}):\n" + "\n".join(failures[:20])


def _fuzz_run(
    stack: LiveStack, path: str, strategy: Any, deadline: float, failures: list[str], counts: dict[str, int]
) -> Any:
    """One derandomized Hypothesis run over ``strategy``; bad answers go to ``failures``
    (collected, not raised: one run reports every bad body it finds, unshrunk)."""
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(
        max_examples=EXAMPLES_PER_RUN,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        body = case.body
        if time.monotonic() > deadline or too_costly(path, body):
            counts["skipped"] += 1
            return
        content = encode(body)
        counts["sent"] += 1
        try:
            resp = post(stack, path, content)
        except httpx.TimeoutException:
            failures.append(f"POST {path} timed out after {REQUEST_TIMEOUT_S} s\n  body: {content[:2000]!r}")
            return
        if resp.status_code < 500:
            counts["2xx" if resp.status_code < 300 else "4xx"] += 1
        found = problems(resp.status_code, resp.text)
        if found:
            failures.append(
                f"POST {path}: {'; '.join(found)}\n  body: {content[:2000]!r}\n  answer: {resp.text[:2000]}"
            )

    return run
