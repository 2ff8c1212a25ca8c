"""The Batch API (``serving/gateway/batches.py``) in process, on a real Redis.

Gateway replicas over :class:`tests.fakes.FakeEngine` and the real pipeline, the OpenAI
SDK over the ASGI app: batches complete with every ``custom_id`` answered exactly once;
bad lines get their error-file entries; duplicates fail validation; cancel and expiry
stop running lines and leave no lease; two replicas share a batch; a replica killed
mid-line, Redis restarted (append-only file) and Redis emptied; 429s are retried;
interactive requests overtake batch lines at admission; another tenant sees nothing.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
import redis.asyncio as aioredis

from serving.engine.protocol import EngineJSON, EngineSSE
from serving.gateway.batches import BatchWorker
from serving.gateway.tenants import hash_key
from serving.gateway.validation import validate_request
from serving.wire import Endpoint
from tests.fakes import FakeEngine
from tests.gateway import TestGateway
from tests.redis_server import RedisServer
from tests.unit.test_files import KEYS, MODEL, batch_config

CHAT = "/v1/chat/completions"
T = TypeVar("T")


class LineEngine(FakeEngine):
    """Answers each chat request with its last message; the first ``fast`` calls at once,
    the others after ``delay_s`` (counting the ones cancelled while they wait)."""

    def __init__(self, delay_s: float = 0.0, fast: int = 0) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.fast = fast
        self.prompts: list[str] = []
        self.waiting = 0
        self.cancelled_waits = 0

    async def generate(
        self, endpoint: Endpoint, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncIterator[EngineJSON | EngineSSE]:
        prompt = str(body["messages"][-1]["content"])
        self.prompts.append(prompt)
        if self.delay_s and len(self.prompts) > self.fast:
            self.waiting += 1
            try:
                await asyncio.sleep(self.delay_s)
            except asyncio.CancelledError:
                self.cancelled_waits += 1
                raise
            finally:
                self.waiting -= 1
        if prompt == "engine-refuses":
            yield EngineJSON(400, {"error": {"message": "bad input", "type": "BadRequestError", "code": 400}})
            return
        self.text = f"echo {prompt}"
        async for item in super().generate(endpoint, body, headers):
            yield item


def line(custom_id: str, content: str | None = None, **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": content or f"prompt {custom_id}"}]
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": MODEL, "messages": messages, **body},
    }


def jsonl(lines: Iterable[dict[str, Any] | str]) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def worker_of(gw: TestGateway) -> BatchWorker:
    return next(c for c in gw.service._companions if isinstance(c, BatchWorker))


async def started(gw: TestGateway) -> TestGateway:
    await gw.service.start()
    await gw.service.probe_once()
    return gw


async def submit(sdk: openai.AsyncOpenAI, lines: Iterable[dict[str, Any] | str], **kw: Any) -> Any:
    upload = await sdk.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    return await sdk.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h", **kw)


async def through_503(make: Callable[[], Awaitable[T]], within_s: float = 10.0) -> T:
    """``make()``, again while it answers 503 (Redis away)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await make()
        except openai.InternalServerError as exc:
            status = exc.status_code
        assert status == 503
        assert time.monotonic() < deadline, "still 503"
        await asyncio.sleep(0.1)


async def wait_for(sdk: openai.AsyncOpenAI, batch_id: str, *statuses: str, within_s: float = 30.0) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        batch = await through_503(lambda: sdk.batches.retrieve(batch_id), within_s)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} is {batch.status}, not {statuses}"
        await asyncio.sleep(0.05)


async def until(check: Callable[[], bool], within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def lines_of(sdk: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    text = (await sdk.files.content(file_id)).read().decode()
    return [json.loads(x) for x in text.splitlines() if x]


def exactly_once(*files: list[dict[str, Any]]) -> collections.Counter[str]:
    counts = collections.Counter(str(x["custom_id"]) for f in files for x in f if x["custom_id"] is not None)
    assert set(counts.values()) <= {1}, [c for c, n in counts.items() if n > 1][:10]
    return counts


@pytest.fixture(scope="module", autouse=True)
def _validation_imported() -> None:
    """vLLM's protocol models are imported on the first validation, for seconds: not while
    a test's Redis calls (250 ms each) wait on the event loop."""
    validate_request(Endpoint.chat, line("warm")["body"], 2000)


@pytest.fixture
def prefix() -> str:
    return f"bt-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def gateways(
    redis_client: aioredis.Redis, tmp_path: Path, prefix: str
) -> AsyncIterator[Callable[..., Any]]:
    """Builds gateway replicas over the test's Redis (started: their batch workers run)."""
    made: list[TestGateway] = []

    async def make(engine: FakeEngine | None = None, redis: Any = None, **sections: Any) -> TestGateway:
        cfg = batch_config(tmp_path, prefix, **sections)
        engines = {m.name: engine or LineEngine() for m in cfg.models}
        gw = await started(TestGateway(cfg, engines, redis or redis_client))
        made.append(gw)
        return gw

    yield make
    for gw in made:
        await gw.close()


# ------------------------------------------------------------------ the happy path
async def test_a_batch_of_300_lines_completes_every_custom_id_answered_once(gateways: Any) -> None:
    engine = LineEngine()
    gw = await gateways(engine)
    sdk = gw.sdk(KEYS["a"])
    batch = await submit(sdk, [line(f"req-{i}") for i in range(300)], metadata={"job": "nightly"})
    assert batch.object == "batch"
    assert batch.status in ("in_progress", "finalizing", "completed")
    assert (batch.endpoint, batch.completion_window, batch.metadata) == (CHAT, "24h", {"job": "nightly"})
    assert batch.expires_at == batch.created_at + 24 * 3600
    done = await wait_for(sdk, batch.id, "completed")
    assert done.request_counts is not None
    assert done.request_counts.model_dump() == {"total": 300, "completed": 300, "failed": 0}
    assert done.usage is not None  # each answer: 5 prompt tokens, 3 completion tokens
    assert (done.usage.input_tokens, done.usage.output_tokens, done.usage.total_tokens) == (1500, 900, 2400)
    assert done.in_progress_at is not None
    assert done.finalizing_at is not None
    assert done.completed_at is not None
    assert done.error_file_id is None
    output = await lines_of(sdk, done.output_file_id)
    assert exactly_once(output) == {f"req-{i}": 1 for i in range(300)}
    first = output[0]
    assert first["id"].startswith("batch_req_")
    assert first["error"] is None
    assert first["response"]["status_code"] == 200
    assert first["response"]["request_id"].startswith("req_")
    by_id = {x["custom_id"]: x for x in output}
    assert by_id["req-7"]["response"]["body"]["choices"][0]["message"]["content"] == "echo prompt req-7"
    assert [x["custom_id"] for x in output] == [f"req-{i}" for i in range(300)]  # in input order
    assert len(engine.prompts) == 300
    meta = await sdk.files.retrieve(done.output_file_id or "")
    assert meta.purpose == "batch_output"
    assert gw.metric("oss_serving_batch_lines_total", outcome="completed") == 300
    # every line went through admission at the batch priority
    assert gw.metric("oss_serving_admissions_total", model=MODEL, priority="batch") == 300
    assert gw.metric("oss_serving_admissions_total", model=MODEL, priority="standard") == 0
    await until(lambda: gw.metric("oss_serving_batches", status="completed") >= 1)  # the sweeper's gauge
    assert gw.metric("oss_serving_batches", status="in_progress") == 0


async def test_bad_lines_get_error_entries_and_the_batch_completes(gateways: Any) -> None:
    gw = await gateways(
        models=["m", "m2"],
        tenants=[{"id": "a", "api_key_sha256": [hash_key(KEYS["a"])], "models": ["m"]}],
    )
    sdk = gw.sdk(KEYS["a"])
    lines: list[dict[str, Any] | str] = [
        line("ok-1"),
        '{"custom_id": "broken", "method": "POST", ',
        {"method": "POST", "url": CHAT, "body": line("x")["body"]},
        {**line("wrong-url"), "url": "/v1/completions"},
        {**line("wrong-method"), "method": "GET"},
        {**line("not-allowed"), "body": {**line("x")["body"], "model": "m2"}},
        line("bad-body", temperature="hot"),
        "   ",
        line("streamed", stream=True),
        line("engine-400", "engine-refuses"),
        line("ok-2"),
    ]
    batch = await submit(sdk, lines)
    done = await wait_for(sdk, batch.id, "completed")
    assert done.request_counts is not None
    assert done.request_counts.model_dump() == {"total": 10, "completed": 2, "failed": 8}
    output = await lines_of(sdk, done.output_file_id)
    errors = await lines_of(sdk, done.error_file_id)
    assert [x["custom_id"] for x in output] == ["ok-1", "ok-2"]
    exactly_once(output, errors)
    without_id = [x for x in errors if x["custom_id"] is None]
    assert [(x["error"]["code"], x["error"]["line"]) for x in without_id] == [
        ("invalid_json_line", 2),
        ("missing_required_parameter", 3),
    ]
    assert all(x["response"] is None for x in without_id)
    by_id = {x["custom_id"]: x for x in errors if x["custom_id"]}
    assert by_id["wrong-url"]["error"]["code"] == "url_mismatch"
    assert by_id["wrong-url"]["error"]["line"] == 4
    assert by_id["wrong-method"]["error"]["code"] == "invalid_method"
    # the lines that ran were answered as the API would have: status and error body
    answered = {c: by_id[c]["response"] for c in ("not-allowed", "bad-body", "streamed", "engine-400")}
    assert all(by_id[c]["error"] is None for c in answered)
    assert answered["not-allowed"]["status_code"] == 403
    assert answered["not-allowed"]["body"]["error"]["code"] == "model_not_allowed"
    assert answered["bad-body"]["status_code"] == 400
    assert answered["bad-body"]["body"]["error"]["param"] == "temperature"
    assert answered["streamed"]["status_code"] == 400
    assert answered["streamed"]["body"]["error"]["param"] == "stream"
    assert answered["engine-400"]["status_code"] == 400
    assert answered["engine-400"]["body"]["error"]["type"] == "invalid_request_error"
    for response in answered.values():
        assert response["body"]["error"]["request_id"] == response["request_id"]


async def test_duplicate_custom_ids_fail_validation_with_their_lines(gateways: Any) -> None:
    engine = LineEngine()
    gw = await gateways(engine)
    sdk = gw.sdk(KEYS["a"])
    batch = await submit(sdk, [line("x"), line("y"), line("x"), line("z"), line("y")])
    assert batch.status == "failed"
    assert batch.failed_at is not None
    assert batch.errors is not None
    assert [(e.code, e.line, e.param) for e in batch.errors.data or []] == [
        ("duplicate_custom_id", 3, "custom_id"),
        ("duplicate_custom_id", 5, "custom_id"),
    ]
    assert (batch.output_file_id, batch.error_file_id) == (None, None)
    await asyncio.sleep(0.3)
    assert engine.prompts == []  # nothing ran
    assert (await sdk.batches.retrieve(batch.id)).status == "failed"
    with pytest.raises(openai.APIStatusError) as err:
        await sdk.batches.cancel(batch.id)
    assert err.value.status_code == 409


async def test_empty_and_too_long_files_fail_validation(gateways: Any) -> None:
    gw = await gateways(batch={"max_lines": 3})
    sdk = gw.sdk(KEYS["a"])
    empty = await submit(sdk, ["", "  "])
    assert (empty.status, [e.code for e in empty.errors.data]) == ("failed", ["empty_file"])
    long = await submit(sdk, [line(str(i)) for i in range(4)])
    assert (long.status, [e.code for e in long.errors.data]) == ("failed", ["too_many_tasks"])


async def test_create_parameters_are_checked(gateways: Any) -> None:
    gw = await gateways()
    sdk = gw.sdk(KEYS["a"])
    upload = await sdk.files.create(file=("in.jsonl", jsonl([line("a")])), purpose="batch")
    bad: list[tuple[dict[str, Any], str, int]] = [
        (
            {"input_file_id": upload.id, "endpoint": "/v1/embeddings", "completion_window": "24h"},
            "endpoint",
            400,
        ),
        ({"input_file_id": upload.id, "endpoint": CHAT, "completion_window": "1h"}, "completion_window", 400),
        ({"endpoint": CHAT, "completion_window": "24h"}, "input_file_id", 400),
        ({"input_file_id": "file-nope", "endpoint": CHAT, "completion_window": "24h"}, "input_file_id", 404),
        (
            {"input_file_id": upload.id, "endpoint": CHAT, "completion_window": "24h", "metadata": {"k": 1}},
            "metadata",
            400,
        ),
    ]
    for body, param, status in bad:
        resp = await gw.http.post("/v1/batches", json=body, headers={"authorization": f"Bearer {KEYS['a']}"})
        assert resp.status_code == status, (body, resp.json())
        assert resp.json()["error"]["param"] == param
    not_json = await gw.http.post(
        "/v1/batches",
        content=b"{",
        headers={"authorization": f"Bearer {KEYS['a']}", "content-type": "application/json"},
    )
    assert not_json.status_code == 400
    # an output file is not an input file
    done = await wait_for(sdk, (await submit(sdk, [line("a")])).id, "completed")
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.batches.create(
            input_file_id=done.output_file_id or "", endpoint=CHAT, completion_window="24h"
        )
    assert isinstance(err.value.body, dict)
    assert err.value.body["param"] == "input_file_id"


async def test_another_tenant_sees_no_batch_and_cannot_use_the_file(gateways: Any) -> None:
    gw = await gateways()
    a, b = gw.sdk(KEYS["a"]), gw.sdk(KEYS["b"])
    upload = await a.files.create(file=("in.jsonl", jsonl([line("a")])), purpose="batch")
    batch = await a.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        await b.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        await b.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError) as err:
        await b.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")
    assert isinstance(err.value.body, dict)
    assert err.value.body["param"] == "input_file_id"
    assert (await b.batches.list()).data == []
    done = await wait_for(a, batch.id, "completed")
    with pytest.raises(openai.NotFoundError):
        await b.files.content(done.output_file_id or "")
    assert (await gw.http.get(f"/v1/batches/{batch.id}")).status_code == 401


async def test_list_newest_first_with_a_cursor(gateways: Any) -> None:
    gw = await gateways()
    sdk = gw.sdk(KEYS["a"])
    ids = []
    for i in range(3):
        ids.append((await submit(sdk, [line(f"{i}")])).id)
        await asyncio.sleep(0.002)
    page = await sdk.batches.list(limit=2)
    assert [x.id for x in page.data] == [ids[2], ids[1]]
    assert page.has_more is True
    rest = await sdk.batches.list(limit=2, after=ids[1])
    assert [x.id for x in rest.data] == [ids[0]]
    assert rest.has_more is False
    assert [x.id async for x in sdk.batches.list(limit=1)] == ids[::-1]
    bad = await gw.http.get("/v1/batches?limit=101", headers={"authorization": f"Bearer {KEYS['a']}"})
    assert bad.status_code == 400


# ------------------------------------------------------------------ cancel and expiry
async def test_cancel_mid_batch_stops_running_lines_and_keeps_the_partial_output(gateways: Any) -> None:
    """Cancelled through another replica: the one running the lines sees it in Redis."""
    engine = LineEngine(delay_s=60.0, fast=5)
    gw = await gateways(engine, batch={"concurrency_per_replica": 4})
    sdk = gw.sdk(KEYS["a"])
    batch = await submit(sdk, [line(f"c{i}") for i in range(20)])
    await until(lambda: engine.waiting == 4)  # five answered, four stuck on the engine
    assert gw.metric("oss_serving_requests_in_flight", model=MODEL, endpoint="chat") == 4
    snapshot = await gw.service.admission.snapshot(MODEL)
    assert snapshot.in_use == 4
    await until(lambda: gw.metric("oss_serving_batch_oldest_line_age_seconds") > 0)
    other = await gateways(LineEngine())  # the cancel goes through another replica,
    await worker_of(other).stop()  # which runs no line itself
    cancelling = await other.sdk(KEYS["a"]).batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    assert cancelling.cancelling_at is not None
    done = await wait_for(sdk, batch.id, "cancelled", within_s=10)
    assert done.cancelled_at is not None
    assert engine.cancelled_waits == 4  # the running lines' engine requests were closed
    assert engine.waiting == 0
    assert len(engine.prompts) == 9  # nothing started after the cancel
    output = await lines_of(sdk, done.output_file_id)
    errors = await lines_of(sdk, done.error_file_id)
    assert exactly_once(output, errors) == {f"c{i}": 1 for i in range(20)}
    assert len(output) == 5
    assert all(x["response"]["status_code"] == 200 for x in output)
    assert {x["error"]["code"] for x in errors} == {"batch_cancelled"}
    assert done.request_counts is not None
    assert done.request_counts.model_dump() == {"total": 20, "completed": 5, "failed": 15}
    # no lease, no gauge left behind
    snapshot = await gw.service.admission.snapshot(MODEL)
    assert (snapshot.in_use, sum(snapshot.depth.values())) == (0, 0)
    assert gw.metric("oss_serving_requests_in_flight", model=MODEL, endpoint="chat") == 0
    again = await sdk.batches.cancel(batch.id)  # cancelling a cancelled batch changes nothing
    assert again.status == "cancelled"


async def test_a_batch_past_its_window_expires_with_batch_expired_entries(gateways: Any) -> None:
    engine = LineEngine(delay_s=60.0, fast=3)
    gw = await gateways(engine, batch={"concurrency_per_replica": 4, "completion_window_s": 1.5})
    sdk = gw.sdk(KEYS["a"])
    batch = await submit(sdk, [line(f"e{i}") for i in range(10)])
    done = await wait_for(sdk, batch.id, "expired", within_s=15)
    assert done.expired_at is not None
    output = await lines_of(sdk, done.output_file_id)
    errors = await lines_of(sdk, done.error_file_id)
    assert exactly_once(output, errors) == {f"e{i}": 1 for i in range(10)}
    assert len(output) == 3
    assert {x["error"]["code"] for x in errors} == {"batch_expired"}
    assert errors[0]["error"]["message"].startswith("This request could not be executed before")
    assert engine.cancelled_waits == 4
    assert engine.waiting == 0
    assert (await gw.service.admission.snapshot(MODEL)).in_use == 0


# ------------------------------------------------------------------ retries
async def test_rate_limited_lines_are_retried_not_written_as_errors(gateways: Any) -> None:
    """The tenant may run one request at once; the worker runs four: the 429s are retried."""
    gw = await gateways(
        tenants=[{"id": "a", "api_key_sha256": [hash_key(KEYS["a"])], "max_concurrent_requests": 1}],
        batch={"concurrency_per_replica": 4},
    )
    sdk = gw.sdk(KEYS["a"])
    batch = await submit(sdk, [line(f"r{i}") for i in range(6)])
    done = await wait_for(sdk, batch.id, "completed", within_s=60)
    assert done.error_file_id is None
    output = await lines_of(sdk, done.output_file_id)
    assert exactly_once(output) == {f"r{i}": 1 for i in range(6)}
    assert gw.metric("oss_serving_batch_lines_total", outcome="retried") > 0


# ------------------------------------------------------------------ replicas and failures
async def test_two_replicas_share_a_batch_and_each_line_is_answered_once(gateways: Any) -> None:
    one_engine, two_engine = LineEngine(delay_s=0.005), LineEngine(delay_s=0.005)
    one = await gateways(one_engine)
    await gateways(two_engine)
    sdk = one.sdk(KEYS["a"])
    batch = await submit(sdk, [line(f"s{i}") for i in range(300)])
    done = await wait_for(sdk, batch.id, "completed", within_s=60)
    output = await lines_of(sdk, done.output_file_id)
    assert exactly_once(output) == {f"s{i}": 1 for i in range(300)}
    assert one_engine.prompts, "the first replica ran no line"
    assert two_engine.prompts, "the second replica ran no line"
    assert sorted(one_engine.prompts + two_engine.prompts) == sorted(f"prompt s{i}" for i in range(300))


@pytest.mark.parametrize(
    ("hand_back", "claim_idle_s", "within_s"),
    [(False, 1.0, 30.0), (True, 30.0, 10.0)],
    ids=["killed-claims-kept", "graceful-claims-handed-back"],
)
async def test_a_stopped_replica_s_running_lines_are_taken_over_and_answered_once(
    gateways: Any, hand_back: bool, claim_idle_s: float, within_s: float
) -> None:
    """Killed (its line tasks cancelled, nothing acknowledged, the claims kept): another
    replica takes the lines over after ``claim_idle_s``. Stopped gracefully: at once,
    long before it."""
    slow = LineEngine(delay_s=60.0)
    batch_cfg = {"concurrency_per_replica": 3, "claim_idle_s": claim_idle_s}
    dying = await gateways(slow, batch=batch_cfg)
    sdk = dying.sdk(KEYS["a"])
    batch = await submit(sdk, [line(f"k{i}") for i in range(30)])
    await until(lambda: slow.waiting == 3)
    await worker_of(dying).stop(hand_back=hand_back)
    assert slow.cancelled_waits == 3
    survivor = LineEngine()
    await gateways(survivor, batch=batch_cfg)
    done = await wait_for(sdk, batch.id, "completed", within_s=within_s)
    output = await lines_of(sdk, done.output_file_id)
    assert exactly_once(output) == {f"k{i}": 1 for i in range(30)}
    assert len(survivor.prompts) == 30  # the three claimed lines too
    assert done.error_file_id is None
    assert done.usage is not None  # the lines run twice are counted once
    assert (done.usage.input_tokens, done.usage.output_tokens) == (30 * 5, 30 * 3)


async def test_redis_restarted_mid_batch_completes_exactly_once(tmp_path: Path, prefix: str) -> None:
    server = RedisServer(tmp_path / "redis", aof=True).start()
    client = aioredis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
    engine = LineEngine(delay_s=0.02)
    gw = await started(TestGateway(batch_config(tmp_path, prefix), {MODEL: engine}, client))
    try:
        sdk = gw.sdk(KEYS["a"])
        batch = await submit(sdk, [line(f"p{i}") for i in range(200)])
        await until(lambda: len(engine.prompts) >= 40)
        server.stop()  # SIGKILL: what the last second wrote may be lost (appendfsync everysec)
        await asyncio.sleep(1.5)
        server.start()
        done = await wait_for(sdk, batch.id, "completed", within_s=60)
        output = await lines_of(sdk, done.output_file_id)
        assert exactly_once(output) == {f"p{i}": 1 for i in range(200)}
        assert done.error_file_id is None
        assert done.request_counts is not None
        assert done.request_counts.model_dump() == {"total": 200, "completed": 200, "failed": 0}
    finally:
        await gw.close()
        await client.aclose()
        server.stop()


async def test_redis_emptied_mid_batch_the_worker_goes_on(
    gateways: Any, redis_client: aioredis.Redis, prefix: str
) -> None:
    engine = LineEngine(delay_s=0.5)
    gw = await gateways(engine, batch={"concurrency_per_replica": 2})
    sdk = gw.sdk(KEYS["a"])
    lost = await submit(sdk, [line(f"l{i}") for i in range(10)])
    await until(lambda: engine.waiting == 2)
    keys = [k async for k in redis_client.scan_iter(match=f"{prefix}:*")]
    await redis_client.delete(*keys)  # the batch, its stream and group, the file records
    with pytest.raises(openai.NotFoundError):
        await sdk.batches.retrieve(lost.id)
    fresh = await submit(sdk, [line(f"n{i}") for i in range(4)])
    done = await wait_for(sdk, fresh.id, "completed", within_s=20)
    assert exactly_once(await lines_of(sdk, done.output_file_id)) == {f"n{i}": 1 for i in range(4)}
    assert not await redis_client.exists(f"{prefix}:batch:o:{lost.id}")  # nothing written for the lost one


async def test_redis_down_answers_503_and_the_worker_resumes(tmp_path: Path, prefix: str) -> None:
    server = RedisServer(tmp_path / "redis", aof=True).start()
    client = aioredis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
    engine = LineEngine()
    gw = await started(TestGateway(batch_config(tmp_path, prefix), {MODEL: engine}, client))
    try:
        sdk = gw.sdk(KEYS["a"])
        first = await wait_for(sdk, (await submit(sdk, [line("before")])).id, "completed")
        server.stop()
        with pytest.raises(openai.APIStatusError) as err:
            await sdk.batches.retrieve(first.id)
        assert err.value.status_code == 503
        await asyncio.sleep(1.0)  # the worker backs off meanwhile
        server.start()
        batch = await through_503(lambda: submit(sdk, [line("after")]))  # the breaker closes in about 1 s
        assert (await wait_for(sdk, batch.id, "completed", within_s=20)).request_counts.completed == 1
    finally:
        await gw.close()
        await client.aclose()
        server.stop()


# ------------------------------------------------------------------ priority
async def test_interactive_requests_overtake_waiting_batch_lines(gateways: Any) -> None:
    """Capacity 1: one batch line runs, three wait at priority batch; a request sent now is
    granted before them, as soon as the running line ends."""
    engine = LineEngine(delay_s=0.4)
    gw = await gateways(engine, queue={"capacity_per_replica": 1}, batch={"concurrency_per_replica": 4})
    sdk = gw.sdk(KEYS["a"])
    batch = await submit(sdk, [line(f"q{i}") for i in range(6)])
    await until(lambda: engine.waiting == 1 and len(engine.prompts) == 1)
    deadline = time.monotonic() + 5
    while (await gw.service.admission.snapshot(MODEL)).depth.get("batch") != 3:
        assert time.monotonic() < deadline, "three batch lines never waited in the queue"
        await asyncio.sleep(0.02)
    sent = time.monotonic()
    reply = await gw.sdk(KEYS["b"]).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "interactive"}]
    )
    took = time.monotonic() - sent
    assert reply.choices[0].message.content == "echo interactive"
    assert engine.prompts[1] == "interactive"  # right after the line that was running
    assert took < 0.4 + 0.4 + 0.3  # the running line's rest, its own run, slack: never behind the three
    await wait_for(sdk, batch.id, "completed", within_s=20)


# ------------------------------------------------------------------ the unexpected
async def test_an_unexpected_failure_of_a_line_is_an_error_entry_not_a_line_run_forever(
    gateways: Any,
) -> None:
    gw = await gateways()
    worker = worker_of(gw)
    submit_line = worker._submit
    calls = collections.Counter[str]()

    async def flaky(endpoint: Endpoint, body: dict[str, Any], tenant: Any, request_id: str) -> Any:
        prompt = body["messages"][-1]["content"]
        calls[prompt] += 1
        if prompt == "prompt boom":
            raise RuntimeError("a bug")
        return await submit_line(endpoint, body, tenant, request_id)

    worker._submit = flaky
    sdk = gw.sdk(KEYS["a"])
    batch = await submit(sdk, [line("ok"), line("boom"), line("ok-2")])
    done = await wait_for(sdk, batch.id, "completed")
    output = await lines_of(sdk, done.output_file_id)
    errors = await lines_of(sdk, done.error_file_id)
    assert [x["custom_id"] for x in output] == ["ok", "ok-2"]
    assert [(x["error"]["code"], x["error"]["line"]) for x in errors] == [("internal_error", 2)]
    assert calls["prompt boom"] == 1  # answered with its error, not run again
    assert done.request_counts is not None
    assert done.request_counts.model_dump() == {"total": 3, "completed": 2, "failed": 1}


async def test_an_input_file_deleted_mid_batch_fails_its_remaining_lines(gateways: Any) -> None:
    engine = LineEngine(delay_s=0.3)
    gw = await gateways(engine, batch={"concurrency_per_replica": 2})
    sdk = gw.sdk(KEYS["a"])
    upload = await sdk.files.create(
        file=("in.jsonl", jsonl([line(f"d{i}") for i in range(10)])), purpose="batch"
    )
    batch = await sdk.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")
    await until(lambda: len(engine.prompts) >= 2)
    await sdk.files.delete(upload.id)
    done = await wait_for(sdk, batch.id, "completed")
    output = await lines_of(sdk, done.output_file_id)
    errors = await lines_of(sdk, done.error_file_id)
    assert 2 <= len(output) < 10
    assert {x["error"]["code"] for x in errors} == {"input_file_deleted"}
    numbers = sorted(int(x["custom_id"][1:]) + 1 for x in output) + sorted(x["error"]["line"] for x in errors)
    assert sorted(numbers) == list(range(1, 11))  # every line once, answered or failed


def test_a_lines_tokens_are_read_from_either_usage_shape() -> None:
    from serving.gateway.batches import _line_tokens

    def recorded(usage: Any) -> str:
        answer = {"status_code": 200, "body": {"usage": usage}}
        return "7 " + json.dumps({"custom_id": "c", "response": answer})

    chat = {"prompt_tokens": 10, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 8},
            "completion_tokens_details": {"reasoning_tokens": 3}}  # fmt: skip
    responses = {"input_tokens": 9, "output_tokens": 5, "input_tokens_details": {"cached_tokens": 2},
                 "output_tokens_details": {"reasoning_tokens": 1}}  # fmt: skip
    assert _line_tokens(recorded(chat)) == (10, 4, 8, 3)
    assert _line_tokens(recorded(responses)) == (9, 5, 2, 1)
    assert _line_tokens(recorded({"prompt_tokens": -1, "prompt_tokens_details": [1]})) == (0, 0, 0, 0)
    assert _line_tokens(recorded(None)) == (0, 0, 0, 0)
    assert _line_tokens("3 not json") == (0, 0, 0, 0)
    error_line = "4 " + json.dumps({"custom_id": None, "response": None, "error": {"code": "x"}})
    assert _line_tokens(error_line) == (0, 0, 0, 0)
