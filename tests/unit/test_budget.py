"""The GPU memory budget (serving/engine/budget.py) against published gpt-oss figures."""

from __future__ import annotations

import pytest

from serving.config import ModelConfig, ServingConfig
from serving.engine.budget import (
    GPUS,
    BudgetError,
    Layout,
    check,
    check_config,
    check_model,
    estimate,
    layout_for,
    model_spec_for,
)

KIB = 1024


def test_kv_per_token_matches_the_architecture() -> None:
    # 18 full-attention layers x K,V x 8 heads x 64 dims x 2 bytes = 36 KiB (120b); 12 layers: 24 KiB (20b).
    assert estimate(Layout("gpt-oss-120b", "H200-141GB", 1)).kv_bytes_per_token == 36 * KIB
    assert estimate(Layout("gpt-oss-20b", "H200-141GB", 1)).kv_bytes_per_token == 24 * KIB
    # TP2 halves the KV heads per GPU; fp8 halves the bytes.
    assert estimate(Layout("gpt-oss-120b", "H200-141GB", 2)).kv_bytes_per_token == 18 * KIB
    assert (
        estimate(Layout("gpt-oss-120b", "B200-192GB", 1, kv_cache_dtype="fp8")).kv_bytes_per_token == 18 * KIB
    )
    # Beyond 8-way TP the 8 KV heads are replicated, not split further.
    assert estimate(Layout("gpt-oss-120b", "H100-80GB", 16)).kv_bytes_per_token == 18 * 2 * 64 * 2


@pytest.mark.parametrize(
    ("layout", "low", "high"),
    [
        # Published orientation (FACTS.md 6): one H100 at TP1 holds about 90k-145k tokens,
        # TP2 on H100 about 2 M, one H200 about 1.6 M, gpt-oss-20b on one H100 about 2.3 M.
        (Layout("gpt-oss-120b", "H100-80GB", 1, max_model_len=2048), 90_000, 145_000),
        (Layout("gpt-oss-120b", "H100-80GB", 2, max_model_len=2048), 1_800_000, 2_300_000),
        (Layout("gpt-oss-120b", "H200-141GB", 1, max_model_len=2048), 1_500_000, 1_800_000),
        (Layout("gpt-oss-20b", "H100-80GB", 1, max_model_len=2048), 2_100_000, 2_500_000),
    ],
    ids=["120b-h100-tp1", "120b-h100-tp2", "120b-h200-tp1", "20b-h100-tp1"],
)
def test_kv_tokens_agree_with_published_figures(layout: Layout, low: int, high: int) -> None:
    assert low <= estimate(layout).kv_tokens <= high


def test_h100_tp1_concurrency_for_1k_in_1k_out() -> None:
    # About 40-65 concurrent 1k/1k requests (2.2k tokens each) fit one H100 at TP1.
    report = estimate(Layout("gpt-oss-120b", "H100-80GB", 1, max_model_len=2200))
    assert 40 <= report.max_concurrency <= 65


def test_full_context_on_one_h100_does_not_fit_and_says_what_would() -> None:
    with pytest.raises(BudgetError) as caught:
        check(Layout("gpt-oss-120b", "H100-80GB", 1), gpus_per_node=8)
    err = caught.value
    assert "less than one sequence of max_model_len 131072" in str(err)
    assert "cap max_model_len at" in str(err)
    assert err.fits[0].startswith("TP2 (")
    assert err.model == "gpt-oss-120b"
    assert err.gpu_type == "H100-80GB"


def test_120b_on_a_40gb_gpu() -> None:
    with pytest.raises(BudgetError, match=r"weights need 64\.3 GiB per GPU") as caught:
        check(Layout("gpt-oss-120b", "A100-40GB", 1, max_model_len=32768))
    assert [f.split(" ")[0] for f in caught.value.fits] == ["TP4", "TP8"]


def test_tensor_parallel_must_fit_a_node_and_divide_the_heads() -> None:
    with pytest.raises(BudgetError, match="needs more GPUs than one node has"):
        check(Layout("gpt-oss-120b", "H100-80GB", 4, max_model_len=32768), gpus_per_node=2)
    with pytest.raises(BudgetError, match="does not divide the 64 attention heads"):
        check(Layout("gpt-oss-120b", "H100-80GB", 3, max_model_len=32768))


def test_expert_parallel_spreads_experts_over_the_whole_group() -> None:
    tp1 = estimate(Layout("gpt-oss-120b", "H100-80GB", 1, max_model_len=32768))
    ep16 = estimate(Layout("gpt-oss-120b", "H100-80GB", 1, data_parallel_size=16, expert_parallel=True))
    assert ep16.weights_mib < tp1.weights_mib / 8
    assert ep16.gpus_per_engine == 16
    assert ep16.group_concurrency == ep16.max_concurrency * 16
    with pytest.raises(BudgetError, match="exceeds the 128 experts"):
        check(Layout("gpt-oss-120b", "H100-80GB", 2, data_parallel_size=128, expert_parallel=True))


def test_unknown_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown gpu_type 'H300'"):
        estimate(Layout("gpt-oss-120b", "H300", 1))
    with pytest.raises(ValueError, match="unknown kv_cache_dtype"):
        estimate(Layout("gpt-oss-120b", "H100-80GB", 1, kv_cache_dtype="int3"))
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        estimate(Layout("gpt-oss-120b", "H100-80GB", 1, gpu_memory_utilization="1.5"))


def _model(**topology: object) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "name": "gpt-oss-120b",
            "source": "/models/openai--gpt-oss-120b",
            "engine_kwargs": {
                "max_model_len": 32768,
                "gpu_memory_utilization": 0.95,
                "kv_cache_dtype": "fp8",
            },
            "topology": {"accelerator": "gpu", **topology},
        }
    )


def test_configured_model_maps_to_a_layout() -> None:
    layout = layout_for(_model(gpu_type="H100-80GB", tensor_parallel_size=2))
    assert layout == Layout(
        "gpt-oss-120b",
        "H100-80GB",
        2,
        1,
        False,
        gpu_memory_utilization="0.95",
        max_model_len=32768,
        kv_cache_dtype="fp8",
    )
    assert layout_for(_model()) is None  # no gpu_type: not checked


def test_model_detection() -> None:
    assert model_spec_for(_model()) == "gpt-oss-120b"
    small = ModelConfig(name="chat", source="openai/gpt-oss-20b")
    assert model_spec_for(small) == "gpt-oss-20b"
    assert model_spec_for(ModelConfig(name="smol", source="builtin:smollm2-135m-instruct")) is None


def test_check_config_raises_for_the_model_that_cannot_fit() -> None:
    fits = _model(gpu_type="H100-80GB", tensor_parallel_size=2).model_dump()
    too_big = {**_model(gpu_type="A100-40GB").model_dump(), "name": "big-120b-on-a100"}
    config = ServingConfig.model_validate({"models": [fits]})
    (report,) = check_config(config)
    assert report.fits
    assert "gpt-oss-120b on H100-80GB TP2" in report.summary()
    with pytest.raises(BudgetError, match="A100-40GB TP1 does not fit"):
        check_config(ServingConfig.model_validate({"models": [fits, too_big]}))
    assert check_model(ModelConfig(name="smol", source="builtin:smollm2-135m-instruct")) is None


def test_gpu_table_is_plausible() -> None:
    for name, gpu in GPUS.items():
        nominal_gb = int(name.split("-")[1].removesuffix("GB"))
        # CUDA reports a little less than the nominal size, read as GB (10^9) or GiB (2^30).
        assert 0.85 * nominal_gb * 10**9 <= gpu.memory_mib * 2**20 <= nominal_gb * 2**30, name
