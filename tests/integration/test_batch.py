"""The Batch API end to end: the real stack (vLLM), and real gateway processes killed.

1. On the shared stack (SmolLM2 on vLLM, auth off): a batch of 300 chat lines through the
   OpenAI SDK completes, every ``custom_id`` exactly once with status 200. Ten streamed
   interactive requests measure time to first token before the batch and while it runs
   (the ratio is printed); what is asserted is what must hold on any machine: the
   interactive requests were never queued behind batch lines (their admission wait, from
   the gateway's own histogram, stays far below the batch's duration).
2. Durability: two real gateway processes (the composition root and the FastAPI app
   under uvicorn, over fake engines that take a moment per answer) on one private Redis
   with its append-only file; a batch of 300 lines; one gateway is SIGKILLed mid-batch,
   then Redis is restarted (SIGKILL, and up again from its AOF); the batch completes
   through the surviving gateway with every ``custom_id`` answered exactly once.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import SMOLLM, LiveStack
from tests.integration.gateway_process import ANSWER_DELAY_ENV
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"


def _jsonl(model: str, count: int, max_tokens: Any = None) -> bytes:
    lines = []
    for i in range(count):
        body: dict[str, Any] = {
            "model": model,
            "temperature": 0,
            "messages": [{"role": "user", "content": f"Say the number {i}."}],
        }
        if max_tokens is not None:
            body["max_tokens"] = max_tokens(i)
        lines.append(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": CHAT, "body": body}))
    return ("\n".join(lines) + "\n").encode()


def _wait(client: openai.OpenAI, batch_id: str, timeout_s: float, *, until: str = "completed") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            batch = client.batches.retrieve(batch_id)
        except (openai.InternalServerError, openai.APIConnectionError):
            batch = None  # Redis restarting: 503 for a moment
        if batch is not None and batch.status == until:
            return batch
        assert batch is None or batch.status in ("validating", "in_progress", "finalizing"), batch
        assert time.monotonic() < deadline, f"batch {batch_id} not {until} within {timeout_s} s: {batch}"
        time.sleep(0.2)


def _answered_once(client: openai.OpenAI, batch: Any, count: int) -> list[dict[str, Any]]:
    assert batch.error_file_id is None
    text = client.files.content(batch.output_file_id).read().decode()
    output = [json.loads(line) for line in text.splitlines() if line]
    ids = collections.Counter(x["custom_id"] for x in output)
    assert ids == {f"line-{i}": 1 for i in range(count)}
    assert {x["response"]["status_code"] for x in output} == {200}
    return output


def _ttft(client: openai.OpenAI, i: int) -> float:
    started = time.perf_counter()
    stream = client.chat.completions.create(
        model=SMOLLM,
        temperature=0,
        max_tokens=8,
        stream=True,
        messages=[{"role": "user", "content": f"Name a colour ({i})."}],
    )
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    assert first is not None
    return first


def _queue_wait(metrics_text: str, priority: str) -> tuple[float, float]:
    """(sum, count) of ``oss_serving_queue_wait_seconds`` for ``priority`` (all models)."""
    total = count = 0.0
    pattern = r"^(oss_serving_queue_wait_seconds_(?:sum|count))\{([^}]*)\} (\S+)$"
    for name, labels, value in re.findall(pattern, metrics_text, flags=re.M):
        if f'priority="{priority}"' in labels:
            if name.endswith("_sum"):
                total += float(value)
            else:
                count += float(value)
    return total, count


def test_a_batch_on_vllm_completes_once_and_interactive_requests_are_not_queued_behind_it(
    live_stack: LiveStack,
) -> None:
    client = openai.OpenAI(base_url=live_stack.api, api_key="local", max_retries=0, timeout=120)
    before = [_ttft(client, i) for i in range(10)]
    upload = client.files.create(
        file=("batch.jsonl", _jsonl(SMOLLM, 300, max_tokens=lambda i: 2 + i % 3)), purpose="batch"
    )
    assert upload.bytes > 0
    metrics_before = httpx.get(live_stack.base_url + "/metrics", timeout=10).text
    started = time.monotonic()
    batch = client.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")
    during = [_ttft(client, i) for i in range(10)]
    overlapped = client.batches.retrieve(batch.id).status == "in_progress"
    metrics_during = httpx.get(live_stack.base_url + "/metrics", timeout=10).text
    done = _wait(client, batch.id, 300)
    took = time.monotonic() - started
    output = _answered_once(client, done, 300)
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (300, 0)
    assert all(x["response"]["body"]["usage"]["completion_tokens"] <= 4 for x in output)
    p50 = sorted(before)[5], sorted(during)[5]
    print(
        f"batch of 300 lines: {took:.1f} s ({300 / took:.1f} lines/s); interactive TTFT p50 "
        f"{p50[0] * 1000:.0f} ms before, {p50[1] * 1000:.0f} ms during the batch "
        f"(ratio {p50[1] / p50[0]:.2f}; max during {max(during) * 1000:.0f} ms); overlapped: {overlapped}"
    )
    assert overlapped, "the batch ended before the interactive requests: nothing was measured"
    # The ten interactive requests' admission wait (standard priority) during the batch:
    total_before, count_before = _queue_wait(metrics_before, "standard")
    total_during, count_during = _queue_wait(metrics_during, "standard")
    assert count_during - count_before >= 10
    mean_wait = (total_during - total_before) / (count_during - count_before)
    print(f"interactive admission wait during the batch: mean {mean_wait * 1000:.0f} ms")
    assert mean_wait < max(0.5, took / 20)  # never behind the batch's lines
    batch_waits = _queue_wait(metrics_during, "batch")
    assert batch_waits[1] > 0  # the batch's lines went through admission at priority batch


# ------------------------------------------------------------------ durability
@contextlib.contextmanager
def _gateway(config: dict[str, Any], answer_delay_s: float) -> Iterator[tuple[subprocess.Popen[str], str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO), ANSWER_DELAY_ENV: str(answer_delay_s)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.gateway_process", json.dumps(config)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        while line and not line.startswith("listening "):  # vLLM's import logs to stdout first
            line = proc.stdout.readline()
        assert line.startswith("listening "), line
        yield proc, f"http://127.0.0.1:{int(line.split()[1])}/v1"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def test_a_gateway_killed_and_redis_restarted_mid_batch_every_line_answered_once(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis", aof=True).start()
    config = {
        "models": [{"name": "m", "source": "/x"}],
        "auth": {"required": False},
        "redis": {"url": redis.url},
        "queue": {"capacity_per_replica": 8},
        "files": {"dir": str(tmp_path / "files")},
        "batch": {"concurrency_per_replica": 4, "claim_idle_s": 2.0, "poll_interval_s": 0.1},
    }
    try:
        with _gateway(config, 0.05) as (doomed, doomed_url), _gateway(config, 0.05) as (_, survivor_url):
            first = openai.OpenAI(base_url=doomed_url, api_key="local", max_retries=0, timeout=30)
            survivor = openai.OpenAI(base_url=survivor_url, api_key="local", max_retries=0, timeout=30)
            upload = first.files.create(file=("in.jsonl", _jsonl("m", 300)), purpose="batch")
            batch = first.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")
            started = time.monotonic()
            while (
                counts := survivor.batches.retrieve(batch.id).request_counts
            ) is None or counts.completed < 60:
                assert time.monotonic() - started < 30, counts
                time.sleep(0.05)
            doomed.send_signal(signal.SIGKILL)  # mid-line: its claimed lines stay pending
            doomed.wait(10)
            killed = time.monotonic() - started
            while survivor.batches.retrieve(batch.id).request_counts.completed < 150:  # type: ignore[union-attr]
                assert time.monotonic() - started < 45
                time.sleep(0.05)
            redis.stop()  # SIGKILL: the last second of writes may be lost
            time.sleep(1.0)
            redis.start()  # back from its append-only file
            restarted = time.monotonic() - started
            done = _wait(survivor, batch.id, 45)
            took = time.monotonic() - started
            _answered_once(survivor, done, 300)
            assert done.request_counts is not None
            assert done.request_counts.model_dump() == {"total": 300, "completed": 300, "failed": 0}
            print(
                f"300 lines: one gateway killed at {killed:.1f} s, Redis restarted at {restarted:.1f} s, "
                f"completed at {took:.1f} s"
            )
    finally:
        redis.stop()
