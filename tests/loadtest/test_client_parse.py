"""Server-sent event parsing: channels, usage, errors."""

from __future__ import annotations

from loadtest.client import parse_sse_event
from loadtest.records import ErrorKind, RequestRecord


def _rec() -> RequestRecord:
    return RequestRecord(index=0, scheduled=0.0)


def test_role_only_and_usage_only_chunks_add_no_output() -> None:
    rec = _rec()
    parse_sse_event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}, 0.1, rec)
    parse_sse_event(
        {
            "choices": [],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 8},
                "completion_tokens_details": {"reasoning_tokens": 3},
            },
        },
        0.2,
        rec,
    )
    assert rec.chunks == []
    assert (rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens, rec.reasoning_tokens) == (
        12,
        5,
        8,
        3,
    )


def test_reasoning_fields_of_both_spellings_and_content() -> None:
    rec = _rec()
    parse_sse_event({"choices": [{"delta": {"reasoning_content": "think"}}]}, 0.1, rec)
    parse_sse_event({"choices": [{"delta": {"reasoning": "more"}}]}, 0.2, rec)
    parse_sse_event({"choices": [{"delta": {"content": "answer"}}]}, 0.3, rec)
    parse_sse_event({"choices": [{"delta": {"tool_calls": [{"index": 0}]}}]}, 0.4, rec)
    assert [(c.reasoning, c.content, c.tool) for c in rec.chunks] == [
        ("think", "", False),
        ("more", "", False),
        ("", "answer", False),
        ("", "", True),
    ]
    assert [c.has_content for c in rec.chunks] == [False, False, True, True]


def test_completions_text_and_in_band_error() -> None:
    rec = _rec()
    parse_sse_event({"choices": [{"index": 0, "text": " hello"}]}, 0.1, rec)
    assert rec.chunks[0].content == " hello"
    parse_sse_event({"error": {"message": "boom"}}, 0.2, rec)
    assert rec.error == ErrorKind.STREAM_ERROR
