"""oss-serve preflight against recorded API responses, including its failure messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from serving.cluster.cli import preflight
from serving.cluster.preflight import Finding, load_values, merge_values, run_preflight

from .recorded import RecordedReader

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "oss-serving"
PROFILES = CHART / "profiles"
CLOUDS = CHART / "clouds"


def _values(*files: str, **overrides: Any) -> dict[str, Any]:
    values = load_values(
        CHART, [(CLOUDS if f.startswith("clouds/") else PROFILES) / f.removeprefix("clouds/") for f in files]
    )
    return merge_values(values, overrides)


def _by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


def test_h100_profile_is_ready_on_a_cluster_with_two_h100_nodes() -> None:
    # As the README installs it on EKS: the profile plus the EKS file (instance type p5.48xlarge).
    values = _values("gpt-oss-120b-h100.yaml", "clouds/eks.yaml")
    findings = _by_check(run_preflight(RecordedReader(), values, "serving"))
    assert findings["kuberay"].level == "ok"
    assert findings["kuberay-operator"].level == "ok"
    assert "namespace default" in findings["kuberay-operator"].message
    # Three H100 nodes, one cordoned: two fit; maxReplicas 2.
    assert findings["gpu-nodes:h100"].level == "ok"
    assert "2 node(s) fit" in findings["gpu-nodes:h100"].message
    assert findings["gpu-budget:gpt-oss-120b"].level == "ok"
    assert "2102385 tokens" in findings["gpu-budget:gpt-oss-120b"].message
    assert findings["weights-cache"].level == "ok"
    assert "gp3 (ebs.csi.aws.com): a ReadWriteOnce volume of 80Gi per worker pod" in (
        findings["weights-cache"].message
    )
    assert not [f for f in findings.values() if f.level == "error"]


def test_without_a_gpu_selector_a_mixed_cluster_is_an_error_naming_the_fix() -> None:
    findings = _by_check(run_preflight(RecordedReader(), _values("gpt-oss-120b-h100.yaml"), "serving"))
    # The A100 node also has 8 free GPUs: an H100 pod could land there.
    assert findings["gpu-type:h100"].level == "error"
    assert "ray.gpuNodeSelector" in findings["gpu-type:h100"].message


def test_requests_larger_than_the_nodes_are_an_error() -> None:
    values = _values("gpt-oss-120b-h100.yaml", "clouds/eks.yaml")
    values["ray"]["workerGroups"][0]["resources"]["requests"]["cpu"] = "192"
    node_check = _by_check(run_preflight(RecordedReader(), values, "serving"))["gpu-nodes:h100"]
    assert node_check.level == "error"
    assert "cpu 192 > allocatable 191450m" in node_check.message
    assert "lower the group's resources.requests" in node_check.message


def test_weights_on_the_node_disk_must_fit_its_ephemeral_storage() -> None:
    values = _values("gpt-oss-120b-h100.yaml", "clouds/eks.yaml", weights={"cache": {"type": "node"}})
    findings = _by_check(run_preflight(RecordedReader(), values, "serving"))
    assert findings["gpu-nodes:h100"].level == "ok"  # 100Gi of 3.5 TiB
    assert findings["weights-cache"].level == "ok"
    values["weights"]["cache"]["size"] = "4Ti"
    node_check = _by_check(run_preflight(RecordedReader(), values, "serving"))["gpu-nodes:h100"]
    assert node_check.level == "error"
    assert "ephemeral-storage 4116Gi > allocatable 3730056408Ki" in node_check.message


def test_operator_outside_the_policys_namespace_is_an_error_with_the_fix() -> None:
    values = _values(networkPolicy={"kuberayOperator": {"namespace": "kuberay-system"}})
    finding = _by_check(run_preflight(RecordedReader(), values, "serving"))["kuberay-operator"]
    assert finding.level == "error"
    assert "runs in namespace default" in finding.message
    assert "set networkPolicy.kuberayOperator.namespace to default" in finding.message
    relabelled = _values(networkPolicy={"kuberayOperator": {"podLabels": {"app": "kuberay"}}})
    finding = _by_check(run_preflight(RecordedReader(), relabelled, "serving"))["kuberay-operator"]
    assert finding.level == "error"
    assert "set networkPolicy.kuberayOperator.podLabels" in finding.message


def test_missing_kuberay_is_an_error_naming_the_operator() -> None:
    findings = _by_check(run_preflight(RecordedReader(crds="crds-bare.json"), _values(), "serving"))
    assert findings["kuberay"].level == "error"
    assert "rayservices.ray.io" in findings["kuberay"].message
    assert "kuberay-operator" in findings["kuberay"].message


def test_no_node_fits_names_what_the_cluster_has() -> None:
    values = _values(
        "gpt-oss-120b-h200.yaml", ray={"gpuNodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"}}
    )
    findings = _by_check(run_preflight(RecordedReader(), values, "serving"))
    node_check = findings["gpu-nodes:h200"]
    assert node_check.level == "error"
    assert "nvidia.com/gpu.product': 'NVIDIA-H200'" in node_check.message
    assert "ip-10-0-2-31.ec2.internal (8 x NVIDIA-H100-80GB-HBM3)" in node_check.message
    assert "NVIDIA-A100-SXM4-40GB" in node_check.message


def test_untolerated_taint_keeps_gpu_nodes_out() -> None:
    values = _values("gpt-oss-20b.yaml")
    values["ray"]["workerGroups"][0]["tolerations"] = []
    findings = _by_check(run_preflight(RecordedReader(), values, "serving"))
    assert findings["gpu-nodes:h100"].level == "error"


def test_gpu_type_that_does_not_match_the_nodes_is_an_error() -> None:
    values = _values("gpt-oss-20b.yaml")
    group = values["ray"]["workerGroups"][0]
    group["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}
    group["gpuType"] = "H100-80GB"
    findings = _by_check(run_preflight(RecordedReader(), values, "serving"))
    assert findings["gpu-type:h100"].level == "error"
    assert "NVIDIA-A100-SXM4-40GB" in findings["gpu-type:h100"].message


def test_120b_tp1_on_40gb_gpus_fails_with_the_budget_message() -> None:
    values = _values("gpt-oss-120b-h200.yaml")
    values["config"]["models"][0]["topology"]["gpu_type"] = "A100-40GB"
    group = values["ray"]["workerGroups"][0]
    group["gpuType"] = "A100-40GB"
    group["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}
    group["resources"]["requests"]["memory"] = "1000Gi"  # p4d.24xlarge: 1152 GiB
    findings = _by_check(run_preflight(RecordedReader(), values, "serving"))
    budget = findings["gpu-budget:gpt-oss-120b"]
    assert budget.level == "error"
    assert "gpt-oss-120b on A100-40GB TP1 does not fit" in budget.message
    assert "layouts that fit: TP4" in budget.message
    assert findings["gpu-nodes:h200"].level == "ok"  # the one A100 node fits the pod itself
    assert "gpu-memory:h200" not in findings


def test_referenced_secrets_must_exist_with_their_keys() -> None:
    values = _values(
        secrets={
            "apiKeys": {"existingSecret": "oss-tenants"},
            "huggingface": {"existingSecret": "hf-token"},
            "upstream": {"existingSecret": "upstream-openai"},
            "s3": {"existingSecret": "hf-token"},
        }
    )
    findings = run_preflight(RecordedReader(), values, "serving")
    secret_findings = [f for f in findings if f.check.startswith("secret:")]
    messages = {f.message for f in secret_findings if f.level == "error"}
    assert "Secret serving/upstream-openai (upstream) does not exist: create it first" in messages
    # the S3 store's keys: both looked for (the session token only when a key is named)
    assert "Secret serving/hf-token (s3) has no key 'access-key-id' (keys: token)" in messages
    assert "Secret serving/hf-token (s3) has no key 'secret-access-key' (keys: token)" in messages
    assert not [m for m in messages if "session" in m]
    assert (
        "Secret serving/oss-tenants (apiKeys (helm test)) has no key 'admin-api-key' (keys: tenants.yaml)"
        in messages
    )
    assert any(f.level == "ok" and f.check == "secret:hf-token" for f in secret_findings)


def test_weight_cache_storage_class_checks() -> None:
    reader = RecordedReader()
    # Default: a ReadWriteOnce volume per pod from the default class (gp3): binds.
    default = _by_check(run_preflight(reader, _values(), "serving"))["weights-cache"]
    assert default.level == "ok"
    missing = _by_check(
        run_preflight(reader, _values(weights={"cache": {"storageClassName": "nfs"}}), "serving")
    )
    assert missing["weights-cache"].level == "error"
    assert "StorageClass 'nfs' does not exist (classes: efs-sc, gp3)" in missing["weights-cache"].message
    claim = {"spec": {"accessModes": ["ReadWriteMany"]}, "status": {"phase": "Bound"}}
    bound = _by_check(
        run_preflight(
            RecordedReader(pvcs={"models": claim}),
            _values(weights={"cache": {"type": "shared", "existingClaim": "models"}}),
            "serving",
        )
    )
    assert bound["weights-cache"].level == "ok"


def test_eks_1_30_has_no_default_class_an_error_whose_fix_is_the_eks_files_gp3() -> None:
    """EKS clusters created at 1.30 or later keep gp2 but no longer mark it default."""
    reader = RecordedReader(storage_classes="storageclasses-eks-1.30.json")
    findings = _by_check(run_preflight(reader, _values("gpt-oss-120b-h100.yaml"), "serving"))
    for check, key in (("weights-cache", "weights.cache"), ("redis-storage", "redis.bundled.persistence")):
        assert findings[check].level == "error", check
        message = findings[check].message
        assert message.startswith("no default StorageClass for "), message
        assert "EKS clusters created at 1.30 or later have none" in message
        assert "-f helm/oss-serving/clouds/eks.yaml names gp3" in message
        assert "kubectl apply -f helm/oss-serving/clouds/storageclass/eks-gp3.yaml" in message
        assert f"set {key}.storageClassName to a block-storage class (classes: gp2)" in message
    # The EKS file names gp3; until it exists that is the error, with how to create it.
    eks = _by_check(run_preflight(reader, _values("gpt-oss-120b-h100.yaml", "clouds/eks.yaml"), "serving"))
    for check in ("weights-cache", "redis-storage"):
        assert eks[check].level == "error"
        assert eks[check].message.startswith("StorageClass 'gp3' does not exist (classes: gp2): create it ")
        assert "kubectl apply -f helm/oss-serving/clouds/storageclass/eks-gp3.yaml" in eks[check].message
    # With gp3 created (the main recording), the EKS file binds without any default class.
    ok = _by_check(
        run_preflight(RecordedReader(), _values("gpt-oss-120b-h100.yaml", "clouds/eks.yaml"), "serving")
    )
    assert ok["weights-cache"].level == ok["redis-storage"].level == "ok"
    assert "StorageClass gp3 for the bundled Redis" in ok["redis-storage"].message


def test_the_eks_files_class_is_the_storage_class_it_ships() -> None:
    values = _values("clouds/eks.yaml")
    shipped = yaml.safe_load((CLOUDS / "storageclass" / "eks-gp3.yaml").read_text(encoding="utf-8"))
    assert shipped["kind"] == "StorageClass"
    assert shipped["provisioner"] == "ebs.csi.aws.com"
    assert shipped["parameters"]["type"] == "gp3"
    assert shipped["volumeBindingMode"] == "WaitForFirstConsumer"  # EBS volumes are zonal
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(shipped, "1.30", strict=True)
    name = shipped["metadata"]["name"]
    assert values["weights"]["cache"]["storageClassName"] == name
    assert values["redis"]["bundled"]["persistence"]["storageClassName"] == name
    text = (CLOUDS / "eks.yaml").read_text(encoding="utf-8")
    assert "comes from the default class" not in text
    assert "no default StorageClass" in text


def test_weights_staged_on_the_nodes_are_a_warning_preflight_cannot_check() -> None:
    values = _values(
        "gpt-oss-120b-h100.yaml",
        "clouds/eks.yaml",
        weights={"cache": {"type": "host", "hostPath": "/mnt/nvme/models"}, "download": {"enabled": False}},
    )
    findings = _by_check(run_preflight(RecordedReader(), values, "serving"))
    assert findings["weights-cache"].level == "warning"
    assert "staged by hand at /mnt/nvme/models on every GPU node" in findings["weights-cache"].message
    assert findings["gpu-nodes:h100"].level == "ok"  # no ephemeral storage asked for
    assert not [f for f in findings.values() if f.level == "error"]


@pytest.mark.parametrize(
    "cache",
    [
        pytest.param({"type": "shared"}, id="shared-on-the-default-class"),
        pytest.param({"type": "shared", "storageClassName": "gp3"}, id="shared-on-block-storage"),
    ],
)
def test_a_shared_cache_on_block_storage_is_an_error_with_the_fix(cache: dict[str, str]) -> None:
    finding = _by_check(run_preflight(RecordedReader(), _values(weights={"cache": cache}), "serving"))[
        "weights-cache"
    ]
    assert finding.level == "error"
    assert "set weights.cache.storageClassName to a ReadWriteMany class (efs-sc)" in finding.message
    assert "or use weights.cache.type volume" in finding.message


def test_monitoring_crds_are_required_when_monitoring_is_on() -> None:
    values = _values(monitoring={"prometheusRule": {"enabled": True}}, keda={"enabled": True})
    findings = _by_check(run_preflight(RecordedReader(), values, "serving"))
    assert findings["monitoring"].level == "error"
    assert "scaledobjects.keda.sh" in findings["monitoring"].message
    assert "prometheusrules" not in findings["monitoring"].message


@pytest.mark.parametrize(("crds", "code"), [("crds.json", 0), ("crds-bare.json", 1)])
def test_cli_exit_codes(tmp_path: Path, crds: str, code: int) -> None:
    override = CLOUDS / "eks.yaml"
    result = CliRunner().invoke(
        preflight,
        [
            "-f",
            str(PROFILES / "gpt-oss-120b-h100.yaml"),
            "-f",
            str(override),
            "--chart",
            str(CHART),
            "-n",
            "serving",
        ],
        obj={"cluster_reader_factory": lambda context: RecordedReader(crds=crds)},
        terminal_width=200,
    )
    assert result.exit_code == code, result.output
    assert "kube context arn:aws:eks:us-east-1:000000000000:cluster/gpu-prod" in result.output
    assert ("ready to install" in result.output) == (code == 0)
