"""A fresh gateway replica's first request pays no one-time import.

vLLM's request models (used to validate every request) pull in torch: importing them
takes seconds, which a lazy import would charge to the first request of each kind, on
the event loop, stalling every other request of the replica meanwhile. The service
imports them when it starts (in a thread), before the replica serves anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from tests.fakes import FakeEngine
    from tests.gateway import TestGateway, config_for

    PROTOCOLS = [
        "vllm.entrypoints.openai.chat_completion.protocol",
        "vllm.entrypoints.openai.completion.protocol",
        "vllm.entrypoints.openai.responses.protocol",
    ]

    async def main():
        gw = TestGateway(config_for(["m"]), {"m": FakeEngine()})
        before = [p in sys.modules for p in PROTOCOLS]
        await gw.service.start()
        after = [p in sys.modules for p in PROTOCOLS]
        await gw.service.probe_once()
        started = time.perf_counter()
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        resp = await gw.http.post("/v1/chat/completions", json=body)
        first = time.perf_counter() - started
        await gw.close()
        print(json.dumps({"before": before, "after": after, "status": resp.status_code, "first_s": first}))

    asyncio.run(main())
    """
)


def test_the_service_imports_vllms_request_models_when_it_starts() -> None:
    cmd = [sys.executable, "-c", SCRIPT]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["before"] == [False, False, False]  # nothing imported them before the start
    assert seen["after"] == [True, True, True]  # all three are loaded before the first request
    assert seen["status"] == 200
    print(f"first request of a fresh gateway: {seen['first_s'] * 1000:.0f} ms")
