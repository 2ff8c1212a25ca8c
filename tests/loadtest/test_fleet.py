"""The simulated fleet: replicas behind the routing policies we ship (loadtest/fleet.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from loadtest.cli import main
from loadtest.config import FleetConfig, LoadTestConfig
from loadtest.fleet import AffinityIndex
from loadtest.sim import EngineProfile
from loadtest.simulate import compare_routing, simulate_run

#: One replica's KV cache (4,000 tokens) holds about three of the six shared prefixes of
#: 1,024 tokens next to the running requests: enough for the half a prefix router sends it,
#: not for all six: the regime where routing decides the hit rate.
SMALL_KV = EngineProfile(
    step_base_s=0.01,
    step_per_seq_s=5e-4,
    prefill_per_token_s=3e-4,
    block_size=16,
    num_kv_blocks=250,
    max_num_seqs=16,
    max_num_batched_tokens=2048,
)


def _cfg(**over: object) -> LoadTestConfig:
    data: dict[str, object] = {
        "workload": {
            "name": "shared",
            "classes": [
                {"shared_prefix": {"groups": 6, "tokens": 1024}, "input_tokens": 32, "output_tokens": 8}
            ],
        },
        "load": {"rate": 1.5, "num_requests": 240, "max_duration_s": 600, "seed": 3},
        "output": {"progress": False},
    }
    data.update(over)
    return LoadTestConfig.model_validate(data)


def test_the_index_matches_the_longest_leading_run_per_replica() -> None:
    idx = AffinityIndex(capacity_blocks=100, ttl_s=60)
    idx.record("r0", ["a", "b", "c"], now=0)
    idx.record("r1", ["a", "x"], now=0)
    assert idx.lookup(["a", "b", "c", "d"], now=1) == {"r0": 3, "r1": 1}
    assert idx.lookup(["a", "x"], now=1) == {"r0": 1, "r1": 2}
    # a hole in the chain ends the match: r0 was never sent "b" after "z"
    assert idx.lookup(["z", "b"], now=1) == {}
    # entries older than the TTL count as gone
    assert idx.lookup(["a"], now=61) == {}


def test_the_index_forgets_a_replicas_least_recently_used_blocks() -> None:
    idx = AffinityIndex(capacity_blocks=3, ttl_s=1e9)
    idx.record("r0", ["a", "b"], now=0)
    idx.record("r0", ["c", "d"], now=1)  # 4 blocks: "a" is dropped
    assert idx.lookup(["a"], now=2) == {}
    assert idx.lookup(["b"], now=2) == {"r0": 1}
    idx.record("r0", ["b"], now=3)  # used again: "c" is now the oldest
    assert idx.record("r0", ["e"], now=4) == 1
    assert idx.lookup(["c"], now=5) == {}
    assert idx.lookup(["b"], now=5) == {"r0": 1}


def test_round_robin_alternates_and_two_replicas_carry_twice_the_load() -> None:
    heavy = _cfg(
        workload={"classes": [{"input_tokens": 64, "output_tokens": 64}]},
        load={"rate": 40.0, "num_requests": 400, "seed": 1},
    )
    one = simulate_run(heavy, SMALL_KV)
    heavy.fleet = FleetConfig(replicas=2, routing="round_robin")
    two = simulate_run(heavy, SMALL_KV)
    assert [r.extra["replica"] for r in two.records[:6]] == ["r0", "r1"] * 3
    assert two.meta["fleet"]["routed"] == {"r0": 200, "r1": 200}  # type: ignore[index]

    def span(raw: object) -> float:
        recs = raw.records  # type: ignore[attr-defined]
        return float(max(r.end for r in recs) - min(r.scheduled for r in recs))

    # saturated: one replica needs about twice as long to finish the same requests
    assert span(one) / span(two) == pytest.approx(2.0, rel=0.2)


def test_power_of_two_balances_ongoing_requests() -> None:
    cfg = _cfg(fleet={"replicas": 4, "routing": "power_of_two", "seed": 5})
    routed = simulate_run(cfg, SMALL_KV).meta["fleet"]["routed"]  # type: ignore[index]
    assert sum(routed.values()) == 240
    assert max(routed.values()) - min(routed.values()) < 40


def test_prefix_routing_keeps_the_hit_rate_of_one_big_cache_and_cuts_ttft() -> None:
    rows = {r["policy"]: r for r in compare_routing(_cfg(), SMALL_KV, 2)}
    ref, rr, p2, ours = (
        rows["single replica (KV of all)"],
        rows["round_robin"],
        rows["power_of_two"],
        rows["prefix"],
    )
    assert ours["hit_rate"] >= 0.9 * ref["hit_rate"]
    assert ours["hit_rate"] > rr["hit_rate"] + 0.15
    assert ours["hit_rate"] > p2["hit_rate"] + 0.15
    # the mean, not the p50: with about half of round robin's requests missing, its p50
    # falls on a hit or a miss by the draw of the prompts
    assert ours["ttft_mean_s"] < 0.7 * rr["ttft_mean_s"]
    assert ours["reasons"]["affinity"] > ours["reasons"].get("fallback", 0)
    assert all(r["completed"] == 240 for r in rows.values())


def test_load_wins_over_affinity_past_the_imbalance_threshold() -> None:
    # one prefix for everyone: affinity alone would send all of it to one replica
    one_prefix = {
        "classes": [{"shared_prefix": {"groups": 1, "tokens": 256}, "input_tokens": 32, "output_tokens": 32}]
    }
    strict = _cfg(workload=one_prefix, load={"rate": 30.0, "num_requests": 300, "seed": 2})
    strict.fleet = FleetConfig(replicas=2, routing="prefix", imbalance_threshold=1000)
    lopsided = simulate_run(strict, SMALL_KV).meta["fleet"]
    strict.fleet = FleetConfig(replicas=2, routing="prefix", imbalance_threshold=2)
    balanced = simulate_run(strict, SMALL_KV).meta["fleet"]
    assert sorted(lopsided["routed"].values()) == [0, 300]  # type: ignore[index]
    assert min(balanced["routed"].values()) > 60  # type: ignore[index]
    assert balanced["reasons"]["load"] > 0  # type: ignore[index]


def test_routing_command_and_plan_compare_policies(tmp_path: Path) -> None:
    prof = tmp_path / "p.yaml"
    prof.write_text(json.dumps(SMALL_KV.model_dump()))
    wl = tmp_path / "w.yaml"
    wl.write_text(json.dumps(_cfg().workload.model_dump(mode="json")))
    out = tmp_path / "rows.json"
    args = ["routing", "--profile", str(prof), "--sim-replicas", "2", "--workload", str(wl)]
    args += ["--rate", "1.5", "--num-requests", "120", "--no-progress", "--out-json", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())
    assert [x["policy"] for x in rows] == [
        "single replica (KV of all)",
        "round_robin",
        "power_of_two",
        "prefix",
    ]
    assert "prefix routing: hit rate" in r.output
    args = ["plan", "--profile", str(prof), "--workload", str(wl), "--slo", "ttft:3000"]
    args += ["--target-rate", "3", "--compare-routing", "--no-progress", "--out", str(tmp_path / "plan")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "plan" / "capacity_plan.json").read_text())
    assert {x["policy"] for x in plan["routing"]} >= {"round_robin", "prefix"}
    assert "the planned fleet" in r.output


def test_a_sweep_whose_streams_have_no_tpot_still_gets_its_report(tmp_path: Path) -> None:
    # one output token: no TPOT anywhere (as a stream that arrives in one chunk); the
    # report's log-scaled plots must not fail the sweep
    prof = tmp_path / "p.yaml"
    prof.write_text(json.dumps(SMALL_KV.model_dump()))
    args = ["sweep", "--profile", str(prof), "--input-tokens", "16", "--output-tokens", "1"]
    args += ["--rates", "1,2", "--no-progress", "--out", str(tmp_path / "s")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s" / "report.html").stat().st_size > 1000
