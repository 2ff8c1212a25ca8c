"""oss-serve status --cluster against recorded API responses."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from serving.cluster.cli import run_cluster_status
from serving.cluster.status import collect_status, parse_queue_depth, release_fullname

from .recorded import RecordedReader, load

CHART = Path(__file__).resolve().parents[2] / "helm" / "oss-serving"


@pytest.mark.parametrize(
    ("release", "override"),
    [("oss", None), ("oss-serving-prod", None), ("r" * 38 + "-a", None), ("oss", "custom")],
)
def test_fullname_matches_the_chart_helper(release: str, override: str | None) -> None:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
    values = {"fullnameOverride": override} if override else {}
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values, name=release, namespace="serving")
    rayservice = yaml.safe_load(files["oss-serving/templates/rayservice.yaml"])
    assert release_fullname(release, override) == rayservice["metadata"]["name"]


def test_running_release() -> None:
    reader = RecordedReader()
    state = collect_status(reader, "serving", "oss")
    assert state.found
    assert state.healthy
    assert state.service_status == "Running"
    assert state.active_cluster == "oss-oss-serving-x7k2p"
    assert state.head_ready is True
    assert state.worker_pods == {"h100": (1, 2)}
    deps = {d.name: d for d in state.deployments}
    assert (deps["gpt-oss-120b"].running_replicas, deps["gpt-oss-120b"].target_replicas) == (4, 4)
    assert (deps["gpt-oss-20b"].running_replicas, deps["gpt-oss-20b"].target_replicas) == (0, 1)
    assert deps["gpt-oss-20b"].status == "UPSCALING"
    assert state.queue_depth == {"gpt-oss-120b": 14.0, "gpt-oss-20b": 7.0}
    assert "proxy oss-oss-serving-head-svc:8265/api/serve/applications/" in reader.calls
    assert "pods app.kubernetes.io/instance=oss" in reader.calls


def _run(reader: RecordedReader, release: str = "oss") -> tuple[int, str]:
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, highlight=False, color_system=None)
    code = run_cluster_status("serving", release, console=console, reader_factory=lambda context: reader)
    return code, buffer.getvalue()


def test_status_output_of_a_running_release() -> None:
    code, out = _run(RecordedReader())
    assert code == 0
    assert "RayService serving/oss-oss-serving: Running, ready" in out
    assert "worker group h100: 1/2 pods ready" in out
    assert "queue depth: gpt-oss-120b 14, gpt-oss-20b 7" in out
    assert "Upscaling from 0 to 1 replicas." in out


def test_failing_upgrade_is_reported_with_the_reason() -> None:
    code, out = _run(
        RecordedReader(rayservice="rayservice-failing.json", serve_details=None, gateway_metrics=None)
    )
    assert code == 1
    assert "not ready Initializing the RayService" in out
    assert "upgrade in progress: new cluster oss-oss-serving-9q4vd" in out
    assert "DEPLOY_FAILED" in out
    assert "The deployment failed to start 3 times in a row." in out
    assert "?/?" in out  # replica counts unknown without the dashboard
    assert "queue depth: unknown" in out


def test_missing_release() -> None:
    code, out = _run(RecordedReader(), release="other")
    assert code == 1
    assert "RayService serving/other-oss-serving not found" in out


def test_queue_depth_parser() -> None:
    assert parse_queue_depth(load("gateway-metrics.txt")) == {"gpt-oss-120b": 14.0, "gpt-oss-20b": 7.0}
    assert parse_queue_depth("oss_serving_queue_depth 5\n") == {"all": 5.0}
    assert parse_queue_depth("oss_serving_queue_depth_max 5\n") == {}
