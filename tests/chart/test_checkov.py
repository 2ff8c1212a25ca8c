"""checkov on the rendered manifests of every scenario: no failed check left unexplained."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import CHART_DIR, SCENARIO_IDS, Rendered
from .tools import find_tool

CHECKOV = find_tool("checkov")
needs_checkov = pytest.mark.skipif(
    CHECKOV is None, reason="checkov is not installed (install script: .venv-tools with checkov)"
)


@pytest.fixture(scope="module")
def findings(rendered_scenarios: dict[str, Rendered], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One checkov run over every scenario (it takes seconds per run)."""
    out_dir: Path = tmp_path_factory.mktemp("manifests")
    for name in SCENARIO_IDS:
        path = out_dir / f"{name.replace(':', '_')}.yaml"
        path.write_text(yaml.safe_dump_all(rendered_scenarios[name].objects), encoding="utf-8")
    assert CHECKOV is not None
    proc = subprocess.run(
        [CHECKOV, "-d", str(out_dir), "--framework", "kubernetes", "-o", "json", "--quiet", "--compact"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    return [check for r in reports for check in r["results"]["failed_checks"]], reports


def _skips() -> dict[str, Any]:
    data = yaml.safe_load((CHART_DIR / "checkov-skips.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_every_skip_has_a_reason() -> None:
    for check_id, entry in _skips().items():
        assert entry["kinds"], check_id
        assert len(entry["reason"]) > 40, check_id


@needs_checkov
def test_no_unexplained_failure(findings: Any) -> None:
    failed, reports = findings
    assert sum(r["summary"]["passed"] for r in reports) > 500
    skips = _skips()
    unexplained = []
    used = set()
    for check in failed:
        kind = check["resource"].split(".")[0]
        entry = skips.get(check["check_id"])
        if entry and kind in entry["kinds"]:
            used.add((check["check_id"], kind))
            continue
        unexplained.append(
            f"{check['check_id']} {check['check_name']}: {check['resource']} ({check['file_path']})"
        )
    assert not unexplained, "\n".join(sorted(set(unexplained)))
    stale = {(cid, kind) for cid, entry in skips.items() for kind in entry["kinds"]} - used
    assert not stale, f"checkov-skips.yaml lists skips that match nothing: {sorted(stale)}"
