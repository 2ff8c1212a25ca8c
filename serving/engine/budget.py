"""GPU memory budget of an engine layout: weights + KV room per GPU, and what that buys.

Before anything starts (``oss-serve config validate``, the Ray Serve application
builder, and ``helm install`` through the chart's template), each model whose
``topology.gpu_type`` is set is checked against one table of numbers:

* the GPU's memory as CUDA reports it, times vLLM's ``gpu_memory_utilization``;
* the model's weights as vLLM loads them: non-expert weights (attention, router,
  embeddings) split over the tensor-parallel group, expert weights split over the
  tensor-parallel group, or over the whole expert-parallel group (TP x DP) with
  ``kind: expert_parallel``;
* a fixed reserve per GPU for activations, CUDA graphs and non-torch memory;
* what is left is the KV cache pool. gpt-oss keeps a growing KV cache only in its
  full-attention layers (36 KiB per token for 120b in bf16, 24 KiB for 20b); its
  sliding-window layers hold at most ``sliding_window`` tokens per sequence.

The result is the KV room (GiB and tokens) and the maximum concurrency at
``max_model_len`` (vLLM's "Maximum concurrency for N tokens per request"). A layout
that cannot load its weights, or cannot hold one sequence of ``max_model_len``, raises
:class:`BudgetError` naming the numbers and the layouts on the same GPU that would fit.

All arithmetic is on integers (MiB, bytes, tokens) so that the Helm chart's template
(``helm/oss-serving/templates/_budget.tpl``, which reads the same table from
``helm/oss-serving/files/budget.json``, written by :func:`chart_table_json`) gets
exactly the same answers; ``tests/chart/test_budget_agreement.py`` proves it. The only
non-integer input, ``gpu_memory_utilization``, is applied in decimal and floored, as
the template's ``mulf`` does.

The figures are estimates: the engine's own log lines ("GPU KV cache size: N tokens",
"Maximum concurrency for L tokens per request") are the truth on a real GPU.

Exceptions::

    ValueError
     └── BudgetError   (model, gpu_type, reason, fits: layouts that would fit)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.config import ModelConfig, ServingConfig

__all__ = [
    "DEFAULT_GPU_MEMORY_UTILIZATION",
    "GPUS",
    "MODELS",
    "RESERVE_MIB",
    "TP_CANDIDATES",
    "BudgetError",
    "BudgetReport",
    "GpuSpec",
    "Layout",
    "ModelSpec",
    "chart_table",
    "chart_table_json",
    "check_config",
    "check_model",
    "estimate",
    "model_spec_for",
]

MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model: the memory CUDA reports (``torch.cuda.mem_get_info`` total)."""

    memory_mib: int
    description: str


@dataclass(frozen=True)
class ModelSpec:
    """What the budget needs to know about one model's architecture."""

    weights_mib: int
    """Weights as vLLM loads them on GPU (log line "Model loading took N GiB")."""
    non_expert_weights_mib: int
    """Attention, router, embeddings and unembedding (bf16): replicated per DP rank."""
    num_experts: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    full_attention_layers: int
    sliding_layers: int
    sliding_window: int
    max_context: int
    description: str


#: GPU models by the name used in ``topology.gpu_type`` (and in the chart's worker groups).
GPUS: dict[str, GpuSpec] = {
    "A100-40GB": GpuSpec(40326, "NVIDIA A100 40 GB"),
    "A100-80GB": GpuSpec(81050, "NVIDIA A100 80 GB"),
    "H100-80GB": GpuSpec(81100, "NVIDIA H100 80 GB HBM3 (79.2 GiB usable to CUDA)"),
    "H200-141GB": GpuSpec(143150, "NVIDIA H200 141 GB HBM3e (139.8 GiB usable to CUDA)"),
    "B200-192GB": GpuSpec(182700, "NVIDIA B200 192 GB HBM3e (178.4 GiB usable to CUDA)"),
    "L40S-48GB": GpuSpec(45470, "NVIDIA L40S 48 GB"),
    "L4-24GB": GpuSpec(22540, "NVIDIA L4 24 GB"),
}

#: Models by key; :func:`model_spec_for` maps a configured model to one of these.
#: gpt-oss-120b: vLLM reports "Model loading took 64.38 GiB" (H100, MXFP4 MoE); non-expert
#: parameters are about 2.2 B in bf16 (4.1 GiB). gpt-oss-20b: about 13.7 GiB loaded, 1.79 B
#: non-expert parameters (3.3 GiB). Both: 64 query heads, 8 KV heads, head_dim 64, half the
#: layers full attention, half sliding window of 128 tokens, 131,072 tokens of context.
MODELS: dict[str, ModelSpec] = {
    "gpt-oss-120b": ModelSpec(
        weights_mib=65925,
        non_expert_weights_mib=4198,
        num_experts=128,
        num_attention_heads=64,
        num_kv_heads=8,
        head_dim=64,
        full_attention_layers=18,
        sliding_layers=18,
        sliding_window=128,
        max_context=131072,
        description="gpt-oss-120b (116.8 B parameters, 5.1 B active, MXFP4 experts)",
    ),
    "gpt-oss-20b": ModelSpec(
        weights_mib=14029,
        non_expert_weights_mib=3414,
        num_experts=32,
        num_attention_heads=64,
        num_kv_heads=8,
        head_dim=64,
        full_attention_layers=12,
        sliding_layers=12,
        sliding_window=128,
        max_context=131072,
        description="gpt-oss-20b (20.9 B parameters, 3.6 B active, MXFP4 experts)",
    ),
}

#: Memory per GPU kept out of the KV pool for activations, CUDA graphs, NCCL and
#: non-torch allocations (vLLM profiles this at start; 2-4 GiB is typical).
RESERVE_MIB = 3072

#: vLLM's default ``gpu_memory_utilization``.
DEFAULT_GPU_MEMORY_UTILIZATION = "0.9"

#: Tensor-parallel sizes tried when suggesting a layout that fits.
TP_CANDIDATES = (1, 2, 4, 8)

#: ``kv_cache_dtype`` values and their bytes per element.
KV_DTYPE_BYTES: dict[str, int] = {
    "auto": 2,
    "bfloat16": 2,
    "float16": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
}


class BudgetError(ValueError):
    """A layout does not fit its GPUs. ``fits`` lists layouts on the same GPU that would."""

    def __init__(self, message: str, *, model: str, gpu_type: str, reason: str, fits: list[str]) -> None:
        super().__init__(message)
        self.model = model
        self.gpu_type = gpu_type
        self.reason = reason
        self.fits = fits


@dataclass(frozen=True)
class Layout:
    """The inputs of one estimate."""

    model: str
    """Key in :data:`MODELS`."""
    gpu_type: str
    """Key in :data:`GPUS`."""
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    expert_parallel: bool = False
    gpu_memory_utilization: str = DEFAULT_GPU_MEMORY_UTILIZATION
    """As a decimal string (exact arithmetic, as in the template)."""
    max_model_len: int | None = None
    """``None``: the model's full context."""
    kv_cache_dtype: str = "auto"


@dataclass(frozen=True)
class BudgetReport:
    """Per-GPU memory budget of one layout (an estimate; see the module docstring)."""

    layout: Layout
    gpu_mib: int
    usable_mib: int
    weights_mib: int
    reserve_mib: int
    kv_mib: int
    """KV pool per GPU; negative when the weights do not fit."""
    kv_bytes_per_token: int
    """Full-attention KV per token on one GPU."""
    sliding_bytes_per_seq: int
    """Sliding-window KV per sequence on one GPU."""
    max_model_len: int
    kv_tokens: int
    """Tokens of full-attention KV the pool holds (per engine: per DP rank)."""
    max_concurrency: int
    """Sequences of ``max_model_len`` tokens one engine (one DP rank) holds at once."""
    gpus_per_engine: int
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def group_concurrency(self) -> int:
        """Concurrency of one replica (all DP ranks of an expert-parallel group)."""
        return self.max_concurrency * self.layout.data_parallel_size

    def summary(self) -> str:
        """One line: layout, KV room, tokens and concurrency."""
        lay = self.layout
        return (
            f"{lay.model} on {lay.gpu_type} {_layout_name(lay)}: weights {_gib(self.weights_mib)} GiB/GPU, "
            f"KV room {_gib(self.kv_mib)} GiB/GPU = {self.kv_tokens} tokens, "
            f"max concurrency {self.max_concurrency} at max_model_len {self.max_model_len}"
        )

    def as_dict(self) -> dict[str, Any]:
        """The numbers the chart template computes too (for the agreement test and NOTES)."""
        return {
            "fits": self.fits,
            "weights_mib": self.weights_mib,
            "usable_mib": self.usable_mib,
            "kv_mib": self.kv_mib,
            "kv_tokens": self.kv_tokens,
            "max_concurrency": self.max_concurrency,
            "max_model_len": self.max_model_len,
        }


def _gib(mib: int) -> str:
    # Integer tenths of a GiB, floored: the template prints the same.
    tenths = (mib * 10) // 1024 if mib >= 0 else -((-mib * 10) // 1024)
    sign = "-" if tenths < 0 else ""
    tenths = abs(tenths)
    return f"{sign}{tenths // 10}.{tenths % 10}"


def _layout_name(lay: Layout) -> str:
    if lay.expert_parallel:
        return f"EP (TP{lay.tensor_parallel_size} x DP{lay.data_parallel_size})"
    return f"TP{lay.tensor_parallel_size}"


def _usable_mib(memory_mib: int, utilization: str) -> int:
    value = (Decimal(memory_mib) * Decimal(utilization)).to_integral_value(rounding=ROUND_FLOOR)
    return int(value)


def estimate(layout: Layout) -> BudgetReport:
    """The budget of ``layout``; never raises for a layout that merely does not fit."""
    try:
        gpu = GPUS[layout.gpu_type]
    except KeyError:
        raise ValueError(f"unknown gpu_type {layout.gpu_type!r}; known: {', '.join(GPUS)}") from None
    try:
        spec = MODELS[layout.model]
    except KeyError:
        raise ValueError(f"unknown model {layout.model!r}; known: {', '.join(MODELS)}") from None
    if layout.kv_cache_dtype not in KV_DTYPE_BYTES:
        raise ValueError(
            f"unknown kv_cache_dtype {layout.kv_cache_dtype!r}; known: {', '.join(KV_DTYPE_BYTES)}"
        )
    util = Decimal(layout.gpu_memory_utilization)
    if not Decimal(0) < util <= Decimal(1):
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {layout.gpu_memory_utilization}")

    tp = layout.tensor_parallel_size
    dp = layout.data_parallel_size if layout.expert_parallel else 1
    problems: list[str] = []
    if spec.num_attention_heads % tp != 0:
        problems.append(
            f"tensor_parallel_size {tp} does not divide the {spec.num_attention_heads} attention heads"
        )
    if layout.expert_parallel and tp * dp > spec.num_experts:
        problems.append(f"expert-parallel size {tp * dp} exceeds the {spec.num_experts} experts")

    expert_mib = spec.weights_mib - spec.non_expert_weights_mib
    expert_shards = tp * dp if layout.expert_parallel else tp
    weights_mib = spec.non_expert_weights_mib // tp + expert_mib // expert_shards
    usable = _usable_mib(gpu.memory_mib, layout.gpu_memory_utilization)
    kv_mib = usable - weights_mib - RESERVE_MIB

    kv_heads_per_gpu = max(1, spec.num_kv_heads // tp)
    elem = KV_DTYPE_BYTES[layout.kv_cache_dtype]
    per_layer_token = 2 * kv_heads_per_gpu * spec.head_dim * elem
    kv_bytes_per_token = spec.full_attention_layers * per_layer_token
    max_len = layout.max_model_len or spec.max_context
    sliding_bytes_per_seq = spec.sliding_layers * per_layer_token * min(max_len, spec.sliding_window)
    seq_bytes = max_len * kv_bytes_per_token + sliding_bytes_per_seq

    if kv_mib <= 0:
        kv_tokens = 0
        concurrency = 0
        problems.append(
            f"weights need {_gib(weights_mib)} GiB per GPU plus a {_gib(RESERVE_MIB)} GiB reserve, "
            f"but only {_gib(usable)} GiB of {_gib(gpu.memory_mib)} GiB are usable at "
            f"gpu_memory_utilization {layout.gpu_memory_utilization}: no room for the KV cache"
        )
    else:
        kv_bytes = kv_mib * MIB
        kv_tokens = kv_bytes // kv_bytes_per_token
        concurrency = kv_bytes // seq_bytes
        if concurrency < 1:
            longest = (kv_bytes - sliding_bytes_per_seq) // kv_bytes_per_token
            problems.append(
                f"the KV room of {_gib(kv_mib)} GiB per GPU holds {kv_tokens} tokens, "
                f"less than one sequence of max_model_len {max_len} (cap max_model_len at {longest} or below)"
            )
    return BudgetReport(
        layout=layout,
        gpu_mib=gpu.memory_mib,
        usable_mib=usable,
        weights_mib=weights_mib,
        reserve_mib=RESERVE_MIB,
        kv_mib=kv_mib,
        kv_bytes_per_token=kv_bytes_per_token,
        sliding_bytes_per_seq=sliding_bytes_per_seq,
        max_model_len=max_len,
        kv_tokens=kv_tokens,
        max_concurrency=concurrency,
        gpus_per_engine=tp * dp,
        problems=problems,
    )


def _alternatives(layout: Layout, gpus_per_node: int | None) -> list[str]:
    fits: list[str] = []
    for tp in TP_CANDIDATES:
        if gpus_per_node is not None and tp > gpus_per_node:
            continue
        candidate = Layout(
            model=layout.model,
            gpu_type=layout.gpu_type,
            tensor_parallel_size=tp,
            gpu_memory_utilization=layout.gpu_memory_utilization,
            max_model_len=layout.max_model_len,
            kv_cache_dtype=layout.kv_cache_dtype,
        )
        if candidate == layout:
            continue
        report = estimate(candidate)
        if report.fits:
            fits.append(
                f"TP{tp} ({report.kv_tokens} KV tokens, max concurrency {report.max_concurrency} "
                f"at max_model_len {report.max_model_len})"
            )
    return fits


def check(layout: Layout, gpus_per_node: int | None = None) -> BudgetReport:
    """:func:`estimate`, raising :class:`BudgetError` when the layout cannot fit."""
    report = estimate(layout)
    problems = list(report.problems)
    if gpus_per_node is not None and layout.tensor_parallel_size > gpus_per_node:
        problems.append(
            f"tensor_parallel_size {layout.tensor_parallel_size} needs more GPUs than one node has "
            f"({gpus_per_node})"
        )
    if not problems:
        return report
    fits = _alternatives(layout, gpus_per_node)
    advice = (
        "; layouts that fit: " + ", ".join(fits) if fits else "; no tensor-parallel layout on this GPU fits"
    )
    message = (
        f"{layout.model} on {layout.gpu_type} {_layout_name(layout)} does not fit: "
        + "; ".join(problems)
        + advice
    )
    raise BudgetError(message, model=layout.model, gpu_type=layout.gpu_type, reason=problems[0], fits=fits)


def model_spec_for(model: ModelConfig) -> str | None:
    """The :data:`MODELS` key of a configured model (from its name or source), or None."""
    text = f"{model.source} {model.name}".lower().replace("_", "-")
    for key in sorted(MODELS):  # the template walks the keys in this order too
        if key in text:
            return key
    return None


def layout_for(model: ModelConfig) -> Layout | None:
    """The budget layout of a configured model, or None when it cannot be checked."""
    topo = model.topology
    key = model_spec_for(model)
    if topo.gpu_type is None or key is None:
        return None
    kwargs = model.engine_kwargs
    util = kwargs.get("gpu_memory_utilization", DEFAULT_GPU_MEMORY_UTILIZATION)
    max_len = kwargs.get("max_model_len")
    return Layout(
        model=key,
        gpu_type=topo.gpu_type,
        tensor_parallel_size=topo.tensor_parallel_size,
        data_parallel_size=topo.data_parallel_size,
        expert_parallel=topo.kind == "expert_parallel",
        gpu_memory_utilization=str(util),
        max_model_len=int(max_len) if max_len is not None else None,
        kv_cache_dtype=str(kwargs.get("kv_cache_dtype", "auto")),
    )


def check_model(model: ModelConfig, gpus_per_node: int | None = None) -> BudgetReport | None:
    """Check one configured model; None when it has no ``gpu_type`` or is not a known model."""
    layout = layout_for(model)
    if layout is None:
        return None
    return check(layout, gpus_per_node)


def check_config(config: ServingConfig) -> list[BudgetReport]:
    """Check every model that can be checked; the first that cannot fit raises."""
    reports = []
    for model in config.models:
        report = check_model(model)
        if report is not None:
            reports.append(report)
    return reports


def chart_table() -> dict[str, Any]:
    """The table the chart's template reads (``helm/oss-serving/files/budget.json``)."""
    return {
        "reserveMiB": RESERVE_MIB,
        "defaultGpuMemoryUtilization": DEFAULT_GPU_MEMORY_UTILIZATION,
        "tpCandidates": list(TP_CANDIDATES),
        "kvDtypeBytes": dict(KV_DTYPE_BYTES),
        "gpus": {name: {"memoryMiB": g.memory_mib} for name, g in GPUS.items()},
        "models": {
            name: {
                "weightsMiB": m.weights_mib,
                "nonExpertWeightsMiB": m.non_expert_weights_mib,
                "numExperts": m.num_experts,
                "numAttentionHeads": m.num_attention_heads,
                "numKvHeads": m.num_kv_heads,
                "headDim": m.head_dim,
                "fullAttentionLayers": m.full_attention_layers,
                "slidingLayers": m.sliding_layers,
                "slidingWindow": m.sliding_window,
                "maxContext": m.max_context,
            }
            for name, m in MODELS.items()
        },
    }


def chart_table_json() -> str:
    """:func:`chart_table` as the exact text of ``helm/oss-serving/files/budget.json``."""
    return json.dumps(chart_table(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # pragma: no cover - `python -m serving.engine.budget > .../budget.json`
    print(chart_table_json(), end="")
