"""Helpers the benchmarks share: a free port, and the oss-serving stack up for the length of a block."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

__all__ = ["free_port", "local_stack", "percentile"]


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
