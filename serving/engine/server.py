"""The engine deployment: Ray Serve LLM's ``LLMServer`` around vLLM, with what we add.

``OssLLMServer`` keeps everything ``LLMServer`` does (engine start-up, placement,
health checks, vLLM's own OpenAI serving objects) and adds:

- ``generate(endpoint, body, headers)``: one entry point for chat, completions and
  ``/v1/responses`` that takes the JSON body as a plain dict (cheap to pickle, no
  pydantic iterator pitfalls) and yields the neutral items of
  :mod:`serving.engine.protocol`. ``/v1/responses`` uses the responses serving object
  that vLLM's ``init_app_state`` already built but Ray's ingress does not expose.
- stream batching that sends the first chunk at once (Ray's batcher holds it for up to
  one batching interval, which adds straight to time to first token) and batches the
  rest.
- ``stats()``: requests the engine is generating right now.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

from ray.llm._internal.serve.core.protocol import RawRequestInfo
from ray.llm._internal.serve.core.server.llm_server import LLMServer
from ray.llm._internal.serve.serving_patterns.data_parallel.dp_server import DPServer
from ray.llm._internal.serve.utils.batcher import Batcher

from serving.engine.protocol import Endpoint, EngineJSON, EngineSSE

__all__ = ["OssDPServer", "OssLLMServer", "first_fast_batches"]


async def first_fast_batches(
    generator: AsyncIterator[Any], interval_ms: float
) -> AsyncGenerator[list[Any], None]:
    """Yield the first item alone and at once, then lists batched every ``interval_ms``."""
    try:
        first = await generator.__anext__()
    except StopAsyncIteration:
        return
    yield [first]

    async def rest() -> AsyncGenerator[Any, None]:
        async for item in generator:
            yield item

    async for batch in Batcher(rest(), interval_ms=interval_ms).stream():
        yield list(batch)


def _error_json(error: Any) -> EngineJSON:
    info = error.error
    status = int(getattr(info, "code", 500) or 500)
    return EngineJSON(
        status=status,
        body={
            "error": {
                "message": info.message,
                "type": info.type,
                "param": getattr(info, "param", None),
                "code": None,
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

        def _get_batch_interval_ms(self, stream: bool = True) -> int: ...

        async def chat(self, request: Any, raw_request_info: Any = None) -> Any: ...

        async def completions(self, request: Any, raw_request_info: Any = None) -> Any: ...

    def _batch_output_stream(self, generator: AsyncGenerator[Any, None]) -> AsyncGenerator[list[Any], None]:
        interval = self._get_batch_interval_ms()
        return first_fast_batches(generator, interval)

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
        stream = await self._start(kind, body, raw)
        async for item in stream:
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
        request = ResponsesRequest.model_validate(body)
        result = await handler.create_responses(request, raw.to_starlette_request())
        if hasattr(result, "error"):
            yield _error_json(result)
            return
        if not hasattr(result, "__aiter__"):
            yield EngineJSON(status=200, body=result.model_dump(mode="json", by_alias=True))
            return

        async def events() -> AsyncGenerator[str, None]:
            async for event in result:
                kind = getattr(event, "type", "unknown")
                yield f"event: {kind}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"

        async for batch in first_fast_batches(events(), self._get_batch_interval_ms()):
            yield EngineSSE("".join(batch))

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
        return {"unfinished_requests": unfinished, "max_num_seqs": max_num_seqs, "replica_id": replica_id}


class OssLLMServer(_OssServerMixin, LLMServer):  # type: ignore[misc]
    """One vLLM engine per replica (tensor-parallel replicas topology)."""


class OssDPServer(_OssServerMixin, DPServer):  # type: ignore[misc]
    """One data-parallel rank per replica (expert-parallel topology)."""


def _in_band(error: EngineJSON) -> str:
    import json

    return f"data: {json.dumps(error.body)}\n\n"
