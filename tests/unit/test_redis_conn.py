"""One Redis client builder: the gateway, ``oss-serve tenants`` and ``oss-serve up`` get the
same URL, password (from the environment) and TLS settings."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from click.testing import CliRunner
from pydantic import ValidationError
from rich.console import Console

from serving.cli import CONFIG_ENV
from serving.cli import main as cli
from serving.config import ModelConfig, RedisConfig, ServingConfig
from serving.gateway import build
from serving.local.stack import redis_answers, start_redis
from serving.redis_conn import REDIS_PASSWORD_ENV, redis_client, redis_kwargs, sync_redis_client
from tests.redis_server import free_port

PASSWORD = 'pa ss"wo\\rd-é'  # a space, a quote, a backslash, a non-ASCII letter

TLS = {
    "url": "rediss://redis.internal:6380/0",
    "tls": {
        "ca_file": "/etc/redis/ca.pem",
        "cert_file": "/etc/redis/client.pem",
        "key_file": "/etc/redis/k.pem",
    },
}


def test_the_gateway_uses_the_one_builder() -> None:
    assert build.redis_client is redis_client
    assert build.REDIS_PASSWORD_ENV == REDIS_PASSWORD_ENV == "OSS_SERVING_REDIS_PASSWORD"


async def test_the_password_comes_from_the_environment() -> None:
    cfg = RedisConfig(url="redis://127.0.0.1:6379/0", connect_timeout_s=0.7)
    client = redis_client(cfg, {REDIS_PASSWORD_ENV: "s3cret"})
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["password"] == "s3cret"
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.7
    finally:
        await client.aclose()
    assert "password" not in redis_kwargs(cfg, {})
    whole = ServingConfig(models=[ModelConfig(name="m", source="/x")], redis=cfg)
    assert redis_kwargs(whole, {REDIS_PASSWORD_ENV: "x"})["password"] == "x"
    assert redis_kwargs(cfg, {}, timeout_s=0.2)["socket_timeout"] == 0.2
    sync = sync_redis_client(cfg, {REDIS_PASSWORD_ENV: "s3cret"})
    try:
        assert sync.connection_pool.connection_kwargs["password"] == "s3cret"
    finally:
        sync.close()


async def test_tls_settings_reach_the_connection_pool_for_rediss() -> None:
    cfg = RedisConfig.model_validate(TLS)
    client = redis_client(cfg, {REDIS_PASSWORD_ENV: "pw"})
    sync = sync_redis_client(cfg, {})
    try:
        assert issubclass(client.connection_pool.connection_class, aioredis.SSLConnection)
        assert issubclass(sync.connection_pool.connection_class, redis.SSLConnection)
        for kwargs in (client.connection_pool.connection_kwargs, sync.connection_pool.connection_kwargs):
            assert kwargs["ssl_ca_certs"] == "/etc/redis/ca.pem"
            assert kwargs["ssl_certfile"] == "/etc/redis/client.pem"
            assert kwargs["ssl_keyfile"] == "/etc/redis/k.pem"
            assert kwargs["ssl_cert_reqs"] == "required"
            assert kwargs["ssl_check_hostname"] is True
        # the connection the pool makes carries them
        ctx = client.connection_pool.make_connection().ssl_context
        assert (ctx.ca_certs, ctx.certfile, ctx.keyfile) == (
            "/etc/redis/ca.pem",
            "/etc/redis/client.pem",
            "/etc/redis/k.pem",
        )
    finally:
        await client.aclose()
        sync.close()
    unverified = RedisConfig.model_validate({"url": "rediss://r:6380", "tls": {"verify": False}})
    kwargs = redis_kwargs(unverified, {})
    assert (kwargs["ssl_cert_reqs"], kwargs["ssl_check_hostname"]) == ("none", False)
    assert "ssl_ca_certs" not in kwargs
    # a plain redis:// URL gets no TLS arguments (its connection class would refuse them)
    assert not any(k.startswith("ssl_") for k in redis_kwargs(RedisConfig(), {}))


def test_tls_settings_without_rediss_or_a_key_without_a_cert_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"not a rediss:// URL"):
        RedisConfig.model_validate({"url": "redis://r:6379", "tls": {"ca_file": "/ca.pem"}})
    with pytest.raises(ValidationError, match=r"key_file needs redis\.tls\.cert_file"):
        RedisConfig.model_validate({"url": "rediss://r:6380", "tls": {"key_file": "/k.pem"}})
    assert RedisConfig.model_validate({"url": "REDISS://r:6380"}).uses_tls


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[RedisConfig]:
    """``oss-serve up``'s own redis-server on a free port, requiring PASSWORD."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    cfg = RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=0.5)
    pid = start_redis(cfg, tmp_path, Console(quiet=True), {REDIS_PASSWORD_ENV: PASSWORD})
    try:
        yield cfg
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_up_starts_redis_with_the_password_and_probes_with_it(password_redis: RedisConfig) -> None:
    assert redis_answers(password_redis, 0.5, {REDIS_PASSWORD_ENV: PASSWORD})
    assert not redis_answers(password_redis, 0.5, {})
    assert not redis_answers(password_redis, 0.5, {REDIS_PASSWORD_ENV: "wrong"})


def test_the_tenants_command_uses_the_password(password_redis: RedisConfig) -> None:
    runner = CliRunner()
    url = ["--redis-url", password_redis.url]
    env: dict[str, str | None] = {REDIS_PASSWORD_ENV: PASSWORD, CONFIG_ENV: None, "COLUMNS": "200"}
    added = runner.invoke(cli, ["tenants", "add", "team-pw", *url], env=env)
    assert added.exit_code == 0, added.output
    key = added.output.strip().splitlines()[-1]
    listed = runner.invoke(cli, ["tenants", "list", *url], env=env)
    assert listed.exit_code == 0, listed.output
    assert "team-pw" in listed.output
    assert key[:10] in listed.output
    # without the password Redis refuses it: the command says so and fails
    refused = runner.invoke(cli, ["tenants", "list", *url], env={**env, REDIS_PASSWORD_ENV: None})
    assert refused.exit_code == 1
    assert "cannot reach Redis" in refused.output
    direct = sync_redis_client(password_redis, {REDIS_PASSWORD_ENV: PASSWORD})
    try:
        assert direct.hexists("oss:tenants", "team-pw")
    finally:
        direct.close()
