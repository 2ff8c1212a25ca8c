"""Render the chart offline (helm-python-sdk: Helm's Go SDK, no cluster, no helm binary).

Kubernetes is not available where these tests run: the chart is tested by rendering
every profile and scenario and validating what comes out (Kubernetes schemas, the
CRDs in ../shared/crds, our own configuration object, checkov, promtool).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk is not installed (pip install helm-python-sdk)"
)

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "oss-serving"
PROFILES = sorted((CHART_DIR / "profiles").glob("*.yaml"))
CI_VALUES = sorted((CHART_DIR / "ci").glob("*-values.yaml"))
CLOUDS = sorted((CHART_DIR / "clouds").glob("*.yaml"))
#: The profile the cloud files are rendered over (as the README's install commands do).
CLOUD_PROFILE = CHART_DIR / "profiles" / "gpt-oss-120b-h100.yaml"
RELEASE = "oss"
NAMESPACE = "serving"


def _crd_dir() -> Path | None:
    for candidate in (REPO.parent / "shared" / "crds", REPO / "shared" / "crds"):
        if candidate.is_dir():
            return candidate
    return None


CRD_DIR = _crd_dir()


@dataclass
class Rendered:
    """One render: manifests by template path, the parsed objects, and NOTES.txt."""

    files: dict[str, str]
    objects: list[dict[str, Any]]
    notes: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, (
            f"expected one {kind} named *{name_suffix}, got {[o['metadata']['name'] for o in found]}"
        )
        return found[0]


def load_values(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), path
    return data


def scenario_values() -> list[tuple[str, dict[str, Any]]]:
    """Every values set the chart must render: the default, each profile, each ci file,
    and each cloud file over the H100 profile."""
    from serving.cluster.preflight import merge_values

    out: list[tuple[str, dict[str, Any]]] = [("default", {})]
    out += [(f"profile:{p.stem}", load_values(p)) for p in PROFILES]
    out += [(f"ci:{p.stem}", load_values(p)) for p in CI_VALUES]
    out += [(f"cloud:{p.stem}", merge_values(load_values(CLOUD_PROFILE), load_values(p))) for p in CLOUDS]
    return out


SCENARIOS = scenario_values()
SCENARIO_IDS = [name for name, _ in SCENARIOS]


@pytest.fixture(scope="session")
def chart() -> Iterator[Any]:
    loaded = helm.Chart.load(str(CHART_DIR))
    yield loaded
    loaded.close()


def _render(chart: Any, values: dict[str, Any]) -> Rendered:
    files = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return Rendered(files=files, objects=objects, notes=notes)


@pytest.fixture(scope="session")
def render(chart: Any) -> Callable[[dict[str, Any]], Rendered]:
    def run(values: dict[str, Any]) -> Rendered:
        return _render(chart, values)

    return run


@pytest.fixture(scope="session")
def rendered_scenarios(chart: Any) -> dict[str, Rendered]:
    return {name: _render(chart, values) for name, values in SCENARIOS}
