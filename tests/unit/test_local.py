"""`oss-serve down` stops what `up` recorded and nothing else; `up` can start Redis."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from serving.config import LocalConfig, ModelConfig, RayConfig, ServingConfig
from serving.local.stack import StackState, pid_alive, redis_answers, run_down, start_redis
from serving.local.supervisor import serve_env


def _cfg(tmp_path: Path, redis_url: str = "redis://127.0.0.1:6379/0") -> ServingConfig:
    return ServingConfig(
        models=[ModelConfig(name="m", source="/x")],
        local=LocalConfig(state_dir=tmp_path / "run"),
        redis={"url": redis_url},  # type: ignore[arg-type]
    )


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)


def test_down_stops_recorded_processes_only(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    supervisor, redis, bystander = _sleeper(), _sleeper(), _sleeper()
    try:
        StackState(
            supervisor_pid=supervisor.pid,
            base_url="http://127.0.0.1:1",
            config_file="",
            log_file="",
            redis_pid=redis.pid,
            redis_url=cfg.redis.url,
        ).save(cfg.local.state_dir)
        assert run_down(cfg, console=Console(quiet=True)) == 0
        assert supervisor.wait(10) is not None
        assert redis.wait(10) is not None
        assert pid_alive(bystander.pid)
        assert StackState.load(cfg.local.state_dir) is None
    finally:
        for p in (supervisor, redis, bystander):
            p.kill()
            p.wait()


def test_down_without_state_is_a_no_op(tmp_path: Path) -> None:
    assert run_down(_cfg(tmp_path), console=Console(quiet=True)) == 0


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_up_starts_redis_when_none_answers_and_down_stops_it(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    cfg = _cfg(tmp_path, url)
    cfg.local.state_dir.mkdir(parents=True)
    assert not redis_answers(cfg.redis, 0.2, {})
    pid = start_redis(cfg.redis, cfg.local.state_dir, Console(quiet=True), {})
    try:
        assert redis_answers(cfg.redis, environ={})
        StackState(
            supervisor_pid=0, base_url="", config_file="", log_file="", redis_pid=pid, redis_url=url
        ).save(cfg.local.state_dir)
        run_down(cfg, console=Console(quiet=True))
        deadline = time.monotonic() + 5
        while redis_answers(cfg.redis, 0.2, {}) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not redis_answers(cfg.redis, 0.2, {})
    finally:
        if pid_alive(pid):
            subprocess.run(["kill", str(pid)], check=False)


def test_serve_env_turns_on_high_throughput_with_private_haproxy_ports() -> None:
    env = serve_env(RayConfig(), {})
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    # Ray's fixed ports (HAProxy stats 8404 and metrics 9101, the fallback proxy's 8500 and
    # 9500) are replaced by free ones, so that a second local stack does not collide with
    # the first (with a shared fallback port one stack answered the other's requests).
    keys = ("HAPROXY_STATS", "HAPROXY_METRICS", "FALLBACK_PROXY_HTTP", "FALLBACK_PROXY_GRPC")
    ports = {int(env[f"RAY_SERVE_{key}_PORT"]) for key in keys}
    assert len(ports) == 4
    assert not ports & {8404, 9101, 8500, 9500}


def test_serve_env_keeps_what_the_user_exported_and_can_be_turned_off() -> None:
    env = serve_env(RayConfig(), {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_HAPROXY_STATS_PORT": "9"})
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in env
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in env
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert serve_env(RayConfig(high_throughput=False), {}) == {}


def test_haproxy_ports_are_picked_free_and_below_the_ephemeral_range() -> None:
    """Chosen seconds before HAProxy binds them: ports outside the range the kernel hands
    outgoing connections (which the starting stack opens by the hundred), and a taken
    one is never picked."""
    import random

    from serving.local.supervisor import _ephemeral_range, _free_ports

    low, _ = _ephemeral_range()
    first = _free_ports(1, rng=random.Random(7))[0]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("", first))
        held.listen()
        ports = _free_ports(4, rng=random.Random(7))  # the same draws: the held one is skipped
    assert first not in ports
    assert len(set(ports)) == 4
    assert all(port < low for port in ports)
