"""Shared fixtures of the unit tests.

Redis-backed tests use the Redis at 127.0.0.1:6379 when one answers there (CI's service
container); otherwise a private ``redis-server`` (:class:`tests.redis_server.RedisServer`)
is started on a free port for the session. They are skipped only when neither exists.
Each test works under a key prefix of its own, so a shared Redis is safe.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from tests.redis_server import answers, shared_or_private

SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of the unit tests' Redis: 6379 if it answers, else a private server."""
    if not answers(SHARED_REDIS_URL) and shutil.which("redis-server") is None:
        pytest.skip("no Redis at 127.0.0.1:6379 and no redis-server to start one")
    url, server = shared_or_private(SHARED_REDIS_URL, tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        if server is not None:
            server.stop()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=1)
    yield client
    await client.aclose()
