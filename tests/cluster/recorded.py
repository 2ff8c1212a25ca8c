"""A ClusterReader that replays recorded Kubernetes API responses (tests only).

The files in recordings/ have the API server's wire shapes (NodeList, Secret,
StorageClassList, CustomResourceDefinitionList, RayService ray.io/v1 with the status
KubeRay writes, PodList, the Ray dashboard's /api/serve/applications/ and the gateway's
Prometheus text), trimmed to what the checks read plus the usual surrounding fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECORDINGS = Path(__file__).parent / "recordings"
JSON = dict[str, Any]


def load(name: str) -> Any:
    path = RECORDINGS / name
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if name.endswith(".json") else text


@dataclass
class RecordedReader:
    """Replays recordings; which ones is chosen per test."""

    nodes: str = "nodes.json"
    crds: str = "crds.json"
    rayservice: str | None = "rayservice-running.json"
    serve_details: str | None = "serve-applications.json"
    gateway_metrics: str | None = "gateway-metrics.txt"
    pvcs: dict[str, JSON] = field(default_factory=dict)
    #: storageclasses-eks-1.30.json: an EKS cluster created at 1.30 (gp2, not default).
    storage_classes: str = "storageclasses.json"
    operator_pods: str = "kuberay-operator-pods.json"
    calls: list[str] = field(default_factory=list)

    def context_name(self) -> str:
        return "arn:aws:eks:us-east-1:000000000000:cluster/gpu-prod"

    def list_nodes(self) -> list[JSON]:
        self.calls.append("nodes")
        return list(load(self.nodes)["items"])

    def crd_names(self) -> set[str]:
        self.calls.append("crds")
        return {item["metadata"]["name"] for item in load(self.crds)["items"]}

    def get_secret(self, namespace: str, name: str) -> JSON | None:
        self.calls.append(f"secret {namespace}/{name}")
        secret: JSON | None = load("secrets.json").get(name)
        return secret

    def list_storage_classes(self) -> list[JSON]:
        return list(load(self.storage_classes)["items"])

    def get_pvc(self, namespace: str, name: str) -> JSON | None:
        return self.pvcs.get(name)

    def get_rayservice(self, namespace: str, name: str) -> JSON | None:
        self.calls.append(f"rayservice {namespace}/{name}")
        if self.rayservice is None:
            return None
        body: JSON = load(self.rayservice)
        return body if body["metadata"]["name"] == name else None

    def list_pods(self, namespace: str, label_selector: str) -> list[JSON]:
        self.calls.append(f"pods {label_selector}")
        instance = label_selector.split("=", 1)[1]
        return [
            p
            for p in load("pods.json")["items"]
            if p["metadata"]["labels"].get("app.kubernetes.io/instance") == instance
        ]

    def list_pods_all_namespaces(self, label_selector: str) -> list[JSON]:
        self.calls.append(f"pods (all namespaces) {label_selector}")
        wanted = dict(term.split("=", 1) for term in label_selector.split(","))
        return [
            p
            for p in load(self.operator_pods)["items"]
            if all(p["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
        ]

    def service_proxy_get(self, namespace: str, service: str, port: int, path: str) -> str | None:
        self.calls.append(f"proxy {service}:{port}/{path}")
        if service.endswith("-head-svc") and port == 8265 and path == "api/serve/applications/":
            return None if self.serve_details is None else json.dumps(load(self.serve_details))
        if service.endswith("-gateway") and path == "metrics":
            return None if self.gateway_metrics is None else str(load(self.gateway_metrics))
        return None
