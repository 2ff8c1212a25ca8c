"""Bring the real stack up once per session: Redis, Ray, the gateway and two vLLM CPU engines.

The stack is started exactly as a user starts it (``oss-serve up --detach``) with a
configuration that serves SmolLM2 (real answers) and gpt-oss-tiny (the real gpt-oss
code path of vLLM), on a free port and a private state directory.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from tests.redis_server import RedisServer

SMOLLM = "smollm2-135m-instruct"
GPT_OSS = "gpt-oss-tiny"
MAX_BODY = 64 * 1024
GPT_OSS_IDLE_S = 5.0
"""gpt-oss-tiny's idle timeout on the shared stack: silent this long, its engine has stalled."""
CAPACITY = 4
"""Admission capacity per engine replica of the shared stack: small, so that a leaked
lease shows (the chaos test fills it)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveStack:
    base_url: str
    config_file: Path
    log_file: Path
    """``oss-serve up``'s log: the supervisor's output and what Ray forwards from the replicas."""
    ray_metrics_url: str = ""
    """The local Ray node's Prometheus endpoint, where the stack exports through Ray."""

    @property
    def api(self) -> str:
        return self.base_url + "/v1"


def _oss_serve(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@contextlib.contextmanager
def running_stack(root: Path, config: dict[str, Any]) -> Iterator[LiveStack]:
    """``oss-serve up --detach`` with ``config`` (state under ``root``), ``down`` at the end."""
    port = int(config["gateway"]["port"])
    config = {**config, "local": {"state_dir": str(root / "run")}}
    config_file = root / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    up = _oss_serve("up", "--detach", "--config", str(config_file), timeout=1500)
    if up.returncode != 0:
        _oss_serve("down", "--config", str(config_file), timeout=180)
        log = root / "run" / "stack.log"
        tail = log.read_text(errors="replace")[-6000:] if log.exists() else ""
        pytest.fail(f"oss-serve up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}\n{tail}")
    try:
        yield LiveStack(
            base_url=f"http://127.0.0.1:{port}", config_file=config_file, log_file=root / "run" / "stack.log"
        )
    finally:
        _oss_serve("down", "--config", str(config_file), timeout=180)


def smollm_config(**topology: Any) -> dict[str, Any]:
    """SmolLM2 on a vLLM CPU engine with a small KV cache."""
    return {
        "name": SMOLLM,
        "source": "builtin:smollm2-135m-instruct",
        # eager: no torch.compile, so an engine starts in well under a minute instead of
        # two to four (the suite starts three stacks); decoding is about 20% slower
        "engine_kwargs": {"max_model_len": 2048, "dtype": "bfloat16", "enforce_eager": True},
        "engine_env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
        **({"topology": topology} if topology else {}),
    }


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    port, metrics_port = _free_port(), _free_port()
    config = {
        "models": [
            smollm_config(),
            {
                "name": GPT_OSS,
                "source": "builtin:gpt-oss-tiny",
                # compiled, not eager: test_migration_gpt_oss.py compares a migrated stream
                # with an undisturbed one token for token, and eager bfloat16 diverged once
                "engine_kwargs": {"max_model_len": 4096, "dtype": "bfloat16"},
                "engine_env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
                # test_migration_gpt_oss.py pauses its replica mid-stream
                "failover": {"idle_timeout_s": GPT_OSS_IDLE_S, "announce_migration": True},
            },
        ],
        "gateway": {"port": port, "max_body_bytes": MAX_BODY, "health_check_interval_s": 1.0},
        "auth": {"required": False},
        "response_cache": {"enabled": True},
        # A key prefix of its own: the session's queue state never mixes with another stack's.
        "queue": {"key_prefix": f"osstest{port}", "capacity_per_replica": CAPACITY},
        # the gateway's metrics through Ray's metrics agent, as in the cluster (test_stack.py)
        "metrics": {"ray_export": True},
        "ray": {"metrics_export_port": metrics_port},
    }
    with running_stack(tmp_path_factory.mktemp("stack"), config) as stack:
        stack.ray_metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        yield stack


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server on a free port, for tests that stop it or need it empty."""
    srv = RedisServer(tmp_path / "redis").start()
    yield srv
    srv.stop()


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
    yield c
    await c.aclose()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the tests that need no engine first, then the modules that bring up a stack of
    their own (``OWN_STACK = True``; each stops its stack when it ends), then the tests of
    the shared session stack: two stacks never compete for the machine's cores, and timing
    tests do not run beside idle engines that busy-poll."""

    def rank(item: pytest.Item) -> int:
        module = getattr(item, "module", None)
        if getattr(module, "OWN_STACK", False):
            return 1
        return 2 if "live_stack" in getattr(item, "fixturenames", ()) else 0

    items.sort(key=rank)  # stable: the order within each group stays
