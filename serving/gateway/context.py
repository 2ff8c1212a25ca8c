"""What the gateway knows about one request while it serves it."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from serving.engine.protocol import Endpoint
from serving.gateway.tenants import Tenant, local_tenant

__all__ = ["RequestContext"]


@dataclass
class RequestContext:
    """One validated request on its way through the gateway's policy steps.

    Steps (authentication, rate limits, response cache, handoff, admission, routing) read
    it and record their decisions on it; ``response_headers`` are added to the answer
    (rate-limit headers, the serving backend, cache status).
    """

    request_id: str
    endpoint: Endpoint
    model: str
    body: dict[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)
    """Incoming HTTP headers, names lower-cased."""

    tenant: Tenant = field(default_factory=local_tenant)
    arrived: float = field(default_factory=time.monotonic)
    """Monotonic arrival time at the gateway."""

    deadline: float | None = None
    """Monotonic time by which the request must have started, if it has one."""

    response_headers: dict[str, str] = field(default_factory=dict)
    backend: str = "local"
    """Which backend answered: ``local`` or an upstream name."""

    cache_scope: str = ""
    """The tenant's cache salt (``isolation.py``): scopes the engine's prefix cache, the
    prefix index and affinity keys to the tenant."""

    turn: Any = None
    """A Responses request's :class:`~serving.gateway.responses.Turn` (stored responses),
    or None."""

    virtual_model: str | None = None
    """The virtual model the client named (e.g. ``auto``) when ``model`` is the local model
    its handoff rule picked."""
