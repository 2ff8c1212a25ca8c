"""Routing hints: the wire contract between the gateway's routing policy and the engine
deployment's request router, and the decision rule the router applies.

The gateway's routing policy writes the ``HINT_*`` entries into the ``headers`` argument
of ``generate(endpoint, body, headers)``. The engine deployment's Ray Serve request router
(:mod:`serving.engine.router`), which runs in the caller's process before the arguments
are serialised, reads them, applies :func:`decide` to them and to the replicas' queue
lengths, and writes ``ROUTED_REPLICA`` and ``ROUTED_REASON`` back into the same dict,
where the gateway reads them after the first answer item.

This module is engine-side and imports nothing from the gateway: the gateway depends on
it, never the other way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "HINT_AFFINITY",
    "HINT_AVOID",
    "HINT_KEY_REPLICA",
    "HINT_ONLY",
    "HINT_STRATEGY",
    "REASONS",
    "ROUTED_REASON",
    "ROUTED_REPLICA",
    "Decision",
    "avoiding",
    "decide",
    "format_affinity",
    "parse_affinity",
]

HINT_STRATEGY = "x-oss-route-strategy"
"""Routing strategy for this request: ``prefix``, ``power_of_two`` or ``round_robin``."""
HINT_AFFINITY = "x-oss-route-affinity"
"""``replica=blocks,replica=blocks``: leading prompt blocks each replica was last sent."""
HINT_KEY_REPLICA = "x-oss-route-key-replica"
"""Replica that last served this request's affinity key."""
HINT_AVOID = "x-oss-route-avoid"
"""Comma-separated replicas not to choose (failed or stalled ones); ignored when it would
leave no replica at all."""
HINT_ONLY = "x-oss-route-only"
"""The one replica to send this call to (a probe of a quarantined replica)."""
ROUTED_REPLICA = "x-oss-routed-replica"
"""Written by the router: the replica it chose."""
ROUTED_REASON = "x-oss-routed-reason"
"""Written by the router: ``affinity``, ``load``, ``fallback`` or ``round_robin``."""

REASONS = ("affinity", "load", "fallback", "round_robin")
"""Every value the router writes under ``ROUTED_REASON``."""


@dataclass(frozen=True)
class Decision:
    """The router's choice: replicas in order of preference (empty: use the default policy)."""

    ranked: list[str]
    reason: str


def format_affinity(matched: Mapping[str, int]) -> str:
    """``HINT_AFFINITY``'s value: ``replica=blocks`` pairs, comma-separated."""
    return ",".join(f"{rid}={n}" for rid, n in matched.items())


def parse_affinity(text: str | None) -> dict[str, int]:
    """Inverse of :func:`format_affinity`; malformed parts are skipped."""
    out: dict[str, int] = {}
    for part in (text or "").split(","):
        rid, _, n = part.partition("=")
        if rid and n.isdigit():
            out[rid] = int(n)
    return out


def avoiding(candidates: list[str], hints: Mapping[str, str]) -> list[str]:
    """The candidates the hints allow: only ``HINT_ONLY`` if it is given (possibly none),
    else all but ``HINT_AVOID`` unless that leaves none (then all of them)."""
    only = hints.get(HINT_ONLY)
    if only:
        return [rid for rid in candidates if rid == only]
    avoid = {rid for rid in (hints.get(HINT_AVOID) or "").split(",") if rid}
    kept = [rid for rid in candidates if rid not in avoid]
    return kept or list(candidates)


def decide(
    matched: Mapping[str, int],
    key_replica: str | None,
    loads: Mapping[str, int],
    *,
    imbalance_threshold: int,
    min_match_blocks: int = 1,
) -> Decision:
    """Choose among replicas that can take a request (``loads``: replica -> ongoing requests).

    The affine replica is the one holding the longest prefix of the prompt (at least
    ``min_match_blocks``), ties broken by the affinity key's replica, then by load; with
    no prefix match the affinity key's replica. It wins unless it has more than
    ``imbalance_threshold`` requests more than the least busy replica: then the least
    busy wins (``load``). No affinity at all: ``fallback`` (the default policy chooses).
    """
    if not loads:
        return Decision([], "fallback")
    least = min(loads, key=lambda rid: (loads[rid], rid))
    scored = [
        (n, rid == key_replica, -loads[rid], rid)
        for rid, n in matched.items()
        if rid in loads and n >= min_match_blocks
    ]
    if scored:
        affine = max(scored)[3]
    elif key_replica is not None and key_replica in loads:
        affine = key_replica
    else:
        return Decision([], "fallback")
    if loads[affine] - loads[least] > imbalance_threshold:
        return Decision([least], "load")
    others = sorted((rid for rid in loads if rid != affine), key=lambda rid: (loads[rid], rid))
    return Decision([affine, *others], "affinity")
