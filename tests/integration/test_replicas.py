"""Two vLLM CPU engine replicas of SmolLM2 behind two gateway replicas (two Ray Serve ingress
processes): prefix-affinity routing over the prefix index they share in Redis, then
failover, with real replicas paused (``SIGSTOP``) and killed (``SIGKILL``) mid-stream.

The stack answers with its routing decision (``routing.decision_headers``): the gateway
replica that took the request, the engine replica that served it and why. The Ray Serve
proxy spreads requests over both gateways, so each test keeps sending until it has seen
what it needs from both, within a bound.

The failover tests come last (they kill replicas). Each finds the process of the replica
that serves its stream from the routing headers and the detailed ``/health`` (which lists
the replicas the probes reached, with their process ids).

This module runs before the session's main stack starts (``OWN_STACK``) and stops its own
stack when it ends, so the two never compete for the machine's cores.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import psutil
import pytest

from serving.gateway.tenants import hash_key
from tests.integration.conftest import SMOLLM, LiveStack, _free_port, running_stack, smollm_config
from tests.integration.replica_processes import signal_tree

pytestmark = pytest.mark.integration
OWN_STACK = True  # runs before the session's shared stack (conftest.py)

KEY, OTHER_KEY = "key-alpha", "key-beta"  # two tenants: each sees only its own responses
OPS = {"Authorization": "Bearer key-ops"}  # the operator key: the detailed /health
IMBALANCE = 1  # load wins once the affine replica runs more than one request more than the other
IDLE_S = 6.0  # the engines' idle timeout: a replica silent for this long has stalled


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
        "models": [
            {
                **smollm_config(min_replicas=2, max_replicas=2),
                # float32: a continuation's prefill and the undisturbed decode agree to the
                # last token at temperature 0 (in bfloat16 near ties flip between the two)
                "engine_kwargs": {"max_model_len": 2048, "dtype": "float32", "enforce_eager": True},
                "failover": {"idle_timeout_s": IDLE_S, "announce_migration": True, "quarantine_s": 60},
            }
        ],
        "gateway": {"port": port, "num_replicas": 2, "health_check_interval_s": 1.0},
        "auth": {"required": True, "admin_key_sha256": [hash_key("key-ops")]},
        "tenants": [
            {"id": "alpha", "api_key_sha256": [hash_key(KEY)]},
            {"id": "beta", "api_key_sha256": [hash_key(OTHER_KEY)]},
        ],
        "queue": {"key_prefix": f"osstest{port}"},
        "routing": {
            "key_prefix": f"osstest{port}:prefix",
            "imbalance_threshold": IMBALANCE,
            "decision_headers": True,
        },
    }
    with running_stack(tmp_path_factory.mktemp("routed"), config) as live:
        _both_gateways_ready(live)
        _warm(live)
        yield live


def _warm(live: LiveStack, timeout_s: float = 120) -> None:
    """A few requests through both gateways to both fresh engines, then wait until no
    replica is kept out of routing: a first request that a busy machine held past the
    idle timeout would otherwise leave its replica quarantined under the routing tests."""
    warm = openai.OpenAI(base_url=live.api, api_key=KEY, max_retries=2, timeout=120)
    for i in range(6):
        warm.chat.completions.create(
            model=SMOLLM, max_tokens=2, messages=[{"role": "user", "content": f"Warm up {i}."}]
        )
    deadline = time.monotonic() + timeout_s
    clear = 0
    while clear < 8:  # each gateway keeps its own quarantine: many answers in a row
        assert time.monotonic() < deadline, "a replica stayed out of routing after the warm-up"
        clear = clear + 1 if not engine_report(live)["replicas_avoided"] else 0
        time.sleep(0.25)


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
    return openai.OpenAI(base_url=stack.api, api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def other_tenant(stack: LiveStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.api, api_key=OTHER_KEY, max_retries=0, timeout=60)


def engine_report(live: LiveStack) -> dict[str, Any]:
    """The detailed ``/health`` of the model (operator key): replicas, engine requests."""
    report: dict[str, Any] = httpx.get(live.base_url + "/health", headers=OPS, timeout=10).json()
    return report["models"][SMOLLM]


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


# ------------------------------------------------------------------ failover (kills replicas: last)
@dataclass
class Streamed:
    replica: str | None = None
    text: str = ""
    ids: list[int] = field(default_factory=list)
    finishes: list[str] = field(default_factory=list)
    completion_tokens: int | None = None
    migrations: int = 0
    chunks: int = 0


def stream_chat(
    client: openai.OpenAI, content: str, on_chunk: Callable[[Streamed], None] | None = None
) -> Streamed:
    """One streamed chat request at temperature 0, with token ids and usage, read to its end
    (the SDK raises on an in-band error event)."""
    raw = client.chat.completions.with_raw_response.create(
        model=SMOLLM,
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"return_token_ids": True, "ignore_eos": True},
        messages=[{"role": "user", "content": content}],
    )
    out = Streamed(replica=raw.headers.get("x-oss-serving-replica"))
    for chunk in raw.parse():
        out.chunks += 1
        extra = chunk.model_extra or {}
        out.migrations = int((extra.get("oss_serving") or {}).get("migrations", out.migrations))
        if chunk.usage is not None:
            out.completion_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            out.text += choice.delta.content or ""
            out.ids += list((choice.model_extra or {}).get("token_ids") or [])
            if choice.finish_reason:
                out.finishes.append(choice.finish_reason)
        if on_chunk is not None:
            on_chunk(out)
    return out


def two_live_replicas(live: LiveStack, timeout_s: float = 420) -> dict[str, int]:
    """Wait until the gateways report two replicas whose processes are alive (after a kill,
    Ray Serve starts a replacement) and the model serves."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        report = engine_report(live)
        alive = {
            r: int(v["pid"])
            for r, v in report["replicas"].items()
            if v.get("pid") and psutil.pid_exists(v["pid"])
        }
        if len(alive) == 2 and report["ready"]:
            return alive
        time.sleep(1)
    raise AssertionError("the killed replica was not replaced in time")


COUNTING = "List the numbers from 1 to 200, separated by commas."
MAX_TOKENS = 200
"""Long enough that the engine is still generating when the client has read a few chunks
(the gateway and the HTTP path buffer ahead of the client)."""


def sixteen_streams_survive(stack: LiveStack, client: openai.OpenAI, sig: signal.Signals) -> None:
    """16 streams at temperature 0; once each has its first chunks, one replica is paused
    or killed under them: every stream ends whole, its tokens each counted once."""
    alive = two_live_replicas(stack)
    started = threading.Barrier(17)
    replicas: list[str | None] = []

    def one(k: int) -> Streamed:
        seen = [False]

        def note(out: Streamed) -> None:
            if out.chunks == 3 and not seen[0]:
                seen[0] = True
                replicas.append(out.replica)
                started.wait(timeout=120)

        return stream_chat(client, f"List the numbers from {k} to {k + 200}, separated by commas.", note)

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, k) for k in range(16)]
        started.wait(timeout=120)  # every stream has its first chunks
        victim = next(r for r in replicas if r in alive)
        signal_tree(alive[victim], sig)
        lost_at = time.monotonic()
        try:
            results = [f.result(timeout=300) for f in futures]
            took = time.monotonic() - lost_at
        finally:
            if sig is signal.SIGSTOP:
                signal_tree(alive[victim], signal.SIGCONT)
    lost = sum(r == victim for r in replicas)
    print(f"\n{lost} of 16 streams on the lost replica; all ended {took:.1f} s later")
    assert any(r == victim for r in replicas)
    for out in results:
        assert len(out.finishes) == 1, out  # one finish_reason, no error (the SDK raises on one)
        assert out.completion_tokens == len(out.ids) == MAX_TOKENS, out  # every token once
    assert sum(out.migrations for out in results) >= 1
    if sig is signal.SIGSTOP:
        assert took < IDLE_S + 60
        # The paused replica answers again: no gateway keeps it out of routing any more.
        deadline = time.monotonic() + 90
        clear = 0
        while clear < 8:
            assert time.monotonic() < deadline, "the resumed replica stayed out of routing"
            report = engine_report(stack)
            clear = clear + 1 if not report["replicas_avoided"] else 0
            time.sleep(0.25)


def test_a_stored_response_is_continued_through_the_other_gateway(
    client: openai.OpenAI, other_tenant: openai.OpenAI
) -> None:
    """Stored responses live in the shared Redis, not in an engine: a conversation whose
    turns land on both gateway replicas (and whichever engine replica) goes on with
    ``previous_response_id``, each turn replaying the whole conversation to real vLLM."""
    previous: str | None = None
    gateways: list[str] = []
    ids: list[str] = []
    for turn in range(8):
        extra = {"previous_response_id": previous} if previous else {}
        raw = client.responses.with_raw_response.create(
            model=SMOLLM, input=f"Say the number {turn}.", max_output_tokens=4, temperature=0, **extra
        )
        reply = raw.parse()
        assert reply.status in ("completed", "incomplete")
        assert reply.previous_response_id == previous
        gateways.append(raw.headers["x-oss-serving-gateway"])
        ids.append(reply.id)
        previous = reply.id
        if turn >= 2 and len(set(gateways)) == 2:
            break
    assert len(set(gateways)) == 2, f"every turn landed on one gateway: {gateways}"
    # the last turn's own input, and every turn retrievable through either gateway
    items = list(client.responses.input_items.list(ids[-1]))
    assert len(items) == 1
    assert f"number {len(ids) - 1}" in json.dumps(items[0].model_dump())
    for _ in range(4):  # the proxy spreads these over both gateway replicas
        assert client.responses.retrieve(ids[0]).id == ids[0]
    for call in (  # another tenant: as if none of it existed
        lambda: other_tenant.responses.retrieve(ids[0]),
        lambda: other_tenant.responses.input_items.list(ids[0]),
        lambda: other_tenant.responses.delete(ids[0]),
        lambda: other_tenant.responses.create(
            model=SMOLLM, input="go on", max_output_tokens=2, previous_response_id=ids[-1]
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    client.responses.delete(ids[0])
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[0])
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=SMOLLM, input="again", max_output_tokens=2, previous_response_id=ids[0])


def test_a_function_call_and_its_output_round_trip_through_both_gateways(client: openai.OpenAI) -> None:
    """The form agents send: a turn whose input carries a function call and its output,
    with tools, continued by ``previous_response_id`` until turns landed on both gateway
    replicas; every turn replays the call and its output to real vLLM (the second-turn
    failure of vllm#33089 does not happen), and the stored items come back as sent."""
    tools: list[Any] = [
        {
            "type": "function",
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        }
    ]
    raw = client.responses.with_raw_response.create(
        model=SMOLLM,
        tools=tools,
        max_output_tokens=8,
        temperature=0,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city": "Paris"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": '{"sky": "clear", "c": 21}'},
        ],
    )
    first = raw.parse()
    gateways = [raw.headers["x-oss-serving-gateway"]]
    assert first.status in ("completed", "incomplete")
    kinds = [i.type for i in client.responses.input_items.list(first.id, order="asc")]
    assert kinds == ["message", "function_call", "function_call_output"]
    previous = first.id
    for turn in range(8):
        raw = client.responses.with_raw_response.create(
            model=SMOLLM,
            tools=tools,
            max_output_tokens=8,
            temperature=0,
            input=f"And on day {turn + 2}?",
            previous_response_id=previous,
        )
        reply = raw.parse()
        assert reply.status in ("completed", "incomplete")
        assert reply.previous_response_id == previous
        gateways.append(raw.headers["x-oss-serving-gateway"])
        previous = reply.id
        if len(set(gateways)) == 2:
            break
    assert len(set(gateways)) == 2, f"every turn landed on one gateway: {gateways}"


def _poll(client: openai.OpenAI, rid: str, until: set[str], timeout_s: float = 120) -> tuple[Any, set[str]]:
    """Retrieve ``rid`` until its status is in ``until``; it, and the gateways that answered."""
    gateways: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while True:
        raw = client.responses.with_raw_response.retrieve(rid)
        gateways.add(raw.headers["x-oss-serving-gateway"])
        got = raw.parse()
        if got.status in until:
            return got, gateways
        assert got.status in ("queued", "in_progress"), got.status
        assert time.monotonic() < deadline, f"{rid} still {got.status}"
        time.sleep(0.1)


def test_a_background_response_is_polled_and_streamed_through_both_gateways(
    client: openai.OpenAI, other_tenant: openai.OpenAI
) -> None:
    """``background: true`` on real vLLM: answered at once (queued), then polled to the
    end through both gateway replicas, whichever of them runs it; streamed, and the stream
    resumed after a sequence number through any replica; another tenant sees none of it."""
    raw = client.responses.with_raw_response.create(
        model=SMOLLM, input="Say hello.", max_output_tokens=16, temperature=0, background=True
    )
    created = raw.parse()
    assert created.status == "queued"
    assert created.background is True
    owner = raw.headers["x-oss-serving-gateway"]
    done, gateways = _poll(client, created.id, {"completed", "incomplete"})
    assert done.id == created.id
    assert done.output_text
    assert done.usage is not None
    assert done.usage.output_tokens > 0
    for _ in range(20):  # the proxy spreads the polls over both gateway replicas
        if len(gateways) == 2:
            break
        gateways |= _poll(client, created.id, {"completed", "incomplete"})[1]
    assert len(gateways) == 2, f"every poll landed on one gateway: {gateways}"
    assert owner in gateways

    events = list(
        client.responses.create(
            model=SMOLLM,
            input="Count to five.",
            max_output_tokens=24,
            temperature=0,
            background=True,
            stream=True,
        )
    )
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.queued"
    assert events[-1].type in ("response.completed", "response.incomplete")
    sid = events[0].response.id  # type: ignore[union-attr]
    for _ in range(4):  # through either replica, the same events after the third
        resumed = list(client.responses.retrieve(sid, stream=True, starting_after=3))
        assert [e.model_dump() for e in resumed] == [e.model_dump() for e in events[4:]]
    deltas = "".join(getattr(e, "delta", "") for e in events if e.type == "response.output_text.delta")
    assert deltas == client.responses.retrieve(sid).output_text

    for call in (
        lambda: other_tenant.responses.retrieve(created.id),
        lambda: other_tenant.responses.cancel(created.id),
        lambda: list(other_tenant.responses.retrieve(sid, stream=True, starting_after=0)),
        lambda: other_tenant.responses.input_items.list(created.id),
        lambda: other_tenant.responses.delete(created.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert client.responses.retrieve(created.id).status == done.status  # still there, still its


def test_a_background_response_cancelled_mid_generation_stops_through_either_gateway(
    client: openai.OpenAI, other_tenant: openai.OpenAI
) -> None:
    """Cancelled through whichever gateway replica the proxy picks while real vLLM
    generates it (on the other gateway, half the time): ``cancelled`` at once, and its
    owner stops: no event is added after the cancel. (That the engine request itself is
    aborted is counted on the one-replica stack, where the engine's count is exact:
    ``test_stack.py::test_a_cancelled_background_response_aborts_its_engine_request``.)"""
    created = client.responses.create(
        model=SMOLLM,
        input="Write a very long story about a lighthouse keeper and the sea.",
        max_output_tokens=1500,
        temperature=0.8,
        background=True,
        extra_body={"ignore_eos": True},  # long enough to be cancelled while it runs
    )
    running, _ = _poll(client, created.id, {"in_progress", "completed", "incomplete"})
    assert running.status == "in_progress", "it finished before it could be cancelled"
    time.sleep(1.0)  # some tokens streamed
    with pytest.raises(openai.NotFoundError):
        other_tenant.responses.cancel(created.id)
    cancelled = client.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    time.sleep(1.0)  # the owner's watch runs every 250 ms
    first = list(client.responses.retrieve(created.id, stream=True))
    assert first, "no event was kept"
    time.sleep(2.0)
    again = list(client.responses.retrieve(created.id, stream=True))
    assert len(again) == len(first), "events were added after the cancel: it still runs"
    deltas = [e for e in again if e.type == "response.output_text.delta"]
    assert 0 < len(deltas) < 1500
    assert client.responses.retrieve(created.id).status == "cancelled"
    assert client.responses.cancel(created.id).status == "cancelled"  # again: as it is
    with pytest.raises(openai.BadRequestError):  # a response that is not a background one
        client.responses.cancel(client.responses.create(model=SMOLLM, input="hi", max_output_tokens=2).id)


def test_sixteen_streams_survive_a_replica_paused_under_them(stack: LiveStack, client: openai.OpenAI) -> None:
    sixteen_streams_survive(stack, client, signal.SIGSTOP)


def test_a_stream_whose_replica_is_killed_continues_and_new_requests_never_see_it(
    stack: LiveStack, client: openai.OpenAI
) -> None:
    pids = two_live_replicas(stack)
    reference = stream_chat(client, COUNTING)
    killed: list[int] = []

    def kill(out: Streamed) -> None:
        if out.chunks == 3 and not killed:
            assert out.replica is not None
            killed.append(pids[out.replica])
            signal_tree(killed[0], signal.SIGKILL)

    moved = stream_chat(client, COUNTING, on_chunk=kill)
    assert killed, "the stream ended before the kill"
    assert moved.migrations == 1
    assert moved.ids == reference.ids
    assert moved.text == reference.text
    assert moved.finishes == reference.finishes
    assert moved.completion_tokens == len(moved.ids)
    # Requests sent right after the kill (before Ray Serve notices it) are answered: a
    # gateway that routes one to the dead replica retries it on the live one.
    for i in range(6):
        reply = client.chat.completions.create(
            model=SMOLLM, max_tokens=4, messages=[{"role": "user", "content": f"Say hi ({i})."}]
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
    log = stack.log_file.read_text(errors="replace")
    assert "migration continued" in log


def test_sixteen_streams_survive_a_replica_killed_under_them(stack: LiveStack, client: openai.OpenAI) -> None:
    sixteen_streams_survive(stack, client, signal.SIGKILL)
