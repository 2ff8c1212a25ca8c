"""Small helpers for the background tasks of long-lived objects."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["cancel_and_wait", "raise_if_cancelling"]

log = logging.getLogger("oss_serving.tasks")

STOP_TIMEOUT_S = 5.0
"""How long a stop waits for a cancelled background task before it gives up on it."""


async def cancel_and_wait(task: asyncio.Task[Any] | None, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Cancel ``task`` (if any) and wait until it has finished; its cancellation is swallowed.

    Bounded: a task that does not finish within ``timeout_s`` of its cancellation (a
    client library turned the cancellation into an error its loop retries) is left
    behind with a warning, so that a shutdown never hangs on it.
    """
    if task is None:
        return
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        log.warning("background task %s still runs %g s after its cancellation", task.get_name(), timeout_s)
        return
    if not task.cancelled() and (exc := task.exception()) is not None:
        raise exc


def raise_if_cancelling() -> None:
    """In a retry loop's error handler: stop if this task was asked to stop.

    Redis clients can turn a cancellation that arrives mid-command into a connection
    error; a loop that retries on such errors would then run forever after ``cancel()``.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
