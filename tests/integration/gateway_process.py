"""A real gateway process for the tests that kill one: the production composition root
(:func:`serving.gateway.build.build_gateway`) and the real FastAPI app under uvicorn.

    python -m tests.integration.gateway_process CONFIG_JSON

It serves the configuration in ``CONFIG_JSON`` (its queue in the Redis of ``redis.url``)
over one :class:`tests.fakes.FakeEngine` per model that streams a word a second (a stream
stays open for minutes, without vLLM), on a free loopback port, and prints
``listening PORT`` once it answers. It runs until it is killed. Non-streamed answers come
at once, or after ``ANSWER_DELAY_ENV`` seconds when that is set (a batch line that takes a
moment, so that a test can kill the process mid-batch). Its batch worker runs, as in
every gateway replica.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from serving.api.app import create_app
from serving.config import ServingConfig
from serving.gateway.build import build_gateway
from serving.redis_conn import redis_client
from serving.wire import Endpoint, EngineJSON, EngineSSE
from tests.fakes import FakeEngine

WORDS = 600
"""Words of every answer, one a second: a streamed answer lasts ten minutes."""
ANSWER_DELAY_ENV = "GATEWAY_PROCESS_ANSWER_DELAY_S"


class PacedEngine(FakeEngine):
    """A :class:`FakeEngine` whose non-streamed answers take ``answer_delay_s``."""

    def __init__(self, text: str, answer_delay_s: float) -> None:
        super().__init__(text)
        self.answer_delay_s = answer_delay_s

    async def generate(
        self, endpoint: Endpoint, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncIterator[EngineJSON | EngineSSE]:
        if not body.get("stream") and self.answer_delay_s:
            await asyncio.sleep(self.answer_delay_s)
        async for item in super().generate(endpoint, body, headers):
            yield item


async def main(config: dict[str, object]) -> None:
    cfg = ServingConfig.model_validate(config)
    engines = {}
    delay_s = float(os.environ.get(ANSWER_DELAY_ENV) or 0)
    for m in cfg.models:
        engine = PacedEngine(" ".join(["word"] * WORDS), delay_s)
        engine.chunk_delay_s = 1.0
        engines[m.name] = engine
    redis = redis_client(cfg)
    service = build_gateway(cfg, engines, redis, {})
    await service.start()  # as the Serve deployment does before it serves the app
    app = create_app(service, cfg.gateway, service.metrics)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            serving.result()
        await asyncio.sleep(0.01)
    print("listening", port, flush=True)
    await serving


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
