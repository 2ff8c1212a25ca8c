"""``oss-serve preflight``: will this chart install work on the current cluster?

Reads the cluster through a :class:`~serving.cluster.kube.ClusterReader` (the current
kube context) and the chart values the release would use (the chart's values.yaml,
then each ``-f`` file, merged as Helm merges them), and checks:

* the KubeRay operator's CRDs (RayService, RayCluster) are installed;
* the KubeRay operator runs where the network policy admits it (its pod labels, and
  its namespace when the policy names one);
* every GPU worker group has nodes that fit one pod: matching nodeSelector (with
  ``ray.gpuNodeSelector``), tolerated taints, enough allocatable ``nvidia.com/gpu``, CPU
  and memory, the configured GPU model;
* every model's layout fits its GPUs (the same budget check as the chart's);
* the Secrets the values reference exist and hold the expected keys;
* the weight cache can be provisioned: a per-pod volume needs a (default) storage class,
  a shared cache a ReadWriteMany class (or a bound existing claim), node disk enough
  ephemeral storage; the bundled Redis's volume a (default) storage class (EKS clusters
  created at 1.30 or later have no default one: an error naming clouds/eks.yaml's gp3);
* the Prometheus operator's (and KEDA's) CRDs when monitoring (or KEDA) is on.

Each check gives a :class:`Finding` (ok, warning or error); the command exits 1 when
any is an error. Every error says what to change.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from serving.cluster.kube import ClusterReader
from serving.config import ConfigError, parse_config
from serving.engine.budget import GPUS, BudgetError, check_model

__all__ = ["Finding", "load_values", "merge_values", "parse_set_values", "run_preflight"]

JSON = dict[str, Any]
Level = Literal["ok", "warning", "error"]

KUBERAY_CRDS = ("rayservices.ray.io", "rayclusters.ray.io")
MONITORING_CRDS = {
    "serviceMonitor": "servicemonitors.monitoring.coreos.com",
    "podMonitor": "podmonitors.monitoring.coreos.com",
    "prometheusRule": "prometheusrules.monitoring.coreos.com",
}
KEDA_CRD = "scaledobjects.keda.sh"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
#: Provisioners known to offer ReadWriteMany volumes (the weight cache is shared).
RWX_PROVISIONERS = (
    "efs.csi.aws.com",
    "filestore.csi.storage.gke.io",
    "file.csi.azure.com",
    "kubernetes.io/azure-file",
    "cephfs.csi.ceph.com",
    "nfs.csi.k8s.io",
    "cluster.local/nfs-subdir-external-provisioner",
    "csi.trident.netapp.io",
    "fsx.csi.aws.com",
    "lustre.csi.oracle.com",
    "csi.weka.io",
)
DEFAULT_SC_ANNOTATIONS = (
    "storageclass.kubernetes.io/is-default-class",
    "storageclass.beta.kubernetes.io/is-default-class",
)
#: Block-storage provisioners of EKS (EBS): clusters created at 1.30 or later have no
#: default class (gp2 is no longer marked default), so clouds/eks.yaml names gp3.
EBS_PROVISIONERS = ("ebs.csi.aws.com", "kubernetes.io/aws-ebs")
#: The StorageClass clouds/eks.yaml names, as the chart ships it.
EKS_GP3_CLASS = "helm/oss-serving/clouds/storageclass/eks-gp3.yaml"


@dataclass(frozen=True)
class Finding:
    """The outcome of one check."""

    check: str
    level: Level
    message: str


def merge_values(base: JSON, override: JSON) -> JSON:
    """Helm's merge of values: maps merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set_scalar(text: str) -> Any:
    """A --set value typed as Helm types it: true/false, null, integers, else a string."""
    if text in ("true", "false"):
        return text == "true"
    if text == "null":
        return None
    if text.lstrip("-").isdigit() and not (len(text.lstrip("-")) > 1 and text.lstrip("-").startswith("0")):
        return int(text)
    return text


def parse_set_values(items: Sequence[str]) -> JSON:
    """``helm --set`` items (``a.b.c=value``; no lists or escaped dots) as nested values."""
    out: JSON = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a mapping")
        node[leaf] = _set_scalar(value)
    return out


def load_values(chart_dir: Path, values_files: Sequence[Path] = ()) -> JSON:
    """The chart's values.yaml with each file merged over it, in order."""
    values: JSON = {}
    for path in [chart_dir / "values.yaml", *values_files]:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        values = merge_values(values, data)
    return values


def _tolerates(tolerations: list[JSON], taint: JSON) -> bool:
    for tol in tolerations:
        if tol.get("effect") and tol["effect"] != taint.get("effect"):
            continue
        if tol.get("operator") == "Exists" and (not tol.get("key") or tol["key"] == taint.get("key")):
            return True
        if tol.get("key") == taint.get("key") and tol.get("value", "") == taint.get("value", ""):
            return True
    return False


def _node_gpus(node: JSON) -> int:
    raw = node.get("status", {}).get("allocatable", {}).get(GPU_RESOURCE, "0")
    try:
        return int(str(raw))
    except ValueError:
        return 0


def _describe(node: JSON) -> str:
    labels = node["metadata"].get("labels", {})
    product = labels.get(GPU_PRODUCT_LABEL, "unknown GPU")
    return f"{node['metadata']['name']} ({_node_gpus(node)} x {product})"


def _gpu_family(gpu_type: str) -> str:
    return gpu_type.split("-", 1)[0].upper()


_UNITS = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "m": 1e-3,
}


def quantity(value: Any) -> float:
    """A Kubernetes quantity ("80", "500m", "800Gi", "2043517364Ki") as a number."""
    text = str(value)
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * _UNITS[suffix]
    return float(text)


def _fits_requests(node: JSON, requests: JSON) -> str | None:
    """None when the node's allocatable CPU, memory and extra resources cover ``requests``,
    else what is short."""
    allocatable = node.get("status", {}).get("allocatable", {})
    short = []
    for resource, want in requests.items():
        have = allocatable.get(resource)
        if have is None:
            if resource in ("cpu", "memory"):
                continue
            short.append(f"no {resource}")
        elif quantity(have) < quantity(want):
            short.append(f"{resource} {want} > allocatable {have}")
    return ", ".join(short) or None


def _check_worker_group(
    group: JSON, nodes: list[JSON], extra_selector: dict[str, str], node_disk: str | None = None
) -> list[Finding]:
    """``node_disk``: the ephemeral storage a pod requests for weights on the node's disk."""
    name = f"gpu-nodes:{group['name']}"
    want = int(group["gpusPerPod"])
    selector: dict[str, str] = {**extra_selector, **(group.get("nodeSelector") or {})}
    requests: JSON = {
        **((group.get("resources") or {}).get("requests") or {}),
        **(group.get("extraResources") or {}),
        **({"ephemeral-storage": node_disk} if node_disk else {}),
    }
    tolerations: list[JSON] = group.get("tolerations") or []
    gpu_nodes = [n for n in nodes if _node_gpus(n) > 0]
    fitting = []
    too_small = []
    for node in gpu_nodes:
        labels = node["metadata"].get("labels", {})
        if any(labels.get(k) != v for k, v in selector.items()):
            continue
        if node.get("spec", {}).get("unschedulable"):
            continue
        taints = [
            t
            for t in node.get("spec", {}).get("taints", [])
            if t.get("effect") in ("NoSchedule", "NoExecute")
        ]
        if not all(_tolerates(tolerations, t) for t in taints):
            continue
        if _node_gpus(node) < want:
            continue
        short = _fits_requests(node, requests)
        if short:
            too_small.append(f"{node['metadata']['name']} ({short})")
            continue
        fitting.append(node)
    findings: list[Finding] = []
    need = f"{want} allocatable {GPU_RESOURCE}" + (f", labels {selector}" if selector else "")
    if not fitting and too_small:
        findings.append(
            Finding(
                name,
                "error",
                f"GPU nodes match worker group {group['name']!r} but cannot hold its pod: "
                + "; ".join(too_small)
                + ": lower the group's resources.requests to fit the nodes' allocatable",
            )
        )
        return findings
    if not fitting:
        seen = ", ".join(_describe(n) for n in gpu_nodes) or "no node has GPUs"
        findings.append(
            Finding(
                name, "error", f"no node fits a pod of worker group {group['name']!r} (needs {need}); {seen}"
            )
        )
        return findings
    minimum, maximum = int(group.get("minReplicas", 0)), int(group.get("maxReplicas", 1))
    if len(fitting) < minimum:
        findings.append(
            Finding(
                name,
                "error",
                f"{len(fitting)} node(s) fit worker group {group['name']!r} but minReplicas is {minimum}: "
                + ", ".join(_describe(n) for n in fitting),
            )
        )
    elif len(fitting) < maximum:
        findings.append(
            Finding(
                name,
                "warning",
                f"{len(fitting)} node(s) fit worker group {group['name']!r}, maxReplicas is {maximum}: "
                "scaling beyond that needs the cluster autoscaler to add GPU nodes",
            )
        )
    else:
        findings.append(
            Finding(name, "ok", f"{len(fitting)} node(s) fit worker group {group['name']!r} ({need})")
        )
    family = _gpu_family(str(group["gpuType"]))
    products = {n["metadata"].get("labels", {}).get(GPU_PRODUCT_LABEL, "") for n in fitting}
    wrong = sorted(p for p in products if p and family not in p.upper())
    if wrong:
        findings.append(
            Finding(
                f"gpu-type:{group['name']}",
                "error",
                f"worker group {group['name']!r} declares gpuType {group['gpuType']} but fitting nodes have "
                f"{', '.join(wrong)}: set gpuType (and the models' topology.gpu_type) to the real GPU, or a "
                "nodeSelector that picks the right nodes (ray.gpuNodeSelector; per-cloud examples in "
                "the chart's clouds/)",
            )
        )
    spec = GPUS.get(str(group["gpuType"]))
    if spec is not None:
        small = []
        for node in fitting:
            memory = node["metadata"].get("labels", {}).get(GPU_MEMORY_LABEL)
            if memory and memory.isdigit() and int(memory) < spec.memory_mib * 95 // 100:
                small.append(f"{node['metadata']['name']} ({memory} MiB)")
        if small:
            findings.append(
                Finding(
                    f"gpu-memory:{group['name']}",
                    "error",
                    f"gpuType {group['gpuType']} assumes {spec.memory_mib} MiB per GPU; nodes report less: "
                    + ", ".join(small),
                )
            )
    return findings


def _check_budget(values: JSON) -> list[Finding]:
    findings = []
    try:
        config = parse_config(values.get("config"), origin="values config")
    except ConfigError as exc:
        return [Finding("config", "error", str(exc))]
    groups = values.get("ray", {}).get("workerGroups", [])
    for model in config.models:
        gpu_type = model.topology.gpu_type
        per_node = max((int(g["gpusPerPod"]) for g in groups if g.get("gpuType") == gpu_type), default=0)
        name = f"gpu-budget:{model.name}"
        if gpu_type is not None and per_node == 0:
            findings.append(
                Finding(
                    name, "error", f"topology.gpu_type is {gpu_type} but no worker group has that gpuType"
                )
            )
            continue
        try:
            report = check_model(model, gpus_per_node=per_node or None)
        except BudgetError as exc:
            findings.append(Finding(name, "error", str(exc)))
            continue
        if report is None:
            findings.append(
                Finding(name, "warning", "not checked (no topology.gpu_type, or not a gpt-oss model)")
            )
        else:
            findings.append(Finding(name, "ok", report.summary()))
    return findings


def _secret_refs(values: JSON) -> list[tuple[str, str, str]]:
    """(purpose, secret name, key) of every existing Secret the values reference."""
    secrets = values.get("secrets", {})
    refs = []
    for purpose in ("apiKeys", "huggingface", "upstream"):
        entry = secrets.get(purpose, {})
        if entry.get("existingSecret"):
            refs.append((purpose, entry["existingSecret"], entry["key"]))
    api_keys = secrets.get("apiKeys", {})
    if api_keys.get("existingSecret"):
        # The helm test pod authenticates with this key of the same Secret.
        refs.append(("apiKeys (helm test)", api_keys["existingSecret"], "admin-api-key"))
    redis = values.get("redis", {})
    if redis.get("mode") == "external" and redis.get("external", {}).get("existingSecret"):
        refs.append(("redis", redis["external"]["existingSecret"], redis["external"]["passwordKey"]))
    elif redis.get("mode", "bundled") == "bundled" and secrets.get("redis", {}).get("existingSecret"):
        refs.append(("redis", secrets["redis"]["existingSecret"], secrets["redis"]["key"]))
    s3 = secrets.get("s3", {})
    if s3.get("existingSecret"):
        for field in ("accessKeyIdKey", "secretAccessKeyKey", "sessionTokenKey"):
            if s3.get(field):
                refs.append(("s3", s3["existingSecret"], s3[field]))
    return refs


def _check_secrets(reader: ClusterReader, values: JSON, namespace: str) -> list[Finding]:
    findings = []
    for purpose, name, key in _secret_refs(values):
        check = f"secret:{name}"
        secret = reader.get_secret(namespace, name)
        if secret is None:
            findings.append(
                Finding(
                    check, "error", f"Secret {namespace}/{name} ({purpose}) does not exist: create it first"
                )
            )
        elif key not in (secret.get("data") or {}) and key not in (secret.get("stringData") or {}):
            present = ", ".join(sorted((secret.get("data") or {}).keys())) or "none"
            findings.append(
                Finding(
                    check,
                    "error",
                    f"Secret {namespace}/{name} ({purpose}) has no key {key!r} (keys: {present})",
                )
            )
        else:
            findings.append(Finding(check, "ok", f"Secret {namespace}/{name} has {key!r}"))
    return findings


def _rwx_classes(classes: list[JSON]) -> list[str]:
    return sorted(
        sc["metadata"]["name"] for sc in classes if str(sc.get("provisioner", "")) in RWX_PROVISIONERS
    )


def _default_class(classes: list[JSON]) -> JSON | None:
    for sc in classes:
        if any(sc["metadata"].get("annotations", {}).get(a) == "true" for a in DEFAULT_SC_ANNOTATIONS):
            return sc
    return None


def _check_storage(reader: ClusterReader, values: JSON, namespace: str) -> list[Finding]:
    cache = values.get("weights", {}).get("cache", {})
    if not cache.get("enabled"):
        return [Finding("weights-cache", "ok", "weight cache off: every worker downloads the weights itself")]
    kind = cache.get("type", "volume")
    size = str(cache.get("size", ""))
    if kind == "node":
        return [
            Finding(
                "weights-cache",
                "ok",
                f"weights on each node's disk ({size} of ephemeral storage per pod, checked with the pod's "
                "requests)",
            )
        ]
    if kind == "host":
        return [
            Finding(
                "weights-cache",
                "warning",
                f"weights staged by hand at {cache.get('hostPath', '')} on every GPU node (a hostPath "
                "volume): preflight cannot see the nodes' disks; a pod on a node without the folder does "
                "not start, and check-weights names a missing model folder. The namespace's Pod Security "
                "level must admit hostPath volumes (privileged)",
            )
        ]
    access = cache.get("accessMode", "ReadWriteMany")
    if kind == "shared" and cache.get("existingClaim"):
        claim = reader.get_pvc(namespace, cache["existingClaim"])
        if claim is None:
            return [
                Finding(
                    "weights-cache",
                    "error",
                    f"PVC {namespace}/{cache['existingClaim']} does not exist: create it (with the weights "
                    "staged when weights.download.enabled is false) or unset weights.cache.existingClaim",
                )
            ]
        phase = claim.get("status", {}).get("phase")
        modes = claim.get("spec", {}).get("accessModes", [])
        if access not in modes:
            return [
                Finding(
                    "weights-cache",
                    "error",
                    f"PVC {cache['existingClaim']} has access modes {modes}, not {access}: set "
                    f"weights.cache.accessMode to one of {modes} (ReadOnlyMany or ReadWriteMany for "
                    "several workers)",
                )
            ]
        level: Level = "ok" if phase == "Bound" else "warning"
        return [Finding("weights-cache", level, f"PVC {cache['existingClaim']} is {phase}")]
    classes = reader.list_storage_classes()
    by_name = {sc["metadata"]["name"]: sc for sc in classes}
    rwx = _rwx_classes(classes)
    wanted = cache.get("storageClassName") or ""
    if wanted and wanted not in by_name:
        return [_missing_class("weights-cache", wanted, "weights.cache", classes)]
    if kind == "shared":
        fix = (
            f"set weights.cache.storageClassName to a ReadWriteMany class ({', '.join(rwx)})"
            if rwx
            else "install a ReadWriteMany class (EFS, Filestore, Azure Files, NFS, CephFS)"
        ) + ", or use weights.cache.type volume (a ReadWriteOnce volume per pod, any class)"
        if not wanted:
            return [
                Finding(
                    "weights-cache",
                    "error",
                    "a shared weight cache needs weights.cache.storageClassName (default classes are "
                    f"block storage, ReadWriteOnce only): {fix}",
                )
            ]
        provisioner = str(by_name[wanted].get("provisioner", ""))
        if access == "ReadWriteMany" and provisioner not in RWX_PROVISIONERS:
            return [
                Finding(
                    "weights-cache",
                    "error",
                    f"StorageClass {wanted} ({provisioner}) offers no ReadWriteMany volumes, so the shared "
                    f"cache, the download Job and every GPU worker would stay Pending: {fix}",
                )
            ]
        return [Finding("weights-cache", "ok", f"StorageClass {wanted} ({provisioner}) for the shared cache")]
    # volume: one ReadWriteOnce volume per worker pod; any class binds it.
    chosen = by_name[wanted] if wanted else _default_class(classes)
    if chosen is None:
        return [_no_default_class("weights-cache", "the per-pod weight volumes", "weights.cache", classes)]
    return [
        Finding(
            "weights-cache",
            "ok",
            f"StorageClass {chosen['metadata']['name']} ({chosen.get('provisioner', '')}): a ReadWriteOnce "
            f"volume of {size} per worker pod",
        )
    ]


def _on_eks(classes: list[JSON]) -> bool:
    return any(str(sc.get("provisioner", "")) in EBS_PROVISIONERS for sc in classes)


def _no_default_class(check: str, what: str, key: str, classes: list[JSON]) -> Finding:
    """The error for a claim of the default class on a cluster that has none, with the fix."""
    names = ", ".join(sorted(sc["metadata"]["name"] for sc in classes)) or "none"
    eks = (
        " (EKS clusters created at 1.30 or later have none: gp2 is no longer marked default; "
        f"-f helm/oss-serving/clouds/eks.yaml names gp3: create it with kubectl apply -f {EKS_GP3_CLASS})"
        if _on_eks(classes)
        else ""
    )
    return Finding(
        check,
        "error",
        f"no default StorageClass for {what}{eks}: set {key}.storageClassName to a block-storage class "
        f"(classes: {names}), or mark one default (kubectl annotate storageclass <name> "
        "storageclass.kubernetes.io/is-default-class=true)",
    )


def _missing_class(check: str, wanted: str, key: str, classes: list[JSON]) -> Finding:
    names = ", ".join(sorted(sc["metadata"]["name"] for sc in classes)) or "none"
    create = (
        f"create it (kubectl apply -f {EKS_GP3_CLASS}: provisioner ebs.csi.aws.com, type gp3, needs the "
        "EBS CSI driver add-on)"
        if wanted == "gp3" and _on_eks(classes)
        else "create it"
    )
    return Finding(
        check,
        "error",
        f"StorageClass {wanted!r} does not exist (classes: {names}): {create}, or set {key}.storageClassName "
        "to one of them",
    )


def _check_redis_storage(reader: ClusterReader, values: JSON) -> list[Finding]:
    """The bundled Redis's data volume: a named class must exist, else a default one."""
    redis = values.get("redis", {})
    if redis.get("mode", "bundled") != "bundled":
        return []
    classes = reader.list_storage_classes()
    wanted = str(redis.get("bundled", {}).get("persistence", {}).get("storageClassName") or "")
    key = "redis.bundled.persistence"
    if wanted:
        if wanted not in {sc["metadata"]["name"] for sc in classes}:
            return [_missing_class("redis-storage", wanted, key, classes)]
        return [Finding("redis-storage", "ok", f"StorageClass {wanted} for the bundled Redis")]
    chosen = _default_class(classes)
    if chosen is None:
        return [_no_default_class("redis-storage", "the bundled Redis's volume", key, classes)]
    return [Finding("redis-storage", "ok", f"default StorageClass {chosen['metadata']['name']} for Redis")]


def _check_operator(reader: ClusterReader, values: JSON) -> list[Finding]:
    policy = values.get("networkPolicy", {})
    if not policy.get("enabled"):
        return [Finding("kuberay-operator", "ok", "network policy off: the operator reaches the head")]
    operator = policy.get("kuberayOperator", {})
    labels: dict[str, str] = operator.get("podLabels") or {}
    namespace = operator.get("namespace") or ""
    selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    pods = reader.list_pods_all_namespaces(selector)
    if not pods:
        return [
            Finding(
                "kuberay-operator",
                "error",
                f"no pod with labels {selector} in any namespace, so the network policy admits no KubeRay "
                "operator and the Serve application is never submitted: install the kuberay-operator chart, "
                "or set networkPolicy.kuberayOperator.podLabels to its pods' labels",
            )
        ]
    where = sorted({p["metadata"].get("namespace", "") for p in pods})
    if namespace and namespace not in where:
        return [
            Finding(
                "kuberay-operator",
                "error",
                f"the KubeRay operator runs in namespace {', '.join(where)}, but the network policy admits "
                f"it only from {namespace}: set networkPolicy.kuberayOperator.namespace to {where[0]} "
                "(or empty: any namespace)",
            )
        ]
    return [
        Finding(
            "kuberay-operator",
            "ok",
            f"KubeRay operator in namespace {', '.join(where)} is admitted by the network policy "
            f"({selector})",
        )
    ]


def run_preflight(reader: ClusterReader, values: JSON, namespace: str) -> list[Finding]:
    """Every check, in a stable order."""
    findings: list[Finding] = []
    crds = reader.crd_names()
    missing = [c for c in KUBERAY_CRDS if c not in crds]
    if missing:
        findings.append(
            Finding(
                "kuberay",
                "error",
                f"KubeRay CRDs missing ({', '.join(missing)}): "
                "install the kuberay-operator chart (1.5.0 or newer)",
            )
        )
    else:
        findings.append(Finding("kuberay", "ok", "KubeRay CRDs installed (RayService, RayCluster)"))

    findings += _check_operator(reader, values)

    nodes = reader.list_nodes()
    extra_selector: dict[str, str] = values.get("ray", {}).get("gpuNodeSelector") or {}
    cache = values.get("weights", {}).get("cache", {})
    node_disk = None
    if cache.get("enabled") and cache.get("type") == "node":
        # As the chart requests it: the weights plus the 20Gi /tmp.
        node_disk = f"{int(quantity(cache.get('size', '0')) // 2**30) + 20}Gi"
    for group in values.get("ray", {}).get("workerGroups", []):
        findings += _check_worker_group(group, nodes, extra_selector, node_disk)
    findings += _check_budget(values)
    findings += _check_secrets(reader, values, namespace)
    findings += _check_storage(reader, values, namespace)
    findings += _check_redis_storage(reader, values)

    monitoring = values.get("monitoring", {})
    wanted = [crd for key, crd in MONITORING_CRDS.items() if monitoring.get(key, {}).get("enabled")]
    if values.get("keda", {}).get("enabled"):
        wanted.append(KEDA_CRD)
    if wanted:
        absent = [c for c in wanted if c not in crds]
        if absent:
            findings.append(
                Finding(
                    "monitoring",
                    "error",
                    f"monitoring/autoscaling is on but these CRDs are missing: {', '.join(absent)} "
                    "(install the Prometheus operator / KEDA, or turn those values off)",
                )
            )
        else:
            findings.append(Finding("monitoring", "ok", f"CRDs present: {', '.join(wanted)}"))
    return findings
