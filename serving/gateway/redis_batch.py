"""Auto-pipelining of Lua script calls: one Redis round trip for every call of one loop turn.

A busy gateway replica runs many requests at once, and each of them calls an admission
script (enqueue, check, release, cancel) at its own moment. Sent one by one, every call
costs a socket write, a read and an event-loop wake-up; under load that client-side cost,
not Redis, bounds admissions per second. :class:`ScriptPipeline` collects the calls made
in one event-loop turn and sends them as one pipeline (``EVALSHA`` each, no transaction:
every script is atomic by itself), then hands each caller its own reply or error. At
light load a batch holds one call and nothing waits: the flush is scheduled for the very
next loop turn, not on a timer.

Redis loses loaded scripts when it restarts: calls answered ``NOSCRIPT`` are re-sent
once after loading the scripts again. A connection error fails every call of its batch
with that error, as a direct call would have failed.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

__all__ = ["ScriptPipeline"]


@dataclass(frozen=True)
class _Call:
    script: str
    keys: Sequence[Any]
    args: Sequence[Any]
    future: asyncio.Future[Any]


def _is_noscript(result: Any) -> bool:
    return isinstance(result, NoScriptError) or (
        isinstance(result, ResponseError) and str(result).startswith("NOSCRIPT")
    )


class ScriptPipeline:
    """Calls named Lua scripts, batching the calls of one loop turn into one round trip."""

    def __init__(self, redis: Any, scripts: Mapping[str, str]) -> None:
        self._redis = redis
        self._source = dict(scripts)
        self._sha = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in scripts.items()}
        self._pending: list[_Call] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self.batches = 0
        """Round trips sent so far (for tests and benchmarks)."""

    async def call(self, script: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run ``script`` with ``keys`` and ``args``; its reply, or the error it raised."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append(_Call(script, keys, args, future))
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._send(batch), name="oss-serving-script-batch")
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _send(self, batch: list[_Call]) -> None:
        self.batches += 1
        try:
            results = await self._execute(batch)
            missing = [i for i, result in enumerate(results) if _is_noscript(result)]
            if missing:  # Redis restarted since the scripts were loaded
                for source in self._source.values():
                    await self._redis.script_load(source)
                again = await self._execute([batch[i] for i in missing])
                for i, result in zip(missing, again, strict=True):
                    results[i] = result
        except asyncio.CancelledError:
            for call in batch:
                call.future.cancel()
            raise
        except Exception as exc:  # the connection failed: every call of the batch failed
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(exc)
            return
        for call, result in zip(batch, results, strict=True):
            if call.future.done():
                continue  # the caller went away (cancelled); the script ran all the same
            if isinstance(result, Exception):
                call.future.set_exception(result)
            else:
                call.future.set_result(result)

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for call in batch:
                pipe.evalsha(self._sha[call.script], len(call.keys), *call.keys, *call.args)
            return list(await pipe.execute(raise_on_error=False))

    async def drain(self) -> None:
        """Wait for every batch already sent (shutdown, tests)."""
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)
