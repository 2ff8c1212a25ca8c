"""Background-task helpers: stopping never hangs on a task that hides its cancellation."""

from __future__ import annotations

import asyncio

import pytest

from serving.tasks import cancel_and_wait, raise_if_cancelling


class FakeConnectionError(Exception):
    """What a Redis client can raise when a cancellation arrives mid-command."""


async def _command() -> None:
    try:
        await asyncio.sleep(0.05)
    except asyncio.CancelledError:
        raise FakeConnectionError("connection closed") from None


async def _retry_loop(honour: bool, running: list[bool] | None = None) -> None:
    while running is None or running[0]:
        try:
            await _command()
        except FakeConnectionError:
            if honour:
                raise_if_cancelling()


async def test_retry_loop_stops_when_its_error_hides_a_cancellation() -> None:
    task = asyncio.create_task(_retry_loop(honour=True))
    await asyncio.sleep(0.01)
    await cancel_and_wait(task, timeout_s=2.0)
    assert task.cancelled()


async def test_stop_is_bounded_when_a_task_never_stops() -> None:
    running = [True]
    task = asyncio.create_task(_retry_loop(honour=False, running=running))
    await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await cancel_and_wait(task, timeout_s=0.3)
    assert loop.time() - started < 2.0
    assert not task.done()  # left behind, with a warning
    running[0] = False  # the test's own clean-up: the loop ends at its next turn
    await asyncio.wait_for(task, timeout=2.0)


async def test_a_task_error_is_still_raised() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="boom"):
        await cancel_and_wait(task)
