"""HTTP front of the simulated engine: OpenAI chat/completions, ``/metrics``, health.

The app is built by :func:`build_app` around one :class:`SimEngine`; nothing lives at
module level. Metric names are vLLM's (``vllm:num_requests_running``, ...), in a
registry owned by the engine, plus ``oss_serving_sim_info`` that says the engine is
simulated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from loadtest.sim.profile import EngineProfile, template_tokens
from loadtest.sim.scheduler import SimRequest, SimScheduler, block_hashes
from loadtest.sim.words import WORDS

__all__ = ["SimEngine", "SimFaults", "build_app", "prompt_text", "word_token_ids"]

_WORDS = WORDS[:44]  # the simulated engine's vocabulary: the 44 commonest words

_LAT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


def word_token_ids(text: str) -> list[int]:
    """Default tokenizer of the simulation: one token per whitespace-separated word."""
    return [zlib.crc32(w.encode()) for w in text.split()]


@dataclass
class SimFaults:
    """What a test switches on at run time to make the engine an unreliable upstream."""

    status: int | None = None
    """Answer every request with this HTTP error status (OpenAI error body)."""

    delay_s: float = 0.0
    """Wait this long before answering (before the response headers)."""

    api_key: str | None = None
    """Require ``Authorization: Bearer <api_key>`` (401 otherwise)."""

    bodies: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=64))
    """The last request bodies received, newest last."""


@dataclass(eq=False)
class _Live:
    req: SimRequest
    queue: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    arrival: float = 0.0
    first_token: float | None = None


class SimEngine:
    """A :class:`SimScheduler` run in real time, with vLLM-named metrics."""

    def __init__(
        self,
        profile: EngineProfile,
        model: str,
        tokenize: Callable[[str], list[int]] = word_token_ids,
    ) -> None:
        self.profile = profile
        self.model = model
        self.tokenize = tokenize
        self.sched = SimScheduler(profile)
        self._live: dict[SimRequest, _Live] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.faults = SimFaults()
        self.registry = CollectorRegistry()
        lab = ["model_name", "engine"]
        r = self.registry
        self.g_running = Gauge("vllm:num_requests_running", "Requests in the batch.", lab, registry=r)
        self.g_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting.", lab, registry=r)
        self.g_kv = Gauge("vllm:kv_cache_usage_perc", "KV cache usage (1 = full).", lab, registry=r)
        self.c_prompt = Counter("vllm:prompt_tokens", "Prefill tokens processed.", lab, registry=r)
        self.c_gen = Counter("vllm:generation_tokens", "Generation tokens processed.", lab, registry=r)
        self.c_preempt = Counter("vllm:num_preemptions", "Preemptions.", lab, registry=r)
        self.c_pq = Counter("vllm:prefix_cache_queries", "Prefix cache queried tokens.", lab, registry=r)
        self.c_ph = Counter("vllm:prefix_cache_hits", "Prefix cache hit tokens.", lab, registry=r)
        self.c_success = Counter(
            "vllm:request_success", "Finished requests.", [*lab, "finished_reason"], registry=r
        )
        self.h_ttft = Histogram(
            "vllm:time_to_first_token_seconds", "TTFT.", lab, buckets=_LAT_BUCKETS, registry=r
        )
        self.h_e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "E2E latency.", lab, buckets=_LAT_BUCKETS, registry=r
        )
        self.h_queue = Histogram(
            "vllm:request_queue_time_seconds", "Time waiting.", lab, buckets=_LAT_BUCKETS, registry=r
        )
        self.h_itl = Histogram(
            "vllm:inter_token_latency_seconds", "Inter-token latency.", lab, buckets=_LAT_BUCKETS, registry=r
        )
        info = Gauge(
            "vllm:cache_config_info",
            "KV cache configuration.",
            ["block_size", "num_gpu_blocks", "enable_prefix_caching"],
            registry=r,
        )
        info.labels(
            str(profile.block_size), str(profile.num_kv_blocks), str(profile.enable_prefix_caching)
        ).set(1)
        sim = Gauge(
            "oss_serving_sim_info",
            "This engine is simulated (planning and test tool).",
            ["profile"],
            registry=r,
        )
        sim.labels(profile.name).set(1)
        self._lab = (model, "0")

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_t = loop.time()
        while True:
            if not self.sched.has_work:
                self._wake.clear()
                await self._wake.wait()
                next_t = loop.time()
            out = self.sched.step(loop.time())
            next_t = max(next_t + out.duration, loop.time() - 0.05)
            delay = next_t - loop.time()
            await asyncio.sleep(delay if delay > 0 else 0)
            now = loop.time()
            if out.prefill_tokens:
                self.c_prompt.labels(*self._lab).inc(out.prefill_tokens)
            if out.tokens:
                self.c_gen.labels(*self._lab).inc(len(out.tokens))
            if out.preempted:
                self.c_preempt.labels(*self._lab).inc(len(out.preempted))
            for req in out.admitted:
                live = self._live.get(req)
                if live is not None and req.generated == 1:
                    self.c_pq.labels(*self._lab).inc(req.prompt_len)
                    self.c_ph.labels(*self._lab).inc(req.cached_tokens)
                    self.h_queue.labels(*self._lab).observe(
                        max(0.0, (req.first_scheduled or now) - live.arrival)
                    )
            for req in out.tokens:
                live = self._live.get(req)
                if live is None:
                    continue
                if live.first_token is None:
                    live.first_token = now
                    self.h_ttft.labels(*self._lab).observe(now - live.arrival)
                else:
                    self.h_itl.labels(*self._lab).observe(out.duration)
                live.queue.put_nowait(1)
            for req in out.finished:
                live = self._live.pop(req, None)
                if live is not None:
                    live.queue.put_nowait(0)
                    self.h_e2e.labels(*self._lab).observe(now - live.arrival)
                    self.c_success.labels(*self._lab, "length").inc()
            self._update_gauges()

    def _update_gauges(self) -> None:
        self.g_running.labels(*self._lab).set(len(self.sched.running))
        self.g_waiting.labels(*self._lab).set(len(self.sched.waiting))
        self.g_kv.labels(*self._lab).set(self.sched.kv_usage)

    def metrics_text(self) -> bytes:
        self._update_gauges()
        return generate_latest(self.registry)

    # -- requests -------------------------------------------------------------------
    def submit(self, prompt: str, max_tokens: int, extra_prompt_tokens: int = 0) -> _Live:
        """Queue a request; raises ValueError when it can never fit."""
        ids = self.tokenize(prompt)
        prompt_len = len(ids) + extra_prompt_tokens
        if prompt_len + max_tokens > self.profile.max_model_len:
            raise ValueError(
                f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds "
                f"max_model_len {self.profile.max_model_len}"
            )
        req = SimRequest(
            rid=uuid.uuid4().hex,
            prompt_len=max(1, prompt_len),
            max_tokens=max_tokens,
            hashes=block_hashes(ids, self.profile.block_size),
        )
        if not self.sched.fits_ever(req):
            raise ValueError("request does not fit in the KV cache")
        live = _Live(req, arrival=asyncio.get_running_loop().time())
        self._live[req] = live
        self.sched.add(req)
        self._wake.set()
        return live

    def abort(self, live: _Live) -> None:
        self._live.pop(live.req, None)
        self.sched.abort(live.req)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)


async def _fault(engine: SimEngine, request: Request, body: Any) -> Response | None:
    faults = engine.faults
    if isinstance(body, dict):
        faults.bodies.append(body)
    if faults.delay_s > 0:
        await asyncio.sleep(faults.delay_s)
    if faults.api_key is not None and request.headers.get("authorization") != f"Bearer {faults.api_key}":
        return _error(401, "invalid API key", "authentication_error")
    if faults.status is not None:
        return _error(faults.status, f"simulated failure {faults.status}", "server_error")
    return None


def _tool_call(body: dict[str, Any]) -> dict[str, Any] | None:
    """A call of the request's first tool, unless tools are off (``tool_choice: none``)."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or body.get("tool_choice") == "none":
        return None
    fn = tools[0].get("function", tools[0]) if isinstance(tools[0], dict) else {}
    name = str(fn.get("name", "tool"))
    return {
        "id": "call_" + uuid.uuid4().hex[:12],
        "type": "function",
        "function": {"name": name, "arguments": "{}"},
    }


def prompt_text(body: dict[str, Any], chat: bool) -> str:
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        parts = []
        for m in msgs:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, list):
                c = " ".join(str(x.get("text", "")) for x in c if isinstance(x, dict))
            parts.append(str(c or ""))
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = " ".join(str(x) for x in prompt)
    if not isinstance(prompt, str):
        raise ValueError("'prompt' must be a string")
    return prompt


def build_app(engine: SimEngine) -> Starlette:
    """The Starlette app serving ``engine``."""
    profile = engine.profile

    async def completions(request: Request, chat: bool) -> Response:
        try:
            body = await request.json()
            fault = await _fault(engine, request, body)
            if fault is not None:
                return fault
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            prompt = prompt_text(body, chat)
            max_tokens = int(
                body.get("max_tokens") or body.get("max_completion_tokens") or profile.default_max_tokens
            )
            if max_tokens < 1:
                raise ValueError("max_tokens must be at least 1")
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            return _error(400, str(exc)[:500])
        if profile.max_waiting is not None and len(engine.sched.waiting) >= profile.max_waiting:
            return JSONResponse(
                {"error": {"message": "engine queue full", "type": "overloaded", "param": None, "code": 503}},
                503,
                headers={"Retry-After": "1"},
            )
        if profile.request_overhead_s > 0:
            await asyncio.sleep(profile.request_overhead_s)
        try:
            live = engine.submit(prompt, max_tokens, template_tokens(profile, body) if chat else 0)
        except ValueError as exc:
            return _error(400, str(exc))
        effort = body.get("reasoning_effort")
        n_reason = round(max_tokens * profile.reasoning_fraction.get(str(effort), 0.0)) if effort else 0
        call = _tool_call(body) if chat else None
        if call is not None:  # the whole output is reasoning, then the call
            n_reason = max_tokens
        rid = ("chatcmpl-" if chat else "cmpl-") + live.req.rid
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def usage() -> dict[str, Any]:
            n = live.req.generated
            return {
                "prompt_tokens": live.req.prompt_len,
                "completion_tokens": n,
                "total_tokens": live.req.prompt_len + n,
                "prompt_tokens_details": {"cached_tokens": live.req.cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": min(n, n_reason)},
            }

        def words(start: int, n: int) -> str:
            return "".join(" " + _WORDS[(start + i) % len(_WORDS)] for i in range(n))

        def piece(start: int, n: int, final: bool) -> dict[str, Any]:
            n_r = max(0, min(n, n_reason - start))
            reasoning, content = words(start, n_r), words(start + n_r, n - n_r)
            finish = "length" if final and call is None else None
            if chat:
                delta: dict[str, Any] = {}
                if reasoning:
                    delta["reasoning_content"] = reasoning
                if content:
                    delta["content"] = content
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "text": reasoning + content, "finish_reason": finish}

        if not body.get("stream"):
            try:
                while await live.queue.get():
                    pass
            except asyncio.CancelledError:
                engine.abort(live)
                raise
            n = live.req.generated
            if chat:
                message: dict[str, Any] = {
                    "role": "assistant",
                    "content": words(min(n, n_reason), n - min(n, n_reason)),
                }
                if n_reason:
                    message["reasoning_content"] = words(0, min(n, n_reason))
                choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "length"}
                if call is not None:
                    message["content"] = None
                    message["tool_calls"] = [call]
                    choice["finish_reason"] = "tool_calls"
            else:
                choice = {"index": 0, "text": words(0, n), "finish_reason": "length"}
            return JSONResponse(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": engine.model,
                    "choices": [choice],
                    "usage": usage(),
                }
            )

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> bytes:
            payload = {
                "id": rid,
                "object": chunk_obj,
                "created": created,
                "model": engine.model,
                "choices": choices,
            }
            if extra:
                payload.update(extra)
            return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

        async def stream() -> AsyncIterator[bytes]:
            # Like vLLM: the role chunk goes out with the first token, and the finish
            # reason rides on the last token's chunk.
            sent = 0
            pending = 0
            final = False
            try:
                while not final:
                    items = [await live.queue.get()]
                    while not live.queue.empty():
                        items.append(live.queue.get_nowait())
                    final = 0 in items
                    pending += sum(items)
                    if not pending or not (final or pending >= profile.stream_interval):
                        continue
                    if chat and sent == 0:
                        role = {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                        }
                        yield event([role])
                    yield event([piece(sent, pending, final)])
                    sent += pending
                    pending = 0
                if call is not None:
                    delta = {"tool_calls": [{"index": 0, **call}]}
                    yield event([{"index": 0, "delta": delta, "finish_reason": "tool_calls"}])
                if include_usage:
                    yield event([], {"usage": usage()})
                yield b"data: [DONE]\n\n"
            finally:
                if live.req in engine._live:
                    engine.abort(live)

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def chat(request: Request) -> Response:
        return await completions(request, True)

    async def responses(request: Request) -> Response:
        """A small ``/v1/responses``: one message item (after a reasoning item with an effort)."""
        try:
            body = await request.json()
            fault = await _fault(engine, request, body)
            if fault is not None:
                return fault
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            given = body.get("input")
            prompt = given if isinstance(given, str) else prompt_text({"messages": given}, True)
            max_tokens = int(body.get("max_output_tokens") or profile.default_max_tokens)
            live = engine.submit(
                prompt,
                max_tokens,
                template_tokens(profile, {"messages": given if isinstance(given, list) else []}),
            )
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            return _error(400, str(exc)[:500])
        effort = (body.get("reasoning") or {}).get("effort")
        n_reason = round(max_tokens * profile.reasoning_fraction.get(str(effort), 0.0)) if effort else 0
        rid, created = "resp_" + live.req.rid, int(time.time())
        msg_id = "msg_" + live.req.rid

        def words(start: int, n: int) -> str:
            return "".join(" " + _WORDS[(start + i) % len(_WORDS)] for i in range(n))

        def response(status: str, with_reasoning: bool = True) -> dict[str, Any]:
            n = live.req.generated
            n_r = min(n, n_reason)
            output: list[dict[str, Any]] = []
            if status == "completed":
                if n_r and with_reasoning:
                    part = {"type": "reasoning_text", "text": words(0, n_r)}
                    output.append(
                        {"id": "rs_" + live.req.rid, "type": "reasoning", "summary": [], "content": [part]}
                    )
                text = {"type": "output_text", "text": words(n_r, n - n_r), "annotations": []}
                output.append(
                    {
                        "id": msg_id,
                        "type": "message",
                        "role": "assistant",
                        "status": status,
                        "content": [text],
                    }
                )
            return {
                "id": rid,
                "object": "response",
                "created_at": created,
                "model": engine.model,
                "status": status,
                "output": output,
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "usage": {
                    "input_tokens": live.req.prompt_len,
                    "input_tokens_details": {"cached_tokens": live.req.cached_tokens},
                    "output_tokens": n,
                    "output_tokens_details": {"reasoning_tokens": n_r},
                    "total_tokens": live.req.prompt_len + n,
                },
            }

        if not body.get("stream"):
            try:
                while await live.queue.get():
                    pass
            except asyncio.CancelledError:
                engine.abort(live)
                raise
            return JSONResponse(response("completed"))

        def event(payload: dict[str, Any], seq: int) -> bytes:
            payload = {**payload, "sequence_number": seq}
            return (
                f"event: {payload['type']}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
            )

        async def stream() -> AsyncIterator[bytes]:
            # The message is the only streamed item (reasoning is not streamed here).
            item = {
                "id": msg_id,
                "type": "message",
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            where = {"item_id": msg_id, "output_index": 0, "content_index": 0}
            empty = {"type": "output_text", "text": "", "annotations": []}
            sent = 0
            try:
                yield event({"type": "response.created", "response": response("in_progress")}, 0)
                yield event({"type": "response.output_item.added", "output_index": 0, "item": item}, 1)
                yield event({"type": "response.content_part.added", **where, "part": empty}, 2)
                while await live.queue.get():
                    yield event(
                        {"type": "response.output_text.delta", **where, "delta": words(sent, 1)}, 3 + sent
                    )
                    sent += 1
                final = response("completed", with_reasoning=False)
                done = final["output"][0]
                part = done["content"][0]
                seq = 3 + sent
                yield event({"type": "response.output_text.done", **where, "text": part["text"]}, seq)
                yield event({"type": "response.content_part.done", **where, "part": part}, seq + 1)
                yield event({"type": "response.output_item.done", "output_index": 0, "item": done}, seq + 2)
                yield event({"type": "response.completed", "response": final}, seq + 3)
            finally:
                if live.req in engine._live:
                    engine.abort(live)

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def text(request: Request) -> Response:
        return await completions(request, False)

    async def models(_: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": engine.model, "object": "model", "owned_by": "oss-serving-sim"}],
            }
        )

    async def metrics(_: Request) -> Response:
        return Response(engine.metrics_text(), media_type="text/plain; version=0.0.4")

    async def health(_: Request) -> Response:
        return Response(b"", 200)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", text, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
