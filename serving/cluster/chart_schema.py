"""The Helm chart's ``values.schema.json``, generated.

The chart's own keys are described here; the ``config`` key is the oss-serving
configuration itself, so its schema is :class:`serving.config.ServingConfig`'s JSON
schema (unknown keys rejected at every level, as ``extra="forbid"`` does). Helm
validates values against this file on ``install``, ``upgrade``, ``template`` and
``lint``: a typo fails before anything reaches the cluster.

``python -m serving.cluster.chart_schema`` rewrites ``helm/oss-serving/values.schema.json``;
``tests/chart/test_schema.py`` fails when the checked-in file is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from serving.config import ServingConfig

__all__ = ["SCHEMA_PATH", "schema_json", "values_schema"]

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "helm" / "oss-serving" / "values.schema.json"

JSON = dict[str, Any]


def _obj(properties: JSON, required: list[str] | None = None, description: str | None = None) -> JSON:
    out: JSON = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        out["required"] = required
    if description:
        out["description"] = description
    return out


def _str(description: str | None = None, **extra: Any) -> JSON:
    out: JSON = {"type": "string", **extra}
    if description:
        out["description"] = description
    return out


def _int(minimum: int = 0, description: str | None = None) -> JSON:
    out: JSON = {"type": "integer", "minimum": minimum}
    if description:
        out["description"] = description
    return out


_QUANTITY = {
    "anyOf": [
        {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$"},
        {"type": "number"},
    ]
}
_RESOURCE_LIST: JSON = {"type": "object", "additionalProperties": _QUANTITY}
_RESOURCES = _obj(
    {"requests": _RESOURCE_LIST, "limits": _RESOURCE_LIST},
    required=["requests", "limits"],
    description="Kubernetes resource requests and limits (both required: no unbounded container).",
)
_ANY_OBJECT: JSON = {"type": "object"}
_ANY_LIST: JSON = {"type": "array"}
_PINNED_TAG = {
    "type": "string",
    "minLength": 1,
    "not": {"enum": ["latest", "main", "master"]},
    "description": "A pinned image tag (moving tags such as latest are rejected).",
}
_APP_TAG = {
    "type": "string",
    "not": {"enum": ["latest", "main", "master"]},
    "description": "A pinned image tag; empty: the chart's appVersion (moving tags are rejected).",
}
_STRING_MAP: JSON = {"type": "object", "additionalProperties": {"type": "string"}}
_CONTAINER_SECURITY = _obj(
    {
        "capabilities": _obj(
            {"add": {"type": "array", "items": {"type": "string", "pattern": "^[A-Z_]+$"}}},
            description="Capabilities added after dropping ALL (e.g. IPC_LOCK for RDMA memory registration).",
        ),
        "readOnlyRootFilesystem": {"type": "boolean"},
        # Kubernetes grants no ambient capabilities to non-root processes
        # (kubernetes/kubernetes#56374): an added capability takes effect only for root.
        # The render fails on capabilities without root, and on root without capabilities.
        "runAsUser": {
            "const": 0,
            "description": "0 (root), only with capabilities.add (a non-root process gets none of them).",
        },
        "runAsNonRoot": {"const": False, "description": "false, with runAsUser 0."},
    },
    description="Merged over the chart's container securityContext.",
)
_IMAGE = _obj(
    {
        "repository": _str(minLength=1),
        "tag": _PINNED_TAG,
        "pullPolicy": {"enum": ["IfNotPresent", "Always", "Never"]},
    },
    required=["repository", "tag"],
)
_K8S_NAME = {"type": "string", "pattern": r"^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}
_SECRET_REF = {
    "existingSecret": _K8S_NAME,
    "key": _str(minLength=1),
}


def _worker_group() -> JSON:
    return _obj(
        {
            "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 40},
            "gpuType": _str("GPU model of the nodes (a key of files/budget.json).", minLength=1),
            "gpusPerPod": _int(1, "GPUs of one worker pod (nvidia.com/gpu)."),
            "replicas": _int(0),
            "minReplicas": _int(0),
            "maxReplicas": _int(1),
            "numOfHosts": _int(1),
            "resources": _RESOURCES,
            "shmSize": _str("Size of the /dev/shm memory volume.", pattern=r"^[0-9]+(Mi|Gi)$"),
            "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
            "tolerations": _ANY_LIST,
            "affinity": _ANY_OBJECT,
            "startupSeconds": _int(60, "Seconds a worker may take to start before it is restarted."),
            "extraResources": {
                **_RESOURCE_LIST,
                "description": "Extra resources requested and limited per pod (e.g. rdma/ib).",
            },
            "extraEnv": _ANY_LIST,
            "extraVolumes": _ANY_LIST,
            "extraVolumeMounts": _ANY_LIST,
            "podAnnotations": _STRING_MAP,
            "securityContext": _CONTAINER_SECURITY,
        },
        required=["name", "gpuType", "gpusPerPod", "replicas", "minReplicas", "maxReplicas", "resources"],
    )


def _chart_properties() -> JSON:
    thresholds = {"type": "number", "exclusiveMinimum": 0}
    return {
        "nameOverride": _str(),
        "fullnameOverride": _str(),
        "image": _obj(
            {
                "repository": _str(minLength=1),
                "tag": _APP_TAG,
                "digest": {"type": "string", "pattern": r"^$|^sha256:[a-f0-9]{64}$"},
                "pullPolicy": {"enum": ["IfNotPresent", "Always", "Never"]},
            },
            required=["repository"],
        ),
        "imagePullSecrets": _ANY_LIST,
        "config": {
            "$ref": "#/$defs/ServingConfig",
            "description": "The oss-serving configuration (serving/config.py), rendered into the ConfigMap.",
        },
        "ray": _obj(
            {
                "version": _str(pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$"),
                "upgradeStrategy": {"enum": ["NewCluster", "None"]},
                "clusterDeletionDelaySeconds": _int(0),
                "excludeHeadFromServeService": {"type": "boolean"},
                "serve": _obj(
                    {
                        "requestTimeoutSeconds": {"type": "number", "minimum": 0},
                        "logLevel": {"enum": ["DEBUG", "INFO", "WARNING", "ERROR"]},
                        "highThroughput": {"type": "boolean"},
                    }
                ),
                "gcsFaultTolerance": _obj({"enabled": {"type": "boolean"}}),
                "gpuNodeSelector": _STRING_MAP,
                "head": _obj(
                    {
                        "resources": _RESOURCES,
                        "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
                        "tolerations": _ANY_LIST,
                        "affinity": _ANY_OBJECT,
                    },
                    required=["resources"],
                ),
                "workerGroups": {"type": "array", "minItems": 1, "items": _worker_group()},
                "autoscaler": _obj(
                    {
                        "enabled": {"type": "boolean"},
                        "idleTimeoutSeconds": _int(0),
                        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                        "resources": _RESOURCES,
                    }
                ),
                "extraEnv": _ANY_LIST,
                "extraVolumes": _ANY_LIST,
                "extraVolumeMounts": _ANY_LIST,
                "podAnnotations": _STRING_MAP,
                "priorityClassName": _K8S_NAME,
                "runtimeClassName": _K8S_NAME,
                "readOnlyRootFilesystem": {"type": "boolean"},
            },
            required=["version", "head", "workerGroups"],
        ),
        "redis": {
            **_obj(
                {
                    "mode": {
                        "enum": ["bundled", "external"],
                        "description": "bundled StatefulSet or external URL",
                    },
                    "bundled": _obj(
                        {
                            "image": _IMAGE,
                            "persistence": _obj(
                                {"size": _str(pattern=r"^[0-9]+(Mi|Gi|Ti)$"), "storageClassName": _str()}
                            ),
                            "resources": _RESOURCES,
                            "maxmemory": _str(pattern=r"^[0-9]+(kb|mb|gb)$"),
                            "nodeSelector": _STRING_MAP,
                            "tolerations": _ANY_LIST,
                        }
                    ),
                    "external": _obj(
                        {
                            "url": {
                                "type": "string",
                                # No credentials in the URL: it lands in a ConfigMap.
                                "pattern": r"^$|^rediss?://[^@/:]+(:[0-9]+)?(/[0-9]+)?$",
                                "description": "redis:// or rediss:// URL without credentials.",
                            },
                            "existingSecret": _K8S_NAME,
                            "passwordKey": _str(minLength=1),
                        }
                    ),
                },
                required=["mode"],
            ),
            "allOf": [
                {
                    "if": {"properties": {"mode": {"const": "external"}}},
                    "then": {
                        "properties": {
                            "external": {"properties": {"url": {"minLength": 1}}, "required": ["url"]}
                        },
                        "required": ["external"],
                    },
                }
            ],
        },
        "secrets": _obj(
            {
                "apiKeys": _obj(dict(_SECRET_REF)),
                "huggingface": _obj({**_SECRET_REF, "token": _str()}),
                "upstream": _obj({**_SECRET_REF, "apiKey": _str()}),
                "redis": _obj(dict(_SECRET_REF)),
                "s3": _obj(
                    {
                        "existingSecret": _K8S_NAME,
                        "accessKeyIdKey": _str(minLength=1),
                        "secretAccessKeyKey": _str(minLength=1),
                        "sessionTokenKey": _str(),
                    },
                    description="The Files API's S3 store keys (files.backend: s3), from an existing Secret.",
                ),
            }
        ),
        "weights": _obj(
            {
                "cache": _obj(
                    {
                        "enabled": {"type": "boolean"},
                        "type": {
                            "enum": ["volume", "node", "shared", "host"],
                            "description": "volume: a ReadWriteOnce volume per worker pod; node: the node's "
                            "disk (emptyDir); shared: one ReadWriteMany claim; host: staged on every GPU "
                            "node at hostPath (download off).",
                        },
                        "existingClaim": _K8S_NAME,
                        "hostPath": {
                            "type": "string",
                            "pattern": r"^$|^/[A-Za-z0-9._/-]+$",
                            "description": "host only: each GPU node's folder of model folders.",
                        },
                        "size": _str(pattern=r"^[0-9]+(Gi|Ti)$"),
                        "storageClassName": _str(),
                        "accessMode": {"enum": ["ReadWriteMany", "ReadOnlyMany", "ReadWriteOnce"]},
                        "mountPath": _str(pattern=r"^/[A-Za-z0-9._/-]+$"),
                    }
                ),
                "download": _obj(
                    {
                        "enabled": {"type": "boolean"},
                        "activeDeadlineSeconds": _int(60),
                        "resources": _RESOURCES,
                        "nodeSelector": _STRING_MAP,
                        "tolerations": _ANY_LIST,
                    }
                ),
            }
        ),
        "service": _obj(
            {
                "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "port": _int(1),
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            }
        ),
        "monitoring": _obj(
            {
                "podMonitor": _obj(
                    {"enabled": {"type": "boolean"}, "interval": _str(), "labels": _ANY_OBJECT}
                ),
                "prometheusRule": _obj(
                    {
                        "enabled": {"type": "boolean"},
                        "labels": _ANY_OBJECT,
                        "queueWaitP95Seconds": thresholds,
                        "errorRatio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                        "kvCacheUsage": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                        "batchOldestLineSeconds": thresholds,
                    }
                ),
                "dashboards": _obj(
                    {
                        "enabled": {"type": "boolean"},
                        "label": _str(minLength=1),
                        "labelValue": _str(),
                        "folder": _str(),
                    }
                ),
            }
        ),
        "keda": _obj(
            {
                "enabled": {"type": "boolean"},
                "prometheusServerAddress": _str(pattern=r"^https?://"),
                "queueDepthTarget": _int(1),
                "minReplicaCount": _int(0),
                "maxReplicaCount": _int(1),
                "pollingInterval": _int(1),
                "cooldownPeriod": _int(0),
                "scaleTargetRef": _obj({"apiVersion": _str(), "kind": _str(), "name": _K8S_NAME}),
            }
        ),
        "podDisruptionBudget": _obj({"enabled": {"type": "boolean"}, "maxUnavailable": _int(1)}),
        "networkPolicy": _obj(
            {
                "enabled": {"type": "boolean"},
                "kuberayOperator": _obj(
                    {"namespace": _K8S_NAME, "podLabels": {**_STRING_MAP, "minProperties": 1}},
                    description="Admitted by its pod labels, from any namespace (empty) or the one named.",
                ),
                "monitoringNamespace": _K8S_NAME,
                "gatewayFrom": _ANY_LIST,
            }
        ),
        "securityContext": _obj({"runAsUser": _int(1), "runAsGroup": _int(0), "fsGroup": _int(0)}),
        "budget": _obj({"enforce": {"type": "boolean"}}),
        "test": _obj({"image": _IMAGE, "resources": _RESOURCES}),
    }


def values_schema() -> JSON:
    """The whole ``values.schema.json`` document."""
    config_schema = ServingConfig.model_json_schema(ref_template="#/$defs/{model}")
    defs: JSON = dict(config_schema.pop("$defs", {}))
    defs["ServingConfig"] = config_schema
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "oss-serving chart values",
        "type": "object",
        "additionalProperties": False,
        "properties": _chart_properties(),
        "required": ["image", "config", "ray", "redis"],
        "$defs": defs,
    }


def schema_json() -> str:
    """The exact text of ``values.schema.json``."""
    return json.dumps(values_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (default) or ``--check`` the chart's schema file."""
    args = sys.argv[1:] if argv is None else argv
    text = schema_json()
    if "--check" in args:
        current = SCHEMA_PATH.read_text(encoding="utf-8") if SCHEMA_PATH.exists() else ""
        if current != text:
            print(f"{SCHEMA_PATH} is stale: run python -m serving.cluster.chart_schema", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
