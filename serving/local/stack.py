"""``oss-serve up | down | status`` on one machine.

``up`` makes sure Redis answers (starting a local ``redis-server`` if the configuration
allows and none answers), builds the built-in models once, starts the supervisor process
that owns a fresh local Ray node with the Serve application, and waits with visible
progress until every model is ready. What it started is recorded in
``<state_dir>/state.json`` so that ``down`` stops exactly that and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from serving.config import RedisConfig, ServingConfig
from serving.engine.builder import resolve_source
from serving.redis_conn import REDIS_PASSWORD_ENV, sync_redis_client

__all__ = ["StackState", "run_down", "run_status", "run_up"]

STATE_FILE = "state.json"


@dataclass
class StackState:
    """What ``up`` started."""

    supervisor_pid: int
    base_url: str
    config_file: str
    log_file: str
    redis_pid: int | None = None
    redis_url: str | None = None
    started_unix: float = 0.0

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(state_dir / STATE_FILE)

    @classmethod
    def load(cls, state_dir: Path) -> StackState | None:
        path = state_dir / STATE_FILE
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            return None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is not alive.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def base_url(cfg: ServingConfig) -> str:
    host = cfg.gateway.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{cfg.gateway.port}"


# ----------------------------------------------------------------------------- redis
def redis_answers(cfg: RedisConfig, timeout_s: float = 1.0, environ: Mapping[str, str] | None = None) -> bool:
    """Redis answers at ``cfg.url``, to the client every command uses (password, TLS)."""
    client = sync_redis_client(cfg, environ, timeout_s=timeout_s)
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def _quoted(value: str) -> str:
    """``value`` as a double-quoted string of redis.conf: any character, its UTF-8 bytes
    outside printable ASCII (and quotes, backslashes) as ``\\xHH``."""
    escaped = "".join(
        chr(b) if 0x20 <= b < 0x7F and chr(b) not in '"\\' else f"\\x{b:02x}" for b in value.encode()
    )
    return f'"{escaped}"'


def start_redis(
    cfg: RedisConfig, state_dir: Path, console: Console, environ: Mapping[str, str] | None = None
) -> int:
    """Start ``redis-server`` for ``cfg.url`` (no persistence), requiring the password of
    ``OSS_SERVING_REDIS_PASSWORD`` if one is set (given on stdin, not on the command line,
    where ``ps`` would show it); return its pid."""
    url = cfg.url
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(
            f"Redis does not answer at {url} and no redis-server binary is installed.\n"
            "Install it (Debian/Ubuntu: `sudo apt-get install -y redis-server`; macOS: `brew install redis`) "
            "or point redis.url in your configuration at a running Redis."
        )
    if cfg.uses_tls:
        raise SystemExit(
            f"Redis does not answer at {url}; `oss-serve up` starts redis-server without TLS only"
        )
    env = os.environ if environ is None else environ
    password = env.get(REDIS_PASSWORD_ENV, "")
    parsed = urlparse(url)
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or 6379
    log = open(state_dir / "redis.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [
            binary,
            "-",  # the rest of the configuration from stdin: the password, if any
            "--bind",
            host,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(state_dir),
        ],
        stdin=subprocess.PIPE,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(f"requirepass {_quoted(password)}\n".encode() if password else b"")
    proc.stdin.close()
    for _ in range(50):
        if redis_answers(cfg, 0.2, environ):
            console.print(f"[green]started[/green] redis-server on {host}:{port} (pid {proc.pid})")
            return proc.pid
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit(f"redis-server did not start; see {state_dir / 'redis.log'}")


# ----------------------------------------------------------------------------- up
def _build_models(cfg: ServingConfig, console: Console) -> None:
    builtins = [m for m in cfg.models if m.source.startswith("builtin:")]
    if not builtins:
        return
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        for model in builtins:
            task = progress.add_task(f"model {model.name}", total=1.0)

            def report(step: str, fraction: float, task_id: Any = task, name: str = model.name) -> None:
                progress.update(task_id, completed=fraction, description=f"model {name}: {step}")

            resolve_source(model, cfg.local.cache_dir, report)
            progress.update(task, completed=1.0)


def _wait_ready(cfg: ServingConfig, state: StackState, console: Console) -> bool:
    deadline = time.monotonic() + cfg.local.ready_timeout_s
    url = state.base_url + "/health"
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        tasks = {m.name: progress.add_task(f"{m.name}: starting engine", total=1) for m in cfg.models}
        gateway_task = progress.add_task("gateway: starting", total=1)
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if not pid_alive(state.supervisor_pid):
                    console.print(
                        f"[red]the stack exited during start-up[/red]; last lines of {state.log_file}:"
                    )
                    console.print(_tail(Path(state.log_file)), markup=False, highlight=False)
                    return False
                try:
                    report = client.get(url).json()
                except (httpx.HTTPError, ValueError):
                    time.sleep(1.0)
                    continue
                progress.update(gateway_task, completed=1, description="gateway: serving")
                for name, task in tasks.items():
                    info = report.get("models", {}).get(name, {})
                    if info.get("ready"):
                        progress.update(task, completed=1, description=f"{name}: ready")
                if report.get("ready"):
                    return True
                time.sleep(1.0)
    console.print(f"[red]not ready after {cfg.local.ready_timeout_s:g} s[/red]; see {state.log_file}")
    return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _print_examples(cfg: ServingConfig, url: str, console: Console) -> None:
    model = cfg.models[0].name
    console.print(f"\n[bold green]oss-serving is ready[/bold green] at [bold]{url}/v1[/bold]")
    console.print("Models: " + ", ".join(m.name for m in cfg.models))
    console.print("\n[bold]curl[/bold]")
    console.print(
        f"curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f'  -d \'{{"model": "{model}", "temperature": 0, "messages": ['
        '{"role": "system", "content": "You are a helpful assistant."}, '
        '{"role": "user", "content": "What is the capital of France?"}]}\'',
        soft_wrap=True,
        markup=False,
    )
    console.print("\n[bold]Python (OpenAI SDK)[/bold]")
    console.print(
        "from openai import OpenAI\n"
        f'client = OpenAI(base_url="{url}/v1", api_key="unused-in-local-mode")\n'
        f'reply = client.chat.completions.create(model="{model}", temperature=0, messages=[\n'
        '    {"role": "system", "content": "You are a helpful assistant."},\n'
        '    {"role": "user", "content": "What is the capital of France?"}])\n'
        "print(reply.choices[0].message.content)",
        soft_wrap=True,
        markup=False,
    )
    console.print(
        "\nStop it with [bold]oss-serve down[/bold]; inspect it with [bold]oss-serve status[/bold]."
    )


def run_up(cfg: ServingConfig, *, detach: bool, config_path: str | None, console: Console) -> int:
    state_dir = cfg.local.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    existing = StackState.load(state_dir)
    if existing and pid_alive(existing.supervisor_pid):
        console.print(
            f"[yellow]already running[/yellow] at {existing.base_url} (pid {existing.supervisor_pid}); "
            "`oss-serve down` first"
        )
        return 1

    if cfg.auth.required:
        console.print(
            "[bold]oss-serving[/bold]: API keys are required (`oss-serve tenants add NAME` issues one)."
        )
    else:
        console.print(
            "[bold]oss-serving[/bold] local mode: [yellow]no API keys are required[/yellow] "
            "(auth.required is false: every request is accepted as tenant 'local')."
        )
    redis_pid = None
    if redis_answers(cfg.redis):
        console.print(f"[green]redis[/green] answers at {cfg.redis.url}")
    elif cfg.local.start_redis:
        redis_pid = start_redis(cfg.redis, state_dir, console)
    else:
        console.print(f"[red]Redis does not answer at {cfg.redis.url}[/red] and local.start_redis is false")
        return 1

    _build_models(cfg, console)

    config_file = state_dir / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    log_file = state_dir / "stack.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serving.local.supervisor",
                "--config",
                str(config_file),
                "--state-dir",
                str(state_dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    state = StackState(
        supervisor_pid=proc.pid,
        base_url=base_url(cfg),
        config_file=str(config_file),
        log_file=str(log_file),
        redis_pid=redis_pid,
        redis_url=cfg.redis.url if redis_pid else None,
        started_unix=time.time(),
    )
    state.save(state_dir)
    console.print(f"starting Ray and the engines (log: {log_file})")
    if not _wait_ready(cfg, state, console):
        run_down(cfg, console=console)
        return 1
    _print_examples(cfg, state.base_url, console)
    if detach:
        return 0
    console.print("\nServing in the foreground; Ctrl-C stops everything.")
    try:
        while pid_alive(proc.pid):
            time.sleep(1.0)
        console.print("[red]the stack exited[/red]")
        console.print(_tail(log_file), markup=False, highlight=False)
        return 1
    except KeyboardInterrupt:
        return run_down(cfg, console=console)
    finally:
        if pid_alive(proc.pid):
            run_down(cfg, console=console)


# ----------------------------------------------------------------------------- down
def _terminate(pid: int, timeout_s: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.25)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def run_down(cfg: ServingConfig, *, console: Console) -> int:
    state_dir = cfg.local.state_dir
    state = StackState.load(state_dir)
    if state is None:
        console.print("nothing to stop: no stack was started by `oss-serve up` with this state directory")
        return 0
    if pid_alive(state.supervisor_pid):
        console.print(f"stopping the stack (pid {state.supervisor_pid}) ...")
        _terminate(state.supervisor_pid, timeout_s=90.0)
    if state.redis_pid and pid_alive(state.redis_pid):
        console.print(f"stopping the redis-server that `up` started (pid {state.redis_pid})")
        _terminate(state.redis_pid, timeout_s=10.0)
    with contextlib.suppress(FileNotFoundError):
        (state_dir / STATE_FILE).unlink()
    console.print("[green]stopped[/green]")
    return 0


# ----------------------------------------------------------------------------- status
def run_status(cfg: ServingConfig, *, console: Console) -> int:
    state = StackState.load(cfg.local.state_dir)
    if state is None or not pid_alive(state.supervisor_pid):
        console.print("[yellow]not running[/yellow] (start it with `oss-serve up`)")
        return 1
    try:
        report = httpx.get(state.base_url + "/health", timeout=5.0).json()
    except (httpx.HTTPError, ValueError) as exc:
        console.print(f"[red]the gateway at {state.base_url} does not answer[/red]: {exc}")
        return 1
    serve_status: dict[str, Any] = {}
    status_file = cfg.local.state_dir / "serve-status.json"
    with contextlib.suppress(OSError, ValueError):
        serve_status = json.loads(status_file.read_text())
    deployments: dict[str, Any] = {}
    for app in serve_status.get("applications", {}).values():
        deployments.update(app.get("deployments", {}))

    from serving.engine.builder import deployment_name

    summary = f"status: {report.get('status')}, redis: {report.get('redis')}"
    table = Table(title=f"oss-serving at {state.base_url}  ({summary})")
    for column in ("model", "ready", "replicas", "deployment", "engine requests", "last error"):
        table.add_column(column)
    for model in cfg.models:
        info = report.get("models", {}).get(model.name, {})
        dep = deployments.get(deployment_name(model), {})
        replicas = ", ".join(f"{n} {s.lower()}" for s, n in dep.get("replicas", {}).items()) or "?"
        table.add_row(
            model.name,
            "[green]yes[/green]" if info.get("ready") else "[red]no[/red]",
            replicas,
            str(dep.get("status", "?")).lower(),
            str(info.get("engine_unfinished_requests", "-")),
            str(info.get("last_error") or ""),
        )
    console.print(table)
    return 0 if report.get("ready") else 2
