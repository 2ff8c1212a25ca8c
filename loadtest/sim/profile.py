"""The timing profile of a simulated engine (written by ``oss-loadtest calibrate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["EngineProfile", "load_profile", "prefill_pairs_of", "template_tokens"]


class EngineProfile(BaseModel):
    """How long an engine step takes and how much the engine holds.

    One engine step lasts ``step_base_s + step_per_seq_s * running +
    step_per_kv_token_s * kv_tokens + prefill_per_token_s * prefill_tokens +
    prefill_attention_s * prefill_pairs``, where ``running`` counts sequences in the batch,
    ``kv_tokens`` the tokens they hold in the KV cache, ``prefill_tokens`` the uncached
    prompt tokens computed in the step and ``prefill_pairs`` the (computed token, token
    it attends to) pairs of their attention: a prompt of ``n`` uncached tokens behind
    ``c`` cached ones has ``n * (c + (n + 1) / 2)``.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = "sim"
    """Label of the profile (e.g. the hardware and model it was fitted on)."""
    step_base_s: float = Field(default=0.004, ge=0)
    """Fixed cost of one engine step."""
    step_per_seq_s: float = Field(default=0.0002, ge=0)
    """Added per running sequence."""
    step_per_kv_token_s: float = Field(default=0.0, ge=0)
    """Added per token held in the KV cache by running sequences (attention reads)."""
    shared_kv_weight: float = Field(default=1.0, ge=0, le=1)
    """Cost of a KV token in a block another running sequence of the step also holds (a
    shared prompt prefix), relative to a token of its own: 1 charges each sequence's read
    of it, 0 one read per step (the block stays in the processor's caches, or a kernel
    reads a common prefix once)."""
    prefill_per_token_s: float = Field(default=0.0001, ge=0)
    """Added per uncached prompt token computed in the step."""
    prefill_attention_s: float = Field(default=0.0, ge=0)
    """Added per (computed prompt token, context token it attends to) pair: the part of a
    prefill that grows with the square of the prompt, and with the cached prefix a prompt's
    new tokens read (SmolLM2 on vLLM CPU: about 5e-7 s, 0.3 s of a 1054-token prompt's 3 s)."""
    request_overhead_s: float = Field(default=0.0, ge=0)
    """Fixed time before a request reaches the scheduler (HTTP, tokenization)."""
    block_size: int = Field(default=16, ge=1)
    """Tokens per KV block."""
    num_kv_blocks: int = Field(default=8192, ge=1)
    """KV blocks of the engine."""
    enable_prefix_caching: bool = True
    """Reuse full blocks of identical prompt prefixes."""
    max_num_seqs: int = Field(default=128, ge=1)
    """Most sequences in one batch."""
    max_num_batched_tokens: int = Field(default=8192, ge=1)
    """Prompt tokens admitted per step (the first request of a step is always admitted)."""
    max_model_len: int = Field(default=32768, ge=1)
    """Longest prompt plus output; longer requests get 400."""
    max_waiting: int | None = Field(default=None, ge=0)
    """Reject with 503 when this many requests wait (vLLM itself never rejects)."""
    chat_template_tokens: int = Field(default=0, ge=0)
    """Tokens a chat template adds around the messages."""
    chat_template_system_tokens: int | None = Field(default=None, ge=0)
    """Tokens it adds when the messages open with a system message (a template that puts a
    default system prompt in when there is none adds fewer); None: ``chat_template_tokens``."""
    default_max_tokens: int = Field(default=256, ge=1)
    """Output tokens when a request sets no ``max_tokens``."""
    stream_interval: int = Field(default=1, ge=1)
    """Tokens per streamed chunk."""
    reasoning_fraction: dict[str, float] = Field(
        default_factory=lambda: {"low": 0.2, "medium": 0.5, "high": 0.8}
    )
    """Share of the output streamed as reasoning, by ``reasoning_effort``."""


def prefill_pairs_of(new_tokens: float, cached_tokens: float) -> float:
    """(Computed token, attended token) pairs of a prefill of ``new_tokens`` behind
    ``cached_tokens`` cached ones (causal attention: the k-th new token attends to the cached
    ones, the new ones before it, and itself)."""
    return new_tokens * (cached_tokens + (new_tokens + 1) / 2) if new_tokens > 0 else 0.0


def template_tokens(profile: EngineProfile, body: dict[str, Any]) -> int:
    """Tokens the chat template adds to a chat request's ``body``."""
    messages = body.get("messages")
    opens_with_system = (
        isinstance(messages, list)
        and bool(messages)
        and isinstance(messages[0], dict)
        and messages[0].get("role") == "system"
    )
    if opens_with_system and profile.chat_template_system_tokens is not None:
        return profile.chat_template_system_tokens
    return profile.chat_template_tokens


def load_profile(path: str | Path) -> EngineProfile:
    """Read a profile YAML file."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return EngineProfile.model_validate(data)
