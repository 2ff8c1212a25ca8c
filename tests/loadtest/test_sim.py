"""The simulated engine's scheduler and its virtual-time driver."""

from __future__ import annotations

import pytest

from loadtest.metrics import compute_run_metrics
from loadtest.sim import BlockManager, EngineProfile, SimRequest, SimScheduler, block_hashes
from loadtest.simulate import simulate_records
from loadtest.tokenizer import WordTokenizer
from loadtest.workload import PlannedRequest


def test_block_manager_prefix_cache_and_eviction() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, caching=True)
    h = block_hashes([1, 2, 3, 4, 5], 2)
    assert len(h) == 2
    keys, hits = bm.allocate(h, 3) or ([], -1)
    assert hits == 0
    assert bm.used == 3
    bm.free(keys)
    assert bm.used == 0
    assert bm.cached_prefix(h) == 2
    again = bm.allocate(h, 3)
    assert again is not None
    assert again[1] == 2
    bm.free(again[0])
    # a request needing all 4 blocks evicts the cached ones
    other = bm.allocate(block_hashes([9] * 8, 2), 4)
    assert other is not None
    assert bm.cached_prefix(h) == 0
    assert bm.allocate([], 1) is None


def _req(rid: str, prompt: int, out: int) -> SimRequest:
    return SimRequest(rid, prompt_len=prompt, max_tokens=out)


def test_step_time_formula_and_max_num_seqs() -> None:
    p = EngineProfile(
        step_base_s=0.01,
        step_per_seq_s=0.001,
        step_per_kv_token_s=1e-5,
        prefill_per_token_s=1e-4,
        max_num_seqs=2,
    )
    s = SimScheduler(p)
    for i in range(3):
        s.add(_req(str(i), 100, 3))
    out = s.step()
    assert [r.rid for r in out.admitted] == ["0", "1"]
    assert len(s.waiting) == 1
    assert out.duration == pytest.approx(0.01 + 2 * 0.001 + 200 * 1e-5 + 200 * 1e-4)
    out = s.step()  # two decodes, context 101 each
    assert out.duration == pytest.approx(0.01 + 2 * 0.001 + 202 * 1e-5)
    assert out.prefill_tokens == 0
    out = s.step()
    assert {r.rid for r in out.finished} == {"0", "1"}
    assert s.step().admitted[0].rid == "2"


def test_preemption_when_kv_runs_out() -> None:
    p = EngineProfile(block_size=4, num_kv_blocks=4, max_num_seqs=8, enable_prefix_caching=False)
    s = SimScheduler(p)
    s.add(_req("a", 6, 10))
    s.add(_req("b", 6, 10))
    s.step()  # both admitted with 2 blocks each (7 tokens of room): the pool is full
    assert s.step().preempted == []  # context 7 -> 8 still fits
    out = s.step()  # a needs a 3rd block for token 9: b, the latest admitted, is preempted
    assert [r.rid for r in out.preempted] == ["b"]
    assert [r.rid for r in s.waiting] == ["b"]
    assert s.preemptions == 1
    while s.has_work:
        s.step()
    assert s.blocks.used == 0


def test_prefix_cache_hits_are_reported() -> None:
    p = EngineProfile(block_size=4)
    s = SimScheduler(p)
    ids = list(range(20))
    s.add(SimRequest("a", 20, 1, hashes=block_hashes(ids, 4)))
    s.step()
    s.add(SimRequest("b", 20, 1, hashes=block_hashes(ids, 4)))
    out = s.step()
    assert out.admitted[0].cached_tokens == 19  # the last token is always recomputed
    assert out.prefill_tokens == 1
    assert (s.prefix_queries, s.prefix_hits) == (40, 19)


def test_a_prefill_pays_the_attention_of_its_new_tokens_over_the_whole_context() -> None:
    # the k-th computed token attends to the cached prefix, the new tokens before it and
    # itself: a prompt's cost grows with its square, and a prefix hit still pays for its new
    # tokens reading the cached blocks
    p = EngineProfile(
        step_base_s=0, step_per_seq_s=0, prefill_per_token_s=0, prefill_attention_s=1e-6, block_size=4
    )
    s = SimScheduler(p)
    ids = list(range(40))
    s.add(SimRequest("a", 40, 1, hashes=block_hashes(ids, 4)))
    out = s.step()
    assert out.duration == pytest.approx(1e-6 * 40 * 41 / 2)
    # 36 of its tokens cached (the last full block is recomputed for the last token)
    s.add(SimRequest("b", 40, 1, hashes=block_hashes(ids, 4)))
    out = s.step()
    assert out.admitted[0].cached_tokens == 39
    assert out.duration == pytest.approx(1e-6 * 1 * (39 + 1))
    long = SimScheduler(p)
    long.add(_req("c", 80, 1))
    assert long.step().duration == pytest.approx(1e-6 * 80 * 81 / 2)  # twice the prompt, ~4x


def _planned(i: int, n_in: int, n_out: int, effort: str | None = None) -> PlannedRequest:
    body: dict[str, object] = {
        "model": "m",
        "messages": [{"role": "user", "content": " ".join(["w"] * n_in)}],
        "max_tokens": n_out,
    }
    if effort:
        body["reasoning_effort"] = effort
    return PlannedRequest(i, "/v1/chat/completions", body, {}, True, n_in, n_out)


def test_virtual_time_run_exact_at_low_load() -> None:
    p = EngineProfile(
        step_base_s=0.01, step_per_seq_s=0.0, prefill_per_token_s=0.001, reasoning_fraction={"high": 0.5}
    )
    recs = simulate_records(
        p, [_planned(0, 100, 5, "high"), _planned(1, 50, 5)], [0.0, 10.0], WordTokenizer()
    )
    m = compute_run_metrics(recs, percentiles=[50])
    first, second = m.per_request
    assert first.ttft == pytest.approx(0.11)  # one step: base + 100 prefill tokens
    assert first.ttfc == pytest.approx(0.11 + 2 * 0.01)  # round(5 * 0.5) = 2 reasoning tokens first
    assert first.tpot == pytest.approx(0.01)
    # both prompts are the same word repeated: 48 tokens (3 full blocks) come from the prefix cache
    assert recs[1].cached_tokens == 48
    assert second.ttft == pytest.approx(0.01 + 2 * 0.001)
    assert recs[0].reasoning_tokens == 2
    assert recs[0].completion_tokens == 5


def test_virtual_time_saturates_at_capacity() -> None:
    # max 4 sequences, 0.1 s per step, 10 output tokens: at most 4 requests per ~1.1 s
    p = EngineProfile(step_base_s=0.1, step_per_seq_s=0.0, prefill_per_token_s=0.0, max_num_seqs=4)
    reqs = [_planned(i, 8, 10) for i in range(200)]
    recs = simulate_records(p, reqs, [i * 0.05 for i in range(200)], WordTokenizer())
    m = compute_run_metrics(recs)
    assert m.completed == 200
    assert m.request_throughput == pytest.approx(4 / 1.0, rel=0.05)
    assert m.distributions["ttft"].max > 30  # the queue kept growing


def test_rejections_and_too_long_requests() -> None:
    p = EngineProfile(step_base_s=0.1, max_num_seqs=1, max_waiting=1, max_model_len=50)
    reqs = [_planned(0, 10, 5), _planned(1, 10, 5), _planned(2, 10, 5), _planned(3, 60, 5)]
    recs = simulate_records(p, reqs, [0.0, 0.01, 0.02, 0.03], WordTokenizer())
    assert [r.outcome for r in recs] == ["ok", "ok", "http_503", "http_400"]


@pytest.mark.parametrize("weight", [1.0, 0.25, 0.0])
def test_kv_blocks_shared_by_running_sequences_cost_their_weight(weight: float) -> None:
    # two requests over one 8-token prefix (2 blocks of 4): the second holds the first's
    # blocks too, and each of them is read once more in every step
    p = EngineProfile(
        step_base_s=0.0,
        step_per_seq_s=0.0,
        step_per_kv_token_s=1e-3,
        prefill_per_token_s=0.0,
        block_size=4,
        num_kv_blocks=64,
        shared_kv_weight=weight,
    )
    s = SimScheduler(p)
    for rid, tail in (("a", [100, 101]), ("b", [200, 201])):
        ids = [*range(8), *tail]
        s.add(SimRequest(rid, prompt_len=len(ids), max_tokens=3, hashes=block_hashes(ids, 4)))
    out = s.step()
    assert [r.rid for r in out.admitted] == ["a", "b"]
    assert s.blocks.repeated == 2
    out = s.step()  # both decode with 11 tokens each, 8 of them shared
    assert out.kv_tokens == 22
    assert out.duration == pytest.approx(1e-3 * (22 - (1 - weight) * 8))
    while s.has_work:
        s.step()
    assert s.blocks.repeated == 0
