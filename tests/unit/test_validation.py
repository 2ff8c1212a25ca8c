"""Body limits and request validation (``serving.gateway.validation``): every bad body is a 400.

No services: vLLM's protocol models in process. The three bodies that once got 500/502
(a deeply nested body, a completions body without ``prompt`` with an odd
``response_format``, a responses body with ``"background": null``) are pinned here and,
through the live stack, in ``tests/integration/test_fuzz.py``.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import BaseModel, model_validator

from serving.config import GatewayConfig
from serving.engine.protocol import Endpoint, EngineJSON
from serving.engine.request_errors import is_client_error, param_path
from serving.engine.server import _OssServerMixin
from serving.gateway import validation as protocol
from serving.gateway.errors import InvalidRequestError
from serving.gateway.validation import invalid_request, parse_json_body, validate_request

MODEL = "smollm2-135m-instruct"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
LEAKS = ("Traceback", "pydantic", "ValidationError", "Error(", 'File "', "site-packages", "instance of")


def rejected(raw: bytes, config: GatewayConfig | None = None) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as err:
        parse_json_body(raw, config)
    assert err.value.status == 400
    return err.value


def invalid(endpoint: Endpoint, body: dict[str, Any]) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as err:
        validate_request(endpoint, body, 2000)
    error = err.value
    assert error.status == 400
    assert error.type == "invalid_request_error"
    for leak in LEAKS:
        assert leak not in error.message, error.message
    return error


# ---------------------------------------------------------------------------------------
# parse_json_body


@pytest.mark.parametrize(
    "raw",
    [b"[" * 100_000, b'{"a":' * 100_000, b"[" * 100_000 + b"]" * 100_000, b'{"a": [' + b"[" * 3_000_000],
    ids=["arrays", "objects", "balanced", "inside-an-object"],
)
def test_deep_nesting_is_a_fast_400(raw: bytes) -> None:
    started = time.monotonic()
    error = rejected(raw)
    assert error.code == "nesting_too_deep"
    assert "64" in error.message
    assert time.monotonic() - started < 2


def test_depth_limit_is_exact_and_configurable() -> None:
    body: dict[str, Any] = {"x": 1}
    for _ in range(63):
        body = {"x": body}  # 64 levels
    assert parse_json_body(json.dumps(body).encode())
    assert rejected(json.dumps({"x": body}).encode()).code == "nesting_too_deep"
    shallow = GatewayConfig(max_json_depth=3)
    assert parse_json_body(b'{"a": [{"b": 1}]}', shallow)
    assert rejected(b'{"a": [[{"b": 1}]]}', shallow).code == "nesting_too_deep"


def test_brackets_inside_strings_do_not_count() -> None:
    text = "[" * 5000 + '\\"{{{' + "\\\\" + "[[["
    body = parse_json_body(json.dumps({"model": MODEL, "prompt": text}).encode())
    assert body["prompt"] == text


def test_unterminated_string_full_of_brackets_is_400_not_a_crash() -> None:
    for raw in (
        b'{"a": "' + b"[" * 100_000,
        b'{"a": "x", "b": ' + b"[" * 100_000 + b'"',
        b'{"a": "' + b'\\"' * 500_000,
    ):
        assert rejected(raw).code in ("invalid_json", "nesting_too_deep")


def test_long_arrays_are_400() -> None:
    config = GatewayConfig(max_array_items=1024)
    assert parse_json_body(json.dumps({"prompt": list(range(1024))}).encode(), config)
    error = rejected(json.dumps({"prompt": [list(range(1025))]}).encode(), config)
    assert error.code == "array_too_long"
    assert "1025" in error.message
    # The default leaves room for 1,024-prompt completion lists and long token-id prompts.
    assert parse_json_body(json.dumps({"prompt": ["x"] * 1024, "ids": [1] * 200_000}).encode())


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
def test_non_finite_numbers_are_400(value: str) -> None:
    error = rejected(f'{{"model": "m", "temperature": {value}}}'.encode())
    assert error.code == "invalid_json"
    assert rejected(f'{{"model": "m", "logit_bias": {{"1": [{value}]}}}}'.encode()).code == "invalid_json"


@pytest.mark.parametrize(
    "raw", [b"", b"{nope", b"\xff\xfe{}", b"[1, 2]", b'"text"', b"null", b'{"a": ' + b"1" * 5000 + b"}"]
)
def test_not_a_json_object_is_invalid_json(raw: bytes) -> None:
    error = rejected(raw)
    assert (error.code, error.param) == ("invalid_json", None)
    assert "sys." not in error.message


@pytest.mark.parametrize(
    "raw",
    [
        rb'{"prompt": "a\ud800b"}',
        rb'{"messages": [{"content": "\udfff"}]}',
        rb'{"\uDBFF": 1}',
        rb'{"prompt": "\ude00\ud83d"}',
    ],
)
def test_unpaired_surrogates_are_invalid_json(raw: bytes) -> None:
    """Python's json lets them through; tokenizers, Redis and hashing choke on them later."""
    error = rejected(raw)
    assert error.code == "invalid_json"
    assert "surrogate" in error.message


def test_paired_surrogates_are_text() -> None:
    assert parse_json_body(rb'{"prompt": "\ud83d\ude00 \\ud800"}')["prompt"] == "\U0001f600 \\ud800"


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 10**30])
def test_integers_beyond_64_bits_are_400(value: int) -> None:
    """vLLM's engine core receives requests as msgpack: such an integer anywhere it
    forwards (``kv_transfer_params``, ``vllm_xargs``, ...) failed the request with a 502."""
    error = rejected(json.dumps({"model": MODEL, "kv_transfer_params": {"x": [{"y": value}]}}).encode())
    assert (error.param, error.code) == ("kv_transfer_params", "invalid_value")
    assert parse_json_body(json.dumps({"seed": 2**64 - 1, "x": -(2**63)}).encode())


def test_ordinary_body_parses() -> None:
    assert parse_json_body(json.dumps(CHAT).encode(), GatewayConfig()) == CHAT


# ---------------------------------------------------------------------------------------
# validate_request: the regressions


@pytest.mark.parametrize(
    "response_format",
    [{"type": "json_schema"}, {"type": "structural_tag"}, {"type": "nope"}, "text", [], None],
)
def test_completions_without_prompt_with_odd_response_format_is_400(response_format: Any) -> None:
    """vLLM raises its own VLLMValidationError, which is not a ValueError: it used to
    escape the gateway's validation and become a 500."""
    error = invalid(Endpoint.completions, {"model": MODEL, "response_format": response_format})
    assert error.param in ("prompt", "response_format")
    assert error.code == "invalid_value"
    assert "parameter=" not in error.message


def test_completions_response_format_errors_name_the_parameter() -> None:
    body = {"model": MODEL, "prompt": "x", "response_format": {"type": "json_schema"}}
    error = invalid(Endpoint.completions, body)
    assert error.param == "response_format"
    assert "json_schema" in error.message


@pytest.mark.parametrize("stream", [False, True])
def test_responses_with_null_background_is_400(stream: bool) -> None:
    """The request model accepts ``null`` but vLLM's answer model does not: the engine
    failed after generating (502 with pydantic's text)."""
    body = {"model": "gpt-oss-tiny", "input": "hi", "background": None, "stream": stream}
    error = invalid(Endpoint.responses, body)
    assert error.param == "background"
    assert error.message.startswith("Invalid value for 'background'")


def test_responses_with_null_truncation_is_400() -> None:
    assert (
        invalid(Endpoint.responses, {"model": MODEL, "input": "hi", "truncation": None}).param == "truncation"
    )


def test_valid_bodies_pass_and_are_not_modified() -> None:
    bodies = [
        (Endpoint.chat, CHAT),
        (Endpoint.completions, {"model": MODEL, "prompt": "x", "max_tokens": 4}),
        (Endpoint.responses, {"model": MODEL, "input": "hi", "background": False, "truncation": "auto"}),
    ]
    for endpoint, body in bodies:
        before = json.dumps(body, sort_keys=True)
        assert validate_request(endpoint, body, 2000) == MODEL
        assert json.dumps(body, sort_keys=True) == before  # vLLM's validators fill a copy


# ---------------------------------------------------------------------------------------
# validate_request: never anything but a clean 400


def test_missing_required_parameter() -> None:
    error = invalid(Endpoint.chat, {"model": MODEL})
    assert (error.param, error.code) == ("messages", "missing_required_parameter")
    assert invalid(Endpoint.responses, {"model": MODEL}).param == "input"


def test_missing_model() -> None:
    error = invalid(Endpoint.chat, {"messages": []})
    assert (error.param, error.code) == ("model", "missing_model")


@pytest.mark.parametrize(
    ("endpoint", "extra", "param"),
    [
        (Endpoint.chat, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (Endpoint.chat, {"messages": "hi"}, "messages"),
        (Endpoint.chat, {"messages": [{"role": "user", "content": "x"}], "logprobs": "x"}, "logprobs"),
        (Endpoint.chat, {"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "max!"}, None),
        (Endpoint.chat, {"messages": [{"role": "user", "content": "x"}], "tool_choice": {"a": 1}}, None),
        (
            Endpoint.chat,
            {"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
            None,
        ),
        (Endpoint.chat, {"messages": [5]}, "messages[0]"),
        (Endpoint.chat, {"messages": [{"content": "x"}]}, "messages[0].role"),
        (Endpoint.completions, {"prompt": "x", "logprobs": "many"}, "logprobs"),
        (Endpoint.completions, {"prompt": [[1, "a"]]}, None),
        (Endpoint.completions, {"prompt": "x", "structured_outputs": {"json": 1, "regex": "a"}}, None),
        (Endpoint.responses, {"input": [{"type": "nope"}]}, None),
        (Endpoint.responses, {"input": "hi", "tools": [{"type": "function"}]}, None),
        (Endpoint.responses, {"input": "hi", "text": {"format": {"type": "json_schema"}}}, None),
    ],
)
def test_bad_parameters_are_clean_400s(endpoint: Endpoint, extra: dict[str, Any], param: str | None) -> None:
    error = invalid(endpoint, {"model": MODEL, **extra})
    if param is not None:
        assert error.param == param
    assert error.code in ("invalid_value", "missing_required_parameter")
    assert error.message


class _Raises(BaseModel):
    kind: str = ""

    @model_validator(mode="before")
    @classmethod
    def _boom(cls, data: Any) -> Any:
        kind = data.get("kind")
        if kind == "type":
            raise TypeError("'<' not supported between instances of 'str' and 'int'")
        if kind == "key":
            raise KeyError("type")
        if kind == "attribute":
            raise AttributeError("'str' object has no attribute 'get'")
        if kind == "recursion":
            raise RecursionError("maximum recursion depth exceeded")
        if kind == "value":
            raise ValueError("prompt must not be empty")
        if kind == "path":
            raise ValueError(
                'bad template at /usr/lib/python3.11/site-packages/x/y.py File "/a/b.py", line 3'
            )
        return data


@pytest.mark.parametrize("kind", ["type", "key", "attribute", "recursion", "value", "path"])
def test_any_exception_of_a_model_validator_is_a_clean_400(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setattr(protocol, "_model_for", lambda endpoint: _Raises)
    error = invalid(Endpoint.chat, {"model": MODEL, "kind": kind})
    for text in ("'str'", "'<'", "object has no attribute", "/usr/lib", "y.py", "line 3"):
        assert text not in error.message
    if kind == "value":
        assert error.message == "prompt must not be empty"


def test_vllm_validation_error_keeps_its_parameter() -> None:
    from vllm.exceptions import VLLMValidationError

    error = invalid_request(
        VLLMValidationError("`logprobs` must be set.", parameter="logprobs", value=[1, 2])
    )
    assert (error.param, error.message) == ("logprobs", "`logprobs` must be set.")
    assert invalid_request(VLLMValidationError("too long", parameter="prompt")).message == (
        "Invalid value for 'prompt': too long"
    )


def test_messages_are_cut_to_the_configured_length() -> None:
    with pytest.raises(InvalidRequestError) as err:
        validate_request(Endpoint.chat, {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 20)
    assert len(err.value.message) <= 20


def test_param_path_drops_union_tags_and_branch_names() -> None:
    loc = (
        "messages",
        0,
        "ChatCompletionUserMessageParam",
        "content",
        "list[...]",
        1,
        "function-after[x()]",
        "text",
    )
    assert param_path(loc) == "messages[0].content[1].text"
    assert param_path(("tool_choice", "literal['none','auto']")) == "tool_choice"
    assert param_path(("str",)) is None


def test_client_errors_are_the_ones_vllm_answers_with_4xx() -> None:
    from vllm.exceptions import VLLMValidationError

    for exc in (VLLMValidationError("x"), ValueError("x"), TypeError("x"), OverflowError("x")):
        assert is_client_error(exc)
    for exc in (RuntimeError("engine dead"), KeyboardInterrupt(), AssertionError("x")):
        assert not is_client_error(exc)


# ---------------------------------------------------------------------------------------
# The engine side: vLLM rejects a request after it was accepted


class _Server(_OssServerMixin):
    """The mixin without Ray: vLLM's serving objects are stand-ins."""

    def __init__(self, handler: Any) -> None:
        self.engine = SimpleNamespace(_app_state=SimpleNamespace(openai_serving_responses=handler))

    async def chat(self, request: Any, raw_request_info: Any = None) -> Any:
        raise AssertionError("a request that fails validation never reaches vLLM")

    completions = chat


class _Handler:
    """vLLM's responses serving object, failing the way it does for ``background: null``:
    building its answer (``ResponsesResponse.from_request``) raises pydantic's error."""

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.closed = False

    def _answer(self, request: Any) -> Any:
        from vllm.entrypoints.openai.responses.protocol import ResponsesResponse
        from vllm.sampling_params import SamplingParams

        return ResponsesResponse.from_request(
            request,
            SamplingParams(max_tokens=4),
            model_name="m",
            created_time=0,
            output=[],
            status="completed",
        )

    async def create_responses(self, request: Any, raw_request: Any) -> Any:
        if not self.stream:
            return self._answer(request)

        async def events() -> Any:
            try:
                yield self._answer(request)
            finally:
                self.closed = True

        return events()


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_answers_400_when_vllm_rejects_the_request_late(stream: bool) -> None:
    handler = _Handler(stream)
    server = _Server(handler)
    body = {"model": "m", "input": "hi", "background": None, "stream": stream}
    items = [item async for item in server.generate("responses", body, {})]
    assert len(items) == 1
    answer = items[0]
    assert isinstance(answer, EngineJSON)
    assert answer.status == 400
    error = answer.body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == ("invalid_request_error", "background")
    for leak in LEAKS:
        assert leak not in error["message"]
    assert handler.closed == stream


async def test_engine_answers_400_when_the_request_fails_validation() -> None:
    server = _Server(_Handler(False))
    items = [item async for item in server.generate("completions", {"model": "m"}, {})]
    assert len(items) == 1
    assert isinstance(items[0], EngineJSON)
    assert (items[0].status, items[0].body["error"]["param"]) == (400, "prompt")


# ---------------------------------------------------------------------------------------
# The engine side: gpt-oss's Harmony rendering fails on shapes the request model accepts


HARMONY_FAILURES = {
    # validates as an openai_harmony Message; the renderer then calls .get on it
    "harmony-message": [{"author": {"role": "user"}, "content": [{"type": "text", "text": "hi"}]}],
    "null-tool-calls": [{"role": "assistant", "content": "x", "tool_calls": None}],
    "function-role": [{"role": "function", "content": "x"}],
}


class _HarmonyServer(_Server):
    """Chat through vLLM's real Harmony message rendering (what gpt-oss models run before
    any output), as Ray's engine does it: inside the answer's generator."""

    async def chat(self, request: Any, raw_request_info: Any = None) -> Any:
        from vllm.entrypoints.openai.parser.harmony_utils import parse_chat_inputs_to_harmony_messages

        async def answer() -> Any:
            parse_chat_inputs_to_harmony_messages(list(request.messages))
            yield SimpleNamespace(model_dump=lambda mode: {"object": "chat.completion"})

        return answer()


@pytest.mark.parametrize("case", sorted(HARMONY_FAILURES))
async def test_engine_answers_400_when_prompt_rendering_fails(case: str) -> None:
    body = {"model": "gpt-oss-tiny", "messages": HARMONY_FAILURES[case]}
    assert validate_request(Endpoint.chat, body, 2000) == "gpt-oss-tiny"  # the gateway cannot tell
    items = [item async for item in _HarmonyServer(None).generate("chat", body, {})]
    assert len(items) == 1
    answer = items[0]
    assert isinstance(answer, EngineJSON)
    assert answer.status == 400
    for leak in LEAKS:
        assert leak not in answer.body["error"]["message"]


async def test_engine_failures_that_are_not_the_requests_fault_still_raise() -> None:
    class Broken(_Server):
        async def chat(self, request: Any, raw_request_info: Any = None) -> Any:
            async def answer() -> Any:
                raise RuntimeError("engine core died")
                yield

            return answer()

    with pytest.raises(RuntimeError):
        [item async for item in Broken(None).generate("chat", CHAT, {})]


def test_vllm_error_answers_are_cleaned() -> None:
    from serving.engine.server import _error_json

    pydantic_text = (
        "1 validation error for Author\nrole\n  Input should be 'user', 'assistant', 'system', "
        "'developer' or 'tool' [type=enum, input_value='function', input_type=str]\n"
        "    For further information visit https://errors.pydantic.dev/2.14/v/enum"
    )
    answers = {
        pydantic_text: "Invalid value for 'role': Input should be 'user', 'assistant', 'system', "
        "'developer' or 'tool'",
        "reasoning_effort='xhigh' is not supported by Harmony. (parameter=reasoning_effort, value=xhigh)": (
            "reasoning_effort='xhigh' is not supported by Harmony."
        ),
    }
    for text, expected in answers.items():
        info = SimpleNamespace(message=text, type="BadRequestError", code=400, param=None)
        answer = _error_json(SimpleNamespace(error=info))
        assert (answer.status, answer.body["error"]["message"]) == (400, expected)
    server_error = SimpleNamespace(error=SimpleNamespace(message="boom", type="x", code=500, param=None))
    assert _error_json(server_error).body["error"]["message"] == "boom"  # the gateway replaces 5xx text


@pytest.mark.parametrize("penalty", [-1e78, 1e78, -51, 51])
def test_beam_search_length_penalty_out_of_range_is_400(penalty: float) -> None:
    """vLLM divides by ``len ** length_penalty``: -1e78 was a ZeroDivisionError (502), and
    in a stream an in-band server error after 200."""
    body = {
        "model": MODEL,
        "prompt": "hi",
        "max_tokens": 4,
        "use_beam_search": True,
        "length_penalty": penalty,
    }
    assert invalid(Endpoint.completions, body).param == "length_penalty"
    chat = {**CHAT, "use_beam_search": True, "length_penalty": penalty, "stream": True}
    assert invalid(Endpoint.chat, chat).param == "length_penalty"
    assert validate_request(Endpoint.completions, {**body, "use_beam_search": False}, 2000) == MODEL
    assert validate_request(Endpoint.completions, {**body, "length_penalty": 2.0}, 2000) == MODEL


async def test_engine_answers_400_when_parameters_break_vllms_arithmetic() -> None:
    from vllm.entrypoints.generate.beam_search.utils import create_sort_beams_key_function

    class BeamSearch(_Server):
        async def chat(self, request: Any, raw_request_info: Any = None) -> Any:
            async def answer() -> Any:
                key = create_sort_beams_key_function(eos_token_id=0, length_penalty=-1e78)
                key(SimpleNamespace(tokens=[5, 6, 7], cum_logprob=-1.0))
                yield

            return answer()

    items = [item async for item in BeamSearch(None).generate("chat", CHAT, {})]
    assert len(items) == 1
    assert isinstance(items[0], EngineJSON)
    assert items[0].status == 400
    assert "too extreme" in items[0].body["error"]["message"]


async def test_engine_answers_400_for_a_client_error_vllm_wrapped() -> None:
    """AsyncLLM.generate wraps what failed a request in EngineGenerateError (a server error);
    before any output, what it wraps decides."""
    from vllm.v1.engine.exceptions import EngineGenerateError

    def failing(cause: BaseException) -> type[_Server]:
        class Wrapped(_Server):
            async def completions(self, request: Any, raw_request_info: Any = None) -> Any:
                async def answer() -> Any:
                    raise EngineGenerateError() from cause
                    yield

                return answer()

        return Wrapped

    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    overflow = OverflowError("can't serialize ints < -2**63 or > 2**64 - 1")
    items = [item async for item in failing(overflow)(None).generate("completions", body, {})]
    assert isinstance(items[0], EngineJSON)
    assert items[0].status == 400
    with pytest.raises(EngineGenerateError):
        [
            item
            async for item in failing(RuntimeError("scheduler bug"))(None).generate("completions", body, {})
        ]
