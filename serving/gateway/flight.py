"""One request's resources and accounting, owned by one object and released exactly once.

A :class:`Flight` is opened by the API the moment a request arrives and closed when its
answer has been sent, whichever way that happens: success, an error before the first
byte, an error mid-stream, a client that disconnects at any await (also before the body
iterator starts), or gateway shutdown. It holds everything that must be given back or
counted: the admission lease, the in-flight gauge, the engine stream, the tenant's token
charge, and the request's metrics and log line. :meth:`Flight.close` is idempotent and
runs its work shielded from cancellation, so a close that starts always finishes.

:class:`Flights` opens them and keeps the open ones; its :meth:`Flights.reap` is the
safety net: a flight older than any legitimate request (queue wait plus request time
plus a margin) was leaked by a bug, and is closed, counted
(``oss_serving_requests_reclaimed``) and logged as a warning with its request id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from serving.gateway.limits import streamed_tokens
from serving.gateway.tenants import Tenant
from serving.metrics import GatewayMetrics
from serving.wire import aclose_quietly, usage_in_sse

__all__ = ["Flight", "Flights", "LeaseHolder", "TokenCharger"]

log = logging.getLogger("oss_serving.gateway")


class LeaseHolder(Protocol):
    """Admission, as far as a flight needs it: give a lease back."""

    async def release(self, lease: Any) -> None: ...


class TokenCharger(Protocol):
    """The rate limiter, as far as a flight needs it: correct a token pre-charge."""

    async def correct_tokens(self, tenant: Tenant, delta: int) -> None: ...


class Flight:
    """One request on its way through the gateway (see the module docstring)."""

    def __init__(self, owner: Flights, request_id: str, endpoint: str) -> None:
        self._owner = owner
        self.request_id = request_id
        self.endpoint = endpoint
        self.model: str | None = None
        self.tenant: Tenant | None = None
        self.started = time.perf_counter()
        self.opened = time.monotonic()
        self.status = 200
        self.backend = "local"
        self.first_chunk: float | None = None
        self.usage: tuple[int, int] | None = None
        self.cache_hit = False
        self.detail: str | None = None
        """Why it failed, for the log only (never sent to the client)."""
        self._lease: Any = None
        self._in_flight: Any = None
        self._stream: AsyncIterator[Any] | None = None
        self._charged = 0
        self._charged_output = 0
        self._streamed = 0
        """Output tokens delivered to the client, counted from the stream (``streamed_tokens``)."""
        self._closing: asyncio.Future[None] | None = None

    # ------------------------------------------------------------ what it holds
    def enter(self) -> None:
        """Count the request in ``requests_in_flight`` until it closes."""
        if self._in_flight is None and self.model is not None:
            self._in_flight = self._owner.metrics.in_flight.labels(model=self.model, endpoint=self.endpoint)
            self._in_flight.inc()

    def hold_lease(self, lease: Any) -> None:
        self._lease = lease

    def hold_stream(self, stream: AsyncIterator[Any]) -> None:
        """The engine (or upstream) stream: closed, and so cancelled, when the flight closes."""
        self._stream = stream

    def charged(self, tokens: int, *, output: int = 0) -> None:
        """The tenant was charged ``tokens`` up front, ``output`` of them for the output
        (corrected on close, see :meth:`_correct_tokens`)."""
        self._charged = tokens
        self._charged_output = min(max(output, 0), tokens)

    async def release_lease(self) -> None:
        """Give the lease back early (before a failover leaves the local engines)."""
        lease, self._lease = self._lease, None
        if lease is not None:
            await asyncio.shield(self._owner.admission.release(lease))

    async def drop_stream(self) -> None:
        """Cancel the engine request, keeping the lease (a retry or migration follows)."""
        stream, self._stream = self._stream, None
        await aclose_quietly(stream)

    async def leave_engine(self) -> None:
        """Cancel the engine request and give the lease back now (before a failover)."""
        stream, self._stream = self._stream, None
        await aclose_quietly(stream)
        await self.release_lease()

    def note_chunk(self, text: str) -> None:
        """A chunk went to the client: first-chunk time and usage, if it carries it."""
        if self.first_chunk is None:
            self.first_chunk = time.perf_counter()
        found = usage_in_sse(text) or getattr(text, "usage", None)
        if found is not None:
            self.usage = found
        if self._charged:
            self._streamed += streamed_tokens(text)

    @property
    def closed(self) -> bool:
        return self._closing is not None

    # ------------------------------------------------------------ closing
    async def close(self, status: int | None = None, detail: str | None = None) -> None:
        """Release and account, once; later calls wait for the first one to finish."""
        if self._closing is None:
            if status is not None:
                self.status = status
            if detail is not None:
                self.detail = detail
            self._closing = asyncio.ensure_future(self._close())
            self._owner.forget(self, self._closing)
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        owner, m = self._owner, self._owner.metrics
        try:
            if self._in_flight is not None:
                self._in_flight.dec()
            await aclose_quietly(self._stream)
            await self.release_lease()
            await self._correct_tokens()
        except Exception:  # accounting must never fail a request; say so loudly
            log.exception("request_id=%s: closing the request failed", self.request_id)
        model = m.model_label(self.model)
        elapsed = time.perf_counter() - self.started
        m.requests.labels(model=model, endpoint=self.endpoint, status=str(self.status)).inc()
        m.latency.labels(model=model, endpoint=self.endpoint).observe(elapsed)
        tenant = self.tenant.id if self.tenant is not None else "-"
        if self.tenant is not None and self.model is not None:
            label = owner.tenant_label(self.tenant.id)
            m.tenant_requests.labels(tenant=label, model=model).inc()
            if self.usage is not None:
                prompt, completion = self.usage
                m.output_tokens.labels(model=model).inc(completion)
                m.tenant_tokens.labels(tenant=label, model=model, kind="prompt").inc(prompt)
                m.tenant_tokens.labels(tenant=label, model=model, kind="completion").inc(completion)
                if self.first_chunk is not None and completion > 1 and self.status < 400:
                    tpot = (time.perf_counter() - self.first_chunk) / (completion - 1)
                    m.tpot.labels(model=model).observe(tpot)
        ttft = f" ttft={1000 * (self.first_chunk - self.started):.1f}ms" if self.first_chunk else ""
        detail = f" detail={self.detail!r}" if self.detail else ""
        level = logging.WARNING if self.status >= 500 else logging.INFO
        log.log(
            level,
            "request_id=%s %s %s status=%d tenant=%s backend=%s %.1fms%s%s",
            self.request_id,
            self.endpoint,
            self.model or "-",
            self.status,
            tenant,
            self.backend,
            1000 * elapsed,
            ttft,
            detail,
        )

    async def _correct_tokens(self) -> None:
        """The tenant pays for what was delivered. Real usage (the engine's or the
        upstream's) corrects the pre-charge, up or down; nothing else ever charges more.

        Without usage: a request that delivered nothing (an error before the first byte,
        a client gone while it waited, a cache hit) is refunded; a non-streamed answer
        keeps its pre-charge; a stream (cut by its client, failed mid-way, or never asked
        for usage) pays its prompt estimate plus the output tokens it streamed (counted
        by ``streamed_tokens``, one per delta: never more than was delivered), so the
        unused part of its output reservation comes back and it is never refunded below
        what it received."""
        if not self._charged or self.tenant is None:
            return
        if self.usage is not None and not self.cache_hit:
            owed = sum(self.usage)
        elif self.cache_hit or (self.first_chunk is None and self.status >= 400):
            owed = 0
        elif self.first_chunk is None:
            owed = self._charged
        else:
            streamed = min(self._streamed, self._charged_output)
            owed = self._charged - self._charged_output + streamed
        delta = owed - self._charged
        if delta:
            await self._owner.limiter.correct_tokens(self.tenant, delta)
        m = self._owner.metrics
        label = self._owner.tenant_label(self.tenant.id)
        m.tenant_tokens_charged.labels(tenant=label, model=m.model_label(self.model)).inc(owed)


class _NoLeases:
    async def release(self, lease: Any) -> None:
        return None


class _NoCharges:
    async def correct_tokens(self, tenant: Tenant, delta: int) -> None:
        return None


class Flights:
    """Opens flights and keeps the open ones (for the safety net and shutdown)."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        *,
        admission: LeaseHolder | None = None,
        limiter: TokenCharger | None = None,
        tenant_label: Callable[[str], str] = lambda tenant: tenant,
        max_age_s: float = 3600.0,
    ) -> None:
        self.metrics = metrics
        self.admission: LeaseHolder = admission or _NoLeases()
        self.limiter: TokenCharger = limiter or _NoCharges()
        self.tenant_label = tenant_label
        self.max_age_s = max_age_s
        self._open: dict[int, Flight] = {}
        self._closing: set[asyncio.Future[None]] = set()
        self.reclaimed = 0

    def open(self, request_id: str, endpoint: str) -> Flight:
        flight = Flight(self, request_id, endpoint)
        self._open[id(flight)] = flight
        return flight

    def forget(self, flight: Flight, closing: asyncio.Future[None]) -> None:
        self._open.pop(id(flight), None)
        self._closing.add(closing)  # referenced until done: a shielded close is never collected
        closing.add_done_callback(self._closing.discard)

    @property
    def open_count(self) -> int:
        return len(self._open)

    async def reap(self) -> int:
        """Close every flight older than ``max_age_s``: it was leaked. Returns how many."""
        now = time.monotonic()
        stale = [f for f in self._open.values() if now - f.opened > self.max_age_s]
        for flight in stale:
            log.warning(
                "request_id=%s was still open after %.0f s (leaked): releasing its lease and slot",
                flight.request_id,
                now - flight.opened,
            )
            self.reclaimed += 1
            self.metrics.requests_reclaimed.labels(model=self.metrics.model_label(flight.model)).inc()
            await flight.close(499, detail="reclaimed by the safety net")
        return len(stale)

    async def close_all(self, status: int = 503) -> None:
        """Shutdown: close what is still open."""
        for flight in list(self._open.values()):
            await flight.close(status, detail="gateway shutting down")
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)
