"""The S3 blob store (``serving/gateway/s3_blobs.py``) against a real S3 implementation.

moto's S3 server runs in a process of its own (``moto_server``, from ``.venv-tools``:
botocore pins an older python-dateutil than the project's kubernetes client needs), with
request authentication on: every request is checked against an IAM user's keys, its
SigV4 signature recomputed by botocore. Round trips, ranges, overwrite, idempotent
delete, a missing key, a missing bucket, a wrong secret and an unknown access key, keys
with spaces, ``+`` and non-ASCII characters, the key prefix; an unreachable and a silent
store; one retry of a 5xx; the Files API and a batch on the S3 backend. The signer also
reproduces AWS's published Signature Version 4 example (``get-vanilla``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import html
import json
import re
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import certifi
import httpx
import openai
import pytest
import redis.asyncio as aioredis

from serving.config import ConfigError, FilesConfig, S3Config
from serving.gateway.blobs import BlobNotFoundError, BlobStoreError
from serving.gateway.files import Files, blob_key
from serving.gateway.s3_blobs import (
    Credentials,
    S3BlobStore,
    canonical_request,
    sign_v4,
    signing_key,
    string_to_sign,
)
from serving.gateway.validation import validate_request
from serving.wire import Endpoint
from tests.chart.tools import REPO, find_tool
from tests.gateway import TestGateway
from tests.redis_server import free_port
from tests.unit.test_batches import CHAT, LineEngine, line, lines_of, started, submit, wait_for
from tests.unit.test_files import JSONL, KEYS, batch_config

BUCKET = "oss-files"
# The install script's moto first: an older one elsewhere on PATH may predate fixes that
# these tests rely on (moto 5.2.1 recomputes signatures over a partly decoded path).
_PINNED_MOTO = REPO / ".venv-tools" / "bin" / "moto_server"
MOTO_SERVER = str(_PINNED_MOTO) if _PINNED_MOTO.is_file() else find_tool("moto_server")


# ------------------------------------------------------------------ the signer
# AWS's Signature Version 4 test suite, "get-vanilla" (GET / of example.amazonaws.com).
VANILLA_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
VANILLA = Credentials("AKIDEXAMPLE", VANILLA_SECRET)
VANILLA_TIME = dt.datetime(2015, 8, 30, 12, 36, 0, tzinfo=dt.UTC)
VANILLA_CANONICAL = (
    "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n"
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
)
VANILLA_STRING_TO_SIGN = (
    "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n"
    "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63"
)
VANILLA_SIGNATURE = "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"


def test_signer_reproduces_aws_get_vanilla() -> None:
    empty = hashlib.sha256(b"").hexdigest()
    canonical, signed = canonical_request(
        "GET", "/", [], {"Host": "example.amazonaws.com", "X-Amz-Date": "20150830T123600Z"}, empty
    )
    assert (canonical, signed) == (VANILLA_CANONICAL, "host;x-amz-date")
    scope = "20150830/us-east-1/service/aws4_request"
    assert string_to_sign("20150830T123600Z", scope, canonical) == VANILLA_STRING_TO_SIGN
    headers = sign_v4(
        "GET",
        httpx.URL("https://example.amazonaws.com/"),
        {},
        empty,
        VANILLA,
        region="us-east-1",
        service="service",
        now=VANILLA_TIME,
    )
    assert headers == {
        "host": "example.amazonaws.com",
        "x-amz-date": "20150830T123600Z",
        "authorization": "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/"
        f"aws4_request, SignedHeaders=host;x-amz-date, Signature={VANILLA_SIGNATURE}",
    }


def test_signing_key_and_canonical_details() -> None:
    # AWS's example of deriving a signing key (IAM, 2012-02-15)
    assert signing_key(VANILLA_SECRET, "20120215", "us-east-1", "iam").hex() == (
        "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
    )
    canonical, signed = canonical_request(
        "put",
        "/b/a%20b",
        [("b", "2"), ("a", "x y"), ("a", "1")],
        {"X-Amz-Meta": "  two   spaces ", "host": "h"},
        "p",
    )
    assert canonical.splitlines()[:5] == [
        "PUT",
        "/b/a%20b",
        "a=1&a=x%20y&b=2",
        "host:h",
        "x-amz-meta:two spaces",
    ]
    assert signed == "host;x-amz-meta"
    # a session token is sent and signed; the secret parts never show in a repr
    temporary = Credentials("AKID", "s3cr3t-value", "t0ken-value")
    headers = sign_v4("GET", httpx.URL("http://h:9000/b/k"), {}, "p", temporary, region="r", service="s3")
    assert headers["x-amz-security-token"] == "t0ken-value"
    assert "x-amz-security-token" in headers["authorization"].split("SignedHeaders=")[1]
    assert headers["host"] == "h:9000"
    assert "s3cr3t" not in repr(temporary)
    assert "t0ken" not in repr(temporary)


# ------------------------------------------------------------------ moto's S3 server
@dataclass(frozen=True)
class Moto:
    url: str
    credentials: Credentials
    """An IAM user's keys, allowed every S3 action."""

    def config(self, **overrides: Any) -> S3Config:
        return S3Config(**{"endpoint_url": self.url, "bucket": BUCKET, **overrides})

    def store(self, **overrides: Any) -> S3BlobStore:
        return S3BlobStore(self.config(**overrides), self.credentials, retry_delay_s=0.0)


def _signed(
    http: httpx.Client, method: str, path: str, credentials: Credentials, service: str, body: bytes = b""
) -> httpx.Response:
    """A request signed for ``service`` (moto's server routes by the signature's scope)."""
    url = httpx.URL(str(http.base_url)).copy_with(raw_path=path.encode())
    payload = hashlib.sha256(body).hexdigest()
    headers = sign_v4(
        method,
        url,
        {"x-amz-content-sha256": payload},
        payload,
        credentials,
        region="us-east-1",
        service=service,
    )
    if service == "iam":
        headers["content-type"] = "application/x-www-form-urlencoded"
    response = http.request(method, url, content=body, headers=headers)
    assert response.status_code < 300, response.text
    return response


def _xml_field(name: str, text: str) -> str:
    found = re.search(f"<{name}>([^<]+)</{name}>", text)
    assert found, text
    return found.group(1)


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    """moto's S3 server on a free port: an IAM user with S3 rights, the bucket, and then
    authentication on for every request."""
    if MOTO_SERVER is None:
        pytest.skip("moto_server is not installed (the install script puts moto[server] into .venv-tools)")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=5.0) as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if http.get("/moto-api/data.json").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.1)
            setup = Credentials("AKIDSETUP", "setup")  # not checked until authentication is on

            def iam(**form: str) -> str:
                body = urlencode({**form, "Version": "2010-05-08"}).encode()
                return _signed(http, "POST", "/", setup, "iam", body).text

            iam(Action="CreateUser", UserName="gateway")
            created = iam(Action="CreateAccessKey", UserName="gateway")
            policy = {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
            }
            iam(
                Action="PutUserPolicy", UserName="gateway", PolicyName="s3", PolicyDocument=json.dumps(policy)
            )
            _signed(http, "PUT", f"/{BUCKET}", setup, "s3")
            assert http.post("/moto-api/reset-auth", content=b"0").status_code == 200
        yield Moto(
            url, Credentials(_xml_field("AccessKeyId", created), _xml_field("SecretAccessKey", created))
        )
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def store(moto: Moto) -> AsyncIterator[S3BlobStore]:
    s = moto.store(prefix=f"t-{uuid.uuid4().hex[:8]}")
    yield s
    await s.aclose()


def listed(moto: Moto, prefix: str) -> list[str]:
    """The bucket's object keys under ``prefix``, as the store lists them (signed)."""
    query = httpx.QueryParams({"list-type": "2", "prefix": prefix})
    with httpx.Client(base_url=moto.url, timeout=5.0) as http:
        text = _signed(http, "GET", f"/{BUCKET}?{query}", moto.credentials, "s3").text
    return [html.unescape(key) for key in re.findall(r"<Key>([^<]*)</Key>", text)]


async def test_put_get_and_ranges(store: S3BlobStore) -> None:
    data = bytes(range(256)) * 40
    await store.put("tenant/file-1", data)
    assert await store.get("tenant/file-1") == data
    assert await store.get_range("tenant/file-1", 0, 10) == data[:10]
    assert await store.get_range("tenant/file-1", 1000, 1300) == data[1000:1300]
    # a range past the end gets what is there; one from the end gets nothing
    assert await store.get_range("tenant/file-1", 10_000, 20_000) == data[10_000:]
    assert await store.get_range("tenant/file-1", len(data), len(data) + 5) == b""
    assert await store.get_range("tenant/file-1", 7, 7) == b""
    with pytest.raises(BlobStoreError, match="invalid range"):
        await store.get_range("tenant/file-1", 5, 4)
    await store.put("tenant/empty", b"")
    assert await store.get("tenant/empty") == b""


async def test_a_put_replaces_the_whole_object(store: S3BlobStore) -> None:
    old, new = b"a" * 300_000, b"b" * 200_000  # over the size hashed in a thread
    await store.put("t/f", old)
    await store.put("t/f", new)
    assert await store.get("t/f") == new

    async def reader() -> set[bytes]:
        return {await store.get("t/f") for _ in range(10)}

    async def writer() -> None:
        for i in range(10):
            await store.put("t/f", old if i % 2 else new)

    *seen, _ = await asyncio.gather(reader(), reader(), writer())
    assert set().union(*seen) <= {old, new}  # a reader sees one version or the other, whole


async def test_delete_is_idempotent_and_a_missing_key_is_not_found(store: S3BlobStore) -> None:
    await store.put("t/gone", b"x")
    await store.delete("t/gone")
    await store.delete("t/gone")
    await store.delete("t/never-there")
    with pytest.raises(BlobNotFoundError):
        await store.get("t/gone")
    with pytest.raises(BlobNotFoundError):
        await store.get_range("t/gone", 0, 1)
    for bad in ("", "/abs", "a//b", "a/../b", "a/./b", "back\\slash"):
        with pytest.raises(BlobStoreError, match="invalid blob key"):
            await store.put(bad, b"x")


async def test_keys_with_spaces_plus_and_unicode_round_trip_under_their_names(moto: Moto) -> None:
    prefix = f"q-{uuid.uuid4().hex[:8]}"
    store = moto.store(prefix=prefix)
    keys = ["a b/c+d", "ünï/cödé €", "~tilde/x_y-z.jsonl", "percent%20/semi;colon=eq&amp", "q?x#frag"]
    try:
        for i, key in enumerate(keys):
            await store.put(key, f"v{i}".encode())
        for i, key in enumerate(keys):
            assert await store.get(key) == f"v{i}".encode()
            assert await store.get_range(key, 1, 2) == str(i).encode()
        assert sorted(listed(moto, prefix + "/")) == sorted(f"{prefix}/{k}" for k in keys)
        for key in keys:
            await store.delete(key)
        assert listed(moto, prefix + "/") == []
    finally:
        await store.aclose()


async def test_the_prefix_is_put_before_every_key(moto: Moto) -> None:
    team = f"team-{uuid.uuid4().hex[:8]}"
    prefixed = moto.store(prefix=f"/{team}/files/")
    plain = moto.store()
    try:
        assert prefixed.config.prefix == f"{team}/files"
        await prefixed.put("a/file-1", b"bytes")
        assert listed(moto, team) == [f"{team}/files/a/file-1"]
        assert await plain.get(f"{team}/files/a/file-1") == b"bytes"
        with pytest.raises(BlobNotFoundError):
            await plain.get("a/file-1")
    finally:
        await prefixed.aclose()
        await plain.aclose()


async def test_a_wrong_secret_or_unknown_key_is_a_store_error_without_the_secret(moto: Moto) -> None:
    wrong_secret = "wrong-secret-value-123"
    for credentials, code in (
        (Credentials(moto.credentials.access_key, wrong_secret), "SignatureDoesNotMatch"),
        (Credentials("AKIDUNKNOWN0000000000", wrong_secret), "InvalidAccessKeyId"),
    ):
        store = S3BlobStore(moto.config(), credentials, retry_delay_s=0.0)
        try:
            for call in (store.put("t/x", b"x"), store.get("t/x"), store.delete("t/x")):
                with pytest.raises(BlobStoreError) as err:
                    await call
                assert not isinstance(err.value, BlobNotFoundError)
                message = str(err.value)
                assert f"403 {code}" in message
                assert "check the access key" in message
                assert wrong_secret not in message
                assert moto.credentials.secret_key not in message
        finally:
            await store.aclose()


async def test_a_missing_bucket_is_a_store_error_not_a_missing_key(moto: Moto) -> None:
    store = S3BlobStore(moto.config(bucket="no-such-bucket"), moto.credentials, retry_delay_s=0.0)
    try:
        for call in (store.get("t/x"), store.get_range("t/x", 0, 1), store.delete("t/x")):
            with pytest.raises(BlobStoreError, match="bucket 'no-such-bucket' does not exist") as err:
                await call
            assert not isinstance(err.value, BlobNotFoundError)
    finally:
        await store.aclose()


async def test_an_unreachable_or_silent_store_is_a_store_error() -> None:
    creds = Credentials("AKID", "secret-not-shown")
    refused = S3BlobStore(
        S3Config(endpoint_url=f"http://127.0.0.1:{free_port()}", bucket="b", timeout_s=1.0),
        creds,
        retry_delay_s=0,
    )
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        mute = S3BlobStore(
            S3Config(endpoint_url=f"http://127.0.0.1:{port}", bucket="b", timeout_s=0.2),
            creds,
            retry_delay_s=0,
        )
        try:
            with pytest.raises(BlobStoreError, match=r"cannot reach the store at 127\.0\.0\.1") as err:
                await refused.get("t/x")
            assert "secret-not-shown" not in str(err.value)
            started_at = time.monotonic()
            with pytest.raises(BlobStoreError, match=r"did not answer within 0\.2 s"):
                await mute.put("t/x", b"x")
            assert time.monotonic() - started_at < 5
        finally:
            await refused.aclose()
            await mute.aclose()


# ------------------------------------------------------------------ requests, retries
class Recorder:
    """An httpx transport that answers from a list of statuses and keeps the requests."""

    def __init__(self, *answers: tuple[int, bytes]) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, body = self.answers.pop(0) if self.answers else (200, b"")
        return httpx.Response(status, content=body)


def recorded_store(recorder: Recorder, **config: Any) -> S3BlobStore:
    cfg = S3Config(**{"bucket": "bkt", "region": "eu-west-3", **config})
    return S3BlobStore(
        cfg, Credentials("AKID", "secret"), transport=httpx.MockTransport(recorder), retry_delay_s=0
    )


async def test_a_put_signs_the_body_hash_and_addressing_builds_the_url() -> None:
    recorder = Recorder()
    path_style = recorded_store(recorder, endpoint_url="http://minio.storage:9000/base/", prefix="p")
    virtual = recorded_store(recorder, addressing="virtual")
    try:
        await path_style.put("a b/c", b"body")
        await virtual.get_range("t/f", 2, 5)
    finally:
        await path_style.aclose()
        await virtual.aclose()
    put, get = recorder.requests
    assert put.method == "PUT"
    assert put.url.raw_path == b"/base/bkt/p/a%20b/c"
    assert put.headers["host"] == "minio.storage:9000"
    assert put.headers["x-amz-content-sha256"] == hashlib.sha256(b"body").hexdigest()
    assert put.content == b"body"
    assert "x-amz-content-sha256" in put.headers["authorization"]
    assert "/eu-west-3/s3/aws4_request" in put.headers["authorization"]
    assert str(get.url) == "https://bkt.s3.eu-west-3.amazonaws.com/t/f"  # AWS of the region by default
    assert get.headers["range"] == "bytes=2-4"
    assert get.headers["x-amz-content-sha256"] == hashlib.sha256(b"").hexdigest()


async def test_a_5xx_is_sent_once_more_and_a_4xx_is_not() -> None:
    slow_down = b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
    recorder = Recorder((503, slow_down), (200, b"data"))
    store = recorded_store(recorder)
    try:
        assert await store.get("t/f") == b"data"
        assert len(recorder.requests) == 2
        recorder.answers = [(500, b""), (503, slow_down)]
        with pytest.raises(BlobStoreError, match="503 SlowDown: Reduce your request rate"):
            await store.put("t/f", b"x")
        assert len(recorder.requests) == 4
        recorder.answers = [(404, b"<Error><Code>NoSuchKey</Code></Error>")]
        with pytest.raises(BlobNotFoundError):
            await store.get("t/f")
        assert len(recorder.requests) == 5
        recorder.answers = [(400, b"<Error><Code>InvalidRequest</Code></Error>")]
        with pytest.raises(BlobStoreError, match="400 InvalidRequest"):
            await store.delete("t/f")
        assert len(recorder.requests) == 6
    finally:
        await store.aclose()


# ------------------------------------------------------------------ configuration
def test_the_s3_backend_needs_a_bucket_and_its_own_settings() -> None:
    with pytest.raises(ValueError, match=r"files\.s3\.bucket is empty"):
        FilesConfig(backend="s3")
    with pytest.raises(ValueError, match=r"files\.s3 is set but files\.backend is not s3"):
        FilesConfig(s3=S3Config(bucket="b"))
    with pytest.raises(ValueError, match=r"files\.dir is the local backend's directory"):
        FilesConfig(backend="s3", s3=S3Config(bucket="b"), dir=Path("/x"))
    with pytest.raises(ValueError, match="segments"):
        S3Config(prefix="a//b")
    with pytest.raises(ValueError, match="endpoint_url"):
        S3Config(endpoint_url="minio:9000")  # no scheme
    cfg = FilesConfig(backend="s3", s3=S3Config(bucket="b", prefix="/x/y/"))
    assert cfg.s3.prefix == "x/y"
    assert (cfg.s3.region, cfg.s3.addressing, cfg.s3.access_key_env) == (
        "us-east-1",
        "path",
        "AWS_ACCESS_KEY_ID",
    )


async def test_a_private_ca_bundle_is_loaded_at_start(tmp_path: Path) -> None:
    creds = Credentials("AKID", "secret")
    with pytest.raises(ConfigError, match=r"files\.s3\.ca_file: cannot load"):
        S3BlobStore(S3Config(bucket="b", ca_file=tmp_path / "missing.pem"), creds)
    store = S3BlobStore(S3Config(bucket="b", ca_file=Path(certifi.where())), creds)
    await store.aclose()


def test_credentials_come_from_the_named_environment_variables() -> None:
    cfg = S3Config(
        bucket="b", access_key_env="MY_KEY", secret_key_env="MY_SECRET", session_token_env="MY_TOKEN"
    )
    creds = Credentials.from_environ(cfg, {"MY_KEY": "k", "MY_SECRET": "s", "MY_TOKEN": ""})
    assert (creds.access_key, creds.secret_key, creds.session_token) == ("k", "s", None)
    assert (
        Credentials.from_environ(cfg, {"MY_KEY": "k", "MY_SECRET": "s", "MY_TOKEN": "t"}).session_token == "t"
    )
    with pytest.raises(ConfigError, match="MY_SECRET is not set"):
        Credentials.from_environ(cfg, {"MY_KEY": "k"})
    with pytest.raises(ConfigError, match="MY_KEY and MY_SECRET are not set"):
        Credentials.from_environ(cfg, {})


# ------------------------------------------------------------------ the Files API on S3
def s3_environ(moto: Moto) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": moto.credentials.access_key,
        "AWS_SECRET_ACCESS_KEY": moto.credentials.secret_key,
    }


def s3_files(moto: Moto, prefix: str) -> dict[str, Any]:
    return {
        "backend": "s3",
        "dir": None,
        "s3": {"endpoint_url": moto.url, "bucket": BUCKET, "prefix": prefix},
    }


async def test_the_files_api_on_the_s3_backend(
    moto: Moto, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    prefix = f"ft-{uuid.uuid4().hex[:8]}"
    cfg = batch_config(tmp_path, prefix, files=s3_files(moto, prefix))
    one, two = (
        TestGateway(cfg, {"m": LineEngine()}, redis_client, environ=s3_environ(moto)) for _ in range(2)
    )
    try:
        files = one.service.files
        assert isinstance(files, Files)
        assert isinstance(files.blobs, S3BlobStore)
        sdk, other_replica = one.sdk(KEYS["a"]), two.sdk(KEYS["a"])
        created = await sdk.files.create(file=("in.jsonl", JSONL), purpose="batch")
        assert (created.bytes, created.filename, created.purpose) == (len(JSONL), "in.jsonl", "batch")
        assert listed(moto, prefix) == [f"{prefix}/{blob_key('a', created.id)}"]
        assert (await other_replica.files.content(created.id)).read() == JSONL
        assert [f.id for f in (await other_replica.files.list()).data] == [created.id]
        with pytest.raises(openai.NotFoundError):
            await two.sdk(KEYS["b"]).files.content(created.id)
        deleted = await other_replica.files.delete(created.id)
        assert (deleted.id, deleted.deleted) == (created.id, True)
        assert listed(moto, prefix) == []
        with pytest.raises(openai.NotFoundError):
            await sdk.files.content(created.id)
    finally:
        for gw in (one, two):
            await gw.close()


async def test_the_store_refusing_is_a_503_not_a_500(
    moto: Moto, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    prefix = f"ft-{uuid.uuid4().hex[:8]}"
    cfg = batch_config(tmp_path, prefix, files=s3_files(moto, prefix))
    environ = {**s3_environ(moto), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    gw = TestGateway(cfg, {"m": LineEngine()}, redis_client, environ=environ)
    try:
        with pytest.raises(openai.InternalServerError) as err:
            await gw.sdk(KEYS["a"]).files.create(file=("in.jsonl", JSONL), purpose="batch")
        assert err.value.status_code == 503
        assert "not-the-secret" not in err.value.response.text
    finally:
        await gw.close()


async def test_the_gateway_does_not_start_without_the_keys(
    redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    cfg = batch_config(tmp_path, "ft-nokeys", files={"backend": "s3", "dir": None, "s3": {"bucket": BUCKET}})
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set"):
        TestGateway(cfg, {"m": LineEngine()}, redis_client, environ={})


async def test_a_batch_on_the_s3_backend(moto: Moto, redis_client: aioredis.Redis, tmp_path: Path) -> None:
    validate_request(Endpoint.chat, line("warm")["body"], 2000)  # vLLM's models, imported before Redis calls
    prefix = f"bt-{uuid.uuid4().hex[:8]}"
    cfg = batch_config(tmp_path, prefix, files=s3_files(moto, prefix))
    gw = await started(TestGateway(cfg, {"m": LineEngine()}, redis_client, environ=s3_environ(moto)))
    try:
        sdk = gw.sdk(KEYS["a"])
        batch = await submit(sdk, [line(f"req-{i}") for i in range(20)] + ['{"custom_id": "broken"'])
        done = await wait_for(sdk, batch.id, "completed")
        assert done.endpoint == CHAT
        assert done.request_counts is not None
        assert done.request_counts.model_dump() == {"total": 21, "completed": 20, "failed": 1}
        output = await lines_of(sdk, done.output_file_id)
        assert sorted(x["custom_id"] for x in output) == sorted(f"req-{i}" for i in range(20))
        errors = await lines_of(sdk, done.error_file_id)
        assert len(errors) == 1
        stored = listed(moto, prefix)
        assert f"{prefix}/{blob_key('a', done.output_file_id or '')}" in stored
        assert f"{prefix}/{blob_key('a', done.error_file_id or '')}" in stored
    finally:
        await gw.close()
