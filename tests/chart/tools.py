"""Find the command-line tools some chart tests use (checkov, promtool, hadolint).

checkov pins old versions of packaging and networkx, so it lives in its own virtual
environment (``.venv-tools`` in the repository, made by the install script) rather than
in the project's; promtool comes from the system's ``prometheus`` package.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def find_tool(name: str) -> str | None:
    """The tool on PATH, next to this Python (its venv), in .venv-tools, else None."""
    found = shutil.which(name)
    if found:
        return found
    for folder in (Path(sys.executable).parent, REPO / ".venv-tools" / "bin"):
        candidate = folder / name
        if candidate.is_file():
            return str(candidate)
    return None
