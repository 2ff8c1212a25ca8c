"""The few Kubernetes API reads that ``preflight`` and ``status --cluster`` make.

:class:`ClusterReader` is the interface: every method returns the API server's JSON as
plain dicts (the wire shape, not the client's model objects), so the checks can be
tested against recorded responses. :class:`KubeReader` implements it with the
``kubernetes`` client against the current kube context; tests use a reader that
replays recorded responses.

Exceptions::

    RuntimeError
     └── ClusterUnavailable   (no kube context / API server unreachable / forbidden)
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol

__all__ = ["ClusterReader", "ClusterUnavailable", "KubeReader"]

JSON = dict[str, Any]


class ClusterUnavailable(RuntimeError):
    """The Kubernetes API cannot be used (no context, unreachable, or forbidden)."""


class ClusterReader(Protocol):
    """Read-only access to the objects preflight and status look at."""

    def context_name(self) -> str:
        """Name of the kube context in use."""
        ...

    def list_nodes(self) -> list[JSON]:
        """Every Node (items of a NodeList)."""
        ...

    def crd_names(self) -> set[str]:
        """Names of the installed CustomResourceDefinitions (e.g. ``rayservices.ray.io``)."""
        ...

    def get_secret(self, namespace: str, name: str) -> JSON | None:
        """The Secret, or None when it does not exist."""
        ...

    def list_storage_classes(self) -> list[JSON]:
        """Every StorageClass."""
        ...

    def get_pvc(self, namespace: str, name: str) -> JSON | None:
        """The PersistentVolumeClaim, or None."""
        ...

    def get_rayservice(self, namespace: str, name: str) -> JSON | None:
        """The RayService (ray.io/v1), or None."""
        ...

    def list_pods(self, namespace: str, label_selector: str) -> list[JSON]:
        """Pods matching the selector."""
        ...

    def list_pods_all_namespaces(self, label_selector: str) -> list[JSON]:
        """Pods matching the selector in every namespace (to find the KubeRay operator)."""
        ...

    def service_proxy_get(self, namespace: str, service: str, port: int, path: str) -> str | None:
        """GET through the API server's service proxy; None when it fails."""
        ...


class KubeReader:
    """:class:`ClusterReader` over the ``kubernetes`` client and the current kube context."""

    def __init__(self, context: str | None = None, config_file: str | None = None) -> None:
        # $KUBECONFIG is read now, not when the client module was imported.
        config_file = config_file or os.environ.get("KUBECONFIG") or None
        try:
            from kubernetes import client, config
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ClusterUnavailable(
                "the kubernetes client is not installed: pip install 'oss-serving[gpu]'"
            ) from exc
        try:
            config.load_kube_config(config_file=config_file, context=context)  # type: ignore[no-untyped-call]
            _, active = config.list_kube_config_contexts(config_file=config_file)  # type: ignore[no-untyped-call]
            self._context = str(context or (active or {}).get("name", ""))
        except Exception as exc:
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except Exception:
                raise ClusterUnavailable(f"no usable kube context: {exc}") from exc
            self._context = "in-cluster"
        self._api = client.ApiClient()

    def context_name(self) -> str:
        return self._context

    def _request(
        self, path: str, query: list[tuple[str, str]] | None = None, timeout: float = 15
    ) -> tuple[int, bytes]:
        """(HTTP status, body) of a GET; ClusterUnavailable when the server cannot be reached."""
        try:
            method, url, headers, body, post = self._api.param_serialize(
                "GET",
                path,
                query_params=query or [],
                header_params={"Accept": "application/json, text/plain"},
                auth_settings=["BearerToken"],
            )
            response = self._api.call_api(method, url, headers, body, post, _request_timeout=timeout)
            raw = response.read()  # type: ignore[no-untyped-call]
            return int(response.status), raw if isinstance(raw, bytes) else b""
        except Exception as exc:
            status = getattr(exc, "status", None)
            if isinstance(status, int) and status > 0:
                return status, b""
            raise ClusterUnavailable(f"GET {path} failed: {exc}") from exc

    def _get(self, path: str, query: list[tuple[str, str]] | None = None, *, missing_ok: bool = False) -> Any:
        status, raw = self._request(path, query)
        if status == 404 and missing_ok:
            return None
        if status in (401, 403):
            raise ClusterUnavailable(f"forbidden: GET {path} ({status}); check your RBAC for this read")
        if status >= 400:
            raise ClusterUnavailable(f"GET {path} failed with HTTP {status}")
        return json.loads(raw)

    def list_nodes(self) -> list[JSON]:
        return list(self._get("/api/v1/nodes")["items"])

    def crd_names(self) -> set[str]:
        body = self._get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
        return {item["metadata"]["name"] for item in body["items"]}

    def get_secret(self, namespace: str, name: str) -> JSON | None:
        result: JSON | None = self._get(f"/api/v1/namespaces/{namespace}/secrets/{name}", missing_ok=True)
        return result

    def list_storage_classes(self) -> list[JSON]:
        return list(self._get("/apis/storage.k8s.io/v1/storageclasses")["items"])

    def get_pvc(self, namespace: str, name: str) -> JSON | None:
        path = f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}"
        result: JSON | None = self._get(path, missing_ok=True)
        return result

    def get_rayservice(self, namespace: str, name: str) -> JSON | None:
        path = f"/apis/ray.io/v1/namespaces/{namespace}/rayservices/{name}"
        result: JSON | None = self._get(path, missing_ok=True)
        return result

    def list_pods(self, namespace: str, label_selector: str) -> list[JSON]:
        body = self._get(f"/api/v1/namespaces/{namespace}/pods", [("labelSelector", label_selector)])
        return list(body["items"])

    def list_pods_all_namespaces(self, label_selector: str) -> list[JSON]:
        body = self._get("/api/v1/pods", [("labelSelector", label_selector)])
        return list(body["items"])

    def service_proxy_get(self, namespace: str, service: str, port: int, path: str) -> str | None:
        url = f"/api/v1/namespaces/{namespace}/services/{service}:{port}/proxy/{path.lstrip('/')}"
        try:
            status, raw = self._request(url, timeout=10)
        except ClusterUnavailable:
            return None
        if status >= 400:
            return None
        return raw.decode("utf-8", errors="replace")
