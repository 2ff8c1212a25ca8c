"""Scrape Prometheus text endpoints (the gateway's, vLLM's) while a run goes on."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Sample", "Scraper", "parse_metrics"]


@dataclass(slots=True)
class Sample:
    """One scraped value; ``t`` in seconds from the run origin."""

    t: float
    target: str
    name: str
    labels: dict[str, str]
    value: float

    def to_dict(self) -> dict[str, object]:
        return {
            "t": self.t,
            "target": self.target,
            "name": self.name,
            "labels": self.labels,
            "value": self.value,
        }


def parse_metrics(text: str, prefixes: Sequence[str]) -> list[tuple[str, dict[str, str], float]]:
    """Samples of ``text`` whose names start with one of ``prefixes`` (no histogram buckets)."""
    out: list[tuple[str, dict[str, str], float]] = []
    for family in text_string_to_metric_families(text):
        if prefixes and not family.name.startswith(tuple(prefixes)):
            continue
        for s in family.samples:
            if s.name.endswith("_bucket") or s.name.endswith("_created"):
                continue
            out.append((s.name, dict(s.labels), float(s.value)))
    return out


@dataclass
class Scraper:
    """Polls ``urls`` every ``interval_s`` until stopped; parsing runs in a thread so the
    event loop that sends requests is not held up."""

    urls: Sequence[str]
    interval_s: float
    prefixes: Sequence[str]
    t0: float
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0

    async def scrape_once(self, session: aiohttp.ClientSession) -> None:
        for url in self.urls:
            t = time.perf_counter() - self.t0
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    text = await resp.text()
            except (aiohttp.ClientError, TimeoutError, OSError):
                self.errors += 1
                continue
            parsed = await asyncio.to_thread(parse_metrics, text, list(self.prefixes))
            self.samples.extend(Sample(t, url, n, lab, v) for n, lab, v in parsed)

    async def run(self, stop: asyncio.Event) -> None:
        """Scrape until ``stop`` is set (one last scrape after it is)."""
        if not self.urls:
            return
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                await self.scrape_once(session)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval_s)
            await self.scrape_once(session)
