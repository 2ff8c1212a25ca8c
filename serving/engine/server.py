"""The engine deployment: Ray Serve LLM's ``LLMServer`` around vLLM, with what we add.

``OssLLMServer`` keeps everything ``LLMServer`` does (engine start-up, placement,
health checks, vLLM's own OpenAI serving objects) and adds:

- ``generate(endpoint, body, headers)``: one entry point for chat, completions and
  ``/v1/responses`` that takes the JSON body as a plain dict (cheap to pickle, no
  pydantic iterator pitfalls) and yields the neutral items of
  :mod:`serving.engine.protocol`. ``/v1/responses`` uses the responses serving object
  that vLLM's ``init_app_state`` already built but Ray's ingress does not expose.
- paced stream batching (:class:`StreamPacer`): what is ready goes out at once after a
  quiet spell, so the first token is never held (Ray's batcher holds it for up to one
  interval, which adds straight to time to first token); during steady decoding each
  stream sends at most one batch per interval, and the interval grows with the number of
  streams so that the replica's items per second, each costing CPU on two Ray hops, stay
  within a budget.
- ``stats()``: requests the engine is generating right now.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

from ray.llm._internal.serve.core.protocol import RawRequestInfo
from ray.llm._internal.serve.core.server.llm_server import LLMServer
from ray.llm._internal.serve.serving_patterns.data_parallel.dp_server import DPServer

from serving.engine.protocol import Endpoint, EngineJSON, EngineSSE
from serving.engine.request_errors import clean_message, describe, is_client_error

__all__ = ["OssDPServer", "OssLLMServer", "StreamPacer", "paced_batches"]

log = logging.getLogger("oss_serving.engine")


class StreamPacer:
    """How long one replica's streams gather items before sending them.

    Every item a stream sends crosses two Ray hops (engine replica -> gateway replica ->
    HTTP proxy), and each costs CPU on both ends of each hop, whatever it carries. Sending
    one item per token makes that cost grow with concurrency (and on a small machine it
    is taken from the engine). So the replica spends a budget of ``items_per_s`` items per
    second over all its streams: with ``n`` streams running each sends at most one batch
    every ``n / items_per_s`` seconds, never more often than ``min_interval_ms`` and never
    less often than ``max_interval_ms``. One stream alone streams nearly token by token.
    """

    def __init__(self, min_interval_ms: float, max_interval_ms: float, items_per_s: float) -> None:
        self._min_s = min_interval_ms / 1000
        self._max_s = max(max_interval_ms, min_interval_ms) / 1000
        self._items_per_s = items_per_s
        self.active = 0
        """Streams of this replica that are running now."""

    def interval_s(self) -> float:
        return min(max(self._min_s, self.active / self._items_per_s), self._max_s)


_END = object()


async def paced_batches(generator: AsyncIterator[Any], pacer: StreamPacer) -> AsyncGenerator[list[Any], None]:
    """Yield ``generator``'s items in lists, paced by ``pacer``.

    What is ready goes out at once when the stream has been quiet for an interval: the
    first items (vLLM's role chunk and first token, so time to first token pays nothing)
    and anything after a pause. Items that follow a send closely are gathered until one
    interval after it. The end of the stream is sent as soon as it comes, and an error
    of the generator is raised after the items before it.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    failure: list[BaseException] = []

    async def read() -> None:
        try:
            async for item in generator:
                queue.put_nowait(item)
        except Exception as exc:
            failure.append(exc)
        finally:
            queue.put_nowait(_END)

    def take_ready(batch: list[Any]) -> bool:
        while not queue.empty():
            item = queue.get_nowait()
            if item is _END:
                return True
            batch.append(item)
        return False

    reader = loop.create_task(read(), name="oss-serving-stream-reader")
    pacer.active += 1
    last_sent: float | None = None
    try:
        while True:
            item = await queue.get()
            ended = item is _END
            batch = [] if ended else [item]
            if not ended:
                await asyncio.sleep(0)  # items of the same engine step are queued right behind it
                if last_sent is not None:
                    try:
                        async with asyncio.timeout_at(last_sent + pacer.interval_s()):
                            while not ended:
                                item = await queue.get()
                                ended = item is _END
                                if not ended:
                                    batch.append(item)
                    except TimeoutError:
                        pass
                ended = take_ready(batch) or ended
            if batch:
                yield batch
                last_sent = loop.time()
            if ended:
                if failure:
                    raise failure[0]
                return
    finally:
        pacer.active -= 1
        if not reader.done():
            reader.cancel()


def _error_json(error: Any) -> EngineJSON:
    info = error.error
    status = int(getattr(info, "code", 500) or 500)
    # vLLM's 4xx messages are str(exception): pydantic's text, vLLM's "(parameter=...)" tail
    message = clean_message(str(info.message)) if status < 500 else info.message
    return EngineJSON(
        status=status,
        body={
            "error": {
                "message": message,
                "type": info.type,
                "param": getattr(info, "param", None),
                "code": None,
            }
        },
    )


def _client_error_json(exc: BaseException) -> EngineJSON:
    """A request vLLM's models rejected inside the engine: its 4xx, in OpenAI's error body,
    with a clean message (never pydantic's text or an exception's class name)."""
    error = describe(exc)
    return EngineJSON(
        status=error.status,
        body={
            "error": {
                "message": error.message,
                "type": "invalid_request_error",
                "param": error.param,
                "code": error.code,
            }
        },
    )


def _sse_text(parts: list[Any]) -> tuple[str, EngineJSON | None]:
    texts: list[str] = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif hasattr(part, "error"):
            return "".join(texts), _error_json(part)
        else:
            texts.append(f"data: {part.model_dump_json()}\n\n")
    return "".join(texts), None


class _OssServerMixin:
    """What oss-serving adds to Ray Serve LLM's servers (see the module docstring)."""

    if TYPE_CHECKING:  # provided by LLMServer at runtime
        engine: Any
        _llm_config: Any

        async def chat(self, request: Any, raw_request_info: Any = None) -> Any: ...

        async def completions(self, request: Any, raw_request_info: Any = None) -> Any: ...

    def _pacer(self) -> StreamPacer:
        pacer: StreamPacer | None = getattr(self, "_oss_pacer", None)
        if pacer is None:
            from serving.config import StreamingConfig

            cfg = (getattr(self, "_llm_config", None) and self._llm_config.experimental_configs) or {}
            defaults = StreamingConfig()  # one place for the defaults: the configuration
            pacer = StreamPacer(
                float(cfg.get("stream_batching_interval_ms", defaults.min_interval_ms)),
                float(cfg.get("stream_max_interval_ms", defaults.max_interval_ms)),
                float(cfg.get("stream_items_per_s", defaults.items_per_s)),
            )
            self._oss_pacer = pacer
        return pacer

    def _batch_output_stream(self, generator: AsyncGenerator[Any, None]) -> AsyncGenerator[list[Any], None]:
        return paced_batches(generator, self._pacer())

    async def generate(
        self, endpoint: str, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncGenerator[EngineJSON | EngineSSE, None]:
        """Run one request; see :mod:`serving.engine.protocol` for the contract."""
        raw = RawRequestInfo(headers=headers)
        kind = Endpoint(endpoint)
        if kind is Endpoint.responses:
            async for item in self._responses(body, raw):
                yield item
            return
        # vLLM validates the request and renders its prompt before its first output: a
        # request it rejects there is a 4xx, not an engine failure.
        try:
            started = await self._start(kind, body, raw)
            first = await anext(started)
        except StopAsyncIteration:
            return
        except Exception as exc:
            if not is_client_error(exc, before_output=True):
                raise
            log.info("request rejected while vLLM prepared it", exc_info=True)
            yield _client_error_json(exc)
            return
        async for item in _prepend(first, started):
            if isinstance(item, list):
                text, error = _sse_text(item)
                if text:
                    yield EngineSSE(text)
                if error is not None:
                    yield error if not text else EngineSSE(_in_band(error))
                    return
            elif hasattr(item, "error"):
                yield _error_json(item)
            else:
                yield EngineJSON(status=200, body=item.model_dump(mode="json"))

    async def _start(self, kind: Endpoint, body: dict[str, Any], raw: RawRequestInfo) -> AsyncIterator[Any]:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        if kind is Endpoint.chat:
            result: AsyncIterator[Any] = await self.chat(ChatCompletionRequest.model_validate(body), raw)
        else:
            result = await self.completions(CompletionRequest.model_validate(body), raw)
        return result

    async def _responses(
        self, body: dict[str, Any], raw: RawRequestInfo
    ) -> AsyncGenerator[EngineJSON | EngineSSE, None]:
        from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

        handler = getattr(getattr(self.engine, "_app_state", None), "openai_serving_responses", None)
        if handler is None:
            yield EngineJSON(
                status=400,
                body={
                    "error": {
                        "message": "this model does not support the Responses API",
                        "type": "invalid_request_error",
                        "param": "model",
                        "code": None,
                    }
                },
            )
            return
        try:
            request = ResponsesRequest.model_validate(body)
            result = await handler.create_responses(request, raw.to_starlette_request())
        except Exception as exc:  # rejected by vLLM's models while preparing or building the answer
            if not is_client_error(exc, before_output=True):
                raise
            log.info("request rejected while vLLM prepared it", exc_info=True)
            yield _client_error_json(exc)
            return
        if hasattr(result, "error"):
            yield _error_json(result)
            return
        if not hasattr(result, "__aiter__"):
            yield EngineJSON(status=200, body=result.model_dump(mode="json", by_alias=True))
            return
        # vLLM builds the first event from the request (ResponsesResponse.from_request): a
        # request its answer model rejects fails here, before any byte is sent, so it can
        # still be answered with a 400.
        try:
            first = await anext(result)
        except StopAsyncIteration:
            return
        except Exception as exc:
            if not is_client_error(exc, before_output=True):
                raise
            log.info("request rejected while vLLM prepared it", exc_info=True)
            await result.aclose()
            yield _client_error_json(exc)
            return

        def sse(event: Any) -> str:
            kind = getattr(event, "type", "unknown")
            return f"event: {kind}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"

        async def events() -> AsyncGenerator[str, None]:
            yield sse(first)
            async for event in result:
                yield sse(event)

        async for batch in paced_batches(events(), self._pacer()):
            yield EngineSSE("".join(batch))

    async def probe(self, headers: dict[str, str]) -> dict[str, Any]:
        """``stats()`` of the replica the router chose by ``headers`` (``HINT_ONLY``): how the
        gateway asks one quarantined replica whether it answers again."""
        return await self.stats()

    async def stats(self) -> dict[str, Any]:
        """This replica: its id, requests its engine is generating, and its ``max_num_seqs``."""
        from ray import serve

        client = getattr(self.engine, "_engine_client", None)
        unfinished = int(client.get_num_unfinished_requests()) if client is not None else 0
        config = getattr(client, "vllm_config", None)
        max_num_seqs = int(config.scheduler_config.max_num_seqs) if config is not None else 0
        try:
            replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a Serve replica (tests)
            replica_id = "local"
        return {
            "unfinished_requests": unfinished,
            "max_num_seqs": max_num_seqs,
            "replica_id": replica_id,
            "pid": os.getpid(),
        }


class OssLLMServer(_OssServerMixin, LLMServer):  # type: ignore[misc]
    """One vLLM engine per replica (tensor-parallel replicas topology)."""


class OssDPServer(_OssServerMixin, DPServer):  # type: ignore[misc]
    """One data-parallel rank per replica (expert-parallel topology)."""


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncGenerator[Any, None]:
    yield first
    async for item in rest:
        yield item


def _in_band(error: EngineJSON) -> str:
    import json

    return f"data: {json.dumps(error.body)}\n\n"
