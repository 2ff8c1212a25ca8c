"""Helpers the benchmarks share: a free port, a percentile, a progress bar, waiting for a
server, and the oss-serving stack up for the length of a block."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["free_port", "local_stack", "percentile", "progress_bar", "wait_http"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..1); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def progress_bar(console: Console) -> Progress:
    """The benchmarks' progress display: description, bar, done/total, time elapsed."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def wait_http(url: str, proc: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    """Until ``url`` answers 200; fails when ``proc`` (the server, if given) exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process serving {url} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout_s} s")


@contextlib.contextmanager
def local_stack(config: dict[str, Any], work: Path) -> Iterator[str]:
    """``oss-serve up --detach`` with ``config`` (state and config file under ``work``);
    yields the base URL; ``oss-serve down`` when the block ends, whatever happened."""
    work.mkdir(parents=True, exist_ok=True)
    config = {**config, "local": {"state_dir": str(work / "run")}}
    config_file = work / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    oss = [sys.executable, "-m", "serving.cli"]
    try:
        subprocess.run([*oss, "up", "--detach", "--config", str(config_file)], check=True, env=env)
        yield f"http://127.0.0.1:{config['gateway']['port']}"
    finally:
        subprocess.run([*oss, "down", "--config", str(config_file)], env=env, check=False)
