"""The Files API (``serving/gateway/files.py``) and its local blob store, on a real Redis.

The OpenAI SDK over the ASGI app uploads, lists, retrieves, downloads and deletes; two
gateway replicas share the files; another tenant gets 404 for everything; oversize
uploads get 413 and other purposes 400; Redis down is a 503. ``LocalBlobStore``: atomic
puts, ranges, a missing key, keys that try to leave its directory.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from serving.gateway.blobs import BlobNotFoundError, BlobStoreError, LocalBlobStore
from serving.gateway.tenants import hash_key
from tests.fakes import FakeEngine
from tests.gateway import TestGateway, config_for

MODEL = "m"
KEYS = {"a": "key-a", "b": "key-b"}


def batch_config(
    tmp: Path,
    prefix: str,
    *,
    models: tuple[str, ...] | list[str] = (MODEL,),
    tenants: list[dict[str, Any]] | None = None,
    **sections: Any,
) -> Any:
    """Tenants with keys (``a`` and ``b`` by default), every Redis key and the files
    directory private to the test; ``sections`` are merged into the defaults."""
    defaults: dict[str, dict[str, Any]] = {
        "batch": {"key_prefix": f"{prefix}:batch", "claim_idle_s": 1.0, "poll_interval_s": 0.02},
        "files": {"key_prefix": f"{prefix}:files", "dir": str(tmp / "files")},
        "queue": {"key_prefix": prefix},
        "auth": {"required": True},
    }
    for name, values in sections.items():
        defaults[name] = {**defaults.get(name, {}), **values}
    seeds = tenants or [{"id": t, "api_key_sha256": [hash_key(k)]} for t, k in KEYS.items()]
    return config_for(list(models), tenants=seeds, **defaults)


@pytest.fixture
async def pair(redis_client: Any, tmp_path: Path) -> AsyncIterator[tuple[TestGateway, TestGateway]]:
    """Two gateway replicas over one Redis and one files directory."""
    cfg = batch_config(tmp_path, f"ft-{uuid.uuid4().hex[:8]}", files={"max_bytes": 4096})
    engine = FakeEngine()
    one, two = (
        TestGateway(cfg, {MODEL: engine}, redis_client),
        TestGateway(cfg, {MODEL: engine}, redis_client),
    )
    yield one, two
    for g in (one, two):
        await g.close()


JSONL = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'


async def test_upload_list_retrieve_content_delete_through_the_sdk(
    pair: tuple[TestGateway, TestGateway], tmp_path: Path
) -> None:
    one, two = pair
    sdk, other_replica = one.sdk(KEYS["a"]), two.sdk(KEYS["a"])
    created = await sdk.files.create(file=("in.jsonl", JSONL), purpose="batch")
    assert (created.object, created.purpose, created.bytes, created.filename) == (
        "file",
        "batch",
        len(JSONL),
        "in.jsonl",
    )
    assert created.id.startswith("file-")
    second = await sdk.files.create(file=("two.jsonl", JSONL * 2), purpose="batch")
    # the other replica sees both, newest first (OpenAI's default order), with a cursor
    listed = await other_replica.files.list()
    assert [f.id for f in listed.data] == [second.id, created.id]
    page = await other_replica.files.list(limit=1, order="asc")
    assert [f.id for f in page.data] == [created.id]
    assert page.has_more is True
    rest = await other_replica.files.list(limit=5, order="asc", after=created.id)
    assert [f.id for f in rest.data] == [second.id]
    assert [f.id async for f in other_replica.files.list(limit=1)] == [second.id, created.id]  # SDK paging
    assert (await other_replica.files.list(purpose="batch_output")).data == []
    assert (await other_replica.files.retrieve(created.id)).model_dump() == created.model_dump()
    content = await other_replica.files.content(second.id)
    assert content.read() == JSONL * 2
    # contents live in the configured directory, one file per upload
    assert (tmp_path / "files" / "a" / second.id).read_bytes() == JSONL * 2
    deleted = await other_replica.files.delete(created.id)
    assert (deleted.id, deleted.deleted) == (created.id, True)
    assert not (tmp_path / "files" / "a" / created.id).exists()
    with pytest.raises(openai.NotFoundError):
        await sdk.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        await sdk.files.delete(created.id)
    assert [f.id for f in (await sdk.files.list()).data] == [second.id]


async def test_another_tenant_gets_404_for_everything(pair: tuple[TestGateway, TestGateway]) -> None:
    one, two = pair
    created = await one.sdk(KEYS["a"]).files.create(file=("in.jsonl", JSONL), purpose="batch")
    for method, path in (
        ("GET", f"/v1/files/{created.id}"),
        ("GET", f"/v1/files/{created.id}/content"),
        ("DELETE", f"/v1/files/{created.id}"),
    ):
        resp = await two.http.request(method, path, headers={"authorization": f"Bearer {KEYS['b']}"})
        assert resp.status_code == 404, (method, path)
        error = resp.json()["error"]
        assert (error["code"], error["type"]) == ("file_not_found", "invalid_request_error")
        assert error["request_id"] == resp.headers["x-request-id"]
    assert (await two.sdk(KEYS["b"]).files.list()).data == []
    assert (await one.sdk(KEYS["a"]).files.retrieve(created.id)).id == created.id  # still there
    assert (await one.http.get("/v1/files")).status_code == 401  # no key


async def test_oversize_upload_is_413_and_stores_nothing(
    pair: tuple[TestGateway, TestGateway], tmp_path: Path
) -> None:
    one, _ = pair
    sdk = one.sdk(KEYS["a"])
    with pytest.raises(openai.APIStatusError) as err:
        await sdk.files.create(file=("big.jsonl", b"x" * 5000), purpose="batch")
    assert err.value.status_code == 413
    body = err.value.body
    assert isinstance(body, dict)
    assert (body["code"], body["param"]) == ("file_too_large", "file")
    # a body far over the limit is refused from its declared length, before it is read
    resp = await one.http.post(
        "/v1/files",
        content=b"x" * 200_000,
        headers={"authorization": f"Bearer {KEYS['a']}", "content-type": "multipart/form-data; boundary=x"},
    )
    assert resp.status_code == 413
    assert (await sdk.files.list()).data == []
    assert not (tmp_path / "files" / "a").exists()
    # exactly the limit is fine
    assert (await sdk.files.create(file=("ok.jsonl", b"x" * 4096), purpose="batch")).bytes == 4096


async def test_wrong_purpose_and_missing_parts_are_400(pair: tuple[TestGateway, TestGateway]) -> None:
    one, _ = pair
    sdk = one.sdk(KEYS["a"])
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.files.create(file=("in.jsonl", JSONL), purpose="fine-tune")
    body = err.value.body
    assert isinstance(body, dict)
    assert (body["param"], body["code"]) == ("purpose", "invalid_value")
    auth = {"authorization": f"Bearer {KEYS['a']}"}
    no_file = await one.http.post(
        "/v1/files", data={"purpose": "batch"}, files={"other": ("x", b"1")}, headers=auth
    )
    assert no_file.status_code == 400
    assert no_file.json()["error"]["param"] == "file"
    no_purpose = await one.http.post("/v1/files", files={"file": ("x.jsonl", JSONL)}, headers=auth)
    assert no_purpose.status_code == 400
    assert no_purpose.json()["error"]["param"] == "purpose"
    as_json = await one.http.post("/v1/files", json={"purpose": "batch"}, headers=auth)
    assert as_json.status_code == 400
    assert as_json.json()["error"]["code"] == "invalid_content_type"
    broken = await one.http.post(
        "/v1/files",
        content=b"--x\r\nnot a part header\r\n",
        headers={**auth, "content-type": "multipart/form-data; boundary=x"},
    )
    assert broken.status_code == 400
    assert (await sdk.files.list()).data == []


async def test_redis_down_is_503_not_500(redis_url: str, tmp_path: Path) -> None:
    import redis.asyncio as aioredis

    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    cfg = batch_config(tmp_path, "ft-dead")
    gw = TestGateway(cfg, {MODEL: FakeEngine()}, dead)
    try:
        sdk = gw.sdk(KEYS["a"])
        with pytest.raises(openai.APIStatusError) as err:
            await sdk.files.create(file=("in.jsonl", JSONL), purpose="batch")
        assert err.value.status_code == 503
        assert isinstance(err.value.body, dict)
        assert err.value.body["code"] == "files_unavailable"
        assert not any((tmp_path / "files").rglob("file-*"))  # the blob written first is removed again
        with pytest.raises(openai.APIStatusError) as err:
            await sdk.files.list()
        assert err.value.status_code == 503
    finally:
        await gw.close()
        await dead.aclose()


async def test_without_redis_the_routes_say_not_enabled(tmp_path: Path) -> None:
    gw = TestGateway(batch_config(tmp_path, "ft-none"), {MODEL: FakeEngine()}, None)
    try:
        sdk = gw.sdk(KEYS["a"])
        for call in (
            sdk.files.create(file=("in.jsonl", JSONL), purpose="batch"),
            sdk.files.list(),
            sdk.files.retrieve("file-x"),
            sdk.batches.create(
                input_file_id="file-x", endpoint="/v1/chat/completions", completion_window="24h"
            ),
            sdk.batches.retrieve("batch_x"),
        ):
            with pytest.raises(openai.BadRequestError) as err:
                await call
            assert isinstance(err.value.body, dict)
            assert err.value.body["code"] == "not_enabled"
    finally:
        await gw.close()


# ------------------------------------------------------------------ LocalBlobStore
async def test_local_blob_store_put_get_range_delete(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    await store.put("t/f1", b"0123456789")
    assert await store.get("t/f1") == b"0123456789"
    assert await store.get_range("t/f1", 2, 5) == b"234"
    assert await store.get_range("t/f1", 8, 100) == b"89"
    assert await store.get_range("t/f1", 3, 3) == b""
    await store.put("t/f1", b"new")  # replaced
    assert await store.get("t/f1") == b"new"
    await store.delete("t/f1")
    await store.delete("t/f1")  # nothing there: no error
    with pytest.raises(BlobNotFoundError):
        await store.get("t/f1")
    with pytest.raises(BlobNotFoundError):
        await store.get_range("t/nope", 0, 1)
    with pytest.raises(BlobStoreError):
        await store.get_range("t/f1", 5, 2)
    await store.aclose()


async def test_local_blob_store_put_is_atomic(tmp_path: Path) -> None:
    """Readers racing a writer see the old bytes or the new ones, never a part; nothing
    of the temporary files stays behind."""
    store = LocalBlobStore(tmp_path)
    old, new = b"a" * 2_000_000, b"b" * 3_000_000
    await store.put("k", old)

    async def read() -> None:
        for _ in range(30):
            assert await store.get("k") in (old, new)

    async def write() -> None:
        for data in (new, old, new):
            await store.put("k", data)

    await asyncio.gather(read(), write(), read())
    assert await store.get("k") == new
    assert os.listdir(tmp_path) == ["k"]


@pytest.mark.parametrize(
    "key",
    ["../escape", "a/../../escape", "/etc/passwd", "a//b", "a/./b", "", "a\\..\\b", "a\x00b", "a/.tmp-x"],
)
async def test_local_blob_store_refuses_keys_that_leave_its_directory(tmp_path: Path, key: str) -> None:
    store = LocalBlobStore(tmp_path / "root")
    (tmp_path / "escape").write_bytes(b"secret")
    for call in (store.put(key, b"x"), store.get(key), store.get_range(key, 0, 1), store.delete(key)):
        with pytest.raises(BlobStoreError) as err:
            await call
        assert not isinstance(err.value, BlobNotFoundError)
    assert (tmp_path / "escape").read_bytes() == b"secret"


async def test_local_blob_store_refuses_a_symlink_out_of_its_directory(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    store = LocalBlobStore(root)
    with pytest.raises(BlobStoreError):
        await store.put("link/x", b"x")
    assert not (outside / "x").exists()
