"""Layering that points one way: api -> gateway -> engine, and nothing in serving/ -> loadtest.

Every import statement of every module under ``serving/`` is read from its source (top
level and inside functions, ``import x``, ``from x import y`` and relative imports, plus
``importlib.import_module("...")`` with a literal name), resolved to an absolute module
name and checked against the rules below. Every module is also imported, which catches
modules that a move left broken.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import serving

ROOT = Path(serving.__file__).resolve().parent.parent

# (importing package, imported package, why it is forbidden)
RULES: tuple[tuple[str, str, str], ...] = (
    ("serving.engine", "serving.gateway", "the engine must not depend on the gateway"),
    ("serving.engine", "serving.api", "the engine must not depend on the HTTP layer"),
    ("serving.gateway", "serving.api", "the gateway must not depend on the HTTP layer"),
    ("serving", "loadtest", "the serving package must not depend on the load tester"),
)


@dataclass(frozen=True)
class Import:
    module: str
    """The importing module (``serving.engine.router``)."""
    path: Path
    line: int
    target: str
    """The absolute name of what is imported (``serving.gateway.routing``)."""

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.module} imports {self.target}"


def module_files() -> list[tuple[str, Path]]:
    """(module name, source file) of every module of the ``serving`` package."""
    out: list[tuple[str, Path]] = []
    for path in sorted(Path(serving.__file__).resolve().parent.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append((".".join(parts), path))
    return out


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module named by ``from <level dots><name> import ...`` in ``module``."""
    if level == 0:
        return name or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports_of(module: str, path: Path, source: str | None = None) -> Iterator[Import]:
    """Every import in ``path`` (at any depth), as absolute module names."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, path, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module)
            yield Import(module, path, node.lineno, base)
            for alias in node.names:  # `from serving import gateway` imports serving.gateway
                if alias.name != "*":
                    yield Import(module, path, node.lineno, f"{base}.{alias.name}" if base else alias.name)
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in {"import_module", "__import__"})
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield Import(module, path, node.lineno, node.args[0].value)


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def broken_rules(imp: Import) -> list[str]:
    """Why ``imp`` is against the layering (empty: it is fine)."""
    return [
        why
        for importer, imported, why in RULES
        if _within(imp.module, importer) and _within(imp.target, imported)
    ]


def violations() -> list[str]:
    """``file:line: module imports target (why)``, once per import statement and rule."""
    found: dict[tuple[Path, int, str], str] = {}
    for module, path in module_files():
        for imp in imports_of(module, path):
            for why in broken_rules(imp):
                found.setdefault((imp.path, imp.line, why), f"{imp} ({why})")
    return [found[key] for key in sorted(found)]


def test_imports_point_one_way() -> None:
    found = violations()
    for line in found:
        print(line)
    assert not found, "imports against the layering:\n" + "\n".join(found)


def test_the_scan_sees_what_it_must() -> None:
    """The scanner itself: function-local, relative and ``from pkg import module`` forms."""
    source = (
        "import serving.gateway.routing\n"
        "from ..gateway import routing\n"
        "from .. import api\n"
        "def f():\n"
        "    from loadtest.sim import EngineProfile\n"
        "    importlib.import_module('serving.api.app')\n"
    )
    probe = ROOT / "serving" / "engine" / "probe.py"  # never written: the source is given
    targets = {imp.target for imp in imports_of("serving.engine.probe", probe, source)}
    assert {
        "serving.gateway.routing",
        "serving.gateway",
        "serving.api",
        "loadtest.sim",
        "serving.api.app",
    } <= targets
    allowed = Import("serving.gateway.routing", probe, 1, "serving.engine.routing_hints")
    assert not broken_rules(allowed)
    assert broken_rules(Import("serving.engine.router", probe, 1, "serving.gateway.routing"))
    assert broken_rules(Import("serving.gateway.service", probe, 1, "serving.api.app"))
    assert broken_rules(Import("serving.cli", probe, 1, "loadtest.sim"))
    assert not broken_rules(Import("serving.engine.router", probe, 1, "serving.gateways_elsewhere"))


def _walk() -> list[str]:
    names = [serving.__name__]
    names += [m.name for m in pkgutil.walk_packages(serving.__path__, prefix="serving.")]
    return sorted(names)


def test_the_walk_finds_every_source_file() -> None:
    assert _walk() == sorted(name for name, _ in module_files())


@pytest.mark.parametrize("name", _walk())
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)
