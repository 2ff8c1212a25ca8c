"""One wire module: header names and stream closing live in ``serving/wire.py`` only.

Read from the sources of every module under ``serving/``: a module-level ``*_HEADER``
name, a literal of one of our response or request headers (``x-oss-serving-*``,
``x-oss-response-cache``, ``x-oss-engine-*``, ``x-oss-deadline-*``, ``x-request-id``) or a
``getattr(x, "aclose", ...)`` outside ``serving/wire.py`` is a copy that can drift.
"""

from __future__ import annotations

import ast
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import serving
from serving import wire

PACKAGE = Path(serving.__file__).resolve().parent
WIRE = PACKAGE / "wire.py"
OUR_HEADERS = ("x-oss-serving-", "x-oss-response-cache", "x-oss-engine-", "x-oss-deadline-", "x-request-id")
ACLOSE_ELSEWHERE = {
    # closes the upstreams' HTTP clients at shutdown (not a stream; errors propagate)
    "gateway/handoff/relay.py": 1,
}


def _sources() -> list[tuple[str, ast.Module]]:
    return [
        (str(path.relative_to(PACKAGE)), ast.parse(path.read_text(), str(path)))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != WIRE
    ]


def test_header_names_are_defined_in_the_wire_module_only() -> None:
    found: list[str] = []
    for name, tree in _sources():
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                if isinstance(target, ast.Name) and target.id.endswith("_HEADER"):
                    found.append(f"{name}:{node.lineno}: {target.id}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.lower().startswith(OUR_HEADERS)
            ):
                found.append(f"{name}:{node.lineno}: {node.value!r}")
    assert found == []


def test_streams_are_closed_through_the_wire_module() -> None:
    counts: dict[str, int] = {}
    for name, tree in _sources():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "getattr"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value == "aclose"
            ):
                counts[name] = counts.get(name, 0) + 1
    assert counts == ACLOSE_ELSEWHERE


class _Stream:
    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.closed = False

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed = True
        if self.fail:
            raise RuntimeError("boom")


async def test_aclose_quietly_drops_errors_and_aclose_stream_raises_them() -> None:
    quiet, loud = _Stream(fail=True), _Stream(fail=True)
    await wire.aclose_quietly(quiet)
    assert quiet.closed
    with pytest.raises(RuntimeError, match="boom"):
        await wire.aclose_stream(loud)
    assert loud.closed
    ok = _Stream(fail=False)
    await wire.aclose_stream(ok)
    assert ok.closed
    # Without aclose (a list iterator, None): nothing to do.
    await wire.aclose_quietly(None)
    await wire.aclose_stream(None)
    await wire.aclose_stream(iter([]))  # type: ignore[arg-type]
