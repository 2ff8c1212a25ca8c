"""Sweep, SLO search, capacity plan and calibration, on the virtual-time simulator."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from loadtest.calibrate import CalibrationPoint, fit_profile
from loadtest.cli import main
from loadtest.config import CalibrateConfig, LoadTestConfig, PlanConfig
from loadtest.plan import capacity_plan
from loadtest.sim import EngineProfile
from loadtest.simulate import simulate_run
from loadtest.slo import slo_search
from loadtest.stats import mean_ci, t_quantile
from loadtest.sweep import run_sweep

# 4 sequences at most, 0.1 s per step, 10 output tokens: capacity is exactly 4 requests/s
CAP4 = EngineProfile(step_base_s=0.1, step_per_seq_s=0.0, prefill_per_token_s=0.0, max_num_seqs=4)


def _cfg(**over: object) -> LoadTestConfig:
    data: dict[str, object] = {
        "workload": {"classes": [{"input_tokens": 32, "output_tokens": 10}]},
        "output": {"progress": False},
    }
    data.update(over)
    return LoadTestConfig.model_validate(data)


def test_t_quantiles_and_interval() -> None:
    assert t_quantile(0.95, 10) == pytest.approx(1.8125, abs=1e-3)
    assert t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-3)
    mean, low, high = mean_ci([1.0, 2.0, 3.0], 0.95)
    assert mean == 2.0
    assert high - mean == pytest.approx(4.3027 / math.sqrt(3), abs=1e-3)
    assert low == pytest.approx(2 * mean - high)
    assert mean_ci([5.0], 0.9) == (5.0, 5.0, 5.0)


def test_sweep_finds_knee_and_stops_early() -> None:
    cfg = _cfg(sweep={"rates": [1, 2, 3, 5, 8, 13], "duration_s": 60})
    res = run_sweep(cfg, lambda c: simulate_run(c, CAP4))
    assert [p.rate for p in res.points] == [1, 2, 3, 5, 8]  # 13 never run: 5 and 8 saturated
    assert [p.saturated for p in res.points] == [False, False, False, True, True]
    assert res.knee_rate == 3
    assert res.saturation_throughput == pytest.approx(4.0, rel=0.05)
    assert res.stop_reason == "2 consecutive saturated points"
    doc = res.to_dict(cfg)
    assert doc["knee_rate"] == 3


def test_slo_search_brackets_the_boundary() -> None:
    cfg = _cfg(
        metrics={"slos": {"ttft": 1.0}},
        slo_search={"repeats": 3, "duration_s": 60, "start_rate": 0.5, "rel_tolerance": 0.05},
        target={"replicas": 2},
    )
    res = slo_search(cfg, lambda c: simulate_run(c, CAP4))
    doc = res.to_dict(cfg)
    assert len(res.boundaries) == 3
    for b, trials in zip(res.boundaries, res.trials, strict=True):
        assert 1.0 < b < 4.0  # below the capacity, far above idle
        passed = [t.rate for t in trials if t.passed]
        failed = [t.rate for t in trials if not t.passed]
        assert b == max(passed)
        assert min(r for r in failed if r > b) / b - 1 <= 0.05
    r = doc["rate_per_replica"]
    assert r["low"] <= r["mean"] <= r["high"]
    assert r["mean"] == pytest.approx(sum(res.boundaries) / 3 / 2)


def test_slo_search_needs_slos() -> None:
    with pytest.raises(ValueError, match="SLO"):
        slo_search(_cfg(), lambda c: simulate_run(c, CAP4))


def test_capacity_plan_arithmetic(tmp_path: Path) -> None:
    serving = tmp_path / "serving.yaml"
    serving.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {
                        "name": "gpt-oss-120b",
                        "source": "openai/gpt-oss-120b",
                        "topology": {"tensor_parallel_size": 2},
                    }
                ]
            }
        )
    )
    plan = PlanConfig(
        target_rate=100,
        serving_config=serving,
        max_utilization=0.85,
        failure_tolerance=1,
        max_unavailable=1,
        max_surge=1,
        gpu_hour_price=2.5,
    )
    out = capacity_plan(plan, {"mean": 12.0, "low": 10.0, "high": 14.0}, "test", {"ttft": 2.0})
    assert out["replicas_for_load"] == 12  # ceil(100 / (10 * 0.85))
    assert out["replicas"] == 14
    assert out["gpus_per_replica"] == 2
    assert out["gpus"] == 28
    assert out["gpus_during_update"] == 30
    assert out["cost"]["per_hour"] == pytest.approx(70.0)
    assert out["replicas_at_mean_capacity"] == 12  # ceil(100 / 10.2) + 2
    assert out["utilization_after_k_failures"] == pytest.approx(100 / (13 * 10))
    with pytest.raises(ValueError, match="capacity"):
        capacity_plan(plan, {"mean": 0.0, "low": 0.0, "high": 0.0}, "x", {})


def test_calibration_recovers_a_known_profile() -> None:
    truth = EngineProfile(
        step_base_s=0.02,
        step_per_seq_s=0.002,
        prefill_per_token_s=2e-4,
        request_overhead_s=0.01,
        max_num_seqs=64,
        enable_prefix_caching=False,
    )
    cfg = _cfg(
        workload={
            "classes": [{"input_tokens": {"dist": "uniform", "min": 64, "max": 1024}, "output_tokens": 40}]
        }
    )
    points = []
    for k, rate in enumerate([0.5, 2, 5, 10]):
        c = cfg.model_copy(deep=True)
        c.load.rate, c.load.num_requests, c.load.seed = rate, 120, k
        raw = simulate_run(c, truth)
        points.append(CalibrationPoint(rate, raw.records, []))
    rep = fit_profile(points, CalibrateConfig(max_num_seqs=64))
    p = rep.profile
    assert p.step_base_s == pytest.approx(0.02, rel=0.15)
    assert p.step_per_seq_s == pytest.approx(0.002, rel=0.15)
    assert p.prefill_per_token_s == pytest.approx(2e-4, rel=0.15)
    assert rep.decode_r2 > 0.9


def test_cli_sweep_slo_plan_calibrate_on_a_profile(tmp_path: Path) -> None:
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump(CAP4.model_dump()))
    common = ["--profile", str(prof), "--input-tokens", "32", "--output-tokens", "10", "--no-progress"]
    r = CliRunner().invoke(
        main,
        ["sweep", *common, "--rates", "1,2,5,8", "--point-duration", "30", "--out", str(tmp_path / "sw")],
    )
    assert r.exit_code == 0, r.output
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert sweep["knee_rate"] == 2
    assert (tmp_path / "sw" / "rate_1" / "requests.jsonl").exists()
    assert "<img" in (tmp_path / "sw" / "report.html").read_text()
    assert len((tmp_path / "sw" / "sweep.csv").read_text().splitlines()) == 5
    r = CliRunner().invoke(
        main,
        [
            "slo",
            *common,
            "--slo",
            "ttft:1000",
            "--repeats",
            "2",
            "--trial-duration",
            "30",
            "--out",
            str(tmp_path / "slo"),
        ],
    )
    assert r.exit_code == 0, r.output
    slo = json.loads((tmp_path / "slo" / "slo.json").read_text())
    assert slo["schema"] == "oss-loadtest/slo/1"
    r = CliRunner().invoke(
        main,
        [
            "plan",
            "--from",
            str(tmp_path / "slo" / "slo.json"),
            "--target-rate",
            "20",
            "--gpus-per-replica",
            "8",
            "--out",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "capacity_plan.json").read_text())
    assert plan["gpus"] == plan["replicas"] * 8
    assert plan["replicas"] >= math.ceil(20 / slo["rate_per_replica"]["mean"]) + 1
    r = CliRunner().invoke(
        main, ["calibrate", "--from-sweep", str(tmp_path / "sw"), "--profile-out", str(tmp_path / "fit.yaml")]
    )
    assert r.exit_code == 0, r.output
    fitted = yaml.safe_load((tmp_path / "fit.yaml").read_text())
    assert fitted["step_base_s"] == pytest.approx(0.1, rel=0.2)


def test_cli_plan_from_a_profile_uses_the_serving_layout(tmp_path: Path) -> None:
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump(CAP4.model_dump()))
    serving = tmp_path / "serving.yaml"
    topo = {"kind": "expert_parallel", "tensor_parallel_size": 1, "data_parallel_size": 4}
    serving.write_text(
        yaml.safe_dump({"models": [{"name": "m", "source": "openai/gpt-oss-120b", "topology": topo}]})
    )
    args = [
        "plan",
        "--profile",
        str(prof),
        "--input-tokens",
        "32",
        "--output-tokens",
        "10",
        "--slo",
        "ttft:1000",
    ]
    args += ["--target-rate", "10", "--serving-config", str(serving), "--out", str(tmp_path)]
    args += ["--gpu-hour-price", "3"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "capacity_plan.json").read_text())
    assert plan["gpus_per_replica"] == 4
    assert "expert_parallel" in plan["layout"]
    assert plan["cost"]["per_hour"] == pytest.approx(plan["gpus"] * 3)
    assert plan["capacity_source"].startswith("simulated profile")
    no_source = CliRunner().invoke(main, ["plan", "--target-rate", "10"])
    assert no_source.exit_code == 2
    no_slo = CliRunner().invoke(main, ["plan", "--profile", str(prof), "--target-rate", "10"])
    assert no_slo.exit_code == 2


def test_served_rate_from_backlog_growth() -> None:
    from loadtest.records import RequestRecord
    from loadtest.sweep import served_rate

    # 2 requests/s for 60 s; a server that keeps up (1 s each) and one that serves 1/s FIFO
    stable = [RequestRecord(i, i * 0.5, sent=i * 0.5, end=i * 0.5 + 1.0, status=200) for i in range(120)]
    fifo = [RequestRecord(i, i * 0.5, sent=i * 0.5, end=1.0 + i * 1.0, status=200) for i in range(120)]
    assert served_rate(stable) == pytest.approx(2.0)
    assert served_rate(fifo) == pytest.approx(1.0, rel=0.05)


def test_served_rate_reads_the_noise_of_long_requests_as_noise() -> None:
    from loadtest.records import RequestRecord
    from loadtest.sweep import served_rate

    # Poisson arrivals at 0.44/s for about 70 s, 11 s each, a server that keeps up (about 5
    # in flight): the fitted growth of the in-flight count is the arrivals' noise
    flagged = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        t = np.cumsum(rng.exponential(1 / 0.44, 31))
        recs = [
            RequestRecord(i, float(s), sent=float(s), end=float(s) + 11 + rng.normal(0, 1), status=200)
            for i, s in enumerate(t)
        ]
        offered = (len(t) - 1) / (t[-1] - t[0])
        flagged += (served_rate(recs) or 0) < 0.9 * offered
    assert flagged <= 9  # 7 here; 13 with a fixed threshold of 3 requests
    # twice the capacity is still seen: 8 slots of 26 s (0.3/s) offered 0.6/s for 70 s
    t = np.arange(42) / 0.6
    free = [0.0] * 8
    fifo = []
    for i, s in enumerate(t):
        j = int(np.argmin(free))
        free[j] = max(float(s), free[j]) + 8 / 0.3
        fifo.append(RequestRecord(i, float(s), sent=float(s), end=free[j], status=200))
    assert served_rate(fifo) == pytest.approx(0.3, rel=0.25)
