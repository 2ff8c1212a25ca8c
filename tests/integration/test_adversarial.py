"""A hostile tenant against the real stack: real Redis, a real vLLM engine, a real upstream.

The stack is its own (``oss-serve up`` with authentication on, tenants with limits, a
private ``redis-server`` so the tests may empty it, and an OpenAI-compatible upstream on
loopback: the simulated engine served over HTTP). Each test is one attack that
succeeded on the gateway before the pipeline was rebuilt; the module starts before the
session's shared stack and stops its own when it ends (see ``conftest.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import redis as redis_sync

from loadtest.sim import EngineProfile
from loadtest.sim.background import serve_in_thread
from loadtest.sim.server import SimEngine
from serving.gateway.isolation import CacheIsolation
from serving.gateway.tenants import hash_key
from tests.integration.conftest import SMOLLM, LiveStack, _free_port, running_stack, smollm_config
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration
OWN_STACK = True

OPS_KEY = "key-ops"
TENANTS = {
    "alpha": {"handoff": "allowed"},
    "bravo": {"handoff": "allowed"},
    "capped": {"handoff": "allowed", "requests_per_minute": 1, "max_output_tokens": 4},
    "narrow": {"models": [SMOLLM]},
    "elsewhere": {"models": ["gpt-oss-120b"]},  # a model this stack does not serve
    "doomed": {},
    "metered": {"tokens_per_minute": 100_000},
}


def key(tenant: str) -> str:
    return f"key-{tenant}"


@dataclass
class Adversarial:
    stack: LiveStack
    redis: RedisServer
    upstream: SimEngine
    stack_prefix: str

    def sdk(self, tenant: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.stack.api, api_key=key(tenant), max_retries=0, timeout=180)

    def get(self, path: str, key_: str | None = None) -> httpx.Response:
        headers = {"authorization": f"Bearer {key_}"} if key_ else {}
        return httpx.get(self.stack.base_url + path, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def adv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Adversarial]:
    root: Path = tmp_path_factory.mktemp("adversarial")
    redis = RedisServer(root / "redis").start()
    upstream = SimEngine(
        EngineProfile(step_base_s=0.0005, step_per_seq_s=0, default_max_tokens=6), "sim-cloud"
    )
    port = _free_port()
    try:
        with serve_in_thread(upstream) as upstream_url:
            config = {
                "models": [smollm_config()],
                "gateway": {"port": port, "health_check_interval_s": 1.0},
                "redis": {"url": redis.url},
                "auth": {"required": True, "refresh_s": 0.5, "admin_key_sha256": [hash_key(OPS_KEY)]},
                "tenants": [
                    {"id": t, "api_key_sha256": [hash_key(key(t))], **extra} for t, extra in TENANTS.items()
                ],
                "queue": {"key_prefix": f"ossadv{port}"},
                "upstreams": [
                    {
                        "name": "cloud",
                        "base_url": upstream_url + "/v1",
                        "default_model": "cloud-large",
                        "api_key_env": None,
                    }
                ],
                "handoff": {
                    "upstream": "cloud",
                    "virtual_models": [{"name": "auto", "low": SMOLLM, "medium": SMOLLM, "high": SMOLLM}],
                },
            }
            with running_stack(root, config) as stack:
                yield Adversarial(stack, redis, upstream, f"ossadv{port}")
    finally:
        redis.stop()


def long_system(tag: str) -> str:
    return f"[{tag}] You answer for the payroll office of ACME. " + "Every rule here is binding. " * 60


def cached_tokens(reply: object) -> int:
    usage = getattr(reply, "usage", None)
    details = getattr(usage, "prompt_tokens_details", None)
    return int(getattr(details, "cached_tokens", 0) or 0)


def test_handoff_stays_within_the_tenants_limits(adv: Adversarial) -> None:
    """A tenant with 1 request a minute and 4 output tokens escalating to the cloud: one
    answer, then 429s; the upstream is asked for at most 4 tokens."""
    adv.upstream.faults.bodies.clear()
    statuses = []
    for _ in range(5):
        resp = httpx.post(
            adv.stack.api + "/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {key('capped')}", "x-oss-escalate": "1"},
            timeout=60,
        )
        statuses.append(resp.status_code)
        if resp.status_code == 200:
            assert resp.headers["x-oss-serving-backend"] == "cloud"
    assert statuses == [200, 429, 429, 429, 429]
    bodies = list(adv.upstream.faults.bodies)
    assert len(bodies) == 1
    assert 0 < int(bodies[0]["max_tokens"]) <= 4


def test_one_tenant_cannot_probe_another_tenants_prompt_cache(adv: Adversarial) -> None:
    """Tenant A's repeat hits the engine's prefix cache; tenant B sending the same long
    system prompt sees no cached tokens (its cache salt differs)."""
    system = long_system(uuid.uuid4().hex)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Who approves leave?"}]
    a = adv.sdk("alpha")
    first = a.chat.completions.create(model=SMOLLM, messages=messages, max_tokens=2, temperature=0)  # type: ignore[arg-type]
    assert cached_tokens(first) == 0
    again = a.chat.completions.create(model=SMOLLM, messages=messages, max_tokens=2, temperature=0)  # type: ignore[arg-type]
    assert cached_tokens(again) > 0, "the same tenant's repeat should hit the prefix cache"
    b = adv.sdk("bravo").chat.completions.create(model=SMOLLM, messages=messages, max_tokens=2, temperature=0)  # type: ignore[arg-type]
    assert cached_tokens(b) == 0, "another tenant must not see tenant A's cached prefix"
    # and a client cannot buy its way in with a salt of its own, even tenant A's very salt
    other = [{"role": "system", "content": long_system(uuid.uuid4().hex)}, messages[1]]
    a.chat.completions.create(model=SMOLLM, messages=other, max_tokens=2, temperature=0)  # type: ignore[arg-type]
    forged = adv.sdk("bravo").chat.completions.create(
        model=SMOLLM,
        messages=other,  # type: ignore[arg-type]
        max_tokens=2,
        temperature=0,
        extra_body={"cache_salt": CacheIsolation({}).salt("alpha")},
    )
    assert cached_tokens(forged) == 0


def test_doors_are_closed_without_credentials(adv: Adversarial) -> None:
    assert adv.get("/metrics").status_code == 401
    assert adv.get("/metrics", key("alpha")).status_code == 401
    ops = adv.get("/metrics", OPS_KEY)
    assert ops.status_code == 200
    assert "oss_serving_requests_total" in ops.text
    assert set(adv.get("/health").json()) == {"live", "ready", "status"}
    assert "models" in adv.get("/health", OPS_KEY).json()
    assert adv.get("/health/ready").status_code == 200
    assert adv.get("/v1/models").status_code == 401
    assert [m["id"] for m in adv.get("/v1/models", key("narrow")).json()["data"]] == [SMOLLM]
    # the filter does take models out: a tenant allowed only a model this stack does not
    # serve sees none, gets 404 for the served one's card and 403 for using it
    assert adv.get("/v1/models", key("elsewhere")).json()["data"] == []
    assert adv.get(f"/v1/models/{SMOLLM}", key("elsewhere")).status_code == 404
    assert adv.get(f"/v1/models/{SMOLLM}", key("narrow")).status_code == 200
    refused = httpx.post(
        adv.stack.api + "/chat/completions",
        json={"model": SMOLLM, "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {key('elsewhere')}"},
        timeout=60,
    )
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "model_not_allowed")


def test_tenant_limits_survive_a_fresh_minute_of_requests(adv: Adversarial) -> None:
    """The tenant's per-minute bucket lives in the shared Redis: still empty a moment later."""
    time.sleep(1)
    resp = httpx.post(
        adv.stack.api + "/chat/completions",
        json={"model": SMOLLM, "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {key('capped')}"},
        timeout=60,
    )
    assert resp.status_code == 429
    assert resp.json()["error"]["type"] == "requests"
    assert resp.json()["error"]["code"] == "rate_limit_exceeded"


def chat(adv: Adversarial, tenant: str, **extra: object) -> httpx.Response:
    body = {"model": SMOLLM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    return httpx.post(
        adv.stack.api + "/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key(tenant)}"},
        timeout=120,
    )


def tenants_cli(adv: Adversarial, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", "tenants", *args, "--config", str(adv.stack.config_file)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def test_fan_out_is_capped_before_it_costs_anything(adv: Adversarial) -> None:
    wide = chat(adv, "alpha", n=4096, max_tokens=1000)
    assert wide.status_code == 400
    assert (wide.json()["error"]["param"], wide.json()["error"]["code"]) == ("n", "fan_out_over_limit")
    prompts = httpx.post(
        adv.stack.api + "/completions",
        json={"model": SMOLLM, "prompt": ["x"] * 1024, "max_tokens": 1},
        headers={"authorization": f"Bearer {key('alpha')}"},
        timeout=60,
    )
    assert prompts.status_code == 400
    assert prompts.json()["error"]["code"] == "fan_out_over_limit"
    assert chat(adv, "alpha").status_code == 200  # and the tenant is served as before


def _charged(adv: Adversarial, tenant: str) -> float:
    text = adv.get("/metrics", OPS_KEY).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("oss_serving_tenant_tokens_charged_total{") and f'tenant="{tenant}"' in line
    )


def test_a_client_hanging_up_mid_stream_pays_what_it_received(adv: Adversarial) -> None:
    """Through the whole stack: the stream is cut after 20 chunks; the tenant is charged at
    least those tokens (never refunded below them) and not the unused output reservation."""
    before = _charged(adv, "metered")
    body = {
        "model": SMOLLM,
        "messages": [{"role": "user", "content": "Tell me a very long story about the sea."}],
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    chunks = 0
    with httpx.stream(
        "POST",
        adv.stack.api + "/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key('metered')}"},
        timeout=120,
    ) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunks += 1
            if chunks >= 20:
                break  # hang up
    wait_for(lambda: _charged(adv, "metered") > before, 30, "the cut stream to be accounted")
    charged = _charged(adv, "metered") - before
    assert charged >= 19, f"charged {charged} tokens for at least 19 delivered"
    assert charged < 400, f"charged {charged}: the unused output reservation should come back"


def test_a_corrupt_tenant_record_does_not_stop_key_refresh(adv: Adversarial) -> None:
    prefix = adv.stack_prefix
    r = redis_sync.Redis.from_url(adv.redis.url)
    r.hset(f"{prefix}:tenants", "broken", "{not json")
    r.hset(f"{prefix}:tenants", "future", '{"id": "future", "a_field_of_a_newer_version": 1}')
    time.sleep(1.5)  # several refreshes with the bad records in place
    assert chat(adv, "alpha").status_code == 200
    added = tenants_cli(adv, "add", "latecomer")
    assert added.returncode == 0, added.stderr
    new_key = next(w for w in added.stdout.split() if w.startswith("oss-"))

    def served() -> int:
        return httpx.post(
            adv.stack.api + "/chat/completions",
            json={"model": SMOLLM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            headers={"authorization": f"Bearer {new_key}"},
            timeout=60,
        ).status_code

    wait_for(lambda: served() == 200, 15, "a key added after the corrupt records to work")
    assert tenants_cli(adv, "revoke", new_key).returncode == 0
    wait_for(lambda: served() == 401, 15, "a key revoked after the corrupt records to stop working")
    r.hdel(f"{prefix}:tenants", "broken", "future")


def _gateway_pids(adv: Adversarial) -> list[int]:
    """This stack's gateway replica processes (descendants of its supervisor)."""
    state = json.loads((adv.stack.log_file.parent / "state.json").read_text())
    pids = []
    for child in psutil.Process(int(state["supervisor_pid"])).children(recursive=True):
        try:
            if "ServeReplica:oss-serving:gateway" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:  # gone meanwhile
            continue
    return pids


def test_a_revoked_seeded_key_stays_revoked_after_a_gateway_restart(adv: Adversarial) -> None:
    assert chat(adv, "doomed").status_code == 200  # seeded from the configuration
    revoked = tenants_cli(adv, "revoke", key("doomed"))
    assert revoked.returncode == 0, revoked.stderr
    wait_for(lambda: chat(adv, "doomed").status_code == 401, 15, "the revocation to reach the gateway")
    pids = _gateway_pids(adv)
    assert pids, "no gateway replica process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # the replica restarts and seeds from the configuration again

    def restarted() -> bool:
        try:
            return chat(adv, "alpha").status_code == 200 and set(_gateway_pids(adv)) - set(pids) != set()
        except httpx.HTTPError:
            return False

    wait_for(restarted, 180, "a new gateway replica to serve")
    assert chat(adv, "doomed").status_code == 401


def test_redis_restarted_empty_while_requests_flow(adv: Adversarial) -> None:
    """No valid key is ever refused while Redis comes back with nothing in it; the
    directory is re-seeded. (Last in the module: it empties the stack's Redis.)"""
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                statuses.append(chat(adv, "alpha").status_code)
            except httpx.HTTPError:
                statuses.append(-1)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(3)
        adv.redis.stop()
        time.sleep(2)
        adv.redis.start()  # same port, no data
        time.sleep(6)  # several refreshes of the empty Redis
    finally:
        stop.set()
        worker.join(180)
    assert statuses, "no request was sent"
    assert 401 not in statuses, statuses
    assert chat(adv, "alpha").status_code == 200
    r = redis_sync.Redis.from_url(adv.redis.url)
    wait_for(
        lambda: r.hexists(f"{adv.stack_prefix}:keys", hash_key(key("alpha"))), 15, "the keys to be re-seeded"
    )
