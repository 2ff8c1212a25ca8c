"""The chart README's "Install on a cluster" section, read top to bottom, is what a
platform engineer runs: every command in it is exercised here as far as this machine
allows (helm commands rendered with their exact flags, preflight against the recorded
cluster, the image and weights commands against the files they name)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from serving.cluster import weights
from serving.cluster.cli import preflight
from serving.cluster.preflight import load_values, merge_values, parse_set_values
from tests.cluster.recorded import RecordedReader

from .conftest import CHART_DIR, Rendered, _render

REPO = CHART_DIR.parents[1]
README = CHART_DIR / "README.md"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def install_commands() -> list[list[str]]:
    """Every shell command of the install section (continuation lines joined)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", _section("Install on a cluster"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(shlex.split(line))
    return commands


def _options(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(positional args, -f files, --set items) of a helm or oss-serve command line."""
    positional, files, sets = [], [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-f", "--values"):
            files.append(argv[i + 1])
            i += 2
        elif arg == "--set":
            sets.append(argv[i + 1])
            i += 2
        elif arg in ("-n", "--namespace", "--release", "--version", "-t", "-l"):
            i += 2
        elif arg.startswith("-"):
            i += 1
        else:
            positional.append(arg)
            i += 1
    return positional, files, sets


def _values(files: list[str], sets: list[str]) -> dict[str, Any]:
    for f in files:
        assert (REPO / f).is_file(), f"the README names {f}, which does not exist"
    values = load_values(CHART_DIR, [REPO / f for f in files])
    return merge_values(values, parse_set_values(sets))


def test_the_section_has_the_commands_a_platform_engineer_runs() -> None:
    heads = [" ".join(c[:2]) for c in install_commands()]
    assert heads.count("helm install") == 2  # connected and air-gapped
    assert heads.count("oss-serve preflight") == 2
    assert "docker build" in heads
    assert heads.count("kubectl apply") == 1  # EKS: the gp3 StorageClass
    assert heads.count("oss-serve status") >= 1
    assert heads.count("helm test") == 1
    assert "docker push" in heads
    assert "python -m" in heads


@pytest.mark.parametrize(
    "index", [i for i, c in enumerate(install_commands()) if c[:2] == ["helm", "install"]]
)
def test_helm_install_commands_render(chart: Any, index: int) -> None:
    argv = install_commands()[index]
    positional, files, sets = _options(argv[2:])
    assert positional == ["oss", "helm/oss-serving"]
    assert argv[argv.index("-n") + 1] == "serving"
    values = _values(files, sets)
    rendered: Rendered = _render(chart, values)
    assert rendered.one("RayService")
    images = {
        c["image"]
        for o in rendered.objects
        for c in yaml.safe_load(yaml.safe_dump(o))
        .get("spec", {})
        .get("template", {})
        .get("spec", {})
        .get("containers", [])
    }
    if any(s.startswith("image.repository=") for s in sets):
        # Air-gapped: every image from the own registry, nothing downloaded, weights checked.
        rc = rendered.one("RayService")["spec"]["rayClusterConfig"]
        pods = [rc["headGroupSpec"]["template"]["spec"]] + [
            g["template"]["spec"] for g in rc["workerGroupSpecs"]
        ]
        images |= {c["image"] for p in pods for c in p.get("initContainers", []) + p["containers"]}
        images |= {c["image"] for p in rendered.of_kind("Pod") for c in p["spec"]["containers"]}
        assert all(i.startswith("registry.corp.example/") for i in images), images
        assert not rendered.of_kind("Job")
        (worker,) = [g["template"]["spec"] for g in rc["workerGroupSpecs"]]
        assert [c["name"] for c in worker["initContainers"]] == ["check-weights"]


@pytest.mark.parametrize(
    "index", [i for i, c in enumerate(install_commands()) if c[:2] == ["oss-serve", "preflight"]]
)
def test_preflight_commands_pass_on_the_recorded_cluster(index: int) -> None:
    argv = install_commands()[index]
    staged = {"spec": {"accessModes": ["ReadWriteMany"]}, "status": {"phase": "Bound"}}
    result = CliRunner().invoke(
        preflight,
        [*argv[2:], "--chart", str(CHART_DIR)],
        obj={"cluster_reader_factory": lambda context: RecordedReader(pvcs={"gpt-oss-weights": staged})},
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    assert "ready to install" in result.output


def _install_after(index: int) -> list[str]:
    """The first `helm install` command after command ``index``."""
    commands = install_commands()
    return next(c for c in commands[index + 1 :] if c[:2] == ["helm", "install"])


def _install_before(index: int) -> list[str]:
    """The last `helm install` command before command ``index``."""
    return [c for c in install_commands()[:index] if c[:2] == ["helm", "install"]][-1]


def _flag(argv: list[str], *names: str) -> str:
    (value,) = [argv[i + 1] for i, a in enumerate(argv) if a in names]
    return value


@pytest.mark.parametrize(
    "index", [i for i, c in enumerate(install_commands()) if c[:2] == ["oss-serve", "preflight"]]
)
def test_each_preflight_checks_the_values_of_the_install_it_precedes(index: int) -> None:
    check = install_commands()[index]
    install = _install_after(index)
    _, check_files, check_sets = _options(check[2:])
    _, install_files, install_sets = _options(install[2:])
    assert check_files == install_files
    assert check_sets == install_sets
    assert _flag(check, "-n", "--namespace") == _flag(install, "-n", "--namespace")


def test_kubectl_apply_creates_the_class_the_install_names() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    commands = install_commands()
    applies = [i for i, c in enumerate(commands) if c[:2] == ["kubectl", "apply"]]
    assert applies
    for index in applies:
        path = REPO / _flag(commands[index], "-f")
        manifest = yaml.safe_load(path.read_text(encoding="utf-8"))
        kubernetes_validate.validate(manifest, "1.30", strict=True)
        assert manifest["kind"] == "StorageClass"
        _, files, sets = _options(_install_after(index)[2:])
        values = _values(files, sets)
        assert values["weights"]["cache"]["storageClassName"] == manifest["metadata"]["name"]
        assert values["redis"]["bundled"]["persistence"]["storageClassName"] == manifest["metadata"]["name"]


@pytest.mark.parametrize(
    "index", [i for i, c in enumerate(install_commands()) if c[:2] == ["oss-serve", "status"]]
)
def test_status_command_reports_the_installed_release(
    chart: Any, index: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run the README's `oss-serve status --cluster` (the real CLI entry point) against the
    recorded API responses of a running release."""
    from serving import cli
    from serving.cluster import cli as cluster_cli

    argv = install_commands()[index]
    install = _install_before(index)
    assert "--cluster" in argv
    assert _flag(argv, "--release") == _options(install[2:])[0][0]
    assert _flag(argv, "-n", "--namespace") == _flag(install, "-n", "--namespace")
    reader = RecordedReader()
    monkeypatch.setattr(cluster_cli, "_kube_reader", lambda context: reader)
    result = CliRunner().invoke(cli.main, argv[1:], terminal_width=200)
    assert result.exit_code == 0, result.output
    _, files, sets = _options(install[2:])
    name = _render(chart, _values(files, sets)).one("RayService")["metadata"]["name"]
    assert f"RayService serving/{name}: Running, ready" in result.output
    assert f"rayservice serving/{name}" in reader.calls
    assert "queue depth: gpt-oss-120b 14" in result.output


def _run_test_pod(pod: dict[str, Any], models: list[str], tmp_path: Path) -> tuple[int, str, list[str]]:
    """Run the test pod's script with sh, a stub curl that answers /v1/models with
    ``models``, and its Secret mounted from tmp_path: (exit status, output, curl's argv)."""
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["sh", "-c"]
    (mount,) = container["volumeMounts"]
    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / "admin-api-key").write_text("sk-admin", encoding="utf-8")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    body = '{"object": "list", "data": [' + ", ".join(f'{{"id": "{m}"}}' for m in models) + "]}"
    stub = bin_dir / "curl"
    stub.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/curl-args"\necho \'{body}\'\n', encoding="utf-8"
    )
    stub.chmod(0o755)
    script = container["args"][0].replace(mount["mountPath"], str(secrets))
    proc = subprocess.run(
        ["sh", "-c", script],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    args = (tmp_path / "curl-args").read_text(encoding="utf-8").splitlines()
    return proc.returncode, proc.stdout + proc.stderr, args


def test_helm_test_command_runs_a_sane_test_pod(chart: Any, tmp_path: Path) -> None:
    commands = install_commands()
    (index,) = [i for i, c in enumerate(commands) if c[:2] == ["helm", "test"]]
    argv = commands[index]
    install = _install_before(index)
    positional, files, sets = _options(install[2:])
    assert argv[2] == positional[0]  # the release
    assert _flag(argv, "-n", "--namespace") == _flag(install, "-n", "--namespace")
    rendered = _render(chart, _values(files, sets))
    (pod,) = [
        p for p in rendered.of_kind("Pod") if p["metadata"]["annotations"].get("helm.sh/hook") == "test"
    ]
    # It reaches the gateway Service KubeRay creates, with a key of the release's Secret.
    service = rendered.one("RayService")["spec"]["serveService"]
    port = service["spec"]["ports"][0]["port"]
    (volume,) = pod["spec"]["volumes"]
    secret = rendered.one("Secret", volume["secret"]["secretName"])
    assert volume["secret"]["items"] == [{"key": "admin-api-key", "path": "admin-api-key"}]
    assert "admin-api-key" in secret.get("stringData", secret.get("data", {}))
    models = [m["name"] for m in _values(files, sets)["config"]["models"]]
    code, output, curl = _run_test_pod(pod, models, tmp_path)
    assert code == 0, output
    assert f"http://{service['metadata']['name']}:{port}/v1/models" in curl
    assert "Authorization: Bearer sk-admin" in curl
    code, output, _ = _run_test_pod(pod, ["another-model"], tmp_path)
    assert code == 1
    assert f"model {models[0]} missing" in output


def _upgrade_commands() -> list[list[str]]:
    return [c for c in install_commands() if c[:2] == ["helm", "upgrade"]]


def test_image_upgrade_commands_render_the_new_image_under_each_strategy(chart: Any) -> None:
    """The README's image upgrades, one per ray.upgradeStrategy, rendered over the values
    of the connected install (--reuse-values) with their own --set flags."""
    commands = install_commands()
    install = next(c for c in commands if c[:2] == ["helm", "install"])
    _, files, sets = _options(install[2:])
    before = _render(chart, _values(files, sets)).one("RayService")
    strategies = []
    for argv in _upgrade_commands():
        positional, upgrade_files, upgrade_sets = _options(argv[2:])
        assert positional == ["oss", "helm/oss-serving"]
        assert "--reuse-values" in argv
        assert not upgrade_files
        assert _flag(argv, "-n", "--namespace") == "serving"
        after = _render(chart, _values(files, sets + upgrade_sets)).one("RayService")
        strategy = after["spec"]["upgradeStrategy"]["type"]
        strategies.append(strategy)
        tag = dict(s.split("=", 1) for s in upgrade_sets)["image.tag"]
        rc = after["spec"]["rayClusterConfig"]
        pods = [rc["headGroupSpec"]["template"]["spec"]] + [
            g["template"]["spec"] for g in rc["workerGroupSpecs"]
        ]
        assert {c["image"] for p in pods for c in p.get("initContainers", []) + p["containers"]} == {
            f"ghcr.io/oss-serving/oss-serving:{tag}"
        }
        assert after["spec"]["serveConfigV2"] == before["spec"]["serveConfigV2"]
    assert strategies == ["None", "NewCluster"]
    # Under None the RayCluster is replaced by hand: the selector names this RayService.
    (delete,) = [c for c in commands if c[:3] == ["kubectl", "delete", "raycluster"]]
    assert _flag(delete, "-n", "--namespace") == "serving"
    assert _flag(delete, "-l") == f"ray.io/originated-from-cr-name={before['metadata']['name']}"
    assert commands.index(delete) == commands.index(_upgrade_commands()[0]) + 1


def test_image_commands_build_the_dockerfile_and_mirror_the_charts_images() -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text(encoding="utf-8"))
    commands = install_commands()
    (build,) = [c for c in commands if c[:2] == ["docker", "build"]]
    assert build[build.index("-f") + 1] == "deploy/Dockerfile"
    assert (REPO / "deploy" / "Dockerfile").is_file()
    assert build[build.index("-t") + 1] == f"registry.corp.example/ml/oss-serving:{chart['appVersion']}"
    pulled = {c[2] for c in commands if c[:2] == ["docker", "pull"]}
    redis = values["redis"]["bundled"]["image"]
    curl = values["test"]["image"]
    assert pulled == {f"{redis['repository']}:{redis['tag']}", f"{curl['repository']}:{curl['tag']}"}


def test_the_weights_staging_command_is_the_charts_download() -> None:
    (stage,) = [c for c in install_commands() if c[:3] == ["python", "-m", "serving.cluster.weights"]]
    assert stage[3] == "download"
    (target,) = weights.parse_targets(stage[4:])
    assert target.repo == "openai/gpt-oss-120b"
    assert Path(target.folder).name == "openai--gpt-oss-120b"  # the folder name the chart mounts


def test_readme_lists_what_only_a_live_cluster_can_check() -> None:
    section = _section("Not yet verified on a cluster")
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) >= 10
    for row in rows:
        how = row.split("|")[2]
        assert "`" in how, f"no command in: {row}"
