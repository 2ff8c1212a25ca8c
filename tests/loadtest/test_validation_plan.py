"""Validation against held-out workloads and the margin a plan takes from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from loadtest.cli import main
from loadtest.config import PlanConfig
from loadtest.plan import capacity_plan
from loadtest.sim import EngineProfile
from loadtest.validation import (
    DEFAULT_SET,
    VALIDATION_SCHEMA,
    load_validation_set,
    margin_from_validation,
    outside_validated_range,
)
from tests.loadtest.conftest import serve_sim

CAP4 = EngineProfile(step_base_s=0.1, step_per_seq_s=0.0, prefill_per_token_s=0.0, max_num_seqs=4)


def _table(sat_errors: list[float], inputs: tuple[float, float] = (32, 32)) -> dict[str, Any]:
    rows = [
        {
            "workload": f"w{i}",
            "input_tokens": inputs[i % 2],
            "output_tokens": 10.0,
            "saturation_error": e,
            "ttft_p50_error": e / 2,
        }
        for i, e in enumerate(sat_errors)
    ]
    return {
        "schema": VALIDATION_SCHEMA,
        "set": "t",
        "profile": "p",
        "rows": rows,
        "ranges": {"input_tokens": [min(inputs), max(inputs)], "output_tokens": [10.0, 10.0]},
    }


def _plan_args(tmp_path: Path, *extra: str) -> list[str]:
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump(CAP4.model_dump()))
    args = ["plan", "--profile", str(prof), "--input-tokens", "32", "--output-tokens", "10"]
    args += ["--slo", "ttft:1000", "--target-rate", "20", "--out", str(tmp_path), *extra]
    return args


def test_plan_margin_grows_with_the_validation_error(tmp_path: Path) -> None:
    small = margin_from_validation(_table([0.02, -0.05, 0.03]))
    large = margin_from_validation(_table([0.02, -0.18, 0.28]))
    assert small.value == pytest.approx(0.05)
    assert large.value == pytest.approx(0.28)
    assert small.validated
    assert "w1" in small.source
    plan = PlanConfig(target_rate=100, failure_tolerance=0, max_utilization=1.0)
    cap = {"mean": 10.0, "low": 10.0, "high": 10.0}
    a = capacity_plan(plan, cap, "t", {}, small.value, small.source)
    b = capacity_plan(plan, cap, "t", {}, large.value, large.source)
    assert a["replicas_for_load"] == 11  # ceil(100 / (10 x 0.95))
    assert b["replicas_for_load"] == 14  # ceil(100 / (10 x 0.72))
    assert b["usable_rate_per_replica"] < a["usable_rate_per_replica"]
    # the same through the command line: larger errors, at least as many replicas
    replicas = []
    for name, errors in (("small", [0.02, -0.05]), ("large", [0.3, -0.4])):
        table = tmp_path / f"{name}.json"
        table.write_text(json.dumps(_table(errors)))
        r = CliRunner().invoke(main, _plan_args(tmp_path, "--validation", str(table)))
        assert r.exit_code == 0, r.output
        plan_doc = json.loads((tmp_path / "capacity_plan.json").read_text())
        assert plan_doc["margin"] == pytest.approx(max(abs(e) for e in errors))
        assert f"margin {plan_doc['margin']:.1%}" in r.output
        assert str(table) in plan_doc["margin_source"]
        replicas.append(plan_doc["replicas"])
    assert replicas[1] >= replicas[0]
    with pytest.raises(ValueError, match="no usable capacity"):
        margin_from_validation(_table([1.2]))


def test_plan_without_a_table_states_an_unvalidated_default(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, _plan_args(tmp_path))
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "capacity_plan.json").read_text())
    assert doc["margin"] == PlanConfig().unvalidated_margin
    assert "UNVALIDATED" in doc["margin_source"]
    assert "UNVALIDATED" in r.output
    # a measured capacity takes no margin
    slo = tmp_path / "slo.json"
    slo.write_text(json.dumps({"rate_per_replica": {"mean": 5.0, "low": 4.0, "high": 6.0}, "slos_s": {}}))
    r = CliRunner().invoke(main, ["plan", "--from", str(slo), "--target-rate", "10", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "capacity_plan.json").read_text())["margin"] == 0.0


def test_plan_warns_or_refuses_outside_the_validated_range(tmp_path: Path) -> None:
    doc = _table([0.05, 0.05], inputs=(16, 64))
    assert outside_validated_range(doc, {"input_tokens": 70, "output_tokens": 10}, 0.25) == []
    far = outside_validated_range(doc, {"input_tokens": 81, "output_tokens": 10}, 0.25)
    assert len(far) == 1
    assert "input tokens" in far[0]
    assert outside_validated_range(doc, {"input_tokens": 13, "output_tokens": 12}, 0.25) == []
    assert len(outside_validated_range(doc, {"input_tokens": 13, "output_tokens": 50}, 0.25)) == 1
    table = tmp_path / "v.json"
    table.write_text(json.dumps(doc))
    args = _plan_args(tmp_path, "--validation", str(table))
    args[args.index("--output-tokens") + 1] = "200"  # 20x the validated output length
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "outside what was validated" in r.output
    assert any(
        "outside" in a for a in json.loads((tmp_path / "capacity_plan.json").read_text())["assumptions"]
    )
    r = CliRunner().invoke(main, [*args, "--refuse-outside"])
    assert r.exit_code == 2
    assert "outside" in r.output


def test_shipped_validation_set_covers_the_kinds_of_workload() -> None:
    vs = load_validation_set()
    names = [w.name for w in vs.workloads]
    assert names == [
        "prefill-heavy",
        "decode-heavy",
        "mixed-length",
        "shared-prefix",
        "multi-turn",
        "reasoning-effort-mix",
    ]
    by = {w.name: w.classes[0] for w in vs.workloads}
    assert by["shared-prefix"].shared_prefix is not None
    assert by["multi-turn"].turns.min >= 2
    assert by["reasoning-effort-mix"].reasoning_effort


def _shrink(length: Any) -> Any:
    """A length (an int or a distribution) divided by 8."""
    if isinstance(length, int):
        return max(1, length // 8)
    return {k: max(1, v // 8) if k in ("value", "mean", "std", "max") else v for k, v in length.items()}


def test_validate_end_to_end_against_the_simulated_engine(tmp_path: Path) -> None:
    # the simulated engine over HTTP plays the real endpoint; the profile is its own
    real = EngineProfile(step_base_s=0.001, step_per_seq_s=2e-4, prefill_per_token_s=2e-6, max_num_seqs=16)
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump(real.model_dump()))
    conf = tmp_path / "c.yaml"
    conf.write_text(
        yaml.safe_dump(
            {"validity": {"max_send_lag_p99_s": 5.0, "min_rate_ratio": 0.5}, "sweep": {"min_requests": 8}}
            | {"slo_search": {"repeats": 2, "duration_s": 2.0}}
            | {"output": {"html": False}}
        )
    )
    # the shipped set with every length divided by 8 (the same kinds of workload, faster)
    tiny = yaml.safe_load(DEFAULT_SET.read_text())
    for cls in (c for w in tiny["workloads"] for c in w["classes"]):
        for key in ("input_tokens", "output_tokens"):
            cls[key] = _shrink(cls[key])
        if "shared_prefix" in cls:
            cls["shared_prefix"]["tokens"] //= 8
    (tmp_path / "set.yaml").write_text(yaml.safe_dump(tiny))
    out = tmp_path / "val"
    with serve_sim(real) as url:
        args = ["validate", "--config", str(conf), "--base-url", url, "--model", "sim"]
        args += ["--profile", str(prof), "--set", str(tmp_path / "set.yaml")]
        args += ["--rates", "16,32", "--point-duration", "0.5", "--no-progress", "--out", str(out)]
        r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "validation.json").read_text())
    assert doc["schema"] == VALIDATION_SCHEMA
    names = [w["name"] for w in tiny["workloads"]]
    assert names == [w.name for w in load_validation_set().workloads]
    assert [row["workload"] for row in doc["rows"]] == names
    for row in doc["rows"]:
        assert row["measured"]["saturation_rps"] > 0
        assert row["predicted"]["saturation_rps"] > 0
        assert row["saturation_error"] is not None
        assert row["ttft_p50_error"] is not None
        # point by point: the simulation ran exactly the rates the real sweep ran
        assert row["predicted"]["rates"] == row["measured"]["rates"]
        assert (out / row["workload"] / "measured" / "sweep.json").exists()
        assert (out / row["workload"] / "predicted" / "sweep.json").exists()
    for name in names:
        assert name in r.output
    bad = CliRunner().invoke(main, [*args, "--only", "no-such-workload"])
    assert bad.exit_code == 2
    assert "no-such-workload" in bad.output
    assert "plan margin from this table" in r.output
    # the table round-trips into plan
    args = [
        "plan",
        "--config",
        str(conf),
        "--profile",
        str(prof),
        "--validation",
        str(out / "validation.json"),
    ]
    args += ["--input-tokens", "256", "--output-tokens", "64", "--slo", "ttft:1000", "--target-rate", "50"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "capacity_plan.json").read_text())
    assert plan["margin"] == pytest.approx(max(abs(row["saturation_error"]) for row in doc["rows"]))
    assert "validated workloads" in plan["margin_source"]
    # a new profile against the same measurements: the real sweeps are read back, not rerun
    slow = tmp_path / "slow.yaml"
    slow.write_text(yaml.safe_dump(real.model_copy(update={"step_base_s": 0.004}).model_dump()))
    again = tmp_path / "again"
    args = ["validate", "--config", str(conf), "--model", "sim", "--profile", str(slow)]
    args += [
        "--set",
        str(tmp_path / "set.yaml"),
        "--measured-from",
        str(out),
        "--no-progress",
        "--out",
        str(again),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    redo = json.loads((again / "validation.json").read_text())
    for old_row, new_row in zip(doc["rows"], redo["rows"], strict=True):
        assert new_row["measured"] == old_row["measured"]
        assert new_row["predicted"]["rates"] == old_row["measured"]["rates"]
        assert new_row["ttft_p50_error"] > old_row["ttft_p50_error"]
    assert not (again / "prefill-heavy" / "measured").exists()


def test_streams_without_token_timing_take_the_ttft_at_their_first_event() -> None:
    from loadtest.client import parse_sse_event
    from loadtest.metrics import compute_run_metrics
    from loadtest.records import Chunk, RequestRecord
    from loadtest.runner import RawRun
    from loadtest.sweep import SweepPoint, SweepResult
    from loadtest.validation import untimed_streams, validation_row
    from loadtest.workload import WorkloadSpec

    # vLLM's role chunk comes with the first token; an untimed stream's text at the end
    rec = RequestRecord(index=0, scheduled=0.0, sent=0.0)
    parse_sse_event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}, 0.05, rec)
    parse_sse_event({"choices": [{"index": 0, "delta": {"content": "the whole answer"}}]}, 2.0, rec)
    rec.end, rec.status, rec.completion_tokens = 2.0, 200, 40
    assert rec.first_event == 0.05
    assert len(rec.chunks) == 1

    def timed(i: int, first: float) -> RequestRecord:
        r = RequestRecord(index=i, scheduled=0.0, sent=0.0, end=1.0, status=200, completion_tokens=3)
        r.chunks = [Chunk(t=first + 0.1 * k, content="x", tokens=1) for k in range(3)]
        r.first_event = first
        return r

    def untimed(i: int) -> RequestRecord:
        r = RequestRecord(index=i, scheduled=0.0, sent=0.0, end=2.0, status=200, completion_tokens=40)
        r.chunks = [Chunk(t=2.0, content="x", tokens=40)]
        r.first_event = 0.05
        return r

    def sweep(records: list[RequestRecord]) -> SweepResult:
        raw = RawRun(records, [], None, 0.0, 2.0, "live", 1.0)  # type: ignore[arg-type]
        m = compute_run_metrics(records, duration_s=2.0)
        return SweepResult([SweepPoint(1.0, {"valid": True}, m, raw, False, [])])

    measured = [untimed(i) for i in range(5)]
    predicted = [timed(i, 0.06) for i in range(5)]
    assert untimed_streams(measured)
    assert not untimed_streams(predicted)
    spec = WorkloadSpec.model_validate({"name": "w", "classes": [{"input_tokens": 8, "output_tokens": 4}]})
    row = validation_row(spec, sweep(measured), sweep(predicted))
    assert row["measured"]["ttft_p50_lowest_rate_s"] == pytest.approx(0.05)
    assert row["ttft_p50_error"] == pytest.approx(0.06 / 0.05 - 1)
    assert "first event" in row["ttft_note"]
    # timed streams keep the first token
    row = validation_row(spec, sweep([timed(i, 0.5) for i in range(5)]), sweep(predicted))
    assert row["measured"]["ttft_p50_lowest_rate_s"] == pytest.approx(0.5)
    assert "ttft_note" not in row


def test_predicted_capacity_finds_the_profiles_saturation(tmp_path: Path) -> None:
    from loadtest.cli import predicted_capacity
    from loadtest.config import LoadTestConfig

    # every request costs one second of prefill and nothing else: about 1 req/s
    profile = tmp_path / "p.yaml"
    profile.write_text(
        yaml.safe_dump(
            {"step_base_s": 0.001, "step_per_seq_s": 0.0, "prefill_per_token_s": 0.001}
            | {"enable_prefix_caching": False, "max_num_seqs": 64}
        )
    )
    cfg = LoadTestConfig.model_validate(
        {
            "workload": {"name": "w", "classes": [{"input_tokens": 1000, "output_tokens": 1}]},
            "metrics": {"tokenizer": "words"},
            "sweep": {"duration_s": 30, "min_requests": 20},
            "output": {"progress": False},
        }
    )
    assert predicted_capacity(cfg, str(profile)) == pytest.approx(1.0, rel=0.15)


def test_the_shipped_validation_of_a_real_engine_meets_the_targets_and_gives_its_margin() -> None:
    # docs/validation/: the table loadtest/README.md quotes, as `validate` wrote it
    folder = Path(__file__).resolve().parents[2] / "docs" / "validation" / "2026-12-04-smollm2-cpu"
    doc = json.loads((folder / "validation.json").read_text())
    again = json.loads((folder / "validation-shared-prefix-60s.json").read_text())
    rows = {r["workload"]: r for r in doc["rows"]}
    assert set(rows) == {"prefill-heavy", "decode-heavy", "mixed-length", "shared-prefix", "multi-turn"}
    for r in [*doc["rows"], *again["rows"]]:
        assert r["measured"]["valid"]
        assert r["predicted"]["valid"]
        assert abs(r["saturation_error"]) <= 0.10, r["workload"]
        assert abs(r["ttft_p50_error"]) <= 0.15, r["workload"]
    margin = margin_from_validation(doc)
    assert margin.value == pytest.approx(abs(rows["mixed-length"]["saturation_error"]))
    assert "mixed-length" in margin.source
    EngineProfile.model_validate(yaml.safe_load((folder / "smollm2-cpu.yaml").read_text()))
