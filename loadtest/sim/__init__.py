"""Simulated OpenAI-compatible engine: a planning and test tool, never a serving engine.

It reproduces the *timing* of a vLLM engine from an :class:`EngineProfile` (prefill
cost per uncached token, decode step time as a function of running sequences and KV
tokens in use, a KV block pool with prefix caching, ``max_num_seqs`` and a waiting
queue), so that it saturates like a real engine, and it exports vLLM's metric names on
``/metrics``. Its text is filler words. ``oss-serve up`` never starts it; run it with
``python -m loadtest.sim`` (or ``oss-loadtest sim-engine``), or drive its
scheduler in virtual time for capacity planning (``loadtest.simulate``).
"""

from loadtest.sim.profile import EngineProfile, load_profile, prefill_pairs_of
from loadtest.sim.scheduler import BlockManager, SimRequest, SimScheduler, StepOutput, block_hashes

__all__ = [
    "BlockManager",
    "EngineProfile",
    "SimRequest",
    "SimScheduler",
    "StepOutput",
    "block_hashes",
    "load_profile",
    "prefill_pairs_of",
]
