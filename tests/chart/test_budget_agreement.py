"""The chart's render-time GPU memory budget check and serving/engine/budget.py agree:
same table, same numbers, same verdict, same message."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from serving.config import ModelConfig
from serving.engine.budget import BudgetError, Layout, chart_table_json, check, check_model, estimate

from .conftest import CHART_DIR, PROFILES, Rendered, helm

GRID = [
    Layout("gpt-oss-120b", "H100-80GB", 1),
    Layout("gpt-oss-120b", "H100-80GB", 1, max_model_len=32768),
    Layout("gpt-oss-120b", "H100-80GB", 1, gpu_memory_utilization="0.95", max_model_len=8192),
    Layout("gpt-oss-120b", "H100-80GB", 2, max_model_len=32768),
    Layout("gpt-oss-120b", "H100-80GB", 3, max_model_len=32768),
    Layout("gpt-oss-120b", "H100-80GB", 4),
    Layout("gpt-oss-120b", "H200-141GB", 1, max_model_len=32768),
    Layout("gpt-oss-120b", "B200-192GB", 1, kv_cache_dtype="fp8"),
    Layout("gpt-oss-120b", "A100-40GB", 1, max_model_len=32768),
    Layout("gpt-oss-120b", "A100-40GB", 2, max_model_len=32768),
    Layout("gpt-oss-120b", "L4-24GB", 1),
    Layout("gpt-oss-120b", "H100-80GB", 1, data_parallel_size=16, expert_parallel=True, max_model_len=32768),
    Layout("gpt-oss-120b", "H100-80GB", 2, data_parallel_size=128, expert_parallel=True),
    Layout("gpt-oss-20b", "L4-24GB", 1, max_model_len=32768),
    Layout("gpt-oss-20b", "L4-24GB", 1),
    Layout("gpt-oss-20b", "H100-80GB", 1, gpu_memory_utilization="0.5", max_model_len=4096),
    Layout("gpt-oss-20b", "L40S-48GB", 1, kv_cache_dtype="fp8_e4m3", max_model_len=131072),
]
GPUS_PER_NODE = 8


def _model_values(layout: Layout) -> dict[str, Any]:
    engine_kwargs: dict[str, Any] = {"gpu_memory_utilization": float(layout.gpu_memory_utilization)}
    if layout.max_model_len is not None:
        engine_kwargs["max_model_len"] = layout.max_model_len
    if layout.kv_cache_dtype != "auto":
        engine_kwargs["kv_cache_dtype"] = layout.kv_cache_dtype
    topology: dict[str, Any] = {
        "kind": "expert_parallel" if layout.expert_parallel else "replicas",
        "tensor_parallel_size": layout.tensor_parallel_size,
        "data_parallel_size": layout.data_parallel_size,
        "accelerator": "gpu",
        "gpu_type": layout.gpu_type,
    }
    return {
        "name": layout.model,
        "source": f"openai/{layout.model}",
        "engine_kwargs": engine_kwargs,
        "topology": topology,
    }


def _values(layout: Layout, enforce: bool) -> dict[str, Any]:
    group = {
        "name": "gpu",
        "gpuType": layout.gpu_type,
        "gpusPerPod": GPUS_PER_NODE,
        "replicas": 1,
        "minReplicas": 1,
        # Enough pods for the layout's GPUs (the chart's capacity check is tested apart).
        "maxReplicas": max(2, -(-layout.tensor_parallel_size * layout.data_parallel_size // GPUS_PER_NODE)),
        "resources": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"cpu": "8", "memory": "64Gi"}},
    }
    return {
        "config": {"models": [_model_values(layout)]},
        "ray": {"workerGroups": [group]},
        "budget": {"enforce": enforce},
    }


def _chart_budget(rendered: Rendered) -> list[dict[str, Any]]:
    cm = rendered.one("ConfigMap", "-config")
    data = json.loads(cm["data"]["budget.json"])
    assert isinstance(data, list)
    return data


def test_chart_table_is_generated_from_the_python_table() -> None:
    path = CHART_DIR / "files" / "budget.json"
    assert path.read_text(encoding="utf-8") == chart_table_json(), (
        "files/budget.json is stale: run "
        "`python -m serving.engine.budget > helm/oss-serving/files/budget.json`"
    )


@pytest.mark.parametrize(
    "layout",
    GRID,
    ids=lambda lay: (
        f"{lay.model}-{lay.gpu_type}-tp{lay.tensor_parallel_size}"
        f"-dp{lay.data_parallel_size}-{lay.max_model_len}-{lay.kv_cache_dtype}-{lay.gpu_memory_utilization}"
    ),
)
def test_template_and_python_agree(
    render: Callable[[dict[str, Any]], Rendered], chart: Any, layout: Layout
) -> None:
    # The layout as the configuration object sees it gives the same Layout back.
    model = ModelConfig.model_validate(_model_values(layout))
    expected = estimate(layout)

    (chart_result,) = _chart_budget(render(_values(layout, enforce=False)))
    python_result = expected.as_dict()
    try:
        check_model(model, gpus_per_node=GPUS_PER_NODE)
        python_message = ""
    except BudgetError as exc:
        python_message = str(exc)
        python_result["fits"] = False
    for key, value in python_result.items():
        assert chart_result[key] == value, key
    assert chart_result["message"] == python_message

    if python_message:
        with pytest.raises(helm.HelmError) as caught:
            chart.render(_values(layout, enforce=True), name="oss", namespace="serving")
        assert f"GPU memory budget: model {layout.model}: {python_message}" in str(caught.value)
    else:
        render(_values(layout, enforce=True))


def test_120b_tp1_on_a_40gb_gpu_fails_install_saying_why_and_what_fits(chart: Any) -> None:
    layout = Layout("gpt-oss-120b", "A100-40GB", 1, max_model_len=32768)
    with pytest.raises(helm.HelmError) as caught:
        chart.render(_values(layout, enforce=True), name="oss", namespace="serving")
    message = str(caught.value)
    assert "gpt-oss-120b on A100-40GB TP1 does not fit" in message
    assert "weights need 64.3 GiB per GPU" in message
    assert "layouts that fit: TP4" in message
    with pytest.raises(BudgetError, match="layouts that fit: TP4"):
        check(layout, gpus_per_node=GPUS_PER_NODE)


def test_tp_larger_than_a_node_is_refused(chart: Any) -> None:
    layout = Layout("gpt-oss-120b", "H100-80GB", 4, max_model_len=32768)
    values = _values(layout, enforce=True)
    values["ray"]["workerGroups"][0]["gpusPerPod"] = 2
    with pytest.raises(helm.HelmError, match="needs more GPUs than one node has"):
        chart.render(values, name="oss", namespace="serving")


def test_model_on_a_gpu_type_without_worker_group_is_refused(chart: Any) -> None:
    values = _values(Layout("gpt-oss-20b", "H100-80GB", 1, max_model_len=32768), enforce=True)
    values["ray"]["workerGroups"][0]["gpuType"] = "H200-141GB"
    with pytest.raises(helm.HelmError, match=r"no entry of ray\.workerGroups has gpuType H100-80GB"):
        chart.render(values, name="oss", namespace="serving")


EXPECTED_LINE = re.compile(
    r"^#\s+(?P<model>[\w.-]+): KV room (?P<gib>[\d.]+) GiB per GPU, (?P<tokens>\d+) tokens, "
    r"max concurrency (?P<conc>\d+) per engine at max_model_len (?P<len>\d+)$"
)


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_profile_documents_its_real_budget(
    render: Callable[[dict[str, Any]], Rendered], profile: Any
) -> None:
    text = profile.read_text(encoding="utf-8")
    documented = {m["model"]: m for m in (EXPECTED_LINE.match(line) for line in text.splitlines()) if m}
    values = yaml.safe_load(text)
    assert set(documented) == {m["name"] for m in values["config"]["models"]}, (
        "every model documents its budget"
    )
    for result in _chart_budget(render(values)):
        line = documented[result["model"]]
        assert result["fits"] is True
        assert int(line["tokens"]) == result["kv_tokens"]
        assert int(line["conc"]) == result["max_concurrency"]
        assert int(line["len"]) == result["max_model_len"]
        tenths = result["kv_mib"] * 10 // 1024
        assert line["gib"] == f"{tenths // 10}.{tenths % 10}"


def test_minimum_replicas_must_fit_the_worker_groups(chart: Any) -> None:
    values = yaml.safe_load(
        (CHART_DIR / "profiles" / "gpt-oss-120b-expert-parallel.yaml").read_text(encoding="utf-8")
    )
    values["ray"]["workerGroups"][0]["maxReplicas"] = 1
    with pytest.raises(helm.HelmError) as caught:
        chart.render(values, name="oss", namespace="serving")
    assert "the models on H100-80GB need 16 GPUs at their min_replicas" in str(caught.value)
    assert "reach only 8 at maxReplicas" in str(caught.value)


def test_something_must_stay_up_to_run_the_gateway(chart: Any) -> None:
    values = yaml.safe_load((CHART_DIR / "profiles" / "both-models.yaml").read_text(encoding="utf-8"))
    values["ray"]["workerGroups"][0]["minReplicas"] = 0
    values["config"]["models"][0]["topology"]["min_replicas"] = 0
    with pytest.raises(helm.HelmError, match="nothing could run the gateway"):
        chart.render(values, name="oss", namespace="serving")
