"""Gateway overhead: the same workload straight to vLLM and through oss-serving, side by side.

Starts, in one run, vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``)
and the oss-serving stack (``oss-serve up``: Ray Serve gateway + the same engine through
Ray Serve LLM), both serving SmolLM2-135M-Instruct with the same engine arguments. It
then sends the same fixed workload (N streamed chat requests, fixed output length, at
each concurrency) to each in alternation, so that background load on the machine hits
both alike, and prints throughput and TTFT p50/p99 for both with their ratios.

TTFT is measured from the moment the request is handed to the HTTP client to the first
chunk that carries content. Each phase is preceded by a short warm-up that is not counted.

    python bench/gateway_overhead.py --requests 200 --concurrency 1 8
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.local_stack import free_port, percentile, progress_bar, wait_http

MODEL = "smollm2-135m-instruct"
ENGINE_KWARGS = {"max_model_len": 2048, "dtype": "bfloat16"}
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Why is the sky blue?",
    "What does a compiler do?",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "What is photosynthesis?",
    "Explain gravity in one sentence.",
]


@dataclass
class PhaseResult:
    target: str
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    output_tokens: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    serving_cpu_s: float
    """CPU seconds of the serving path in the timed part (not the engine core and its workers)."""

    @property
    def cpu_ms_per_request(self) -> float:
        return self.serving_cpu_s * 1000 / self.requests

    @property
    def req_per_s(self) -> float:
        return self.requests / self.wall_s

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.wall_s


async def one_request(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> tuple[float, int]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    if ttft is None:
        raise RuntimeError("no content chunk")
    return ttft, tokens


SERVING_PROCESSES = ("ray::ServeReplica", "ray::ProxyActor", "haproxy", "HAProxy")
"""Command-line parts of the gateway path's processes (HAProxy is a process of its own)."""


def serving_cpu_s(target: str, direct_pid: int) -> float:
    """CPU seconds used so far by ``target``'s serving path: vLLM's API server process
    (``direct``), or Ray Serve's ingress (HAProxy and its manager, or the Python proxy) and
    replicas, the engine replica holding vLLM's front end (``gateway``); never the engine
    core and its workers (``VLLM::*``)."""
    total = 0.0
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            ours = (
                proc.info["pid"] == direct_pid
                if target == "direct"
                else any(part in cmd for part in SERVING_PROCESSES)
            )
            if ours and not cmd.startswith("VLLM::"):
                times = proc.cpu_times()
                total += times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


async def run_phase(
    target: str,
    url: str,
    n: int,
    concurrency: int,
    max_tokens: int,
    progress: Progress,
    cpu: Callable[[], float],
) -> PhaseResult:
    task = progress.add_task(f"{target:>8} c={concurrency}", total=n)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    ttfts: list[float] = []
    tokens = 0
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        # warm-up, not counted
        await asyncio.gather(*(one_request(client, url, i, max_tokens) for i in range(concurrency)))

        async def worker() -> None:
            nonlocal tokens, errors
            while not queue.empty():
                i = queue.get_nowait()
                try:
                    ttft, toks = await one_request(client, url, i, max_tokens)
                    ttfts.append(ttft)
                    tokens += toks
                except (httpx.HTTPError, RuntimeError):
                    errors += 1
                progress.advance(task)

        cpu_before = cpu()
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        cpu_used = cpu() - cpu_before
    return PhaseResult(
        target=target,
        concurrency=concurrency,
        requests=n,
        errors=errors,
        wall_s=wall,
        output_tokens=tokens,
        ttft_p50_ms=percentile(ttfts, 0.5) * 1000,
        ttft_p99_ms=percentile(ttfts, 0.99) * 1000,
        serving_cpu_s=cpu_used,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, default=Path("results/gateway_overhead.json"))
    args = parser.parse_args()
    console = Console()

    from serving.config import default_config
    from serving.engine.builder import resolve_source

    cfg = default_config()
    source, _ = resolve_source(cfg.models[0], cfg.local.cache_dir)
    work = Path(tempfile.mkdtemp(prefix="oss-bench-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}

    direct_port = free_port()
    console.print(f"starting vLLM's OpenAI server on :{direct_port}")
    direct_log = open(work / "vllm.log", "wb")  # noqa: SIM115
    direct = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", source,
         "--served-model-name", MODEL, "--port", str(direct_port), "--host", "127.0.0.1",
         "--max-model-len", str(ENGINE_KWARGS["max_model_len"]), "--dtype", str(ENGINE_KWARGS["dtype"]),
         "--no-enable-log-requests"],
        stdout=direct_log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    gw_port = free_port()
    gw_config = work / "config.yaml"
    stack_cfg: dict[str, Any] = {
        "models": [
            {
                "name": MODEL,
                "source": "builtin:smollm2-135m-instruct",
                "engine_kwargs": ENGINE_KWARGS,
                "engine_env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
            }
        ],
        "gateway": {"port": gw_port},
        "auth": {"required": False},
        "local": {"state_dir": str(work / "run")},
    }
    gw_config.write_text(yaml.safe_dump(stack_cfg))
    oss = [sys.executable, "-m", "serving.cli"]
    results: list[PhaseResult] = []
    try:
        wait_http(f"http://127.0.0.1:{direct_port}/health", direct, 900)
        console.print("vLLM server ready; starting oss-serving")
        subprocess.run([*oss, "up", "--detach", "--config", str(gw_config)], check=True, env=env)
        urls = {"direct": f"http://127.0.0.1:{direct_port}", "gateway": f"http://127.0.0.1:{gw_port}"}
        with progress_bar(console) as progress:
            for c in args.concurrency:
                for target in ("direct", "gateway"):
                    results.append(
                        asyncio.run(
                            run_phase(
                                target,
                                urls[target],
                                args.requests,
                                c,
                                args.max_tokens,
                                progress,
                                functools.partial(serving_cpu_s, target, direct.pid),
                            )
                        )
                    )
    finally:
        subprocess.run([*oss, "down", "--config", str(gw_config)], env=env, check=False)
        direct.terminate()
        try:
            direct.wait(60)
        except subprocess.TimeoutExpired:
            direct.kill()

    table = Table(
        title=f"{args.requests} streamed chat requests x {args.max_tokens} output tokens, SmolLM2 on vLLM CPU"
    )
    columns = (
        "concurrency",
        "target",
        "req/s",
        "output tok/s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "serving CPU ms/req",
    )
    for col in (*columns, "errors"):
        table.add_column(col, justify="right")
    summary: list[dict[str, Any]] = []
    for c in args.concurrency:
        d = next(r for r in results if r.concurrency == c and r.target == "direct")
        g = next(r for r in results if r.concurrency == c and r.target == "gateway")
        for r in (d, g):
            cells = [
                f"{r.req_per_s:.2f}",
                f"{r.tok_per_s:.1f}",
                f"{r.ttft_p50_ms:.1f}",
                f"{r.ttft_p99_ms:.1f}",
                f"{r.cpu_ms_per_request:.1f}",
            ]
            table.add_row(str(c), r.target, *cells, str(r.errors))
        ratio = g.tok_per_s / d.tok_per_s
        added = g.ttft_p50_ms - d.ttft_p50_ms
        extra_cpu = g.cpu_ms_per_request - d.cpu_ms_per_request
        cells = [
            f"{g.req_per_s / d.req_per_s:.3f}",
            f"{ratio:.3f}",
            f"+{added:.1f}",
            f"+{g.ttft_p99_ms - d.ttft_p99_ms:.1f}",
            f"+{extra_cpu:.1f}",
        ]
        table.add_row(str(c), "[bold]gateway/direct[/bold]", *cells, "")
        summary.append(
            {
                "concurrency": c,
                "throughput_ratio": ratio,
                "added_ttft_p50_ms": added,
                "added_serving_cpu_ms_per_request": extra_cpu,
            }
        )
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"phases": [asdict(r) for r in results], "summary": summary}, indent=2))
    console.print(
        f"targets: throughput ratio >= 0.95, added TTFT p50 at concurrency 1 < 10 ms; written {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
