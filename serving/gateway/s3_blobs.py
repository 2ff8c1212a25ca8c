"""The Files API's contents in an S3-compatible object store (``files.backend: s3``).

AWS S3 or the enterprise's own store (MinIO, Ceph RGW, ...), spoken to over one pooled
:class:`httpx.AsyncClient`: ``PUT``, ``GET`` (with ``Range`` for a part) and ``DELETE``
of one object, no AWS SDK. Requests are signed with AWS Signature Version 4, written out
here (:func:`canonical_request`, :func:`string_to_sign`, :func:`signing_key`,
:func:`sign_v4`); the body's SHA-256 is signed too (``x-amz-content-sha256``, never
``UNSIGNED-PAYLOAD``), so the store refuses a body that changed on the way.

Objects are addressed path-style by default (``<endpoint>/<bucket>/<key>``, what MinIO
and Ceph RGW expect), or virtual-hosted (``<bucket>.<endpoint host>/<key>``). Keys are
checked as every backend checks them (:func:`~serving.gateway.blobs.check_key`), put
under ``files.s3.prefix``, and each segment percent-encoded once (S3's rule for the
signed path).

Errors: a missing object is :class:`BlobNotFoundError`; a missing bucket, a refusal
(403: a wrong key, a clock too far off, no permission), a 5xx, a timeout or an
unreachable store is :class:`BlobStoreError`, whose message names the operation, the key
and the store's error code, never a credential. Every operation is idempotent, so one
that failed with a 5xx or a connection error or timeout is sent once more.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import logging
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx

from serving.config import ConfigError, S3Config
from serving.gateway.blobs import BlobNotFoundError, BlobStoreError, check_key

__all__ = [
    "Credentials",
    "S3BlobStore",
    "canonical_request",
    "sign_v4",
    "signing_key",
    "string_to_sign",
]

log = logging.getLogger("oss_serving.files")

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
HASH_IN_THREAD_BYTES = 256 * 1024
"""Bodies larger than this are hashed in a thread, off the event loop."""


@dataclass(frozen=True)
class Credentials:
    """An access key (and a session token, for temporary credentials). The secret parts
    are left out of ``repr``, so a log line or a traceback never shows them."""

    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_environ(cls, config: S3Config, environ: Mapping[str, str]) -> Credentials:
        """The keys from the environment variables ``config`` names; :class:`ConfigError`
        when the access key or the secret key is not set."""
        access_key = environ.get(config.access_key_env, "")
        secret_key = environ.get(config.secret_key_env, "")
        missing = [
            name
            for name, value in ((config.access_key_env, access_key), (config.secret_key_env, secret_key))
            if not value
        ]
        if missing:
            raise ConfigError(
                f"files.backend is s3 but the environment variable {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set (files.s3.access_key_env, "
                "files.s3.secret_key_env; on a cluster: the chart's secrets.s3)",
                key="files.s3",
            )
        return cls(access_key, secret_key, environ.get(config.session_token_env) or None)


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest()


def _encode(value: str) -> str:
    """RFC 3986 percent-encoding: everything but ``A-Za-z0-9-_.~``."""
    return quote(value, safe="-_.~")


def canonical_request(
    method: str,
    path: str,
    query: list[tuple[str, str]],
    headers: Mapping[str, str],
    payload_sha256: str,
) -> tuple[str, str]:
    """The canonical request and its signed-headers list (``host;x-amz-date``).

    ``path`` is the request's path as sent (already percent-encoded: S3 signs it as is);
    ``query`` the decoded parameters; ``headers`` every header to sign (names in any
    case; values are trimmed and inner runs of spaces folded, as SigV4 says)."""
    canonical_query = "&".join(f"{k}={v}" for k, v in sorted((_encode(k), _encode(v)) for k, v in query))
    folded = {name.lower(): " ".join(value.split()) for name, value in headers.items()}
    names = sorted(folded)
    canonical_headers = "".join(f"{name}:{folded[name]}\n" for name in names)
    signed = ";".join(names)
    request = "\n".join(
        [method.upper(), path or "/", canonical_query, canonical_headers, signed, payload_sha256]
    )
    return request, signed


def string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    """What the signing key signs: the algorithm, the time, the scope
    (``<date>/<region>/<service>/aws4_request``) and the canonical request's SHA-256."""
    return "\n".join([ALGORITHM, amz_date, scope, _sha256_hex(canonical.encode("utf-8"))])


def signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    """The key of one day, region and service (``date`` is ``YYYYMMDD``)."""
    key = _hmac(f"AWS4{secret_key}".encode(), date)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    return key


def sign_v4(
    method: str,
    url: httpx.URL,
    headers: Mapping[str, str],
    payload_sha256: str,
    credentials: Credentials,
    *,
    region: str,
    service: str,
    now: dt.datetime | None = None,
) -> dict[str, str]:
    """The headers to send, signed: ``headers``, plus ``host``, ``x-amz-date``,
    ``x-amz-security-token`` (with a session token) and ``authorization``. Every header
    returned but ``authorization`` is signed; headers added afterwards are not."""
    when = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    amz_date = when.strftime("%Y%m%dT%H%M%SZ")
    date = amz_date[:8]
    out = {name.lower(): value for name, value in headers.items()}
    out["host"] = url.netloc.decode("ascii")
    out["x-amz-date"] = amz_date
    if credentials.session_token:
        out["x-amz-security-token"] = credentials.session_token
    path = url.raw_path.decode("ascii").partition("?")[0]
    canonical, signed = canonical_request(method, path, list(url.params.multi_items()), out, payload_sha256)
    scope = f"{date}/{region}/{service}/aws4_request"
    signature = hmac.new(
        signing_key(credentials.secret_key, date, region, service),
        string_to_sign(amz_date, scope, canonical).encode("utf-8"),
        hashlib.sha256,
    ).hexdigest()
    out["authorization"] = (
        f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    return out


_ERROR_FIELD = re.compile(r"<(Code|Message)>([^<]{0,500})</\1>")


def _store_error(response: httpx.Response) -> tuple[str, str]:
    """The error code and message of an S3 error body (``<Error><Code>...``), if any."""
    found = dict(_ERROR_FIELD.findall(response.text[:16384])) if response.content else {}
    return found.get("Code", ""), found.get("Message", "")


class S3BlobStore:
    """Blobs as objects of one bucket (see the module docstring).

    Built with :meth:`from_config` (credentials from the environment); ``transport`` is
    for tests. A request's phases (connect, each write, each read) each have
    ``timeout_s``.
    """

    def __init__(
        self,
        config: S3Config,
        credentials: Credentials,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        retry_delay_s: float = 0.2,
    ) -> None:
        self.config = config
        self._credentials = credentials
        self._retry_delay_s = retry_delay_s
        endpoint = httpx.URL(config.endpoint_url or f"https://s3.{config.region}.amazonaws.com")
        base_path = endpoint.raw_path.decode("ascii").partition("?")[0].rstrip("/")
        if config.addressing == "virtual":
            self._origin = endpoint.copy_with(host=f"{config.bucket}.{endpoint.host}", raw_path=b"/")
            self._root = base_path
        else:
            self._origin = endpoint.copy_with(raw_path=b"/")
            self._root = f"{base_path}/{_encode(config.bucket)}"
        self._prefix = config.prefix.split("/") if config.prefix else []
        verify: ssl.SSLContext | bool = True
        if config.ca_file is not None:
            try:
                verify = ssl.create_default_context(cafile=str(config.ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"files.s3.ca_file: cannot load {config.ca_file}: {exc}", key="files.s3.ca_file"
                ) from exc
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout_s),
            verify=verify,
            transport=transport,
            trust_env=False,
            follow_redirects=False,
            headers={"user-agent": "oss-serving"},
        )

    @classmethod
    def from_config(cls, config: S3Config, environ: Mapping[str, str]) -> S3BlobStore:
        """A store whose keys come from the environment variables ``config`` names."""
        return cls(config, Credentials.from_environ(config, environ))

    def url(self, key: str) -> httpx.URL:
        """The object of ``key`` (under the prefix, each segment percent-encoded once)."""
        parts = [*self._prefix, *check_key(key)]
        path = f"{self._root}/{'/'.join(_encode(part) for part in parts)}"
        return self._origin.copy_with(raw_path=path.encode("ascii"))

    async def put(self, key: str, data: bytes) -> None:
        # One PUT replaces the object whole: a reader gets the old bytes or the new ones.
        await self._call("PUT", key, body=data, extra={"content-type": "application/octet-stream"})

    async def get(self, key: str) -> bytes:
        return (await self._call("GET", key)).content

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        if start < 0 or end < start:
            raise BlobStoreError(f"invalid range {start}-{end}")
        if end == start:
            check_key(key)
            return b""
        response = await self._call("GET", key, extra={"range": f"bytes={start}-{end - 1}"}, allow=(416,))
        if response.status_code == 416:  # starts at or past the end: nothing there
            return b""
        if response.status_code == 206:
            return response.content
        return response.content[start:end]  # a store that ignored the range sent it all

    async def delete(self, key: str) -> None:
        await self._call("DELETE", key, allow=(404,))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(
        self,
        method: str,
        key: str,
        *,
        body: bytes = b"",
        extra: Mapping[str, str] | None = None,
        allow: tuple[int, ...] = (),
    ) -> httpx.Response:
        """Send one signed request (once more after a 5xx, a connection error or a
        timeout); a 2xx, or a status in ``allow``, is returned; anything else raised."""
        url = self.url(key)
        what = f"s3 {method} {key[:200]!r}"
        if len(body) > HASH_IN_THREAD_BYTES:
            payload = await asyncio.to_thread(_sha256_hex, body)
        else:
            payload = _sha256_hex(body) if body else EMPTY_SHA256
        error: BlobStoreError | None = None
        for attempt in (1, 2):
            if attempt == 2:
                log.warning("%s failed (%s); sending it once more", what, error)
                await asyncio.sleep(self._retry_delay_s)
            headers = sign_v4(
                method,
                url,
                {"x-amz-content-sha256": payload},
                payload,
                self._credentials,
                region=self.config.region,
                service="s3",
            )
            headers.update(extra or {})
            headers["accept-encoding"] = "identity"  # ranges are of the stored bytes
            try:
                response = await self._http.request(
                    method, url, content=body if method == "PUT" else None, headers=headers
                )
            except httpx.TimeoutException as exc:
                error = BlobStoreError(
                    f"{what}: the store did not answer within {self.config.timeout_s:g} s "
                    f"({type(exc).__name__})"
                )
                continue
            except httpx.TransportError as exc:
                error = BlobStoreError(
                    f"{what}: cannot reach the store at {self._origin.host}: {type(exc).__name__}: {exc}"
                )
                continue
            status = response.status_code
            if 200 <= status < 300:
                return response
            if status >= 500:
                error = self._error(what, key, response)
                continue
            code, _ = _store_error(response)
            if status in allow and code != "NoSuchBucket":
                return response
            raise self._error(what, key, response)
        assert error is not None
        raise error

    def _error(self, what: str, key: str, response: httpx.Response) -> BlobStoreError:
        code, message = _store_error(response)
        status = response.status_code
        detail = f"{status} {code}".rstrip() + (f": {message}" if message else "")
        if status == 404 and code == "NoSuchBucket":
            return BlobStoreError(f"{what}: the bucket {self.config.bucket!r} does not exist ({detail})")
        if status == 404:
            return BlobNotFoundError(f"no blob under {key[:200]!r}")
        if status == 403:
            return BlobStoreError(
                f"{what}: the store refused the request ({detail}); check the access key, "
                "the secret key, the region and the bucket's permissions"
            )
        return BlobStoreError(f"{what}: {detail}")
