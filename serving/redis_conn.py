"""Every Redis client of oss-serving is built here, with the same settings.

The gateways (``serving.gateway.build``), ``oss-serve tenants`` and ``oss-serve up``
(``serving.local.stack``) and the tests get their client from :func:`redis_client` (or
:func:`sync_redis_client`): the URL from ``redis.url``, the password from
``OSS_SERVING_REDIS_PASSWORD`` (a Secret; never the URL or the configuration), the
timeouts from ``redis.connect_timeout_s`` and, for a ``rediss://`` URL, the TLS settings
of ``redis.tls``. The environment is read when a client is built, from the mapping passed
in (``os.environ`` by default), never at import.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from serving.config import RedisConfig, ServingConfig

if TYPE_CHECKING:
    import redis
    import redis.asyncio as aioredis

__all__ = ["REDIS_PASSWORD_ENV", "redis_client", "redis_kwargs", "sync_redis_client", "text"]

REDIS_PASSWORD_ENV = "OSS_SERVING_REDIS_PASSWORD"


def _redis_config(cfg: ServingConfig | RedisConfig) -> RedisConfig:
    return cfg.redis if isinstance(cfg, ServingConfig) else cfg


def redis_kwargs(
    cfg: ServingConfig | RedisConfig,
    environ: Mapping[str, str] | None = None,
    *,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """The keyword arguments of ``Redis.from_url(cfg.redis.url, ...)`` (sync or async):
    timeouts (``timeout_s`` replaces ``redis.connect_timeout_s``), the password from the
    environment, and the TLS settings when the URL is ``rediss://``."""
    rc = _redis_config(cfg)
    env = os.environ if environ is None else environ
    timeout = rc.connect_timeout_s if timeout_s is None else timeout_s
    out: dict[str, Any] = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
    if password := env.get(REDIS_PASSWORD_ENV):
        out["password"] = password
    if rc.uses_tls:
        tls = rc.tls
        out["ssl_cert_reqs"] = "required" if tls.verify else "none"
        out["ssl_check_hostname"] = tls.verify
        if tls.ca_file is not None:
            out["ssl_ca_certs"] = str(tls.ca_file)
        if tls.cert_file is not None:
            out["ssl_certfile"] = str(tls.cert_file)
        if tls.key_file is not None:
            out["ssl_keyfile"] = str(tls.key_file)
    return out


def redis_client(
    cfg: ServingConfig | RedisConfig,
    environ: Mapping[str, str] | None = None,
    *,
    timeout_s: float | None = None,
) -> aioredis.Redis:
    """The async Redis client of a gateway, a CLI command or a test."""
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(_redis_config(cfg).url, **redis_kwargs(cfg, environ, timeout_s=timeout_s))


def sync_redis_client(
    cfg: ServingConfig | RedisConfig,
    environ: Mapping[str, str] | None = None,
    *,
    timeout_s: float | None = None,
) -> redis.Redis:
    """The same client, synchronous (``oss-serve up``'s probe, tests)."""
    import redis

    return redis.Redis.from_url(_redis_config(cfg).url, **redis_kwargs(cfg, environ, timeout_s=timeout_s))


def text(value: Any) -> str:
    """A Redis reply value as text (clients made without ``decode_responses`` give bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)
