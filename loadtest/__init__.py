"""oss-loadtest: load generation, honest metrics, SLO search and capacity planning.

Its third-party dependencies beyond oss-serving's own come with the ``loadtest`` extra
(``pip install 'oss-serving[loadtest]'``); without them importing this package says so.
"""

import importlib.util

EXTRA_MODULES = ("numpy", "aiohttp", "psutil", "matplotlib", "uvicorn")
"""Top-level modules of the ``loadtest`` extra's packages (checked, not imported, here)."""

_missing = [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(
        f"oss-loadtest needs the 'loadtest' extra ({', '.join(_missing)} not installed): "
        "pip install 'oss-serving[loadtest]'"
    )
