"""KubeReader through the real kubernetes client, against a local HTTP server that
answers with the recorded API responses (the API server's paths and status codes)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from serving.cluster.kube import ClusterUnavailable, KubeReader

from .recorded import load

pytest.importorskip("kubernetes", reason="the kubernetes client is not installed")

ROUTES = {
    "/api/v1/nodes": "nodes.json",
    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions": "crds.json",
    "/apis/storage.k8s.io/v1/storageclasses": "storageclasses.json",
    "/apis/ray.io/v1/namespaces/serving/rayservices/oss-oss-serving": "rayservice-running.json",
}


class _Handler(BaseHTTPRequestHandler):
    seen: list[str] = []  # noqa: RUF012 - per-server list, replaced in the fixture

    def log_message(self, format: str, *args: object) -> None:  # quiet
        return

    def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        self.seen.append(self.path)
        if url.path in ROUTES:
            self._send(200, json.dumps(load(ROUTES[url.path])).encode())
        elif url.path == "/api/v1/namespaces/serving/secrets/hf-token":
            self._send(200, json.dumps(load("secrets.json")["hf-token"]).encode())
        elif url.path == "/api/v1/namespaces/serving/secrets/forbidden":
            self._send(403, b'{"kind":"Status","code":403,"reason":"Forbidden"}')
        elif url.path == "/api/v1/namespaces/serving/pods":
            self._send(200, json.dumps(load("pods.json")).encode())
        elif url.path == "/api/v1/namespaces/serving/services/oss-oss-serving-gateway:8000/proxy/metrics":
            self._send(200, str(load("gateway-metrics.txt")).encode(), "text/plain")
        else:
            self._send(404, b'{"kind":"Status","code":404,"reason":"NotFound"}')


@pytest.fixture
def reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[KubeReader, list[str]]]:
    seen: list[str] = []
    handler = type("Handler", (_Handler,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: recorded
  cluster: {{server: "http://127.0.0.1:{server.server_port}"}}
users:
- name: tester
  user: {{token: not-a-real-token}}
contexts:
- name: recorded-ctx
  context: {{cluster: recorded, user: tester, namespace: serving}}
current-context: recorded-ctx
""",
        encoding="utf-8",
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    try:
        yield KubeReader(), seen
    finally:
        server.shutdown()
        server.server_close()


def test_reads_through_the_kubernetes_client(reader: tuple[KubeReader, list[str]]) -> None:
    kube, seen = reader
    assert kube.context_name() == "recorded-ctx"
    assert len(kube.list_nodes()) == 5
    assert "rayservices.ray.io" in kube.crd_names()
    assert {sc["metadata"]["name"] for sc in kube.list_storage_classes()} == {"gp3", "efs-sc"}
    secret = kube.get_secret("serving", "hf-token")
    assert secret is not None
    assert secret["data"]["token"]
    assert kube.get_secret("serving", "absent") is None
    rayservice = kube.get_rayservice("serving", "oss-oss-serving")
    assert rayservice is not None
    assert rayservice["status"]["serviceStatus"] == "Running"
    assert len(kube.list_pods("serving", "app.kubernetes.io/instance=oss")) == 4
    metrics = kube.service_proxy_get("serving", "oss-oss-serving-gateway", 8000, "metrics")
    assert metrics is not None
    assert "oss_serving_queue_depth" in metrics
    assert (
        kube.service_proxy_get("serving", "oss-oss-serving-head-svc", 8265, "api/serve/applications/") is None
    )
    pods_query = next(urlparse(p).query for p in seen if p.startswith("/api/v1/namespaces/serving/pods?"))
    assert parse_qs(pods_query) == {"labelSelector": ["app.kubernetes.io/instance=oss"]}


def test_forbidden_is_reported_as_unavailable(reader: tuple[KubeReader, list[str]]) -> None:
    kube, _ = reader
    with pytest.raises(ClusterUnavailable, match="forbidden"):
        kube.get_secret("serving", "forbidden")


def test_no_kube_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ClusterUnavailable, match="no usable kube context"):
        KubeReader()
