"""The one configuration object of ``oss-loadtest``: :class:`LoadTestConfig`.

Every command reads its slice: ``run`` reads ``target``, ``load``, ``workload``,
``metrics``, ``scrape``, ``validity`` and ``output``; ``sweep``, ``slo``, ``plan`` and
``calibrate`` read their own sections too. The object can be written as YAML and given
with ``--config``; command-line options override single fields. Unknown keys are
rejected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loadtest.metrics import SLO_METRICS
from loadtest.workload import SharedPrefix, WorkloadSpec, load_workload, simple_workload

__all__ = [
    "CalibrateConfig",
    "CalibrationDesign",
    "LoadConfig",
    "LoadTestConfig",
    "MetricsConfig",
    "OutputConfig",
    "PlanConfig",
    "ScrapeConfig",
    "SloSearchConfig",
    "SweepConfig",
    "TargetConfig",
    "ValidityConfig",
    "load_loadtest_config",
    "parse_slos",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class TargetConfig(_Strict):
    """The endpoint under test."""

    base_url: str = "http://127.0.0.1:8000"
    """Root URL of the OpenAI-compatible API (without ``/v1``)."""
    model: str = "smollm2-135m-instruct"
    """Model id sent in every request."""
    api_key: str | None = None
    """Default ``Authorization: Bearer`` key (a workload tenant's key wins)."""
    request_timeout_s: float = Field(default=600.0, gt=0)
    """A request still running after this is recorded as ``timeout``."""
    replicas: int = Field(default=1, ge=1)
    """Engine replicas behind the endpoint (rates are divided by it for per-replica figures)."""


class LoadConfig(_Strict):
    """How requests arrive."""

    arrival: Literal["poisson", "gamma", "constant", "concurrency"] = "poisson"
    """Open-loop process (``poisson``, ``gamma``, ``constant``) or a closed loop of
    ``concurrency`` clients."""
    rate: float = Field(default=1.0, gt=0)
    """Requests per second (open loop)."""
    burstiness: float = Field(default=1.0, gt=0)
    """Gamma shape (1 = Poisson, <1 burstier)."""
    concurrency: int = Field(default=1, ge=1)
    """Clients of the closed loop."""
    num_requests: int = Field(default=100, ge=1)
    """Most requests to send."""
    max_duration_s: float = Field(default=300.0, gt=0)
    """Nothing is scheduled after this many seconds."""
    drain_timeout_s: float = Field(default=120.0, gt=0)
    """After the last send, requests still running after this are cancelled."""
    seed: int = 0
    """Seed of the arrival process."""
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"
    """Event loop of the generator; ``uvloop`` (if installed) costs less CPU per request."""


class MetricsConfig(_Strict):
    """What to report."""

    percentiles: list[float] = Field(default_factory=lambda: [50.0, 90.0, 95.0, 99.0])
    """Percentiles of every latency metric."""
    slos: dict[str, float] = Field(default_factory=dict)
    """Goodput SLOs in seconds per metric (``ttft``, ``ttfc``, ``tpot``, ``itl``, ``e2e``)."""
    tokenizer: str = "words"
    """``words`` or ``hf:<model folder>``: builds prompts and counts tokens per chunk."""

    @field_validator("percentiles")
    @classmethod
    def _pct(cls, v: list[float]) -> list[float]:
        if any(not 0 <= p <= 100 for p in v):
            raise ValueError("percentiles must lie in [0, 100]")
        return sorted(set(v))

    @field_validator("slos")
    @classmethod
    def _slos(cls, v: dict[str, float]) -> dict[str, float]:
        bad = set(v) - set(SLO_METRICS)
        if bad:
            raise ValueError(f"unknown SLO metric(s) {sorted(bad)}; known: {', '.join(SLO_METRICS)}")
        return v


class ScrapeConfig(_Strict):
    """Prometheus endpoints scraped during the run."""

    urls: list[str] = Field(default_factory=list)
    """``/metrics`` URLs (the gateway's, each engine's)."""
    interval_s: float = Field(default=1.0, gt=0)
    """Time between scrapes."""
    prefixes: list[str] = Field(default_factory=lambda: ["vllm:", "oss_serving_"])
    """Keep series whose name starts with one of these (histogram buckets are dropped)."""
    queue_metrics: list[str] = Field(
        default_factory=lambda: ["vllm:num_requests_waiting", "oss_serving_queue_depth"]
    )
    """Series plotted as server-side queue depth."""


class ValidityConfig(_Strict):
    """When a run is invalid (defaults from the design document)."""

    min_rate_ratio: float = Field(default=0.95, gt=0, le=1)
    """Achieved send rate must be at least this fraction of the scheduled rate."""
    max_send_lag_p99_s: float = Field(default=0.010, gt=0)
    """p99 of actual minus scheduled send time must not exceed this."""
    max_client_cpu: float = Field(default=0.9, gt=0)
    """Client CPU (fraction of one core) above this is reported as a warning."""


class OutputConfig(_Strict):
    """Where results go."""

    dir: Path = Path("results")
    """Output folder (JSON, CSV, JSONL, HTML report)."""
    html: bool = True
    """Write the HTML report with plots."""
    progress: bool = True
    """Show progress bars."""


class SweepConfig(_Strict):
    """``oss-loadtest sweep``."""

    rates: list[float] = Field(default_factory=list)
    """Explicit rates; empty means start at ``start_rate`` and multiply by ``factor``."""
    start_rate: float = Field(default=0.5, gt=0)
    """First rate of an automatic sweep."""
    factor: float = Field(default=1.5, gt=1)
    """Rate multiplier between points of an automatic sweep."""
    max_points: int = Field(default=12, ge=1)
    """Most points."""
    duration_s: float = Field(default=30.0, gt=0)
    """Schedule length per point (requests = rate x duration, at least ``min_requests``)."""
    min_requests: int = Field(default=20, ge=1)
    """Fewest requests per point."""
    saturation_ratio: float = Field(default=0.9, gt=0, le=1)
    """A point is saturated when completed throughput < this x offered rate, or when
    rejections and errors exceed ``max_failure_rate``."""
    max_failure_rate: float = Field(default=0.05, ge=0, le=1)
    """See ``saturation_ratio``."""
    stop_after_saturated: int = Field(default=2, ge=1)
    """Stop once this many consecutive points are saturated."""


class SloSearchConfig(_Strict):
    """``oss-loadtest slo``: the highest rate meeting the SLOs."""

    percentile: float = Field(default=99.0, ge=0, le=100)
    """SLOs hold at this percentile (e.g. TTFT p99 <= 2 s)."""
    min_attainment: float = Field(default=0.0, ge=0, le=1)
    """Also require this fraction of requests to meet every SLO (0 = off)."""
    max_failure_rate: float = Field(default=0.01, ge=0, le=1)
    """A rate with more errors or rejections fails."""
    start_rate: float = Field(default=1.0, gt=0)
    """First rate tried; doubled until a rate fails."""
    max_rate: float = Field(default=10_000.0, gt=0)
    """Give up above this."""
    rel_tolerance: float = Field(default=0.05, gt=0, lt=1)
    """Bisect until the bracket is narrower than this fraction."""
    repeats: int = Field(default=3, ge=1)
    """Independent searches (different seeds) for the confidence interval."""
    confidence: float = Field(default=0.9, gt=0, lt=1)
    """Confidence level of the interval."""
    duration_s: float = Field(default=30.0, gt=0)
    """Schedule length per trial."""
    min_requests: int = Field(default=30, ge=1)
    """Fewest requests per trial."""


class PlanConfig(_Strict):
    """``oss-loadtest plan``."""

    target_rate: float = Field(default=10.0, gt=0)
    """Peak requests per second the fleet must carry within the SLOs."""
    serving_config: Path | None = None
    """oss-serving configuration YAML giving the replica layout; default: 1 GPU per replica."""
    model: str | None = None
    """Model of the serving configuration (default: its first)."""
    gpus_per_replica: int | None = Field(default=None, ge=1)
    """Override the layout's GPUs per replica."""
    max_utilization: float = Field(default=0.85, gt=0, le=1)
    """Run replicas at most at this fraction of their SLO capacity."""
    failure_tolerance: int = Field(default=1, ge=0)
    """N+k: replicas that may fail with the SLOs still met."""
    max_unavailable: int = Field(default=0, ge=0)
    """Replicas taken down at once by a rolling update (extra capacity kept for them)."""
    max_surge: int = Field(default=1, ge=0)
    """Extra replicas started during a rolling update (GPUs held only during updates)."""
    gpu_hour_price: float | None = Field(default=None, ge=0)
    """Price of one GPU-hour; gives the cost."""
    use_lower_bound: bool = True
    """Plan on the lower end of the capacity's confidence interval."""
    unvalidated_margin: float = Field(default=0.25, ge=0, lt=1)
    """Margin of a plan on a simulated profile without a validation table: a round
    default, not a measured error (``oss-loadtest validate`` gives the measured one)."""
    range_tolerance: float = Field(default=0.25, ge=0)
    """A planned workload whose mean prompt or output length lies more than this fraction
    outside the validated range is reported (or refused with ``--refuse-outside``)."""


class CalibrationDesign(_Strict):
    """The default calibration experiment: a full factorial of prompt length x output length
    x concurrency.

    Every (prompt, output) pair is one class of equal weight, run as closed loops at each
    concurrency level (one block per prompt length, see ``blocks``), so each factor varies
    independently of the other two: prompt lengths separate the prefill cost from the fixed overhead
    (first tokens at concurrency 1), output lengths the decode-step costs from the
    prefill stalls and the growth of the context over a long output, and concurrency the
    per-sequence cost from the per-step one.
    """

    input_tokens: list[int] = Field(default_factory=lambda: [64, 512, 1280], min_length=1)
    """Prompt-length levels (tokens of the user message): three, so that the prefill's
    fixed, linear and quadratic (attention) costs separate."""
    output_tokens: list[int] = Field(default_factory=lambda: [16, 128], min_length=1)
    """Output-length levels (``max_tokens``, with ``ignore_eos``)."""
    concurrency: list[int] = Field(default_factory=lambda: [1, 4, 16, 32], min_length=1)
    """Closed-loop client counts; the lowest gives the first-token (prefill) rows, the
    highest should reach the batch a saturated engine runs (``max_num_seqs``, or as many
    sequences as its KV cache holds): a fit that stopped at 16 sequences over-predicted
    the decode step of 29 (SmolLM2 on vLLM CPU, saturation throughput -28% on a
    shared-prefix workload)."""
    requests_per_client: int = Field(default=6, ge=1)
    """Requests per level = concurrency x this (at least ``requests_per_cell`` per cell)."""
    requests_per_cell: int = Field(default=4, ge=1)
    """Fewest requests per (prompt, output) cell at each level."""
    max_duration_s: float = Field(default=900.0, gt=0)
    """Longest schedule of one level."""
    api: Literal["chat", "completions"] = "chat"
    """Endpoint of the design's requests. ``completions`` for an engine whose chat stream
    does not arrive token by token (gpt-oss-tiny's random weights never open a harmony
    channel, so its chat stream comes as one chunk at the end and has no TPOT to fit)."""
    warmup_requests: int = Field(default=2, ge=0)
    """Requests per prompt-length level sent one at a time before the first level and not
    fitted: an engine's first requests of a new shape pay one-off costs (a fresh vLLM CPU
    engine took 3.4 s for its first 800-token prompt, 1.1 s for the next ones), which a
    least-squares fit would read as a large fixed overhead on every request."""

    shared_prefix: SharedPrefix | None = Field(default_factory=lambda: SharedPrefix(groups=2, tokens=512))
    """A block per concurrency level of requests behind a few shared system prompts (the
    output lengths mixed, prompts of ``shared_prefix_input_tokens`` after them): its running
    sequences hold the same cached prefix blocks, which identifies what a repeated read of a
    shared block saves (``shared_kv_weight``), and its first tokens at the lowest level are
    prefix hits, whose new tokens attend to the cached prefix (``prefill_attention_s``).
    None: no such block (``shared_kv_weight`` stays 1)."""
    shared_prefix_input_tokens: int = Field(default=64, ge=1)
    """Tokens of the user message after the shared system prompt."""

    blocks: Literal["prompt", "mixed"] = "prompt"
    """``prompt``: each concurrency level runs one closed-loop block per prompt length (its
    output lengths mixed), so that at one concurrency the batch's mean context differs
    between blocks and the per-sequence cost separates from the per-KV-token one;
    ``mixed``: one mix of every cell per level, where the batch's mean context is about the
    same at every level and the two costs are confounded (on SmolLM2 two calibrations of
    the same engine split them 0.0049 s per sequence + 4.1e-6 s per KV token and 0 +
    1.5e-5)."""

    @field_validator("input_tokens", "output_tokens", "concurrency")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(x < 1 for x in v):
            raise ValueError("design levels must be at least 1")
        return sorted(set(v))


class CalibrateConfig(_Strict):
    """``oss-loadtest calibrate``."""

    max_num_seqs: int = Field(default=256, ge=1)
    """The engine's ``max_num_seqs`` (vLLM does not export it)."""
    num_kv_blocks: int | None = Field(default=None, ge=1)
    """KV blocks; default: read from ``vllm:cache_config_info`` when scraped."""
    block_size: int = Field(default=16, ge=1)
    """KV block size in tokens (also read from the cache config when scraped)."""
    max_num_batched_tokens: int = Field(default=2048, ge=1)
    """The engine's prompt-token budget per step (vLLM's CPU default is 2048)."""
    design: CalibrationDesign = Field(default_factory=CalibrationDesign)
    """The experiment run when no workload or rates are given on the command line."""
    chat_template_tokens: int | None = Field(default=None, ge=0)
    """Tokens the chat template adds to a prompt; default: measured from the calibration's
    chat requests (a ``completions`` design has none: give it here)."""
    chat_template_system_tokens: int | None = Field(default=None, ge=0)
    """Tokens it adds to messages that open with a system message; default: measured by the
    designed calibration's probe (two short chat requests with one, not fitted). A template
    that puts a default system prompt in when there is none (SmolLM2's) adds fewer then."""
    max_relative_se: float = Field(default=0.3, gt=0)
    """A coefficient whose standard error exceeds this fraction of its value is reported
    as poorly identified."""
    min_levels: int = Field(default=2, ge=1)
    """A coefficient whose identifying regressor takes fewer distinct levels than this is
    reported as poorly identified."""


class FleetConfig(_Strict):
    """The simulated fleet of ``--profile`` runs: replicas behind a routing policy
    (``loadtest/fleet.py``). One replica: the single engine of the profile."""

    replicas: int = Field(default=1, ge=1, le=1024)
    """Simulated engine replicas, each with the profile's KV cache."""
    routing: Literal["prefix", "power_of_two", "round_robin"] = "prefix"
    """``prefix``: oss-serving's prefix affinity balanced with load; ``power_of_two``:
    Ray Serve's default router; ``round_robin``: strict rotation."""
    imbalance_threshold: int = Field(default=8, ge=0)
    """As ``routing.imbalance_threshold`` of the serving configuration."""
    min_match_blocks: int = Field(default=1, ge=1)
    """As ``routing.min_match_blocks``."""
    max_blocks: int = Field(default=256, ge=1)
    """As ``routing.max_blocks``: leading prompt blocks looked up and recorded."""
    index_capacity_blocks: int | None = Field(default=None, ge=1)
    """Blocks the index remembers per replica (``routing.replica_capacity_blocks``);
    default: the profile's KV blocks, as the serving configuration recommends."""
    index_ttl_s: float = Field(default=900.0, gt=0)
    """As ``routing.index_ttl_s``."""
    seed: int = 0
    """Seed of the random choices of ``power_of_two`` (and of ``prefix``'s fallback)."""


class LoadTestConfig(_Strict):
    """Everything ``oss-loadtest`` needs."""

    target: TargetConfig = Field(default_factory=TargetConfig)
    """The endpoint."""
    load: LoadConfig = Field(default_factory=LoadConfig)
    """Arrivals."""
    workload: WorkloadSpec = Field(default_factory=lambda: simple_workload(256, 128))
    """Request mix (inline, or a path to a workload YAML)."""
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    """What to report."""
    scrape: ScrapeConfig = Field(default_factory=ScrapeConfig)
    """Prometheus scraping."""
    validity: ValidityConfig = Field(default_factory=ValidityConfig)
    """Run validity checks."""
    output: OutputConfig = Field(default_factory=OutputConfig)
    """Results."""
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    """Rate sweep."""
    slo_search: SloSearchConfig = Field(default_factory=SloSearchConfig)
    """SLO search."""
    plan: PlanConfig = Field(default_factory=PlanConfig)
    """Capacity plan."""
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)
    """Profile fitting."""
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    """Simulated replicas and routing of ``--profile`` runs."""

    @model_validator(mode="before")
    @classmethod
    def _workload_path(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("workload"), str):
            data = {**data, "workload": load_workload(data["workload"])}
        return data


def load_loadtest_config(path: str | Path | None) -> LoadTestConfig:
    """Read a YAML file (``None``: defaults)."""
    if path is None:
        return LoadTestConfig()
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return LoadTestConfig.model_validate(data)


def parse_slos(items: tuple[str, ...] | list[str]) -> dict[str, float]:
    """``("ttft:2000", "tpot:50")`` (milliseconds) -> ``{"ttft": 2.0, "tpot": 0.05}``."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"bad SLO {item!r}: use METRIC:MILLISECONDS, metric one of {SLO_METRICS}")
        out[name] = float(value) / 1000.0
    return out
