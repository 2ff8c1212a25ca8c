"""``oss-serve status --cluster``: the release's RayService, replicas and queue depth.

Everything comes from the Kubernetes API (through the current kube context): the
RayService's status as KubeRay reports it, the release's pods, the Ray dashboard's Serve
details and the gateway's ``/metrics`` (both through the API server's service proxy, so
no port-forward is needed). What cannot be read is shown as unknown, never guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from serving.cluster.kube import ClusterReader

__all__ = ["ClusterStatus", "DeploymentState", "collect_status", "release_fullname"]

JSON = dict[str, Any]
CHART_NAME = "oss-serving"
APPLICATION = "oss-serving"
DASHBOARD_PORT = 8265
QUEUE_METRIC = "oss_serving_queue_depth"


def release_fullname(release: str, fullname_override: str | None = None) -> str:
    """The chart's object-name prefix for a release (``oss-serving.fullname`` in _helpers.tpl)."""
    if fullname_override:
        name = fullname_override[:40]
    elif CHART_NAME in release:
        name = release[:40]
    else:
        name = f"{release}-{CHART_NAME}"[:40]
    return name.rstrip("-")


@dataclass
class DeploymentState:
    """One Serve deployment of the application."""

    name: str
    status: str
    message: str = ""
    running_replicas: int | None = None
    target_replicas: int | None = None


@dataclass
class ClusterStatus:
    """What ``status --cluster`` prints."""

    name: str
    namespace: str
    found: bool
    service_status: str = "unknown"
    ready: str = "unknown"
    ready_message: str = ""
    upgrading: bool = False
    active_cluster: str = ""
    pending_cluster: str = ""
    application_status: str = "unknown"
    application_message: str = ""
    deployments: list[DeploymentState] = field(default_factory=list)
    worker_pods: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Worker group -> (ready pods, pods)."""
    head_ready: bool | None = None
    queue_depth: dict[str, float] | None = None
    """Model -> waiting requests; None when the gateway's metrics could not be read."""

    @property
    def healthy(self) -> bool:
        return self.found and self.ready == "True" and self.application_status == "RUNNING"


def _pod_ready(pod: JSON) -> bool:
    for cond in pod.get("status", {}).get("conditions", []):
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


def parse_queue_depth(metrics_text: str) -> dict[str, float]:
    """Sum ``oss_serving_queue_depth`` samples per model from a Prometheus text exposition."""
    depth: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if not line.startswith(QUEUE_METRIC) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if not (head.startswith(QUEUE_METRIC + "{") or head == QUEUE_METRIC):
            continue
        model = "all"
        if "{" in head:
            for part in head[head.index("{") + 1 : head.rindex("}")].split(","):
                key, _, raw = part.partition("=")
                if key.strip() == "model":
                    model = raw.strip().strip('"')
        try:
            depth[model] = depth.get(model, 0.0) + float(value)
        except ValueError:
            continue
    return depth


def _serve_details(reader: ClusterReader, namespace: str, name: str) -> JSON | None:
    text = reader.service_proxy_get(namespace, f"{name}-head-svc", DASHBOARD_PORT, "api/serve/applications/")
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def collect_status(
    reader: ClusterReader, namespace: str, release: str, fullname_override: str | None = None
) -> ClusterStatus:
    """Read everything ``status --cluster`` shows."""
    name = release_fullname(release, fullname_override)
    rayservice = reader.get_rayservice(namespace, name)
    state = ClusterStatus(name=name, namespace=namespace, found=rayservice is not None)
    if rayservice is None:
        return state
    status = rayservice.get("status", {})
    state.service_status = str(status.get("serviceStatus") or "unknown")
    for cond in status.get("conditions", []):
        if cond.get("type") == "Ready":
            state.ready = str(cond.get("status"))
            state.ready_message = str(cond.get("message") or cond.get("reason") or "")
        if cond.get("type") == "UpgradeInProgress":
            state.upgrading = cond.get("status") == "True"
    active = status.get("activeServiceStatus", {})
    state.active_cluster = str(active.get("rayClusterName", ""))
    state.pending_cluster = str(status.get("pendingServiceStatus", {}).get("rayClusterName", ""))
    app = active.get("applicationStatuses", {}).get(APPLICATION, {})
    state.application_status = str(app.get("status") or "unknown")
    state.application_message = str(app.get("message") or "")

    details = _serve_details(reader, namespace, name)
    detail_deps: JSON = {}
    if details is not None:
        detail_deps = details.get("applications", {}).get(APPLICATION, {}).get("deployments", {})
    for dep_name, dep in sorted(app.get("serveDeploymentStatuses", {}).items()):
        entry = DeploymentState(
            name=dep_name, status=str(dep.get("status")), message=str(dep.get("message") or "")
        )
        more = detail_deps.get(dep_name)
        if isinstance(more, dict):
            replicas = more.get("replicas", [])
            entry.running_replicas = sum(1 for r in replicas if r.get("state") == "RUNNING")
            target = more.get("target_num_replicas")
            entry.target_replicas = int(target) if target is not None else None
        state.deployments.append(entry)

    pods = reader.list_pods(namespace, f"app.kubernetes.io/instance={release}")
    for pod in pods:
        labels = pod["metadata"].get("labels", {})
        component = labels.get("app.kubernetes.io/component")
        if component == "ray-head":
            ready = _pod_ready(pod)
            state.head_ready = ready if state.head_ready is None else state.head_ready or ready
        elif component == "ray-worker":
            group = labels.get("oss-serving.io/worker-group", "workers")
            ready_count, total = state.worker_pods.get(group, (0, 0))
            state.worker_pods[group] = (ready_count + int(_pod_ready(pod)), total + 1)

    metrics = reader.service_proxy_get(namespace, f"{name}-gateway", 8000, "metrics")
    state.queue_depth = parse_queue_depth(metrics) if metrics is not None else None
    return state
