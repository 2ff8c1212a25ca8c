"""Calibration uncertainty and the designed calibration experiment."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from loadtest.calibrate import (
    COEFFICIENTS,
    CalibrationPoint,
    FitReport,
    count_levels,
    design_configs,
    fit_profile,
    lstsq_nonneg,
    warmup_configs,
)
from loadtest.cli import main
from loadtest.config import LoadTestConfig
from loadtest.records import Chunk
from loadtest.runner import plan_run
from loadtest.sim import EngineProfile
from loadtest.simulate import simulate_run
from loadtest.tokenizer import WordTokenizer
from tests.loadtest.conftest import serve_sim

#: the true engine: every term of the step model non-zero
TRUTH = EngineProfile.model_validate(
    {"step_base_s": 0.02, "step_per_seq_s": 0.002, "step_per_kv_token_s": 2e-6, "prefill_per_token_s": 2e-4}
    | {"prefill_attention_s": 3e-7, "shared_kv_weight": 0.4}
    | {"request_overhead_s": 0.05, "max_num_seqs": 64}
)


def truth(name: str) -> float:
    """The true value of a fitted coefficient."""
    if name == "shared_kv_saving_s":  # what a repeated read of a shared block saves
        return TRUTH.step_per_kv_token_s * (1 - TRUTH.shared_kv_weight)
    return float(getattr(TRUTH, name))


def _design_fit(design: dict[str, object] | None = None, seed: int = 0, noise: bool = True) -> FitReport:
    """Fit the designed experiment run on TRUTH in virtual time; with ``noise``, each
    request's first token is shifted by N(0, 5 ms) and its TPOT by N(0, 1 ms)."""
    cfg = LoadTestConfig.model_validate(
        {
            "output": {"progress": False},
            "load": {"seed": seed},
            "calibrate": {"max_num_seqs": 64, "design": design or {}},
        }
    )
    rng = np.random.default_rng(seed)
    points = []
    for pc in design_configs(cfg):
        raw = simulate_run(pc, TRUTH)
        if noise:
            for r in raw.records:
                a, b = rng.normal(0, 0.005), rng.normal(0, 0.001)
                r.chunks = [Chunk(t=c.t + a + k * b, content=c.content) for k, c in enumerate(r.chunks)]
        points.append(CalibrationPoint(pc.load.concurrency, raw.records, []))
    return fit_profile(points, cfg.calibrate)


def test_standard_errors_cover_the_truth_of_a_linear_model() -> None:
    # the calibration's columns (two intercepts, running, KV tokens, prefill tokens), exact
    # linear data plus Gaussian noise: about 68% of estimates within 1 SE, 95% within 2
    rng = np.random.default_rng(0)
    truth = np.array([0.05, 0.02, 0.002, 2e-6, 2e-4])
    within1 = within2 = total = 0
    for _ in range(200):
        n = 120
        running = rng.integers(1, 17, n).astype(float)
        kv = running * rng.choice([100.0, 800.0], n) + rng.uniform(0, 50, n)
        prefill = rng.choice([0.0, 64.0, 768.0], n)
        first = rng.random(n) < 0.2
        x = np.column_stack([first, np.ones(n), running, kv, prefill]).astype(float)
        y = x @ truth + rng.normal(0, 0.003, n)
        fit = lstsq_nonneg(x, y)
        assert not fit.dropped
        z = np.abs(fit.coef - truth) / fit.se
        within1 += int((z <= 1).sum())
        within2 += int((z <= 2).sum())
        total += len(z)
    assert 0.6 < within1 / total < 0.76
    assert 0.92 < within2 / total < 0.98


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_of_the_design_lies_within_its_standard_errors(seed: int) -> None:
    rep = _design_fit(seed=seed)
    for name in COEFFICIENTS:
        true, est, se = truth(name), rep.coefficients[name], rep.standard_errors[name]
        assert 0 < se < 0.3 * true, name
        # 3 SE, plus the bias of rebuilding each row's batch from the other requests' noisy
        # chunk times (up to about 5% here, none on noiseless data, which
        # test_the_batch_rebuilt_per_step_recovers_a_noiseless_design checks; the standard
        # errors do not include it)
        assert abs(est - true) <= 3 * se + 0.06 * true, (name, est, true, se)
    assert rep.poorly_identified == {}
    d = rep.to_dict()
    assert set(d["coefficients"]) == set(COEFFICIENTS)
    assert d["coefficients"]["step_base_s"]["standard_error"] == pytest.approx(
        rep.standard_errors["step_base_s"]
    )
    json.dumps(d, allow_nan=False)


def test_the_batch_rebuilt_per_step_recovers_a_noiseless_design() -> None:
    # every step of a request's window weighs alike: rebuilt at midpoints spread evenly in
    # time, the steps with a prefill in them weighed more, and at concurrency 32 the fit
    # put 20% on the prefill cost and took 30% off the KV-token cost; what is left is the
    # rebuilding's own bias (the KV-token cost 5% high with prompt blocks)
    rep = _design_fit(noise=False)
    for name in COEFFICIENTS:
        # what a repeated read of a shared block saves comes out about 12% high: the rebuilt
        # batch counts a group's members from their first token, the engine from their
        # admission
        rel = 0.15 if name == "shared_kv_saving_s" else 0.06
        assert rep.coefficients[name] == pytest.approx(truth(name), rel=rel), name
    assert rep.decode_r2 > 0.995


def test_prompt_blocks_separate_the_per_sequence_and_kv_token_costs() -> None:
    # one mix per level keeps the batch's mean context about the same at every level, so
    # the per-sequence and per-KV-token costs trade off against each other; a block per
    # prompt length makes it differ between blocks of one concurrency
    blocked = _design_fit({"blocks": "prompt"}, noise=True, seed=1)
    mixed = _design_fit({"blocks": "mixed"}, noise=True, seed=1)
    se = {name: (blocked.standard_errors[name], mixed.standard_errors[name]) for name in COEFFICIENTS}
    assert se["step_per_seq_s"][0] < 0.8 * se["step_per_seq_s"][1]
    assert se["step_per_kv_token_s"][0] < 0.6 * se["step_per_kv_token_s"][1]


def test_a_single_output_length_flags_the_decode_terms() -> None:
    # noiseless, so every standard error is tiny: only the design check can catch it
    rep = _design_fit({"output_tokens": [32]}, noise=False)
    assert set(rep.poorly_identified) == {"step_per_seq_s", "step_per_kv_token_s"}
    for name in ("step_per_seq_s", "step_per_kv_token_s"):
        assert any("output lengths take 1" in why for why in rep.poorly_identified[name])
        assert any(name in note and "poorly identified" in note for note in rep.notes)


def test_two_prompt_lengths_flag_the_attention_term() -> None:
    # a fixed, a linear and a quadratic cost of the prompt take three of its lengths
    rep = _design_fit({"input_tokens": [64, 768], "shared_prefix": None}, noise=False)
    assert "prefill_attention_s" in rep.poorly_identified
    assert any(
        "prompt lengths at the lowest load take 2" in why
        for why in rep.poorly_identified["prefill_attention_s"]
    )
    assert "prefill_per_token_s" not in rep.poorly_identified


def test_one_cell_is_not_separable_and_dropped_terms_are_flagged() -> None:
    rep = _design_fit(
        {"input_tokens": [512], "output_tokens": [96], "concurrency": [4], "shared_prefix": None}, noise=False
    )
    assert {"prefill_per_token_s", "step_per_kv_token_s", "step_per_seq_s"} <= set(rep.poorly_identified)
    # a negative column is dropped and reported
    x = np.column_stack([np.ones(50), np.arange(50.0)])
    fit = lstsq_nonneg(x, 5.0 - 0.1 * np.arange(50.0))
    assert fit.dropped == [1]
    assert np.isnan(fit.se[1])


def test_count_levels() -> None:
    assert count_levels([512, 515, 513]) == 1
    assert count_levels([64, 768, 64, 770]) == 2
    assert count_levels([1.0, 1.05, 3.9, 4.0, 15.8]) == 3
    assert count_levels([]) == 0


def test_default_design_crosses_each_factor_independently() -> None:
    cfg = LoadTestConfig()
    d = cfg.calibrate.design
    assert len(d.input_tokens) >= 2
    assert len(d.output_tokens) >= 2
    assert len(d.concurrency) >= 2
    assert d.shared_prefix is not None
    seen, shared = set(), set()
    for pc in design_configs(cfg):
        assert pc.load.arrival == "concurrency"
        reqs, _ = plan_run(pc, WordTokenizer())
        for r in reqs:
            if "prefix_group" in r.tags:  # the shared-prefix block, one per level
                assert r.input_tokens == d.shared_prefix.tokens + d.shared_prefix_input_tokens
                shared.add((r.output_tokens, pc.load.concurrency, r.tags["prefix_group"]))
            else:
                seen.add((r.input_tokens, r.output_tokens, pc.load.concurrency))
    assert seen == set(itertools.product(d.input_tokens, d.output_tokens, d.concurrency))
    # one set of system prompts for every output length
    groups = {f"design.{g}" for g in range(d.shared_prefix.groups)}
    assert shared == set(itertools.product(d.output_tokens, d.concurrency, groups))


def test_cli_calibrate_runs_the_design_and_reports_standard_errors(tmp_path: Path) -> None:
    # the template adds 20 tokens, 7 when the messages open with a system message
    real = EngineProfile(
        step_base_s=0.01, step_per_seq_s=0.001, prefill_per_token_s=1e-4, max_num_seqs=8
    ).model_copy(update={"chat_template_tokens": 20, "chat_template_system_tokens": 7})
    conf = tmp_path / "c.yaml"
    design = {
        "input_tokens": [8, 64],
        "output_tokens": [4, 12],
        "concurrency": [1, 3],
        "requests_per_cell": 2,
    }
    conf.write_text(
        yaml.safe_dump(
            {"calibrate": {"design": design}, "validity": {"max_send_lag_p99_s": 5.0, "min_rate_ratio": 0.5}}
        )
    )
    with serve_sim(real) as url:
        args = ["calibrate", "--config", str(conf), "--base-url", url, "--model", "sim", "--no-progress"]
        args += [
            "--max-num-seqs",
            "8",
            "--out",
            str(tmp_path / "cal"),
            "--profile-out",
            str(tmp_path / "p.yaml"),
        ]
        r = CliRunner().invoke(main, args)
        served = httpx.get(f"{url}/metrics").text
    assert r.exit_code == 0, r.output
    assert "calibration design" in r.output
    # the warm-up (2 requests per prompt length, the default) reached the engine but no fit
    assert r.output.count("warm-up (not fitted): 2/2") == 2
    fitted = sum(
        len((tmp_path / "cal" / f"conc_{c}{i}" / "requests.jsonl").read_text().splitlines())
        for c in (1, 3)
        for i in ("_in8", "_in64", "_shared")
    )
    assert fitted == 8 + 18 + 4 + 9  # prompt blocks, then the shared-prefix block
    total = sum(
        float(line.split()[-1])
        for line in served.splitlines()
        if line.startswith("vllm:request_success_total")
    )
    assert total == fitted + 4 + 2  # the warm-up and the template probe reached the engine
    fitted_profile = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert fitted_profile["chat_template_tokens"] == 20
    assert fitted_profile["chat_template_system_tokens"] == 7
    assert "chat template with a system message (probe, not fitted): 7 tokens" in r.output
    assert "standard error" in r.output
    assert (tmp_path / "cal" / "conc_1_in8" / "requests.jsonl").exists()
    assert (tmp_path / "cal" / "conc_3_in64" / "requests.jsonl").exists()
    fit = json.loads((tmp_path / "p.fit.json").read_text())
    assert set(fit["coefficients"]) == set(COEFFICIENTS)
    assert "standard_error" in fit["coefficients"]["step_base_s"]
    assert yaml.safe_load((tmp_path / "p.yaml").read_text())["max_num_seqs"] == 8
    # the saved design folder fits again to the same coefficients (levels read back)
    again = ["calibrate", "--from-sweep", str(tmp_path / "cal"), "--max-num-seqs", "8"]
    r = CliRunner().invoke(main, [*again, "--profile-out", str(tmp_path / "q.yaml")])
    assert r.exit_code == 0, r.output
    refit = json.loads((tmp_path / "q.fit.json").read_text())
    for name in COEFFICIENTS:
        assert refit["coefficients"][name]["value"] == pytest.approx(fit["coefficients"][name]["value"])


def test_a_completions_design_and_a_given_chat_template() -> None:
    cfg = LoadTestConfig.model_validate(
        {
            "output": {"progress": False},
            "calibrate": {"max_num_seqs": 64, "design": {"api": "completions"}, "chat_template_tokens": 67},
        }
    )
    for pc in [*warmup_configs(cfg), *design_configs(cfg)]:
        assert {c.api for c in pc.workload.classes} == {"completions"}
        reqs, _ = plan_run(pc, WordTokenizer())
        assert all(r.path.endswith("/v1/completions") for r in reqs)
    points = [
        CalibrationPoint(pc.load.concurrency, simulate_run(pc, TRUTH).records, [])
        for pc in design_configs(cfg)
    ]
    rep = fit_profile(points, cfg.calibrate)
    assert rep.profile.chat_template_tokens == 67  # completions prompts carry no template of their own
    assert rep.coefficients["prefill_per_token_s"] == pytest.approx(TRUTH.prefill_per_token_s, rel=0.05)


def test_a_design_through_a_fleet_rebuilds_each_batch_from_its_own_replica() -> None:
    # two replicas behind Ray's default router: each record names its replica (as the
    # gateway's x-oss-serving-replica header does), and each request's batch is rebuilt
    # from its own replica's requests; read as one engine, the batches are twice as big
    cfg = LoadTestConfig.model_validate(
        {
            "output": {"progress": False},
            "calibrate": {"max_num_seqs": 64},
            "fleet": {"replicas": 2, "routing": "power_of_two"},
        }
    )
    points = [
        CalibrationPoint(pc.load.concurrency, simulate_run(pc, TRUTH).records, [])
        for pc in design_configs(cfg)
    ]
    assert {r.extra["replica"] for p in points for r in p.records} == {"r0", "r1"}
    rep = fit_profile(points, cfg.calibrate)
    for name in ("step_base_s", "step_per_seq_s", "step_per_kv_token_s", "prefill_per_token_s"):
        assert rep.coefficients[name] == pytest.approx(truth(name), rel=0.1), name
    for p in points:
        for r in p.records:
            r.extra.clear()
    as_one = fit_profile(points, cfg.calibrate)
    assert as_one.coefficients["step_per_seq_s"] < 0.75 * TRUTH.step_per_seq_s


def test_the_warm_up_repeats_no_prompt_of_the_design() -> None:
    # the warm-up and the first level share a seed; prompts drawn from one random stream
    # would open alike, and the engine would serve the design's first long prompts from the
    # warm-up's cached blocks (two 800-token first tokens in 0.15 s, read as uncached)
    cfg = LoadTestConfig.model_validate({"output": {"progress": False}, "calibrate": {"max_num_seqs": 64}})
    tok = WordTokenizer()

    def openings(c: LoadTestConfig) -> set[str]:
        reqs, _ = plan_run(c, tok)
        return {" ".join(r.body["messages"][-1]["content"].split()[:20]) for r in reqs}

    warm = set().union(*(openings(c) for c in warmup_configs(cfg)))
    design = set().union(*(openings(c) for c in design_configs(cfg)))
    assert warm
    assert not warm & design
