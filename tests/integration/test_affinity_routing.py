"""Prefix-affinity routing on a real stack: two vLLM CPU engine replicas of SmolLM2 behind two
gateway replicas (two Ray Serve ingress processes), sharing the prefix index in Redis.

The stack answers with its routing decision (``routing.decision_headers``): the gateway
replica that took the request, the engine replica that served it and why. The Ray Serve
proxy spreads requests over both gateways, so each test keeps sending until it has seen
what it needs from both, within a bound.

This module runs before the session's main stack starts (``OWN_STACK``) and stops its own
stack when it ends, so the two never compete for the machine's cores.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.integration.conftest import SMOLLM, LiveStack, _free_port, running_stack, smollm_config

pytestmark = pytest.mark.integration
OWN_STACK = True  # runs before the session's shared stack (conftest.py)

IMBALANCE = 1  # load wins once the affine replica runs more than one request more than the other


@dataclass(frozen=True)
class Routed:
    gateway: str
    replica: str
    route: str
    cached_tokens: int


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    port = _free_port()
    config = {
        "models": [smollm_config(min_replicas=2, max_replicas=2)],
        "gateway": {"port": port, "num_replicas": 2, "health_check_interval_s": 1.0},
        "auth": {"required": False},
        "queue": {"key_prefix": f"osstest{port}"},
        "routing": {
            "key_prefix": f"osstest{port}:prefix",
            "imbalance_threshold": IMBALANCE,
            "decision_headers": True,
        },
    }
    with running_stack(tmp_path_factory.mktemp("routed"), config) as live:
        _both_gateways_ready(live)
        yield live


def _both_gateways_ready(live: LiveStack, timeout_s: float = 180) -> None:
    """``up`` returns once the stack serves; each of the two gateway replicas decides
    readiness from its own probes, so wait until readiness answers 200 many times in a row
    (the proxy spreads the checks over both replicas)."""
    deadline = time.monotonic() + timeout_s
    in_a_row = 0
    while in_a_row < 12:
        assert time.monotonic() < deadline, "the gateway replicas did not all become ready"
        try:
            ok = httpx.get(live.base_url + "/health/ready", timeout=10).status_code == 200
        except httpx.HTTPError:
            ok = False
        in_a_row = in_a_row + 1 if ok else 0
        time.sleep(0.25)


@pytest.fixture(scope="module")
def client(stack: LiveStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.api, api_key="local", max_retries=0, timeout=300)


def long_system() -> str:
    """A system prompt of several hundred tokens that no earlier request used."""
    return f"[{uuid.uuid4().hex}] You answer for the payroll office. " + "Every rule is binding. " * 90


def ask(client: openai.OpenAI, system: str, question: str) -> Routed:
    raw = client.chat.completions.with_raw_response.create(
        model=SMOLLM,
        temperature=0,
        max_tokens=2,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
    )
    reply = raw.parse()
    details = reply.usage.prompt_tokens_details if reply.usage else None
    return Routed(
        gateway=raw.headers["x-oss-serving-gateway"],
        replica=raw.headers["x-oss-serving-replica"],
        route=raw.headers["x-oss-serving-route"],
        cached_tokens=(details.cached_tokens or 0) if details else 0,
    )


def settle() -> None:
    """The index is updated in the background after the first byte; let it land."""
    time.sleep(0.5)


def test_a_shared_prefix_lands_on_one_replica_from_either_gateway(client: openai.OpenAI) -> None:
    system = long_system()
    first = ask(client, system, "question 0")
    assert first.route == "fallback"  # nothing indexed yet: Ray's default chose
    settle()
    later: list[Routed] = []
    while len({r.gateway for r in [first, *later]}) < 2 and len(later) < 40:
        later.append(ask(client, system, f"question {len(later) + 1}"))
    assert len({r.gateway for r in [first, *later]}) == 2, "the proxy never used the second gateway"
    assert {r.replica for r in later} == {first.replica}
    assert {r.route for r in later} == {"affinity"}
    # And it paid: vLLM served the shared system prompt from the replica's prefix cache.
    assert all(r.cached_tokens > 300 for r in later)


def test_a_different_prefix_can_land_on_the_other_replica(client: openai.OpenAI) -> None:
    anchor = ask(client, long_system(), "where are you?")
    settle()
    elsewhere = None
    for attempt in range(30):
        system = long_system()
        routed = ask(client, system, f"attempt {attempt}")
        if routed.replica != anchor.replica:
            elsewhere = (system, routed)
            break
    assert elsewhere is not None, "every new prefix went to one replica"
    system, routed = elsewhere
    settle()
    again = ask(client, system, "and again")
    assert (again.replica, again.route) == (routed.replica, "affinity")
    assert again.cached_tokens > 300


def test_load_wins_over_affinity_when_the_affine_replica_is_busy(client: openai.OpenAI) -> None:
    system = long_system()
    home = ask(client, system, "warm up").replica
    settle()
    seen: list[tuple[str, str]] = []
    with ExitStack() as streams:
        # Long generations with the same prefix pile up on the affine replica until it runs
        # more than IMBALANCE requests more than the idle one: then load must win.
        for i in range(IMBALANCE + 4):
            response = streams.enter_context(
                client.chat.completions.with_streaming_response.create(
                    model=SMOLLM,
                    max_tokens=1000,
                    stream=True,
                    extra_body={"ignore_eos": True},
                    messages=[
                        {"role": "system", "content": system},
                        {"role": "user", "content": f"Count slowly to a thousand, run {i}."},
                    ],
                )
            )
            seen.append((response.headers["x-oss-serving-route"], response.headers["x-oss-serving-replica"]))
            if seen[-1][0] == "load":
                break
    assert seen[-1][0] == "load", seen
    assert seen[-1][1] != home, seen
    assert all(route == "affinity" and replica == home for route, replica in seen[:-1]), seen
    assert len(seen) >= IMBALANCE + 1, seen
