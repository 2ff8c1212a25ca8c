"""The processes of a real engine replica, for tests that pause or kill one."""

from __future__ import annotations

import contextlib
import signal

import psutil

__all__ = ["signal_tree"]


def signal_tree(pid: int, sig: signal.Signals) -> None:
    """``sig`` to a replica's process and its vLLM engine processes (its children)."""
    proc = psutil.Process(pid)
    for p in [*proc.children(recursive=True), proc]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
