"""Every profile and scenario renders, lints clean and validates: Kubernetes 1.29-1.33
schemas for built-in kinds, the CRDs for custom resources, our configuration object for
the rendered configuration, Ray's own schema for the Serve config."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from serving.config import parse_config

from .conftest import CHART_DIR, CRD_DIR, NAMESPACE, RELEASE, SCENARIO_IDS, SCENARIOS, Rendered, helm

KUBE_VERSIONS = ["1.29", "1.30", "1.31", "1.32", "1.33"]
BUILTIN_GROUPS = {"v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1"}
CRD_FILES = {
    ("ray.io", "RayService"): "ray.io_rayservices.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
    ("keda.sh", "ScaledObject"): "keda.sh_scaledobjects.yaml",
}

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")


def _strict(schema: Any) -> Any:
    """A CRD schema that rejects unknown fields (the API server would prune them silently)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd_validator(group: str, kind: str, version: str) -> jsonschema.Draft7Validator:
    assert CRD_DIR is not None
    crd = yaml.safe_load((CRD_DIR / CRD_FILES[(group, kind)]).read_text(encoding="utf-8"))
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return jsonschema.Draft7Validator(_strict(entry["schema"]["openAPIV3Schema"]))
    raise AssertionError(f"{kind} {group}/{version} is not served by the CRD")


def _all(rendered: dict[str, Rendered]) -> list[tuple[str, Rendered]]:
    return [(name, rendered[name]) for name in SCENARIO_IDS]


@pytest.mark.parametrize("scenario", SCENARIO_IDS)
def test_lint_is_clean(scenario: str) -> None:
    values = dict(SCENARIOS)[scenario]
    report = helm.lint(str(CHART_DIR), values, strict=True, namespace=NAMESPACE, kube_version="v1.31.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    # "icon is recommended" is informational (severity 1); everything else must be clean.
    assert not report["errors"], report["errors"]
    assert not problems, problems


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_builtin_objects_validate_against_kubernetes(
    rendered_scenarios: dict[str, Rendered], version: str
) -> None:
    failures = []
    checked = 0
    for name, rendered in _all(rendered_scenarios):
        for obj in rendered.objects:
            if obj["apiVersion"] not in BUILTIN_GROUPS:
                continue
            checked += 1
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                failures.append(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert checked > 50
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(CRD_DIR is None, reason="../shared/crds is not checked out next to the repository")
def test_custom_resources_validate_against_crds(rendered_scenarios: dict[str, Rendered]) -> None:
    seen = set()
    failures = []
    for name, rendered in _all(rendered_scenarios):
        for obj in rendered.objects:
            if obj["apiVersion"] in BUILTIN_GROUPS:
                continue
            group, version = obj["apiVersion"].split("/")
            seen.add(obj["kind"])
            validator = crd_validator(group, obj["kind"], version)
            for error in validator.iter_errors(obj):
                path = ".".join(str(p) for p in error.absolute_path)
                failures.append(f"{name}: {obj['kind']}: {path}: {error.message[:300]}")
    assert seen == {"RayService", "PodMonitor", "PrometheusRule", "ScaledObject"}
    assert not failures, "\n".join(failures)


def test_strict_crd_validation_catches_a_misspelt_field(rendered_scenarios: dict[str, Rendered]) -> None:
    if CRD_DIR is None:
        pytest.skip("../shared/crds is not checked out next to the repository")
    rayservice = copy.deepcopy(rendered_scenarios["default"].one("RayService"))
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    errors = list(crd_validator("ray.io", "RayService", "v1").iter_errors(rayservice))
    assert any("maxReplica" in e.message for e in errors)


def _serve_config(rendered: Rendered) -> dict[str, Any]:
    serve = yaml.safe_load(rendered.one("RayService")["spec"]["serveConfigV2"])
    assert isinstance(serve, dict)
    return serve


def _config_mounts(pod_spec: dict[str, Any], config_map: str) -> set[str]:
    volumes = {v["name"] for v in pod_spec["volumes"] if v.get("configMap", {}).get("name") == config_map}
    return {
        m["mountPath"]
        for c in pod_spec["containers"]
        for m in c.get("volumeMounts", [])
        if m["name"] in volumes and "subPath" not in m
    }


@pytest.mark.parametrize("scenario", SCENARIO_IDS)
def test_serve_config_carries_our_configuration_inline(
    rendered_scenarios: dict[str, Rendered], scenario: str
) -> None:
    rendered = rendered_scenarios[scenario]
    serve = _serve_config(rendered)
    (app,) = serve["applications"]
    assert app["import_path"] == "serving.serve_app:build_app"
    assert set(app["args"]) == {"config"}
    cfg = parse_config(app["args"]["config"], origin=f"{scenario} serveConfigV2")
    assert cfg.gateway.host == "0.0.0.0"
    assert cfg.gateway.port == serve["http_options"]["port"]
    assert cfg.metrics.ray_export is True
    # The ConfigMap holds the same configuration, mounted as a directory (which the
    # kubelet keeps current) for `oss-serve` inside the pods.
    cm = rendered.one("ConfigMap", "-config")
    assert yaml.safe_load(cm["data"]["config.yaml"]) == app["args"]["config"]
    spec = rendered.one("RayService")["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in spec["workerGroupSpecs"]
    ]
    for pod in pods:
        assert _config_mounts(pod, cm["metadata"]["name"]) == {"/etc/oss-serving/config"}
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["OSS_SERVING_CONFIG"] == "/etc/oss-serving/config/config.yaml"


def test_serve_config_matches_ray_serve_schema(rendered_scenarios: dict[str, Rendered]) -> None:
    schema = pytest.importorskip("ray.serve.schema", reason="ray[serve] is not installed")
    for name in SCENARIO_IDS:
        schema.ServeDeploySchema.model_validate(_serve_config(rendered_scenarios[name]))


def test_profiles_configure_gpu_engines(rendered_scenarios: dict[str, Rendered]) -> None:
    for name in SCENARIO_IDS:
        if not name.startswith("profile:"):
            continue
        rendered = rendered_scenarios[name]
        cfg = parse_config(yaml.safe_load(rendered.one("ConfigMap", "-config")["data"]["config.yaml"]))
        for model in cfg.models:
            assert model.topology.accelerator == "gpu", (name, model.name)
            assert model.topology.gpu_type, (name, model.name)


def _pod_specs(rendered: Rendered) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for obj in rendered.objects:
        kind = obj["kind"]
        if kind == "Pod":
            out.append((f"Pod/{obj['metadata']['name']}", obj["spec"]))
        elif kind in {"StatefulSet", "Job"}:
            out.append((f"{kind}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]))
        elif kind == "RayService":
            rc = obj["spec"]["rayClusterConfig"]
            out.append(("ray-head", rc["headGroupSpec"]["template"]["spec"]))
            out += [(f"ray-worker/{g['groupName']}", g["template"]["spec"]) for g in rc["workerGroupSpecs"]]
    return out


@pytest.mark.parametrize("scenario", SCENARIO_IDS)
def test_every_container_is_bounded_pinned_and_unprivileged(
    rendered_scenarios: dict[str, Rendered], scenario: str
) -> None:
    rendered = rendered_scenarios[scenario]
    for where, spec in _pod_specs(rendered):
        for container in spec.get("initContainers", []) + spec["containers"]:
            label = f"{where}/{container['name']}"
            resources = container.get("resources", {})
            assert resources.get("requests"), f"{label}: requests"
            assert resources.get("limits"), f"{label}: limits"
            assert "memory" in resources["limits"], f"{label}: memory limit"
            image = container["image"]
            assert "@sha256:" in image or (
                ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")
            ), label
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, label
            assert sc["capabilities"]["drop"] == ["ALL"], label
            if sc["capabilities"].get("add"):
                # An added capability takes effect only for root (no ambient capabilities
                # for non-root processes): the only case where a container runs as root.
                assert (sc["runAsUser"], sc["runAsNonRoot"]) == (0, False), label
            else:
                assert sc["runAsNonRoot"] is True, label
    rayservice = rendered.one("RayService")
    autoscaler = rayservice["spec"]["rayClusterConfig"].get("autoscalerOptions")
    if autoscaler:
        assert autoscaler["resources"]["limits"]
        assert autoscaler["securityContext"]["allowPrivilegeEscalation"] is False


SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}


def test_selectors_use_only_selector_labels(rendered_scenarios: dict[str, Rendered]) -> None:
    rendered = rendered_scenarios["ci:monitoring-values"]
    selectors = []
    for obj in rendered.objects:
        spec = obj.get("spec", {})
        if obj["kind"] in {"StatefulSet", "PodDisruptionBudget"}:
            selectors.append((obj["kind"], spec["selector"]["matchLabels"]))
        elif obj["kind"] == "Service":
            selectors.append((obj["kind"], spec["selector"]))
        elif obj["kind"] in {"NetworkPolicy", "ServiceMonitor", "PodMonitor"}:
            sel = spec["podSelector"] if obj["kind"] == "NetworkPolicy" else spec["selector"]
            selectors.append((obj["kind"], sel["matchLabels"]))
    assert len(selectors) >= 5
    for kind, labels in selectors:
        assert set(labels) <= SELECTOR_KEYS, (kind, labels)
        assert labels["app.kubernetes.io/instance"] == RELEASE


def test_extension_points_reach_every_ray_pod(render: Callable[[dict[str, Any]], Rendered]) -> None:
    values: dict[str, Any] = {
        "ray": {
            "extraEnv": [{"name": "A", "value": "1"}],
            "extraVolumes": [{"name": "certs", "secret": {"secretName": "corp-ca"}}],
            "extraVolumeMounts": [{"name": "certs", "mountPath": "/etc/corp-ca", "readOnly": True}],
            "podAnnotations": {"example.com/team": "ml"},
        }
    }
    rc = render(values).one("RayService")["spec"]["rayClusterConfig"]
    templates = [rc["headGroupSpec"]["template"]] + [g["template"] for g in rc["workerGroupSpecs"]]
    for template in templates:
        assert template["metadata"]["annotations"] == {"example.com/team": "ml"}
        pod = template["spec"]
        (container,) = pod["containers"]
        assert {"name": "A", "value": "1"} in container["env"]
        assert {"name": "certs", "secret": {"secretName": "corp-ca"}} in pod["volumes"]
        assert {"name": "certs", "mountPath": "/etc/corp-ca", "readOnly": True} in container["volumeMounts"]


def test_high_throughput_mode_reaches_every_ray_container(
    render: Callable[[dict[str, Any]], Rendered],
) -> None:
    def modes(values: dict[str, Any]) -> list[dict[str, str]]:
        out = []
        for name, pod in _pod_specs(render(values)):
            if name.startswith("ray-"):
                env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
                out.append({k: v for k, v in env.items() if k.startswith("RAY_SERVE_")})
        return out

    on = modes({})
    assert len(on) >= 2  # head and every worker group
    assert all(m == {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"} for m in on)
    assert all(m == {} for m in modes({"ray": {"serve": {"highThroughput": False}}}))


def _default_config() -> dict[str, Any]:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))
    return dict(values["config"])


def test_gpu_scheduling_settings_reach_the_worker_pods(render: Callable[[dict[str, Any]], Rendered]) -> None:
    values = yaml.safe_load((CHART_DIR / "profiles" / "gpt-oss-120b-h100.yaml").read_text(encoding="utf-8"))
    values["ray"]["gpuNodeSelector"] = {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    values["ray"]["workerGroups"][0]["nodeSelector"] = {"pool": "gpu"}
    values["ray"]["priorityClassName"] = "gpu-serving"
    values["ray"]["runtimeClassName"] = "nvidia"
    values["ray"]["workerGroups"][0]["affinity"] = {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 1,
                    "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {}},
                }
            ]
        }
    }
    rendered = render(values)
    (group,) = rendered.one("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "8"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb", "pool": "gpu"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["priorityClassName"] == "gpu-serving"
    assert pod["runtimeClassName"] == "nvidia"
    assert "podAntiAffinity" in pod["affinity"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    # Start-up is sized in minutes for a large model: 1800 s in this profile.
    probe = container["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] == 1800
    head = rendered.one("RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in json.dumps(head["template"]["spec"]["containers"][0]["resources"])


def _download_targets(command: list[str]) -> dict[str, str]:
    assert command[:4] == ["python", "-m", "serving.cluster.weights", "download"], command
    return dict(arg.split("=", 1) for arg in command[4:])


def test_weights_are_fetched_into_each_pods_volume_and_handed_to_vllm(
    rendered_scenarios: dict[str, Rendered],
) -> None:
    rendered = rendered_scenarios["profile:both-models"]
    cfg = parse_config(yaml.safe_load(rendered.one("ConfigMap", "-config")["data"]["config.yaml"]))
    sources = {m.name: m.source for m in cfg.models}
    assert sources == {
        "gpt-oss-120b": "/models/openai--gpt-oss-120b",
        "gpt-oss-20b": "/models/openai--gpt-oss-20b",
    }
    assert not rendered.of_kind("Job")
    assert not rendered.of_kind("PersistentVolumeClaim")
    (group,) = rendered.one("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    (fetch,) = pod["initContainers"]
    assert fetch["name"] == "fetch-weights"
    assert _download_targets(fetch["command"]) == {
        "openai/gpt-oss-120b": sources["gpt-oss-120b"],
        "openai/gpt-oss-20b": sources["gpt-oss-20b"],
    }
    assert {"name": "weights", "mountPath": "/models", "readOnly": False} in fetch["volumeMounts"]
    weights = next(v for v in pod["volumes"] if v["name"] == "weights")
    claim = weights["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["accessModes"] == ["ReadWriteOnce"]
    assert claim["resources"]["requests"]["storage"] == "100Gi"
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "weights")
    assert mount == {"name": "weights", "mountPath": "/models", "readOnly": True}


def test_shared_cache_is_filled_once_by_a_job(rendered_scenarios: dict[str, Rendered]) -> None:
    rendered = rendered_scenarios["ci:shared-cache-values"]
    (job,) = rendered.of_kind("Job")
    assert _download_targets(job["spec"]["template"]["spec"]["containers"][0]["command"]) == {
        "openai/gpt-oss-20b": "/models/openai--gpt-oss-20b"
    }
    claim = rendered.one("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == "efs-sc"
    (group,) = rendered.one("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    (wait,) = pod["initContainers"]
    assert wait["command"][3:] == ["wait", "/models/openai--gpt-oss-20b"]
    weights = next(v for v in pod["volumes"] if v["name"] == "weights")
    assert weights["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_node_disk_cache_requests_ephemeral_storage(rendered_scenarios: dict[str, Rendered]) -> None:
    rendered = rendered_scenarios["ci:node-disk-values"]
    (group,) = rendered.one("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    weights = next(v for v in pod["volumes"] if v["name"] == "weights")
    assert weights == {"name": "weights", "emptyDir": {"sizeLimit": "100Gi"}}
    resources = pod["containers"][0]["resources"]
    # The weights plus the 20Gi /tmp, so the scheduler picks a node with that much disk.
    assert resources["requests"]["ephemeral-storage"] == "120Gi"
    assert resources["limits"]["ephemeral-storage"] == "120Gi"


def test_a_cache_too_small_for_the_weights_fails_the_render(chart: Any) -> None:
    values = yaml.safe_load((CHART_DIR / "profiles" / "both-models.yaml").read_text(encoding="utf-8"))
    values["weights"] = {"cache": {"size": "60Gi"}}
    with pytest.raises(helm.HelmError) as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert "weights.cache.size 60Gi is too small" in str(caught.value)
    assert "gpt-oss-120b, gpt-oss-20b need about 82Gi" in str(caught.value)


def test_without_cache_sources_stay_hub_ids(rendered_scenarios: dict[str, Rendered]) -> None:
    rendered = rendered_scenarios["ci:no-cache-values"]
    cfg = parse_config(yaml.safe_load(rendered.one("ConfigMap", "-config")["data"]["config.yaml"]))
    assert [m.source for m in cfg.models] == ["openai/gpt-oss-20b"]
    assert not rendered.of_kind("Job")
    assert not rendered.of_kind("PersistentVolumeClaim")


def test_redis_is_bundled_or_external_never_both(rendered_scenarios: dict[str, Rendered]) -> None:
    bundled = rendered_scenarios["default"]
    external = rendered_scenarios["ci:external-redis-values"]
    redis_set = bundled.one("StatefulSet", "-redis")
    (container,) = redis_set["spec"]["template"]["spec"]["containers"]
    assert "--appendonly yes" in container["args"][0]
    assert redis_set["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert container["livenessProbe"]
    assert container["readinessProbe"]
    assert "--requirepass" not in container["args"][0]  # the password is read from the mounted Secret
    password = next(v for v in redis_set["spec"]["template"]["spec"]["volumes"] if v["name"] == "password")
    assert password["secret"]["secretName"] == f"{RELEASE}-oss-serving-redis"
    assert container["resources"]["limits"]["memory"] == "1Gi"
    cfg = parse_config(yaml.safe_load(bundled.one("ConfigMap", "-config")["data"]["config.yaml"]))
    assert cfg.redis.url == f"redis://{RELEASE}-oss-serving-redis:6379/0"

    assert not external.of_kind("StatefulSet")
    assert not [o for o in external.of_kind("Service") if o["metadata"]["name"].endswith("-redis")]
    cfg = parse_config(yaml.safe_load(external.one("ConfigMap", "-config")["data"]["config.yaml"]))
    assert cfg.redis.url == "rediss://redis.shared.svc:6380/2"
    env = external.one("RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "containers"
    ][0]["env"]
    password = next(e for e in env if e["name"] == "OSS_SERVING_REDIS_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"] == {"name": "shared-redis", "key": "password"}


def test_existing_secrets_are_referenced_not_created(rendered_scenarios: dict[str, Rendered]) -> None:
    rendered = rendered_scenarios["ci:external-redis-values"]
    assert not rendered.of_kind("Secret")
    env = rendered.one("RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "containers"
    ][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in env if "valueFrom" in e}
    assert refs == {
        "OSS_SERVING_REDIS_PASSWORD": "shared-redis",
        "HF_TOKEN": "hf-token",
        "OSS_SERVING_UPSTREAM_API_KEY": "upstream-openai",
        # optional entries of the existing tenants Secret
        "OSS_SERVING_OPERATOR_KEY": "oss-tenants",
        "OSS_SERVING_CACHE_SALT_SECRET": "oss-tenants",
        # the Files API's S3 store, under the names config.files.s3 gives (or the defaults)
        "AWS_ACCESS_KEY_ID": "object-store",
        "OBJECT_STORE_SECRET": "object-store",
        "AWS_SESSION_TOKEN": "object-store",
    }
    keys = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in env if "valueFrom" in e}
    assert (keys["AWS_ACCESS_KEY_ID"], keys["OBJECT_STORE_SECRET"], keys["AWS_SESSION_TOKEN"]) == (
        "access-key-id",
        "secret-access-key",
        "session-token",
    )
    cfg = parse_config(yaml.safe_load(rendered.one("ConfigMap", "-config")["data"]["config.yaml"]))
    assert (cfg.batch.enabled, cfg.files.backend, cfg.files.s3.bucket) == (True, "s3", "oss-serving-files")
    default_env = rendered_scenarios["default"].one("RayService")["spec"]["rayClusterConfig"][
        "headGroupSpec"
    ]["template"]["spec"]["containers"][0]["env"]
    assert not [e for e in default_env if e["name"].startswith("AWS_")]  # no secrets.s3: none


def test_no_secret_in_configmaps_or_notes(rendered_scenarios: dict[str, Rendered]) -> None:
    rendered = rendered_scenarios["ci:no-cache-values"]
    secret_values = []
    for secret in rendered.of_kind("Secret"):
        for value in secret.get("stringData", {}).values():
            secret_values += [
                line.strip(' "-') for line in value.splitlines() if "sk-" in line or len(value) >= 16
            ]
    assert "hf_example_not_a_real_token" in secret_values
    assert "sk-example-not-a-real-key" in secret_values
    assert any(v.startswith("sk-oss-") for v in secret_values)
    texts = [json.dumps(cm["data"]) for cm in rendered.of_kind("ConfigMap")] + [rendered.notes]
    texts.append(rendered.one("RayService")["spec"]["serveConfigV2"])
    for text in texts:
        for value in secret_values:
            if len(value) >= 16:
                assert value not in text


def test_network_policies_expose_only_the_gateway(rendered_scenarios: dict[str, Rendered]) -> None:
    rendered = rendered_scenarios["default"]
    ray = rendered.one("NetworkPolicy", "-ray")
    open_rules = [r for r in ray["spec"]["ingress"] if "from" not in r]
    assert open_rules == [{"ports": [{"port": 8000, "protocol": "TCP"}]}]
    redis = rendered.one("NetworkPolicy", "-redis")
    (rule,) = redis["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": RELEASE}}}]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]


def test_helm_test_pod_lists_every_model(rendered_scenarios: dict[str, Rendered]) -> None:
    rendered = rendered_scenarios["profile:both-models"]
    (pod,) = rendered.of_kind("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    assert f"http://{RELEASE}-oss-serving-gateway:8000/v1/models" in script
    assert '"gpt-oss-120b"' in script
    assert '"gpt-oss-20b"' in script


def test_notes_say_how_to_reach_the_endpoint_and_get_a_key(rendered_scenarios: dict[str, Rendered]) -> None:
    notes = rendered_scenarios["profile:gpt-oss-120b-h100"].notes
    assert f"port-forward svc/{RELEASE}-oss-serving-gateway 8000:8000" in notes
    assert "jsonpath='{.data.admin-api-key}'" in notes
    assert "KV room 36.0 GiB per GPU" in notes


def test_autoscaling_settings(rendered_scenarios: dict[str, Rendered]) -> None:
    rendered = rendered_scenarios["profile:both-models"]
    rc = rendered.one("RayService")["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["autoscalerOptions"]["idleTimeoutSeconds"] == 600
    (group,) = rc["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 2)
    cfg = parse_config(yaml.safe_load(rendered.one("ConfigMap", "-config")["data"]["config.yaml"]))
    small = cfg.model("gpt-oss-20b")
    assert small is not None
    assert small.topology.min_replicas == 0
    keda = rendered_scenarios["ci:monitoring-values"].one("ScaledObject")
    (trigger,) = keda["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == (
        'sum(max by (model, priority) (oss_serving_queue_depth{namespace="serving"}))'
    )
    assert keda["spec"]["scaleTargetRef"]["name"] == "batch-workers"


def test_dashboards_are_labelled_for_the_grafana_sidecar(rendered_scenarios: dict[str, Rendered]) -> None:
    rendered = rendered_scenarios["ci:monitoring-values"]
    boards = [cm for cm in rendered.of_kind("ConfigMap") if "-dashboard-" in cm["metadata"]["name"]]
    assert boards
    for cm in boards:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        for text in cm["data"].values():
            assert json.loads(text)["panels"]


def test_rendered_files_are_all_covered() -> None:
    # A new template without a scenario that renders it would escape these tests.
    templates = {p.name for p in (CHART_DIR / "templates").glob("*.yaml")}
    assert templates == {
        "configmap.yaml",
        "rayservice.yaml",
        "redis.yaml",
        "secrets.yaml",
        "weights.yaml",
        "monitoring.yaml",
        "keda.yaml",
        "pdb.yaml",
        "networkpolicy.yaml",
    }
    assert Path(CHART_DIR / "templates" / "tests" / "test-models.yaml").is_file()


def test_the_admin_key_reads_metrics_and_the_salt_secret_is_set(
    render: Callable[[dict[str, Any]], Rendered],
) -> None:
    """The chart's admin key is the operator key the gateways accept for ``/metrics`` and
    the detailed ``/health`` (it reaches them as OSS_SERVING_OPERATOR_KEY), and the
    per-tenant cache salts derive from a generated secret, not the built-in constant."""
    from serving.config import ServingConfig
    from serving.gateway.build import OPERATOR_KEY_ENV, operator_keys
    from serving.gateway.tenants import hash_key

    rendered = render({})
    secret = next(o for o in rendered.of_kind("Secret") if "admin-api-key" in o.get("stringData", {}))
    data = secret["stringData"]
    assert len(data["cache-salt-secret"]) >= 32
    rc = rendered.one("RayService")["spec"]["rayClusterConfig"]
    templates = [rc["headGroupSpec"]["template"]] + [g["template"] for g in rc["workerGroupSpecs"]]
    for template in templates:
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        for name, key in (
            (OPERATOR_KEY_ENV, "admin-api-key"),
            ("OSS_SERVING_CACHE_SALT_SECRET", "cache-salt-secret"),
        ):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], key)
    config = ServingConfig.model_validate({"models": [{"name": "m", "source": "org/m"}]})
    assert config.auth.cache_salt_secret_env == "OSS_SERVING_CACHE_SALT_SECRET"
    assert hash_key(data["admin-api-key"]) in operator_keys(config, {OPERATOR_KEY_ENV: data["admin-api-key"]})
    assert operator_keys(config, {}) == frozenset()
