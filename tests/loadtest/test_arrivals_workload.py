"""Arrival processes and request mixes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from loadtest.arrivals import schedule, trace_schedule
from loadtest.tokenizer import WordTokenizer, text_of_length
from loadtest.workload import WorkloadSpec, build_requests, load_workload


def test_constant_schedule_is_exact() -> None:
    assert schedule("constant", 4.0, 5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert schedule("constant", 4.0, 100, max_duration_s=1.0) == [0.0, 0.25, 0.5, 0.75]


@pytest.mark.parametrize(
    ("kind", "burstiness", "cv"), [("poisson", 1.0, 1.0), ("gamma", 0.25, 2.0), ("gamma", 4.0, 0.5)]
)
def test_gap_mean_and_variation(kind: str, burstiness: float, cv: float) -> None:
    offs = schedule(kind, 20.0, 20001, burstiness=burstiness, seed=3)  # type: ignore[arg-type]
    gaps = np.diff(offs)
    assert gaps.mean() == pytest.approx(1 / 20, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
    assert schedule(kind, 20.0, 50, burstiness=burstiness, seed=3) == offs[:50]  # type: ignore[arg-type]


def test_schedule_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="rate"):
        schedule("poisson", 0.0, 10)
    with pytest.raises(ValueError, match="unknown"):
        schedule("weibull", 1.0, 10)  # type: ignore[arg-type]


def test_trace_schedule() -> None:
    assert trace_schedule([105.0, 100.0, 101.0], speedup=2.0) == [0.0, 0.5, 2.5]


def test_prompt_lengths_are_exact_with_the_tokenizer() -> None:
    tok = WordTokenizer()
    rng = np.random.default_rng(0)
    for n in (1, 7, 300):
        assert len(tok.encode(text_of_length(tok, n, rng))) == n


def _spec(**cls: object) -> WorkloadSpec:
    return WorkloadSpec.model_validate({"seed": 1, "classes": [cls]})


def test_lengths_shared_prefix_and_mix() -> None:
    spec = _spec(
        input_tokens={"dist": "uniform", "min": 10, "max": 20},
        output_tokens=16,
        shared_prefix={"groups": 3, "tokens": 50},
        reasoning_effort={"low": 1, "high": 1},
        stream=0.5,
        tenants={"a": {"api_key": "ka"}, "b": {"api_key": "kb", "headers": {"x-team": "b"}}},
        priorities={"hi": {"headers": {"x-priority": "high"}, "body": {"priority": 0}}},
    )
    tok = WordTokenizer()
    reqs = build_requests(spec, 200, tok, "m")
    systems = {r.body["messages"][0]["content"] for r in reqs}
    assert len(systems) == 3
    assert all(len(tok.encode(s)) == 50 for s in systems)
    for r in reqs:
        user = r.body["messages"][-1]["content"]
        assert 10 <= len(tok.encode(user)) <= 20
        assert r.input_tokens == 50 + len(tok.encode(user))
        assert r.body["max_tokens"] == 16
        assert r.body["model"] == "m"
        assert r.headers["x-priority"] == "high"
        assert r.body["priority"] == 0
        assert r.headers["Authorization"] in ("Bearer ka", "Bearer kb")
        assert (r.headers.get("x-team") == "b") == (r.tags["tenant"] == "b")
        assert r.body["stream"] is r.stream
        assert ("stream_options" in r.body) is r.stream
    efforts = {r.body["reasoning_effort"] for r in reqs}
    assert efforts == {"low", "high"}
    assert 60 < sum(r.stream for r in reqs) < 140


def test_multi_turn_conversations_grow() -> None:
    spec = _spec(input_tokens=10, output_tokens=5, turns=3, open_conversations=2)
    reqs = build_requests(spec, 30, WordTokenizer(), "m")
    by_conv: dict[str, list[int]] = {}
    for r in reqs:
        by_conv.setdefault(r.tags["conversation"], []).append(r.index)
    assert all(len(ix) <= 3 for ix in by_conv.values())
    full = [ix for ix in by_conv.values() if len(ix) == 3]
    assert full
    first, second, third = (reqs[i] for i in full[0])
    assert [m["role"] for m in third.body["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert third.body["messages"][:2] == second.body["messages"][:2]
    assert (first.input_tokens, second.input_tokens, third.input_tokens) == (10, 25, 40)


def test_completions_api_and_yaml(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("name: x\nclasses:\n  - api: completions\n    input_tokens: 8\n    output_tokens: 2\n")
    reqs = build_requests(load_workload(path), 3, WordTokenizer(), "m")
    assert reqs[0].path == "/v1/completions"
    assert len(reqs[0].body["prompt"].split()) == 8
    path.write_text("classes:\n  - input_tokens: 8\n    bogus: 1\n")
    with pytest.raises(ValidationError, match="bogus"):
        load_workload(path)
    with pytest.raises(ValidationError, match="classes"):
        WorkloadSpec.model_validate({})


def test_trace_replay(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 100.0, "input_tokens": 5, "output_tokens": 3, "prefix_group": 1, "prefix_tokens": 4},
        {"timestamp": 101.5, "input_tokens": 7, "output_tokens": 2, "tenant": "x"},
        {"timestamp": 103.0, "messages": [{"role": "user", "content": "hi"}], "output_tokens": 1},
    ]
    trace.write_text("\n".join(json.dumps(r) for r in rows))
    spec = WorkloadSpec.model_validate({"trace": {"path": str(trace), "speedup": 1.5}})
    reqs = build_requests(spec, 10, WordTokenizer(), "m")
    assert [r.offset for r in reqs] == pytest.approx([0.0, 1.0, 2.0])
    assert [r.body["max_tokens"] for r in reqs] == [3, 2, 1]
    assert len(reqs[0].body["messages"][0]["content"].split()) == 4
    assert reqs[1].tags["tenant"] == "x"
    assert reqs[2].body["messages"] == [{"role": "user", "content": "hi"}]
