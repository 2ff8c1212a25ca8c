"""`oss-serve`: run, inspect and configure oss-serving.

Commands: ``up``, ``down``, ``status``, ``config show``, ``config validate``. Heavy
imports (Ray, vLLM) happen inside the commands that need them, so ``--help`` and the
configuration commands start instantly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console

from serving.cluster.cli import preflight
from serving.config import ConfigError, ServingConfig, load_config

CONFIG_ENV = "OSS_SERVING_CONFIG"


def _console() -> Console:
    return Console(stderr=False, highlight=False)


def _err_console() -> Console:
    return Console(stderr=True, highlight=False)


def resolve_config(path: str | None) -> ServingConfig:
    """The configuration named by ``--config``, else ``$OSS_SERVING_CONFIG``, else the default."""
    chosen = path or os.environ.get(CONFIG_ENV) or None
    return load_config(chosen)


def _load_or_exit(path: str | None) -> ServingConfig:
    try:
        return resolve_config(path)
    except ConfigError as exc:
        _err_console().print(f"[red]invalid configuration[/red]: {exc}")
        sys.exit(2)


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help=f"YAML configuration file (default: ${CONFIG_ENV}, else the built-in SmolLM2 configuration).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """oss-serving: gpt-oss as an OpenAI-compatible API on your own GPUs (or your laptop's CPU)."""


@main.group("config")
def config_group() -> None:
    """Show or check a configuration."""


@config_group.command("show")
@config_option
def config_show(config_path: str | None) -> None:
    """Print the effective configuration as YAML."""
    cfg = _load_or_exit(config_path)
    click.echo(cfg.to_yaml(), nl=False)


@config_group.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
def config_validate(file: str) -> None:
    """Check FILE; on error name the offending key and exit 2."""
    try:
        cfg = load_config(Path(file))
    except ConfigError as exc:
        _err_console().print(f"[red]invalid[/red]: {exc}")
        sys.exit(2)
    from serving.engine.budget import BudgetError, check_config

    try:
        reports = check_config(cfg)
    except BudgetError as exc:
        _err_console().print(f"[red]does not fit[/red]: {exc}")
        sys.exit(2)
    names = ", ".join(m.name for m in cfg.models)
    _console().print(f"[green]valid[/green]: {file} ({len(cfg.models)} model(s): {names})")
    for report in reports:
        layout = report.layout
        _console().print(
            f"  {layout.model} on {layout.gpu_type}: {report.kv_tokens:,} KV tokens, "
            f"about {report.max_concurrency} sequences of {report.max_model_len:,} tokens per engine"
        )


@main.command("up")
@config_option
@click.option("--port", type=int, default=None, help="Port of the OpenAI API (overrides the configuration).")
@click.option("--detach", is_flag=True, help="Return once every model is ready and leave the stack running.")
def up(config_path: str | None, port: int | None, detach: bool) -> None:
    """Start Redis (if needed), Ray, the gateway and every configured model on this machine."""
    from serving.local.stack import run_up

    cfg = _load_or_exit(config_path)
    if port is not None:
        cfg.gateway.port = port
    sys.exit(run_up(cfg, detach=detach, config_path=config_path, console=_console()))


@main.command("down")
@config_option
def down(config_path: str | None) -> None:
    """Stop what `oss-serve up` started, and nothing else."""
    from serving.local.stack import run_down

    cfg = _load_or_exit(config_path)
    sys.exit(run_down(cfg, console=_console()))


@main.command("status")
@config_option
@click.option("--cluster", is_flag=True, help="Show the Helm release on Kubernetes (current kube context).")
@click.option("-n", "--namespace", default="default", help="With --cluster: namespace of the release.")
@click.option("--release", default="oss", help="With --cluster: Helm release name.")
def status(config_path: str | None, cluster: bool, namespace: str, release: str) -> None:
    """Show the local stack: models, replicas, health (--cluster: the RayService, replicas, queue depth)."""
    if cluster:
        from serving.cluster.cli import run_cluster_status

        sys.exit(run_cluster_status(namespace, release))
    from serving.local.stack import run_status

    cfg = _load_or_exit(config_path)
    sys.exit(run_status(cfg, console=_console()))


main.add_command(preflight)

if __name__ == "__main__":
    main()
