"""The unit tests' Redis: the one at 6379 when it answers, else a private redis-server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.redis_server import answers, free_port, shared_or_private

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


def test_a_private_server_is_started_when_nothing_answers(tmp_path: Path) -> None:
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    assert not answers(nobody, 0.2)
    url, server = shared_or_private(nobody, tmp_path / "redis")
    assert server is not None
    try:
        assert url != nobody
        assert answers(url)
        # a Redis that answers is used as it is, and nothing is started
        again, none = shared_or_private(url, tmp_path / "unused")
        assert (again, none) == (url, None)
        assert not (tmp_path / "unused").exists()
    finally:
        server.stop()
    assert not answers(url, 0.2)


async def test_redis_tests_get_a_redis_that_answers(redis_url: str, redis_client: aioredis.Redis) -> None:
    assert answers(redis_url)
    assert await redis_client.ping()
    kwargs = redis_client.connection_pool.connection_kwargs
    assert f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}" == redis_url
