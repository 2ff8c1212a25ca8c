"""values.schema.json: generated from the chart's keys and ServingConfig, kept fresh, and
rejecting bad values with a message that names the key."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from serving.cluster.chart_schema import SCHEMA_PATH, schema_json

from .conftest import CHART_DIR, helm


def test_schema_file_is_generated_from_the_code() -> None:
    assert SCHEMA_PATH == CHART_DIR / "values.schema.json"
    assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_json(), (
        "values.schema.json is stale: run `python -m serving.cluster.chart_schema`"
    )


def test_schema_rejects_unknown_keys_everywhere() -> None:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, path
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(schema, "$")


def _default_config() -> dict[str, Any]:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))
    return dict(values["config"])


def _bad_topology() -> dict[str, Any]:
    config = _default_config()
    model = dict(config["models"][0])
    model["topology"] = {**model["topology"], "max_replica": 4}
    return {"config": {**config, "models": [model]}}


BAD_VALUES = [
    pytest.param({"replicaCount": 2}, "replicaCount", id="unknown-top-level-key"),
    pytest.param(_bad_topology(), "max_replica", id="typo-in-model-topology"),
    pytest.param({"image": {"repository": "x/y", "tag": "latest"}}, "tag", id="unpinned-image"),
    pytest.param({"redis": {"mode": "both"}}, "mode", id="redis-mode"),
    pytest.param(
        {"redis": {"mode": "external", "external": {"url": "redis://user:secret@redis:6379/0"}}},
        "url",
        id="password-in-redis-url",
    ),
    pytest.param({"redis": {"mode": "external"}}, "url", id="external-redis-without-url"),
    pytest.param(
        {"ray": {"workerGroups": [{"name": "gpu", "gpuType": "H100-80GB", "gpusPerPod": 0}]}},
        "gpusPerPod",
        id="zero-gpus",
    ),
    pytest.param({"config": {"models": []}}, "models", id="no-models"),
    pytest.param({"weights": {"cache": {"type": "nfs"}}}, "type", id="unknown-weights-cache-type"),
    pytest.param(
        {
            "ray": {
                "workerGroups": [
                    {
                        "name": "gpu",
                        "gpuType": "H100-80GB",
                        "gpusPerPod": 1,
                        "replicas": 1,
                        "minReplicas": 1,
                        "maxReplicas": 1,
                        "resources": {"requests": {}, "limits": {}},
                        "securityContext": {"privileged": True},
                    }
                ]
            }
        },
        "privileged",
        id="worker-security-context-beyond-capabilities",
    ),
]


@pytest.mark.parametrize(("values", "key"), BAD_VALUES)
def test_bad_values_are_rejected_with_a_readable_message(
    chart: Any, values: dict[str, Any], key: str
) -> None:
    with pytest.raises(helm.HelmError) as caught:
        chart.render(values, name="oss", namespace="serving")
    message = str(caught.value)
    assert key in message
    assert len(message) < 2000


def test_default_values_pass_the_schema(chart: Any) -> None:
    chart.validate_schema(yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8")))
