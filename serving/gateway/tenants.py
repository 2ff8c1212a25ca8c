"""Tenants: who is calling, what they may do, and how much of the fleet they get.

An API key maps to one tenant. Keys are stored hashed (sha256 of the key); the key
itself is shown once, when it is created. A tenant carries its fair-share weight, its
priority class, its limits, the models it may use, and whether its data may leave the
cluster through a handoff.

Tenants are read back from Redis, where a newer version may have written fields this
one does not know: the models ignore unknown fields (``extra="ignore"``), so a rollout
in either direction never makes a record unreadable. Configuration input is checked
strictly elsewhere (:class:`serving.config.TenantSeed` forbids unknown fields).
"""

from __future__ import annotations

import hashlib
import secrets
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "HandoffRight",
    "PriorityClass",
    "Tenant",
    "TenantLimits",
    "hash_key",
    "local_tenant",
    "new_api_key",
]

KEY_PREFIX = "oss-"


class PriorityClass(StrEnum):
    """Admission lanes, served strictly in this order."""

    interactive = "interactive"
    standard = "standard"
    batch = "batch"

    @property
    def rank(self) -> int:
        return {"interactive": 0, "standard": 1, "batch": 2}[self.value]


class HandoffRight(StrEnum):
    """Whether a tenant's requests may be sent to an upstream outside the cluster."""

    never = "never"
    overflow_only = "overflow-only"
    allowed = "allowed"


class TenantLimits(BaseModel):
    """Per-tenant limits; ``None`` means unlimited."""

    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    requests_per_minute: int | None = Field(default=None, ge=1)
    """Requests admitted per rolling minute."""

    tokens_per_minute: int | None = Field(default=None, ge=1)
    """Prompt plus output tokens per rolling minute (output counted at ``max_tokens`` until known)."""

    max_concurrent_requests: int | None = Field(default=None, ge=1)
    """Requests running or queued at once."""

    max_output_tokens: int | None = Field(default=None, ge=1)
    """Cap on ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens`` of one request;
    also the value filled in when a request names none (else the model's ``default_max_tokens``)."""

    max_n: int | None = Field(default=8, ge=1)
    """Most sequences one prompt may ask for (``n``, ``best_of``); ``None``: no cap. A request
    runs ``n x prompts`` sequences: its token estimate and its admission lease count them all."""

    max_prompts: int | None = Field(default=64, ge=1)
    """Most prompts in one ``/v1/completions`` request (a list of prompts); ``None``: no cap."""

    allow_min_tokens: bool = True
    """Whether requests may set ``min_tokens``."""

    allow_ignore_eos: bool = True
    """Whether requests may set ``ignore_eos: true`` (generate up to the output cap)."""


class Tenant(BaseModel):
    """One tenant (a team, an application)."""

    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    """Stable id; also the ``tenant`` metric label (bounded by the configured tenants)."""

    weight: float = Field(default=1.0, gt=0, le=1000)
    """Fair-share weight among tenants of the same priority class."""

    priority: PriorityClass = PriorityClass.standard
    """Admission lane."""

    limits: TenantLimits = Field(default_factory=TenantLimits)
    """Rate and size limits."""

    models: list[str] = Field(default_factory=lambda: ["*"])
    """Models this tenant may use; ``*`` means all."""

    handoff: HandoffRight = HandoffRight.never
    """Whether requests may be handed off to an upstream outside the cluster."""

    response_cache: bool = False
    """Whether this tenant's requests may use the response cache (each request still opts
    in with ``X-OSS-Response-Cache: on``; only deterministic requests are cached)."""

    def may_use(self, model: str) -> bool:
        return "*" in self.models or model in self.models


def local_tenant() -> Tenant:
    """The tenant of every request when authentication is off (local mode)."""
    return Tenant(id="local", priority=PriorityClass.standard, response_cache=True)


def hash_key(api_key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    """A fresh random API key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)
