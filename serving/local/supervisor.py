"""The process that owns the local Ray cluster of ``oss-serve up``.

Started detached by ``oss-serve up``; it starts a fresh local Ray node
(``address="local"``, never someone else's cluster), starts Serve's HTTP proxy, deploys
the application without blocking, and records Serve's status every few seconds for
``oss-serve status``. On SIGTERM or SIGINT it shuts Serve and its Ray node down and exits:
``oss-serve down`` stops exactly what ``up`` started.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from serving.config import RayConfig, load_config

log = logging.getLogger("oss_serving.supervisor")

STATUS_FILE = "serve-status.json"
STATUS_INTERVAL_S = 2.0
"""How often Serve's status is recorded while an application is not yet running."""
STATUS_INTERVAL_RUNNING_S = 10.0
"""... and once every application runs (each record is a call to Serve's controller)."""


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections (Linux; the usual default elsewhere)."""
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _free_ports(count: int, *, rng: random.Random | None = None) -> list[int]:
    """``count`` distinct ports free now, below the kernel's ephemeral range.

    They are bound seconds later (HAProxy starts after Ray and Serve). A port the kernel
    handed out by ``bind(0)`` lies in the ephemeral range, where every outgoing connection
    of the starting stack (Ray's workers, its gRPC and Redis clients) takes its local port
    from: one of them can take it meanwhile, and HAProxy fails with "Address already in
    use". Ports picked at random below that range are not handed out that way.
    """
    rng = rng or random.Random()
    low, _ = _ephemeral_range()
    floor = 10_000 if low > 11_000 else 1_024
    chosen: list[int] = []
    for _ in range(count * 50):
        if len(chosen) == count:
            break
        port = rng.randrange(floor, low)
        if port in chosen:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
        chosen.append(port)
    if len(chosen) < count:
        raise RuntimeError(f"no {count} free ports found below {low}")
    return chosen


def serve_env(ray_cfg: RayConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """Environment variables for the local Ray node, from ``ray_cfg``.

    Ray Serve reads these when its modules are imported, in the driver and in every actor
    (which inherit the node's environment), so they are set before Ray starts. Values the
    user exported already are kept. Ray's fixed ports are replaced by free ones, so that
    two local stacks on one machine never collide: HAProxy's stats and metrics ports, and
    the fallback proxy's (Serve's Python proxy, which HAProxy sends requests to while no
    gateway replica runs: with a shared port one stack's requests would reach the other's
    gateway). HAProxy's files are already kept apart per Ray node, and the replicas' own
    ports are bound, and re-allocated when taken, by Ray.
    """
    if not ray_cfg.high_throughput:
        return {}
    wanted = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    env = {key: value for key, value in wanted.items() if key not in environ}
    ports = (
        "RAY_SERVE_HAPROXY_STATS_PORT",
        "RAY_SERVE_HAPROXY_METRICS_PORT",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
    )
    port_keys = [key for key in ports if key not in environ]
    env.update({key: str(port) for key, port in zip(port_keys, _free_ports(len(port_keys)), strict=True)})
    return env


def _serve_status_dict() -> dict[str, object]:
    from ray import serve

    status = serve.status()
    apps: dict[str, object] = {}
    for app_name, app in status.applications.items():
        deployments = {}
        for dep_name, dep in app.deployments.items():
            deployments[dep_name] = {
                "status": str(dep.status.value if hasattr(dep.status, "value") else dep.status),
                "replicas": {
                    str(k.value if hasattr(k, "value") else k): v for k, v in dep.replica_states.items()
                },
                "message": dep.message,
            }
        apps[app_name] = {
            "status": str(app.status.value if hasattr(app.status, "value") else app.status),
            "message": app.message,
            "deployments": deployments,
        }
    return {"time": time.time(), "applications": apps}


def _all_running(status: dict[str, object]) -> bool:
    apps = status.get("applications")
    return (
        isinstance(apps, dict)
        and bool(apps)
        and all(isinstance(app, dict) and app.get("status") == "RUNNING" for app in apps.values())
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--state-dir", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = load_config(args.config)
    state_dir = Path(args.state_dir)
    env = serve_env(cfg.ray, os.environ)
    if env:
        os.environ.update(env)  # before Ray is imported: its constants are read at import
        log.info("Ray Serve high-throughput mode: %s", ", ".join(sorted(env)))
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    import ray
    from ray import serve
    from ray.serve.api import RunTarget, run_many
    from ray.serve.config import HTTPOptions

    from serving.serve_app import APP_NAME, build_serve_app

    extra: dict[str, Any] = {}
    if cfg.ray.metrics_export_port is not None:
        extra["_metrics_export_port"] = cfg.ray.metrics_export_port
    ray.init(
        address="local",
        num_cpus=cfg.ray.num_cpus,
        include_dashboard=cfg.ray.include_dashboard,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}},
        **extra,
    )
    try:
        serve.start(http_options=HTTPOptions(host=cfg.gateway.host, port=cfg.gateway.port))
        app = build_serve_app(cfg)
        run_many(
            [RunTarget(target=app, name=APP_NAME, route_prefix="/")],
            wait_for_ingress_deployment_creation=False,
            wait_for_applications_running=False,
        )
        log.info("application %s submitted", APP_NAME)
        while not stop.is_set():
            interval = STATUS_INTERVAL_S
            try:
                status = _serve_status_dict()
                (state_dir / (STATUS_FILE + ".tmp")).write_text(json.dumps(status))
                (state_dir / (STATUS_FILE + ".tmp")).replace(state_dir / STATUS_FILE)
                if _all_running(status):
                    interval = STATUS_INTERVAL_RUNNING_S
            except Exception as exc:  # status is best effort; serving goes on
                log.warning("could not record Serve status: %s", exc)
            stop.wait(interval)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
