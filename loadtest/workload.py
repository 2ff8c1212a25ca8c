"""Request mixes: what each request of a run asks for.

A workload is a YAML file validated by :class:`WorkloadSpec`. Example::

    name: chat-mix
    seed: 7
    classes:
      - name: chat
        weight: 3
        input_tokens: {dist: normal, mean: 512, std: 128, min: 32, max: 2048}
        output_tokens: 128
        shared_prefix: {groups: 4, tokens: 256}     # 4 system prompts shared by all users
        turns: {dist: uniform, min: 1, max: 4}      # conversations that grow turn by turn
        reasoning_effort: {low: 0.5, medium: 0.4, high: 0.1}
        stream: 0.9                                 # fraction of requests streamed
        tenants:
          team-a: {weight: 2, api_key: key-a}
          team-b: {weight: 1, api_key: key-b}
        priorities:
          interactive: {weight: 4, headers: {x-priority: high}}
          batch: {weight: 1, headers: {x-priority: low}}
      - name: summarize
        api: completions
        input_tokens: 1500
        output_tokens: {dist: exponential, mean: 200, max: 1024}

or a trace replay (one JSON object per line: ``timestamp`` in seconds,
``input_tokens``, ``output_tokens``, optional ``prefix_group``, ``tenant``,
``messages`` to send verbatim)::

    trace: {path: traces/day1.jsonl, speedup: 2.0}

Prompts are built with the target model's tokenizer (:mod:`loadtest.tokenizer`) so that
they have the requested number of tokens.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from loadtest.tokenizer import Tokenizer, text_of_length

__all__ = [
    "LengthDist",
    "PlannedRequest",
    "PriorityClass",
    "RequestClass",
    "SharedPrefix",
    "Tenant",
    "TraceSpec",
    "WorkloadSpec",
    "build_requests",
    "load_workload",
    "simple_workload",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class LengthDist(_Strict):
    """A distribution of token counts; a bare integer means ``constant``."""

    dist: Literal["constant", "uniform", "normal", "lognormal", "exponential"] = "constant"
    """Shape of the distribution."""
    value: int | None = Field(default=None, ge=0)
    """The value of a ``constant`` distribution."""
    mean: float | None = Field(default=None, gt=0)
    """Mean (``normal``, ``lognormal``, ``exponential``)."""
    std: float = Field(default=0.0, ge=0)
    """Standard deviation (``normal``, ``lognormal``)."""
    min: int = Field(default=1, ge=0)
    """Samples are clipped to at least this."""
    max: int = Field(default=1_000_000, ge=1)
    """Samples are clipped to at most this (for ``uniform``: the upper bound)."""

    @model_validator(mode="before")
    @classmethod
    def _from_int(cls, data: Any) -> Any:
        if isinstance(data, int) and not isinstance(data, bool):
            return {"dist": "constant", "value": data}
        return data

    @model_validator(mode="after")
    def _check(self) -> LengthDist:
        if self.dist == "constant" and self.value is None:
            raise ValueError("a constant distribution needs 'value'")
        if self.dist in ("normal", "lognormal", "exponential") and self.mean is None:
            raise ValueError(f"a {self.dist} distribution needs 'mean'")
        if self.min > self.max:
            raise ValueError("min must not exceed max")
        return self

    def sample(self, rng: np.random.Generator) -> int:
        """One sample, clipped to [min, max]."""
        if self.dist == "constant":
            assert self.value is not None
            return self.value
        if self.dist == "uniform":
            return int(rng.integers(self.min, self.max + 1))
        assert self.mean is not None
        if self.dist == "normal":
            x = rng.normal(self.mean, self.std)
        elif self.dist == "lognormal":
            sigma2 = np.log(1 + (self.std / self.mean) ** 2)
            x = rng.lognormal(np.log(self.mean) - sigma2 / 2, np.sqrt(sigma2))
        else:
            x = rng.exponential(self.mean)
        return int(np.clip(round(float(x)), self.min, self.max))


class SharedPrefix(_Strict):
    """``groups`` system prompts of ``tokens`` tokens, each shared by many users."""

    groups: int = Field(ge=1)
    """Number of distinct system prompts."""
    tokens: int = Field(ge=1)
    """Length of each system prompt."""
    name: str | None = None
    """Classes whose ``shared_prefix`` has the same name share its system prompts (by
    default each class has its own)."""


class Tenant(_Strict):
    """A client team: its share of the requests and how it authenticates."""

    weight: float = Field(default=1.0, gt=0)
    """Relative share of the class's requests."""
    api_key: str | None = None
    """Sent as ``Authorization: Bearer``; the gateway maps it to the tenant."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra headers."""


class PriorityClass(_Strict):
    """A priority lane of the gateway's queue."""

    weight: float = Field(default=1.0, gt=0)
    """Relative share of the class's requests."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Headers that select the lane."""
    body: dict[str, Any] = Field(default_factory=dict)
    """Fields merged into the request body (e.g. vLLM's ``priority``)."""


class RequestClass(_Strict):
    """One kind of request in the mix."""

    name: str = "default"
    """Label carried into the per-request results."""
    weight: float = Field(default=1.0, gt=0)
    """Relative share of the requests."""
    api: Literal["chat", "completions"] = "chat"
    """``/v1/chat/completions`` or ``/v1/completions``."""
    input_tokens: LengthDist = Field(default_factory=lambda: LengthDist(value=256))
    """New prompt tokens per request (the user message)."""
    output_tokens: LengthDist = Field(default_factory=lambda: LengthDist(value=128))
    """``max_tokens`` per request."""
    ignore_eos: bool = True
    """Ask the engine (vLLM extension) to generate exactly ``max_tokens``; gpt-oss's
    harmony format does not honour it, so its output lengths are observed, not forced."""
    shared_prefix: SharedPrefix | None = None
    """System prompts shared by many users (prefix caching)."""
    turns: LengthDist = Field(default_factory=lambda: LengthDist(value=1))
    """Turns per conversation; later turns carry the whole history."""
    open_conversations: int = Field(default=8, ge=1)
    """Conversations of this class in progress at once."""
    reasoning_effort: dict[Literal["low", "medium", "high"], float] | None = None
    """Mix of gpt-oss ``reasoning_effort`` values (relative weights)."""
    stream: float = Field(default=1.0, ge=0, le=1)
    """Fraction of requests streamed."""
    tenants: dict[str, Tenant] = Field(default_factory=dict)
    """Tenants sending this class."""
    priorities: dict[str, PriorityClass] = Field(default_factory=dict)
    """Priority lanes of this class."""
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """Fields merged into every request body (``temperature``, ...)."""


class TraceSpec(_Strict):
    """Replay a JSONL trace."""

    path: Path
    """The trace file."""
    speedup: float = Field(default=1.0, gt=0)
    """Divide the trace's timestamps by this."""
    api: Literal["chat", "completions"] = "chat"
    """API used for every replayed request."""
    stream: bool = True
    """Stream replayed requests."""


class WorkloadSpec(_Strict):
    """A request mix, or a trace to replay."""

    name: str = "workload"
    """Name shown in reports."""
    seed: int = 0
    """Seed of every random choice (lengths, classes, prompt text)."""
    classes: list[RequestClass] = Field(default_factory=list)
    """The mix; requests pick a class by weight."""
    trace: TraceSpec | None = None
    """Replay this trace instead of drawing from ``classes``."""

    @model_validator(mode="after")
    def _check(self) -> WorkloadSpec:
        if not self.classes and self.trace is None:
            raise ValueError("a workload needs 'classes' or a 'trace'")
        if self.classes and self.trace is not None:
            raise ValueError("give either 'classes' or a 'trace', not both")
        return self


def load_workload(path: str | Path) -> WorkloadSpec:
    """Read and validate a workload YAML file."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return WorkloadSpec.model_validate(data)


def simple_workload(
    input_tokens: int, output_tokens: int, stream: bool = True, seed: int = 0
) -> WorkloadSpec:
    """Fixed input and output lengths, one class (what ``--input-tokens`` builds)."""
    return WorkloadSpec(
        name=f"in{input_tokens}-out{output_tokens}",
        seed=seed,
        classes=[
            RequestClass(
                input_tokens=LengthDist(value=input_tokens),
                output_tokens=LengthDist(value=output_tokens),
                stream=1.0 if stream else 0.0,
            )
        ],
    )


@dataclass(slots=True)
class PlannedRequest:
    """One request ready to send."""

    index: int
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    stream: bool
    input_tokens: int
    output_tokens: int
    tags: dict[str, str] = field(default_factory=dict)
    offset: float | None = None
    """Send offset from a trace (seconds); ``None`` when the arrival process decides."""
    encoded: tuple[bytes, dict[str, str]] | None = field(default=None, repr=False)
    """Body bytes and headers, filled by the client before the run."""


@dataclass
class _Conversation:
    cls: int
    messages: list[dict[str, str]]
    remaining: int
    tokens: int
    key: str


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    w = np.asarray([weights[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=w / w.sum()))]


def _body(
    api: str, model: str, messages: list[dict[str, str]], max_tokens: int, stream: bool
) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if api == "chat":
        body["messages"] = messages
        return "/v1/chat/completions", body
    body["prompt"] = "\n".join(m["content"] for m in messages)
    return "/v1/completions", body


def build_requests(
    spec: WorkloadSpec, num_requests: int, tokenizer: Tokenizer, model: str
) -> list[PlannedRequest]:
    """Draw ``num_requests`` requests from the mix (or the first of the trace).

    The random stream is keyed by the workload's name as well as its seed: prompt words are
    drawn in sequence, so two workloads with one seed (a calibration's warm-up and its first
    level, the same point of two validation workloads) would otherwise open with the same
    words, and a real engine would serve one from the other's cached prefix blocks."""
    stream = zlib.crc32(spec.name.encode())
    rng = np.random.default_rng([spec.seed, stream])
    if spec.trace is not None:
        return _trace_requests(spec.trace, num_requests, tokenizer, model, rng)
    prefixes: dict[tuple[int | str, int], str] = {}
    open_convs: dict[int, list[_Conversation]] = {i: [] for i in range(len(spec.classes))}
    weights = np.asarray([c.weight for c in spec.classes], dtype=float)
    out: list[PlannedRequest] = []
    n_conv = 0
    for index in range(num_requests):
        ci = int(rng.choice(len(spec.classes), p=weights / weights.sum()))
        cls = spec.classes[ci]
        tags = {"class": cls.name}
        convs = open_convs[ci]
        conv: _Conversation | None = None
        if convs and (len(convs) >= cls.open_conversations or rng.random() < 0.5):
            conv = convs[int(rng.integers(len(convs)))]
        if conv is None:
            messages: list[dict[str, str]] = []
            tokens = 0
            if cls.shared_prefix is not None:
                g = int(rng.integers(cls.shared_prefix.groups))
                owner: int | str = ci if cls.shared_prefix.name is None else cls.shared_prefix.name
                key = (owner, g)
                if key not in prefixes:
                    seeds = [spec.seed, ci, g, stream]
                    if cls.shared_prefix.name is not None:
                        # keyed by the name, past every class index: no class's own prompts
                        seeds[1] = zlib.crc32(cls.shared_prefix.name.encode()) + len(spec.classes)
                    prefixes[key] = text_of_length(
                        tokenizer, cls.shared_prefix.tokens, np.random.default_rng(seeds)
                    )
                messages.append({"role": "system", "content": prefixes[key]})
                tokens += cls.shared_prefix.tokens
                tags["prefix_group"] = f"{owner}.{g}"
                tags["prefix_tokens"] = str(cls.shared_prefix.tokens)
            conv = _Conversation(ci, messages, max(1, cls.turns.sample(rng)), tokens, f"c{n_conv}")
            n_conv += 1
            convs.append(conv)
        n_in = cls.input_tokens.sample(rng)
        n_out = cls.output_tokens.sample(rng)
        conv.messages.append({"role": "user", "content": text_of_length(tokenizer, n_in, rng)})
        conv.tokens += n_in
        stream = bool(rng.random() < cls.stream)
        path, body = _body(cls.api, model, list(conv.messages), n_out, stream)
        if cls.ignore_eos:
            body["ignore_eos"] = True
        headers: dict[str, str] = {}
        if cls.reasoning_effort:
            effort = _pick(rng, {str(k): v for k, v in cls.reasoning_effort.items()})
            body["reasoning_effort"] = effort
            tags["reasoning_effort"] = effort
        if cls.tenants:
            tname = _pick(rng, {k: t.weight for k, t in cls.tenants.items()})
            tenant = cls.tenants[tname]
            if tenant.api_key:
                headers["Authorization"] = f"Bearer {tenant.api_key}"
            headers.update(tenant.headers)
            tags["tenant"] = tname
        if cls.priorities:
            pname = _pick(rng, {k: p.weight for k, p in cls.priorities.items()})
            headers.update(cls.priorities[pname].headers)
            body.update(cls.priorities[pname].body)
            tags["priority"] = pname
        body.update(cls.extra_body)
        turn = len([m for m in conv.messages if m["role"] == "user"])
        tags["turn"] = str(turn)
        tags["conversation"] = conv.key
        out.append(PlannedRequest(index, path, body, headers, stream, conv.tokens, n_out, tags))
        conv.remaining -= 1
        if conv.remaining <= 0:
            convs.remove(conv)
        else:
            conv.messages.append({"role": "assistant", "content": text_of_length(tokenizer, n_out, rng)})
            conv.tokens += n_out
    return out


def _trace_requests(
    trace: TraceSpec, num_requests: int, tokenizer: Tokenizer, model: str, rng: np.random.Generator
) -> list[PlannedRequest]:
    out: list[PlannedRequest] = []
    rows: list[dict[str, Any]] = []
    with trace.path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) >= num_requests:
                break
    if not rows:
        return out
    t0 = min(float(r["timestamp"]) for r in rows)
    prefixes: dict[str, str] = {}
    for index, row in enumerate(sorted(rows, key=lambda r: float(r["timestamp"]))):
        n_out = int(row.get("output_tokens", 128))
        tags: dict[str, str] = {"class": "trace"}
        if "messages" in row:
            messages = list(row["messages"])
            n_in = int(row.get("input_tokens", 0))
        else:
            n_in = int(row["input_tokens"])
            messages = []
            if "prefix_group" in row:
                g = str(row["prefix_group"])
                n_pre = int(row.get("prefix_tokens", 0))
                if n_pre > 0:
                    if g not in prefixes:
                        prefixes[g] = text_of_length(tokenizer, n_pre, np.random.default_rng(len(prefixes)))
                    messages.append({"role": "system", "content": prefixes[g]})
                    tags["prefix_tokens"] = str(n_pre)
                tags["prefix_group"] = g
            messages.append({"role": "user", "content": text_of_length(tokenizer, n_in, rng)})
        path, body = _body(trace.api, model, messages, n_out, trace.stream)
        headers = {}
        if "tenant" in row:
            tags["tenant"] = str(row["tenant"])
        if "api_key" in row:
            headers["Authorization"] = f"Bearer {row['api_key']}"
        offset = (float(row["timestamp"]) - t0) / trace.speedup
        out.append(PlannedRequest(index, path, body, headers, trace.stream, n_in, n_out, tags, offset))
    return out
