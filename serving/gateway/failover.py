"""Engine failure made invisible: quarantine of failed replicas, and stream migration.

Policy only: the pipeline (:mod:`serving.gateway.service`) decides when to retry or
migrate; this module keeps the replicas to avoid and turns a broken stream into a
continuation and back.

- :class:`Quarantine`: replicas of a model that failed or stalled. Every request to the
  model carries them in the ``HINT_AVOID`` routing hint (the engine deployment's router
  avoids them while another replica is left), until a probe sent to that very replica
  (``HINT_ONLY``) is answered again, or ``failover.quarantine_s`` has passed (Ray Serve
  replaces a dead replica meanwhile).
- :class:`StreamSplice`: one chat or completions stream that may have to move. The engine
  is asked for token ids (vLLM's ``return_token_ids``), which the splice takes out of the
  events again unless the client asked for them itself. When the replica dies or stalls
  mid-stream, :meth:`StreamSplice.continuation` is a raw ``/v1/completions`` request of
  the rendered prompt's token ids plus every token id already streamed, with the remaining
  output budget and the same sampling parameters; :meth:`StreamSplice.translate` turns its
  events into the client's format (the same id, ``created`` and model; chat deltas for a
  chat stream) and its usage into the whole response's (each token counted once).
- gpt-oss (harmony): the continuation is asked for its special tokens, and
  :class:`HarmonyText` follows the channels in its text, so reasoning (``analysis``)
  stays in ``reasoning`` and the answer (``final``) in ``content`` after the splice.
  A stream cut inside a message header is continued from the end of the last whole
  message (the header's tokens showed the client nothing).

What is not migrated (the stream ends with an in-band error, as before): several choices
(``n`` > 1), requests with tools (a tool call cut in two cannot be spliced), logprobs,
``/v1/responses`` streams, and streams whose engine never sent the prompt's token ids.
With ``temperature`` > 0 the continuation samples afresh (a seed restarts its generator),
and frequency/presence penalties see the earlier output as prompt.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from serving.config import FailoverConfig, ModelConfig, ModelFamily
from serving.engine.protocol import EngineClient
from serving.engine.routing_hints import HINT_AVOID
from serving.metrics import GatewayMetrics
from serving.wire import Endpoint

__all__ = ["Failover", "HarmonyText", "Quarantine", "StreamSplice", "migratable"]

log = logging.getLogger("oss_serving.gateway")

# o200k_harmony's special tokens (fixed ids of the gpt-oss tokenizer).
HARMONY_RETURN = 200002
HARMONY_CHANNEL = 200005
HARMONY_START = 200006
HARMONY_END = 200007
HARMONY_MESSAGE = 200008
HARMONY_CALL = 200012
_HARMONY_BOUNDARIES = frozenset(
    (HARMONY_RETURN, HARMONY_CHANNEL, HARMONY_START, HARMONY_END, HARMONY_MESSAGE, HARMONY_CALL)
)

_SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "ignore_eos",
    "logit_bias",
    "min_tokens",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "spaces_between_special_tokens",
)
_OUTPUT_KEYS = ("max_tokens", "max_completion_tokens")


# ---------------------------------------------------------------------------- quarantine
@dataclass
class _Held:
    until: float
    cause: str


class Quarantine:
    """Replicas kept out of routing, per model (one per gateway replica)."""

    def __init__(
        self, failover: Mapping[str, FailoverConfig], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._failover = dict(failover)
        self._clock = clock
        self._held: dict[str, dict[str, _Held]] = {}

    def add(self, model: str, replica: str | None, cause: str) -> None:
        if not replica:
            return
        config = self._failover.get(model) or FailoverConfig()
        held = self._held.setdefault(model, {})
        if replica not in held:
            log.warning("engine replica %s of %s kept out of routing (%s)", replica, model, cause)
        held[replica] = _Held(self._clock() + config.quarantine_s, cause)

    def avoided(self, model: str) -> list[str]:
        held = self._held.get(model) or {}
        now = self._clock()
        for replica in [r for r, h in held.items() if h.until <= now]:
            del held[replica]
            log.info("engine replica %s of %s back in routing (quarantine over)", replica, model)
        return sorted(held)

    def route(self, model: str, headers: dict[str, str]) -> None:
        """Add the avoid hint to a request's routing headers: always (empty when no replica
        is held), so the router also reports the replica it chose when routing is off."""
        headers[HINT_AVOID] = ",".join(self.avoided(model))

    def release(self, model: str, replica: str) -> None:
        if (self._held.get(model) or {}).pop(replica, None) is not None:
            log.info("engine replica %s of %s answers again: back in routing", replica, model)

    def counts(self) -> dict[str, int]:
        return {model: len(self.avoided(model)) for model in self._held}

    async def probe_all(self, probe: Callable[[str, str], Awaitable[Any]]) -> None:
        """Probe every held replica once (``probe(model, replica)``); release those that answer."""
        for model in list(self._held):
            for replica in self.avoided(model):
                try:
                    await probe(model, replica)
                except Exception:
                    continue
                self.release(model, replica)


# ---------------------------------------------------------------------------- migration
def migratable(endpoint: Endpoint, body: Mapping[str, Any], config: FailoverConfig) -> bool:
    """Whether a stream of this request could be continued elsewhere."""
    if not config.migrate_streams or config.max_migrations < 1 or not body.get("stream"):
        return False
    if endpoint not in (Endpoint.chat, Endpoint.completions):
        return False
    if (body.get("n") or 1) != 1 or body.get("tools") or body.get("logprobs") or body.get("top_logprobs"):
        return False
    raw_prompt = endpoint is Endpoint.completions
    odd = raw_prompt and (body.get("echo") or body.get("suffix") or not isinstance(body.get("prompt"), str))
    return not odd


@dataclass
class HarmonyText:
    """The channel state of harmony text with its special tokens, as a continuation streams it."""

    channel: str | None = None
    """The channel whose message text streams now; None between messages or in a header."""
    header: str | None = None
    """The header being read (after ``<|start|>`` or ``<|channel|>``), until ``<|message|>``."""
    pending: str = ""
    raw: str = ""
    """Everything since the last message ended, markers included (see :meth:`finish`)."""

    def feed(self, text: str) -> list[tuple[str, str]]:
        """(channel, text) pieces of message text in ``text``."""
        out: list[tuple[str, str]] = []
        self.raw += text
        data, self.pending = self.pending + text, ""
        while data:
            at = data.find("<|")
            if at < 0:
                self._plain(data, out)
                break
            if at > 0:
                self._plain(data[:at], out)
                data = data[at:]
            close = data.find("|>")
            if close < 0:
                self.pending = data  # a marker cut across two events
                break
            self._marker(data[: close + 2])
            data = data[close + 2 :]
        return out

    def _plain(self, text: str, out: list[tuple[str, str]]) -> None:
        if self.header is not None:
            self.header += text
        elif self.channel is not None and text:
            out.append((self.channel, text))

    def _marker(self, marker: str) -> None:
        if marker == "<|start|>":
            self.header, self.channel = "", None
        elif marker in ("<|channel|>", "<|constrain|>"):
            self.header, self.channel = (self.header or "") + marker, None
        elif marker == "<|message|>":
            header = self.header or ""
            name = header.split("<|channel|>", 1)[1] if "<|channel|>" in header else "final"
            self.channel = name.split("<|", 1)[0].strip().split(" ")[0] or "final"
            self.header = None
        else:  # <|end|>, <|return|>, <|call|>
            self.channel = self.header = None
            self.raw = ""

    def finish(self) -> str:
        """What vLLM sends as ``content`` when a generation ends outside any message (no
        header closed, e.g. a model that never wrote one): the raw text since the last
        message ended. Nothing when it ended inside a message or between two."""
        return self.raw if self.channel is None and self.raw else ""


@dataclass
class StreamSplice:
    """One stream that may move to another replica (see the module docstring)."""

    endpoint: Endpoint
    body: dict[str, Any]
    """The request as the engine got it (after the gateway's limits)."""
    harmony: bool = False
    client_wants_ids: bool = False
    migrations: int = 0
    announce: bool = False
    id: str | None = None
    created: int | None = None
    model: str | None = None
    prompt_ids: list[int] | None = None
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    reasoning_field: str = "reasoning"
    last_kind: str | None = None
    """``reasoning`` or ``content``: what the last delta of the stream carried (for harmony:
    of the current message; None until its first text)."""
    _prior_output: int = 0
    _harmony: HarmonyText | None = None
    _continuing: bool = False
    _sent_usage: bool = False
    _resent: int = 0
    """Token ids of the continuation the client already got (a header regenerated after a
    cut-back): not sent to it twice."""

    @classmethod
    def start(
        cls, endpoint: Endpoint, client_body: Mapping[str, Any], engine_body: dict[str, Any], *, harmony: bool
    ) -> StreamSplice:
        """Ask the engine for token ids (in ``engine_body``) and follow the stream."""
        splice = cls(
            endpoint,
            dict(engine_body),
            harmony=harmony,
            client_wants_ids=bool(client_body.get("return_token_ids")),
        )
        engine_body["return_token_ids"] = True
        return splice

    # ------------------------------------------------------------ the original stream
    def observe(self, text: str) -> str:
        """One item of the original stream: note what migration needs, take out what the
        client did not ask for."""
        return self._events(text, self._observe_event)

    def _observe_event(self, data: dict[str, Any]) -> dict[str, Any] | None:
        self.id = self.id or data.get("id")
        self.created = self.created or data.get("created")
        self.model = self.model or data.get("model")
        ids = data.get("prompt_token_ids")
        if isinstance(ids, list) and self.prompt_ids is None:
            self.prompt_ids = [int(t) for t in ids]
        for choice in data.get("choices") or ():
            ids = choice.get("prompt_token_ids")  # where completions streams carry them
            if isinstance(ids, list) and self.prompt_ids is None:
                self.prompt_ids = [int(t) for t in ids]
            tokens = choice.get("token_ids")
            if isinstance(tokens, list):
                self.generated.extend(int(t) for t in tokens)
                if self.harmony and _HARMONY_BOUNDARIES.intersection(tokens):
                    self.last_kind = None  # a new message (or header): its kind is not known yet
            delta = choice.get("delta") or {}
            for key in ("reasoning", "reasoning_content"):
                if delta.get(key):
                    self.reasoning_field, self.last_kind = key, "reasoning"
            if delta.get("content") or choice.get("text"):
                self.last_kind = "content"
            if choice.get("finish_reason"):
                self.finished = True
            if not self.client_wants_ids:
                choice.pop("token_ids", None)
                choice.pop("prompt_token_ids", None)
        if not self.client_wants_ids:
            data.pop("prompt_token_ids", None)
            data.pop("prompt_text", None)
        if data.get("usage") is not None and not data.get("choices"):
            self.finished = True
        return data

    def relay(self, text: str) -> str:
        """One item of the stream as the client gets it (original or continuation)."""
        return self.translate(text) if self._continuing else self.observe(text)

    @property
    def can_migrate(self) -> bool:
        return self.prompt_ids is not None and not self.finished

    # ------------------------------------------------------------ the continuation
    def continuation(self) -> dict[str, Any] | None:
        """The raw continuation request, or None when nothing is left to generate."""
        assert self.prompt_ids is not None
        prior = list(self.generated)
        if self.harmony:
            self._harmony = HarmonyText()
            if self._inside_message(prior) and self.last_kind is not None:
                self._harmony.channel = "analysis" if self.last_kind == "reasoning" else "final"
            else:  # between messages or in a header: from the end of the last whole message
                last_end = max((i for i, t in enumerate(prior) if t == HARMONY_END), default=-1)
                prior = prior[: last_end + 1]
        self._resent = len(self.generated) - len(prior)  # header tokens the client has had
        self.generated = prior
        limit = next((self.body[k] for k in _OUTPUT_KEYS if isinstance(self.body.get(k), int)), None)
        remaining = None if limit is None else int(limit) - len(prior)
        if remaining is not None and remaining <= 0:
            return None
        body: dict[str, Any] = {
            "model": self.body.get("model"),
            "prompt": self.prompt_ids + prior,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        body.update({k: self.body[k] for k in _SAMPLING_KEYS if k in self.body})
        if remaining is not None:
            body["max_tokens"] = remaining
        if "cache_salt" in self.body:
            body["cache_salt"] = self.body["cache_salt"]
        if self.harmony:
            body["skip_special_tokens"] = False
            body["stop_token_ids"] = [HARMONY_RETURN, HARMONY_CALL]
        self._prior_output = len(prior)
        self._continuing = True
        self.migrations += 1
        return body

    @staticmethod
    def _inside_message(tokens: list[int]) -> bool:
        """Whether ``tokens`` end inside a message's text (after its ``<|message|>``)."""
        last_boundary = max((i for i, t in enumerate(tokens) if t in _HARMONY_BOUNDARIES), default=-1)
        return last_boundary >= 0 and tokens[last_boundary] == HARMONY_MESSAGE

    def translate(self, text: str) -> str:
        """One item of the continuation, in the client's format."""
        return self._events(text, self._translate_event)

    def _translate_event(self, data: dict[str, Any]) -> dict[str, Any] | None:
        usage = data.get("usage")
        choices = data.get("choices") or []
        if not choices:
            if usage is None:
                return None
            self.finished = True
            if self._sent_usage:  # the pipeline takes it out when the client did not ask
                return None
            self._sent_usage = True
            return self._frame([], self._usage(usage))
        choice = choices[0]
        tokens = choice.get("token_ids")
        if isinstance(tokens, list):
            self.generated.extend(int(t) for t in tokens)
        finish = choice.get("finish_reason")
        if finish:
            self.finished = True
        piece = str(choice.get("text") or "")
        out: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.endpoint is Endpoint.completions:
            out["text"] = piece
        else:
            delta: dict[str, Any] = {}
            if self._harmony is not None:
                for channel, part in self._harmony.feed(piece):
                    key = self.reasoning_field if channel == "analysis" else "content"
                    delta[key] = delta.get(key, "") + part
                if finish and (recovered := self._harmony.finish()):
                    delta["content"] = delta.get("content", "") + recovered
            elif piece:
                delta["content"] = piece
            if not delta and not finish and not (self.client_wants_ids and tokens):
                return None
            out["delta"] = delta
        if self.client_wants_ids and isinstance(tokens, list):
            skip = min(self._resent, len(tokens))
            self._resent -= skip
            out["token_ids"] = tokens[skip:]
        frame = self._frame([out], None)
        if finish and self.announce:
            frame["oss_serving"] = {"migrations": self.migrations}
        return frame

    def _usage(self, usage: Mapping[str, Any]) -> dict[str, Any]:
        prompt = len(self.prompt_ids or ())
        completion = self._prior_output + int(usage.get("completion_tokens") or 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _frame(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.endpoint is Endpoint.chat else "text_completion"
        frame: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            frame["usage"] = usage
        return frame

    # ------------------------------------------------------------ SSE plumbing
    @staticmethod
    def _events(text: str, each: Callable[[dict[str, Any]], dict[str, Any] | None]) -> str:
        out: list[str] = []
        for event in text.split("\n\n"):
            if not event.strip():
                continue
            if not event.startswith("data: ") or event.startswith("data: [DONE]"):
                out.append(event + "\n\n")
                continue
            try:
                data = json.loads(event[6:])
            except ValueError:
                out.append(event + "\n\n")
                continue
            if not isinstance(data, dict) or "error" in data:
                out.append(event + "\n\n")
                continue
            kept = each(data)
            if kept is not None:
                out.append("data: " + json.dumps(kept, separators=(",", ":"), ensure_ascii=False) + "\n\n")
        return "".join(out)


# ---------------------------------------------------------------------------- the policy
class Failover:
    """Per-model failover settings, the quarantine and the counting, for the pipeline."""

    def __init__(self, models: Sequence[ModelConfig], metrics: GatewayMetrics) -> None:
        self._configs = {m.name: m.failover for m in models}
        self._harmony = {m.name for m in models if m.resolved_family is ModelFamily.gpt_oss}
        self.quarantine = Quarantine(self._configs)
        self._metrics = metrics

    def config(self, model: str) -> FailoverConfig:
        return self._configs.get(model) or FailoverConfig()

    def splice(
        self, model: str, endpoint: Endpoint, client_body: Mapping[str, Any], engine_body: dict[str, Any]
    ) -> StreamSplice | None:
        """A splice that follows this stream (and asks the engine for token ids), if it may move."""
        config = self.config(model)
        if not migratable(endpoint, client_body, config):
            return None
        splice = StreamSplice.start(endpoint, client_body, engine_body, harmony=model in self._harmony)
        splice.announce = config.announce_migration
        return splice

    def failed(self, model: str, replica: str | None, cause: str) -> None:
        """A replica failed (``engine_error``) or stalled (``stalled``): keep it out of routing."""
        self.quarantine.add(model, replica, cause)
        self._gauge()

    def retried(self, model: str, cause: str, request_id: str, attempt: int) -> None:
        self._metrics.engine_retries.labels(model=model, cause=cause).inc()
        log.warning(
            "request_id=%s: engine %s before the first byte; retry %d on another replica",
            request_id,
            cause,
            attempt,
        )

    def migrated(self, model: str, cause: str, outcome: str, request_id: str, streamed: int) -> None:
        self._metrics.stream_migrations.labels(model=model, cause=cause, outcome=outcome).inc()
        level = logging.WARNING if outcome == "continued" else logging.ERROR
        log.log(
            level,
            "request_id=%s: engine %s mid-stream after %d tokens: migration %s",
            request_id,
            cause,
            streamed,
            outcome.replace("_", " "),
        )

    async def probe(self, engines: Mapping[str, EngineClient], timeout_s: float) -> None:
        """Probe the quarantined replicas; those that answer are routed to again."""

        async def one(model: str, replica: str) -> None:
            await engines[model].probe(timeout_s, only=replica)

        await self.quarantine.probe_all(one)
        self._gauge()

    def _gauge(self) -> None:
        for model, count in self.quarantine.counts().items():
            self._metrics.replicas_quarantined.labels(model=model).set(count)
